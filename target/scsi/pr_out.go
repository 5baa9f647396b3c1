package scsi

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"strings"
)

// PERSISTENT RESERVE OUT service actions (SPC-4 table 171).
const (
	prOutRegister             = 0x00
	prOutReserve              = 0x01
	prOutRelease              = 0x02
	prOutClear                = 0x03
	prOutPreempt              = 0x04
	prOutPreemptAndAbort      = 0x05
	prOutRegisterIgnore       = 0x06
	prOutRegisterAndMove      = 0x07
	prOutBasicParamLen        = 24
	prOutSpecIPTHeaderLen     = 28
	prMaxISCSINameLen         = 223
	prTransportIDMinAddLength = 20
)

// prOutParams is the decoded PROUT parameter list.
type prOutParams struct {
	key, sark uint64
	specIPT   bool
	allTG     bool
	aptpl     bool
	// tids are the initiator ports named with SPEC_I_PT, or the one
	// REGISTER AND MOVE moves to.
	tids []prTID
	// REGISTER AND MOVE only.
	unreg   bool
	relPort uint16
}

// prTID is a decoded TransportID and where it sat in the parameter list, for
// the sense field pointer.
type prTID struct {
	port string // InitiatorPort form: "name,i,0xisid" or a bare name
	off  uint16
}

func prConflict() (Status, error) { return StatusReservationConflict, nil }

func prCheck(e *CheckError) (Status, error) { return StatusCheckCondition, e }

func prGood() (Status, error) { return StatusGood, nil }

func (h *prHandler) persistentReserveOut(ctx context.Context, n ITNexus, cdb, param []byte) (Status, error) {
	if len(cdb) < 10 {
		return prCheck(InvalidCDBField(0, -1))
	}
	sa := cdb[1] & 0x1f
	if sa > prOutRegisterAndMove {
		return prCheck(InvalidCDBField(1, 4))
	}
	scope, typ := cdb[2]>>4, cdb[2]&0x0f
	switch sa {
	case prOutReserve, prOutRelease, prOutPreempt, prOutPreemptAndAbort:
		if scope != prScopeLU {
			return prCheck(InvalidCDBField(2, 7))
		}
		if !validPRType(typ) {
			return prCheck(InvalidCDBField(2, 3))
		}
	}
	p, cerr := parsePROutParams(sa, cdb, param)
	if cerr != nil {
		return prCheck(cerr)
	}

	h.mu.Lock()
	defer h.mu.Unlock()
	if h.spc2Held {
		// conflicts() already says so; repeat it for callers that skip it.
		return prConflict()
	}
	h.noteNexusLocked(n)
	switch sa {
	case prOutRegister, prOutRegisterIgnore:
		return h.registerLocked(ctx, n, p, sa == prOutRegisterIgnore)
	case prOutReserve:
		return h.reserveLocked(ctx, n, p, typ)
	case prOutRelease:
		return h.releaseLocked(ctx, n, p, typ)
	case prOutClear:
		return h.clearLocked(ctx, n, p)
	case prOutPreempt, prOutPreemptAndAbort:
		// Tasks run to completion inside Execute, so there is nothing queued
		// to abort: PREEMPT AND ABORT behaves as PREEMPT.
		return h.preemptLocked(ctx, n, p, typ)
	default:
		return h.registerAndMoveLocked(ctx, n, p)
	}
}

// parsePROutParams checks the parameter list length and decodes the list.
func parsePROutParams(sa uint8, cdb, param []byte) (prOutParams, *CheckError) {
	var p prOutParams
	plen := binary.BigEndian.Uint32(cdb[5:9])
	if uint64(len(param)) < uint64(plen) {
		// The transport delivered less than the CDB announced.
		return p, Check(ReasonParamListLengthError)
	}
	param = param[:plen]
	if plen < prOutBasicParamLen {
		return p, Check(ReasonParamListLengthError)
	}
	p.key = binary.BigEndian.Uint64(param[0:])
	p.sark = binary.BigEndian.Uint64(param[8:])

	if sa == prOutRegisterAndMove {
		p.unreg = param[17]&0x02 != 0
		p.aptpl = param[17]&0x01 != 0
		p.relPort = binary.BigEndian.Uint16(param[18:])
		tlen := binary.BigEndian.Uint32(param[20:])
		if uint64(prOutBasicParamLen)+uint64(tlen) > uint64(plen) {
			return p, Check(ReasonParamListLengthError)
		}
		tid, used, cerr := parseISCSITransportID(param[prOutBasicParamLen:prOutBasicParamLen+tlen], prOutBasicParamLen)
		if cerr != nil {
			return p, cerr
		}
		if used != int(tlen) {
			return p, InvalidParamField(20, -1)
		}
		p.tids = []prTID{tid}
		return p, nil
	}

	p.specIPT = param[20]&0x08 != 0
	p.allTG = param[20]&0x04 != 0
	p.aptpl = param[20]&0x01 != 0
	if !p.specIPT {
		if plen != prOutBasicParamLen {
			return p, Check(ReasonParamListLengthError)
		}
		return p, nil
	}
	if sa != prOutRegister {
		return p, InvalidParamField(20, 3)
	}
	if plen < prOutSpecIPTHeaderLen {
		return p, Check(ReasonParamListLengthError)
	}
	tlen := binary.BigEndian.Uint32(param[24:])
	if uint64(prOutSpecIPTHeaderLen)+uint64(tlen) != uint64(plen) {
		return p, Check(ReasonParamListLengthError)
	}
	for off := prOutSpecIPTHeaderLen; off < int(plen); {
		tid, used, cerr := parseISCSITransportID(param[off:], off)
		if cerr != nil {
			return p, cerr
		}
		if len(p.tids) >= prMaxRegistrations {
			return p, Check(ReasonInsufficientRegistrationResources)
		}
		p.tids = append(p.tids, tid)
		off += used
	}
	return p, nil
}

// parseISCSITransportID decodes one iSCSI TransportID (SPC-4 7.6.4.6) at
// offset off of the parameter list and returns its length.
func parseISCSITransportID(b []byte, off int) (prTID, int, *CheckError) {
	fp := func(rel int, bit int8) *CheckError { return InvalidParamField(uint16(off+rel), bit) }
	if len(b) < 4 {
		return prTID{}, 0, Check(ReasonParamListLengthError)
	}
	if b[0]&0x0f != prTransportIDProtoISCSI {
		return prTID{}, 0, fp(0, 3)
	}
	format := b[0] >> 6
	if format != prTransportIDFormatName && format != prTransportIDFormatPort {
		return prTID{}, 0, fp(0, 7)
	}
	add := int(binary.BigEndian.Uint16(b[2:]))
	if add < prTransportIDMinAddLength || add%4 != 0 {
		return prTID{}, 0, fp(2, -1)
	}
	if 4+add > len(b) {
		return prTID{}, 0, Check(ReasonParamListLengthError)
	}
	body := b[4 : 4+add]
	end := strings.IndexByte(string(body), 0)
	if end <= 0 {
		return prTID{}, 0, fp(4, -1)
	}
	s := string(body[:end])
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] > '~' {
			return prTID{}, 0, fp(4+i, -1)
		}
	}
	sep := strings.Index(strings.ToLower(s), prInitiatorPortSeparator)
	var port string
	switch format {
	case prTransportIDFormatName:
		if sep >= 0 || len(s) > prMaxISCSINameLen {
			return prTID{}, 0, fp(4, -1)
		}
		port = s
	default:
		if sep <= 0 || sep > prMaxISCSINameLen {
			return prTID{}, 0, fp(4, -1)
		}
		isid, err := hex.DecodeString(s[sep+len(prInitiatorPortSeparator):])
		if err != nil || len(isid) != 6 {
			return prTID{}, 0, fp(4+sep, -1)
		}
		port = s[:sep] + prInitiatorPortSeparator + hex.EncodeToString(isid)
	}
	return prTID{port: port, off: uint16(off)}, 4 + add, nil
}

// prSaveFailed turns a PRStore failure into sense data. The state was not
// changed; the initiator may retry.
// Registrations report INSUFFICIENT REGISTRATION RESOURCES, the code SPC-4
// gives for a registration the device server cannot record.
func prSaveFailed(_ error, registering bool) (Status, error) {
	if registering {
		return prCheck(Check(ReasonInsufficientRegistrationResources))
	}
	return prCheck(Check(ReasonInternalTargetFailure))
}

// regsOverlap reports whether two registrations cover a common I_T nexus.
func regsOverlap(a, b PRRegistration) bool {
	pa, err1 := parsePRPort(a)
	pb, err2 := parsePRPort(b)
	if err1 != nil || err2 != nil {
		return false
	}
	if pa.name != pb.name || (!pa.anyISID && !pb.anyISID && pa.isid != pb.isid) {
		return false
	}
	return pa.allTG || pb.allTG || (pa.tname == pb.tname && pa.tpgt == pb.tpgt)
}

func nexusRegistration(n ITNexus, key uint64, allTG bool) PRRegistration {
	return PRRegistration{
		Key:            key,
		InitiatorPort:  n.InitiatorPortName(),
		TargetPort:     n.TargetPortName(),
		RelPortID:      n.RelativePortID,
		AllTargetPorts: allTG,
	}
}

// registerLocked runs REGISTER and REGISTER AND IGNORE EXISTING KEY
// (SPC-4 5.13.7).
func (h *prHandler) registerLocked(ctx context.Context, n ITNexus, p prOutParams, ignore bool) (Status, error) {
	cur := &h.st
	reg := findReg(cur, n)
	if reg < 0 {
		if !ignore && p.key != 0 {
			return prConflict()
		}
		if p.sark == 0 {
			return prGood() // unregistering an unregistered nexus changes nothing
		}
		if len(cur.Registrations)+1+len(p.tids) > prMaxRegistrations {
			return prCheck(Check(ReasonInsufficientRegistrationResources))
		}
		self := nexusRegistration(n, p.sark, p.allTG)
		for _, old := range cur.Registrations {
			if regsOverlap(old, self) {
				// ALL_TG_PT would cover a port registered through
				// another target port.
				return prCheck(InvalidParamField(20, 2))
			}
		}
		next := clonePRState(*cur)
		next.Registrations = append(next.Registrations, self)
		for _, tid := range p.tids {
			r := PRRegistration{
				Key:            p.sark,
				InitiatorPort:  tid.port,
				TargetPort:     n.TargetPortName(),
				RelPortID:      n.RelativePortID,
				AllTargetPorts: p.allTG,
			}
			for _, old := range next.Registrations {
				if regsOverlap(old, r) {
					return prCheck(InvalidParamField(tid.off, -1))
				}
			}
			next.Registrations = append(next.Registrations, r)
		}
		next.APTPL = p.aptpl
		next.Generation++
		if err := h.commitLocked(ctx, next); err != nil {
			return prSaveFailed(err, true)
		}
		h.log.Debug("scsi: pr registered", "initiator_port", n.InitiatorPortName(),
			"spec_i_pt", len(p.tids), "all_tg_pt", p.allTG, "aptpl", p.aptpl)
		return prGood()
	}

	if !ignore && p.key != cur.Registrations[reg].Key {
		return prConflict()
	}
	if p.specIPT {
		return prCheck(InvalidParamField(20, 3))
	}
	next := clonePRState(*cur)
	next.APTPL = p.aptpl
	next.Generation++
	if p.sark != 0 {
		next.Registrations[reg].Key = p.sark
		if err := h.commitLocked(ctx, next); err != nil {
			return prSaveFailed(err, true)
		}
		return prGood()
	}
	oldType := cur.Type
	_, released := removeRegs(&next, func(i int, _ PRRegistration) bool { return i == reg })
	if err := h.commitLocked(ctx, next); err != nil {
		return prSaveFailed(err, true)
	}
	if released && prRegistrantsOnly(oldType) {
		// SPC-4 5.13.11.2.3: the other registrants lose their access.
		h.uaLocked(next.Registrations, &n, ReasonUAReservationsReleased)
	}
	h.log.Debug("scsi: pr unregistered", "initiator_port", n.InitiatorPortName(), "released", released)
	return prGood()
}

// reserveLocked runs RESERVE (SPC-4 5.13.9).
func (h *prHandler) reserveLocked(ctx context.Context, n ITNexus, p prOutParams, typ uint8) (Status, error) {
	cur := &h.st
	reg := findReg(cur, n)
	if reg < 0 || p.key != cur.Registrations[reg].Key {
		return prConflict()
	}
	if cur.Holder >= 0 {
		if isHolder(cur, reg) && cur.Type == typ && cur.Scope == prScopeLU {
			return prGood()
		}
		return prConflict()
	}
	next := clonePRState(*cur)
	next.Holder, next.Type, next.Scope = reg, typ, prScopeLU
	if err := h.commitLocked(ctx, next); err != nil {
		return prSaveFailed(err, false)
	}
	h.log.Debug("scsi: pr reserved", "initiator_port", n.InitiatorPortName(), "type", typ)
	return prGood()
}

// releaseLocked runs RELEASE (SPC-4 5.13.11.2.2).
func (h *prHandler) releaseLocked(ctx context.Context, n ITNexus, p prOutParams, typ uint8) (Status, error) {
	cur := &h.st
	reg := findReg(cur, n)
	if reg < 0 || p.key != cur.Registrations[reg].Key {
		return prConflict()
	}
	if !isHolder(cur, reg) {
		return prGood() // no reservation, or someone else's: nothing to do
	}
	if cur.Type != typ || cur.Scope != prScopeLU {
		return prCheck(Check(ReasonInvalidReleaseOfPR))
	}
	oldType := cur.Type
	next := clonePRState(*cur)
	next.Holder, next.Type, next.Scope = -1, 0, 0
	if err := h.commitLocked(ctx, next); err != nil {
		return prSaveFailed(err, false)
	}
	if prRegistrantsOnly(oldType) || prAllRegistrants(oldType) {
		h.uaLocked(next.Registrations, &n, ReasonUAReservationsReleased)
	}
	h.log.Debug("scsi: pr released", "initiator_port", n.InitiatorPortName(), "type", oldType)
	return prGood()
}

// clearLocked runs CLEAR (SPC-4 5.13.11.2.6).
func (h *prHandler) clearLocked(ctx context.Context, n ITNexus, p prOutParams) (Status, error) {
	cur := &h.st
	reg := findReg(cur, n)
	if reg < 0 || p.key != cur.Registrations[reg].Key {
		return prConflict()
	}
	old := cur.Registrations
	next := PRState{Generation: cur.Generation + 1, APTPL: cur.APTPL, Holder: -1}
	if err := h.commitLocked(ctx, next); err != nil {
		return prSaveFailed(err, false)
	}
	h.uaLocked(old, &n, ReasonUAReservationsPreempted)
	h.log.Info("scsi: pr cleared", "initiator_port", n.InitiatorPortName(), "registrations", len(old))
	return prGood()
}

// preemptLocked runs PREEMPT (SPC-4 5.13.11.4).
func (h *prHandler) preemptLocked(ctx context.Context, n ITNexus, p prOutParams, typ uint8) (Status, error) {
	cur := &h.st
	reg := findReg(cur, n)
	if reg < 0 || p.key != cur.Registrations[reg].Key {
		return prConflict()
	}
	next := clonePRState(*cur)
	next.Generation++
	notSelf := func(key uint64) func(int, PRRegistration) bool {
		return func(i int, r PRRegistration) bool { return i != reg && r.Key == key }
	}
	// preemptRegistrations removes the registrations holding SARK (never
	// the preempting nexus's own) and leaves any reservation as it is.
	preemptRegistrations := func() (Status, error) {
		if p.sark == 0 {
			return prCheck(InvalidParamField(8, -1))
		}
		removed, _ := removeRegs(&next, notSelf(p.sark))
		if len(removed) == 0 {
			return prConflict()
		}
		if err := h.commitLocked(ctx, next); err != nil {
			return prSaveFailed(err, false)
		}
		h.uaLocked(removed, &n, ReasonUARegistrationsPreempted)
		return prGood()
	}

	switch {
	case cur.Holder < 0 || (prAllRegistrants(cur.Type) && p.sark != 0):
		// Only registrations go; any AR reservation stays with the rest.
		return preemptRegistrations()

	case prAllRegistrants(cur.Type):
		// SARK 0 preempts an all-registrants reservation: everyone else goes
		// and the preempting nexus holds the new reservation.
		removed, _ := removeRegs(&next, func(i int, _ PRRegistration) bool { return i != reg })
		next.Holder, next.Type, next.Scope = 0, typ, prScopeLU
		if err := h.commitLocked(ctx, next); err != nil {
			return prSaveFailed(err, false)
		}
		h.uaLocked(removed, &n, ReasonUARegistrationsPreempted)
		return prGood()
	}

	holderKey := cur.Registrations[cur.Holder].Key
	if p.sark != holderKey {
		return preemptRegistrations()
	}

	// Preempt the reservation itself (possibly our own, to change its type).
	removed, _ := removeRegs(&next, notSelf(p.sark))
	self := findReg(&next, n)
	changed := cur.Type != typ
	next.Holder, next.Type, next.Scope = self, typ, prScopeLU
	if err := h.commitLocked(ctx, next); err != nil {
		return prSaveFailed(err, false)
	}
	h.uaLocked(removed, &n, ReasonUARegistrationsPreempted)
	if changed {
		h.uaLocked(next.Registrations, &n, ReasonUAReservationsReleased)
	}
	h.log.Info("scsi: pr preempted", "initiator_port", n.InitiatorPortName(),
		"type", typ, "removed", len(removed))
	return prGood()
}

// registerAndMoveLocked runs REGISTER AND MOVE (SPC-4 5.13.8).
func (h *prHandler) registerAndMoveLocked(ctx context.Context, n ITNexus, p prOutParams) (Status, error) {
	cur := &h.st
	reg := findReg(cur, n)
	if reg < 0 || p.key != cur.Registrations[reg].Key {
		return prConflict()
	}
	if cur.Holder < 0 || prAllRegistrants(cur.Type) || !isHolder(cur, reg) {
		return prConflict()
	}
	if p.sark == 0 {
		return prCheck(InvalidParamField(8, -1))
	}
	tport, ok := h.targetPortLocked(n, p.relPort)
	if !ok {
		return prCheck(InvalidParamField(18, -1))
	}
	tid := p.tids[0]
	dest := PRRegistration{Key: p.sark, InitiatorPort: tid.port, TargetPort: tport, RelPortID: p.relPort}
	if regsOverlap(cur.Registrations[reg], dest) {
		return prCheck(InvalidParamField(tid.off, -1))
	}
	next := clonePRState(*cur)
	destIdx := -1
	for i, r := range next.Registrations {
		if regsOverlap(r, dest) {
			destIdx = i
			break
		}
	}
	if destIdx < 0 {
		if len(next.Registrations) >= prMaxRegistrations {
			return prCheck(Check(ReasonInsufficientRegistrationResources))
		}
		next.Registrations = append(next.Registrations, dest)
		destIdx = len(next.Registrations) - 1
	} else {
		next.Registrations[destIdx].Key = p.sark
	}
	next.Holder = destIdx
	if p.unreg {
		removeRegs(&next, func(i int, _ PRRegistration) bool { return i == reg })
	}
	next.APTPL = p.aptpl
	next.Generation++
	if err := h.commitLocked(ctx, next); err != nil {
		return prSaveFailed(err, true)
	}
	h.log.Info("scsi: pr moved", "from", n.InitiatorPortName(), "to", tid.port, "unreg", p.unreg)
	return prGood()
}

// targetPortLocked names the target port with relative identifier rel, from
// the nexuses seen so far.
func (h *prHandler) targetPortLocked(n ITNexus, rel uint16) (string, bool) {
	if n.RelativePortID == rel {
		return n.TargetPortName(), true
	}
	for _, o := range h.nexuses {
		if o.RelativePortID == rel {
			return o.TargetPortName(), true
		}
	}
	return "", false
}
