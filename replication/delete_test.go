package replication

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestVolumeDeleteOnline deletes a replicated volume while it is live: the
// primary refuses while a write is in flight, a replica refuses while its
// primary is connected, and once both accept, no file of the volume is left
// on either node and the volume serves nothing more.
func TestVolumeDeleteOnline(t *testing.T) {
	h := newFHarness(t)
	n2 := h.serve("n2", "")
	px := newFaultProxy(t, n2.addr)
	h.mem.Create(fVol, "n1", "n2")
	v := h.open("n1", nil, map[string]string{"n2": px.Addr()}, 500) // 10 s: the paused write stays in flight
	h.waitSynced(v, "n1", "n2")
	ctx := context.Background()
	if err := v.WriteAt(ctx, makeBlock(1, 1, 1), fStride, false); err != nil {
		t.Fatal(err)
	}

	// A write stuck on a partitioned ISR member keeps the volume in use.
	px.Pause()
	done := make(chan error, 1)
	go func() { done <- v.WriteAt(ctx, makeBlock(2, 1, 1), 2*fStride, false) }()
	time.Sleep(100 * time.Millisecond)
	if err := v.Delete(ctx); !errors.Is(err, ErrInUse) {
		t.Fatalf("delete with a write in flight: %v", err)
	}
	// The replica refuses while its primary is connected.
	if err := n2.srv.DeleteVolume(fVol); !errors.Is(err, ErrInUse) {
		t.Fatalf("replica delete while the primary is connected: %v", err)
	}
	px.Resume()
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	if err := v.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	if err := v.WriteAt(ctx, makeBlock(3, 1, 1), 3*fStride, false); !errors.Is(err, ErrClosed) {
		t.Fatalf("write after delete: %v", err)
	}
	// The primary's connection closes asynchronously.
	var err error
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if err = n2.srv.DeleteVolume(fVol); !errors.Is(err, ErrInUse) {
			break
		}
	}
	if err != nil {
		t.Fatalf("replica delete after the primary's: %v", err)
	}
	h.mem.Delete(fVol)
	for _, n := range []string{"n1", "n2"} {
		left, _ := filepath.Glob(filepath.Join(h.dir(n), fVol+"*"))
		if len(left) > 0 {
			t.Errorf("%s still has %v", n, left)
		}
	}
	if err := n2.srv.DeleteVolume(fVol); !errors.Is(err, ErrUnknownVolume) {
		t.Fatalf("second delete: %v", err)
	}
	// A node that does not serve the volume at all deletes its leftovers.
	dir := filepath.Join(h.base, "n3")
	l, err := OpenLocal(LocalOptions{Dir: dir, Volume: fVol, Size: fSize, RegionSize: fRS})
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	if err := DeleteLocal(dir, fVol); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("DeleteLocal left %v", ents)
	}
}
