package replication

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// VolumeConfig configures the primary side of a replicated volume.
type VolumeConfig struct {
	// Self is this node's ID; Peers maps every other replica node to its
	// replica server address.
	Self  string
	Peers map[string]string
	// Local is this node's replica (from OpenLocal); the Volume owns it.
	Local      *Local
	Membership Membership
	// TLS is the client configuration (certificates supplied by the
	// caller). Required unless Plaintext is set for protocol benchmarks.
	TLS       *tls.Config
	Plaintext bool
	// ResyncRate limits resync and repair traffic in bytes per second;
	// 0 means unlimited.
	ResyncRate int64
	// ResyncWindow is how many resync chunks (regions) may be in flight per
	// replica; 0 means DefaultResyncWindow.
	ResyncWindow int
	// TickInterval is the logical clock period (default 100ms) and
	// AckTimeoutTicks how many ticks a replica may leave a message
	// unanswered before it is dropped from the ISR (default 50, i.e. 5s).
	TickInterval    time.Duration
	AckTimeoutTicks int
	// ALSlots bounds the activity log in regions (default DefaultALSlots); see
	// PrimaryConfig.ALSlots.
	ALSlots int
	// ALPrefetch is how many regions a sequential stream brings into the
	// activity log per transaction (PrimaryConfig.ALPrefetch). 0 means
	// 8 MiB worth of regions (at most 1/16 of the volume); negative
	// disables it.
	ALPrefetch int
	// OnUnhealthy is called when this node's own disk fails: the cluster
	// should move the volume. It must not block.
	OnUnhealthy func(error)
	Logger      *slog.Logger
	// Dial overrides how peers are reached (tests); default net.Dialer.
	Dial func(ctx context.Context, addr string) (net.Conn, error)
}

// Volume is the primary of a replicated volume. It implements target/scsi's
// Backend (ReadAt, WriteAt, Flush, Unmap, Size, Resize) with standard types
// only. Writes are acknowledged once the local disk and every ISR member
// have them; reads are served locally.
type Volume struct {
	cfg   VolumeConfig
	log   *slog.Logger
	store *Store
	wq    *writeQueue // the local data writes
	core  *Primary
	size  atomic.Int64

	events   chan func()
	stop     chan struct{}
	loopDone chan struct{} // closed when the loop has returned
	wg       sync.WaitGroup
	nextID   atomic.Uint64
	bucket   *tokenBucket

	// Loop-owned state.
	persisting bool // a Ready's Persist is being made durable
	waiters    map[uint64]chan error
	verifies   map[uint64]chan VerifyResult
	peers      map[string]*peerLink
	rate       map[string]*rateSample

	// Activity-log transactions and metadata saves, and the time spent
	// making them durable, for benchmarks and metrics.
	alTx, metaTx, persistNs atomic.Int64

	// diverged is set once the core found this node's copy is not the
	// volume's data (ErrDiverged): reads fail too rather than serve zeros.
	diverged atomic.Pointer[error]
	// readGate is closed once the core stops holding requests (every ISR
	// member verified, or the core fenced); reads wait for it. gateOpen is
	// loop-owned.
	readGate chan struct{}
	gateOpen bool

	closeOnce sync.Once
	closeErr  error // Close's result, for every caller
	// filesMu orders the reads that use the store outside the loop
	// (ReadAt, MapStatus) before Close closes its files: the store reads
	// by raw descriptor, which once closed may already name another file.
	filesMu     sync.RWMutex
	filesClosed bool
	// deleting is set (by the loop) once Delete has accepted: every later
	// request fails with ErrClosed.
	deleting bool
}

// DefaultResyncWindow is the Volume's default number of resync chunks in
// flight per replica. With 4 the copy stalled on round trips through the
// primary's event loop; 16 (16 MiB at the default region size) keeps the
// read, network and replica-write stages busy at once. It only bounds
// concurrency: ResyncRate still bounds the bandwidth.
const DefaultResyncWindow = 16

type peerLink struct {
	id, addr string
	mu       sync.Mutex
	conn     net.Conn
	out      chan Message
	kick     chan struct{}
}

type rateSample struct {
	at   time.Time
	done int64
	rate float64
}

func randomGen() uint64 {
	var b [8]byte
	for {
		rand.Read(b[:])
		if g := binary.LittleEndian.Uint64(b[:]); g != 0 {
			return g
		}
	}
}

// OpenVolume starts serving as primary. The membership must name cfg.Self
// as primary; its epoch is persisted before any I/O.
func OpenVolume(ctx context.Context, cfg VolumeConfig) (*Volume, error) {
	if cfg.Local == nil || cfg.Membership == nil {
		return nil, errors.New("replication: VolumeConfig needs Local and Membership")
	}
	if cfg.TLS == nil && !cfg.Plaintext {
		return nil, errors.New("replication: VolumeConfig.TLS is required (Plaintext only for benchmarks)")
	}
	if cfg.TickInterval <= 0 {
		cfg.TickInterval = 100 * time.Millisecond
	}
	if cfg.AckTimeoutTicks <= 0 {
		cfg.AckTimeoutTicks = 50
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.ResyncWindow <= 0 {
		cfg.ResyncWindow = DefaultResyncWindow
	}
	if cfg.Dial == nil {
		d := &net.Dialer{Timeout: 3 * time.Second, KeepAlive: 5 * time.Second}
		cfg.Dial = func(ctx context.Context, addr string) (net.Conn, error) { return d.DialContext(ctx, "tcp", addr) }
	}
	vol := cfg.Local.Meta.Volume
	st, err := cfg.Membership.State(ctx, vol)
	if err != nil {
		return nil, fmt.Errorf("replication: membership of %s: %w", vol, err)
	}
	var peers []string
	for id := range cfg.Peers {
		peers = append(peers, id)
	}
	if cfg.ALPrefetch == 0 {
		// 8 MiB worth, but never more than 1/16 of the volume: the
		// prefetched regions widen the resync after a crash.
		m := cfg.Local.Meta
		cfg.ALPrefetch = int(max(1, min((8<<20)/m.RegionSize, int64(m.Regions()/16))))
	}
	core, err := NewPrimary(PrimaryConfig{Self: cfg.Self, Peers: peers, NewGen: randomGen, AckTimeoutTicks: cfg.AckTimeoutTicks,
		ALSlots: cfg.ALSlots, ALPrefetch: cfg.ALPrefetch, ResyncWindow: cfg.ResyncWindow},
		cfg.Local.Meta.Clone(), st)
	if err != nil {
		return nil, err
	}
	v := &Volume{
		cfg: cfg, log: cfg.Logger.With("volume", vol, "node", cfg.Self), store: cfg.Local.Store, core: core,
		events: make(chan func(), 4096), stop: make(chan struct{}), loopDone: make(chan struct{}),
		waiters: map[uint64]chan error{}, verifies: map[uint64]chan VerifyResult{},
		peers: map[string]*peerLink{}, rate: map[string]*rateSample{},
		readGate: make(chan struct{}),
	}
	v.openReadGate()
	if cfg.ResyncRate > 0 {
		v.bucket = newTokenBucket(cfg.ResyncRate)
	}
	v.size.Store(core.Meta().Size)
	// The epoch (and activity-log-derived dirty bits) are durable before
	// anything is sent.
	if rd := core.Ready(); rd.Persist != nil {
		if err := cfg.Local.Persist(rd.Persist, rd.PersistMeta, rd.PersistAL); err != nil {
			return nil, err
		}
	}
	v.wq = newWriteQueue(v.store)
	v.wg.Add(1)
	go func() { defer v.wg.Done(); defer close(v.loopDone); v.loop() }()
	for id, addr := range cfg.Peers {
		pl := &peerLink{id: id, addr: addr, kick: make(chan struct{}, 1)}
		v.peers[id] = pl
		v.wg.Add(1)
		go func() { defer v.wg.Done(); v.connectLoop(pl) }()
	}
	return v, nil
}

func (v *Volume) post(f func()) bool {
	// A select picks at random among ready cases: without this check a
	// post after Close would often queue f for a loop that never runs it.
	select {
	case <-v.stop:
		return false
	default:
	}
	select {
	case v.events <- f:
		return true
	case <-v.stop:
		return false
	}
}

func (v *Volume) loop() {
	t := time.NewTicker(v.cfg.TickInterval)
	defer t.Stop()
	for {
		select {
		case f := <-v.events:
			f()
			// Batch whatever else is queued into one Ready, so one
			// metadata write covers many writes.
			for i := 0; i < 256; i++ {
				select {
				case f := <-v.events:
					f()
					continue
				default:
				}
				break
			}
		case <-t.C:
			v.core.Tick()
		case <-v.stop:
			for id, ch := range v.waiters {
				ch <- ErrClosed
				delete(v.waiters, id)
			}
			return
		}
		v.drain()
		v.openReadGate()
	}
}

// openReadGate lets reads through once the core no longer holds requests;
// a diverged core is recorded first, so no read gets past the gate to the
// empty replica.
func (v *Volume) openReadGate() {
	if v.gateOpen || v.core.Holding() {
		return
	}
	if err := v.core.Fenced(); err != nil && errors.Is(err, ErrDiverged) {
		v.diverged.CompareAndSwap(nil, &err)
	}
	v.gateOpen = true
	close(v.readGate)
}

// drain carries out the core's Readies. A Ready that must persist something
// is persisted by another goroutine while the loop goes on taking events;
// the core meanwhile accumulates everything that follows, so the next
// Ready's single transaction covers every activity-log change made while
// this one was syncing (group commit), and nothing of it runs before this
// one is durable.
func (v *Volume) drain() {
	for !v.persisting && v.core.HasReady() {
		rd := v.core.Ready()
		if rd.Persist == nil {
			v.handle(rd, nil)
			continue
		}
		if !rd.PersistMeta {
			// Activity log only: the messages may leave before the local
			// log is durable, because each replica persists the MsgAL ahead
			// of them before applying them and reports its copy in every
			// HelloAck, so a region they write is known even if this node
			// crashes now. Only the local writes must wait for the local
			// log. Dirty bits and generations (PersistMeta) are not sent
			// ahead: acknowledgements and MsgGen rely on them.
			v.send(rd)
			v.core.Sent(rd)
			rd.Send, rd.Disconnect, rd.stamps = nil, nil, nil
		}
		v.persisting = true
		v.wg.Add(1)
		go func() {
			defer v.wg.Done()
			start := time.Now()
			err := v.cfg.Local.Persist(rd.Persist, rd.PersistMeta, rd.PersistAL)
			v.persistNs.Add(int64(time.Since(start)))
			if rd.PersistAL {
				v.alTx.Add(1)
			}
			if rd.PersistMeta {
				v.metaTx.Add(1)
			}
			v.post(func() {
				v.persisting = false
				v.handle(rd, err)
			})
		}()
		return
	}
}

func (v *Volume) send(rd Ready) {
	for _, s := range rd.Send {
		m := s.Msg
		if s.Copy {
			m.Data, m.Hold = slices.Clone(m.Data), nil
		}
		v.peers[s.To].send(m)
	}
	for _, id := range rd.Disconnect {
		v.peers[id].drop()
	}
}

// handle carries out rd once its Persist (if any) completed with err.
func (v *Volume) handle(rd Ready, err error) {
	if rd.Persist != nil {
		if err != nil {
			// Without durable metadata nothing else in this Ready may
			// proceed; the node's disk is failing.
			v.unhealthy(err)
			for i := range rd.Acks {
				if rd.Acks[i].Err == nil {
					rd.Acks[i].Err = err
				}
			}
			for _, l := range rd.Local {
				tok := l.Token
				go v.post(func() { v.core.LocalDone(tok, err, nil) })
			}
			rd.Local, rd.Send, rd.Propose, rd.stamps = nil, nil, nil, nil
		}
	}
	for _, l := range rd.Local {
		if l.Kind == LocalWrite {
			tok, h := l.Token, l.Hold
			h.ref()
			v.wq.submit(l.Off, l.Data, l.FUA, func(err error) {
				h.unref()
				v.post(func() { v.core.LocalDone(tok, err, nil) })
			})
			continue
		}
		v.wg.Add(1)
		go func(l LocalOp) {
			defer v.wg.Done()
			data, err := v.doLocal(l)
			v.post(func() { v.core.LocalDone(l.Token, err, data) })
		}(l)
	}
	v.send(rd)
	v.core.Sent(rd)
	for _, pr := range rd.Propose {
		v.wg.Add(1)
		go func(pr Proposal) {
			defer v.wg.Done()
			v.propose(pr)
		}(pr)
	}
	for _, a := range rd.Acks {
		if ch, ok := v.waiters[a.ID]; ok {
			ch <- a.Err
			delete(v.waiters, a.ID)
		}
	}
	for _, r := range rd.Verified {
		if ch, ok := v.verifies[r.Token]; ok {
			ch <- r
			delete(v.verifies, r.Token)
		}
	}
	if rd.Unhealthy != nil {
		v.unhealthy(rd.Unhealthy)
	}
}

func (v *Volume) unhealthy(err error) {
	if errors.Is(err, ErrDiverged) {
		v.diverged.Store(&err)
	}
	v.log.Error("replication: local disk failed; node unhealthy", "err", err)
	if v.cfg.OnUnhealthy != nil {
		v.cfg.OnUnhealthy(err)
	}
}

func (v *Volume) propose(pr Proposal) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Close waits for this goroutine: a closing primary (often one whose
	// lease expired, Membership unreachable) must not wait out the timeout
	// for a result nobody will read.
	go func() {
		select {
		case <-v.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	vol := v.cfg.Local.Meta.Volume
	var st MembershipState
	var err error
	if pr.Kind == ProposeAdd {
		st, err = v.cfg.Membership.AddToISR(ctx, vol, pr.Epoch, v.cfg.Self, pr.Peer, pr.Proof)
	} else {
		st, err = v.cfg.Membership.RemoveFromISR(ctx, vol, pr.Epoch, v.cfg.Self, pr.Peer)
	}
	v.log.Info("replication: ISR change", "op", pr.Kind.String(), "peer", pr.Peer, "epoch", pr.Epoch, "isr", st.ISR, "err", err)
	if err != nil && !errors.Is(err, ErrStaleEpoch) && !errors.Is(err, ErrNotPrimary) {
		// Transient: the core re-proposes on the result; pace it.
		select {
		case <-time.After(time.Second):
		case <-v.stop:
			return
		}
	}
	v.post(func() { v.core.MembershipResult(pr, st, err) })
}

func (v *Volume) doLocal(l LocalOp) ([]byte, error) {
	switch l.Kind {
	case LocalWrite:
		return nil, v.store.WriteAt(l.Data, l.Off, l.FUA)
	case LocalUnmap:
		return nil, v.store.Punch(l.Off, l.Len)
	case LocalFlush:
		return nil, v.store.Sync()
	case LocalResize:
		return nil, v.store.Grow(l.Len)
	case LocalRead:
		if v.bucket != nil && !v.bucket.wait(l.Len, v.stop) {
			return nil, ErrClosed
		}
		buf := make([]byte, l.Len)
		return buf, v.store.ReadAt(buf, l.Off)
	case LocalSum:
		if v.bucket != nil && !v.bucket.wait(l.Len, v.stop) {
			return nil, ErrClosed
		}
		return v.store.Sum(l.Off, l.Len)
	}
	return nil, fmt.Errorf("replication: unknown local op %d", l.Kind)
}

func (pl *peerLink) send(m Message) {
	pl.mu.Lock()
	out := pl.out
	pl.mu.Unlock()
	if out == nil {
		return // the connection is gone; PeerDown is already on its way
	}
	m.Hold.ref() // released by the writer, or by runConn's final drain
	select {
	case out <- m:
	default:
		// The peer cannot keep up with a queue this deep: treat it as
		// failed rather than stall every other write.
		m.Hold.unref()
		pl.drop()
	}
}

func (pl *peerLink) drop() {
	pl.mu.Lock()
	if pl.conn != nil {
		pl.conn.Close()
	}
	pl.mu.Unlock()
}

// connectLoop keeps one connection to a replica, reporting each connection
// and each failure to the state machine, with capped backoff.
func (v *Volume) connectLoop(pl *peerLink) {
	backoff := 50 * time.Millisecond
	for {
		select {
		case <-v.stop:
			return
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		c, err := v.cfg.Dial(ctx, pl.addr)
		if err == nil && v.cfg.TLS != nil {
			tc := tls.Client(c, v.cfg.TLS)
			if err = tc.HandshakeContext(ctx); err != nil {
				c.Close()
			}
			c = tc
		}
		cancel()
		if err != nil {
			v.post(func() { v.core.PeerDown(pl.id, fmt.Errorf("replication: dial %s: %w", pl.addr, err)) })
			select {
			case <-time.After(backoff):
			case <-v.stop:
				return
			}
			backoff = min(2*backoff, 2*time.Second)
			continue
		}
		backoff = 50 * time.Millisecond
		v.runConn(pl, c)
	}
}

func (v *Volume) runConn(pl *peerLink, c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	out := make(chan Message, 8192)
	pl.mu.Lock()
	pl.conn, pl.out = c, nil
	pl.mu.Unlock()
	select {
	case <-v.stop:
		c.Close() // Close may have run before conn was recorded
	default:
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { writeLoop(ctx, c, out); close(done) }()
	// The connection becomes current inside the loop, so that no message
	// meant for an older connection is queued on this one before Hello.
	v.post(func() {
		pl.mu.Lock()
		pl.out = out
		pl.mu.Unlock()
		v.core.PeerConnected(pl.id)
	})
	br := bufio.NewReaderSize(c, 64<<10)
	var rerr error
	for {
		m, err := decodeMessage(br)
		if err != nil {
			rerr = err
			break
		}
		if !v.post(func() {
			pl.mu.Lock()
			cur := pl.out == out
			pl.mu.Unlock()
			if cur {
				v.core.Step(pl.id, m)
			}
		}) {
			break
		}
	}
	c.Close()
	cancel()
	<-done
	// Messages still queued will never be written: release the buffers
	// they hold. Only the loop queues on out, so once it has cleared
	// pl.out nothing more arrives (and after stop the loop is gone).
	drainOut := func() {
		for {
			select {
			case m := <-out:
				m.Hold.unref()
			default:
				return
			}
		}
	}
	drained := make(chan struct{})
	v.post(func() {
		pl.mu.Lock()
		if pl.out == out {
			pl.out = nil
		}
		pl.mu.Unlock()
		drainOut()
		close(drained)
		v.core.PeerDown(pl.id, fmt.Errorf("replication: connection to %s: %w", pl.id, rerr))
	})
	select {
	case <-drained:
	case <-v.loopDone:
		// Stopped, and the drain may never run: post can queue it just
		// before the loop returns. Once the loop has returned nothing
		// queues on out, and a message left there would hold its
		// writer's buffer, and its WriteAt, forever.
		drainOut()
	}
	select {
	case <-time.After(100 * time.Millisecond):
	case <-v.stop:
	}
}

func (v *Volume) do(ctx context.Context, r Request) error {
	r.ID = v.nextID.Add(1)
	ch := make(chan error, 1)
	if !v.post(func() {
		if v.deleting {
			ch <- ErrClosed
			return
		}
		v.waiters[r.ID] = ch
		v.core.Propose(r)
	}) {
		return ErrClosed
	}
	select {
	case err := <-ch:
		return err
	case <-v.stop:
		return ErrClosed
	case <-ctx.Done():
		// The request stays in flight and completes on its own; only the
		// caller stops waiting.
		return ctx.Err()
	}
}

func (v *Volume) checkRange(off, n int64) error {
	if off < 0 || n < 0 || off+n > v.size.Load() {
		return fmt.Errorf("replication: range %d+%d beyond size %d", off, n, v.size.Load())
	}
	return nil
}

// ReadAt reads from the local replica, which holds every acknowledged write.
// While the replica is fresh, reads wait like writes until every ISR member
// has shown it holds no data this node lacks (ErrDiverged otherwise).
func (v *Volume) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := v.checkRange(off, int64(len(p))); err != nil {
		return err
	}
	select {
	case <-v.readGate:
	case <-ctx.Done():
		return ctx.Err()
	case <-v.stop:
		return ErrClosed
	}
	if err := v.diverged.Load(); err != nil {
		return *err
	}
	v.filesMu.RLock()
	defer v.filesMu.RUnlock()
	if v.filesClosed {
		return ErrClosed
	}
	return v.store.ReadAt(p, off)
}

// WriteAt replicates p to every ISR member; with fua it returns once all of
// them made it durable.
func (v *Volume) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := v.checkRange(off, int64(len(p))); err != nil {
		return err
	}
	// p itself is written locally and sent to the ISR members, not a copy
	// (a replica outside the ISR gets a copy: the acknowledgement does not
	// wait for it, so neither may p). The caller may reuse p once we
	// return, so we return only once nothing refers to it: the local write
	// returned and every message carrying it was handed to the kernel or
	// dropped with its connection. That holds also when ctx ends early or
	// the volume closes, so WriteAt may outlive ctx by as long as that takes
	// (bounded by the ack timeout of a stuck connection).
	//
	// For the same reason the write is waited for even when ctx ends
	// first: the request stays in flight, and the primary may issue it
	// (taking new references to p) after we would have returned. ctx only
	// bounds the wait of a caller that gives p away; this one cannot.
	h := newHold()
	err := v.do(context.WithoutCancel(ctx), Request{Kind: ReqWrite, Off: off, Data: p, FUA: fua, Hold: h})
	if err == nil && ctx.Err() != nil {
		// Completed, but after the caller gave up: report what it asked
		// for, as other backends do.
		err = ctx.Err()
	}
	select {
	case <-v.stop:
		// do gave up on a closing volume, but the request may still sit
		// in the event queue or in the core, and the loop runs on until it
		// notices stop: it could still issue the write, taking references
		// to p after ours was dropped (reviving a released Hold, whose
		// second release then closed free twice). Once the loop has
		// returned nothing takes new ones.
		<-v.loopDone
	default:
	}
	h.unref()
	<-h.free
	return err
}

// Flush makes every completed write durable on every ISR member.
func (v *Volume) Flush(ctx context.Context) error { return v.do(ctx, Request{Kind: ReqFlush}) }

// Unmap deallocates the range on every ISR member.
func (v *Volume) Unmap(ctx context.Context, off, length int64) error {
	if err := v.checkRange(off, length); err != nil {
		return err
	}
	return v.do(ctx, Request{Kind: ReqUnmap, Off: off, Len: length})
}

// MapStatus reports whether the extent at off is allocated on the primary's
// replica (target/scsi's MapStatusBackend, for GET LBA STATUS). Unmaps reach
// every ISR member as hole punches, so the map is the same on each of them.
func (v *Volume) MapStatus(_ context.Context, off int64) (bool, int64, error) {
	if err := v.checkRange(off, 1); err != nil {
		return false, 0, err
	}
	v.filesMu.RLock()
	defer v.filesMu.RUnlock()
	if v.filesClosed {
		return false, 0, ErrClosed
	}
	return v.store.MapStatus(off)
}

// Size is the capacity in bytes.
func (v *Volume) Size() int64 { return v.size.Load() }

// Resize grows the volume online on every replica. Shrinking is refused.
func (v *Volume) Resize(ctx context.Context, size int64) error {
	if size < v.size.Load() {
		return fmt.Errorf("replication: refusing to shrink from %d to %d", v.size.Load(), size)
	}
	if size == v.size.Load() {
		return nil
	}
	if err := v.do(ctx, Request{Kind: ReqResize, Len: size}); err != nil {
		return err
	}
	v.size.Store(size)
	return nil
}

// ReplicaStatus is what the console and metrics show for one replica.
type ReplicaStatus struct {
	PeerStatus
	// RateBytes is the recent resync rate; ETA is zero when unknown.
	RateBytes float64
	ETA       time.Duration
}

// Status reports every replica, with resync progress, rate and ETA.
func (v *Volume) Status(ctx context.Context) ([]ReplicaStatus, error) {
	ch := make(chan []ReplicaStatus, 1)
	if !v.post(func() {
		now := time.Now()
		var out []ReplicaStatus
		for _, ps := range v.core.Status() {
			rs := ReplicaStatus{PeerStatus: ps}
			s := v.rate[ps.ID]
			if s == nil || ps.ResyncDone < s.done {
				s = &rateSample{at: now, done: ps.ResyncDone}
				v.rate[ps.ID] = s
			} else if dt := now.Sub(s.at).Seconds(); dt >= 0.5 {
				s.rate = float64(ps.ResyncDone-s.done) / dt
				s.at, s.done = now, ps.ResyncDone
			}
			rs.RateBytes = s.rate
			if s.rate > 0 && ps.DirtyBytes > 0 {
				rs.ETA = time.Duration(float64(ps.DirtyBytes) / s.rate * float64(time.Second))
			}
			out = append(out, rs)
		}
		ch <- out
	}) {
		return nil, ErrClosed
	}
	select {
	case s := <-ch:
		return s, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// VerifyReport is the outcome of an online verify.
type VerifyReport struct {
	Regions  uint64
	Mismatch map[uint64][]string // region → replicas that differ
	Skipped  map[uint64][]string // region → ISR replicas not compared
}

// Verify compares every region on the primary and the connected ISR members
// with SHA-256 while the volume serves I/O (each region is ordered against
// writes to it). With repair, differing regions are copied from the primary.
func (v *Volume) Verify(ctx context.Context, repair bool) (VerifyReport, error) {
	rep := VerifyReport{Mismatch: map[uint64][]string{}, Skipped: map[uint64][]string{}}
	n := regionCount(v.size.Load(), v.cfg.Local.Meta.RegionSize)
	const window = 4
	results := make(chan VerifyResult, window)
	inflight := 0
	next := uint64(0)
	for next < n || inflight > 0 {
		for next < n && inflight < window {
			r := next
			next++
			inflight++
			if !v.post(func() {
				tok := v.core.Verify(r, repair)
				v.verifies[tok] = results
			}) {
				return rep, ErrClosed
			}
		}
		select {
		case res := <-results:
			inflight--
			rep.Regions++
			if res.Err != nil {
				return rep, res.Err
			}
			if len(res.Mismatch) > 0 {
				rep.Mismatch[res.Region] = res.Mismatch
			}
			if len(res.Skipped) > 0 {
				rep.Skipped[res.Region] = res.Skipped
			}
		case <-ctx.Done():
			return rep, ctx.Err()
		}
	}
	return rep, nil
}

// Delete removes the volume online from this node, the primary: it refuses
// with ErrInUse while any request is in flight (the LUN must stop sending
// I/O first), otherwise it stops serving (later requests fail with
// ErrClosed), closes the replica connections and removes the local data and
// metadata files. Each replica node then deletes its copy with
// Server.DeleteVolume, and a node that no longer serves the volume at all
// with DeleteLocal; dropping the volume from membership is the cluster's.
func (v *Volume) Delete(ctx context.Context) error {
	res := make(chan error, 1)
	if !v.post(func() {
		if n := len(v.waiters) + len(v.verifies); n > 0 {
			res <- fmt.Errorf("%w: %d requests in flight", ErrInUse, n)
			return
		}
		v.deleting = true
		res <- nil
	}) {
		return ErrClosed
	}
	select {
	case err := <-res:
		if err != nil {
			return err
		}
	case <-ctx.Done():
		return ctx.Err()
	}
	if err := v.Close(); err != nil {
		return err
	}
	return DeleteLocal(filepath.Dir(v.cfg.Local.MetaPath), v.cfg.Local.Meta.Volume)
}

// Close stops the volume: pending requests fail with ErrClosed (a write
// that fails so may still have reached some disks), later ones too. It is
// safe to call while requests are in flight and more than once; every call
// returns once the files are closed, with the same result.
func (v *Volume) Close() error {
	v.closeOnce.Do(func() {
		close(v.stop)
		for _, pl := range v.peers {
			pl.drop()
		}
		v.wg.Wait()
		// Every local write the loop submitted is issued before the file
		// closes (a WriteAt waits for its own).
		v.wq.close()
		v.filesMu.Lock()
		v.filesClosed = true
		v.filesMu.Unlock()
		v.closeErr = v.cfg.Local.Close()
	})
	return v.closeErr
}

type tokenBucket struct {
	mu     sync.Mutex
	rate   float64
	tokens float64
	last   time.Time
}

func newTokenBucket(rate int64) *tokenBucket {
	return &tokenBucket{rate: float64(rate), last: time.Now()}
}

// wait blocks until n bytes may be spent (a debt model: large chunks are
// allowed through and paid back), or stop closes.
func (b *tokenBucket) wait(n int64, stop <-chan struct{}) bool {
	b.mu.Lock()
	now := time.Now()
	// Bursts are capped at 100ms worth so the limit holds over short spans.
	b.tokens = min(b.tokens+now.Sub(b.last).Seconds()*b.rate, b.rate/10)
	b.last = now
	b.tokens -= float64(n)
	var d time.Duration
	if b.tokens < 0 {
		d = time.Duration(-b.tokens / b.rate * float64(time.Second))
	}
	b.mu.Unlock()
	if d == 0 {
		return true
	}
	select {
	case <-time.After(d):
		return true
	case <-stop:
		return false
	}
}
