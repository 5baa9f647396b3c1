package scsi

import (
	"context"
	"encoding/binary"
	"strings"
)

// PERSISTENT RESERVE IN service actions (SPC-4 table 165).
const (
	prInReadKeys           = 0x00
	prInReadReservation    = 0x01
	prInReportCapabilities = 0x02
	prInReadFullStatus     = 0x03
)

// persistentReserveIn answers PERSISTENT RESERVE IN. The LU cuts the result
// to the ALLOCATION LENGTH (bytes 7-8); the length fields inside always
// describe the full list, as SPC-4 requires.
func (h *prHandler) persistentReserveIn(ctx context.Context, n ITNexus, cdb []byte) ([]byte, error) {
	if len(cdb) < 10 {
		return nil, InvalidCDBField(0, -1)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.noteNexusLocked(n)
	st := &h.st
	switch sa := cdb[1] & 0x1f; sa {
	case prInReadKeys:
		out := make([]byte, 8, 8+8*len(st.Registrations))
		binary.BigEndian.PutUint32(out[0:], st.Generation)
		binary.BigEndian.PutUint32(out[4:], uint32(8*len(st.Registrations)))
		for _, r := range st.Registrations {
			out = binary.BigEndian.AppendUint64(out, r.Key)
		}
		return out, nil
	case prInReadReservation:
		out := make([]byte, 8, 24)
		binary.BigEndian.PutUint32(out[0:], st.Generation)
		if st.Holder < 0 {
			return out, nil
		}
		binary.BigEndian.PutUint32(out[4:], 16)
		d := make([]byte, 16)
		if !prAllRegistrants(st.Type) {
			// AR reservations report key 0: every registrant holds them.
			binary.BigEndian.PutUint64(d[0:], st.Registrations[st.Holder].Key)
		}
		d[13] = st.Scope<<4 | st.Type&0x0f
		return append(out, d...), nil
	case prInReportCapabilities:
		out := make([]byte, 8)
		binary.BigEndian.PutUint16(out[0:], 8)
		// CRH, SIP_C, ATP_C, PTPL_C.
		out[2] = 1<<4 | 1<<3 | 1<<2 | 1<<0
		// TMV; ALLOW COMMANDS 010b: TEST UNIT READY passes every type, and
		// MODE SENSE & co. pass Write Exclusive types (pr_conflict.go).
		out[3] = 1<<7 | 0x2<<4
		if st.APTPL {
			out[3] |= 1 // PTPL_A
		}
		// WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX; EX_AC_AR.
		out[4] = 1<<7 | 1<<6 | 1<<5 | 1<<3 | 1<<1
		out[5] = 1 << 0
		return out, nil
	case prInReadFullStatus:
		out := make([]byte, 8, 8+len(st.Registrations)*64)
		binary.BigEndian.PutUint32(out[0:], st.Generation)
		for i, r := range st.Registrations {
			d := make([]byte, 24)
			binary.BigEndian.PutUint64(d[0:], r.Key)
			if r.AllTargetPorts {
				d[12] |= 1 << 1
			}
			if isHolder(st, i) {
				d[12] |= 1 << 0
				d[13] = st.Scope<<4 | st.Type&0x0f
			}
			binary.BigEndian.PutUint16(d[18:], r.RelPortID)
			tid := encodeISCSITransportID(r.InitiatorPort)
			binary.BigEndian.PutUint32(d[20:], uint32(len(tid)))
			out = append(out, d...)
			out = append(out, tid...)
		}
		binary.BigEndian.PutUint32(out[4:], uint32(len(out)-8))
		return out, nil
	default:
		return nil, InvalidCDBField(1, 4)
	}
}

// encodeISCSITransportID builds an iSCSI TransportID (SPC-4 7.6.4.6): format
// 01b with the ISID for an initiator port, 00b for a bare iSCSI name. The
// NUL-terminated name is padded to a multiple of four and to at least 20
// bytes of additional length.
func encodeISCSITransportID(initiatorPort string) []byte {
	format := byte(prTransportIDFormatPort)
	if !strings.Contains(initiatorPort, prInitiatorPortSeparator) {
		format = prTransportIDFormatName
	}
	n := len(initiatorPort) + 1
	n = (n + 3) &^ 3
	if n < 20 {
		n = 20
	}
	out := make([]byte, 4+n)
	out[0] = format<<6 | prTransportIDProtoISCSI
	binary.BigEndian.PutUint16(out[2:], uint16(n))
	copy(out[4:], initiatorPort)
	return out
}
