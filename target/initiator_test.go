package target

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/target/iscsi"
	"github.com/hasan-storage/hasan/target/scsi"
)

// --- a small in-memory LU -----------------------------------------------------

// memLU is a fake LUN: READ(10)/WRITE(10) on memory, TEST UNIT READY and a
// minimal INQUIRY. It counts calls in flight and can be gated.
type memLU struct {
	mu       sync.Mutex
	data     []byte
	resets   []scsi.ResetKind
	lost     []scsi.ITNexus
	changed  int
	inflight atomic.Int32
	peak     atomic.Int32
	calls    atomic.Int64
	delay    time.Duration
	// gate, when non-nil, blocks Execute until it is closed or ctx ends.
	gate chan struct{}
	// entered receives one value per Execute that reached the gate.
	entered chan uint32
	panicOn byte
}

func newMemLU(size int) *memLU { return &memLU{data: make([]byte, size)} }

func (m *memLU) Execute(ctx context.Context, cmd *scsi.Command) *scsi.Response {
	n := m.inflight.Add(1)
	defer m.inflight.Add(-1)
	m.calls.Add(1)
	for {
		p := m.peak.Load()
		if n <= p || m.peak.CompareAndSwap(p, n) {
			break
		}
	}
	if m.panicOn != 0 && cmd.CDB[0] == m.panicOn {
		panic("memLU: asked to panic")
	}
	if m.entered != nil {
		m.entered <- cmd.Tag
	}
	if m.gate != nil {
		select {
		case <-m.gate:
		case <-ctx.Done():
			return &scsi.Response{Status: scsi.StatusTaskAborted}
		}
	}
	if m.delay > 0 {
		time.Sleep(m.delay)
	}
	cdb := cmd.CDB
	switch cdb[0] {
	case 0x00: // TEST UNIT READY
		return &scsi.Response{Status: scsi.StatusGood}
	case 0x12: // INQUIRY
		d := make([]byte, 36)
		d[2], d[3], d[4] = 6, 2, 31
		copy(d[8:], "HASANTST")
		alloc := int(binary.BigEndian.Uint16(cdb[3:5]))
		if alloc < len(d) {
			d = d[:alloc]
		}
		return &scsi.Response{Status: scsi.StatusGood, Data: d, Transferred: uint32(len(d))}
	case 0x28, 0x2a: // READ(10), WRITE(10) with 512-byte blocks
		lba := int(binary.BigEndian.Uint32(cdb[2:6]))
		n := int(binary.BigEndian.Uint16(cdb[7:9])) * 512
		off := lba * 512
		if off+n > len(m.data) {
			return scsi.CheckResponse(scsi.Check(scsi.ReasonLBAOutOfRange), false)
		}
		m.mu.Lock()
		defer m.mu.Unlock()
		if cdb[0] == 0x28 {
			return &scsi.Response{Status: scsi.StatusGood, Data: append([]byte(nil), m.data[off:off+n]...), Transferred: uint32(n)}
		}
		copy(m.data[off:off+n], cmd.DataOut)
		return &scsi.Response{Status: scsi.StatusGood, Transferred: uint32(n)}
	}
	return scsi.CheckResponse(scsi.Check(scsi.ReasonInvalidOpcode), false)
}

func (m *memLU) Reset(kind scsi.ResetKind, _ scsi.ITNexus) {
	m.mu.Lock()
	m.resets = append(m.resets, kind)
	m.mu.Unlock()
}

func (m *memLU) NexusLost(n scsi.ITNexus) {
	m.mu.Lock()
	m.lost = append(m.lost, n)
	m.mu.Unlock()
}

func (m *memLU) LUNsChanged() {
	m.mu.Lock()
	m.changed++
	m.mu.Unlock()
}

func (m *memLU) bytes(off, n int) []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]byte(nil), m.data[off:off+n]...)
}

func (m *memLU) lostCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.lost)
}

// --- server fixture -------------------------------------------------------------

const testIQN = "iqn.2026-11.io.hasan:test"
const testInitiatorName = "iqn.2026-11.io.hasan:initiator"

func startServer(t testing.TB, cfg Config) (*Server, string) {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	srv := NewServer(cfg)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return srv, ln.Addr().String()
}

func startWithLU(t testing.TB, cfg Config, tc TargetConfig) (*Server, string, *memLU) {
	t.Helper()
	srv, addr := startServer(t, cfg)
	if tc.Name == "" {
		tc.Name = testIQN
	}
	if err := srv.AddTarget(tc); err != nil {
		t.Fatal(err)
	}
	lu := newMemLU(8 << 20)
	if err := srv.AddLUN(tc.Name, 0, lu); err != nil {
		t.Fatal(err)
	}
	return srv, addr, lu
}

// --- the initiator ----------------------------------------------------------------

type initiator struct {
	t    testing.TB
	nc   net.Conn
	rd   iscsi.Reader
	name string
	isid [6]byte
	tsih uint16

	cmdSN, expStatSN uint32
	itt              uint32
	hd, dd           bool
	// Negotiated, target side.
	mxdsl         uint32 // target's MaxRecvDataSegmentLength
	firstBurst    uint32
	maxBurst      uint32
	immediateData bool
	initialR2T    bool
	// answerPings replies to target NOP-In pings while waiting.
	answerPings bool
	async       []iscsi.BHS
}

func dial(t testing.TB, addr string) *initiator {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	ini := &initiator{t: t, nc: nc, name: testInitiatorName, isid: [6]byte{0x80, 0, 0, 0, 0, 1},
		cmdSN: 1, itt: 0x100, mxdsl: 8192, firstBurst: 65536, maxBurst: 262144, immediateData: true,
		initialR2T: true, answerPings: true}
	ini.rd.R = bufio.NewReader(nc)
	return ini
}

type loginOpts struct {
	target     string
	discovery  bool
	chapUser   string
	chapSecret string
	// mutual CHAP: the secret we expect the target to prove.
	mutualUser, mutualSecret string
	// reflect sends the target's own challenge back (must fail).
	reflect bool
	ops     []iscsi.KV
	tsih    uint16
}

// login runs a full login and returns the final status (class<<8|detail).
func (ini *initiator) login(o loginOpts) (uint16, error) {
	ini.tsih = o.tsih
	sec := []iscsi.KV{{Key: "InitiatorName", Value: ini.name}}
	if o.discovery {
		sec = append(sec, iscsi.KV{Key: "SessionType", Value: "Discovery"})
	} else {
		sec = append(sec, iscsi.KV{Key: "SessionType", Value: "Normal"}, iscsi.KV{Key: "TargetName", Value: o.target})
	}
	auth := "None"
	if o.chapUser != "" {
		auth = "CHAP"
	}
	sec = append(sec, iscsi.KV{Key: "AuthMethod", Value: auth})
	resp, status, err := ini.loginPDU(0, 1, auth == "None", sec)
	if err != nil || status != 0 {
		return status, err
	}
	if auth == "CHAP" {
		if resp["AuthMethod"] != "CHAP" {
			return 0, fmt.Errorf("AuthMethod answer %q", resp["AuthMethod"])
		}
		resp, status, err = ini.loginPDU(0, 1, false, []iscsi.KV{{Key: "CHAP_A", Value: "5"}})
		if err != nil || status != 0 {
			return status, err
		}
		id, _ := strconv.Atoi(resp["CHAP_I"])
		ch, _, err := iscsi.DecodeCHAPBinary(resp["CHAP_C"])
		if err != nil {
			return 0, err
		}
		ans := []iscsi.KV{{Key: "CHAP_N", Value: o.chapUser},
			{Key: "CHAP_R", Value: iscsi.EncodeCHAPBinary(iscsi.CHAPResponse(byte(id), o.chapSecret, ch), false)}}
		myCh := []byte("sixteen byte chl")
		if o.reflect {
			myCh = ch
		}
		if o.mutualSecret != "" || o.reflect {
			ans = append(ans, iscsi.KV{Key: "CHAP_I", Value: "77"}, iscsi.KV{Key: "CHAP_C", Value: iscsi.EncodeCHAPBinary(myCh, false)})
		}
		resp, status, err = ini.loginPDU(0, 1, true, ans)
		if err != nil || status != 0 {
			return status, err
		}
		if o.mutualSecret != "" {
			r, _, err := iscsi.DecodeCHAPBinary(resp["CHAP_R"])
			if err != nil || resp["CHAP_N"] != o.mutualUser || string(r) != string(iscsi.CHAPResponse(77, o.mutualSecret, myCh)) {
				return 0, fmt.Errorf("target failed mutual CHAP: %v", resp)
			}
		}
	}
	ops := o.ops
	if ops == nil {
		ops = []iscsi.KV{{Key: "HeaderDigest", Value: "None"}, {Key: "DataDigest", Value: "None"},
			{Key: "MaxRecvDataSegmentLength", Value: "65536"}}
	}
	resp, status, err = ini.loginPDU(1, 3, true, ops)
	if err != nil || status != 0 {
		return status, err
	}
	ini.hd = resp["HeaderDigest"] == "CRC32C"
	ini.dd = resp["DataDigest"] == "CRC32C"
	if v, err := strconv.Atoi(resp["MaxRecvDataSegmentLength"]); err == nil {
		ini.mxdsl = uint32(v)
	}
	if v, err := strconv.Atoi(resp["FirstBurstLength"]); err == nil {
		ini.firstBurst = uint32(v)
	}
	if v, err := strconv.Atoi(resp["MaxBurstLength"]); err == nil {
		ini.maxBurst = uint32(v)
	}
	if v, ok := resp["ImmediateData"]; ok {
		ini.immediateData = v == "Yes"
	}
	if v, ok := resp["InitialR2T"]; ok {
		ini.initialR2T = v == "Yes"
	}
	ini.rd.HeaderDigest, ini.rd.DataDigest = ini.hd, ini.dd
	return 0, nil
}

// loginPDU sends one login request (handling a C-bit continuation from the
// target) and returns the answered keys and status.
func (ini *initiator) loginPDU(csg, nsg uint8, transit bool, kvs []iscsi.KV) (map[string]string, uint16, error) {
	p := &iscsi.PDU{Data: iscsi.AppendText(nil, kvs)}
	h := &p.BHS
	h.SetOpcode(iscsi.OpLoginReq, true)
	h.SetLoginStages(transit, false, csg, nsg)
	h.SetISID(ini.isid)
	h.SetTSIH(ini.tsih)
	h.SetITT(ini.itt)
	h.SetCmdSN(ini.cmdSN)
	h.SetExpStatSN(ini.expStatSN)
	if err := iscsi.WritePDU(ini.nc, p, false, false); err != nil {
		return nil, 0, err
	}
	var r iscsi.PDU
	_ = ini.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	defer ini.nc.SetReadDeadline(time.Time{})
	if err := ini.rd.ReadPDU(&r); err != nil {
		return nil, 0, err
	}
	if r.BHS.Opcode() != iscsi.OpLoginResp {
		return nil, 0, fmt.Errorf("got %v during login", r.BHS.Opcode())
	}
	ini.expStatSN = r.BHS.StatSN() + 1
	status := uint16(r.BHS.StatusClass())<<8 | uint16(r.BHS.StatusDetail())
	if r.BHS.TSIH() != 0 {
		ini.tsih = r.BHS.TSIH()
	}
	kv, err := iscsi.ParseText(r.Data)
	if err != nil {
		return nil, status, err
	}
	m := map[string]string{}
	for _, x := range kv {
		m[x.Key] = x.Value
	}
	return m, status, nil
}

func (ini *initiator) send(p *iscsi.PDU) {
	ini.t.Helper()
	if err := iscsi.WritePDU(ini.nc, p, ini.hd, ini.dd); err != nil {
		ini.t.Fatalf("send %v: %v", p.BHS.Opcode(), err)
	}
}

// recv returns the next PDU, answering pings and recording async messages.
func (ini *initiator) recv(timeout time.Duration) (*iscsi.PDU, error) {
	for {
		_ = ini.nc.SetReadDeadline(time.Now().Add(timeout))
		p := &iscsi.PDU{}
		if err := ini.rd.ReadPDU(p); err != nil {
			return nil, err
		}
		h := &p.BHS
		if h.Opcode() != iscsi.OpDataIn || h.Flags()&iscsi.FlagStatus != 0 {
			if sn := h.StatSN(); h.Opcode() != iscsi.OpR2T && !(h.Opcode() == iscsi.OpNopIn && h.TTT() != iscsi.ReservedTag) {
				ini.expStatSN = sn + 1
			}
		}
		if h.Opcode() == iscsi.OpNopIn && h.TTT() != iscsi.ReservedTag {
			if ini.answerPings {
				q := &iscsi.PDU{}
				q.BHS.SetOpcode(iscsi.OpNopOut, true)
				q.BHS.SetFlags(iscsi.FlagFinal)
				q.BHS.SetITT(iscsi.ReservedTag)
				q.BHS.SetTTT(h.TTT())
				q.BHS.SetCmdSN(ini.cmdSN)
				ini.send(q)
			}
			continue
		}
		if h.Opcode() == iscsi.OpAsyncMsg {
			ini.async = append(ini.async, *h)
			continue
		}
		return p, nil
	}
}

func (ini *initiator) nextITT() uint32 { ini.itt++; return ini.itt }

type scsiResult struct {
	status   scsi.Status
	sense    []byte
	data     []byte
	flags    byte
	residual uint32
}

func cdb10(op byte, lba uint32, blocks uint16) []byte {
	c := make([]byte, 16)
	c[0] = op
	binary.BigEndian.PutUint32(c[2:], lba)
	binary.BigEndian.PutUint16(c[7:], blocks)
	return c
}

// command issues a SCSI command and runs its data phase to completion.
func (ini *initiator) command(lun uint64, cdb []byte, read bool, out []byte, edtl uint32) (*scsiResult, error) {
	itt := ini.nextITT()
	p := &iscsi.PDU{}
	h := &p.BHS
	h.SetOpcode(iscsi.OpSCSICmd, false)
	f := byte(iscsi.FlagFinal | 1)
	if read {
		f |= iscsi.FlagRead
	}
	if out != nil {
		f |= iscsi.FlagWrite
	}
	h.SetLUN(scsi.EncodeLUN(lun))
	h.SetITT(itt)
	h.SetExpectedDataTransferLength(edtl)
	h.SetCmdSN(ini.cmdSN)
	ini.cmdSN++
	h.SetExpStatSN(ini.expStatSN)
	copy(h.CDB(), cdb)
	sent := uint32(0)
	unsol := uint32(0)
	if out != nil && !ini.initialR2T {
		unsol = min(ini.firstBurst, uint32(len(out)))
	}
	if out != nil && ini.immediateData {
		n := min(ini.mxdsl, ini.firstBurst, uint32(len(out)))
		p.Data = out[:n]
		sent = n
	}
	if out != nil && sent < unsol {
		f &^= iscsi.FlagFinal
	}
	h.SetFlags(f)
	ini.send(p)
	// Unsolicited Data-Out up to FirstBurstLength.
	var dsn uint32
	for sent < unsol {
		n := min(ini.mxdsl, unsol-sent)
		d := &iscsi.PDU{Data: out[sent : sent+n]}
		d.BHS.SetOpcode(iscsi.OpDataOut, false)
		if sent+n == unsol {
			d.BHS.SetFlags(iscsi.FlagFinal)
		}
		d.BHS.SetITT(itt)
		d.BHS.SetTTT(iscsi.ReservedTag)
		d.BHS.SetDataSN(dsn)
		d.BHS.SetBufferOffset(sent)
		d.BHS.SetExpStatSN(ini.expStatSN)
		ini.send(d)
		dsn++
		sent += n
	}
	res := &scsiResult{}
	for {
		r, err := ini.recv(5 * time.Second)
		if err != nil {
			return nil, err
		}
		rh := &r.BHS
		if rh.ITT() != itt {
			return nil, fmt.Errorf("unexpected %v for itt %#x", rh.Opcode(), rh.ITT())
		}
		switch rh.Opcode() {
		case iscsi.OpR2T:
			off, want := rh.BufferOffset(), rh.DesiredDataTransferLength()
			var sn uint32
			for done := uint32(0); done < want; {
				n := min(ini.mxdsl, want-done)
				d := &iscsi.PDU{Data: out[off+done : off+done+n]}
				d.BHS.SetOpcode(iscsi.OpDataOut, false)
				if done+n == want {
					d.BHS.SetFlags(iscsi.FlagFinal)
				}
				d.BHS.SetITT(itt)
				d.BHS.SetTTT(rh.TTT())
				d.BHS.SetDataSN(sn)
				d.BHS.SetBufferOffset(off + done)
				ini.send(d)
				sn++
				done += n
			}
		case iscsi.OpDataIn:
			if int(rh.BufferOffset()) != len(res.data) {
				return nil, fmt.Errorf("Data-In offset %d, have %d", rh.BufferOffset(), len(res.data))
			}
			res.data = append(res.data, r.Data...)
			if rh.Flags()&iscsi.FlagStatus != 0 {
				res.status = scsi.Status(rh.Status())
				res.flags = rh.Flags() & (iscsi.FlagOverflow | iscsi.FlagUnderflow)
				res.residual = rh.ResidualCount()
				return res, nil
			}
		case iscsi.OpSCSIResp:
			res.status = scsi.Status(rh.Status())
			res.flags = rh.Flags() & (iscsi.FlagOverflow | iscsi.FlagUnderflow)
			res.residual = rh.ResidualCount()
			if len(r.Data) >= 2 {
				res.sense = r.Data[2:]
			}
			return res, nil
		default:
			return nil, fmt.Errorf("unexpected %v", rh.Opcode())
		}
	}
}

func (ini *initiator) write(lun uint64, lba uint32, data []byte) *scsiResult {
	ini.t.Helper()
	r, err := ini.command(lun, cdb10(0x2a, lba, uint16(len(data)/512)), false, data, uint32(len(data)))
	if err != nil {
		ini.t.Fatalf("write: %v", err)
	}
	return r
}

func (ini *initiator) read(lun uint64, lba uint32, n int) *scsiResult {
	ini.t.Helper()
	r, err := ini.command(lun, cdb10(0x28, lba, uint16(n/512)), true, nil, uint32(n))
	if err != nil {
		ini.t.Fatalf("read: %v", err)
	}
	return r
}

func (ini *initiator) logout() error {
	p := &iscsi.PDU{}
	p.BHS.SetOpcode(iscsi.OpLogoutReq, true)
	p.BHS.SetFlags(iscsi.FlagFinal)
	p.BHS.SetITT(ini.nextITT())
	p.BHS.SetCmdSN(ini.cmdSN)
	p.BHS.SetExpStatSN(ini.expStatSN)
	ini.send(p)
	r, err := ini.recv(5 * time.Second)
	if err != nil {
		return err
	}
	if r.BHS.Opcode() != iscsi.OpLogoutResp || r.BHS.Response() != 0 {
		return fmt.Errorf("logout answer %v response %d", r.BHS.Opcode(), r.BHS.Response())
	}
	// The target closes the connection after the response.
	if _, err := ini.recv(2 * time.Second); !errors.Is(err, io.EOF) {
		return fmt.Errorf("connection still open after logout: %v", err)
	}
	return nil
}

// expectClosed waits for the target to close the connection.
func (ini *initiator) expectClosed(within time.Duration) error {
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		_, err := ini.recv(time.Until(deadline))
		if err == nil {
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return fmt.Errorf("connection not closed within %v", within)
		}
		return nil
	}
	return fmt.Errorf("connection not closed within %v", within)
}

func loginOK(t testing.TB, addr string, o loginOpts) *initiator {
	t.Helper()
	ini := dial(t, addr)
	if o.target == "" && !o.discovery {
		o.target = testIQN
	}
	st, err := ini.login(o)
	if err != nil || st != 0 {
		t.Fatalf("login: status %#04x err %v", st, err)
	}
	return ini
}
