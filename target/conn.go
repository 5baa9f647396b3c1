package target

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hasan-storage/hasan/target/iscsi"
)

// ConnState is the lifecycle of one TCP connection.
type ConnState int32

const (
	// StateLogin: the connection is in the login phase.
	StateLogin ConnState = iota
	// StateFullFeature: logged in; commands flow.
	StateFullFeature
	// StateLoggingOut: a Logout was accepted; the response is being sent.
	StateLoggingOut
	// StateClosed: the socket is closed.
	StateClosed
)

func (s ConnState) String() string {
	switch s {
	case StateLogin:
		return "login"
	case StateFullFeature:
		return "full-feature"
	case StateLoggingOut:
		return "logging-out"
	case StateClosed:
		return "closed"
	}
	return fmt.Sprintf("ConnState(%d)", int32(s))
}

// loginMaxData bounds a data segment during login, before any
// MaxRecvDataSegmentLength has been declared.
const loginMaxData = 64 << 10

// outPDU is one PDU queued for the writer. StatSN, ExpCmdSN and MaxCmdSN
// are filled in by the writer, so they are current and in send order.
type outPDU struct {
	bhs  iscsi.BHS
	data []byte
	// advanceStatSN: this PDU consumes a StatSN (responses); otherwise it
	// carries the next StatSN without consuming it (R2T, Data-In, pings).
	advanceStatSN bool
	release       func()
	// closeAfter makes the writer flush and close the connection (logout).
	closeAfter bool
}

type conn struct {
	srv *Server
	nc  net.Conn
	log *slog.Logger

	rd iscsi.Reader

	state         atomic.Int32
	initialStatSN uint32
	sess          *session

	out       chan *outPDU
	done      chan struct{} // closed by close()
	closeOnce sync.Once
	closeErr  error

	lastRecv atomic.Int64 // unix nanos of the last PDU from the initiator
	pingSent atomic.Int64 // unix nanos of the oldest unanswered ping, 0 if none

	// Writer-owned.
	hd, dd        bool
	statSN        uint32
	wbuf          []byte
	segs          []wseg
	iov           net.Buffers
	pending       []func()
	writerDone    chan struct{}
	writerStarted bool // set by serve before the writer goroutine starts
}

func newConn(s *Server, nc net.Conn) *conn {
	var b [4]byte
	_, _ = rand.Read(b[:])
	c := &conn{
		srv:           s,
		nc:            nc,
		log:           s.log.With("remote", nc.RemoteAddr().String()),
		initialStatSN: binary.BigEndian.Uint32(b[:]) & 0x7fffffff,
		out:           make(chan *outPDU, 1024),
		done:          make(chan struct{}),
		writerDone:    make(chan struct{}),
	}
	c.rd.R = bufio.NewReaderSize(nc, 64<<10)
	if tc, ok := nc.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	return c
}

// close tears the connection down once; later calls are no-ops.
func (c *conn) close(why error) {
	c.closeOnce.Do(func() {
		c.closeErr = why
		c.state.Store(int32(StateClosed))
		close(c.done)
		c.nc.Close()
	})
}

// serve runs the connection: login, then the full-feature reader loop.
// A panic closes only this connection.
func (c *conn) serve() {
	defer func() {
		if r := recover(); r != nil {
			c.log.Error("target: panic while serving connection; closing it", "panic", r,
				"stack", string(debug.Stack()))
			c.close(fmt.Errorf("panic: %v", r))
		}
		c.close(io.EOF)
		if c.sess != nil {
			if c.writerStarted {
				<-c.writerDone
			}
			c.sess.teardown()
		}
	}()
	if err := c.login(); err != nil {
		c.log.Info("target: login failed", "err", err)
		return
	}
	sess := c.sess
	p := sess.params
	c.hd, c.dd = p.HeaderDigest, p.DataDigest
	c.rd.HeaderDigest, c.rd.DataDigest = c.hd, c.dd
	c.rd.MaxDataSegment = p.MaxRecvDataSegmentLength
	c.state.Store(int32(StateFullFeature))
	c.lastRecv.Store(time.Now().UnixNano())
	c.log.Info("target: session logged in", "initiator", sess.nexus.InitiatorName, "target", sess.nexus.TargetName,
		"tsih", sess.tsih, "discovery", sess.discovery, "header_digest", p.HeaderDigest, "data_digest", p.DataDigest,
		"mrdsl", p.MaxRecvDataSegmentLength, "mxdsl", p.MaxXmitDataSegmentLength, "max_burst", p.MaxBurstLength,
		"first_burst", p.FirstBurstLength, "immediate_data", p.ImmediateData, "initial_r2t", p.InitialR2T)
	c.writerStarted = true
	go c.writer()
	if c.srv.cfg.NopInInterval > 0 {
		var pw sync.WaitGroup
		pw.Add(1)
		go func() { defer pw.Done(); c.pinger() }()
		// The pinger must be gone before serve returns, so nothing logs
		// after Close.
		defer func() {
			c.close(io.EOF) // also on panic, or Wait would never return
			pw.Wait()
		}()
	}
	err := sess.readLoop()
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed):
		c.log.Info("target: connection closed", "tsih", sess.tsih, "why", c.why(err))
	default:
		c.log.Warn("target: connection dropped", "tsih", sess.tsih, "err", err)
	}
	c.close(err)
}

func (c *conn) why(err error) error {
	select {
	case <-c.done:
		if c.closeErr != nil {
			return c.closeErr
		}
	default:
	}
	return err
}

// login runs the login phase synchronously, bounded by LoginTimeout.
func (c *conn) login() error {
	deadline := time.Now().Add(c.srv.cfg.LoginTimeout)
	_ = c.nc.SetDeadline(deadline)
	defer c.nc.SetDeadline(time.Time{})
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	go func() {
		select {
		case <-c.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	c.rd.MaxDataSegment = loginMaxData
	ls := newLoginState(c.srv, c)
	var req iscsi.PDU
	for {
		if err := c.rd.ReadPDU(&req); err != nil {
			return fmt.Errorf("target: reading login request: %w", err)
		}
		if op := req.BHS.Opcode(); op != iscsi.OpLoginReq {
			// Anything but a login before full feature phase is a
			// protocol error; answer with a login reject and hang up.
			resp := &iscsi.PDU{}
			resp.BHS.SetOpcode(iscsi.OpLoginResp, false)
			resp.BHS.SetITT(req.BHS.ITT())
			resp.BHS.SetLoginStatus(loginInitiatorError>>8, loginInitiatorError&0xff)
			_ = iscsi.WritePDU(c.nc, resp, false, false)
			return fmt.Errorf("target: %v during login", op)
		}
		resp, done, err := ls.step(ctx, &req)
		if werr := iscsi.WritePDU(c.nc, resp, false, false); werr != nil {
			return fmt.Errorf("target: writing login response: %w", werr)
		}
		if err != nil {
			return err
		}
		if done {
			c.statSN = ls.statSN
			return nil
		}
	}
}

// send queues p for the writer. It reports false when the connection is
// closing (the PDU is dropped and its release run).
func (c *conn) send(p *outPDU) bool {
	select {
	case c.out <- p:
		return true
	case <-c.done:
		if p.release != nil {
			p.release()
		}
		return false
	}
}

// writer owns the socket's write side and StatSN. It batches whatever is
// queued into one writev, flushing when the queue drains.
func (c *conn) writer() {
	defer close(c.writerDone)
	for {
		select {
		case p := <-c.out:
			closeAfter := c.encode(p)
			for !closeAfter && len(c.wbuf) < 256<<10 && len(c.segs) < 256 {
				select {
				case q := <-c.out:
					closeAfter = c.encode(q)
					continue
				default:
				}
				break
			}
			if err := c.flush(); err != nil {
				c.close(fmt.Errorf("target: write: %w", err))
				return
			}
			if closeAfter {
				c.close(errors.New("logged out"))
				return
			}
		case <-c.done:
			return
		}
	}
}

// inlineMax is the payload size below which data is copied into the batch
// buffer instead of getting its own iovec.
const inlineMax = 2048

func (c *conn) encode(p *outPDU) bool {
	s := c.sess
	h := &p.bhs
	if p.advanceStatSN {
		h.SetStatSN(c.statSN)
		c.statSN++
	} else if h.Opcode() != iscsi.OpDataIn {
		h.SetStatSN(c.statSN)
	}
	h.SetExpCmdSN(s.expCmdSN.Load())
	h.SetMaxCmdSN(s.maxCmdSN.Load())
	c.wbuf = iscsi.AppendHeader(c.wbuf, h, nil, uint32(len(p.data)), c.hd)
	if len(p.data) > 0 {
		if len(p.data) <= inlineMax {
			c.wbuf = append(c.wbuf, p.data...)
		} else {
			c.segs = append(c.segs, wseg{end: len(c.wbuf), payload: p.data})
		}
		c.wbuf = iscsi.AppendTrailer(c.wbuf, p.data, c.dd)
	}
	if p.release != nil {
		c.pending = append(c.pending, p.release)
	}
	return p.closeAfter
}

// wseg marks a payload sent by reference: wbuf up to end goes first.
type wseg struct {
	end     int
	payload []byte
}

func (c *conn) flush() error {
	prev := 0
	for _, sg := range c.segs {
		c.iov = append(c.iov, c.wbuf[prev:sg.end], sg.payload)
		prev = sg.end
	}
	if prev < len(c.wbuf) {
		c.iov = append(c.iov, c.wbuf[prev:])
	}
	bufs := c.iov // WriteTo consumes its receiver
	_, err := bufs.WriteTo(c.nc)
	clear(c.iov)
	c.iov = c.iov[:0]
	clear(c.segs)
	c.segs = c.segs[:0]
	c.wbuf = c.wbuf[:0]
	for _, f := range c.pending {
		f()
	}
	clear(c.pending)
	c.pending = c.pending[:0]
	return err
}

// pinger sends NOP-In pings every NopInInterval and drops the connection
// when the initiator has sent nothing for NopInTimeout after a ping.
func (c *conn) pinger() {
	t := time.NewTicker(min(c.srv.cfg.NopInInterval, c.srv.cfg.NopInTimeout/2+1))
	defer t.Stop()
	var ttt uint32
	lastPing := time.Time{}
	for {
		select {
		case <-c.done:
			return
		case now := <-t.C:
			last := time.Unix(0, c.lastRecv.Load())
			if sent := c.pingSent.Load(); sent != 0 {
				if now.Sub(time.Unix(0, sent)) >= c.srv.cfg.NopInTimeout && last.UnixNano() < sent {
					c.log.Warn("target: initiator did not answer NOP-In; dropping connection",
						"timeout", c.srv.cfg.NopInTimeout)
					c.close(errors.New("nop-in timeout"))
					return
				}
				if last.UnixNano() >= sent {
					c.pingSent.Store(0)
				}
			}
			if now.Sub(lastPing) < c.srv.cfg.NopInInterval || c.pingSent.Load() != 0 {
				continue
			}
			lastPing = now
			ttt++
			if ttt == iscsi.ReservedTag {
				ttt = 1
			}
			p := &outPDU{}
			p.bhs.SetOpcode(iscsi.OpNopIn, false)
			p.bhs.SetFlags(iscsi.FlagFinal)
			p.bhs.SetITT(iscsi.ReservedTag)
			p.bhs.SetTTT(ttt)
			c.pingSent.Store(now.UnixNano())
			if !c.send(p) {
				return
			}
		}
	}
}
