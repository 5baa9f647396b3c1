package peer

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func TestURL(t *testing.T) {
	tg := &Target{IQN: "iqn.2026-01.x:y", LUN: 1, Portals: []string{"127.0.0.1:3260"}}
	if got, want := tg.URL(1), "iscsi://127.0.0.1:3260/iqn.2026-01.x:y/1"; got != want {
		t.Errorf("URL = %q, want %q (a missing portal falls back to the last)", got, want)
	}
	tg.CHAP = &CHAP{User: "u", Secret: "s3cret"}
	tg.Portals = append(tg.Portals, "127.0.0.1:3261")
	if got, want := tg.URL(1), "iscsi://u%s3cret@127.0.0.1:3261/iqn.2026-01.x:y/1"; got != want {
		t.Errorf("URL = %q, want %q", got, want)
	}
}

func TestSizeArg(t *testing.T) {
	for in, want := range map[int64]string{1 << 30: "1G", 3 << 20: "3M", 1000: "1000"} {
		if got := sizeArg(in); got != want {
			t.Errorf("sizeArg(%d) = %q, want %q", in, got, want)
		}
	}
}

// A thick file must have its blocks allocated, a thin one must not.
func TestPrepareFile(t *testing.T) {
	dir := t.TempDir()
	for _, thin := range []bool{false, true} {
		p := filepath.Join(dir, "f")
		if err := PrepareFile(p, 8<<20, thin); err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		allocated := fi.Sys().(*syscall.Stat_t).Blocks * 512
		if fi.Size() != 8<<20 {
			t.Errorf("thin=%v: size %d", thin, fi.Size())
		}
		if thin && allocated != 0 {
			t.Errorf("thin file has %d bytes allocated", allocated)
		}
		if !thin && allocated < 8<<20 {
			t.Errorf("thick file has only %d bytes allocated", allocated)
		}
	}
}
