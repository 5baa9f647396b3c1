package replication

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// MsgType names a replication protocol message.
type MsgType uint8

// Protocol messages. Every data-path message carries the sender's epoch; a
// replica answers a message whose epoch is lower than the highest it has
// persisted with MsgReject and does not act on it.
const (
	// MsgHello opens a stream: primary → replica. Volume, From, Epoch, Gen
	// (the primary's generation), Len (the volume size).
	MsgHello MsgType = iota + 1
	// MsgHelloAck answers Hello: Gen (the replica's generation), Len (its
	// size) and Regions (the activity log it holds).
	MsgHelloAck
	// MsgReject refuses a message: Epoch is the replica's highest epoch.
	MsgReject
	// MsgWrite carries Data for Off. FlagFUA asks for durability before the
	// ack; FlagResync marks resync or repair traffic.
	MsgWrite
	// MsgUnmap deallocates [Off, Off+Len).
	MsgUnmap
	// MsgFlush makes every write the replica has acknowledged durable.
	MsgFlush
	// MsgAL replaces the replica's copy of the primary's activity log with
	// Regions; it is persisted before any later message is applied.
	MsgAL
	// MsgGen sets the replica's generation to Gen (persisted).
	MsgGen
	// MsgResize grows the replica to Len bytes.
	MsgResize
	// MsgChecksum asks for the SHA-256 of [Off, Off+Len); the ack carries it
	// in Data.
	MsgChecksum
	// MsgAck completes Seq; Err is non-empty when the replica failed it.
	MsgAck
)

var msgNames = [...]string{"?", "Hello", "HelloAck", "Reject", "Write", "Unmap", "Flush", "AL", "Gen", "Resize", "Checksum", "Ack"}

func (t MsgType) String() string {
	if int(t) < len(msgNames) {
		return msgNames[t]
	}
	return fmt.Sprintf("Msg(%d)", t)
}

// Message flags.
const (
	FlagFUA uint8 = 1 << iota
	FlagResync
	// FlagFresh on a HelloAck: the replica was created together with the
	// volume, at its creation generation, and holds only zeros since
	// (Meta.Fresh). On any message from a primary: the primary is fresh
	// (has never written), so the message leaves a fresh replica fresh; a
	// replica clears its Fresh on the first message without it.
	FlagFresh
	// FlagSynced on a MsgGen from a fresh primary: the replica has caught
	// up and holds exactly the primary's zeros, so it becomes fresh.
	FlagSynced
)

// Message is one protocol message. Fields not used by a type are zero.
type Message struct {
	Type    MsgType
	Flags   uint8
	Epoch   uint64
	Seq     uint64
	Gen     uint64
	Off     int64
	Len     int64
	Volume  string
	From    string
	Err     string
	Regions []uint64
	Data    []byte
	// Hold, when set, is the reference count of the buffer Data points
	// into (a caller's WriteAt buffer). The codec ignores it; the state
	// machine only carries it over from the Request.
	Hold *Hold
}

func (m Message) String() string {
	s := fmt.Sprintf("%s e%d", m.Type, m.Epoch)
	if m.Seq != 0 {
		s += fmt.Sprintf(" seq=%d", m.Seq)
	}
	switch m.Type {
	case MsgHello:
		s += fmt.Sprintf(" gen=%x size=%d", m.Gen, m.Len)
	case MsgHelloAck:
		s += fmt.Sprintf(" gen=%x size=%d al=%v", m.Gen, m.Len, m.Regions)
	case MsgWrite:
		s += fmt.Sprintf(" off=%d data=%q", m.Off, m.Data)
	case MsgUnmap, MsgChecksum:
		s += fmt.Sprintf(" off=%d len=%d", m.Off, m.Len)
	case MsgAL:
		s += fmt.Sprintf(" al=%v", m.Regions)
	case MsgGen:
		s += fmt.Sprintf(" gen=%x", m.Gen)
	case MsgResize:
		s += fmt.Sprintf(" size=%d", m.Len)
	case MsgAck:
		if len(m.Data) > 0 {
			s += fmt.Sprintf(" sum=%x", m.Data[:4])
		}
	}
	if m.Flags&FlagFUA != 0 {
		s += " fua"
	}
	if m.Flags&FlagResync != 0 {
		s += " resync"
	}
	if m.Flags&FlagFresh != 0 {
		s += " fresh"
	}
	if m.Flags&FlagSynced != 0 {
		s += " synced"
	}
	if m.Err != "" {
		s += " err=" + m.Err
	}
	return s
}

// Wire format: a fixed 60-byte header, then the variable parts.
//
//	u32 magic 'HREP' | u8 type | u8 flags | u16 reserved
//	u64 epoch | u64 seq | u64 gen | i64 off | i64 len
//	u16 len(volume) | u16 len(from) | u16 len(err) | u16 count(regions)
//	u32 len(data)
//	volume | from | err | regions (u64 each) | data
const (
	wireMagic     = 0x48524550
	headerLen     = 4 + 4 + 5*8 + 4*2 + 4
	maxDataLen    = 64 << 20
	maxRegionList = 1 << 16
)

// ErrProtocol marks a malformed message; the connection that carried it is
// closed.
var ErrProtocol = errors.New("replication: protocol error")

// encodeMessage writes m to w.
func encodeMessage(w *bufio.Writer, m *Message) error {
	h, errStr, err := encodeHeader(m)
	if err != nil {
		return err
	}
	if _, err := w.Write(h[:]); err != nil {
		return err
	}
	w.Write(appendVariable(nil, m, errStr))
	_, err = w.Write(m.Data)
	return err
}

// encodeHeader builds m's fixed header and returns the error string as it
// goes on the wire (truncated).
func encodeHeader(m *Message) ([headerLen]byte, string, error) {
	var h [headerLen]byte
	if len(m.Volume) > 0xffff || len(m.From) > 0xffff || len(m.Regions) >= maxRegionList || len(m.Data) > maxDataLen {
		return h, "", fmt.Errorf("%w: message too large", ErrProtocol)
	}
	errStr := m.Err
	if len(errStr) > 1024 {
		errStr = errStr[:1024]
	}
	binary.BigEndian.PutUint32(h[0:], wireMagic)
	h[4] = byte(m.Type)
	h[5] = m.Flags
	binary.BigEndian.PutUint64(h[8:], m.Epoch)
	binary.BigEndian.PutUint64(h[16:], m.Seq)
	binary.BigEndian.PutUint64(h[24:], m.Gen)
	binary.BigEndian.PutUint64(h[32:], uint64(m.Off))
	binary.BigEndian.PutUint64(h[40:], uint64(m.Len))
	binary.BigEndian.PutUint16(h[48:], uint16(len(m.Volume)))
	binary.BigEndian.PutUint16(h[50:], uint16(len(m.From)))
	binary.BigEndian.PutUint16(h[52:], uint16(len(errStr)))
	binary.BigEndian.PutUint16(h[54:], uint16(len(m.Regions)))
	binary.BigEndian.PutUint32(h[56:], uint32(len(m.Data)))
	return h, errStr, nil
}

// appendVariable appends the variable parts before the data: volume, from,
// error string and regions.
func appendVariable(b []byte, m *Message, errStr string) []byte {
	b = append(b, m.Volume...)
	b = append(b, m.From...)
	b = append(b, errStr...)
	for _, r := range m.Regions {
		b = binary.BigEndian.AppendUint64(b, r)
	}
	return b
}

func decodeMessage(r *bufio.Reader) (Message, error) { return decodeMessageFrom(r, nil, nil) }

// directReadMin is the unbuffered remainder of a payload from which it is
// read straight from the connection into its own buffer rather than through
// the bufio.Reader (which would copy every byte once more).
const directReadMin = 32 << 10

// decodeMessageFrom reads one message from r. raw, if not nil, is the
// connection under r: large payloads are read from it directly once r's
// buffered bytes are used up. alloc, if not nil, provides the payload
// buffer (len n).
func decodeMessageFrom(r *bufio.Reader, raw io.Reader, alloc func(n int) []byte) (Message, error) {
	var h [headerLen]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return Message{}, err
	}
	if binary.BigEndian.Uint32(h[0:]) != wireMagic {
		return Message{}, fmt.Errorf("%w: bad magic", ErrProtocol)
	}
	m := Message{
		Type:  MsgType(h[4]),
		Flags: h[5],
		Epoch: binary.BigEndian.Uint64(h[8:]),
		Seq:   binary.BigEndian.Uint64(h[16:]),
		Gen:   binary.BigEndian.Uint64(h[24:]),
		Off:   int64(binary.BigEndian.Uint64(h[32:])),
		Len:   int64(binary.BigEndian.Uint64(h[40:])),
	}
	if h[6] != 0 || h[7] != 0 {
		// Reserved for later use: a peer that sets it speaks a protocol
		// this node does not, and must not be half-understood.
		return Message{}, fmt.Errorf("%w: reserved header bits set", ErrProtocol)
	}
	if m.Type < MsgHello || m.Type > MsgAck {
		return Message{}, fmt.Errorf("%w: unknown type %d", ErrProtocol, h[4])
	}
	nv, nf, ne := int(binary.BigEndian.Uint16(h[48:])), int(binary.BigEndian.Uint16(h[50:])), int(binary.BigEndian.Uint16(h[52:]))
	nr := int(binary.BigEndian.Uint16(h[54:]))
	nd := binary.BigEndian.Uint32(h[56:])
	if nd > maxDataLen || ne > 1024 {
		return Message{}, fmt.Errorf("%w: oversized message", ErrProtocol)
	}
	strs := make([]byte, nv+nf+ne)
	if _, err := io.ReadFull(r, strs); err != nil {
		return Message{}, err
	}
	m.Volume, m.From, m.Err = string(strs[:nv]), string(strs[nv:nv+nf]), string(strs[nv+nf:])
	if nr > 0 {
		rb := make([]byte, 8*nr)
		if _, err := io.ReadFull(r, rb); err != nil {
			return Message{}, err
		}
		m.Regions = make([]uint64, nr)
		for i := range m.Regions {
			m.Regions[i] = binary.BigEndian.Uint64(rb[8*i:])
		}
	}
	if nd > 0 {
		if alloc != nil {
			m.Data = alloc(int(nd))
		} else {
			m.Data = make([]byte, nd)
		}
		if raw != nil && int(nd)-r.Buffered() >= directReadMin {
			b, _ := r.Peek(r.Buffered())
			n := copy(m.Data, b)
			r.Discard(n)
			if _, err := io.ReadFull(raw, m.Data[n:]); err != nil {
				return Message{}, err
			}
		} else if _, err := io.ReadFull(r, m.Data); err != nil {
			return Message{}, err
		}
	}
	return m, nil
}
