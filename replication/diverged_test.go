package replication

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"
)

// TestFreshPrimaryRefusesWrittenReplica: a two-replica volume created at
// its creation generation (real files, TLS on loopback). A restart of the
// primary before any write is harmless; after writes, the primary's files
// are deleted and recreated fresh at the creation generation (a replaced
// disk). Reopened as primary while still in the ISR, it must report
// ErrDiverged through OnUnhealthy, acknowledge no write, serve no read,
// and leave the replica's data untouched. Making the replica primary then
// restores the recreated node by a full sync.
func TestFreshPrimaryRefusesWrittenReplica(t *testing.T) {
	h := newFHarness(t)
	n2 := h.serve("n2", "")
	peers := map[string]string{"n2": n2.addr}
	h.mem.Create(fVol, "n1", "n2")
	ctx := context.Background()

	open := func(onUnhealthy func(error)) *Volume {
		t.Helper()
		l, err := OpenLocal(LocalOptions{Dir: h.dir("n1"), Volume: fVol, Size: fSize, RegionSize: fRS, Gen: fGen})
		if err != nil {
			t.Fatal(err)
		}
		v, err := OpenVolume(ctx, VolumeConfig{Self: "n1", Peers: peers, Local: l, Membership: h.mem,
			TLS: h.pki.client(t, "n1"), TickInterval: 20 * time.Millisecond, AckTimeoutTicks: 50, ALSlots: 8,
			Logger: testLogger(t).With("node", "n1"), OnUnhealthy: onUnhealthy})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { v.Close() })
		return v
	}
	healthy := func(err error) { t.Errorf("unexpected unhealthy: %v", err) }

	// A restart before the first write: both sides are still fresh.
	v := open(healthy)
	h.waitSynced(v, "n1", "n2")
	v.Close()
	v = open(healthy)
	h.waitSynced(v, "n1", "n2")
	buf := make([]byte, 4096)
	for r := int64(0); r < fSize/fRS; r++ {
		for i := range buf {
			buf[i] = byte(r*7 + int64(i) + 1)
		}
		if err := v.WriteAt(ctx, buf, r*fRS+8192, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	v.Close()
	want := readImage(t, h.imgPath("n2"))
	if bytes.Count(want, []byte{0}) == len(want) {
		t.Fatal("n2 holds no data after the writes")
	}

	// n1's disk replaced: its files are recreated fresh at the creation
	// generation and it opens as primary again, still in the ISR.
	if err := DeleteLocal(h.dir("n1"), fVol); err != nil {
		t.Fatal(err)
	}
	unhealthy := make(chan error, 4)
	v = open(func(err error) { unhealthy <- err })
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	werr, rerr := make(chan error, 1), make(chan error, 1)
	go func() { werr <- v.WriteAt(wctx, bytes.Repeat([]byte{0xee}, 4096), 0, true) }()
	go func() { rerr <- v.ReadAt(wctx, make([]byte, 4096), 8192) }()
	select {
	case err := <-unhealthy:
		if !errors.Is(err, ErrDiverged) {
			t.Fatalf("unhealthy with %v, want ErrDiverged", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the recreated primary did not report itself unhealthy")
	}
	if err := <-werr; !errors.Is(err, ErrDiverged) {
		t.Fatalf("write on the diverged primary: %v, want ErrDiverged", err)
	}
	if err := <-rerr; !errors.Is(err, ErrDiverged) {
		t.Fatalf("read issued before the handshake: %v, want ErrDiverged", err)
	}
	if err := v.WriteAt(ctx, buf, fRS, false); !errors.Is(err, ErrDiverged) {
		t.Fatalf("later write: %v, want ErrDiverged", err)
	}
	if err := v.ReadAt(ctx, buf, 0); !errors.Is(err, ErrDiverged) {
		t.Fatalf("read: %v, want ErrDiverged", err)
	}
	v.Close()
	if got := readImage(t, h.imgPath("n2")); !bytes.Equal(got, want) {
		t.Fatal("n2's data changed under the diverged primary")
	}
	if got := readImage(t, h.imgPath("n1")); bytes.Count(got, []byte{0}) != len(got) {
		t.Fatal("the diverged primary wrote to its own replica")
	}
	if m, err := LoadLocalMeta(h.dir("n1"), fVol); err != nil || !m.Fresh || m.Gen != fGen {
		t.Fatalf("recreated n1 metadata: %+v %v, want fresh at the creation generation", m, err)
	}
	if m, err := LoadLocalMeta(h.dir("n2"), fVol); err != nil || m.Fresh || m.Gen != fGen {
		t.Fatalf("n2 metadata after the refusal: %+v %v", m, err)
	}
	if st, _ := h.mem.State(ctx, fVol); !st.InISR("n2") {
		t.Fatalf("n2 left the ISR: %+v", st)
	}

	// What the cluster does next: the volume moves to n2, n1 serves as a
	// replica and gets n2's data by a full sync.
	n2.stop()
	if _, err := h.mem.Promote(fVol, "n2"); err != nil {
		t.Fatal(err)
	}
	n1 := h.serve("n1", "")
	v2 := h.open("n2", nil, map[string]string{"n1": n1.addr}, 50)
	h.waitSynced(v2, "n2", "n1")
	if got := resyncTotal(t, v2, "n1"); got != fSize {
		t.Fatalf("n1 after the move: resync of %d bytes, want a full sync of %d", got, fSize)
	}
	if err := v2.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"n1", "n2"} {
		if !bytes.Equal(readImage(t, h.imgPath(n)), want) {
			t.Fatalf("%s does not hold the written data after the move", n)
		}
	}
}
