package replication

// Fault-injection tests over real TCP (TLS) and real files. Each ends with
// the same checker: every acknowledged write is on every ISR member, nothing
// newer than what may legitimately have landed is visible, the replicas are
// byte-identical after resync and online verify reports 0 mismatches.

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

const (
	fVol    = "fvol"
	fSize   = 16 << 20
	fRS     = 256 << 10
	fBlocks = 1024
	fStride = fSize / fBlocks
	fGen    = 7
)

// fnode is one in-process replica server on real files.
type fnode struct {
	name, dir, addr string
	srv             *Server
	done            chan error
}

type fharness struct {
	t     *testing.T
	pki   *testPKI
	mem   *MemMembership
	base  string
	nodes map[string]*fnode
}

func newFHarness(t *testing.T) *fharness {
	return &fharness{t: t, pki: newPKI(t), mem: NewMemMembership(), base: t.TempDir(), nodes: map[string]*fnode{}}
}

func (h *fharness) dir(name string) string { return filepath.Join(h.base, name) }

func (h *fharness) imgPath(name string) string { return filepath.Join(h.dir(name), fVol+".img") }

// serve starts (or restarts) name's replica server on addr ("" picks one).
func (h *fharness) serve(name, addr string) *fnode {
	h.t.Helper()
	l, err := OpenLocal(LocalOptions{Dir: h.dir(name), Volume: fVol, Size: fSize, RegionSize: fRS, Gen: fGen})
	if err != nil {
		h.t.Fatal(err)
	}
	srv, err := NewServer(ServerConfig{TLS: h.pki.server(h.t, name), Logger: testLogger(h.t).With("node", name)})
	if err != nil {
		h.t.Fatal(err)
	}
	if err := srv.AddVolume(l); err != nil {
		h.t.Fatal(err)
	}
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := listenRetry(addr)
	if err != nil {
		h.t.Fatal(err)
	}
	n := &fnode{name: name, dir: h.dir(name), addr: ln.Addr().String(), srv: srv, done: make(chan error, 1)}
	go func() { n.done <- srv.Serve(ln) }()
	h.nodes[name] = n
	h.t.Cleanup(func() { n.stop() })
	return n
}

func (n *fnode) stop() {
	if n.srv != nil {
		n.srv.Close()
		<-n.done
		n.srv = nil
	}
}

func (h *fharness) open(name string, l *Local, peers map[string]string, ackTicks int) *Volume {
	h.t.Helper()
	if l == nil {
		var err error
		if l, err = OpenLocal(LocalOptions{Dir: h.dir(name), Volume: fVol, Size: fSize, RegionSize: fRS, Gen: fGen}); err != nil {
			h.t.Fatal(err)
		}
	}
	v, err := OpenVolume(context.Background(), VolumeConfig{Self: name, Peers: peers, Local: l, Membership: h.mem,
		TLS: h.pki.client(h.t, name), TickInterval: 20 * time.Millisecond, AckTimeoutTicks: ackTicks, ALSlots: 8,
		Logger: testLogger(h.t).With("node", name)})
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { v.Close() })
	return v
}

// waitSynced waits until the committed ISR is exactly want and every
// member the primary sees is connected with nothing dirty.
func (h *fharness) waitSynced(v *Volume, want ...string) {
	h.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		st, _ := h.mem.State(context.Background(), fVol)
		ps, _ := v.Status(context.Background())
		ok := len(st.ISR) == len(want)
		for _, w := range want {
			ok = ok && st.InISR(w)
		}
		for _, p := range ps {
			if st.InISR(p.ID) && (p.Mode != "up" || p.DirtyBytes > 0 || !p.InISR) {
				ok = false
			}
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("ISR did not become %v in sync: %+v %+v", want, st, ps)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (h *fharness) waitOutOfISR(name string, within time.Duration) {
	h.t.Helper()
	deadline := time.Now().Add(within)
	for {
		st, _ := h.mem.State(context.Background(), fVol)
		if !st.InISR(name) {
			return
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("%s still in the ISR after %s: %+v", name, within, st)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// finalCheck: all named replicas byte-identical, every block exactly its
// last acknowledged version, online verify clean; then a deliberate
// divergence behind the protocol's back must be found by verify.
func (h *fharness) finalCheck(v *Volume, acked []uint64, names ...string) {
	h.finalCheckRange(v, acked, acked, names...)
}

// finalCheckRange is finalCheck where a block may also hold a version up
// to hi (a write issued but never acknowledged by a primary that died).
func (h *fharness) finalCheckRange(v *Volume, lo, hi []uint64, names ...string) {
	h.t.Helper()
	ctx := context.Background()
	if err := v.Flush(ctx); err != nil {
		h.t.Fatal(err)
	}
	first := readImage(h.t, h.imgPath(names[0]))
	for _, n := range names {
		img := readImage(h.t, h.imgPath(n))
		checkBlocks(h.t, n, img, fStride, lo, hi)
		if n != names[0] && !slices.Equal(img, first) {
			h.t.Errorf("%s differs from %s after resync", n, names[0])
		}
	}
	rep, err := v.Verify(ctx, false)
	if err != nil || len(rep.Mismatch) != 0 || len(rep.Skipped) != 0 || rep.Regions != fSize/fRS {
		h.t.Fatalf("verify: %d regions, mismatch %v, skipped %v, err %v", rep.Regions, rep.Mismatch, rep.Skipped, err)
	}
	// Deliberate divergence: change one byte of the last replica's file.
	victim := names[len(names)-1]
	off := int64(fSize/2 + 12345)
	f, err := os.OpenFile(h.imgPath(victim), os.O_RDWR, 0)
	if err != nil {
		h.t.Fatal(err)
	}
	b := make([]byte, 1)
	f.ReadAt(b, off)
	b[0] ^= 0x5a
	f.WriteAt(b, off)
	f.Close()
	rep, err = v.Verify(ctx, false)
	region := uint64(off / fRS)
	if err != nil || len(rep.Mismatch) != 1 || !slices.Equal(rep.Mismatch[region], []string{victim}) {
		h.t.Fatalf("verify missed the divergence in region %d of %s: %v %v", region, victim, rep.Mismatch, err)
	}
	b[0] ^= 0x5a
	f, _ = os.OpenFile(h.imgPath(victim), os.O_RDWR, 0)
	f.WriteAt(b, off)
	f.Close()
}

// TestFaultReplicaKilledMidWrite SIGKILLs a replica process while 16
// writers keep writes in flight. Every write must still be acknowledged
// (after the removal commits), the replica must leave the ISR through
// Membership, and when it restarts it must resync incrementally and rejoin,
// byte-identical.
func TestFaultReplicaKilledMidWrite(t *testing.T) {
	h := newFHarness(t)
	certs := filepath.Join(h.base, "certs")
	writePEM(t, certs, h.pki, "n2")
	addr2 := freeAddr(t)
	cfg := childConfig{Role: "replica", Self: "n2", Dir: h.dir("n2"), Volume: fVol, Size: fSize, RegionSize: fRS, Gen: fGen,
		CertDir: certs, Listen: addr2}
	c2 := startChild(t, cfg)
	c2.waitFor("READY", 20*time.Second)
	h.mem.Create(fVol, "n1", "n2")
	v := h.open("n1", nil, map[string]string{"n2": addr2}, 50)
	h.waitSynced(v, "n1", "n2")

	w := newWorkload(v, fBlocks, fStride, 1)
	ctx, stop := context.WithCancel(context.Background())
	wait := w.run(ctx, 16, 11, false)
	w.waitAcks(t, 300, 30*time.Second)
	c2.kill() // SIGKILL in the middle of the stream
	killed := w.acks.Load()
	h.waitOutOfISR("n2", 10*time.Second)
	// Few enough writes while it is out that only some regions get dirty.
	w.waitAcks(t, 10, 30*time.Second)
	stop()
	wait()
	t.Logf("n2 SIGKILLed after %d acks; worst write latency across the kill %s", killed, time.Duration(w.maxLat.Load()))

	ps, _ := v.Status(context.Background())
	dirtyOut := ps[0].DirtyBytes
	m2, err := LoadLocalMeta(h.dir("n2"), fVol)
	if err != nil {
		t.Fatal(err)
	}
	bound := min(dirtyOut+int64(len(m2.AL))*fRS, fSize)
	c2 = startChild(t, cfg) // same disk, same address
	c2.waitFor("READY", 20*time.Second)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(2 * time.Millisecond) {
		if ps, _ := v.Status(context.Background()); ps[0].Mode == "up" || time.Now().After(deadline) {
			break
		}
	}
	ctx, stop = context.WithCancel(context.Background())
	wait = w.run(ctx, 16, 15, false) // writes keep flowing during and after resync
	h.waitSynced(v, "n1", "n2")
	w.waitAcks(t, 200, 30*time.Second)
	stop()
	wait()
	_, acked, errs := w.snapshot()
	if len(errs) > 0 {
		t.Fatalf("writes failed although the primary stayed healthy: %v", errs[:min(3, len(errs))])
	}
	ps, _ = v.Status(context.Background())
	t.Logf("n2 back: %d bytes dirty while it was out, %d regions in its activity log; resynced %d of %d bytes",
		dirtyOut, len(m2.AL), ps[0].ResyncTotal, fSize)
	if dirtyOut == 0 || dirtyOut >= fSize || ps[0].ResyncTotal > bound {
		t.Errorf("resync was not incremental: %d bytes dirty, %d resynced, at most %d expected", dirtyOut, ps[0].ResyncTotal, bound)
	}
	if !slices.ContainsFunc(h.mem.Log(), func(s string) bool { return strings.HasPrefix(s, "remove "+fVol+" n2") }) {
		t.Errorf("n2 never left the ISR through Membership: %v", h.mem.Log())
	}
	h.finalCheck(v, acked, "n1", "n2")
}

// TestFaultReplicaPartitioned partitions a replica with a proxy that keeps
// both sockets open and silently holds all traffic (a real partition: no
// FIN, no RST). A short blip is ridden out (the replica stays in the ISR);
// a partition longer than the ack timeout removes it through Membership
// while writes continue; healing it resyncs and rejoins.
func TestFaultReplicaPartitioned(t *testing.T) {
	h := newFHarness(t)
	n2 := h.serve("n2", "")
	px := newFaultProxy(t, n2.addr)
	h.mem.Create(fVol, "n1", "n2")
	const ackTicks = 25 // 500 ms
	v := h.open("n1", nil, map[string]string{"n2": px.Addr()}, ackTicks)
	h.waitSynced(v, "n1", "n2")

	w := newWorkload(v, fBlocks, fStride, 1)
	ctx, stop := context.WithCancel(context.Background())
	wait := w.run(ctx, 16, 12, false)
	w.waitAcks(t, 200, 30*time.Second)

	// A 150 ms blip: writes stall, then continue on the same connection.
	px.Pause()
	time.Sleep(150 * time.Millisecond)
	px.Resume()
	w.waitAcks(t, 200, 30*time.Second)
	if st, _ := h.mem.State(ctx, fVol); !st.InISR("n2") {
		t.Fatalf("a 150 ms blip removed n2 (ack timeout 500 ms): %v", h.mem.Log())
	}

	// A real partition.
	px.Pause()
	start := time.Now()
	h.waitOutOfISR("n2", 10*time.Second)
	detect := time.Since(start)
	before := w.acks.Load()
	w.waitAcks(t, 300, 30*time.Second) // the volume keeps serving without n2
	if ps, _ := v.Status(ctx); ps[0].DirtyBytes == 0 {
		t.Fatal("no dirty regions tracked for the partitioned replica")
	}
	t.Logf("partition detected and n2 removed after %s; %d writes acknowledged during the partition", detect.Round(time.Millisecond), w.acks.Load()-before)
	px.Resume()
	h.waitSynced(v, "n1", "n2")
	w.waitAcks(t, 200, 30*time.Second)
	stop()
	wait()
	_, acked, errs := w.snapshot()
	if len(errs) > 0 {
		t.Fatalf("writes failed: %v", errs[:min(3, len(errs))])
	}
	h.finalCheck(v, acked, "n1", "n2")
}

// TestFaultSlowReplica adds latency to one replica's link. Policy: a slow
// replica that still answers within the ack timeout stays in the ISR and
// every write pays its latency (visible in the write latency); one slower
// than the ack timeout is removed through Membership and resyncs once it is
// fast again.
func TestFaultSlowReplica(t *testing.T) {
	h := newFHarness(t)
	n2 := h.serve("n2", "")
	n3 := h.serve("n3", "")
	px := newFaultProxy(t, n2.addr)
	h.mem.Create(fVol, "n1", "n2", "n3")
	v := h.open("n1", nil, map[string]string{"n2": px.Addr(), "n3": n3.addr}, 25) // 500 ms ack timeout
	h.waitSynced(v, "n1", "n2", "n3")

	w := newWorkload(v, fBlocks, fStride, 1)
	ctx, stop := context.WithCancel(context.Background())
	wait := w.run(ctx, 16, 13, false)
	w.waitAcks(t, 200, 30*time.Second)
	fast := w.latencies()

	px.SetLatency(40 * time.Millisecond) // 80 ms round trip, well under the timeout
	time.Sleep(100 * time.Millisecond)
	w.resetLatencies()
	w.waitAcks(t, 200, 30*time.Second)
	slow := w.latencies()
	if st, _ := h.mem.State(ctx, fVol); !st.InISR("n2") {
		t.Fatalf("a replica 80 ms slow was removed (timeout 500 ms): %v", h.mem.Log())
	}
	if slow.p50 < 80*time.Millisecond {
		t.Fatalf("write p50 %s with an 80 ms round trip to an ISR member: its latency is not being waited for", slow.p50)
	}
	t.Logf("write latency p50/p99: %s/%s normal, %s/%s with n2 at +40 ms each way (kept in ISR)", fast.p50, fast.p99, slow.p50, slow.p99)

	px.SetLatency(2 * time.Second) // slower than the ack timeout
	h.waitOutOfISR("n2", 10*time.Second)
	w.resetLatencies()
	w.waitAcks(t, 200, 30*time.Second)
	after := w.latencies()
	if after.p50 >= 80*time.Millisecond {
		t.Errorf("after removing the slow replica writes still take %s", after.p50)
	}
	t.Logf("n2 at +2 s removed; write latency p50/p99 back to %s/%s", after.p50, after.p99)
	px.SetLatency(0)
	h.waitSynced(v, "n1", "n2", "n3")
	stop()
	wait()
	_, acked, errs := w.snapshot()
	if len(errs) > 0 {
		t.Fatalf("writes failed: %v", errs[:min(3, len(errs))])
	}
	h.finalCheck(v, acked, "n1", "n2", "n3")
}

// primaryChild starts n1 as a primary in its own process with n2 and n3 as
// in-process replicas, and returns it once it is writing.
func (h *fharness) primaryChild() (*child, *ackLog, *membershipServer) {
	h.t.Helper()
	certs := filepath.Join(h.base, "certs")
	writePEM(h.t, certs, h.pki, "n1")
	n2, n3 := h.serve("n2", ""), h.serve("n3", "")
	h.mem.Create(fVol, "n1", "n2", "n3")
	ms := serveMembership(h.t, h.mem)
	c := startChild(h.t, childConfig{Role: "primary", Self: "n1", Dir: h.dir("n1"), Volume: fVol, Size: fSize, RegionSize: fRS,
		Gen: fGen, CertDir: certs, Peers: map[string]string{"n2": n2.addr, "n3": n3.addr}, Membership: ms.url,
		Writers: 16, Blocks: fBlocks, Stride: fStride, ALSlots: 8, AckTicks: 50})
	c.waitFor("READY", 30*time.Second)
	return c, newAckLog(fBlocks), ms
}

// readLog consumes the child's lines until it has n acknowledgements.
func readLog(t *testing.T, c *child, log *ackLog, n int) {
	t.Helper()
	for log.acks < n {
		l, ok := c.next(30 * time.Second)
		if !ok {
			t.Fatalf("child stopped after %d acks", log.acks)
		}
		log.apply(t, l)
	}
}

// promote makes n2 the primary at a new epoch: the controller's part
// (Membership.Promote) and the node's (stop serving the replica, open it as
// primary). n1's address is given for when it comes back.
func (h *fharness) promote(addr1 string) *Volume {
	h.t.Helper()
	st, err := h.mem.Promote(fVol, "n2")
	if err != nil {
		h.t.Fatal(err)
	}
	l, err := h.nodes["n2"].srv.RemoveVolume(fVol)
	if err != nil {
		h.t.Fatal(err)
	}
	v := h.open("n2", l, map[string]string{"n1": addr1, "n3": h.nodes["n3"].addr}, 25)
	if st.Epoch != 2 {
		h.t.Fatalf("promoted at epoch %d, want 2", st.Epoch)
	}
	return v
}

func (h *fharness) readVolume(v *Volume) []byte {
	h.t.Helper()
	img := make([]byte, fSize)
	if err := v.ReadAt(context.Background(), img, 0); err != nil {
		h.t.Fatal(err)
	}
	return img
}

// TestFaultPrimaryKilledPromoted SIGKILLs the primary process in the middle
// of 16 concurrent writers, promotes n2 at epoch 2, and checks: every write
// the dead primary acknowledged (it logged each ack as it got it) is on every
// ISR member; the new primary resyncs only activity-log regions to n3 and the
// two agree; when the old primary's disk returns as a replica it resyncs
// (its own activity log included), rejoins, and all three are identical.
func TestFaultPrimaryKilledPromoted(t *testing.T) {
	h := newFHarness(t)
	addr1 := freeAddr(t)
	c, log, _ := h.primaryChild()
	readLog(t, c, log, 400)
	c.kill()
	log = newAckLog(fBlocks) // replay everything it printed, to its last line
	for _, l := range c.all {
		log.apply(t, l)
	}
	t.Logf("primary SIGKILLed after %d acknowledged writes", log.acks)
	// Straight after the kill, before anything else runs: every
	// acknowledged write is on every ISR member's disk.
	for _, n := range []string{"n1", "n2", "n3"} {
		checkBlocks(t, n+" after kill", readImage(t, h.imgPath(n)), fStride, log.acked, log.issued)
	}

	v := h.promote(addr1)
	h.waitSynced(v, "n2", "n3") // n1 is unreachable: removed by the new primary at epoch 2
	checkBlocks(t, "n2 (new primary)", h.readVolume(v), fStride, log.acked, log.issued)
	checkBlocks(t, "n3", readImage(t, h.imgPath("n3")), fStride, log.acked, log.issued)
	rep, err := v.Verify(context.Background(), false)
	if err != nil || len(rep.Mismatch) != 0 {
		t.Fatalf("n2 and n3 differ after promotion (activity-log resync incomplete): %v %v", rep.Mismatch, err)
	}
	ps, _ := v.Status(context.Background())
	t.Logf("after promotion: %+v", ps)

	// The new primary serves writes; then the old primary's disk comes back
	// as a replica.
	// Its writes stay in the first half of the volume, so the second half
	// is left to the old primary's own activity log.
	w := newWorkload(v, fBlocks, fStride, 2)
	w.limit = fBlocks / 2
	copy(w.issued, log.issued)
	copy(w.acked, log.acked)
	ctx, stop := context.WithCancel(context.Background())
	wait := w.run(ctx, 16, 14, false)
	w.waitAcks(t, 300, 30*time.Second)
	h.plantPhantom(log.issued)
	h.serve("n1", addr1)
	h.waitSynced(v, "n1", "n2", "n3")
	w.waitAcks(t, 200, 30*time.Second)
	stop()
	wait()
	issued, acked, errs := w.snapshot()
	if len(errs) > 0 {
		t.Fatalf("writes on the new primary failed: %v", errs[:min(3, len(errs))])
	}
	for _, p := range ps {
		if p.ID == "n3" && p.ResyncTotal >= fSize {
			t.Errorf("n3 got a full sync after promotion, not an activity-log resync")
		}
	}
	// A block the new primary never rewrote may hold the dead primary's
	// last unacknowledged write, but then on every replica alike.
	h.finalCheckRange(v, acked, issued, "n2", "n3", "n1")
}

// TestFaultZombieOldPrimary freezes the primary process (SIGSTOP: a VM
// pause or a long GC), promotes n2 at epoch 2, and lets the old primary run
// on (SIGCONT) as a zombie that keeps writing at epoch 1 on its old
// connections. Every write it issues after the freeze must fail with a
// stale-epoch error, none may be acknowledged, and none may be visible on
// any replica, including its own disk once it returns as a replica.
func TestFaultZombieOldPrimary(t *testing.T) {
	h := newFHarness(t)
	addr1 := freeAddr(t)
	c, log, _ := h.primaryChild()
	readLog(t, c, log, 300)
	c.signal(syscall.SIGSTOP)
	// Drain what it printed before the freeze.
	for {
		l, ok := c.next(300 * time.Millisecond)
		if !ok {
			break
		}
		log.apply(t, l)
	}
	preIssued, preAcked := slices.Clone(log.issued), slices.Clone(log.acked)
	t.Logf("primary frozen after %d acknowledged writes", log.acks)

	v := h.promote(addr1)
	h.waitSynced(v, "n2", "n3")
	m3, err := LoadLocalMeta(h.dir("n3"), fVol)
	if err != nil || m3.Epoch != 2 {
		t.Fatalf("n3 has not persisted epoch 2: %+v %v", m3, err)
	}
	c.signal(syscall.SIGCONT)
	// The zombie runs on: its writers stop at their first error.
	var post []string
	deadline := time.Now().Add(30 * time.Second)
	for done := false; !done; {
		l, ok := c.next(time.Until(deadline))
		if !ok {
			t.Fatalf("zombie did not finish within 30 s; printed %d lines after SIGCONT", len(post))
		}
		post = append(post, l)
		done = l == "DONE"
	}
	zombieIssued, zombieErrs := 0, 0
	for _, l := range post {
		var kind byte
		var blk int
		var ver uint64
		if n, _ := fmt.Sscanf(l, "%c %d %d", &kind, &blk, &ver); n != 3 {
			continue
		}
		switch kind {
		case 'I':
			zombieIssued++
		case 'A':
			if ver > preIssued[blk] {
				t.Errorf("zombie write acknowledged after the promotion: %q", l)
			}
		case 'E':
			zombieErrs++
			if !strings.Contains(l, ErrStaleEpoch.Error()) {
				t.Errorf("zombie write failed without a stale-epoch error: %q", l)
			}
		}
		log.apply(t, l)
	}
	if zombieIssued == 0 {
		t.Fatal("the zombie issued no write after the promotion: nothing was tested")
	}
	t.Logf("zombie issued %d writes after the promotion; %d failed with %q, none acknowledged", zombieIssued, zombieErrs, ErrStaleEpoch)
	// Acks that arrive after SIGCONT for writes issued before the freeze
	// are legitimate (every ISR member had them); they raise the floor.
	lo := slices.Clone(log.acked)
	for b := range lo {
		lo[b] = max(lo[b], preAcked[b])
	}
	checkBlocks(t, "n2 (new primary)", h.readVolume(v), fStride, lo, preIssued)
	checkBlocks(t, "n3", readImage(t, h.imgPath("n3")), fStride, lo, preIssued)
	if st, _ := h.mem.State(context.Background(), fVol); st.Epoch != 2 || st.Primary != "n2" {
		t.Fatalf("the zombie changed membership: %+v %v", st, h.mem.Log())
	}

	// The zombie dies; its disk returns as a replica and must lose every
	// zombie write (they are in its activity log).
	c.kill()
	h.plantPhantom(preIssued)
	h.serve("n1", addr1)
	h.waitSynced(v, "n1", "n2", "n3")
	if ps, _ := v.Status(context.Background()); len(ps) > 0 {
		t.Logf("old primary back as a replica: resynced %d of %d bytes", ps[0].ResyncTotal, fSize)
	}
	checkBlocks(t, "n1 (old primary, resynced)", readImage(t, h.imgPath("n1")), fStride, lo, preIssued)
	h.finalCheckRange(v, lo, preIssued, "n2", "n3", "n1")
}

// plantPhantom simulates the narrowest crash window on the old primary n1
// (not running): a write it made to its own disk after persisting its
// activity log but before sending anything, in a region that neither the
// new primary's activity log nor its bitmap for n1 names. Only n1's own
// activity log, reported in its HelloAck, can get it overwritten. The
// phantom block's version is issued[b]+1, so checkBlocks(hi=issued) catches
// it if it survives.
func (h *fharness) plantPhantom(issued []uint64) {
	t := h.t
	t.Helper()
	m2, err := LoadLocalMeta(h.dir("n2"), fVol)
	if err != nil {
		t.Fatal(err)
	}
	known := map[uint64]bool{}
	for _, r := range m2.AL {
		known[r] = true
	}
	if pm := m2.Peers["n1"]; pm != nil {
		for _, r := range pm.Dirty.Bits() {
			known[r] = true
		}
	}
	phantom := -1
	for b := fBlocks - 1; b >= 0 && phantom < 0; b-- {
		if !known[uint64(int64(b)*fStride/fRS)] {
			phantom = b
		}
	}
	if phantom < 0 {
		t.Fatal("no region left for the phantom write")
	}
	m1, err := LoadLocalMeta(h.dir("n1"), fVol)
	if err != nil {
		t.Fatal(err)
	}
	al, _, err := OpenALFile(filepath.Join(h.dir("n1"), fVol+".al"))
	if err != nil {
		t.Fatal(err)
	}
	err = al.Save(append(m1.AL, uint64(int64(phantom)*fStride/fRS)))
	al.Close()
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(h.imgPath("n1"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt(makeBlock(phantom, issued[phantom]+1, 9), int64(phantom)*fStride)
	f.Close()
}

type latStats struct{ p50, p99 time.Duration }

func (w *workload) latencies() latStats {
	w.mu.Lock()
	l := slices.Clone(w.lats)
	w.mu.Unlock()
	if len(l) == 0 {
		return latStats{}
	}
	slices.Sort(l)
	return latStats{p50: l[len(l)/2], p99: l[len(l)*99/100]}
}

func (w *workload) resetLatencies() { w.mu.Lock(); w.lats = nil; w.mu.Unlock() }
