package replication

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// volatileDisk models a data file behind a volatile write cache (the page
// cache, or a drive's cache without power-loss protection): a write lands in
// the cache, fdatasync (and a DSYNC write, for its own range) makes it
// durable, and a power loss discards everything not yet durable. The
// replica's metadata and activity-log files stay real files: every write to
// them is synchronous, so what is in them is what would survive.
type volatileDisk struct {
	mu      sync.Mutex
	durable map[int64][]byte // page → contents; missing means zeros
	cache   map[int64][]byte // written, not yet durable
	ver     map[int64]uint64 // page → version of its cached contents
	nextVer uint64
	// syncDelay makes fdatasync take this long: it covers what was written
	// before it was called, and meanwhile writes go on (and whatever the
	// protocol lets happen before a flush completes, happens).
	syncDelay time.Duration
	size      int64
	life      int // incremented by each power loss; older handles fail
	syncs     int
}

const vdPage = 4096

func newVolatileDisk() *volatileDisk {
	return &volatileDisk{durable: map[int64][]byte{}, cache: map[int64][]byte{}, ver: map[int64]uint64{}, syncDelay: 10 * time.Millisecond}
}

// powerLoss discards the cache; handles opened before fail from now on.
func (d *volatileDisk) powerLoss() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.cache = map[int64][]byte{}
	d.ver = map[int64]uint64{}
	d.life++
}

// image is what a read of the whole file returns now; durableImage what it
// would return after a power loss.
func (d *volatileDisk) image(durableOnly bool) []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]byte, d.size)
	for pg := int64(0); pg*vdPage < d.size; pg++ {
		copy(out[pg*vdPage:], d.pageLocked(pg, durableOnly))
	}
	return out
}

func (d *volatileDisk) pageLocked(pg int64, durableOnly bool) []byte {
	if !durableOnly {
		if b, ok := d.cache[pg]; ok {
			return b
		}
	}
	if b, ok := d.durable[pg]; ok {
		return b
	}
	return make([]byte, vdPage)
}

// open returns a handle for a Store, valid until the next power loss.
func (d *volatileDisk) open(path string, size int64) (*Store, error) {
	d.mu.Lock()
	if d.size < size {
		d.size = size
	}
	f := &volatileFile{d: d, life: d.life}
	s := &Store{f: f, path: path}
	s.size.Store(d.size)
	d.mu.Unlock()
	return s, nil
}

type volatileFile struct {
	d    *volatileDisk
	life int
}

// lockLive locks the disk and fails if it lost power since the handle was
// opened: nothing of a crashed node reaches the disk any more.
func (f *volatileFile) lockLive() error {
	f.d.mu.Lock()
	if f.d.life != f.life {
		f.d.mu.Unlock()
		return unix.EIO
	}
	return nil
}

func (f *volatileFile) pread(p []byte, off int64) (int, error) {
	if err := f.lockLive(); err != nil {
		return 0, err
	}
	defer f.d.mu.Unlock()
	n := 0
	for n < len(p) && off < f.d.size {
		pg, in := off/vdPage, off%vdPage
		c := copy(p[n:], f.d.pageLocked(pg, false)[in:])
		c = int(min(int64(c), f.d.size-off))
		n, off = n+c, off+int64(c)
	}
	return n, nil
}

func (f *volatileFile) writeLocked(p []byte, off int64, durable bool) {
	for len(p) > 0 {
		pg, in := off/vdPage, off%vdPage
		b := slices.Clone(f.d.pageLocked(pg, false))
		c := copy(b[in:], p)
		if durable {
			f.d.durable[pg] = b
			delete(f.d.cache, pg)
			delete(f.d.ver, pg)
		} else {
			f.d.nextVer++
			f.d.cache[pg] = b
			f.d.ver[pg] = f.d.nextVer
		}
		p, off = p[c:], off+int64(c)
	}
}

func (f *volatileFile) pwritev(iov [][]byte, off int64, dsync bool) (int, error) {
	if err := f.lockLive(); err != nil {
		return 0, err
	}
	defer f.d.mu.Unlock()
	n := 0
	for _, b := range iov {
		if off+int64(len(b)) > f.d.size {
			f.d.size = off + int64(len(b))
		}
		f.writeLocked(b, off, dsync)
		off, n = off+int64(len(b)), n+len(b)
	}
	return n, nil
}

// datasync makes durable what was written when it was called, taking
// syncDelay; pages written again meanwhile stay in the cache with their
// newer contents.
func (f *volatileFile) datasync() error {
	if err := f.lockLive(); err != nil {
		return err
	}
	snap := make(map[int64][]byte, len(f.d.cache))
	vers := make(map[int64]uint64, len(f.d.cache))
	for pg, b := range f.d.cache {
		snap[pg], vers[pg] = b, f.d.ver[pg]
	}
	delay := f.d.syncDelay
	f.d.mu.Unlock()
	time.Sleep(delay)
	if err := f.lockLive(); err != nil {
		return err
	}
	defer f.d.mu.Unlock()
	for pg, b := range snap {
		f.d.durable[pg] = b
		if f.d.ver[pg] == vers[pg] {
			delete(f.d.cache, pg)
			delete(f.d.ver, pg)
		}
	}
	f.d.syncs++
	return nil
}

// punch writes zeros into the cache: deallocating is no more durable than
// writing until the next fdatasync.
func (f *volatileFile) punch(off, n int64) error {
	if err := f.lockLive(); err != nil {
		return err
	}
	defer f.d.mu.Unlock()
	for n > 0 {
		c := min(n, 1<<20)
		f.writeLocked(make([]byte, c), off, false)
		off, n = off+c, n-c
	}
	return nil
}

// truncate changes the size at once (the tests do not resize).
func (f *volatileFile) truncate(size int64) error {
	if err := f.lockLive(); err != nil {
		return err
	}
	defer f.d.mu.Unlock()
	f.d.size = size
	return nil
}

func (f *volatileFile) seek(int64, int) (int64, error) { return 0, unix.EINVAL }

func (f *volatileFile) Close() error { return nil }

// plNode is one node of a power-loss cluster: its metadata directory and
// its data file behind a volatile cache.
type plNode struct {
	name, dir, addr string
	disk            *volatileDisk
	srv             *Server
	ln              net.Listener
	done            chan error
}

type plCluster struct {
	t     *testing.T
	pki   *testPKI
	mem   *MemMembership
	vol   string
	size  int64
	rs    int64
	slots int
	nodes map[string]*plNode
	names []string
	prim  *Volume
	pname string
}

func newPLCluster(t *testing.T, names ...string) *plCluster {
	c := &plCluster{t: t, pki: newPKI(t), mem: NewMemMembership(), vol: "plvol", size: 4 << 20, rs: 64 << 10,
		slots: 16, nodes: map[string]*plNode{}, names: names}
	base := t.TempDir()
	for _, n := range names {
		c.nodes[n] = &plNode{name: n, dir: filepath.Join(base, n), addr: freeAddr(t), disk: newVolatileDisk()}
	}
	c.mem.Create(c.vol, names[0], names[1:]...)
	t.Cleanup(c.close)
	return c
}

func (c *plCluster) local(name string) *Local {
	n := c.nodes[name]
	l, err := openLocal(LocalOptions{Dir: n.dir, Volume: c.vol, Size: c.size, RegionSize: c.rs, Gen: 7}, n.disk.open)
	if err != nil {
		c.t.Fatal(err)
	}
	return l
}

func (c *plCluster) startReplica(name string, l *Local) {
	n := c.nodes[name]
	if l == nil {
		l = c.local(name)
	}
	srv, err := NewServer(ServerConfig{TLS: c.pki.server(c.t, name), Logger: testLogger(c.t).With("node", name)})
	if err != nil {
		c.t.Fatal(err)
	}
	if err := srv.AddVolume(l); err != nil {
		c.t.Fatal(err)
	}
	if n.ln, err = listenRetry(n.addr); err != nil {
		c.t.Fatal(err)
	}
	n.srv, n.done = srv, make(chan error, 1)
	go func() { n.done <- srv.Serve(n.ln) }()
}

func (c *plCluster) openPrimary(name string, l *Local) {
	if l == nil {
		l = c.local(name)
	}
	peers := map[string]string{}
	for _, other := range c.names {
		if other != name {
			peers[other] = c.nodes[other].addr
		}
	}
	v, err := OpenVolume(context.Background(), VolumeConfig{Self: name, Peers: peers, Local: l, Membership: c.mem,
		TLS: c.pki.client(c.t, name), TickInterval: 20 * time.Millisecond, AckTimeoutTicks: 250, ALSlots: c.slots,
		Logger: testLogger(c.t).With("node", name)})
	if err != nil {
		c.t.Fatal(err)
	}
	c.prim, c.pname = v, name
}

// powerLossReplica cuts a replica's power: its cache is gone, its
// connections drop, nothing it was doing reaches its disk.
func (c *plCluster) powerLossReplica(name string) {
	n := c.nodes[name]
	n.disk.powerLoss()
	n.srv.Close()
	<-n.done
	n.srv = nil
	if c.prim != nil {
		c.waitOut(name)
	}
}

// powerLossPrimary does the same to the primary's node.
func (c *plCluster) powerLossPrimary() {
	c.nodes[c.pname].disk.powerLoss()
	c.prim.Close()
	c.prim = nil
}

func (c *plCluster) close() {
	if c.prim != nil {
		c.prim.Close()
		c.prim = nil
	}
	for _, n := range c.nodes {
		if n.srv != nil {
			n.srv.Close()
			<-n.done
			n.srv = nil
		}
	}
}

// waitOut waits until the replica's removal from the ISR has committed: the
// primary has noticed the power loss, so the next waitISR sees the node
// back through a new handshake and resync, not the state before it failed.
func (c *plCluster) waitOut(name string) {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if st, _ := c.mem.State(context.Background(), c.vol); !st.InISR(name) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	c.t.Fatalf("%s was not removed from the ISR", name)
}

func (c *plCluster) waitISR(want int) {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		st, _ := c.mem.State(context.Background(), c.vol)
		ps, _ := c.prim.Status(context.Background())
		ok := len(st.ISR) == want
		for _, p := range ps {
			if !p.InISR || p.Mode != "up" || p.DirtyBytes > 0 {
				ok = false
			}
		}
		if ok {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	st, _ := c.mem.State(context.Background(), c.vol)
	ps, _ := c.prim.Status(context.Background())
	c.t.Fatalf("ISR did not reach %d members: %+v %+v", want, st, ps)
}

// writeAll issues n non-overlapping-in-time 4 KiB writes spread over every
// region, 4 at a time, each with its own contents; all must succeed.
func (c *plCluster) writeAll(seed, n int, fua bool) {
	ctx := context.Background()
	blocks := int(c.size / 4096)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	sem := make(chan struct{}, 4)
	for i := 0; i < n; i++ {
		// A stride coprime to the block count walks every region, in an
		// order that leaves the activity log no locality.
		blk := (seed*131 + i*97) % blocks
		sem <- struct{}{}
		wg.Add(1)
		go func(i, blk int) {
			defer wg.Done()
			defer func() { <-sem }()
			if err := c.prim.WriteAt(ctx, pattern(seed*100000+i, 4096), int64(blk)*4096, fua); err != nil {
				errs <- fmt.Errorf("write %d at block %d: %w", i, blk, err)
			}
		}(i, blk)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		c.t.Fatal(err)
	}
}

// writeTail writes 16 blocks of one region one after the other: after the
// first the region is in the activity log, so the rest change nothing there
// and start no flush. They are the writes most surely still in the caches
// when the power goes.
func (c *plCluster) writeTail(seed int) {
	lo := int64(seed%int(c.size/c.rs)) * c.rs
	for i := 0; i < 16; i++ {
		if err := c.prim.WriteAt(context.Background(), pattern(seed*1000+i, 4096), lo+int64(i)*4096, false); err != nil {
			c.t.Fatal(err)
		}
	}
}

// diffRegions lists the regions in which a and b differ.
func diffRegions(a, b []byte, rs int64) []uint64 {
	var out []uint64
	for lo := int64(0); lo < int64(len(a)); lo += rs {
		hi := min(lo+rs, int64(len(a)))
		if !bytes.Equal(a[lo:hi], b[lo:hi]) {
			out = append(out, uint64(lo/rs))
		}
	}
	return out
}

// checkConverged asserts byte-identical replicas and a clean online verify.
func (c *plCluster) checkConverged(what string) {
	c.t.Helper()
	ref := c.nodes[c.pname].disk.image(false)
	for _, name := range c.names {
		if name == c.pname {
			continue
		}
		if d := diffRegions(ref, c.nodes[name].disk.image(false), c.rs); len(d) > 0 {
			c.t.Fatalf("%s: %s differs from primary %s in regions %v (acknowledged writes lost on one of them: silent divergence)",
				what, name, c.pname, d)
		}
	}
	rep, err := c.prim.Verify(context.Background(), false)
	if err != nil || len(rep.Mismatch) != 0 || len(rep.Skipped) != 0 || rep.Regions != uint64(c.size/c.rs) {
		c.t.Fatalf("%s: verify: %+v %v", what, rep, err)
	}
}

// TestPowerLossReplicaUnflushedWrites: a secondary acknowledges writes that
// are only in its volatile cache and loses power. Its disk lacks them, and
// the primary's dirty bitmap does not name them (the replica was in the ISR
// and acknowledged). When it returns, the regions it may have lost must be
// resynced: replicas byte-identical and online verify clean. The activity
// log is small (16 slots of 64 KiB over 64 regions) so regions leave it all
// the time. Then it is out while every region is written, resyncs, and
// loses power right after it has rejoined: the resync's copies must not
// count before they are durable. Then the durability of
// what was acknowledged as durable: after
// an acknowledged FLUSH, and for FUA writes, a power loss of the replica
// loses nothing.
func TestPowerLossReplicaUnflushedWrites(t *testing.T) {
	c := newPLCluster(t, "n1", "n2")
	c.startReplica("n2", nil)
	c.openPrimary("n1", nil)
	c.waitISR(2)
	ctx := context.Background()

	for round := 0; round < 3; round++ {
		c.writeAll(round+1, 400, false)
		c.writeTail(round + 5)
		primary := c.nodes["n1"].disk.image(false)
		c.powerLossReplica("n2")
		lost := diffRegions(primary, c.nodes["n2"].disk.image(true), c.rs)
		if len(lost) == 0 {
			t.Fatalf("round %d: the power loss lost nothing on n2: nothing was tested", round)
		}
		m, err := LoadLocalMeta(c.nodes["n2"].dir, c.vol)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("round %d: n2 lost writes in regions %v; its durable activity log names %v", round, lost, m.AL)
		c.startReplica("n2", nil)
		c.waitISR(2)
		c.checkConverged(fmt.Sprintf("round %d, after n2's power loss", round))

		// Out again, and written everywhere meanwhile (its dirty bitmap
		// names every region; the activity log only the last few), then
		// power lost as soon as it has rejoined: what the resync copied
		// must have been durable before it counted as copied.
		c.powerLossReplica("n2")
		c.writeAll(round+50, 400, false)
		c.startReplica("n2", nil)
		c.waitISR(2)
		c.powerLossReplica("n2")
		c.startReplica("n2", nil)
		c.waitISR(2)
		c.checkConverged(fmt.Sprintf("round %d, after n2's power loss right after its resync", round))
	}

	// An acknowledged FLUSH: everything acknowledged before it is durable on
	// every ISR member.
	c.writeAll(10, 400, false)
	if err := c.prim.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	primary := c.nodes["n1"].disk.image(false)
	c.powerLossReplica("n2")
	if d := diffRegions(primary, c.nodes["n2"].disk.image(true), c.rs); len(d) > 0 {
		t.Fatalf("after an acknowledged flush n2's power loss lost regions %v", d)
	}
	c.startReplica("n2", nil)
	c.waitISR(2)
	c.checkConverged("after the flush and n2's power loss")

	// FUA writes: durable on every ISR member when acknowledged.
	if err := c.prim.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	c.writeAll(20, 200, true)
	primary = c.nodes["n1"].disk.image(false)
	c.powerLossReplica("n2")
	if d := diffRegions(primary, c.nodes["n2"].disk.image(true), c.rs); len(d) > 0 {
		t.Fatalf("FUA writes lost by n2's power loss in regions %v", d)
	}
	c.startReplica("n2", nil)
	c.waitISR(2)
	c.checkConverged("after FUA writes and n2's power loss")
}

// TestPowerLossPrimaryPromoted: the primary acknowledges writes that are
// only in its volatile cache (and in its replica's) and loses power. The
// replica is promoted at epoch+1 and keeps serving; the old primary comes
// back from what was durable on its disk as a secondary. Every region it
// may have lost must be resynced to it.
func TestPowerLossPrimaryPromoted(t *testing.T) {
	c := newPLCluster(t, "n1", "n2")
	c.startReplica("n2", nil)
	c.openPrimary("n1", nil)
	c.waitISR(2)

	c.writeAll(1, 400, false)
	c.writeTail(7)
	acked := c.nodes["n1"].disk.image(false)
	if !bytes.Equal(acked, c.nodes["n2"].disk.image(false)) {
		t.Fatal("replicas differ before the power loss")
	}
	c.powerLossPrimary()
	lost := diffRegions(acked, c.nodes["n1"].disk.image(true), c.rs)
	if len(lost) == 0 {
		t.Fatal("the power loss lost nothing on n1: nothing was tested")
	}

	// The controller's part, then the node's: n2 stops serving its replica
	// and opens it as primary at the new epoch.
	st, err := c.mem.Promote(c.vol, "n2")
	if err != nil {
		t.Fatal(err)
	}
	n2 := c.nodes["n2"]
	l, err := n2.srv.RemoveVolume(c.vol)
	if err != nil {
		t.Fatal(err)
	}
	n2.srv.Close()
	<-n2.done
	n2.srv = nil
	c.openPrimary("n2", l)
	if !bytes.Equal(acked, n2.disk.image(false)) {
		t.Fatal("the promoted replica lacks acknowledged writes")
	}
	m1, _ := LoadLocalMeta(c.nodes["n1"].dir, c.vol)
	t.Logf("promoted n2 at epoch %d; n1 lost writes in regions %v; its durable log names %v", st.Epoch, lost, m1.AL)

	// No write while n1 is away: its dirty bitmap alone would cover the
	// regions those writes touch, and hide what this is about.
	c.startReplica("n1", nil)
	c.waitISR(2)
	c.checkConverged("old primary returned as secondary")
	c.writeAll(2, 100, false)

	// And the new primary's own power loss while n1 is a secondary, with
	// the old primary promoted back.
	c.writeAll(3, 400, false)
	c.writeTail(9)
	if lost := diffRegions(c.nodes["n2"].disk.image(false), c.nodes["n2"].disk.image(true), c.rs); len(lost) == 0 {
		t.Fatal("n2 has nothing to lose: nothing was tested")
	}
	c.powerLossPrimary()
	if _, err := c.mem.Promote(c.vol, "n1"); err != nil {
		t.Fatal(err)
	}
	n1 := c.nodes["n1"]
	l, err = n1.srv.RemoveVolume(c.vol)
	if err != nil {
		t.Fatal(err)
	}
	n1.srv.Close()
	<-n1.done
	n1.srv = nil
	c.openPrimary("n1", l)
	c.startReplica("n2", nil)
	c.waitISR(2)
	c.checkConverged("n2 returned after its power loss as primary")
}
