package scsi

import (
	"encoding/binary"
	"sort"
)

// Opcodes the transport has to recognise before a LU exists.
const (
	opInquiry      = 0x12
	opRequestSense = 0x03
	opReportLUNs   = 0xA0
)

// EncodeLUN returns the 8-byte SAM LUN for lun using peripheral (<256) or flat
// space addressing, as iSCSI initiators expect.
func EncodeLUN(lun uint64) [8]byte {
	var b [8]byte
	switch {
	case lun < 256:
		b[1] = byte(lun)
	default:
		binary.BigEndian.PutUint16(b[:2], uint16(0x4000|lun&0x3FFF))
	}
	return b
}

// DecodeLUN is the inverse of EncodeLUN for the addressing methods it emits;
// other methods return ok=false.
func DecodeLUN(b [8]byte) (lun uint64, ok bool) {
	switch b[0] >> 6 {
	case 0:
		return uint64(b[1]) | uint64(b[0]&0x3F)<<8, true
	case 1:
		return uint64(binary.BigEndian.Uint16(b[:2]) & 0x3FFF), true
	}
	return 0, false
}

// ReportLUNs answers REPORT LUNS for a target exporting luns. REPORT LUNS is a
// target-level command: the transport calls this whatever LUN it was sent to.
func ReportLUNs(cmd *Command, luns []uint64) *Response {
	cdb := cmd.CDB
	if len(cdb) < 12 {
		return CheckResponse(InvalidCDBField(0, -1), false)
	}
	switch cdb[2] { // SELECT REPORT
	case 0x00, 0x02, 0x11:
	case 0x01: // well-known LUNs only: we have none
		luns = nil
	default:
		return CheckResponse(InvalidCDBField(2, -1), false)
	}
	alloc := binary.BigEndian.Uint32(cdb[6:10])
	if alloc < 16 && alloc != 0 {
		return CheckResponse(InvalidCDBField(6, -1), false)
	}
	sorted := append([]uint64(nil), luns...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	data := make([]byte, 8+8*len(sorted))
	binary.BigEndian.PutUint32(data[0:4], uint32(8*len(sorted)))
	for i, l := range sorted {
		e := EncodeLUN(l)
		copy(data[8+8*i:], e[:])
	}
	if uint32(len(data)) > alloc {
		data = data[:alloc]
	}
	return &Response{Status: StatusGood, Data: data, Transferred: uint32(len(data))}
}

// NoSuchLUN answers a command addressed to a LUN the target does not export
// (SPC-4 5.11): INQUIRY reports peripheral qualifier 3, REQUEST SENSE returns
// LOGICAL UNIT NOT SUPPORTED as data, anything else gets CHECK CONDITION.
func NoSuchLUN(cmd *Command) *Response {
	if len(cmd.CDB) == 0 {
		return CheckResponse(Check(ReasonLUNotSupported), false)
	}
	switch cmd.CDB[0] {
	case opInquiry:
		if len(cmd.CDB) < 6 {
			return CheckResponse(InvalidCDBField(0, -1), false)
		}
		if cmd.CDB[1]&0x01 != 0 { // EVPD on a LUN that is not there
			return CheckResponse(Check(ReasonLUNotSupported), false)
		}
		alloc := int(binary.BigEndian.Uint16(cmd.CDB[3:5]))
		data := make([]byte, 36)
		data[0] = 0x7F // qualifier 3, device type 0x1F: no LU here
		data[2] = 0x06 // SPC-4
		data[3] = 0x02
		data[4] = 36 - 5
		if len(data) > alloc {
			data = data[:alloc]
		}
		return &Response{Status: StatusGood, Data: data, Transferred: uint32(len(data))}
	case opRequestSense:
		if len(cmd.CDB) < 6 {
			return CheckResponse(InvalidCDBField(0, -1), false)
		}
		desc := cmd.CDB[1]&0x01 != 0
		data := BuildSense(Check(ReasonLUNotSupported), desc)
		if alloc := int(cmd.CDB[4]); len(data) > alloc {
			data = data[:alloc]
		}
		return &Response{Status: StatusGood, Data: data, Transferred: uint32(len(data))}
	case opReportLUNs:
		// Handled by the transport with the real LUN list.
	}
	return CheckResponse(Check(ReasonLUNotSupported), false)
}

// CheckResponse turns a CheckError into a CHECK CONDITION response with sense
// in fixed (descriptor=false) or descriptor format.
func CheckResponse(e *CheckError, descriptor bool) *Response {
	return &Response{Status: StatusCheckCondition, Sense: BuildSense(e, descriptor)}
}

// BuildSense encodes e as sense data (SPC-4 4.5). Fixed format is 18 bytes;
// descriptor format carries the information and sense-key-specific
// descriptors only when set.
func BuildSense(e *CheckError, descriptor bool) []byte {
	c := e.Reason.Code()
	var sks [3]byte
	if e.Field != nil {
		sks[0] = 0x80 // SKSV
		if e.Field.InCDB {
			sks[0] |= 0x40
		}
		if e.Field.Bit >= 0 && e.Field.Bit <= 7 {
			sks[0] |= 0x08 | byte(e.Field.Bit) // BPV + bit pointer
		}
		binary.BigEndian.PutUint16(sks[1:], e.Field.Byte)
	}
	if descriptor {
		b := []byte{0x72, c.Key & 0x0F, c.ASC, c.ASCQ, 0, 0, 0, 0}
		if e.InfoValid {
			d := make([]byte, 12)
			d[0], d[1], d[2] = 0x00, 0x0A, 0x80
			binary.BigEndian.PutUint64(d[4:], e.Info)
			b = append(b, d...)
		}
		if e.Field != nil {
			b = append(b, 0x02, 0x06, 0, 0, sks[0], sks[1], sks[2], 0)
		}
		b[7] = byte(len(b) - 8)
		return b
	}
	b := make([]byte, 18)
	b[0] = 0x70
	if e.InfoValid && e.Info <= 0xFFFFFFFF {
		// VALID only when the value fits the 4-byte field (SPC-4 4.5.3).
		b[0] |= 0x80
		binary.BigEndian.PutUint32(b[3:7], uint32(e.Info))
	}
	b[2] = c.Key & 0x0F
	b[7] = 10
	b[12], b[13] = c.ASC, c.ASCQ
	copy(b[15:18], sks[:])
	return b
}
