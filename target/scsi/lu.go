package scsi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
)

// ALUAState is an asymmetric access state (SPC-4 6.37, table 299).
type ALUAState uint8

const (
	ALUAActiveOptimized    ALUAState = 0x0
	ALUAActiveNonOptimized ALUAState = 0x1
	ALUAStandby            ALUAState = 0x2
	ALUAUnavailable        ALUAState = 0x3
	ALUAOffline            ALUAState = 0xE
	ALUATransitioning      ALUAState = 0xF
)

func (s ALUAState) String() string {
	switch s {
	case ALUAActiveOptimized:
		return "active/optimized"
	case ALUAActiveNonOptimized:
		return "active/non-optimized"
	case ALUAStandby:
		return "standby"
	case ALUAUnavailable:
		return "unavailable"
	case ALUAOffline:
		return "offline"
	case ALUATransitioning:
		return "transitioning"
	}
	return fmt.Sprintf("alua(%#x)", uint8(s))
}

// PortGroup is one ALUA target port group as REPORT TARGET PORT GROUPS shows
// it. A command arriving through a relative port in a non-active group is
// refused with the matching NOT READY sense, so the cluster can steer
// multipath initiators by changing states with SetPortGroups.
type PortGroup struct {
	ID              uint16
	State           ALUAState
	Preferred       bool
	RelativePortIDs []uint16
}

// Config describes one logical unit. The zero value of every optional field
// has a documented default; Backend is required.
type Config struct {
	// VolumeID is the per-volume UUID: the only source of the unit serial
	// number (VPD 0x80) and NAA designator (VPD 0x83), so every node that
	// exports the volume presents the same disk.
	VolumeID [16]byte
	// BlockSize is the logical block size: 512 (default) or 4096.
	BlockSize uint32
	// Thin advertises logical block provisioning (LBPME, UNMAP, WRITE SAME
	// with UNMAP, GET LBA STATUS). A thick LU refuses those commands.
	Thin    bool
	Backend Backend
	// PR stores persistent reservations; nil keeps them in memory.
	PR PRStore
	// Vendor, Product and Revision fill standard INQUIRY data; defaults are
	// "HASAN", "hasan volume" and "0001".
	Vendor, Product, Revision string
	// PortGroups lists the ALUA target port groups; nil means one
	// active/optimized group 1 holding relative port 1.
	PortGroups []PortGroup
	Logger     *slog.Logger
	// ReadOnly makes every write end in DATA PROTECT, WRITE PROTECTED.
	ReadOnly bool
}

// Limits advertised in the Block Limits VPD page and enforced on every CDB.
const (
	maxTransferBytes   = 8 << 20 // per command; bounds the buffer a CDB can make us allocate
	optimalXferBytes   = 1 << 20
	maxWriteSameBlocks = 1<<16 - 1 // below 64Ki blocks: libiscsi then skips its 64Ki-block WRITE(16) (beyond our max transfer)
	maxUnmapBlocks     = 1 << 20
	maxUnmapDescs      = 4095 // the most a 16-bit parameter list length can carry
	maxCompareBlocks   = 255
	writeSameChunk     = 1 << 20
	defaultVendor      = "HASAN"
	defaultProduct     = "hasan volume"
	defaultRevision    = "0001"
	maxNexusStates     = 4096
)

// LogicalUnit emulates one SBC-3 direct-access logical unit on a Backend. It
// is safe for concurrent use: reads run without locks, writes take a range
// lock only over the blocks they touch.
type LogicalUnit struct {
	cfg       Config
	be        Backend
	mapStatus MapStatusBackend // nil when the backend cannot tell
	log       *slog.Logger
	bs        uint32
	bsShift   uint
	nblocks   atomic.Uint64
	pr        reservationHandler

	ranges rangeLock
	bufs   bufferPool
	tasks  sync.Pool // *task, so dispatch allocates nothing per command

	// Mode page state read on the hot path.
	wce    atomic.Bool
	dsense atomic.Bool

	pgs atomic.Pointer[[]PortGroup]

	// mu guards the nexus tables and mode page writes.
	mu      sync.RWMutex
	nexuses map[ITNexus]*nexusState
	byKey   map[string]*nexusState
}

var errNoBackend = errors.New("scsi: config has no backend")

// New validates cfg and builds a logical unit.
func New(cfg Config) (*LogicalUnit, error) {
	if cfg.Backend == nil {
		return nil, errNoBackend
	}
	if cfg.BlockSize == 0 {
		cfg.BlockSize = 512
	}
	if cfg.BlockSize != 512 && cfg.BlockSize != 4096 {
		return nil, fmt.Errorf("scsi: BlockSize %d: must be 512 or 4096", cfg.BlockSize)
	}
	if cfg.Vendor == "" {
		cfg.Vendor = defaultVendor
	}
	if cfg.Product == "" {
		cfg.Product = defaultProduct
	}
	if cfg.Revision == "" {
		cfg.Revision = defaultRevision
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	pgs, err := normalisePortGroups(cfg.PortGroups)
	if err != nil {
		return nil, err
	}
	cfg.PortGroups = nil
	size := cfg.Backend.Size()
	if size < 0 || size%int64(cfg.BlockSize) != 0 {
		return nil, fmt.Errorf("scsi: backend size %d is not a multiple of the block size %d", size, cfg.BlockSize)
	}
	lu := &LogicalUnit{
		cfg:     cfg,
		be:      cfg.Backend,
		log:     cfg.Logger,
		bs:      cfg.BlockSize,
		nexuses: make(map[ITNexus]*nexusState),
		byKey:   make(map[string]*nexusState),
	}
	for 1<<lu.bsShift < lu.bs {
		lu.bsShift++
	}
	lu.mapStatus, _ = cfg.Backend.(MapStatusBackend)
	lu.nblocks.Store(uint64(size) >> lu.bsShift)
	lu.wce.Store(true)
	lu.pgs.Store(&pgs)
	lu.bufs.init()
	store := cfg.PR
	if store == nil {
		store = &memPRStore{st: emptyPRState()}
	}
	h, err := newReservationHandler(store, lu, cfg.Logger)
	if err != nil {
		return nil, fmt.Errorf("scsi: loading persistent reservations: %w", err)
	}
	lu.pr = h
	return lu, nil
}

func normalisePortGroups(in []PortGroup) ([]PortGroup, error) {
	if len(in) == 0 {
		return []PortGroup{{ID: 1, State: ALUAActiveOptimized, Preferred: true, RelativePortIDs: []uint16{1}}}, nil
	}
	out := make([]PortGroup, len(in))
	seenGroup := make(map[uint16]bool)
	seenPort := make(map[uint16]bool)
	for i, g := range in {
		if seenGroup[g.ID] {
			return nil, fmt.Errorf("scsi: PortGroups[%d]: duplicate group ID %d", i, g.ID)
		}
		seenGroup[g.ID] = true
		switch g.State {
		case ALUAActiveOptimized, ALUAActiveNonOptimized, ALUAStandby, ALUAUnavailable, ALUAOffline, ALUATransitioning:
		default:
			return nil, fmt.Errorf("scsi: PortGroups[%d]: invalid state %#x", i, uint8(g.State))
		}
		for _, p := range g.RelativePortIDs {
			if seenPort[p] {
				return nil, fmt.Errorf("scsi: PortGroups[%d]: relative port %d in two groups", i, p)
			}
			seenPort[p] = true
		}
		out[i] = g
		out[i].RelativePortIDs = append([]uint16(nil), g.RelativePortIDs...)
	}
	return out, nil
}

// BlockSize returns the logical block size in bytes.
func (lu *LogicalUnit) BlockSize() uint32 { return lu.bs }

// portGroupFor returns the group that holds the nexus's relative port, or the
// first group when no group names it (a transport that does not number ports).
func (lu *LogicalUnit) portGroupFor(n *ITNexus) *PortGroup {
	pgs := *lu.pgs.Load()
	for i := range pgs {
		for _, p := range pgs[i].RelativePortIDs {
			if p == n.RelativePortID {
				return &pgs[i]
			}
		}
	}
	return &pgs[0]
}

// Resize grows or shrinks the backend and tells every nexus with CAPACITY
// DATA HAS CHANGED.
func (lu *LogicalUnit) Resize(ctx context.Context, size int64) error {
	if size <= 0 || size%int64(lu.bs) != 0 {
		return fmt.Errorf("scsi: resize to %d: not a positive multiple of the block size %d", size, lu.bs)
	}
	if err := lu.be.Resize(ctx, size); err != nil {
		return fmt.Errorf("scsi: resize: %w", err)
	}
	lu.nblocks.Store(uint64(size) >> lu.bsShift)
	lu.establishUAAll(ReasonUACapacityDataChanged, nil)
	lu.log.Info("scsi: logical unit resized", "bytes", size)
	return nil
}

// SetPortGroups replaces the ALUA port groups (for example when the cluster
// moves a volume) and queues ASYMMETRIC ACCESS STATE CHANGED for every nexus.
func (lu *LogicalUnit) SetPortGroups(pgs []PortGroup) error {
	n, err := normalisePortGroups(pgs)
	if err != nil {
		return err
	}
	lu.pgs.Store(&n)
	lu.establishUAAll(ReasonUAAsymmetricAccessStateChanged, nil)
	return nil
}

// Reset applies a LUN or target reset performed by the transport's task
// management: SPC-2 reservations are released and every nexus gets a unit
// attention. Persistent reservations survive resets.
func (lu *LogicalUnit) Reset(kind ResetKind, by ITNexus) {
	if lu.pr != nil {
		lu.pr.reset(kind)
	}
	r := ReasonUAPowerOnReset
	if kind == ResetLUN {
		r = ReasonUABusDeviceReset
	}
	lu.establishUAAll(r, nil)
	lu.log.Info("scsi: reset", "kind", int(kind), "initiator", by.InitiatorName)
}

// NexusLost forgets what SPC ties to an I_T nexus (SPC-2 reservation, queued
// unit attentions). If the nexus comes back it is told I_T NEXUS LOSS OCCURRED.
func (lu *LogicalUnit) NexusLost(n ITNexus) {
	if lu.pr != nil {
		lu.pr.nexusLost(n)
	}
	lu.mu.Lock()
	defer lu.mu.Unlock()
	st := lu.nexuses[n]
	if st == nil {
		return
	}
	if len(lu.nexuses) > maxNexusStates {
		delete(lu.nexuses, n)
		delete(lu.byKey, st.key)
		return
	}
	st.pending = st.pending[:0]
	st.pushLocked(ReasonUAITNexusLoss)
}

// LUNsChanged queues REPORTED LUNS DATA HAS CHANGED for every nexus.
func (lu *LogicalUnit) LUNsChanged() {
	lu.establishUAAll(ReasonUAReportedLUNsDataChanged, nil)
}

// Execute runs one SCSI command. It never panics on malformed input and
// always returns a response; when ctx is cancelled it returns promptly and the
// transport owns the abort.
func (lu *LogicalUnit) Execute(ctx context.Context, cmd *Command) *Response {
	t, _ := lu.tasks.Get().(*task)
	if t == nil {
		t = new(task)
	}
	*t = task{ctx: ctx, cmd: cmd, cdb: cmd.CDB}
	err := lu.dispatch(t)
	resp := t.resp
	*t = task{}
	lu.tasks.Put(t)
	if err != nil {
		if resp != nil && resp.Release != nil {
			resp.Release()
		}
		if ctx.Err() != nil {
			return &Response{Status: StatusTaskAborted}
		}
		return CheckResponse(err, lu.dsense.Load())
	}
	return resp
}

// task is one command on its way through dispatch.
type task struct {
	ctx  context.Context
	cmd  *Command
	cdb  []byte
	desc *opDesc
	rw   rwRequest
	resp *Response
}

// good sets a GOOD response carrying data (already cut to the allocation length).
func (t *task) good(data []byte) {
	t.resp = &Response{Status: StatusGood, Data: data, Transferred: uint32(len(data))}
}

// dataIn answers with data cut to alloc bytes.
func (t *task) dataIn(data []byte, alloc int) {
	if len(data) > alloc {
		data = data[:alloc]
	}
	t.good(data)
}

func (lu *LogicalUnit) dispatch(t *task) *CheckError {
	cdb := t.cdb
	if len(cdb) == 0 {
		return Check(ReasonInvalidOpcode)
	}
	op := cdb[0]
	// INQUIRY, REPORT LUNS and REQUEST SENSE neither report nor clear unit
	// attentions (SAM-5 5.14, SPC-4 5.12); everything else reports the oldest
	// one and clears it.
	if op != opInquiry && op != opReportLUNs && op != opRequestSense {
		if ua := lu.takeUA(&t.cmd.Nexus); ua != ReasonNone {
			return Check(ua)
		}
	} else {
		lu.noteNexus(&t.cmd.Nexus)
	}
	d, err := lookupOp(lu, cdb)
	if err != nil {
		return err
	}
	t.desc = d
	if len(cdb) < int(d.cdbLen) {
		return InvalidCDBField(uint16(len(cdb)), -1)
	}
	// Control byte: we implement neither NACA nor linked commands.
	ctl := uint16(d.cdbLen - 1)
	if cdb[ctl]&0x04 != 0 {
		return InvalidCDBField(ctl, 2)
	}
	if cdb[ctl]&0x01 != 0 {
		return InvalidCDBField(ctl, 0)
	}
	if d.flags&fStandbyOK == 0 {
		switch lu.portGroupFor(&t.cmd.Nexus).State {
		case ALUAStandby:
			return Check(ReasonLUNotAccessibleStandby)
		case ALUAUnavailable, ALUAOffline:
			return Check(ReasonLUNotAccessibleUnavailable)
		case ALUATransitioning:
			return Check(ReasonLUNotAccessibleTransitioning)
		}
	}
	if lu.pr != nil && d.flags&fNoConflict == 0 && lu.pr.conflicts(t.cmd.Nexus, cdb) {
		t.resp = &Response{Status: StatusReservationConflict}
		return nil
	}
	if d.rw != nil {
		if err := lu.decodeRW(t, d.rw); err != nil {
			return err
		}
	}
	if d.flags&fWrite != 0 && lu.cfg.ReadOnly {
		return Check(ReasonWriteProtected)
	}
	return d.handler(lu, t)
}

// ioError maps a backend failure to sense data and logs it once.
func (lu *LogicalUnit) ioError(t *task, err error, r Reason) *CheckError {
	if t.ctx.Err() != nil {
		return Check(ReasonNone)
	}
	lu.log.Warn("scsi: backend I/O failed", "opcode", t.cdb[0], "err", err)
	return Check(r)
}
