package replication

import (
	"bytes"
	"context"
	"testing"
	"time"
)

// TestCreationGenerationRealFiles: three replicas created together with the
// volume's creation generation (LocalOptions.Gen, real files, TLS on
// loopback) start in sync: no region is copied before the first write. A
// replica whose disk is later replaced and recreated with that same
// creation generation (a mistake the cluster must not be able to turn into
// silent divergence) gets a full sync, because the primary is no longer
// fresh; so does one created with generation 0.
func TestCreationGenerationRealFiles(t *testing.T) {
	h := newFHarness(t)
	n2 := h.serve("n2", "")
	n3 := h.serve("n3", "")
	h.mem.Create(fVol, "n1", "n2", "n3")
	v := h.open("n1", nil, map[string]string{"n2": n2.addr, "n3": n3.addr}, 50)
	h.waitSynced(v, "n1", "n2", "n3")
	ctx := context.Background()
	ps, _ := v.Status(ctx)
	for _, p := range ps {
		if p.ResyncTotal != 0 || p.ResyncDone != 0 {
			t.Fatalf("%s: replicas created together were resynced (%d/%d bytes)", p.ID, p.ResyncDone, p.ResyncTotal)
		}
	}
	for _, n := range []string{"n2", "n3"} {
		m, err := LoadLocalMeta(h.dir(n), fVol)
		if err != nil {
			t.Fatal(err)
		}
		// The primary has not written: its messages leave them fresh.
		if m.Gen != fGen || !m.Fresh {
			t.Fatalf("%s after the handshake: gen %x fresh %v, want gen %x, still fresh", n, m.Gen, m.Fresh, uint64(fGen))
		}
	}
	// One block in every region, so a replica missing any region differs.
	buf := make([]byte, 4096)
	for r := int64(0); r < fSize/fRS; r++ {
		for i := range buf {
			buf[i] = byte(r + int64(i) + 1)
		}
		if err := v.WriteAt(ctx, buf, r*fRS+4096, false); err != nil {
			t.Fatal(err)
		}
	}

	for _, n := range []string{"n2", "n3"} {
		if m, err := LoadLocalMeta(h.dir(n), fVol); err != nil || m.Fresh {
			t.Fatalf("%s after the first writes: still fresh (%v)", n, err)
		}
	}

	// n3's disk replaced; the new one is created with the creation
	// generation again.
	n3.stop()
	h.waitOutOfISR("n3", 10*time.Second)
	if err := DeleteLocal(h.dir("n3"), fVol); err != nil {
		t.Fatal(err)
	}
	h.serve("n3", n3.addr)
	h.waitSynced(v, "n1", "n2", "n3")
	if got := resyncTotal(t, v, "n3"); got != fSize {
		t.Fatalf("n3 recreated at the creation generation after writes: resync of %d bytes, want a full sync of %d", got, fSize)
	}

	// n2's disk replaced by one of unknown contents (generation 0).
	h.nodes["n2"].stop()
	h.waitOutOfISR("n2", 10*time.Second)
	if err := DeleteLocal(h.dir("n2"), fVol); err != nil {
		t.Fatal(err)
	}
	l, err := OpenLocal(LocalOptions{Dir: h.dir("n2"), Volume: fVol, Size: fSize, RegionSize: fRS})
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	h.serve("n2", n2.addr) // opens the existing gen-0 replica
	h.waitSynced(v, "n1", "n2", "n3")
	if got := resyncTotal(t, v, "n2"); got != fSize {
		t.Fatalf("n2 with generation 0: resync of %d bytes, want a full sync of %d", got, fSize)
	}
	if err := v.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	first := readImage(t, h.imgPath("n1"))
	for _, n := range []string{"n2", "n3"} {
		if !bytes.Equal(readImage(t, h.imgPath(n)), first) {
			t.Fatalf("%s differs from n1", n)
		}
	}
	rep, err := v.Verify(ctx, false)
	if err != nil || len(rep.Mismatch) != 0 || len(rep.Skipped) != 0 {
		t.Fatalf("verify: mismatch %v skipped %v err %v", rep.Mismatch, rep.Skipped, err)
	}
}

func resyncTotal(t *testing.T, v *Volume, id string) int64 {
	t.Helper()
	ps, err := v.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range ps {
		if p.ID == id {
			return p.ResyncTotal
		}
	}
	t.Fatalf("no replica %s", id)
	return 0
}
