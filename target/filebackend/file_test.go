package filebackend

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func open(t *testing.T, prov Provisioning, size int64) *File {
	t.Helper()
	b, err := Open(filepath.Join(t.TempDir(), "lun"), Options{Size: size, Provisioning: prov, Create: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

func TestReadWriteFUA(t *testing.T) {
	ctx := context.Background()
	b := open(t, Thick, 1<<20)
	want := bytes.Repeat([]byte{0xA5}, 8192)
	if err := b.WriteAt(ctx, want, 4096, true); err != nil {
		t.Fatal(err)
	}
	if err := b.WriteAt(ctx, want[:512], 0, false); err != nil {
		t.Fatal(err)
	}
	if err := b.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 8192)
	if err := b.ReadAt(ctx, got, 4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("read back differs from what was written")
	}
	if err := b.ReadAt(ctx, got, 1<<20-4096); err == nil {
		t.Fatal("read past end succeeded")
	}
}

func TestThickIsAllocatedThinIsSparse(t *testing.T) {
	for _, tc := range []struct {
		prov       Provisioning
		wantMapped bool
	}{{Thick, true}, {Thin, false}} {
		b := open(t, tc.prov, 4<<20)
		mapped, n, err := b.MapStatus(context.Background(), 0)
		if err != nil {
			t.Fatal(err)
		}
		if mapped != tc.wantMapped || n != 4<<20 {
			t.Errorf("%v: MapStatus(0) = %v,%d; want %v,%d", tc.prov, mapped, n, tc.wantMapped, 4<<20)
		}
	}
}

func TestUnmapPunchesHoleAndReadsZero(t *testing.T) {
	ctx := context.Background()
	b := open(t, Thin, 4<<20)
	data := bytes.Repeat([]byte{1}, 1<<20)
	if err := b.WriteAt(ctx, data, 1<<20, false); err != nil {
		t.Fatal(err)
	}
	mapped, n, _ := b.MapStatus(ctx, 1<<20)
	if !mapped || n != 1<<20 {
		t.Fatalf("after write MapStatus = %v,%d; want true,%d", mapped, n, 1<<20)
	}
	if err := b.Unmap(ctx, 1<<20+65536, 65536); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 65536)
	if err := b.ReadAt(ctx, got, 1<<20+65536); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, 65536)) {
		t.Fatal("unmapped range does not read as zeros")
	}
	mapped, n, _ = b.MapStatus(ctx, 1<<20+65536)
	if mapped || n != 65536 {
		t.Fatalf("hole MapStatus = %v,%d; want false,65536", mapped, n)
	}
	if err := b.ReadAt(ctx, got, 1<<20); err != nil || !bytes.Equal(got, data[:65536]) {
		t.Fatal("data before the hole was disturbed")
	}
}

func TestResizeGrowsAndRefusesShrink(t *testing.T) {
	ctx := context.Background()
	b := open(t, Thin, 1<<20)
	if err := b.WriteAt(ctx, []byte("keep-me!"), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := b.Resize(ctx, 2<<20); err != nil {
		t.Fatal(err)
	}
	if b.Size() != 2<<20 {
		t.Fatalf("size %d after grow", b.Size())
	}
	got := make([]byte, 8)
	if err := b.ReadAt(ctx, got, 0); err != nil || string(got) != "keep-me!" {
		t.Fatalf("data lost on grow: %q %v", got, err)
	}
	if err := b.Resize(ctx, 1<<20); !errors.Is(err, ErrShrink) {
		t.Fatalf("shrink: err = %v, want ErrShrink", err)
	}
	st, _ := os.Stat(b.Path())
	if st.Size() != 2<<20 {
		t.Fatalf("file size %d after refused shrink", st.Size())
	}
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := Open(filepath.Join(dir, "missing"), Options{}); err == nil {
		t.Error("opening a missing file without Create succeeded")
	}
	if _, err := Open(filepath.Join(dir, "empty"), Options{Create: true}); err == nil {
		t.Error("creating a file without a size succeeded")
	}
	if _, err := Open(dir, Options{}); err == nil {
		t.Error("opening a directory succeeded")
	}
}
