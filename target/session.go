package target

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/bits"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hasan-storage/hasan/target/iscsi"
	"github.com/hasan-storage/hasan/target/scsi"
)

// Reject reasons (RFC 7143 11.17.1).
const (
	rejectDataDigest    = 0x02
	rejectProtocolError = 0x04
	rejectNotSupported  = 0x05
	rejectInvalidField  = 0x09
)

// TMF functions and responses (RFC 7143 11.5.1, 11.6.1).
const (
	tmfAbortTask     = 1
	tmfAbortTaskSet  = 2
	tmfClearACA      = 3
	tmfClearTaskSet  = 4
	tmfLUNReset      = 5
	tmfTargetWarm    = 6
	tmfTargetCold    = 7
	tmfTaskReassign  = 8
	tmfRespComplete  = 0
	tmfRespNoTask    = 1
	tmfRespNoLUN     = 2
	tmfRespNoReassig = 4
	tmfRespNotSupp   = 5
	tmfRespRejected  = 255
)

// maxWriteBuffer bounds the Data-Out buffer of one task. Larger writes end
// in CHECK CONDITION instead of letting an initiator make us allocate
// gigabytes.
const maxWriteBuffer = 64 << 20

type taskState uint8

const (
	taskCollecting taskState = iota // waiting for Data-Out
	taskRunning                     // LU.Execute in progress
	taskDone
)

type r2t struct {
	ttt          uint32
	off, len     uint32
	next, dataSN uint32
}

// task is one SCSI command. Data-phase fields belong to the session's
// reader goroutine; state, aborted and done transitions happen under
// session.mu.
type task struct {
	bhs       iscsi.BHS
	itt       uint32
	immediate bool
	lunRaw    [8]byte
	cdb       []byte
	read      bool
	write     bool
	edtl      uint32
	attr      scsi.TaskAttr

	buf         []byte
	got         uint32
	unsolLimit  uint32
	unsolDone   bool
	unsolDataSN uint32
	r2tNext     uint32
	r2tSN       uint32
	r2ts        []*r2t
	tooBig      bool

	ctx    context.Context
	cancel context.CancelFunc
	state  taskState
	abort  bool
	done   chan struct{}
}

// session is one iSCSI session; with MaxConnections=1 it has exactly one
// connection and lives exactly as long as it.
type session struct {
	srv       *Server
	conn      *conn
	log       *slog.Logger
	target    *target // nil for discovery
	nexus     scsi.ITNexus
	tsih      uint16
	cid       uint16
	discovery bool
	params    iscsi.Params
	neg       *iscsi.Negotiator
	loggedIn  time.Time
	mxdsl     atomic.Uint32

	expCmdSN, maxCmdSN atomic.Uint32

	mu      sync.Mutex
	window  *iscsi.CmdWindow[func()]
	tasks   map[uint32]*task
	nextTTT uint32
	running sync.WaitGroup
	closed  chan struct{}

	// Text exchange state (reader goroutine only).
	textBuf     iscsi.TextBuffer
	textPending [][]byte
	textTTT     uint32
}

func newSession(l *loginState) *session {
	p := l.neg.Params
	s := &session{
		srv:       l.srv,
		conn:      l.conn,
		log:       l.conn.log,
		target:    l.target,
		tsih:      0,
		cid:       l.cid,
		discovery: l.discovery,
		params:    p,
		neg:       l.neg,
		loggedIn:  time.Now(),
		window:    iscsi.NewCmdWindow[func()](l.cmdSN, l.srv.cfg.CmdWindow),
		tasks:     map[uint32]*task{},
		closed:    make(chan struct{}),
	}
	if l.tcfg != nil {
		s.nexus = nexusFor(l.initiator, l.isid, l.tcfg)
	} else {
		s.nexus = scsi.ITNexus{InitiatorName: l.initiator, ISID: l.isid}
	}
	s.mxdsl.Store(p.MaxXmitDataSegmentLength)
	s.expCmdSN.Store(s.window.ExpCmdSN())
	s.maxCmdSN.Store(s.window.MaxCmdSN())
	return s
}

func (s *session) key() sessionKey {
	return sessionKey{initiator: s.nexus.InitiatorName, isid: s.nexus.ISID, target: s.nexus.TargetName}
}

func (s *session) info() SessionInfo {
	return SessionInfo{
		TargetName:    s.nexus.TargetName,
		InitiatorName: s.nexus.InitiatorName,
		ISID:          s.nexus.ISID,
		TSIH:          s.tsih,
		Discovery:     s.discovery,
		RemoteAddr:    s.conn.nc.RemoteAddr().String(),
		LocalAddr:     s.conn.nc.LocalAddr().String(),
		HeaderDigest:  s.params.HeaderDigest,
		DataDigest:    s.params.DataDigest,
		LoggedInAt:    s.loggedIn,
	}
}

func (s *session) waitClosed(ctx context.Context) error {
	select {
	case <-s.closed:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("target: waiting for session %d to close: %w", s.tsih, ctx.Err())
	}
}

// protocolError is a fault that ends the connection (ERL 0 recovery is
// session recovery).
type protocolError struct{ msg string }

func (e *protocolError) Error() string { return "target: protocol error: " + e.msg }

func protoErr(format string, args ...any) error {
	return &protocolError{msg: fmt.Sprintf(format, args...)}
}

// readLoop is the connection's only reader. It decodes PDUs and dispatches
// them; SCSI commands run on their own goroutines.
func (s *session) readLoop() error {
	c := s.conn
	var p iscsi.PDU
	for {
		if err := c.rd.ReadHeader(&p); err != nil {
			if errors.Is(err, iscsi.ErrDataSegmentLimit) {
				return protoErr("%v (opcode %v)", err, p.BHS.Opcode())
			}
			return err
		}
		c.lastRecv.Store(time.Now().UnixNano())
		if err := s.dispatch(&p); err != nil {
			return err
		}
	}
}

// readData reads the pending data segment into a new slice. A data digest
// error is reported so the caller can Reject.
func (s *session) readData() ([]byte, error) {
	n := s.conn.rd.DataLen()
	if n == 0 {
		return nil, s.conn.rd.ReadData(nil)
	}
	b := make([]byte, n)
	return b, s.conn.rd.ReadData(b)
}

func (s *session) dispatch(p *iscsi.PDU) error {
	h := p.BHS
	op := h.Opcode()
	if s.discovery {
		switch op {
		case iscsi.OpTextReq, iscsi.OpLogoutReq, iscsi.OpNopOut:
		default:
			if err := s.conn.rd.DiscardData(); err != nil && !errors.Is(err, iscsi.ErrDataDigest) {
				return err
			}
			s.reject(&h, rejectNotSupported)
			return nil
		}
	}
	switch op {
	case iscsi.OpSCSICmd:
		return s.onSCSICmd(p)
	case iscsi.OpDataOut:
		return s.onDataOut(&h)
	case iscsi.OpNopOut:
		return s.onNopOut(&h)
	case iscsi.OpTaskMgmtReq:
		if err := s.conn.rd.DiscardData(); err != nil {
			return err
		}
		s.ordered(&h, func() { s.onTMF(&h) })
	case iscsi.OpTextReq:
		data, err := s.readData()
		if errors.Is(err, iscsi.ErrDataDigest) {
			s.reject(&h, rejectDataDigest)
			return protoErr("data digest error on Text Request")
		} else if err != nil {
			return err
		}
		s.ordered(&h, func() { s.onText(&h, data) })
	case iscsi.OpLogoutReq:
		if err := s.conn.rd.DiscardData(); err != nil {
			return err
		}
		s.ordered(&h, func() { s.onLogout(&h) })
	case iscsi.OpSNACKReq:
		if err := s.conn.rd.DiscardData(); err != nil && !errors.Is(err, iscsi.ErrDataDigest) {
			return err
		}
		// ERL 0: no SNACK support.
		s.reject(&h, rejectProtocolError)
	case iscsi.OpLoginReq:
		_ = s.conn.rd.DiscardData()
		s.reject(&h, rejectProtocolError)
		return protoErr("login request in full feature phase")
	default:
		if err := s.conn.rd.DiscardData(); err != nil && !errors.Is(err, iscsi.ErrDataDigest) {
			return err
		}
		s.reject(&h, rejectNotSupported)
	}
	return nil
}

// ordered runs fn now for an immediate PDU, or in CmdSN order otherwise;
// fn must call s.complete for non-immediate PDUs (ordered does it for
// everything except SCSI tasks, which complete when they finish).
func (s *session) ordered(h *iscsi.BHS, fn func()) {
	if h.Immediate() {
		fn()
		return
	}
	s.submit(h.CmdSN(), func() {
		s.complete()
		fn()
	})
}

// submit offers a non-immediate command to the CmdSN window and runs what
// became deliverable.
func (s *session) submit(cmdSN uint32, fn func()) bool {
	s.mu.Lock()
	ready, ok := s.window.Submit(cmdSN, fn)
	s.expCmdSN.Store(s.window.ExpCmdSN())
	s.mu.Unlock()
	if !ok {
		s.log.Debug("target: dropping command outside the CmdSN window", "cmdsn", cmdSN,
			"exp_cmdsn", s.expCmdSN.Load(), "max_cmdsn", s.maxCmdSN.Load())
		return false
	}
	for _, f := range ready {
		f()
	}
	return true
}

// complete opens one slot in the CmdSN window (a command finished).
func (s *session) complete() {
	s.mu.Lock()
	s.window.Complete()
	s.maxCmdSN.Store(s.window.MaxCmdSN())
	s.mu.Unlock()
}

func (s *session) reject(h *iscsi.BHS, reason uint8) {
	p := &outPDU{advanceStatSN: true}
	p.bhs.SetOpcode(iscsi.OpReject, false)
	p.bhs.SetFlags(iscsi.FlagFinal)
	p.bhs.SetResponse(reason)
	p.bhs.SetITT(iscsi.ReservedTag)
	p.data = append([]byte(nil), h[:]...)
	s.log.Info("target: rejecting PDU", "opcode", h.Opcode().String(), "reason", reason, "itt", h.ITT())
	s.conn.send(p)
}

func (s *session) onNopOut(h *iscsi.BHS) error {
	data, err := s.readData()
	if errors.Is(err, iscsi.ErrDataDigest) {
		s.reject(h, rejectDataDigest)
		if !h.Immediate() {
			return protoErr("data digest error on non-immediate NOP-Out")
		}
		return nil
	} else if err != nil {
		return err
	}
	if h.TTT() != iscsi.ReservedTag {
		// Answer to our ping; lastRecv already proves liveness.
		s.conn.pingSent.Store(0)
		if !h.Immediate() {
			s.submit(h.CmdSN(), s.complete)
		}
		return nil
	}
	itt, lun := h.ITT(), h.LUN()
	reply := func() {
		if itt == iscsi.ReservedTag {
			return
		}
		p := &outPDU{advanceStatSN: true, data: data}
		p.bhs.SetOpcode(iscsi.OpNopIn, false)
		p.bhs.SetFlags(iscsi.FlagFinal)
		p.bhs.SetLUN(lun)
		p.bhs.SetITT(itt)
		p.bhs.SetTTT(iscsi.ReservedTag)
		s.conn.send(p)
	}
	s.ordered(h, reply)
	return nil
}

// --- SCSI commands -------------------------------------------------------

func (s *session) onSCSICmd(p *iscsi.PDU) error {
	h := &p.BHS
	rd := &s.conn.rd
	dsl := rd.DataLen()
	t := &task{
		bhs:       *h,
		itt:       h.ITT(),
		immediate: h.Immediate(),
		lunRaw:    h.LUN(),
		read:      h.Flags()&iscsi.FlagRead != 0,
		write:     h.Flags()&iscsi.FlagWrite != 0,
		edtl:      h.ExpectedDataTransferLength(),
		attr:      scsi.TaskAttr(h.TaskAttr()),
		done:      make(chan struct{}),
	}
	if len(p.AHS) > 0 {
		cdb, err := iscsi.ExtendedCDB(h, p.AHS)
		if err != nil {
			_ = rd.DiscardData()
			s.reject(h, rejectInvalidField)
			return protoErr("%v", err)
		}
		t.cdb = cdb
	} else {
		t.cdb = t.bhs.CDB()
	}
	if dsl > 0 && (!t.write || !s.params.ImmediateData || dsl > t.edtl || dsl > s.params.FirstBurstLength) {
		_ = rd.DiscardData()
		s.reject(h, rejectProtocolError)
		return protoErr("unexpected immediate data (%d bytes, EDTL %d, W=%v)", dsl, t.edtl, t.write)
	}
	if t.write && t.edtl > maxWriteBuffer {
		t.tooBig = true
		if err := rd.DiscardData(); err != nil {
			return err
		}
	} else if t.write {
		t.buf = s.srv.getBuf(int(t.edtl))
		if err := rd.ReadData(t.buf[:dsl]); err != nil {
			if errors.Is(err, iscsi.ErrDataDigest) {
				s.reject(h, rejectDataDigest)
				return protoErr("data digest error on immediate data")
			}
			return err
		}
		t.got = dsl
	} else if err := rd.ReadData(nil); err != nil {
		return err
	}
	if t.write {
		t.unsolLimit = t.got
		if !s.params.InitialR2T {
			t.unsolLimit = max(t.got, min(s.params.FirstBurstLength, t.edtl))
		}
		t.unsolDone = h.Final()
	} else {
		t.unsolDone = true
	}
	if t.immediate {
		s.startTask(t)
		return nil
	}
	if !s.submit(h.CmdSN(), func() { s.startTask(t) }) {
		s.srv.putBuf(t.buf)
	}
	return nil
}

// startTask registers a delivered task and either runs it or asks for its
// data.
func (s *session) startTask(t *task) {
	t.ctx, t.cancel = context.WithCancel(context.Background())
	s.mu.Lock()
	if _, dup := s.tasks[t.itt]; dup {
		s.mu.Unlock()
		s.log.Warn("target: task tag already in use", "itt", t.itt)
		s.reject(&t.bhs, rejectInvalidField)
		if !t.immediate {
			s.complete()
		}
		t.cancel()
		return
	}
	s.tasks[t.itt] = t
	s.mu.Unlock()
	if t.tooBig {
		// Data-Out that follows is discarded as belonging to no task.
		s.finishTask(t, scsi.CheckResponse(scsi.InvalidCDBField(0, -1), false))
		return
	}
	if t.write && t.unsolDone {
		t.r2tNext = t.got
		s.issueR2Ts(t)
	}
	s.maybeExecute(t)
}

func (s *session) maybeExecute(t *task) {
	if t.write && (t.got < t.edtl || !t.unsolDone || len(t.r2ts) > 0) {
		return
	}
	s.mu.Lock()
	if t.state != taskCollecting {
		s.mu.Unlock()
		return
	}
	t.state = taskRunning
	s.running.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.running.Done()
		defer func() {
			if r := recover(); r != nil {
				// A panic in one task must not take the process down:
				// it ends this connection only.
				s.log.Error("target: panic while executing a task; closing the connection",
					"panic", r, "itt", t.itt, "stack", string(debug.Stack()))
				s.conn.close(fmt.Errorf("panic: %v", r))
				s.finishTask(t, scsi.CheckResponse(scsi.Check(scsi.ReasonInternalTargetFailure), false))
			}
		}()
		resp := s.execute(t)
		s.finishTask(t, resp)
	}()
}

func (s *session) issueR2Ts(t *task) {
	max := s.params.MaxOutstandingR2T
	for uint32(len(t.r2ts)) < max && t.r2tNext < t.edtl {
		n := min(s.params.MaxBurstLength, t.edtl-t.r2tNext)
		s.nextTTT++
		if s.nextTTT == iscsi.ReservedTag {
			s.nextTTT = 1
		}
		r := &r2t{ttt: s.nextTTT, off: t.r2tNext, len: n, next: t.r2tNext}
		t.r2ts = append(t.r2ts, r)
		p := &outPDU{}
		p.bhs.SetOpcode(iscsi.OpR2T, false)
		p.bhs.SetFlags(iscsi.FlagFinal)
		p.bhs.SetLUN(t.lunRaw)
		p.bhs.SetITT(t.itt)
		p.bhs.SetTTT(r.ttt)
		p.bhs.SetR2TSN(t.r2tSN)
		p.bhs.SetBufferOffset(r.off)
		p.bhs.SetDesiredDataTransferLength(n)
		t.r2tSN++
		t.r2tNext += n
		s.conn.send(p)
	}
}

func (s *session) onDataOut(h *iscsi.BHS) error {
	rd := &s.conn.rd
	n := rd.DataLen()
	s.mu.Lock()
	t := s.tasks[h.ITT()]
	if t != nil && (t.state != taskCollecting || t.abort) {
		t = nil
	}
	s.mu.Unlock()
	if t == nil || !t.write || t.tooBig {
		// Data for a task that was dropped (outside the CmdSN window),
		// aborted or already answered: RFC 7143 says discard it.
		err := rd.DiscardData()
		if errors.Is(err, iscsi.ErrDataDigest) {
			return nil
		}
		return err
	}
	off, sn := h.BufferOffset(), h.DataSN()
	var r *r2t
	ri := -1
	if h.TTT() == iscsi.ReservedTag {
		switch {
		case t.unsolDone:
			return s.dataPhaseError(t, "unsolicited Data-Out after the unsolicited burst ended (itt %#x)", t.itt)
		case sn != t.unsolDataSN:
			return s.dataPhaseError(t, "Data-Out DataSN %d, expected %d (itt %#x)", sn, t.unsolDataSN, t.itt)
		case off != t.got:
			return s.dataPhaseError(t, "Data-Out offset %d, expected %d (itt %#x)", off, t.got, t.itt)
		case uint64(off)+uint64(n) > uint64(t.unsolLimit):
			return s.dataPhaseError(t, "unsolicited data beyond FirstBurstLength/EDTL (itt %#x)", t.itt)
		}
	} else {
		for i, x := range t.r2ts {
			if x.ttt == h.TTT() {
				r, ri = x, i
			}
		}
		switch {
		case r == nil:
			return s.dataPhaseError(t, "Data-Out with unknown TTT %#x (itt %#x)", h.TTT(), t.itt)
		case sn != r.dataSN:
			return s.dataPhaseError(t, "Data-Out DataSN %d, expected %d (itt %#x)", sn, r.dataSN, t.itt)
		case off != r.next || off != t.got:
			return s.dataPhaseError(t, "Data-Out offset %d, expected %d (itt %#x)", off, r.next, t.itt)
		case uint64(off)+uint64(n) > uint64(r.off)+uint64(r.len):
			return s.dataPhaseError(t, "Data-Out beyond the R2T (itt %#x)", t.itt)
		}
	}
	if err := rd.ReadData(t.buf[off : off+n]); err != nil {
		if errors.Is(err, iscsi.ErrDataDigest) {
			// ERL 0: reject the PDU and end the task; the connection
			// survives.
			s.reject(h, rejectDataDigest)
			s.log.Warn("target: data digest error on Data-Out", "itt", t.itt)
			s.finishTask(t, scsi.CheckResponse(scsi.Check(scsi.ReasonProtocolServiceCRCError), false))
			return nil
		}
		return err
	}
	t.got += n
	if r == nil {
		t.unsolDataSN++
		if h.Final() {
			t.unsolDone = true
			t.r2tNext = t.got
			s.issueR2Ts(t)
		}
	} else {
		r.dataSN++
		r.next += n
		if h.Final() {
			if r.next != r.off+r.len {
				s.log.Warn("target: Data-Out sequence ended early", "itt", t.itt)
				s.finishTask(t, dataPhaseErrorResponse())
				return nil
			}
			t.r2ts = append(t.r2ts[:ri], t.r2ts[ri+1:]...)
			s.issueR2Ts(t)
		}
	}
	s.maybeExecute(t)
	return nil
}

// dataPhaseError ends t with CHECK CONDITION, ABORTED COMMAND / DATA PHASE
// ERROR after a Data-Out broke the sequence rules (DataSN, offset, TTT,
// burst bounds). At ERL 0 the RFC allows dropping the connection instead,
// but ending only the task keeps the session's other commands alive. The
// offending PDU's data is discarded; later Data-Out for the task find no
// task and are discarded too.
func (s *session) dataPhaseError(t *task, format string, args ...any) error {
	s.log.Warn("target: Data-Out sequence error; failing the task", "itt", t.itt,
		"err", fmt.Sprintf(format, args...))
	if err := s.conn.rd.DiscardData(); err != nil && !errors.Is(err, iscsi.ErrDataDigest) {
		return err
	}
	s.finishTask(t, dataPhaseErrorResponse())
	return nil
}

// dataPhaseErrorResponse is fixed-format sense ABORTED COMMAND, 4B/00.
func dataPhaseErrorResponse() *scsi.Response {
	sense := make([]byte, 18)
	sense[0], sense[2], sense[7], sense[12] = 0x70, scsi.SenseAbortedCommand, 10, 0x4B
	return &scsi.Response{Status: scsi.StatusCheckCondition, Sense: sense}
}

// execute runs the command against its LU (or answers it at target level).
func (s *session) execute(t *task) *scsi.Response {
	cmd := &scsi.Command{
		Nexus:       s.nexus,
		Tag:         t.itt,
		Attr:        t.attr,
		CDB:         t.cdb,
		Read:        t.read,
		Write:       t.write,
		ExpectedLen: t.edtl,
	}
	if t.write {
		cmd.DataOut = t.buf[:t.got]
	}
	lun, ok := scsi.DecodeLUN(t.lunRaw)
	cmd.LUN = lun
	if len(t.cdb) > 0 && t.cdb[0] == 0xA0 { // REPORT LUNS is target-level
		return scsi.ReportLUNs(cmd, s.target.lunIDs())
	}
	var ref *lunRef
	if ok {
		ref = s.target.lun(lun)
	}
	if ref == nil || !ref.acquire() {
		return scsi.NoSuchLUN(cmd)
	}
	defer ref.release()
	resp := ref.lu.Execute(t.ctx, cmd)
	if resp == nil {
		resp = scsi.CheckResponse(scsi.Check(scsi.ReasonInternalTargetFailure), false)
	}
	return resp
}

// finishTask retires the task and, unless it was aborted, sends its
// Data-In and status.
func (s *session) finishTask(t *task, resp *scsi.Response) {
	s.mu.Lock()
	aborted := t.abort
	if t.state != taskDone {
		t.state = taskDone
		if s.tasks[t.itt] == t {
			delete(s.tasks, t.itt)
		}
		if !t.immediate {
			s.window.Complete()
			s.maxCmdSN.Store(s.window.MaxCmdSN())
		}
	} else {
		// Aborted while collecting data: abortLocked already retired it.
		s.mu.Unlock()
		if resp.Release != nil {
			resp.Release()
		}
		return
	}
	s.mu.Unlock()
	s.srv.putBuf(t.buf)
	t.buf = nil
	if t.cancel != nil {
		t.cancel()
	}
	if aborted {
		if resp.Release != nil {
			resp.Release()
		}
	} else {
		s.sendResponse(t, resp)
	}
	close(t.done)
}

// sendResponse sends Data-In (cut to EDTL, split by MaxXmitDataSegmentLength
// and MaxBurstLength) and the status, setting the residual.
func (s *session) sendResponse(t *task, resp *scsi.Response) {
	var flags byte
	var resid uint32
	switch want := resp.Transferred; {
	case want > t.edtl:
		flags, resid = iscsi.FlagOverflow, want-t.edtl
	case want < t.edtl:
		flags, resid = iscsi.FlagUnderflow, t.edtl-want
	}
	data := resp.Data
	if !t.read {
		data = nil
	} else if uint32(len(data)) > t.edtl {
		data = data[:t.edtl]
	}
	good := resp.Status == scsi.StatusGood && len(resp.Sense) == 0
	var dataSN uint32
	if len(data) > 0 {
		maxSeg := int(s.mxdsl.Load())
		burst := int(s.params.MaxBurstLength)
		inBurst := 0
		for off := 0; off < len(data); {
			n := min(maxSeg, len(data)-off, burst-inBurst)
			last := off+n == len(data)
			p := &outPDU{data: data[off : off+n]}
			p.bhs.SetOpcode(iscsi.OpDataIn, false)
			f := byte(0)
			inBurst += n
			if inBurst == burst || last {
				f |= iscsi.FlagFinal
				inBurst = 0
			}
			p.bhs.SetLUN(t.lunRaw)
			p.bhs.SetITT(t.itt)
			p.bhs.SetTTT(iscsi.ReservedTag)
			p.bhs.SetDataSN(dataSN)
			p.bhs.SetBufferOffset(uint32(off))
			if last {
				p.release = resp.Release
				if good {
					f |= iscsi.FlagStatus | flags
					p.bhs.SetStatus(uint8(resp.Status))
					p.bhs.SetResidualCount(resid)
					p.advanceStatSN = true
				}
			}
			p.bhs.SetFlags(f)
			dataSN++
			off += n
			if !s.conn.send(p) {
				if !last && resp.Release != nil {
					resp.Release() // send released only the PDU it dropped
				}
				return
			}
		}
		if good {
			return
		}
	}
	p := &outPDU{advanceStatSN: true}
	if len(data) == 0 {
		p.release = resp.Release
	}
	p.bhs.SetOpcode(iscsi.OpSCSIResp, false)
	p.bhs.SetFlags(iscsi.FlagFinal | flags)
	p.bhs.SetResponse(0)
	p.bhs.SetStatus(uint8(resp.Status))
	p.bhs.SetITT(t.itt)
	if t.write {
		dataSN = t.r2tSN
	}
	p.bhs.SetExpDataSN(dataSN)
	p.bhs.SetResidualCount(resid)
	if len(resp.Sense) > 0 {
		sense := make([]byte, 2+len(resp.Sense))
		sense[0], sense[1] = byte(len(resp.Sense)>>8), byte(len(resp.Sense))
		copy(sense[2:], resp.Sense)
		p.data = sense
	}
	s.conn.send(p)
}

// --- aborts and task management -------------------------------------------

// abortLocked marks t aborted and returns a channel closed once it can no
// longer touch its LU. s.mu must be held.
func (s *session) abortLocked(t *task) <-chan struct{} {
	if t.abort {
		return t.done
	}
	t.abort = true
	if t.cancel != nil {
		t.cancel()
	}
	if t.state == taskCollecting {
		t.state = taskDone
		if s.tasks[t.itt] == t {
			delete(s.tasks, t.itt)
		}
		if !t.immediate {
			s.window.Complete()
			s.maxCmdSN.Store(s.window.MaxCmdSN())
		}
		close(t.done)
	}
	return t.done
}

// abortMatching aborts this session's tasks for which match is true and
// returns their completion channels.
func (s *session) abortMatching(match func(*task) bool) []<-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []<-chan struct{}
	for _, t := range s.tasks {
		if match(t) {
			out = append(out, s.abortLocked(t))
		}
	}
	return out
}

func (s *session) onTMF(h *iscsi.BHS) {
	fn := h.Function()
	itt := h.ITT()
	lunRaw := h.LUN()
	respond := func(code uint8) {
		p := &outPDU{advanceStatSN: true}
		p.bhs.SetOpcode(iscsi.OpTaskMgmtResp, false)
		p.bhs.SetFlags(iscsi.FlagFinal)
		p.bhs.SetResponse(code)
		p.bhs.SetITT(itt)
		s.conn.send(p)
	}
	if s.target == nil {
		respond(tmfRespRejected)
		return
	}
	lun, lunOK := scsi.DecodeLUN(lunRaw)
	var ref *lunRef
	if lunOK {
		ref = s.target.lun(lun)
	}
	sameLUN := func(t *task) bool { return t.lunRaw == lunRaw }
	waitThen := func(chans []<-chan struct{}, then func()) {
		go func() {
			for _, ch := range chans {
				select {
				case <-ch:
				case <-s.conn.done:
					return
				}
			}
			then()
		}()
	}
	s.log.Info("target: task management", "function", fn, "lun", lun, "ref_itt", h.RefTaskTag())
	switch fn {
	case tmfAbortTask:
		rtt := h.RefTaskTag()
		chans := s.abortMatching(func(t *task) bool { return t.itt == rtt })
		if len(chans) == 0 {
			respond(tmfRespNoTask)
			return
		}
		waitThen(chans, func() { respond(tmfRespComplete) })
	case tmfAbortTaskSet, tmfClearTaskSet:
		if ref == nil {
			respond(tmfRespNoLUN)
			return
		}
		chans := s.abortMatching(sameLUN)
		if fn == tmfClearTaskSet {
			for _, o := range s.srv.sessionsOfTarget(s.target) {
				if o != s {
					chans = append(chans, o.abortMatching(sameLUN)...)
				}
			}
		}
		waitThen(chans, func() { respond(tmfRespComplete) })
	case tmfLUNReset:
		if ref == nil {
			respond(tmfRespNoLUN)
			return
		}
		var chans []<-chan struct{}
		for _, o := range s.srv.sessionsOfTarget(s.target) {
			chans = append(chans, o.abortMatching(sameLUN)...)
		}
		waitThen(chans, func() {
			if ref.acquire() {
				ref.lu.Reset(scsi.ResetLUN, s.nexus)
				ref.release()
			}
			respond(tmfRespComplete)
		})
	case tmfTargetWarm, tmfTargetCold:
		var chans []<-chan struct{}
		others := s.srv.sessionsOfTarget(s.target)
		for _, o := range others {
			chans = append(chans, o.abortMatching(func(*task) bool { return true })...)
		}
		kind := scsi.ResetTargetWarm
		if fn == tmfTargetCold {
			kind = scsi.ResetTargetCold
		}
		waitThen(chans, func() {
			for _, l := range *s.target.luns.Load() {
				if l.acquire() {
					l.lu.Reset(kind, s.nexus)
					l.release()
				}
			}
			respond(tmfRespComplete)
			if kind == scsi.ResetTargetCold {
				// A cold reset drops every connection to the target,
				// ours after the response has been flushed.
				for _, o := range others {
					if o != s {
						o.conn.close(errors.New("target cold reset"))
					}
				}
				p := &outPDU{closeAfter: true}
				p.bhs.SetOpcode(iscsi.OpNopIn, false)
				p.bhs.SetFlags(iscsi.FlagFinal)
				p.bhs.SetITT(iscsi.ReservedTag)
				p.bhs.SetTTT(iscsi.ReservedTag)
				s.conn.send(p)
			}
		})
	case tmfClearACA:
		respond(tmfRespNotSupp)
	case tmfTaskReassign:
		respond(tmfRespNoReassig)
	default:
		respond(tmfRespRejected)
	}
}

// --- text, logout, async ----------------------------------------------------

func (s *session) onText(h *iscsi.BHS, data []byte) {
	itt := h.ITT()
	send := func(chunk []byte, more bool) {
		p := &outPDU{advanceStatSN: true, data: chunk}
		p.bhs.SetOpcode(iscsi.OpTextResp, false)
		p.bhs.SetITT(itt)
		p.bhs.SetTTT(iscsi.ReservedTag)
		if more {
			p.bhs.SetFlags(iscsi.FlagContinue)
			s.nextTTT++
			if s.nextTTT == iscsi.ReservedTag {
				s.nextTTT = 1
			}
			s.textTTT = s.nextTTT
			p.bhs.SetTTT(s.textTTT)
		} else {
			p.bhs.SetFlags(iscsi.FlagFinal)
		}
		s.conn.send(p)
	}
	if ttt := h.TTT(); ttt != iscsi.ReservedTag {
		if ttt != s.textTTT {
			s.reject(h, rejectInvalidField)
			return
		}
		if len(s.textPending) > 0 && len(data) == 0 {
			next := s.textPending[0]
			s.textPending = s.textPending[1:]
			send(next, len(s.textPending) > 0)
			return
		}
	}
	s.textPending = nil
	if err := s.textBuf.Add(data); err != nil {
		s.textBuf.Take()
		s.reject(h, rejectProtocolError)
		return
	}
	if h.Flags()&iscsi.FlagContinue != 0 {
		send(nil, true)
		return
	}
	kvs, err := iscsi.ParseText(s.textBuf.Take())
	if err != nil {
		s.reject(h, rejectProtocolError)
		return
	}
	s.neg.ResetForText()
	out, _, st, err := s.neg.Step(kvs, iscsi.StageFullFeature)
	if err != nil {
		s.reject(h, rejectProtocolError)
		return
	}
	if v := s.neg.Params.MaxXmitDataSegmentLength; v != 0 {
		s.mxdsl.Store(v)
	}
	if st != nil {
		out = append(out, s.sendTargets(st.Value)...)
	}
	chunks := iscsi.Chunk(iscsi.AppendText(nil, out), int(s.mxdsl.Load()))
	s.textPending = chunks[1:]
	send(chunks[0], len(chunks) > 1)
}

// sendTargets answers SendTargets (RFC 7143 appendix C) with the targets
// this initiator may log into.
func (s *session) sendTargets(v string) []iscsi.KV {
	var tcs []*TargetConfig
	switch {
	case s.discovery && v == "All":
		tcs = s.srv.visibleTargets(s.nexus.InitiatorName)
	case s.discovery:
		for _, tc := range s.srv.visibleTargets(s.nexus.InitiatorName) {
			if tc.Name == v {
				tcs = append(tcs, tc)
			}
		}
	default:
		// In a normal session only the session's own target is reported.
		if tc := s.target.cfg.Load(); v == "" || v == "All" || v == tc.Name {
			tcs = append(tcs, tc)
		}
	}
	addrs := s.srv.portalAddrs(s.conn.nc.LocalAddr())
	var out []iscsi.KV
	for _, tc := range tcs {
		out = append(out, iscsi.KV{Key: "TargetName", Value: tc.Name})
		for _, a := range addrs {
			out = append(out, iscsi.KV{Key: "TargetAddress", Value: fmt.Sprintf("%s,%d", a, tc.TPGT)})
		}
	}
	return out
}

func (s *session) onLogout(h *iscsi.BHS) {
	itt := h.ITT()
	var code uint8
	switch h.ReasonCode() {
	case 0:
	case 1:
		if h.CID() != s.cid {
			code = 1 // CID not found
		}
	case 2:
		code = 2 // connection recovery not supported
	default:
		s.reject(h, rejectInvalidField)
		return
	}
	respond := func() {
		p := &outPDU{advanceStatSN: true, closeAfter: code == 0}
		p.bhs.SetOpcode(iscsi.OpLogoutResp, false)
		p.bhs.SetFlags(iscsi.FlagFinal)
		p.bhs.SetResponse(code)
		p.bhs.SetITT(itt)
		s.conn.send(p)
	}
	if code != 0 {
		respond()
		return
	}
	s.conn.state.Store(int32(StateLoggingOut))
	chans := s.abortMatching(func(*task) bool { return true })
	go func() {
		for _, ch := range chans {
			select {
			case <-ch:
			case <-s.conn.done:
				return
			}
		}
		respond()
	}()
}

// requestLogout sends Async Message event 1 (target requests logout) with
// a deadline of wait seconds; discovery sessions are simply closed.
func (s *session) requestLogout(wait uint16) {
	if s.discovery {
		s.conn.close(ErrServerClosed)
		return
	}
	p := &outPDU{advanceStatSN: true}
	p.bhs.SetOpcode(iscsi.OpAsyncMsg, false)
	p.bhs.SetFlags(iscsi.FlagFinal)
	p.bhs.SetITT(iscsi.ReservedTag)
	p.bhs.SetAsync(1, 0, 0, 0, wait)
	s.conn.send(p)
}

// teardown runs after the connection's reader and writer stopped: it
// aborts what is left, waits for running LU calls, and tells every LU that
// the nexus is gone.
func (s *session) teardown() {
	s.srv.unregisterSession(s)
	chans := s.abortMatching(func(*task) bool { return true })
	for _, ch := range chans {
		<-ch
	}
	s.running.Wait()
	if s.target != nil {
		for _, l := range *s.target.luns.Load() {
			if l.acquire() {
				l.lu.NexusLost(s.nexus)
				l.release()
			}
		}
	}
	close(s.closed)
}

// --- buffers ------------------------------------------------------------------

// bufPools holds Data-Out buffers by power-of-two size class (4 KiB up).
type bufPools struct {
	pools [15]sync.Pool // 4K .. 64M
}

func sizeClass(n int) int {
	if n <= 4096 {
		return 0
	}
	return bits.Len(uint(n-1)) - 12
}

func (s *Server) getBuf(n int) []byte {
	c := sizeClass(n)
	if c >= len(s.bufs.pools) {
		return make([]byte, n)
	}
	if b, ok := s.bufs.pools[c].Get().(*[]byte); ok {
		return (*b)[:n]
	}
	return make([]byte, n, 4096<<c)
}

func (s *Server) putBuf(b []byte) {
	if b == nil {
		return
	}
	c := sizeClass(cap(b))
	if c >= len(s.bufs.pools) || cap(b) != 4096<<c {
		return
	}
	b = b[:cap(b)]
	s.bufs.pools[c].Put(&b)
}
