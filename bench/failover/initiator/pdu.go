package initiator

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"strings"
)

// The few PDU fields this initiator reads and writes (RFC 7143 section 11).
// It is written independently of target/iscsi on purpose: a probe that
// shared the target's codec would share its bugs.

const bhsLen = 48

const (
	opNopOut    = 0x00
	opSCSICmd   = 0x01
	opLoginReq  = 0x03
	opLogoutReq = 0x06
	opDataOut   = 0x05

	opNopIn      = 0x20
	opSCSIResp   = 0x21
	opLoginResp  = 0x23
	opDataIn     = 0x25
	opLogoutResp = 0x26
	opR2T        = 0x31
	opAsync      = 0x32
	opReject     = 0x3f
)

const reservedTag = 0xffffffff

type bhs [bhsLen]byte

func (h *bhs) opcode() byte            { return h[0] & 0x3f }
func (h *bhs) flags() byte             { return h[1] }
func (h *bhs) dataLen() int            { return int(h[5])<<16 | int(h[6])<<8 | int(h[7]) }
func (h *bhs) u32(off int) uint32      { return binary.BigEndian.Uint32(h[off:]) }
func (h *bhs) put32(off int, v uint32) { binary.BigEndian.PutUint32(h[off:], v) }
func (h *bhs) itt() uint32             { return h.u32(16) }
func (h *bhs) ttt() uint32             { return h.u32(20) }
func (h *bhs) statSN() uint32          { return h.u32(24) }

func (h *bhs) setDataLen(n int) {
	h[5], h[6], h[7] = byte(n>>16), byte(n>>8), byte(n)
}

type pdu struct {
	h    bhs
	data []byte
}

func pad4(n int) int { return (n + 3) &^ 3 }

// writePDU sends header and padded data in one write: one segment on the
// wire for small PDUs, and no interleaving if a caller ever shares conns.
func writePDU(w io.Writer, p *pdu) error {
	p.h.setDataLen(len(p.data))
	buf := make([]byte, bhsLen+pad4(len(p.data)))
	copy(buf, p.h[:])
	copy(buf[bhsLen:], p.data)
	_, err := w.Write(buf)
	return err
}

// maxDataSegment bounds what we accept from a peer, which we told the
// target as MaxRecvDataSegmentLength; a bigger segment is a protocol error
// and must not make us allocate without limit.
func readPDU(r io.Reader, maxData int) (*pdu, error) {
	p := &pdu{}
	if _, err := io.ReadFull(r, p.h[:]); err != nil {
		return nil, err
	}
	if ahs := int(p.h[4]) * 4; ahs > 0 {
		if _, err := io.CopyN(io.Discard, r, int64(ahs)); err != nil {
			return nil, err
		}
	}
	n := p.h.dataLen()
	if n > maxData {
		return nil, fmt.Errorf("initiator: data segment of %d bytes exceeds %d", n, maxData)
	}
	if n > 0 {
		buf := make([]byte, pad4(n))
		if _, err := io.ReadFull(r, buf); err != nil {
			return nil, err
		}
		p.data = buf[:n]
	}
	return p, nil
}

// kv is one text key (RFC 7143 section 6); order matters on the wire.
type kv struct{ k, v string }

func encodeText(kvs []kv) []byte {
	var b bytes.Buffer
	for _, x := range kvs {
		b.WriteString(x.k)
		b.WriteByte('=')
		b.WriteString(x.v)
		b.WriteByte(0)
	}
	return b.Bytes()
}

func parseText(data []byte) (map[string]string, []string, error) {
	m := map[string]string{}
	var order []string
	for _, f := range bytes.Split(data, []byte{0}) {
		if len(f) == 0 {
			continue
		}
		k, v, ok := strings.Cut(string(f), "=")
		if !ok {
			return nil, nil, fmt.Errorf("initiator: malformed text key %q", f)
		}
		if _, dup := m[k]; !dup {
			order = append(order, k)
		}
		m[k] = v
	}
	return m, order, nil
}

// encodeLUN uses peripheral addressing below 256 and flat space addressing
// up to 16383 (SAM-5 4.7), as every initiator does.
func encodeLUN(lun uint64) [8]byte {
	var b [8]byte
	if lun < 256 {
		b[1] = byte(lun)
	} else {
		b[0] = 0x40 | byte(lun>>8)&0x3f
		b[1] = byte(lun)
	}
	return b
}
