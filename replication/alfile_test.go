package replication

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestALFileRecoversNewestIntactState(t *testing.T) {
	p := filepath.Join(t.TempDir(), "v.al")
	a, al, err := OpenALFile(p)
	if err != nil || len(al) != 0 {
		t.Fatalf("new file: %v %v", al, err)
	}
	states := [][]uint64{{1}, {1, 7}, {7, 9, 3}, {}, {5}}
	for _, s := range states {
		if err := a.Save(s); err != nil {
			t.Fatal(err)
		}
	}
	a.Close()
	a, al, err = OpenALFile(p)
	if err != nil || !slices.Equal(al, states[4]) {
		t.Fatalf("reopen: %v %v, want %v", al, err, states[4])
	}
	// The next save goes on from the recovered sequence number, into the
	// slot holding the older state, never over the newest one.
	big := make([]uint64, DefaultALSlots)
	for i := range big {
		big[i] = uint64(1000 + i)
	}
	if err := a.Save(big); err != nil {
		t.Fatal(err)
	}
	a.Close()
	if _, al, _ = OpenALFile(p); !slices.Equal(al, big) {
		t.Fatalf("after reopen and save: %d regions, want %d", len(al), len(big))
	}

	// A crash in the middle of the newest write: any byte of its used
	// prefix torn. Recovery must fall back to the state before it.
	raw, _ := os.ReadFile(p)
	for _, off := range []int{0, 9, 17, 21, alHeaderBytes + 8*100, alHeaderBytes + 8*(len(big)-1)} {
		torn := slices.Clone(raw)
		torn[off] ^= 0x40 // seq 6 lives in slot 0
		if err := os.WriteFile(p, torn, 0o600); err != nil {
			t.Fatal(err)
		}
		a, al, err := OpenALFile(p)
		if err != nil || !slices.Equal(al, states[4]) {
			t.Fatalf("torn byte %d: got %v %v, want the previous state %v", off, al, err, states[4])
		}
		a.Close()
	}
	// Both slots damaged: corrupt, never an empty log.
	torn := slices.Clone(raw)
	torn[3] ^= 1
	torn[alSlotBytes+20] ^= 1
	os.WriteFile(p, torn, 0o600)
	if _, _, err := OpenALFile(p); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("both slots damaged: %v", err)
	}
	if err := os.WriteFile(p, raw[:alSlotBytes], 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := OpenALFile(p); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("truncated file: %v", err)
	}
	if err := a.Save(make([]uint64, MaxALSlots+1)); err == nil {
		t.Fatal("oversized activity log accepted")
	}
}

func TestOpenLocalActivityLog(t *testing.T) {
	dir := t.TempDir()
	l, err := OpenLocal(LocalOptions{Dir: dir, Volume: "v", Size: 1 << 24, Gen: 3})
	if err != nil {
		t.Fatal(err)
	}
	m := l.Meta.Clone()
	m.AL = []uint64{4, 2}
	m.Epoch = 5
	// Only the activity log: the metadata file keeps epoch 0.
	if err := l.Persist(m, false, true); err != nil {
		t.Fatal(err)
	}
	l.Close()
	l, err = OpenLocal(LocalOptions{Dir: dir, Volume: "v"})
	if err != nil || !slices.Equal(l.Meta.AL, []uint64{4, 2}) || l.Meta.Epoch != 0 {
		t.Fatalf("reopen: %+v %v", l.Meta, err)
	}
	m.AL = nil
	if err := l.Persist(m, true, false); err != nil {
		t.Fatal(err)
	}
	l.Close()
	got, err := LoadLocalMeta(dir, "v")
	if err != nil || !slices.Equal(got.AL, []uint64{4, 2}) || got.Epoch != 5 {
		t.Fatalf("metadata save must not touch the activity log: %+v %v", got, err)
	}
	// An existing replica whose activity-log file vanished is corrupt: an
	// empty log would hide the regions a crashed primary may have written.
	os.Remove(filepath.Join(dir, "v.al"))
	if _, err := OpenLocal(LocalOptions{Dir: dir, Volume: "v"}); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("missing activity log: %v", err)
	}
	// A new replica never inherits a deleted volume's leftover log.
	if err := DeleteLocal(dir, "v"); err != nil {
		t.Fatal(err)
	}
	stale, _, _ := OpenALFile(filepath.Join(dir, "v.al"))
	stale.Save([]uint64{99})
	stale.Close()
	l, err = OpenLocal(LocalOptions{Dir: dir, Volume: "v", Size: 1 << 24})
	if err != nil || len(l.Meta.AL) != 0 {
		t.Fatalf("new replica over a leftover log: %v %v", l.Meta.AL, err)
	}
	l.Close()
}
