package scsi

// prAccess is how a command behaves in the presence of a reservation held by
// another I_T nexus (SPC-4 table 66, SBC-3 table 13).
type prAccess uint8

const (
	// prAccessWrite conflicts with WE and EA for non-holders and with RO/AR
	// types for unregistered nexuses: anything that changes the medium or the
	// LU's state, and every opcode we do not classify.
	prAccessWrite prAccess = iota
	// prAccessRead is allowed through Write Exclusive types and conflicts with
	// Exclusive Access types unless the nexus is registered for RO/AR.
	prAccessRead
	// prAccessAllowed never conflicts with a persistent reservation.
	prAccessAllowed
	// prAccessPROut is judged by the service action itself (SPC-4 table 67):
	// it needs the key in the parameter data.
	prAccessPROut
	prAccessReserve
	prAccessRelease
	prAccessPRIn
)

// Opcodes the reservation tables name.
const (
	prOpTestUnitReady      = 0x00
	prOpRequestSense       = 0x03
	prOpRead6              = 0x08
	prOpInquiry            = 0x12
	prOpModeSelect6        = 0x15
	prOpReserve6           = 0x16
	prOpRelease6           = 0x17
	prOpModeSense6         = 0x1A
	prOpStartStopUnit      = 0x1B
	prOpReceiveDiagnostic  = 0x1C
	prOpPreventAllow       = 0x1E
	prOpReadCapacity10     = 0x25
	prOpRead10             = 0x28
	prOpVerify10           = 0x2F
	prOpPrefetch10         = 0x34
	prOpReadDefectData10   = 0x37
	prOpReadBuffer         = 0x3C
	prOpReadLong10         = 0x3E
	prOpLogSense           = 0x4D
	prOpReserve10          = 0x56
	prOpRelease10          = 0x57
	prOpModeSense10        = 0x5A
	prOpPRIn               = 0x5E
	prOpPROut              = 0x5F
	prOpVariableLength     = 0x7F
	prOpAccessControlIn    = 0x86
	prOpAccessControlOut   = 0x87
	prOpRead16             = 0x88
	prOpReadAttribute      = 0x8C
	prOpVerify16           = 0x8F
	prOpPrefetch16         = 0x90
	prOpServiceActionIn16  = 0x9E
	prOpReportLUNs         = 0xA0
	prOpSecurityProtocolIn = 0xA2
	prOpMaintenanceIn      = 0xA3
	prOpRead12             = 0xA8
	prOpServiceActionIn12  = 0xAB
	prOpVerify12           = 0xAF
	prOpReadDefectData12   = 0xB7
)

// prAccessByOpcode classifies opcodes whose class does not depend on CDB
// fields. Zero (prAccessWrite) is the safe default.
var prAccessByOpcode = [256]prAccess{
	prOpTestUnitReady:      prAccessAllowed,
	prOpRequestSense:       prAccessAllowed,
	prOpInquiry:            prAccessAllowed,
	prOpReadCapacity10:     prAccessAllowed,
	prOpLogSense:           prAccessAllowed,
	prOpReportLUNs:         prAccessAllowed,
	prOpAccessControlIn:    prAccessAllowed,
	prOpAccessControlOut:   prAccessAllowed,
	prOpPRIn:               prAccessPRIn,
	prOpPROut:              prAccessPROut,
	prOpReserve6:           prAccessReserve,
	prOpReserve10:          prAccessReserve,
	prOpRelease6:           prAccessRelease,
	prOpRelease10:          prAccessRelease,
	prOpRead6:              prAccessRead,
	prOpRead10:             prAccessRead,
	prOpRead12:             prAccessRead,
	prOpRead16:             prAccessRead,
	prOpVerify10:           prAccessRead,
	prOpVerify12:           prAccessRead,
	prOpVerify16:           prAccessRead,
	prOpPrefetch10:         prAccessRead,
	prOpPrefetch16:         prAccessRead,
	prOpReadDefectData10:   prAccessRead,
	prOpReadDefectData12:   prAccessRead,
	prOpReadLong10:         prAccessRead,
	prOpModeSense6:         prAccessRead,
	prOpModeSense10:        prAccessRead,
	prOpReadBuffer:         prAccessRead,
	prOpReadAttribute:      prAccessRead,
	prOpReceiveDiagnostic:  prAccessRead,
	prOpSecurityProtocolIn: prAccessRead,
}

// classifyPR returns cdb's class, looking at service actions and the few
// fields (PREVENT, START) that SPC-4/SBC-3 single out.
func classifyPR(cdb []byte) prAccess {
	if len(cdb) == 0 {
		return prAccessAllowed
	}
	switch cdb[0] {
	case prOpServiceActionIn16:
		if len(cdb) < 2 {
			return prAccessWrite
		}
		switch cdb[1] & 0x1f {
		case 0x10: // READ CAPACITY(16)
			return prAccessAllowed
		case 0x11, 0x12, 0x13: // READ LONG(16), GET LBA STATUS, REPORT REFERRALS
			return prAccessRead
		}
		return prAccessWrite
	case prOpServiceActionIn12:
		if len(cdb) >= 2 && cdb[1]&0x1f == 0x01 { // READ MEDIA SERIAL NUMBER
			return prAccessAllowed
		}
		return prAccessWrite
	case prOpMaintenanceIn:
		if len(cdb) < 2 {
			return prAccessWrite
		}
		switch cdb[1] & 0x1f {
		case 0x05, 0x0A, 0x0B, 0x0E, 0x0F:
			// REPORT IDENTIFYING INFORMATION, REPORT TARGET PORT GROUPS,
			// REPORT ALIASES, REPORT PRIORITY, REPORT TIMESTAMP.
			return prAccessAllowed
		case 0x0C, 0x0D, 0x10:
			// REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS,
			// MANAGEMENT PROTOCOL IN.
			return prAccessRead
		}
		return prAccessWrite
	case prOpPreventAllow:
		if len(cdb) >= 5 && cdb[4]&0x03 == 0 { // allowing removal is harmless
			return prAccessAllowed
		}
		return prAccessWrite
	case prOpStartStopUnit:
		if len(cdb) >= 5 && cdb[4]&0x01 == 1 && cdb[4]>>4 == 0 { // START=1, active
			return prAccessAllowed
		}
		return prAccessWrite
	case prOpVariableLength:
		if len(cdb) >= 10 {
			switch uint16(cdb[8])<<8 | uint16(cdb[9]) {
			case 0x0009, 0x000A: // READ(32), VERIFY(32)
				return prAccessRead
			}
		}
		return prAccessWrite
	}
	return prAccessByOpcode[cdb[0]]
}

// spc2Allowed lists what another I_T nexus may still do while an SPC-2
// RESERVE holds the LU: the commands that report state or give up nothing.
func spc2Allowed(cdb []byte) bool {
	switch cdb[0] {
	case prOpInquiry, prOpRequestSense, prOpReportLUNs, prOpLogSense, prOpRelease6, prOpRelease10:
		return true
	case prOpPreventAllow:
		return len(cdb) >= 5 && cdb[4]&0x03 == 0
	case prOpMaintenanceIn:
		return len(cdb) >= 2 && cdb[1]&0x1f == 0x0A // REPORT TARGET PORT GROUPS
	}
	return false
}

func (h *prHandler) conflicts(n ITNexus, cdb []byte) bool {
	s := h.snap.Load()
	if !s.spc2 && len(s.ports) == 0 {
		// No registration means no persistent reservation either.
		return false
	}
	if len(cdb) == 0 {
		return false
	}
	if s.spc2 {
		// SPC-4 5.13.3: while an SPC-2 reservation exists, PERSISTENT RESERVE
		// IN/OUT conflict whoever sends them.
		if cdb[0] == prOpPRIn || cdb[0] == prOpPROut {
			return true
		}
		if s.spc2Holder == n {
			return false
		}
		return !spc2Allowed(cdb)
	}
	class := classifyPR(cdb)
	switch class {
	case prAccessReserve:
		// SPC-4 5.13.3 with CRH=1: any registration makes RESERVE conflict.
		return true
	case prAccessRelease, prAccessPRIn, prAccessPROut, prAccessAllowed:
		// RELEASE completes GOOD without effect (CRH=1); PROUT is checked
		// against the key by the service action (SPC-4 table 67).
		return false
	}
	if !s.reserved {
		return false
	}
	reg := s.registered(&n)
	if prAllRegistrants(s.typ) || prRegistrantsOnly(s.typ) {
		if reg >= 0 {
			return false
		}
		return !(class == prAccessRead && prWriteExclusive(s.typ))
	}
	if reg >= 0 && reg == s.holder {
		return false
	}
	return !(class == prAccessRead && s.typ == prTypeWriteExclusive)
}
