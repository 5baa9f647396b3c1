package scsi

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// Persistent reservation types (SPC-4 table 169).
const (
	prTypeWriteExclusive     uint8 = 0x1
	prTypeExclusiveAccess    uint8 = 0x3
	prTypeWriteExclusiveRO   uint8 = 0x5
	prTypeExclusiveAccessRO  uint8 = 0x6
	prTypeWriteExclusiveAR   uint8 = 0x7
	prTypeExclusiveAccessAR  uint8 = 0x8
	prScopeLU                uint8 = 0x0
	prMaxRegistrations             = 256
	prTransportIDProtoISCSI        = 0x5
	prTransportIDFormatName        = 0x0
	prTransportIDFormatPort        = 0x1
	prInitiatorPortSeparator       = ",i,0x"
	prTargetPortSeparator          = ",t,0x"
)

func validPRType(t uint8) bool {
	switch t {
	case prTypeWriteExclusive, prTypeExclusiveAccess, prTypeWriteExclusiveRO,
		prTypeExclusiveAccessRO, prTypeWriteExclusiveAR, prTypeExclusiveAccessAR:
		return true
	}
	return false
}

// prAllRegistrants reports whether every registrant holds a reservation of type t.
func prAllRegistrants(t uint8) bool {
	return t == prTypeWriteExclusiveAR || t == prTypeExclusiveAccessAR
}

// prRegistrantsOnly reports whether t is a registrants-only type.
func prRegistrantsOnly(t uint8) bool {
	return t == prTypeWriteExclusiveRO || t == prTypeExclusiveAccessRO
}

// prWriteExclusive reports whether t lets non-holders (or unregistered nexuses
// for RO/AR types) read.
func prWriteExclusive(t uint8) bool {
	return t == prTypeWriteExclusive || t == prTypeWriteExclusiveRO || t == prTypeWriteExclusiveAR
}

// memPRStore keeps PR state in memory only; it is what a nil PRStore means.
type memPRStore struct {
	mu sync.Mutex
	st PRState
}

func (m *memPRStore) LoadPR(context.Context) (PRState, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return clonePRState(m.st), nil
}

func (m *memPRStore) SavePR(_ context.Context, st PRState) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.st = clonePRState(st)
	return nil
}

func emptyPRState() PRState { return PRState{Holder: -1} }

func clonePRState(st PRState) PRState {
	out := st
	out.Registrations = append([]PRRegistration(nil), st.Registrations...)
	return out
}

// validatePRState rejects state no PROUT sequence could have produced, so a
// damaged store cannot make the handler index out of range later.
func validatePRState(st *PRState) error {
	if st.Holder < -1 || st.Holder >= len(st.Registrations) {
		return fmt.Errorf("scsi: pr state: holder %d out of range (%d registrations)", st.Holder, len(st.Registrations))
	}
	if st.Holder >= 0 {
		if !validPRType(st.Type) {
			return fmt.Errorf("scsi: pr state: invalid reservation type %#x", st.Type)
		}
		if st.Scope != prScopeLU {
			return fmt.Errorf("scsi: pr state: invalid reservation scope %#x", st.Scope)
		}
	}
	seen := make(map[string]bool, len(st.Registrations))
	for i, r := range st.Registrations {
		if r.Key == 0 {
			return fmt.Errorf("scsi: pr state: registration %d has key 0", i)
		}
		if _, err := parsePRPort(r); err != nil {
			return fmt.Errorf("scsi: pr state: registration %d: %w", i, err)
		}
		id := r.InitiatorPort + "|" + r.TargetPort
		if seen[id] {
			return fmt.Errorf("scsi: pr state: duplicate registration for %s", id)
		}
		seen[id] = true
	}
	return nil
}

// prPort is a registration decoded for matching against an ITNexus without
// formatting strings, so conflicts() does not allocate.
type prPort struct {
	name    string
	isid    [6]byte
	anyISID bool // registered through a name-only (format 0) TransportID
	tname   string
	tpgt    uint16
	allTG   bool
}

func (p *prPort) matches(n *ITNexus) bool {
	if p.name != n.InitiatorName || (!p.anyISID && p.isid != n.ISID) {
		return false
	}
	return p.allTG || (p.tname == n.TargetName && p.tpgt == n.TPGT)
}

func parsePRPort(r PRRegistration) (prPort, error) {
	p := prPort{allTG: r.AllTargetPorts}
	if i := strings.LastIndex(r.InitiatorPort, prInitiatorPortSeparator); i >= 0 {
		raw, err := hex.DecodeString(r.InitiatorPort[i+len(prInitiatorPortSeparator):])
		if err != nil || len(raw) != 6 {
			return p, fmt.Errorf("bad initiator port %q", r.InitiatorPort)
		}
		p.name = r.InitiatorPort[:i]
		copy(p.isid[:], raw)
	} else {
		p.name = r.InitiatorPort
		p.anyISID = true
	}
	if p.name == "" {
		return p, fmt.Errorf("empty initiator name in %q", r.InitiatorPort)
	}
	i := strings.LastIndex(r.TargetPort, prTargetPortSeparator)
	if i < 0 {
		return p, fmt.Errorf("bad target port %q", r.TargetPort)
	}
	tpgt, err := strconv.ParseUint(r.TargetPort[i+len(prTargetPortSeparator):], 16, 16)
	if err != nil {
		return p, fmt.Errorf("bad target port %q: %w", r.TargetPort, err)
	}
	p.tname = r.TargetPort[:i]
	p.tpgt = uint16(tpgt)
	return p, nil
}

// prSnapshot is an immutable view of the reservation state that conflicts()
// reads without locking.
type prSnapshot struct {
	reserved bool
	typ      uint8
	holder   int // index into ports; meaningful for non-AR types
	ports    []prPort
	// spc2 is set while an SPC-2 RESERVE holds the LU.
	spc2       bool
	spc2Holder ITNexus
}

// registered returns the index of the registration n matches, or -1.
func (s *prSnapshot) registered(n *ITNexus) int {
	for i := range s.ports {
		if s.ports[i].matches(n) {
			return i
		}
	}
	return -1
}

// prHandler implements reservationHandler. PROUT and SPC-2 commands serialise
// on mu; conflicts() only loads snap.
type prHandler struct {
	store PRStore
	ua    uaSink
	log   *slog.Logger

	snap atomic.Pointer[prSnapshot]

	mu sync.Mutex
	st PRState
	// spc2 is the holder of an SPC-2 reservation; spc2Held says whether there is one.
	spc2     ITNexus
	spc2Held bool
	// nexuses are the I_T nexuses seen by reservation commands, by Key(); they
	// let UAs reach registrations that cover several nexuses (ALL_TG_PT or a
	// name-only TransportID).
	nexuses map[string]ITNexus
}

var _ reservationHandler = (*prHandler)(nil)

// newReservationHandler loads the persisted state from store (nil: in memory)
// and returns the LU's reservation handler.
func newReservationHandler(store PRStore, ua uaSink, log *slog.Logger) (reservationHandler, error) {
	return newPRHandler(context.Background(), store, ua, log)
}

func newPRHandler(ctx context.Context, store PRStore, ua uaSink, log *slog.Logger) (*prHandler, error) {
	if store == nil {
		store = &memPRStore{st: emptyPRState()}
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	st, err := store.LoadPR(ctx)
	if err != nil {
		return nil, fmt.Errorf("scsi: load persistent reservations: %w", err)
	}
	if len(st.Registrations) == 0 {
		// A zero PRState (Holder 0) from a store that never saw a save.
		st.Holder = -1
	}
	if err := validatePRState(&st); err != nil {
		return nil, err
	}
	h := &prHandler{store: store, ua: ua, log: log, st: st, nexuses: make(map[string]ITNexus)}
	h.publishLocked()
	if len(st.Registrations) > 0 {
		log.Info("scsi: restored persistent reservations",
			"registrations", len(st.Registrations), "reserved", st.Holder >= 0,
			"type", st.Type, "generation", st.Generation)
	}
	return h, nil
}

// publishLocked rebuilds the snapshot from h.st and the SPC-2 holder.
func (h *prHandler) publishLocked() {
	s := &prSnapshot{
		reserved:   h.st.Holder >= 0,
		typ:        h.st.Type,
		holder:     h.st.Holder,
		spc2:       h.spc2Held,
		spc2Holder: h.spc2,
	}
	if len(h.st.Registrations) > 0 {
		s.ports = make([]prPort, len(h.st.Registrations))
		for i, r := range h.st.Registrations {
			p, err := parsePRPort(r)
			if err != nil {
				// validatePRState and the PROUT parsers only admit parsable
				// ports; a failure here is a bug, so fail safe: match nothing.
				h.log.Error("scsi: unparsable pr registration", "initiator_port", r.InitiatorPort, "err", err)
			}
			s.ports[i] = p
		}
	}
	h.snap.Store(s)
}

// errPRSave marks a PRStore failure so the caller can map it to sense data.
var errPRSave = errors.New("scsi: save persistent reservation state")

// commitLocked persists next and only then makes it the live state, so that a
// failed save leaves the LU exactly as it was.
func (h *prHandler) commitLocked(ctx context.Context, next PRState) error {
	if err := h.store.SavePR(ctx, next); err != nil {
		h.log.Error("scsi: persistent reservation state not saved; command rejected", "err", err)
		return fmt.Errorf("%w: %w", errPRSave, err)
	}
	h.st = next
	h.publishLocked()
	return nil
}

// noteNexusLocked remembers n so unit attentions can reach it.
func (h *prHandler) noteNexusLocked(n ITNexus) {
	if len(h.nexuses) >= 4*prMaxRegistrations {
		// Keep memory bounded; stale entries only cost a UA nobody reads.
		for k := range h.nexuses {
			delete(h.nexuses, k)
			break
		}
	}
	h.nexuses[n.Key()] = n
}

// uaTargetsLocked lists the nexus keys that registration r covers.
func (h *prHandler) uaTargetsLocked(r PRRegistration) []string {
	p, err := parsePRPort(r)
	if err != nil {
		return nil
	}
	var keys []string
	if !p.anyISID && !p.allTG {
		keys = append(keys, r.InitiatorPort+"|"+r.TargetPort)
	}
	for k, n := range h.nexuses {
		if p.matches(&n) && (p.anyISID || p.allTG) {
			keys = append(keys, k)
		}
	}
	return keys
}

// uaLocked queues r for every nexus covered by regs except the nexus except.
func (h *prHandler) uaLocked(regs []PRRegistration, except *ITNexus, r Reason) {
	if h.ua == nil {
		return
	}
	sent := make(map[string]bool)
	var exceptKey string
	if except != nil {
		exceptKey = except.Key()
	}
	for _, reg := range regs {
		for _, k := range h.uaTargetsLocked(reg) {
			if k == exceptKey || sent[k] {
				continue
			}
			sent[k] = true
			h.ua.establishUA(k, r)
		}
	}
}

// findReg returns the index of the registration covering n, or -1.
func findReg(st *PRState, n ITNexus) int {
	for i, r := range st.Registrations {
		p, err := parsePRPort(r)
		if err == nil && p.matches(&n) {
			return i
		}
	}
	return -1
}

// isHolder reports whether registration i holds st's reservation.
func isHolder(st *PRState, i int) bool {
	if st.Holder < 0 || i < 0 {
		return false
	}
	return prAllRegistrants(st.Type) || st.Holder == i
}

// removeRegs drops the registrations for which drop returns true and fixes
// the holder index: a non-AR reservation goes with its holder, an AR one with
// the last registrant. It reports whether the reservation was released.
func removeRegs(st *PRState, drop func(i int, r PRRegistration) bool) (removed []PRRegistration, released bool) {
	wasReserved := st.Holder >= 0
	kept := st.Registrations[:0:0]
	newHolder := -1
	for i, r := range st.Registrations {
		if drop(i, r) {
			removed = append(removed, r)
			continue
		}
		if i == st.Holder {
			newHolder = len(kept)
		}
		kept = append(kept, r)
	}
	st.Registrations = kept
	if wasReserved && prAllRegistrants(st.Type) && len(kept) > 0 {
		newHolder = 0
	}
	st.Holder = newHolder
	if st.Holder < 0 {
		st.Type, st.Scope = 0, 0
	}
	return removed, wasReserved && st.Holder < 0
}

func (h *prHandler) nexusLost(n ITNexus) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.nexuses, n.Key())
	if h.spc2Held && h.spc2 == n {
		h.spc2Held = false
		h.spc2 = ITNexus{}
		h.publishLocked()
		h.log.Debug("scsi: spc-2 reservation released by i_t nexus loss", "initiator_port", n.InitiatorPortName())
	}
}

func (h *prHandler) reset(kind ResetKind) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.spc2Held {
		h.spc2Held = false
		h.spc2 = ITNexus{}
		h.publishLocked()
		h.log.Debug("scsi: spc-2 reservation released by reset", "kind", kind)
	}
}
