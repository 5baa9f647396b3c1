package replication

import (
	"errors"
	"fmt"
	"slices"
	"sort"
)

// ErrLocalDisk marks an I/O error on the primary's own replica.
var ErrLocalDisk = errors.New("replication: local disk error")

// ErrClosed is returned for requests after the volume was closed.
var ErrClosed = errors.New("replication: volume closed")

// ErrDiverged marks a primary whose own replica is fresh (all zeros, never
// written) while a replica of its lineage has been written: this node's
// copy is not the volume's data (typically a replaced disk recreated at the
// creation generation). The primary refuses to serve and reports itself
// unhealthy so the cluster moves the volume to a node that holds the data.
var ErrDiverged = errors.New("replication: local replica is empty but a peer holds written data")

// PrimaryConfig configures the primary state machine.
type PrimaryConfig struct {
	Self string
	// Peers lists every replica node of the volume except Self.
	Peers []string
	// NewGen returns a fresh random generation identifier (never 0). Tests
	// pass a counter so scripts are deterministic.
	NewGen func() uint64
	// ALSlots bounds the activity log (regions). Regions stay in the log
	// after their writes finish until the slots are needed, so a workload
	// with locality pays one metadata write per newly touched region, not per
	// write; and a region leaves only once a flush that covers its writes
	// has completed on this node and every connected replica (the primary
	// issues one when the log is half full and a quarter of it unflushed,
	// and a write to a new region waits for it when none can leave). Default
	// DefaultALSlots, at most MaxALSlots.
	ALSlots int
	// ALPrefetch is how many regions a sequential stream brings into the
	// activity log at once: when a write misses the log in region r while
	// r-1 is among the most recently used entries, r+1 .. r+ALPrefetch-1
	// enter in the same transaction, so a stream pays one transaction per
	// ALPrefetch regions instead of one per region. The extra entries only
	// widen what a crash resyncs. 0 or 1 disables it (the scripts' default;
	// Volume sets 8 MiB worth).
	ALPrefetch int
	// ResyncWindow is how many resync chunks may be in flight per peer.
	// Default 4.
	ResyncWindow int
	// AckTimeoutTicks drops a peer that leaves a message unanswered for this
	// many ticks. 0 disables it.
	AckTimeoutTicks int
}

type peerMode uint8

const (
	peerDown peerMode = iota
	peerHello
	peerUp
)

func (m peerMode) String() string { return [...]string{"down", "hello", "up"}[m] }

type peer struct {
	id       string
	mode     peerMode
	inISR    bool
	removing bool // removal from the ISR started, not yet committed
	proposed bool // removal handed to Membership
	adding   bool // catch-up proof sent, add not yet committed
	knownGen uint64
	// verified: a handshake with this peer completed since this Primary
	// was built, so a fresh primary knows the peer holds no data it lacks.
	verified bool
	inflight int    // resync chunks in flight
	cursor   uint64 // next region to consider for resync
	// copied holds regions whose resync chunk the replica acknowledged
	// but has not yet made durable: their dirty bits are cleared only once
	// a flush sent after that acknowledgement has completed there
	// (syncFlush), so a power loss of the replica cannot lose a copied
	// region whose bit is gone. The value orders acknowledgements against
	// the flush (Primary.clock).
	copied    map[uint64]uint64
	syncFlush *op   // the flush that will clear copied regions' bits
	done      int64 // resync bytes copied since the last handshake
	total     int64
	lastErr   string
}

type opKind uint8

const (
	opUser opKind = iota
	opResync
	opVerify
	opGen
	opAL
	// opFlush is a flush the primary issues for itself: with peer empty,
	// the activity-log flush (locally and on every connected replica) that
	// lets regions leave the activity log; with peer set, the flush on a
	// resyncing replica that lets the dirty bits of copied regions clear.
	opFlush
)

type op struct {
	token   uint64
	kind    opKind
	req     Request
	peer    string // resync and gen target
	region  uint64
	lo, hi  int64 // locked byte range; lo == hi locks nothing
	issued  bool
	local   bool // local part done
	lerr    error
	acked   map[string]bool   // peers whose ack is awaited (false) or received (true)
	sent    map[string]uint64 // peer → seq
	sentAt  map[string]int    // peer → tick its message was sent
	need    map[string]bool   // ISR peers the initiator ack waits for
	sums    map[string][]byte
	tick    int
	done    bool // acknowledged to the initiator
	repair  bool
	addGen  uint64 // opGen: generation being installed
	forAdd  bool   // opGen: propose AddToISR once acked
	release bool
	// regions (opFlush) are the regions the flush makes durable: activity-
	// log regions idle and unflushed when it was issued, or a peer's
	// copied regions; cut is Primary.clock when it was issued: what
	// happened up to then is covered.
	regions []uint64
	cut     uint64
}

// Primary is the primary's replication protocol as a pure state machine. It
// performs no I/O: every event method records outputs that Ready returns.
// It is not safe for concurrent use; the shell serializes calls.
type Primary struct {
	cfg    PrimaryConfig
	meta   *Meta
	isr    map[string]bool // committed ISR members other than Self
	peers  map[string]*peer
	order  []string
	ops    map[uint64]*op // by token
	bySeq  map[uint64]*op
	queue  []*op // not yet issued (range conflict)
	held   []*op // user requests held while fresh and an ISR member is unverified
	active []*op // issued, not released
	alRefs map[uint64]int
	// unflushed holds the activity-log regions that a write or unmap was
	// issued into since the last flush covering them completed on this
	// node and every connected replica, with the clock when the last such
	// op was issued. Such a region stays in the activity log: the write may
	// still be only in a volatile cache (the page cache) of any node, and
	// after a power loss that node's log, or the log copy it reports, is
	// what says the region must be resynced. Regions loaded from the log at
	// start are unflushed too (clock 0): nobody knows what reached the
	// disks.
	unflushed map[uint64]uint64
	alFlush   *op // the activity-log flush in flight
	// clock orders the issue of writes (unflushed) and the arrival of
	// resync acknowledgements (peer.copied) against the flushes that cover
	// them (op.cut). Tokens cannot: a request gets its token when proposed,
	// and may be issued long after (queued behind an overlap).
	clock       uint64
	next        uint64 // token and sequence counter
	ticks       int
	fenced      error
	diskErr     error
	rd          Ready
	persistMeta bool // metadata other than the AL changed: durable before this Ready
	persistAL   bool // the activity log changed: durable before this Ready
}

// NewPrimary builds the state machine from this node's metadata and the
// committed membership state. meta is owned by the Primary afterwards.
func NewPrimary(cfg PrimaryConfig, meta *Meta, st MembershipState) (*Primary, error) {
	if st.Primary != cfg.Self {
		return nil, fmt.Errorf("%w: membership names %s", ErrNotPrimary, st.Primary)
	}
	if meta.Epoch > st.Epoch {
		return nil, fmt.Errorf("%w: local metadata has epoch %d > %d", ErrStaleEpoch, meta.Epoch, st.Epoch)
	}
	if cfg.NewGen == nil {
		return nil, errors.New("replication: PrimaryConfig.NewGen is required")
	}
	if cfg.ALSlots <= 0 {
		cfg.ALSlots = DefaultALSlots
	}
	cfg.ALSlots = min(cfg.ALSlots, MaxALSlots)
	cfg.ALPrefetch = min(cfg.ALPrefetch, cfg.ALSlots/4)
	if cfg.ResyncWindow <= 0 {
		cfg.ResyncWindow = 4
	}
	p := &Primary{
		cfg: cfg, meta: meta,
		isr:    make(map[string]bool),
		peers:  make(map[string]*peer),
		ops:    make(map[uint64]*op),
		bySeq:  make(map[uint64]*op),
		alRefs: make(map[uint64]int),

		unflushed: make(map[uint64]uint64),
	}
	for _, r := range meta.AL {
		p.unflushed[r] = 0
	}
	meta.Epoch = st.Epoch
	if meta.Gen == 0 {
		meta.Gen = cfg.NewGen()
	}
	if meta.Peers == nil {
		meta.Peers = make(map[string]*PeerMeta)
	}
	for _, id := range cfg.Peers {
		pe := &peer{id: id}
		if st.InISR(id) {
			p.isr[id] = true
			pe.inISR = true
			// ISR members hold this node's lineage: that is what the ISR
			// means, and the generation is bumped before anyone leaves it.
			pe.knownGen = meta.Gen
		}
		p.peers[id] = pe
		p.order = append(p.order, id)
		// After a crash the regions of the activity log may differ between
		// this node and every replica: resync them all.
		if len(meta.AL) > 0 {
			pm := meta.Peers[id]
			if pm == nil && pe.inISR {
				pm = &PeerMeta{Base: meta.Gen, Dirty: NewBitmap(meta.Regions())}
				meta.Peers[id] = pm
			}
			if pm != nil {
				for _, r := range meta.AL {
					pm.Dirty.Set(r)
				}
			}
		}
	}
	sort.Strings(p.order)
	p.persistMeta = true
	return p, nil
}

// Meta is the current metadata (read-only for callers).
func (p *Primary) Meta() *Meta { return p.meta }

// Epoch is the primary's epoch.
func (p *Primary) Epoch() uint64 { return p.meta.Epoch }

// Fenced reports why the primary stopped (stale epoch), or nil.
func (p *Primary) Fenced() error { return p.fenced }

// HasReady reports whether Ready would return anything.
func (p *Primary) HasReady() bool { return p.persistMeta || p.persistAL || !p.rd.Empty() }

// Ready returns and clears the accumulated outputs; see Ready's doc for the
// order in which the shell must carry them out.
func (p *Primary) Ready() Ready {
	rd := p.rd
	p.rd = Ready{}
	if p.persistMeta {
		rd.Persist = p.meta.Clone()
		rd.PersistMeta = true
		p.persistMeta = false
	} else if p.persistAL {
		// Only the activity log is needed: skip copying the bitmaps.
		rd.Persist = &Meta{Volume: p.meta.Volume, Size: p.meta.Size, RegionSize: p.meta.RegionSize,
			Epoch: p.meta.Epoch, Gen: p.meta.Gen, AL: slices.Clone(p.meta.AL)}
	}
	rd.PersistAL = p.persistAL
	p.persistAL = false
	return rd
}

func (p *Primary) nextID() uint64 { p.next++; return p.next }

func (p *Primary) regionsOf(lo, hi int64) (uint64, uint64) {
	rs := p.meta.RegionSize
	return uint64(lo / rs), uint64((hi - 1) / rs)
}

func (p *Primary) regionRange(r uint64) (int64, int64) {
	lo := int64(r) * p.meta.RegionSize
	hi := min(lo+p.meta.RegionSize, p.meta.Size)
	return lo, hi
}

// Propose starts a request from the initiator.
func (p *Primary) Propose(r Request) {
	if p.fenced != nil {
		p.rd.Acks = append(p.rd.Acks, Ack{ID: r.ID, Err: p.fenced})
		return
	}
	o := &op{token: p.nextID(), kind: opUser, req: r}
	switch r.Kind {
	case ReqWrite:
		o.lo, o.hi = r.Off, r.Off+int64(len(r.Data))
	case ReqUnmap:
		o.lo, o.hi = r.Off, r.Off+r.Len
	}
	p.ops[o.token] = o
	if p.holding() || len(p.held) > 0 {
		o.tick = p.ticks
		p.held = append(p.held, o)
		return
	}
	p.enqueue(o)
}

// holding reports whether user requests must wait: this node is fresh and
// some ISR member has not completed a handshake yet. The first write clears
// Fresh, after which nothing could tell this node's empty copy from the
// volume's data any more; until every ISR member has shown that it was not
// written either (or has left the ISR), the write waits.
func (p *Primary) holding() bool {
	if !p.meta.Fresh {
		return false
	}
	for _, id := range p.order {
		if pe := p.peers[id]; pe.inISR && !pe.removing && !pe.verified {
			return true
		}
	}
	return false
}

// Holding reports whether user requests are held (see holding); the shell
// holds reads as long, so a diverged node serves no zeros before it knows.
func (p *Primary) Holding() bool { return p.fenced == nil && p.holding() }

// releaseHeld issues the held requests, in order, once holding is over.
func (p *Primary) releaseHeld() {
	if len(p.held) == 0 || p.fenced != nil || p.holding() {
		return
	}
	held := p.held
	p.held = nil
	for _, o := range held {
		p.enqueue(o)
	}
}

func (p *Primary) overlapsActive(o *op) bool {
	if o.lo == o.hi {
		return false
	}
	for _, a := range p.active {
		if a.lo < o.hi && o.lo < a.hi {
			return true
		}
	}
	return false
}

func (p *Primary) enqueue(o *op) {
	if len(p.queue) == 0 && !p.overlapsActive(o) && p.alRoom(o) {
		p.issue(o)
		return
	}
	p.queue = append(p.queue, o)
	p.drainQueue()
}

// drainQueue issues queued ops in order; an op waits while it overlaps an
// active op or an earlier queued one, so overlapping writes reach every
// replica in the order they were proposed.
func (p *Primary) drainQueue() {
	var keep []*op
	for _, o := range p.queue {
		blocked := p.overlapsActive(o)
		for _, k := range keep {
			if k.lo < o.hi && o.lo < k.hi {
				blocked = true
			}
		}
		blocked = blocked || !p.alRoom(o)
		if blocked {
			keep = append(keep, o)
			continue
		}
		p.issue(o)
	}
	p.queue = keep
}

func (p *Primary) send(to string, m Message) uint64 {
	m.Epoch = p.meta.Epoch
	if p.meta.Fresh {
		// This node holds only zeros: nothing it sends makes a fresh
		// replica less fresh.
		m.Flags |= FlagFresh
	}
	if m.Seq == 0 && m.Type != MsgHello {
		m.Seq = p.nextID()
	}
	p.rd.Send = append(p.rd.Send, Envelope{To: to, Msg: m})
	return m.Seq
}

func (p *Primary) markDirty(id string, lo, hi int64) {
	pm := p.meta.Peers[id]
	if pm == nil {
		pe := p.peers[id]
		pm = &PeerMeta{Base: pe.knownGen, Dirty: NewBitmap(p.meta.Regions())}
		p.meta.Peers[id] = pm
	}
	if hi <= lo {
		return
	}
	a, b := p.regionsOf(lo, hi)
	for r := a; r <= b; r++ {
		// Dirty again: a copy made before does not count any more.
		delete(p.peers[id].copied, r)
		if pm.Dirty.Set(r) {
			p.persistMeta = true
			p.peers[id].total += p.regionLen(r)
		}
	}
}

func (p *Primary) regionLen(r uint64) int64 { lo, hi := p.regionRange(r); return hi - lo }

// alStreamWindow is how many of the most recently used activity-log entries
// are searched for a write's preceding region to recognise a sequential
// stream (several concurrent streams each keep theirs near the end).
const alStreamWindow = 8

func (p *Primary) touchAL(lo, hi int64) {
	a, b := p.regionsOf(lo, hi)
	changed := false
	var prefetched []uint64
	p.clock++
	for r := a; r <= b; r++ {
		p.alRefs[r]++
		p.unflushed[r] = p.clock
		if i := slices.Index(p.meta.AL, r); i >= 0 {
			p.meta.AL = append(slices.Delete(p.meta.AL, i, i+1), r)
			continue
		}
		stream := r > 0 && slices.Contains(p.meta.AL[max(0, len(p.meta.AL)-alStreamWindow):], r-1)
		p.meta.AL = append(p.meta.AL, r)
		changed = true
		if stream {
			for q := r + 1; q < r+uint64(p.cfg.ALPrefetch) && q < p.meta.Regions(); q++ {
				if !slices.Contains(p.meta.AL, q) {
					p.meta.AL = append(p.meta.AL, q)
					prefetched = append(prefetched, q)
				}
			}
		}
	}
	if !changed {
		return
	}
	// Evict the least recently used regions beyond the slot count that are
	// idle and flushed everywhere (evictable).
	for i := 0; len(p.meta.AL) > p.cfg.ALSlots && i < len(p.meta.AL); {
		if p.evictable(p.meta.AL[i]) {
			p.meta.AL = slices.Delete(p.meta.AL, i, i+1)
			continue
		}
		i++
	}
	// Prefetched regions are only a saving: give them up first when the
	// log is full of regions that may not leave yet.
	for len(p.meta.AL) > p.cfg.ALSlots && len(prefetched) > 0 {
		q := prefetched[len(prefetched)-1]
		prefetched = prefetched[:len(prefetched)-1]
		if i := slices.Index(p.meta.AL, q); i >= 0 {
			p.meta.AL = slices.Delete(p.meta.AL, i, i+1)
		}
	}
	p.persistAL = true
	// Flush ahead of need, so that writes to new regions rarely wait for
	// one, and in steps of a quarter of the log, so that each flush has
	// little to write back (a flush of a whole log's worth of dirty pages
	// stalled a 128 KiB stream for tens of milliseconds): once the log is
	// half full and a quarter of it is unflushed.
	if step := max(1, p.cfg.ALSlots/4); len(p.meta.AL) >= p.cfg.ALSlots/2 && len(p.unflushed) >= step {
		p.startALFlush()
	}
	// Replicas keep a copy so that, if this node dies, whichever of them is
	// promoted knows which regions may differ among the survivors.
	for _, id := range p.order {
		if p.peers[id].mode == peerUp {
			p.send(id, Message{Type: MsgAL, Regions: slices.Clone(p.meta.AL)})
		}
	}
}

// evictable reports whether region r may leave the activity log: no write
// to it is in flight and a flush that covers its last write has completed
// on this node and on every replica connected then.
func (p *Primary) evictable(r uint64) bool {
	_, dirty := p.unflushed[r]
	return p.alRefs[r] == 0 && !dirty
}

// alRoom reports whether user op o can be issued without the activity log
// growing beyond its slots plus the regions with writes in flight (those
// may overflow it for a moment, as they always could: they leave as soon as
// they are idle and flushed). If not, the log is held by idle regions still
// waiting for a flush: o waits in the queue for one, which is started here.
// With nothing a flush could free, o goes ahead.
func (p *Primary) alRoom(o *op) bool {
	if o.kind != opUser || o.hi <= o.lo || (o.req.Kind != ReqWrite && o.req.Kind != ReqUnmap) {
		return true
	}
	a, b := p.regionsOf(o.lo, o.hi)
	need := 0
	for r := a; r <= b; r++ {
		if !slices.Contains(p.meta.AL, r) {
			need++
		}
	}
	if need == 0 {
		return true
	}
	free, unflushedIdle := p.cfg.ALSlots-len(p.meta.AL), 0
	for _, r := range p.meta.AL {
		_, unflushed := p.unflushed[r]
		switch {
		case p.alRefs[r] > 0:
			free++ // in flight: may overflow the log
		case !unflushed:
			free++ // evictable
		default:
			unflushedIdle++
		}
	}
	if need <= free || unflushedIdle == 0 {
		return true
	}
	p.startALFlush()
	return false
}

// startALFlush issues a flush on this node and every connected replica
// that, once complete, lets the activity-log regions idle now leave the
// log. At most one is in flight; another starts when one is needed again.
func (p *Primary) startALFlush() {
	if p.alFlush != nil || p.fenced != nil {
		return
	}
	var regions []uint64
	for r := range p.unflushed {
		if p.alRefs[r] == 0 {
			regions = append(regions, r)
		}
	}
	if len(regions) == 0 {
		return // everything unflushed has writes in flight: their release retries
	}
	slices.Sort(regions)
	o := &op{token: p.nextID(), kind: opFlush, regions: regions, cut: p.clock}
	p.ops[o.token] = o
	p.alFlush = o
	p.issue(o)
}

// startResyncFlush asks peer pe to make the resync chunks it acknowledged
// durable, after which their dirty bits clear.
func (p *Primary) startResyncFlush(pe *peer) {
	if pe.syncFlush != nil || len(pe.copied) == 0 || pe.mode != peerUp || p.fenced != nil {
		return
	}
	regions := make([]uint64, 0, len(pe.copied))
	for r := range pe.copied {
		regions = append(regions, r)
	}
	slices.Sort(regions)
	o := &op{token: p.nextID(), kind: opFlush, peer: pe.id, regions: regions, cut: p.clock}
	p.ops[o.token] = o
	pe.syncFlush = o
	p.issue(o)
}

// finishFlush applies a completed opFlush.
func (p *Primary) finishFlush(o *op) {
	if o.peer == "" {
		p.alFlush = nil
		if o.lerr != nil {
			return
		}
		// Replicas that went down meanwhile did not flush, but they keep
		// the log copy that names these regions (the one without them is
		// sent only to connected replicas) and report it when they return.
		for _, r := range o.regions {
			if c, ok := p.unflushed[r]; ok && c <= o.cut {
				delete(p.unflushed, r)
			}
		}
		return
	}
	pe := p.peers[o.peer]
	if pe.syncFlush == o {
		pe.syncFlush = nil
	}
	if !o.acked[o.peer] {
		return // the peer went down: the bits stay, the regions are copied again
	}
	pm := p.meta.Peers[o.peer]
	for _, r := range o.regions {
		if c, ok := pe.copied[r]; ok && c <= o.cut {
			delete(pe.copied, r)
			if pm != nil && pm.Dirty.Test(r) {
				pm.Dirty.Clear(r)
				p.persistMeta = true
			}
		}
	}
}

func (p *Primary) issue(o *op) {
	o.issued = true
	o.tick = p.ticks
	o.acked = make(map[string]bool)
	o.sent = make(map[string]uint64)
	o.need = make(map[string]bool)
	p.active = append(p.active, o)
	switch o.kind {
	case opUser:
		p.issueUser(o)
	case opResync:
		p.rd.Local = append(p.rd.Local, LocalOp{Token: o.token, Kind: LocalRead, Off: o.lo, Len: o.hi - o.lo})
	case opFlush:
		if o.peer != "" {
			o.local = true
			p.track(o, o.peer, p.send(o.peer, Message{Type: MsgFlush}))
			break
		}
		p.rd.Local = append(p.rd.Local, LocalOp{Token: o.token, Kind: LocalFlush})
		for _, id := range p.order {
			if p.peers[id].mode == peerUp {
				p.track(o, id, p.send(id, Message{Type: MsgFlush}))
			}
		}
	case opVerify:
		p.rd.Local = append(p.rd.Local, LocalOp{Token: o.token, Kind: LocalSum, Off: o.lo, Len: o.hi - o.lo})
		o.sums = make(map[string][]byte)
		for _, id := range p.order {
			pe := p.peers[id]
			if pe.inISR && pe.mode == peerUp && !pe.removing {
				p.track(o, id, p.send(id, Message{Type: MsgChecksum, Off: o.lo, Len: o.hi - o.lo}))
			}
		}
	}
	p.check(o)
}

func (p *Primary) issueUser(o *op) {
	r := o.req
	if p.meta.Fresh && (r.Kind == ReqWrite || r.Kind == ReqUnmap) {
		// Durable before this write is issued anywhere (PersistMeta): a
		// fresh replica must never again be taken as identical to us.
		p.meta.Fresh = false
		p.persistMeta = true
	}
	var m Message
	var lop LocalOp
	switch r.Kind {
	case ReqWrite:
		p.touchAL(o.lo, o.hi)
		m = Message{Type: MsgWrite, Off: r.Off, Data: r.Data, Hold: r.Hold}
		if r.FUA {
			m.Flags |= FlagFUA
		}
		lop = LocalOp{Kind: LocalWrite, Off: r.Off, Len: int64(len(r.Data)), Data: r.Data, FUA: r.FUA, Hold: r.Hold}
	case ReqUnmap:
		p.touchAL(o.lo, o.hi)
		m = Message{Type: MsgUnmap, Off: r.Off, Len: r.Len}
		lop = LocalOp{Kind: LocalUnmap, Off: r.Off, Len: r.Len}
	case ReqFlush:
		m = Message{Type: MsgFlush}
		lop = LocalOp{Kind: LocalFlush}
	case ReqResize:
		m = Message{Type: MsgResize, Len: r.Len}
		lop = LocalOp{Kind: LocalResize, Len: r.Len}
	}
	lop.Token = o.token
	p.rd.Local = append(p.rd.Local, lop)
	for _, id := range p.order {
		pe := p.peers[id]
		if pe.inISR {
			o.need[id] = true
		}
		// Flushes matter only to ISR members; everything else also goes to
		// a resyncing replica so it converges while the volume is busy.
		if pe.mode == peerUp && (r.Kind != ReqFlush || pe.inISR) {
			seq := p.send(id, m)
			// The initiator does not wait for a replica outside the ISR,
			// so neither may the caller's buffer.
			p.rd.Send[len(p.rd.Send)-1].Copy = !pe.inISR && m.Hold != nil
			p.track(o, id, seq)
		} else if o.hi > o.lo {
			p.markDirty(id, o.lo, o.hi)
		}
	}
}

// check acknowledges and releases o when its conditions hold.
func (p *Primary) check(o *op) {
	if !o.issued || o.release {
		return
	}
	switch o.kind {
	case opUser:
		if !o.done && o.local {
			ok := true
			if o.lerr == nil {
				for id := range o.need {
					if p.isr[id] && !o.acked[id] {
						ok = false
					}
				}
			}
			if ok {
				o.done = true
				p.rd.Acks = append(p.rd.Acks, Ack{ID: o.req.ID, Err: o.lerr})
				if o.req.Kind == ReqResize && o.lerr == nil {
					p.grow(o.req.Len)
				}
			}
		}
		if o.done && p.allSentAcked(o) {
			p.releaseOp(o)
		}
	case opResync:
		if o.local && p.allSentAcked(o) {
			p.releaseOp(o)
		}
	case opVerify:
		if o.local && p.allSentAcked(o) {
			p.finishVerify(o)
			p.releaseOp(o)
		}
	case opGen:
		if p.allSentAcked(o) {
			p.releaseOp(o)
			p.afterGen(o)
		}
	case opFlush:
		if o.local && p.allSentAcked(o) {
			p.finishFlush(o)
			p.releaseOp(o)
		}
	}
}

// track records that o's message seq went to id now: its ack is awaited,
// and the ack timeout runs from this tick (a resync chunk is sent only after
// its local read, which may have waited on the rate limit).
func (p *Primary) track(o *op, id string, seq uint64) {
	o.sent[id] = seq
	o.acked[id] = false
	p.bySeq[seq] = o
	if o.sentAt == nil {
		o.sentAt = make(map[string]int)
	}
	o.sentAt[id] = notSent
	p.rd.stamps = append(p.rd.stamps, stamp{o, id})
}

// notSent marks an awaited ack whose message the shell has not sent yet
// (Sent): no ack timeout runs for it.
const notSent = -1

// Sent reports that rd's messages were handed to their connections now: the
// ack timeout of each runs from this tick; until then none runs (the shell
// may hold a Ready while its Persist is made durable). A message whose
// connection has died meanwhile is not awaited any more and stays so.
func (p *Primary) Sent(rd Ready) {
	for _, s := range rd.stamps {
		if _, ok := s.o.sentAt[s.id]; ok {
			s.o.sentAt[s.id] = p.ticks
		}
	}
}

func (p *Primary) allSentAcked(o *op) bool {
	for id, ok := range o.acked {
		if !ok && p.peers[id].mode == peerUp {
			return false
		}
	}
	return true
}

func (p *Primary) releaseOp(o *op) {
	o.release = true
	delete(p.ops, o.token)
	for _, seq := range o.sent {
		delete(p.bySeq, seq)
	}
	if i := slices.Index(p.active, o); i >= 0 {
		p.active = slices.Delete(p.active, i, i+1)
	}
	if o.kind == opUser && o.hi > o.lo && (o.req.Kind == ReqWrite || o.req.Kind == ReqUnmap) {
		a, b := p.regionsOf(o.lo, o.hi)
		for r := a; r <= b; r++ {
			p.alRefs[r]--
		}
	}
	if o.kind == opResync {
		p.peers[o.peer].inflight--
	}
	p.drainQueue()
	p.pumpResync()
}

func (p *Primary) grow(size int64) {
	if size <= p.meta.Size {
		return
	}
	p.meta.Size = size
	n := p.meta.Regions()
	for _, pm := range p.meta.Peers {
		pm.Dirty.Grow(n)
	}
	p.persistMeta = true
}

// LocalDone reports the outcome of a LocalOp. data is the region read for
// LocalRead, or the checksum for LocalSum.
func (p *Primary) LocalDone(token uint64, err error, data []byte) {
	o := p.ops[token]
	if o == nil || o.local {
		return
	}
	o.local = true
	if err != nil {
		err = fmt.Errorf("%w: %w", ErrLocalDisk, err)
		o.lerr = err
		if p.diskErr == nil {
			p.diskErr = err
			p.rd.Unhealthy = err
		}
	}
	switch o.kind {
	case opResync:
		pe := p.peers[o.peer]
		if err == nil && pe.mode == peerUp {
			seq := p.send(o.peer, Message{Type: MsgWrite, Flags: FlagResync, Off: o.lo, Data: data})
			p.track(o, o.peer, seq)
		}
	case opVerify:
		o.sums[p.cfg.Self] = data
	}
	p.check(o)
}

// PeerConnected reports a fresh connection to peer: the handshake starts.
func (p *Primary) PeerConnected(id string) {
	pe := p.peers[id]
	if pe == nil || p.fenced != nil {
		return
	}
	pe.mode = peerHello
	p.send(id, Message{Type: MsgHello, Volume: p.meta.Volume, From: p.cfg.Self, Gen: p.meta.Gen, Len: p.meta.Size})
}

// PeerDown reports that peer is unreachable, timed out or failed an I/O.
// Writes it missed are marked dirty; if it is in the ISR its removal is
// started and writes wait until the removal commits.
func (p *Primary) PeerDown(id string, reason error) {
	pe := p.peers[id]
	if pe == nil {
		return
	}
	if reason != nil {
		pe.lastErr = reason.Error()
	}
	wasUp := pe.mode != peerDown
	pe.mode = peerDown
	pe.adding = false
	// Copies it had not made durable may be lost: their bits stay.
	pe.copied = nil
	if wasUp {
		p.rd.Disconnect = append(p.rd.Disconnect, id)
	}
	if p.fenced != nil {
		// Nothing waits any more, and a stopped primary must not change
		// the ISR or the generation: a diverged one would take the ISR
		// member holding the data out of it, and with it the node the
		// volume has to move to.
		return
	}
	for _, o := range slices.Clone(p.active) {
		if seq, ok := o.sent[id]; ok && !o.acked[id] {
			delete(p.bySeq, seq)
			// The message died with the connection: nothing may wait for
			// its ack any more, in particular not a later connection
			// (which would otherwise be timed out for a message it never
			// received).
			delete(o.sent, id)
			delete(o.acked, id)
			delete(o.sentAt, id)
			if o.kind == opUser && o.hi > o.lo {
				p.markDirty(id, o.lo, o.hi)
			}
		}
	}
	// A fresh primary does not give up at once on an ISR member it has not
	// heard from: that member may hold data this node lacks (ErrDiverged),
	// and a refused dial (its server restarting) must not be enough to
	// drop it and serve zeros. It is removed after the ack timeout (Tick).
	if pe.inISR && !pe.removing && !(p.meta.Fresh && !pe.verified) {
		p.startRemoval(id)
	}
	for _, o := range slices.Clone(p.active) {
		p.check(o)
	}
}

// startRemoval begins taking id out of the ISR: dirty tracking for it starts
// and the generation moves on (told to the remaining ISR members first), so
// that id's old generation can later be matched against this bitmap.
func (p *Primary) startRemoval(id string) {
	pe := p.peers[id]
	pe.removing = true
	p.markDirty(id, 0, 0)
	if pm := p.meta.Peers[id]; pm.Dirty.Count() == 0 || pm.Base == 0 {
		pm.Base = pe.knownGen
	}
	p.meta.Gen = p.cfg.NewGen()
	p.persistMeta = true
	g := &op{token: p.nextID(), kind: opGen, addGen: p.meta.Gen, tick: p.ticks}
	p.ops[g.token] = g
	g.issued = true
	g.acked = make(map[string]bool)
	g.sent = make(map[string]uint64)
	p.active = append(p.active, g)
	for _, oid := range p.order {
		o := p.peers[oid]
		if o.inISR && !o.removing && o.mode != peerUp {
			// An ISR member still connecting keeps the old generation:
			// track from here so its handshake is incremental, not a
			// full sync.
			p.markDirty(oid, 0, 0)
		}
		if o.inISR && !o.removing && o.mode == peerUp {
			seq := p.send(oid, Message{Type: MsgGen, Gen: g.addGen})
			p.track(g, oid, seq)
		}
	}
	p.check(g)
	p.releaseHeld()
}

func (p *Primary) afterGen(g *op) {
	if g.forAdd {
		pe := p.peers[g.peer]
		if pe.mode == peerUp && g.acked[g.peer] && !pe.inISR && p.dirtyBytes(g.peer) == 0 && p.meta.Gen == g.addGen {
			pe.adding = true
			p.rd.Propose = append(p.rd.Propose, Proposal{Kind: ProposeAdd, Peer: g.peer, Epoch: p.meta.Epoch,
				Proof: CatchUp{PrimaryGen: p.meta.Gen, ReplicaGen: pe.knownGen}})
		}
		return
	}
	for _, id := range p.order {
		pe := p.peers[id]
		if pe.removing && !pe.proposed {
			pe.proposed = true
			p.rd.Propose = append(p.rd.Propose, Proposal{Kind: ProposeRemove, Peer: id, Epoch: p.meta.Epoch})
		}
	}
}

func (p *Primary) dirtyBytes(id string) int64 {
	pm := p.meta.Peers[id]
	if pm == nil {
		return 0
	}
	var n int64
	for _, r := range pm.Dirty.Bits() {
		n += p.regionLen(r)
	}
	return n
}

// MembershipResult feeds back the outcome of a Proposal.
func (p *Primary) MembershipResult(pr Proposal, st MembershipState, err error) {
	pe := p.peers[pr.Peer]
	if err != nil {
		if errors.Is(err, ErrStaleEpoch) || errors.Is(err, ErrNotPrimary) {
			p.fence(err)
			return
		}
		// Anything else (e.g. a replica that fell behind again) is retried
		// by the next event that needs it.
		if pr.Kind == ProposeRemove {
			pe.proposed = false
			p.afterGen(&op{})
		} else {
			pe.adding = false
			p.pumpResync()
		}
		return
	}
	for _, id := range p.order {
		in := st.InISR(id)
		q := p.peers[id]
		if in && !q.inISR {
			q.inISR, q.adding = true, false
			q.knownGen = p.meta.Gen
			if pm := p.meta.Peers[id]; pm != nil && pm.Dirty.Count() == 0 {
				delete(p.meta.Peers, id)
				p.persistMeta = true
			}
			// In-flight writes already sent to it now need its ack too.
			for _, o := range p.active {
				if _, ok := o.sent[id]; ok && o.kind == opUser {
					o.need[id] = true
				}
			}
			if q.mode != peerUp || p.dirtyBytes(id) > 0 {
				p.startRemoval(id)
			}
		}
		if !in && q.inISR {
			q.inISR, q.removing, q.proposed = false, false, false
		}
		p.isr[id] = q.inISR
	}
	// A peer whose resync finished while its removal was still being
	// committed was skipped by pumpResync then; only now may it be
	// proposed for re-adding, and on an idle volume nothing else would
	// look at it again.
	p.pumpResync()
	for _, o := range slices.Clone(p.active) {
		p.check(o)
	}
	p.releaseHeld()
}

func (p *Primary) fence(err error) {
	if p.fenced != nil {
		return
	}
	p.fenced = fmt.Errorf("replication: primary %s at epoch %d fenced: %w", p.cfg.Self, p.meta.Epoch, err)
	for _, o := range append(append(slices.Clone(p.active), p.queue...), p.held...) {
		if o.kind == opUser && !o.done {
			o.done = true
			p.rd.Acks = append(p.rd.Acks, Ack{ID: o.req.ID, Err: p.fenced})
		}
	}
	p.active, p.queue, p.held = nil, nil, nil
	for _, id := range p.order {
		if p.peers[id].mode != peerDown {
			p.peers[id].mode = peerDown
			p.rd.Disconnect = append(p.rd.Disconnect, id)
		}
	}
}

// Step handles a message from a replica.
func (p *Primary) Step(from string, m Message) {
	pe := p.peers[from]
	if pe == nil || pe.mode == peerDown || p.fenced != nil {
		return
	}
	switch m.Type {
	case MsgReject:
		if m.Epoch > p.meta.Epoch {
			p.fence(fmt.Errorf("%w: %s has seen epoch %d", ErrStaleEpoch, from, m.Epoch))
			return
		}
		p.PeerDown(from, fmt.Errorf("replication: %s rejected: %s", from, m.Err))
	case MsgHelloAck:
		if pe.mode == peerHello {
			p.handshake(pe, m)
		}
	case MsgAck:
		o := p.bySeq[m.Seq]
		if o == nil {
			return
		}
		if m.Err != "" {
			p.PeerDown(from, fmt.Errorf("replication: %s: %s", from, m.Err))
			return
		}
		o.acked[from] = true
		delete(p.bySeq, m.Seq)
		switch o.kind {
		case opResync:
			if pm := p.meta.Peers[from]; pm != nil && pm.Dirty.Test(o.region) {
				// The copy may still be only in the replica's volatile
				// cache: its bit clears once a flush there covers it
				// (finishFlush), in batches.
				if pe.copied == nil {
					pe.copied = make(map[uint64]uint64)
				}
				p.clock++
				pe.copied[o.region] = p.clock
				pe.done += o.hi - o.lo
			}
		case opVerify:
			o.sums[from] = m.Data
		case opGen:
			pe.knownGen = o.addGen
		}
		p.check(o)
	}
}

func (p *Primary) handshake(pe *peer, m Message) {
	id := pe.id
	pm := p.meta.Peers[id]
	// A replica still fresh from creation holds zeros: it matches this
	// node's lineage only while this node is fresh too.
	staleFresh := m.Flags&FlagFresh != 0 && !p.meta.Fresh
	// The converse: this node is fresh, yet a replica of its lineage (an
	// ISR member, or one at its generation) has been written. The writes
	// came from a primary this node followed, so this node's zeros are not
	// the volume's data: its own copy was lost and recreated (say, a
	// replaced disk given the creation generation). Taking the replica as
	// in sync would serve zeros over its data, syncing would destroy it.
	// Generation 0 is a new replica of unknown contents, not written data.
	if p.meta.Fresh && m.Flags&FlagFresh == 0 && m.Gen != 0 && (pe.inISR || m.Gen == p.meta.Gen) {
		p.diverged(pe, m)
		return
	}
	pe.verified = true
	switch {
	case staleFresh:
		p.fullSync(pe)
	case m.Gen != 0 && pm != nil && m.Gen == pm.Base:
		// Incremental: the bitmap kept since it left, plus whatever the
		// replica's activity log says may differ.
	case m.Gen != 0 && pe.inISR && !pe.removing && m.Gen == p.meta.Gen:
		// Same lineage and in the ISR: only activity-log regions (its own
		// and those recorded here after a crash) may differ.
		if pm == nil {
			p.markDirty(id, 0, 0)
		}
		p.meta.Peers[id].Base = m.Gen
	default:
		p.fullSync(pe)
	}
	// An ISR member that missed a write still waiting for it cannot catch
	// up in place: that write would wait on a resync that waits on it.
	for _, o := range p.active {
		if _, sent := o.sent[id]; o.need[id] && !sent && pe.inISR && !pe.removing {
			p.startRemoval(id)
		}
	}
	pm = p.meta.Peers[id]
	for _, r := range m.Regions {
		if pm.Dirty.Set(r) {
			p.persistMeta = true
		}
	}
	if pe.knownGen == 0 {
		pe.knownGen = m.Gen
	}
	pe.mode = peerUp
	pe.cursor = 0
	pe.copied = nil
	pe.done, pe.total = 0, p.dirtyBytes(id)
	if m.Len < p.meta.Size {
		p.send(id, Message{Type: MsgResize, Len: p.meta.Size})
	}
	p.send(id, Message{Type: MsgAL, Regions: slices.Clone(p.meta.AL)})
	p.pumpResync()
	p.releaseHeld()
}

// diverged stops this primary for good: its own replica lacks data that
// peer pe holds. Nothing is sent to pe (it keeps its data untouched), every
// request fails, and the shell reports the node unhealthy so the cluster
// moves the volume to a node that has the data.
func (p *Primary) diverged(pe *peer, m Message) {
	err := fmt.Errorf("%w: %s is fresh here at generation %x, peer %s has been written at generation %x",
		ErrDiverged, p.meta.Volume, p.meta.Gen, pe.id, m.Gen)
	pe.lastErr = err.Error()
	if p.diskErr == nil {
		p.diskErr = err
		p.rd.Unhealthy = err
	}
	p.fence(err)
}

// fullSync starts a full sync of a replica of unknown lineage. The replica
// is first given a new generation that this bitmap is relative to, so an
// interrupted full sync resumes instead of restarting.
func (p *Primary) fullSync(pe *peer) {
	id := pe.id
	if pe.inISR && !pe.removing {
		p.startRemoval(id)
	}
	base := p.cfg.NewGen()
	pm := &PeerMeta{Base: base, Dirty: NewBitmap(p.meta.Regions())}
	pm.Dirty.SetAll()
	p.meta.Peers[id] = pm
	p.persistMeta = true
	p.send(id, Message{Type: MsgGen, Gen: base})
	pe.knownGen = base
	pe.done, pe.total = 0, p.dirtyBytes(id)
}

// pumpResync starts resync chunks for connected peers with dirty regions,
// and proposes a caught-up replica for the ISR.
func (p *Primary) pumpResync() {
	if p.fenced != nil {
		return
	}
	for _, id := range p.order {
		pe := p.peers[id]
		pm := p.meta.Peers[id]
		if pe.mode != peerUp || pm == nil {
			continue
		}
		for pe.inflight < p.cfg.ResyncWindow {
			r, ok := p.nextResyncRegion(pe, pm)
			if !ok {
				break
			}
			lo, hi := p.regionRange(r)
			o := &op{token: p.nextID(), kind: opResync, peer: id, region: r, lo: lo, hi: hi}
			p.ops[o.token] = o
			pe.inflight++
			p.issue(o)
		}
		// One flush on the replica per batch of copied regions, and one
		// when nothing more is being copied.
		if len(pe.copied) >= resyncFlushBatch || (len(pe.copied) > 0 && pe.inflight == 0) {
			p.startResyncFlush(pe)
		}
		if pe.inflight == 0 && pm.Dirty.Count() == 0 && !pe.inISR && !pe.adding && !pe.removing {
			// Caught up: install the current generation, then ask to rejoin.
			pe.adding = true
			g := &op{token: p.nextID(), kind: opGen, addGen: p.meta.Gen, forAdd: true, peer: id, issued: true, tick: p.ticks,
				acked: map[string]bool{id: false}, sent: map[string]uint64{}}
			p.ops[g.token] = g
			p.active = append(p.active, g)
			m := Message{Type: MsgGen, Gen: g.addGen}
			if p.meta.Fresh {
				// The replica now holds exactly this node's zeros.
				m.Flags |= FlagSynced
			}
			seq := p.send(id, m)
			p.track(g, id, seq)
		}
	}
}

// resyncFlushBatch is how many copied regions a resyncing replica makes
// durable with one flush (64 MiB at the default region size).
const resyncFlushBatch = 64

func (p *Primary) nextResyncRegion(pe *peer, pm *PeerMeta) (uint64, bool) {
	n := pm.Dirty.Len()
	start := pe.cursor
	for scanned := uint64(0); scanned < n; {
		r, ok := pm.Dirty.Next(pe.cursor)
		if !ok {
			if pe.cursor == 0 {
				return 0, false
			}
			scanned += n - pe.cursor
			pe.cursor = 0
			continue
		}
		scanned += r - pe.cursor + 1
		pe.cursor = r + 1
		if pe.cursor >= n {
			pe.cursor = 0
		}
		if _, ok := pe.copied[r]; ok {
			if pe.cursor == start {
				break
			}
			continue // copied, waiting for its flush
		}
		lo, hi := p.regionRange(r)
		probe := &op{lo: lo, hi: hi}
		busy := p.overlapsActive(probe)
		for _, q := range p.queue {
			if q.lo < hi && lo < q.hi {
				busy = true
			}
		}
		if !busy {
			return r, true
		}
		if pe.cursor == start {
			break
		}
	}
	return 0, false
}

// Verify compares region r on the primary and every connected ISR member.
// With repair, mismatching replicas get the region copied from the primary.
// The result appears in Ready.Verified with the returned token.
func (p *Primary) Verify(r uint64, repair bool) uint64 {
	lo, hi := p.regionRange(r)
	o := &op{token: p.nextID(), kind: opVerify, region: r, lo: lo, hi: hi, repair: repair}
	p.ops[o.token] = o
	if p.fenced != nil || r >= p.meta.Regions() {
		p.rd.Verified = append(p.rd.Verified, VerifyResult{Token: o.token, Region: r, Err: fmt.Errorf("replication: cannot verify region %d", r)})
		delete(p.ops, o.token)
		return o.token
	}
	p.enqueue(o)
	return o.token
}

func (p *Primary) finishVerify(o *op) {
	res := VerifyResult{Token: o.token, Region: o.region, Err: o.lerr}
	mine := o.sums[p.cfg.Self]
	for _, id := range p.order {
		if _, asked := o.acked[id]; !asked {
			if p.peers[id].inISR {
				res.Skipped = append(res.Skipped, id)
			}
			continue
		}
		s, ok := o.sums[id]
		if !ok {
			res.Skipped = append(res.Skipped, id)
			continue
		}
		if o.lerr == nil && string(s) != string(mine) {
			res.Mismatch = append(res.Mismatch, id)
			if o.repair {
				p.markDirty(id, o.lo, o.hi)
			}
		}
	}
	p.rd.Verified = append(p.rd.Verified, res)
}

// Tick advances the logical clock; peers that leave a message unanswered for
// AckTimeoutTicks are treated as down.
func (p *Primary) Tick() {
	p.ticks++
	if p.cfg.AckTimeoutTicks <= 0 || p.fenced != nil {
		return
	}
	late := map[string]string{} // peer → what it left unanswered
	for _, o := range p.active {
		for id, ok := range o.acked {
			at, sent := o.sentAt[id]
			if d := p.ticks - at; !ok && sent && at != notSent && p.peers[id].mode == peerUp && d >= p.cfg.AckTimeoutTicks && late[id] == "" {
				late[id] = fmt.Sprintf("%s unanswered for %d ticks", o.describe(), d)
			}
		}
		if p.ticks-o.tick < p.cfg.AckTimeoutTicks {
			continue
		}
		// An ISR member that is not even connected holds up every write.
		for id := range o.need {
			pe := p.peers[id]
			if _, sent := o.sent[id]; !sent && pe.inISR && !pe.removing && late[id] == "" {
				late[id] = fmt.Sprintf("%s waiting %d ticks for it to connect", o.describe(), p.ticks-o.tick)
			}
		}
	}
	// A fresh primary holds requests (and its shell reads) for an
	// unverified ISR member; one that has not connected within the ack
	// timeout leaves the ISR, as if it had left a write unanswered.
	var unverified []string
	if p.holding() && p.ticks >= p.cfg.AckTimeoutTicks {
		for _, id := range p.order {
			if pe := p.peers[id]; pe.inISR && !pe.removing && !pe.verified && pe.mode != peerUp && late[id] == "" {
				late[id] = fmt.Sprintf("fresh primary waited %d ticks for it to connect", p.ticks)
				unverified = append(unverified, id)
			}
		}
	}
	ids := make([]string, 0, len(late))
	for id := range late {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		p.PeerDown(id, fmt.Errorf("replication: ack timeout: %s", late[id]))
	}
	for _, id := range unverified {
		if pe := p.peers[id]; pe.inISR && !pe.removing && p.fenced == nil {
			p.startRemoval(id)
			p.releaseHeld()
		}
	}
}

// describe names o for logs and errors.
func (o *op) describe() string {
	switch o.kind {
	case opUser:
		return fmt.Sprintf("%s %d+%d", o.req.Kind, o.lo, o.hi-o.lo)
	case opResync:
		return fmt.Sprintf("resync of region %d", o.region)
	case opVerify:
		return fmt.Sprintf("checksum of region %d", o.region)
	case opGen:
		return fmt.Sprintf("generation %x", o.addGen)
	case opFlush:
		if o.peer != "" {
			return "resync flush"
		}
		return "activity-log flush"
	}
	return "operation"
}

// PeerStatus is a snapshot of one replica as the primary sees it.
type PeerStatus struct {
	ID         string
	Mode       string // down, hello, up
	InISR      bool
	Removing   bool
	Adding     bool
	DirtyBytes int64
	// ResyncDone and ResyncTotal count bytes since the current connection
	// began; the shell derives rate and ETA from them.
	ResyncDone  int64
	ResyncTotal int64
	LastError   string
}

// Status reports every peer.
func (p *Primary) Status() []PeerStatus {
	var out []PeerStatus
	for _, id := range p.order {
		pe := p.peers[id]
		out = append(out, PeerStatus{ID: id, Mode: pe.mode.String(), InISR: pe.inISR, Removing: pe.removing, Adding: pe.adding,
			DirtyBytes: p.dirtyBytes(id), ResyncDone: pe.done, ResyncTotal: max(pe.total, pe.done), LastError: pe.lastErr})
	}
	return out
}
