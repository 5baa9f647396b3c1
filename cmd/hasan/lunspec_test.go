package main

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/uuid"
)

func TestParseLUNSpec(t *testing.T) {
	u := "8c1b2d6e-2f7a-4c43-9a51-2d1e4b9a7f00"
	for _, tc := range []struct {
		in      string
		want    lunSpec
		wantErr string
	}{
		{in: "0=/tmp/a", want: lunSpec{LUN: 0, Path: "/tmp/a", BlockSize: 512}},
		{in: "3=/tmp/a,size=1G,thin", want: lunSpec{LUN: 3, Path: "/tmp/a", Size: 1 << 30, Thin: true, BlockSize: 512}},
		{in: "1=/x,size=8M,block=4096,uuid=" + u, want: lunSpec{LUN: 1, Path: "/x", Size: 8 << 20, BlockSize: 4096, UUID: uuid.MustParse(u)}},
		{in: "/tmp/a", wantErr: "want N=PATH"},
		{in: "x=/tmp/a", wantErr: "LUN number"},
		{in: "0=/tmp/a,size=", wantErr: "size= needs"},
		{in: "0=/tmp/a,size=-1G", wantErr: "positive"},
		{in: "0=/tmp/a,size=1000", wantErr: "not a multiple"},
		{in: "0=/tmp/a,block=1024", wantErr: "512 or 4096"},
		{in: "0=/tmp/a,bogus", wantErr: "unknown option"},
		{in: "0=/tmp/a,uuid=nope", wantErr: "uuid"},
	} {
		got, err := parseLUNSpec(tc.in)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("parseLUNSpec(%q) err = %v, want it to mention %q", tc.in, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("parseLUNSpec(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
		}
	}
}

func TestVolumeIDIsStableAndGuarded(t *testing.T) {
	p := filepath.Join(t.TempDir(), "lun0")
	first, err := resolveVolumeID(lunSpec{Path: p})
	if err != nil || first == uuid.Nil {
		t.Fatalf("first resolve: %v %v", first, err)
	}
	again, err := resolveVolumeID(lunSpec{Path: p})
	if err != nil || again != first {
		t.Fatalf("identity changed across restarts: %v -> %v (%v)", first, again, err)
	}
	if _, err := resolveVolumeID(lunSpec{Path: p, UUID: uuid.New()}); err == nil {
		t.Fatal("a contradicting uuid= was accepted")
	}
	other, _ := resolveVolumeID(lunSpec{Path: p + "b"})
	if other == first {
		t.Fatal("two files got the same identity")
	}
}
