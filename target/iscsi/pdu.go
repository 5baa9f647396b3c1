package iscsi

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// BHSLen is the size of the Basic Header Segment (RFC 7143 11.2.1).
const BHSLen = 48

// Opcode is the iSCSI PDU opcode (6 bits).
type Opcode uint8

// Initiator opcodes.
const (
	OpNopOut      Opcode = 0x00
	OpSCSICmd     Opcode = 0x01
	OpTaskMgmtReq Opcode = 0x02
	OpLoginReq    Opcode = 0x03
	OpTextReq     Opcode = 0x04
	OpDataOut     Opcode = 0x05
	OpLogoutReq   Opcode = 0x06
	OpSNACKReq    Opcode = 0x10
)

// Target opcodes.
const (
	OpNopIn        Opcode = 0x20
	OpSCSIResp     Opcode = 0x21
	OpTaskMgmtResp Opcode = 0x22
	OpLoginResp    Opcode = 0x23
	OpTextResp     Opcode = 0x24
	OpDataIn       Opcode = 0x25
	OpLogoutResp   Opcode = 0x26
	OpR2T          Opcode = 0x31
	OpAsyncMsg     Opcode = 0x32
	OpReject       Opcode = 0x3f
)

var opNames = map[Opcode]string{
	OpNopOut: "NOP-Out", OpSCSICmd: "SCSI-Command", OpTaskMgmtReq: "TMF-Request",
	OpLoginReq: "Login-Request", OpTextReq: "Text-Request", OpDataOut: "Data-Out",
	OpLogoutReq: "Logout-Request", OpSNACKReq: "SNACK", OpNopIn: "NOP-In",
	OpSCSIResp: "SCSI-Response", OpTaskMgmtResp: "TMF-Response", OpLoginResp: "Login-Response",
	OpTextResp: "Text-Response", OpDataIn: "Data-In", OpLogoutResp: "Logout-Response",
	OpR2T: "R2T", OpAsyncMsg: "Async-Message", OpReject: "Reject",
}

func (o Opcode) String() string {
	if s, ok := opNames[o]; ok {
		return s
	}
	return fmt.Sprintf("opcode(%#02x)", uint8(o))
}

// ReservedTag is the all-ones Initiator/Target Task Tag meaning "none".
const ReservedTag = 0xffffffff

// Flag bits in byte 1.
const (
	FlagFinal    = 0x80
	FlagContinue = 0x40 // Text/Login C bit
	FlagTransit  = 0x80 // Login T bit
	FlagRead     = 0x40 // SCSI Command R
	FlagWrite    = 0x20 // SCSI Command W
	FlagAck      = 0x40 // Data-In A
	FlagStatus   = 0x01 // Data-In S
	// Residual bits of SCSI Response and Data-In.
	FlagBidiOverflow  = 0x10
	FlagBidiUnderflow = 0x08
	FlagOverflow      = 0x04
	FlagUnderflow     = 0x02
)

// BHS is a Basic Header Segment. Field accessors are named after RFC 7143;
// where two PDU types put different fields at one offset, both names exist
// and the caller picks the one matching Opcode.
type BHS [BHSLen]byte

func (h *BHS) u32(off int) uint32        { return binary.BigEndian.Uint32(h[off:]) }
func (h *BHS) put32(off int, v uint32)   { binary.BigEndian.PutUint32(h[off:], v) }
func (h *BHS) u16(off int) uint16        { return binary.BigEndian.Uint16(h[off:]) }
func (h *BHS) put16(off int, v uint16)   { binary.BigEndian.PutUint16(h[off:], v) }
func (h *BHS) Opcode() Opcode            { return Opcode(h[0] & 0x3f) }
func (h *BHS) Immediate() bool           { return h[0]&0x40 != 0 }
func (h *BHS) Flags() byte               { return h[1] }
func (h *BHS) Final() bool               { return h[1]&FlagFinal != 0 }
func (h *BHS) TotalAHSLength() int       { return int(h[4]) * 4 }
func (h *BHS) DataSegmentLength() uint32 { return uint32(h[5])<<16 | uint32(h[6])<<8 | uint32(h[7]) }
func (h *BHS) LUN() [8]byte              { return [8]byte(h[8:16]) }
func (h *BHS) ITT() uint32               { return h.u32(16) }

// SetOpcode sets opcode and the immediate bit (initiator PDUs only).
func (h *BHS) SetOpcode(op Opcode, immediate bool) {
	h[0] = byte(op) & 0x3f
	if immediate {
		h[0] |= 0x40
	}
}
func (h *BHS) SetFlags(f byte)    { h[1] = f }
func (h *BHS) SetLUN(l [8]byte)   { copy(h[8:16], l[:]) }
func (h *BHS) SetITT(v uint32)    { h.put32(16, v) }
func (h *BHS) setAHSLength(n int) { h[4] = byte(n / 4) }

// SetDataSegmentLength stores n (24 bits; larger values are truncated, which
// the encoder prevents by checking MaxDataSegment).
func (h *BHS) SetDataSegmentLength(n uint32) {
	h[5], h[6], h[7] = byte(n>>16), byte(n>>8), byte(n)
}

// Fields at offset 20.
func (h *BHS) TTT() uint32                            { return h.u32(20) }
func (h *BHS) SetTTT(v uint32)                        { h.put32(20, v) }
func (h *BHS) ExpectedDataTransferLength() uint32     { return h.u32(20) }
func (h *BHS) SetExpectedDataTransferLength(v uint32) { h.put32(20, v) }
func (h *BHS) RefTaskTag() uint32                     { return h.u32(20) }
func (h *BHS) SetRefTaskTag(v uint32)                 { h.put32(20, v) }
func (h *BHS) CID() uint16                            { return h.u16(20) }
func (h *BHS) SetCID(v uint16)                        { h.put16(20, v) }

// Fields at offsets 24..47.
func (h *BHS) CmdSN() uint32                         { return h.u32(24) }
func (h *BHS) SetCmdSN(v uint32)                     { h.put32(24, v) }
func (h *BHS) StatSN() uint32                        { return h.u32(24) }
func (h *BHS) SetStatSN(v uint32)                    { h.put32(24, v) }
func (h *BHS) ExpStatSN() uint32                     { return h.u32(28) }
func (h *BHS) SetExpStatSN(v uint32)                 { h.put32(28, v) }
func (h *BHS) ExpCmdSN() uint32                      { return h.u32(28) }
func (h *BHS) SetExpCmdSN(v uint32)                  { h.put32(28, v) }
func (h *BHS) MaxCmdSN() uint32                      { return h.u32(32) }
func (h *BHS) SetMaxCmdSN(v uint32)                  { h.put32(32, v) }
func (h *BHS) RefCmdSN() uint32                      { return h.u32(32) }
func (h *BHS) SetRefCmdSN(v uint32)                  { h.put32(32, v) }
func (h *BHS) DataSN() uint32                        { return h.u32(36) }
func (h *BHS) SetDataSN(v uint32)                    { h.put32(36, v) }
func (h *BHS) R2TSN() uint32                         { return h.u32(36) }
func (h *BHS) SetR2TSN(v uint32)                     { h.put32(36, v) }
func (h *BHS) ExpDataSN() uint32                     { return h.u32(36) }
func (h *BHS) SetExpDataSN(v uint32)                 { h.put32(36, v) }
func (h *BHS) BufferOffset() uint32                  { return h.u32(40) }
func (h *BHS) SetBufferOffset(v uint32)              { h.put32(40, v) }
func (h *BHS) BegRun() uint32                        { return h.u32(40) }
func (h *BHS) ResidualCount() uint32                 { return h.u32(44) }
func (h *BHS) SetResidualCount(v uint32)             { h.put32(44, v) }
func (h *BHS) DesiredDataTransferLength() uint32     { return h.u32(44) }
func (h *BHS) SetDesiredDataTransferLength(v uint32) { h.put32(44, v) }
func (h *BHS) RunLength() uint32                     { return h.u32(44) }
func (h *BHS) BidiReadResidualCount() uint32         { return h.u32(40) }

// CDB returns the 16-byte CDB field of a SCSI Command (a view, not a copy).
func (h *BHS) CDB() []byte { return h[32:48] }

// TaskAttr is the SCSI Command ATTR field (0 untagged, 1 simple, 2 ordered,
// 3 head of queue, 4 ACA).
func (h *BHS) TaskAttr() uint8 { return h[1] & 0x07 }

// Response (SCSI/TMF/Logout response byte) and Status (SCSI status byte).
func (h *BHS) Response() uint8     { return h[2] }
func (h *BHS) SetResponse(v uint8) { h[2] = v }
func (h *BHS) Status() uint8       { return h[3] }
func (h *BHS) SetStatus(v uint8)   { h[3] = v }

// Function is the TMF function (byte 1 without the F bit).
func (h *BHS) Function() uint8 { return h[1] & 0x7f }

// ReasonCode is the Logout reason code (byte 1 without the F bit).
func (h *BHS) ReasonCode() uint8 { return h[1] & 0x7f }

// SNACKType is the SNACK type (low nibble of byte 1).
func (h *BHS) SNACKType() uint8 { return h[1] & 0x0f }

// RejectReason is the Reject reason (byte 2).
func (h *BHS) RejectReason() uint8 { return h[2] }

// Login fields.
func (h *BHS) Transit() bool                      { return h[1]&FlagTransit != 0 }
func (h *BHS) Continue() bool                     { return h[1]&FlagContinue != 0 }
func (h *BHS) CSG() uint8                         { return (h[1] >> 2) & 3 }
func (h *BHS) NSG() uint8                         { return h[1] & 3 }
func (h *BHS) VersionMax() uint8                  { return h[2] }
func (h *BHS) VersionMin() uint8                  { return h[3] }
func (h *BHS) ISID() [6]byte                      { return [6]byte(h[8:14]) }
func (h *BHS) SetISID(v [6]byte)                  { copy(h[8:14], v[:]) }
func (h *BHS) TSIH() uint16                       { return h.u16(14) }
func (h *BHS) SetTSIH(v uint16)                   { h.put16(14, v) }
func (h *BHS) StatusClass() uint8                 { return h[36] }
func (h *BHS) StatusDetail() uint8                { return h[37] }
func (h *BHS) SetLoginStatus(class, detail uint8) { h[36], h[37] = class, detail }

// SetLoginStages sets T, C, CSG and NSG of a login PDU.
func (h *BHS) SetLoginStages(transit, cont bool, csg, nsg uint8) {
	f := (csg&3)<<2 | nsg&3
	if transit {
		f |= FlagTransit
	}
	if cont {
		f |= FlagContinue
	}
	h[1] = f
}

// Logout response timers.
func (h *BHS) SetTime2Wait(v uint16)   { h.put16(40, v) }
func (h *BHS) SetTime2Retain(v uint16) { h.put16(42, v) }

// Async Message fields.
func (h *BHS) AsyncEvent() uint8 { return h[36] }

// SetAsync sets AsyncEvent, AsyncVCode and Parameter1..3.
func (h *BHS) SetAsync(event, vcode uint8, p1, p2, p3 uint16) {
	h[36], h[37] = event, vcode
	h.put16(38, p1)
	h.put16(40, p2)
	h.put16(42, p3)
}

// PDU is one decoded PDU. AHS and Data alias buffers owned by whoever
// decoded it.
type PDU struct {
	BHS  BHS
	AHS  []byte
	Data []byte
}

// Errors from the codec. ErrDataDigest leaves the stream in sync (the whole
// PDU was consumed) so the caller may Reject and continue; the others do not.
var (
	ErrHeaderDigest     = errors.New("iscsi: header digest mismatch")
	ErrDataDigest       = errors.New("iscsi: data digest mismatch")
	ErrDataSegmentLimit = errors.New("iscsi: data segment longer than negotiated limit")
	ErrAHSTooLong       = errors.New("iscsi: additional header segment too long")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// CRC32C returns the iSCSI digest of p.
func CRC32C(p []byte) uint32 { return crc32.Checksum(p, castagnoli) }

func pad4(n uint32) uint32 { return (4 - n%4) % 4 }

// Reader decodes PDUs from a byte stream. It is not safe for concurrent use.
type Reader struct {
	R io.Reader
	// HeaderDigest and DataDigest say whether CRC32C digests follow the
	// header and the data segment.
	HeaderDigest, DataDigest bool
	// MaxDataSegment bounds DataSegmentLength; 0 means 16 MiB - 1 (the
	// protocol maximum).
	MaxDataSegment uint32

	hdr     [BHSLen + 255*4 + 4]byte
	dsl     uint32
	pending bool // header read, data not yet
}

// ReadHeader reads the BHS, any AHS and the header digest into p (p.AHS
// aliases the Reader's buffer until the next call). The data segment must
// then be consumed with ReadData or DiscardData. ErrDataSegmentLimit is
// returned after the header is decoded, so p.BHS is valid for logging.
func (r *Reader) ReadHeader(p *PDU) error {
	if r.pending {
		if err := r.DiscardData(); err != nil {
			return err
		}
	}
	if _, err := io.ReadFull(r.R, r.hdr[:BHSLen]); err != nil {
		return err
	}
	copy(p.BHS[:], r.hdr[:BHSLen])
	ahs := p.BHS.TotalAHSLength()
	n := BHSLen + ahs
	if ahs > 0 {
		if _, err := io.ReadFull(r.R, r.hdr[BHSLen:n]); err != nil {
			return unexpectedEOF(err)
		}
		p.AHS = r.hdr[BHSLen:n]
	} else {
		p.AHS = nil
	}
	if r.HeaderDigest {
		var d [4]byte
		if _, err := io.ReadFull(r.R, d[:]); err != nil {
			return unexpectedEOF(err)
		}
		if CRC32C(r.hdr[:n]) != binary.LittleEndian.Uint32(d[:]) {
			return ErrHeaderDigest
		}
	}
	r.dsl = p.BHS.DataSegmentLength()
	max := r.MaxDataSegment
	if max == 0 {
		max = 1<<24 - 1
	}
	if r.dsl > max {
		return fmt.Errorf("%w: %d > %d", ErrDataSegmentLimit, r.dsl, max)
	}
	r.pending = true
	p.Data = nil
	return nil
}

// DataLen is the data segment length of the header just read.
func (r *Reader) DataLen() uint32 {
	if !r.pending {
		return 0
	}
	return r.dsl
}

// ReadData reads the pending data segment into dst, which must be exactly
// DataLen bytes long, then skips padding and checks the data digest.
func (r *Reader) ReadData(dst []byte) error {
	if !r.pending || uint32(len(dst)) != r.dsl {
		return fmt.Errorf("iscsi: ReadData with %d bytes for a %d byte segment", len(dst), r.dsl)
	}
	r.pending = false
	if r.dsl == 0 {
		return nil
	}
	if _, err := io.ReadFull(r.R, dst); err != nil {
		return unexpectedEOF(err)
	}
	return r.trailer(CRC32C(dst))
}

// DiscardData consumes the pending data segment without keeping it. Its
// digest, when negotiated, is still checked.
func (r *Reader) DiscardData() error {
	if !r.pending {
		return nil
	}
	r.pending = false
	crc := crc32.New(castagnoli)
	if _, err := io.CopyN(crc, r.R, int64(r.dsl)); err != nil {
		return unexpectedEOF(err)
	}
	if r.dsl == 0 {
		return nil
	}
	return r.trailer(crc.Sum32())
}

func (r *Reader) trailer(sum uint32) error {
	var t [8]byte
	n := pad4(r.dsl)
	if r.DataDigest {
		n += 4
	}
	if _, err := io.ReadFull(r.R, t[:n]); err != nil {
		return unexpectedEOF(err)
	}
	if r.DataDigest {
		padN := pad4(r.dsl)
		if padN > 0 {
			sum = crc32.Update(sum, castagnoli, t[:padN])
		}
		if sum != binary.LittleEndian.Uint32(t[padN:n]) {
			return ErrDataDigest
		}
	}
	return nil
}

// ReadPDU reads a whole PDU, storing the data segment in p.Data (reusing its
// capacity).
func (r *Reader) ReadPDU(p *PDU) error {
	old := p.Data
	if err := r.ReadHeader(p); err != nil {
		return err
	}
	n := int(r.dsl)
	if cap(old) >= n {
		p.Data = old[:n]
	} else {
		p.Data = make([]byte, n)
	}
	return r.ReadData(p.Data)
}

func unexpectedEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// AppendHeader appends the encoded header of a PDU (BHS with its length
// fields set from ahs and dataLen, the AHS, and the header digest when hd)
// to dst. ahs must be a multiple of 4 bytes long.
func AppendHeader(dst []byte, h *BHS, ahs []byte, dataLen uint32, hd bool) []byte {
	h.setAHSLength(len(ahs))
	h.SetDataSegmentLength(dataLen)
	start := len(dst)
	dst = append(dst, h[:]...)
	dst = append(dst, ahs...)
	if hd {
		dst = binary.LittleEndian.AppendUint32(dst, CRC32C(dst[start:]))
	}
	return dst
}

// AppendTrailer appends the padding and (when dd) the data digest that
// follow data on the wire. Together with AppendHeader it lets a writer send
// header, payload and trailer as three buffers (writev) without copying the
// payload.
func AppendTrailer(dst []byte, data []byte, dd bool) []byte {
	if len(data) == 0 {
		return dst
	}
	var zero [3]byte
	p := pad4(uint32(len(data)))
	dst = append(dst, zero[:p]...)
	if dd {
		sum := crc32.Update(CRC32C(data), castagnoli, zero[:p])
		dst = binary.LittleEndian.AppendUint32(dst, sum)
	}
	return dst
}

// AppendPDU appends the complete wire form of p to dst.
func AppendPDU(dst []byte, p *PDU, hd, dd bool) []byte {
	dst = AppendHeader(dst, &p.BHS, p.AHS, uint32(len(p.Data)), hd)
	dst = append(dst, p.Data...)
	return AppendTrailer(dst, p.Data, dd)
}

// WritePDU encodes p and writes it to w in one Write call.
func WritePDU(w io.Writer, p *PDU, hd, dd bool) error {
	buf := AppendPDU(make([]byte, 0, BHSLen+len(p.AHS)+len(p.Data)+12), p, hd, dd)
	_, err := w.Write(buf)
	return err
}

// ExtendedCDB returns the CDB of a SCSI Command: the 16 bytes in the BHS
// followed by the Extended CDB AHS (type 1), if present. It reports an
// error for a malformed AHS.
func ExtendedCDB(h *BHS, ahs []byte) ([]byte, error) {
	cdb := h.CDB()
	for len(ahs) > 0 {
		if len(ahs) < 4 {
			return nil, fmt.Errorf("iscsi: truncated AHS (%d bytes)", len(ahs))
		}
		l := int(binary.BigEndian.Uint16(ahs[0:2]))
		typ := ahs[2]
		total := 3 + l
		total += int(pad4(uint32(total)))
		if total > len(ahs) || l < 1 {
			return nil, fmt.Errorf("iscsi: AHS length %d exceeds segment", l)
		}
		if typ == 1 {
			ext := ahs[4 : 3+l]
			out := make([]byte, 0, 16+len(ext))
			out = append(out, cdb...)
			return append(out, ext...), nil
		}
		ahs = ahs[total:]
	}
	return cdb, nil
}
