package cluster

import (
	"bytes"
	"context"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/bench/failover/initiator"
)

// kill stops every part of n at once, as a node that dies for good: no
// release, no handover, its replica connections simply close.
func (n *adapterNode) kill() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = n.agent.Demote(ctx, "killed")
	n.tsrv.Close()
	n.rsrv.Close()
	_ = n.reps.CloseAll(ctx)
}

// TestReplaceFailedNode: a 2-replica volume (n1 primary, n2) exported
// through a real target, with data written by an iSCSI initiator, loses
// n2 for good. A new node n3 replaces it (volume-replicas); n1's agent
// reopens the replication session with the new set, under the same LUN
// and the same iSCSI session, which keeps writing without an error; n3's
// agent creates its replica, which is fully synced (it is fresh at the
// creation generation while n1 has written: taken as in sync, it would
// lack the first writes), joins the ISR through the catch-up and ends
// byte-identical to n1. Then n1 dies too, and n3 takes the group over and
// serves every acknowledged write.
func TestReplaceFailedNode(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	ca, err := NewCA("test", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	l := NewLocal(nil)
	n1 := newAdapterNode(t, "n1", ca, l, log)
	n2 := newAdapterNode(t, "n2", ca, l, log)
	n3 := newAdapterNode(t, "n3", ca, l, log)
	addNode := func(n *adapterNode) {
		mustPropose(t, l, &Command{Kind: KindNodeAdd, NodeAdd: &NodeAddCmd{Node: NodeInfo{
			ID: n.id, Role: RoleStorage, RaftAddr: "127.0.0.1:1" + n.id[1:], DataAddr: n.dataAddr, PortalAddr: n.portal}}})
	}
	addNode(n1)
	addNode(n2)
	mustPropose(t, l, &Command{Kind: KindVolumeCreate, VolumeCreate: &VolumeCreateCmd{
		UUID: adUUID, Name: "v", Size: adSize, Primary: "n1", Replicas: []string{"n1", "n2"}, CreationGen: 0xc0ffee}})
	mustPropose(t, l, &Command{Kind: KindTargetPut, TargetPut: &TargetPutCmd{Target: Target{IQN: adIQN, LUNs: map[uint64]string{0: adUUID}}}})
	mustPropose(t, l, &Command{Kind: KindGroupPut, GroupPut: &GroupPutCmd{Group: Group{Name: "g", VIPs: []string{"192.0.2.10/32"}, Targets: []string{adIQN}}}})
	mustPropose(t, l, &Command{Kind: KindGroupGrant, GroupGrant: &GroupGrantCmd{Group: "g", Node: "n1"}})

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	reconcile := func(ns ...*adapterNode) {
		t.Helper()
		for _, n := range ns {
			if err := n.agent.Reconcile(ctx); err != nil {
				t.Fatalf("%s reconcile: %v", n.id, err)
			}
		}
	}
	volume := func() Volume {
		var v Volume
		l.FSM.Read(func(s *State) { v = *s.Volumes[adUUID].clone() })
		return v
	}
	reconcile(n2, n1)

	s, err := initiator.Login(ctx, initiator.Config{Portal: n1.portal, Target: adIQN})
	if err != nil {
		t.Fatalf("login to n1: %v", err)
	}
	defer s.Close()
	if _, err := s.ClearUnitAttention(ctx); err != nil {
		t.Fatal(err)
	}
	const bs = 512
	want := make([]byte, adSize) // what the initiator wrote, acknowledged
	rng := rand.New(rand.NewPCG(1, 2))
	write := func(lba uint32, blocks int) {
		t.Helper()
		p := make([]byte, blocks*bs)
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		if err := s.Write10(ctx, lba, p, bs, true); err != nil {
			t.Fatalf("write lba %d: %v", lba, err)
		}
		copy(want[int(lba)*bs:], p)
	}
	// Spread over the volume, so a replica that skipped any region of the
	// sync shows it.
	for lba := uint32(0); lba < adSize/bs; lba += 1024 + 8 {
		write(lba, 64)
	}
	waitUntil(t, 30*time.Second, "n2 in the ISR", func() bool { return slices.Contains(volume().ISR, "n2") })

	// n2 dies for good; n1 drops it from the ISR on the next write.
	n2.kill()
	write(100, 8)
	waitUntil(t, 30*time.Second, "n2 out of the ISR", func() bool { return !slices.Contains(volume().ISR, "n2") })
	oldVol, _ := n1.reps.Primary(adUUID)

	// The replacement. n3 may come up before or after n1 learns the
	// new set: n3 first here, so the handshake runs at once.
	addNode(n3)
	if _, err := l.Propose(ctx, cReplicas(adUUID, "n2", "n3")); err != nil {
		t.Fatalf("replace n2 by n3: %v", err)
	}
	if v := volume(); !slices.Equal(v.Replicas, []string{"n1", "n3"}) || slices.Contains(v.ISR, "n3") {
		t.Fatalf("after the replacement: replicas %v isr %v", v.Replicas, v.ISR)
	}
	reconcile(n3)
	if p, ok := n3.reps.Opened()[adUUID]; !ok || p {
		t.Fatalf("n3 has not opened its replica as a secondary: %v", n3.reps.Opened())
	}
	// Writers keep hitting n1's backend (what the LUN uses) while its
	// session is swapped: they wait, none fails.
	be, _ := n1.reps.Backend(adUUID)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var ioErr atomic.Value
	for i := range 4 {
		off := int64(6<<20) + int64(i)*64<<10
		p := bytes.Repeat([]byte{byte(0xa0 + i)}, 64<<10)
		copy(want[off:], p)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if err := be.WriteAt(ctx, p, off, false); err != nil {
					ioErr.Store(err)
					return
				}
			}
		}()
	}
	time.Sleep(20 * time.Millisecond)
	reconcile(n1)
	time.Sleep(20 * time.Millisecond)
	close(stop)
	wg.Wait()
	if err := ioErr.Load(); err != nil {
		t.Fatalf("I/O failed while the replica set changed: %v", err)
	}
	newVol, _ := n1.reps.Primary(adUUID)
	if newVol == oldVol {
		t.Fatal("n1's replication session was not reopened with the new replica set")
	}
	st, err := newVol.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var peers []string
	for _, p := range st {
		peers = append(peers, p.ID)
	}
	if !slices.Equal(peers, []string{"n3"}) {
		t.Fatalf("n1's session replicates to %v, want [n3]", peers)
	}
	// The same iSCSI session keeps working: the LUN was not rebuilt.
	write(2048, 64)
	if got, err := s.Read10(ctx, 0, 64, bs); err != nil || !bytes.Equal(got, want[:64*bs]) {
		t.Fatalf("read through the same session after the swap: %v", err)
	}
	waitUntil(t, 60*time.Second, "n3 in the ISR", func() bool {
		write(4096, 8)
		return slices.Contains(volume().ISR, "n3")
	})
	ps := peerStatus(t, newVol, "n3")
	t.Logf("n3 after catch-up: %+v", ps)
	if ps.ResyncTotal != adSize {
		// Fresh at the creation generation while n1 has written: only a
		// full sync is right.
		t.Fatalf("n3 was synced %d bytes, want a full sync of %d", ps.ResyncTotal, adSize)
	}
	img := func(n *adapterNode) []byte {
		b, err := os.ReadFile(filepath.Join(n.reps.Dir, adUUID+".img"))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	a, b := img(n1), img(n3)
	if !bytes.Equal(a, want) {
		t.Fatal("n1's image is not what the initiator wrote")
	}
	if !bytes.Equal(a, b) {
		n := 0
		for i := range a {
			if a[i] != b[i] {
				n++
			}
		}
		t.Fatalf("n3's image differs from n1's in %d bytes", n)
	}
	// n2 holds nothing now: it can leave the cluster.
	mustPropose(t, l, &Command{Kind: KindNodeRemove, NodeRemove: &NodeRemoveCmd{ID: "n2"}})

	// Now n1 dies too: n3, in the ISR, takes over with all the data.
	s.Close()
	n1.kill()
	detected := time.Now()
	mustPropose(t, l, cFenceRec("n1", detected.Add(time.Millisecond), true))
	mustPropose(t, l, cTakeover("g", "n1", "n3", detected))
	reconcile(n3)
	if !n3.vips.holds(netip.MustParsePrefix("192.0.2.10/32")) {
		t.Fatal("n3 does not hold the group's VIP after the takeover")
	}
	s3, err := initiator.Login(ctx, initiator.Config{Portal: n3.portal, Target: adIQN})
	if err != nil {
		t.Fatalf("login to n3: %v", err)
	}
	defer s3.Close()
	if _, err := s3.ClearUnitAttention(ctx); err != nil {
		t.Fatal(err)
	}
	for lba := 0; lba < adSize/bs; lba += 128 {
		got, err := s3.Read10(ctx, uint32(lba), 128, bs)
		if err != nil {
			t.Fatalf("read lba %d on n3: %v", lba, err)
		}
		if !bytes.Equal(got, want[lba*bs:(lba+128)*bs]) {
			t.Fatalf("n3 serves other data than acknowledged at lba %d", lba)
		}
	}
}

// TestReaddedReplicaGetsFullSync: a replica replaced away and later added
// back with its old files must not be synced from the dirty bitmap the
// primary kept for it when it left the ISR: that bitmap stopped growing
// when the primary's session was reopened without it. n2 leaves the ISR
// (region 1 written while it is out: in its bitmap), is replaced by n3,
// region 5 is written (in no bitmap of n2), then n2 comes back with its
// old files and is added as a third replica: it must end identical.
// Without forgetFormerPeers its handshake is incremental and region 5
// stays stale.
func TestReaddedReplicaGetsFullSync(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	ca, err := NewCA("test", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	l := NewLocal(nil)
	n1 := newAdapterNode(t, "n1", ca, l, log)
	n2 := newAdapterNode(t, "n2", ca, l, log)
	n3 := newAdapterNode(t, "n3", ca, l, log)
	addNode := func(n *adapterNode) {
		mustPropose(t, l, &Command{Kind: KindNodeAdd, NodeAdd: &NodeAddCmd{Node: NodeInfo{
			ID: n.id, Role: RoleStorage, RaftAddr: "127.0.0.1:1" + n.id[1:], DataAddr: n.dataAddr, PortalAddr: n.portal}}})
	}
	addNode(n1)
	addNode(n2)
	mustPropose(t, l, &Command{Kind: KindVolumeCreate, VolumeCreate: &VolumeCreateCmd{
		UUID: adUUID, Name: "v", Size: adSize, Primary: "n1", Replicas: []string{"n1", "n2"}, CreationGen: 0xbeef}})
	mustPropose(t, l, &Command{Kind: KindTargetPut, TargetPut: &TargetPutCmd{Target: Target{IQN: adIQN, LUNs: map[uint64]string{0: adUUID}}}})
	mustPropose(t, l, &Command{Kind: KindGroupPut, GroupPut: &GroupPutCmd{Group: Group{Name: "g", VIPs: []string{"192.0.2.10/32"}, Targets: []string{adIQN}}}})
	mustPropose(t, l, &Command{Kind: KindGroupGrant, GroupGrant: &GroupGrantCmd{Group: "g", Node: "n1"}})
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	reconcile := func(ns ...*adapterNode) {
		t.Helper()
		for _, n := range ns {
			if err := n.agent.Reconcile(ctx); err != nil {
				t.Fatalf("%s reconcile: %v", n.id, err)
			}
		}
	}
	inISR := func(id string) bool {
		var in bool
		l.FSM.Read(func(s *State) { in = slices.Contains(s.Volumes[adUUID].ISR, id) })
		return in
	}
	// A two-region activity log: a region written long enough ago is in
	// none, as in a large volume.
	n1.reps.Volume.ALSlots = 2
	reconcile(n2, n1)
	be, _ := n1.reps.Backend(adUUID)
	const region = 1 << 20
	fill := func(r int, b byte) {
		t.Helper()
		if err := be.WriteAt(ctx, bytes.Repeat([]byte{b}, region), int64(r)*region, true); err != nil {
			t.Fatalf("write region %d: %v", r, err)
		}
	}
	// Regions 0-3 only: n2's copy of the activity log then lists no
	// region written after it left (the activity log is resynced too).
	for r := range 4 {
		fill(r, byte(0x10+r))
	}
	waitUntil(t, 30*time.Second, "n2 in the ISR", func() bool { return inISR("n2") })

	n2Dir := n2.reps.Dir
	n2.kill()
	fill(1, 0xb1)
	waitUntil(t, 30*time.Second, "n2 out of the ISR", func() bool { return !inISR("n2") })

	addNode(n3)
	mustPropose(t, l, cReplicas(adUUID, "n2", "n3"))
	reconcile(n3, n1)
	waitUntil(t, 60*time.Second, "n3 in the ISR", func() bool { fill(7, 0x77); return inISR("n3") })
	fill(5, 0xc5) // n2 is no peer any more: in no bitmap of n2's
	// Push 5 and 7 out of n1's two-slot activity log, which a reopened
	// primary also resyncs to every peer.
	fill(0, 0xd0)
	fill(2, 0xd2)

	// n2 is repaired and comes back with its old files, under a new
	// address (removed and added again), as a third replica.
	mustPropose(t, l, &Command{Kind: KindNodeRemove, NodeRemove: &NodeRemoveCmd{ID: "n2"}})
	n2b := newAdapterNode(t, "n2", ca, l, log)
	n2b.reps.Dir = n2Dir
	addNode(n2b)
	mustPropose(t, l, cReplicas(adUUID, "", "n2"))
	reconcile(n2b, n1)
	waitUntil(t, 60*time.Second, "n2 back in the ISR", func() bool { fill(6, 0x66); return inISR("n2") })
	vol, _ := n1.reps.Primary(adUUID)
	ps := peerStatus(t, vol, "n2")
	t.Logf("n2 after its return: %+v", ps)
	if ps.ResyncTotal != adSize {
		t.Errorf("the returned n2 was synced %d bytes, want a full sync of %d", ps.ResyncTotal, adSize)
	}
	a, err := os.ReadFile(filepath.Join(n1.reps.Dir, adUUID+".img"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(n2Dir, adUUID+".img"))
	if err != nil {
		t.Fatal(err)
	}
	for r := range adSize / region {
		if !bytes.Equal(a[r*region:(r+1)*region], b[r*region:(r+1)*region]) {
			t.Errorf("region %d of the returned n2 differs from n1's", r)
		}
	}
}
