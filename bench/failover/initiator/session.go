package initiator

import (
	"bufio"
	"context"
	"crypto/md5"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"
)

// DefaultInitiatorName is what Config.InitiatorName defaults to.
const DefaultInitiatorName = "iqn.2026-11.io.hasan:failover-probe"

// Config says where to log in and how.
type Config struct {
	// Portal is host:port (port 3260 if omitted).
	Portal string
	// Target is the target IQN.
	Target string
	// InitiatorName defaults to DefaultInitiatorName.
	InitiatorName string
	// LUN the commands address.
	LUN uint64
	// CHAPUser and CHAPSecret enable one-way CHAP (MD5).
	CHAPUser, CHAPSecret string
	// Dial opens the TCP connection; nil uses net.Dialer. A lab test passes
	// the initiator namespace's DialContext.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

// LoginError is a login refused with a non-zero status (RFC 7143 11.13.5).
type LoginError struct {
	Class, Detail byte
	// TargetAddress is set with class 1 (redirection).
	TargetAddress string
}

func (e *LoginError) Error() string {
	return fmt.Sprintf("initiator: login refused: status class %#02x detail %#02x", e.Class, e.Detail)
}

// CheckError is a SCSI command that completed with a status other than
// GOOD, with its sense data decoded when present.
type CheckError struct {
	Status         byte
	Key, ASC, ASCQ byte
	Sense          []byte
}

func (e *CheckError) Error() string {
	return fmt.Sprintf("initiator: SCSI status %#02x sense key %#x asc/ascq %#02x/%#02x", e.Status, e.Key, e.ASC, e.ASCQ)
}

// UnitAttention reports a CHECK CONDITION with sense key UNIT ATTENTION,
// which a real initiator's SCSI layer retries.
func (e *CheckError) UnitAttention() bool { return e.Status == 0x02 && e.Key == 0x6 }

// ErrRejected: the target answered a PDU with Reject.
var ErrRejected = errors.New("initiator: target rejected the PDU")

// Session is one logged-in iSCSI session with a single connection. It runs
// one command at a time and is not safe for concurrent use.
type Session struct {
	cfg  Config
	conn net.Conn
	r    *bufio.Reader

	isid      [6]byte
	tsih      uint16
	itt       uint32
	cmdSN     uint32
	expStatSN uint32

	// Negotiated (RFC 7143 13).
	maxSendData   int // target's MaxRecvDataSegmentLength
	firstBurst    int
	immediateData bool
	initialR2T    bool

	// AsyncEvents counts Async Message PDUs received (e.g. a target asking
	// for logout before it stops).
	AsyncEvents int
}

const ourMaxRecv = 262144

// Login connects and logs in as a normal session, all within ctx (give it
// the login deadline).
func Login(ctx context.Context, cfg Config) (*Session, error) {
	if cfg.InitiatorName == "" {
		cfg.InitiatorName = DefaultInitiatorName
	}
	if cfg.Target == "" {
		return nil, errors.New("initiator: Config.Target is empty")
	}
	addr := cfg.Portal
	if _, _, err := net.SplitHostPort(addr); err != nil {
		addr = net.JoinHostPort(addr, "3260")
	}
	dial := cfg.Dial
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	conn, err := dial(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("initiator: dial %s: %w", addr, err)
	}
	s := &Session{cfg: cfg, conn: conn, r: bufio.NewReaderSize(conn, 64<<10), itt: 1, cmdSN: 1,
		maxSendData: 8192, firstBurst: 65536, immediateData: true, initialR2T: true}
	_, _ = rand.Read(s.isid[1:])
	s.isid[0] = 0x80 // random qualifier format (RFC 7143 11.12.5)
	if err := s.withDeadline(ctx, s.login); err != nil {
		conn.Close()
		return nil, err
	}
	return s, nil
}

// withDeadline runs f with the connection's deadline following ctx, so a
// cancelled context aborts blocked reads and writes at once.
func (s *Session) withDeadline(ctx context.Context, f func() error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	dl, ok := ctx.Deadline()
	if !ok {
		dl = time.Time{}
	}
	_ = s.conn.SetDeadline(dl)
	stop := context.AfterFunc(ctx, func() { _ = s.conn.SetDeadline(time.Unix(1, 0)) })
	err := f()
	if !stop() || ctx.Err() != nil {
		if err == nil {
			err = ctx.Err()
		} else {
			err = fmt.Errorf("%w (%v)", err, ctx.Err())
		}
	}
	return err
}

func (s *Session) login() error {
	sec := []kv{
		{"InitiatorName", s.cfg.InitiatorName},
		{"SessionType", "Normal"},
		{"TargetName", s.cfg.Target},
	}
	if s.cfg.CHAPUser != "" {
		sec = append(sec, kv{"AuthMethod", "CHAP,None"})
	} else {
		sec = append(sec, kv{"AuthMethod", "None"})
	}
	resp, err := s.loginStep(0, 1, true, sec)
	if err != nil {
		return err
	}
	if resp.m["AuthMethod"] == "CHAP" {
		if s.cfg.CHAPUser == "" {
			return errors.New("initiator: target requires CHAP and no credentials are configured")
		}
		if resp, err = s.loginStep(0, 1, false, []kv{{"CHAP_A", "5"}}); err != nil {
			return err
		}
		if resp.m["CHAP_A"] != "5" {
			return fmt.Errorf("initiator: target chose CHAP_A=%q, only MD5 (5) is supported", resp.m["CHAP_A"])
		}
		id, err := strconv.Atoi(resp.m["CHAP_I"])
		if err != nil || id < 0 || id > 255 {
			return fmt.Errorf("initiator: bad CHAP_I %q", resp.m["CHAP_I"])
		}
		ch, err := decodeCHAPBinary(resp.m["CHAP_C"])
		if err != nil {
			return err
		}
		h := md5.New()
		h.Write([]byte{byte(id)})
		h.Write([]byte(s.cfg.CHAPSecret))
		h.Write(ch)
		if resp, err = s.loginStep(0, 1, true, []kv{{"CHAP_N", s.cfg.CHAPUser}, {"CHAP_R", "0x" + hex.EncodeToString(h.Sum(nil))}}); err != nil {
			return err
		}
	}
	// The target may hold us in the security stage (T=0); ask again.
	for i := 0; !resp.transit; i++ {
		if i == 4 {
			return errors.New("initiator: target never left the security stage")
		}
		if resp, err = s.loginStep(0, 1, true, nil); err != nil {
			return err
		}
	}
	ops := []kv{
		{"HeaderDigest", "None"},
		{"DataDigest", "None"},
		{"MaxRecvDataSegmentLength", strconv.Itoa(ourMaxRecv)},
		{"ImmediateData", "Yes"},
		{"InitialR2T", "No"},
		{"FirstBurstLength", "65536"},
		{"MaxBurstLength", "262144"},
		{"DefaultTime2Wait", "0"},
		{"DefaultTime2Retain", "0"},
		{"MaxOutstandingR2T", "1"},
		{"MaxConnections", "1"},
		{"ErrorRecoveryLevel", "0"},
		{"DataPDUInOrder", "Yes"},
		{"DataSequenceInOrder", "Yes"},
	}
	sent := map[string]bool{}
	for _, x := range ops {
		sent[x.k] = true
	}
	for i := 0; ; i++ {
		if resp, err = s.loginStep(1, 3, true, ops); err != nil {
			return err
		}
		s.absorb(resp.m)
		if resp.transit && resp.nsg == 3 {
			return nil
		}
		if i == 4 {
			return errors.New("initiator: operational negotiation did not finish")
		}
		// Answer keys the target offered by agreeing to its values.
		ops = nil
		for _, k := range resp.order {
			if !sent[k] {
				ops = append(ops, kv{k, resp.m[k]})
				sent[k] = true
			}
		}
	}
}

func (s *Session) absorb(m map[string]string) {
	if v, err := strconv.Atoi(m["MaxRecvDataSegmentLength"]); err == nil && v >= 512 {
		s.maxSendData = v
	}
	if v, err := strconv.Atoi(m["FirstBurstLength"]); err == nil && v >= 512 {
		s.firstBurst = v
	}
	if v, ok := m["ImmediateData"]; ok {
		s.immediateData = v == "Yes"
	}
	if v, ok := m["InitialR2T"]; ok {
		s.initialR2T = v == "Yes"
	}
}

type loginResp struct {
	m       map[string]string
	order   []string
	transit bool
	nsg     byte
}

func (s *Session) loginStep(csg, nsg byte, transit bool, kvs []kv) (loginResp, error) {
	p := &pdu{data: encodeText(kvs)}
	h := &p.h
	h[0] = 0x40 | opLoginReq
	h[1] = csg<<2 | nsg
	if transit {
		h[1] |= 0x80
	}
	copy(h[8:14], s.isid[:])
	binary.BigEndian.PutUint16(h[14:], s.tsih)
	h.put32(16, s.itt)
	h.put32(24, s.cmdSN)
	h.put32(28, s.expStatSN)
	if err := writePDU(s.conn, p); err != nil {
		return loginResp{}, fmt.Errorf("initiator: login: %w", err)
	}
	var data []byte
	var r *pdu
	for {
		var err error
		if r, err = readPDU(s.r, ourMaxRecv); err != nil {
			return loginResp{}, fmt.Errorf("initiator: login: %w", err)
		}
		if r.h.opcode() != opLoginResp {
			return loginResp{}, fmt.Errorf("initiator: login: unexpected opcode %#02x", r.h.opcode())
		}
		if class := r.h[36]; class != 0 {
			le := &LoginError{Class: class, Detail: r.h[37]}
			if m, _, err := parseText(r.data); err == nil {
				le.TargetAddress = m["TargetAddress"]
			}
			return loginResp{}, le
		}
		s.expStatSN = r.h.statSN() + 1
		data = append(data, r.data...)
		if r.h.flags()&0x40 == 0 { // C bit clear: the text is complete
			break
		}
		// Continue: an empty request fetches the rest (RFC 7143 6.2).
		q := &pdu{}
		q.h = p.h
		q.h[1] &^= 0x80
		q.h.put32(28, s.expStatSN)
		if err := writePDU(s.conn, q); err != nil {
			return loginResp{}, fmt.Errorf("initiator: login: %w", err)
		}
	}
	s.tsih = binary.BigEndian.Uint16(r.h[14:])
	m, order, err := parseText(data)
	if err != nil {
		return loginResp{}, err
	}
	return loginResp{m: m, order: order, transit: r.h.flags()&0x80 != 0, nsg: r.h.flags() & 3}, nil
}

func decodeCHAPBinary(v string) ([]byte, error) {
	lo := strings.ToLower(v)
	if h, ok := strings.CutPrefix(lo, "0x"); ok {
		b, err := hex.DecodeString(h)
		if err != nil {
			return nil, fmt.Errorf("initiator: bad CHAP challenge: %w", err)
		}
		return b, nil
	}
	return nil, fmt.Errorf("initiator: CHAP challenge %q not in hex (0x...) form", v)
}

// Close drops the connection without logging out, as a crashed initiator
// would; the target cleans up the session.
func (s *Session) Close() error { return s.conn.Close() }

// LocalAddr and RemoteAddr identify the TCP connection (for tickle ACK
// bookkeeping in cluster tests).
func (s *Session) LocalAddr() net.Addr  { return s.conn.LocalAddr() }
func (s *Session) RemoteAddr() net.Addr { return s.conn.RemoteAddr() }
