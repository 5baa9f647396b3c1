package cluster

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/replication"
)

// countKinds is a Proposer that counts the commands of each kind it passes
// on.
type countKinds struct {
	Proposer
	mu sync.Mutex
	n  map[Kind]int
}

func (c *countKinds) Propose(ctx context.Context, cmd *Command) (any, error) {
	c.mu.Lock()
	if c.n == nil {
		c.n = map[Kind]int{}
	}
	c.n[cmd.Kind]++
	c.mu.Unlock()
	return c.Proposer.Propose(ctx, cmd)
}

func (c *countKinds) count(k Kind) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n[k]
}

func peerStatus(t *testing.T, vol *replication.Volume, id string) replication.ReplicaStatus {
	t.Helper()
	st, err := vol.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range st {
		if p.ID == id {
			return p
		}
	}
	t.Fatalf("no peer %s", id)
	return replication.ReplicaStatus{}
}

func sameImages(t *testing.T, rp *replicaPair) {
	t.Helper()
	a, err := os.ReadFile(filepath.Join(rp.n1.reps.Dir, adUUID+".img"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(rp.n2.reps.Dir, adUUID+".img"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Fatal("n2's image differs from n1's")
	}
}

// TestNewVolumeStartsInSync: the replicas of a volume just created through
// the real ReplicaAdapter start in sync at the volume's creation
// generation: n2 stays in the ISR, nothing is resynced, and the ISR never
// shrinks. Later, n2's disk is replaced and its new files are created at
// the creation generation too (the adapter cannot tell a replacement from
// a creation); the primary has written by then, so replication's guard
// gives it a full sync, and it ends identical. Before the creation
// generation, the first part copied the whole volume; without the guard,
// the second would leave n2 without the regions written before it left.
func TestNewVolumeStartsInSync(t *testing.T) {
	cp := &countKinds{}
	rp := newReplicaPair(t, cp, nil)
	cp.Proposer = rp.l
	gen := rp.vol.CreationGen
	if gen == 0 {
		t.Fatal("volume-create proposed without a creation generation")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := rp.n2.reps.Open(ctx, rp.vol, false); err != nil {
		t.Fatal(err)
	}
	if err := rp.n1.reps.Open(ctx, rp.vol, true); err != nil {
		t.Fatal(err)
	}
	vol, _ := rp.n1.reps.Primary(adUUID)
	waitUntil(t, 10*time.Second, "n2 up", func() bool {
		p := peerStatus(t, vol, "n2")
		return p.Mode == "up" && !p.Removing
	})
	p := peerStatus(t, vol, "n2")
	if !p.InISR || p.ResyncTotal != 0 || p.DirtyBytes != 0 {
		t.Fatalf("new replica n2: %+v, want in the ISR with nothing to resync", p)
	}
	for _, n := range []*adapterNode{rp.n1, rp.n2} {
		m, err := replication.LoadLocalMeta(n.reps.Dir, adUUID)
		if err != nil {
			t.Fatal(err)
		}
		if m.Gen != gen {
			t.Fatalf("%s: replica at generation %#x, want the creation generation %#x", n.id, m.Gen, gen)
		}
	}

	// One block in every region, written while n2 is in the ISR.
	const rs = replication.DefaultRegionSize
	buf := make([]byte, 4096)
	for r := int64(0); r < adSize/rs; r++ {
		for i := range buf {
			buf[i] = byte(r + int64(i) + 1)
		}
		if err := vol.WriteAt(ctx, buf, r*rs+4096, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := vol.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if p := peerStatus(t, vol, "n2"); !p.InISR || p.ResyncTotal != 0 || !rp.inISR("n2") {
		t.Fatalf("after writes n2: %+v, in the state's ISR %v", p, rp.inISR("n2"))
	}
	if r, a := cp.count(KindISRRemove), cp.count(KindISRAdd); r != 0 || a != 0 {
		t.Fatalf("%d isr-remove and %d isr-add proposed for a volume created in sync", r, a)
	}
	sameImages(t, rp)

	// n2's disk is replaced: it stops serving, loses its files, and n1
	// drops it from the ISR on the next write.
	if err := rp.n2.reps.Close(ctx, adUUID); err != nil {
		t.Fatal(err)
	}
	if err := replication.DeleteLocal(rp.n2.reps.Dir, adUUID); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 30*time.Second, "n2 out of the ISR", func() bool {
		if err := vol.WriteAt(ctx, buf, 0, false); err != nil {
			t.Fatal(err)
		}
		return !rp.inISR("n2")
	})
	var v Volume
	rp.l.FSM.Read(func(s *State) { v = *s.Volumes[adUUID].clone() })
	// The adapter creates the new files at the creation generation,
	// fresh: only the guard stands between them and an incremental sync.
	local, err := rp.n2.reps.openLocal(v)
	if err != nil {
		t.Fatal(err)
	}
	if err := local.Close(); err != nil {
		t.Fatal(err)
	}
	m, err := replication.LoadLocalMeta(rp.n2.reps.Dir, adUUID)
	if err != nil {
		t.Fatal(err)
	}
	if m.Gen != gen || !m.Fresh {
		t.Fatalf("replacement replica: gen %#x fresh %v, want the creation generation %#x, fresh", m.Gen, m.Fresh, gen)
	}
	if err := rp.n2.reps.Open(ctx, v, false); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 30*time.Second, "n2 back in the ISR", func() bool { return rp.inISR("n2") })
	if p := peerStatus(t, vol, "n2"); p.ResyncTotal != adSize {
		t.Fatalf("replacement replica n2: %+v, want a full sync of %d bytes", p, adSize)
	}
	if err := vol.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	sameImages(t, rp)
}

// TestVolumeWithoutCreationGen: a volume created before the creation
// generation existed (or by a proposer that leaves it zero and bypasses
// Propose's stamp) still works as before: its new replica starts at
// generation 0 and gets a full sync.
func TestVolumeWithoutCreationGen(t *testing.T) {
	rp := newReplicaPair(t, nil, nil)
	v := rp.vol
	v.CreationGen = 0
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := rp.n2.reps.Open(ctx, v, false); err != nil {
		t.Fatal(err)
	}
	m, err := replication.LoadLocalMeta(rp.n2.reps.Dir, adUUID)
	if err != nil {
		t.Fatal(err)
	}
	if m.Gen != 0 || m.Fresh {
		t.Fatalf("replica of a volume without a creation generation: gen %#x fresh %v", m.Gen, m.Fresh)
	}
	if err := rp.n1.reps.Open(ctx, v, true); err != nil {
		t.Fatal(err)
	}
	vol, _ := rp.n1.reps.Primary(adUUID)
	waitUntil(t, 30*time.Second, "n2 synced", func() bool {
		p := peerStatus(t, vol, "n2")
		return p.Mode == "up" && rp.inISR("n2") && p.DirtyBytes == 0 && p.ResyncDone == adSize
	})
	sameImages(t, rp)
}

// TestProposeStampsCreationGen: Propose gives every volume-create a
// random nonzero creation generation and keeps one the caller chose.
func TestProposeStampsCreationGen(t *testing.T) {
	l := NewLocal(nil)
	mustPropose(t, l, cNodeAdd("a", RoleStorage, "127.0.0.1:7001"))
	mustPropose(t, l, cVol(u1, "a", "a"))
	mustPropose(t, l, cVol(u2, "a", "a"))
	mustPropose(t, l, cVolGen(u3, 42, "a", "a"))
	st := l.FSM.State()
	g1, g2 := st.Volumes[u1].CreationGen, st.Volumes[u2].CreationGen
	if g1 == 0 || g2 == 0 || g1 == g2 {
		t.Fatalf("creation generations %#x and %#x: want random, nonzero", g1, g2)
	}
	if g := st.Volumes[u3].CreationGen; g != 42 {
		t.Fatalf("chosen creation generation replaced: %#x", g)
	}
}
