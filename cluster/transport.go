package cluster

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/gob"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"

	"github.com/hasan-storage/hasan/replication"
)

// Stream tags. Raft's NetworkTransport starts every connection with its
// RPC type byte (0..4); our own streams use tags above 0x80 on the same
// mutual-TLS listener, so one port and one CA serve everything.
const (
	tagForward   byte = 0xF0 // a follower's proposal, applied by the leader
	tagHeartbeat byte = 0xF1 // a node's liveness stream to the leader
	// tagBootstrap is the one stream a client without a certificate may
	// open: a new node's network join (join.go).
	tagBootstrap byte = 0xF2
	tagAdmit     byte = 0xF3 // the CA holder asks the leader to admit a joiner
)

// muxLayer is a raft.StreamLayer over TLS that hands raft its connections
// and routes tagged streams to handlers.
type muxLayer struct {
	ln        net.Listener
	advertise net.Addr
	tls       *tls.Config
	log       *slog.Logger

	raftConns chan net.Conn
	handlers  map[byte]func(net.Conn)
	done      chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup

	mu    sync.Mutex
	conns map[net.Conn]struct{} // accepted connections in handlers, closed by Close
	// peers are the open accepted connections that presented a
	// certificate (raft's included), by its serial: closeRevoked ends
	// those whose certificate the state revokes.
	peers map[*peekedConn]string

	// guard refuses revoked certificates at the handshake, both ways,
	// once watchRevocations attached the node's FSM.
	guard      CertGuard
	ownSerial  string
	ownRevoked atomic.Bool // logged once
}

var _ raft.StreamLayer = (*muxLayer)(nil)

func newMuxLayer(bind string, advertise net.Addr, cfg *tls.Config, log *slog.Logger) (*muxLayer, error) {
	// A client certificate is optional at the handshake only so that a
	// new node can reach the bootstrap stream; one that is presented must
	// still verify, and route refuses every other stream without one.
	m := &muxLayer{log: log, raftConns: make(chan net.Conn), handlers: map[byte]func(net.Conn){},
		done: make(chan struct{}), conns: map[net.Conn]struct{}{}, peers: map[*peekedConn]string{}}
	if len(cfg.Certificates) > 0 && len(cfg.Certificates[0].Certificate) > 0 {
		if leaf, err := x509.ParseCertificate(cfg.Certificates[0].Certificate[0]); err == nil {
			m.ownSerial = CertSerial(leaf)
		}
	}
	lcfg := m.guard.Protect(cfg)
	lcfg.ClientAuth = tls.VerifyClientCertIfGiven
	ln, err := tls.Listen("tcp", bind, lcfg)
	if err != nil {
		return nil, fmt.Errorf("cluster: listen %s: %w", bind, err)
	}
	if advertise == nil {
		advertise = ln.Addr()
	}
	// Dialling checks the server's certificate too: a peer whose
	// certificate was revoked is not one to send proposals or beats to.
	m.ln, m.advertise, m.tls = ln, advertise, m.guard.Protect(cfg)
	return m, nil
}

// watchRevocations makes the listener consult f's revocation list (call
// before start) and closes, after every change of f, the open connections
// whose certificate it revokes: a removed node's raft and heartbeat
// streams end at once instead of living on. It runs until Close.
func (m *muxLayer) watchRevocations(f *FSM) {
	m.guard.Attach(f)
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		for {
			ch := f.Changed()
			m.closeRevoked(f)
			select {
			case <-ch:
			case <-m.done:
				return
			}
		}
	}()
}

// closeRevoked closes every tracked peer connection whose certificate f
// revokes.
func (m *muxLayer) closeRevoked(f *FSM) {
	var victims []*peekedConn
	f.Read(func(s *State) {
		if len(s.RevokedCerts) == 0 {
			return
		}
		if m.ownSerial != "" && s.CertRevoked(m.ownSerial) && !m.ownRevoked.Swap(true) {
			m.log.Error("cluster: this node's own certificate is revoked: peers refuse it "+
				"(it was removed from the cluster, or an operator revoked it)", "serial", m.ownSerial)
		}
		m.mu.Lock()
		for pc, serial := range m.peers {
			if s.CertRevoked(serial) {
				victims = append(victims, pc)
			}
		}
		m.mu.Unlock()
	})
	for _, pc := range victims {
		m.log.Warn("cluster: closing a connection whose certificate was revoked",
			"remote", pc.RemoteAddr(), "serial", m.serialOf(pc))
		pc.Close()
	}
}

func (m *muxLayer) serialOf(pc *peekedConn) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.peers[pc]
}

// handle registers a handler; call before start.
func (m *muxLayer) handle(tag byte, h func(net.Conn)) { m.handlers[tag] = h }

func (m *muxLayer) start() {
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		for {
			c, err := m.ln.Accept()
			if err != nil {
				select {
				case <-m.done:
					return
				default:
				}
				m.log.Warn("cluster: accept", "err", err)
				time.Sleep(50 * time.Millisecond)
				continue
			}
			if !m.track(c) {
				c.Close()
				return
			}
			m.wg.Add(1)
			go func() {
				defer m.wg.Done()
				defer m.untrack(c)
				m.route(c)
			}()
		}
	}()
}

// route finishes the handshake and dispatches on the first byte. A peer
// with a certificate not from the cluster CA never gets past Handshake; a
// peer without one gets only the bootstrap stream.
func (m *muxLayer) route(c net.Conn) {
	tc := c.(*tls.Conn)
	_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
	if err := tc.Handshake(); err != nil {
		m.log.Warn("cluster: tls handshake refused", "remote", c.RemoteAddr(), "err", err)
		c.Close()
		return
	}
	br := bufio.NewReader(tc)
	tag, err := br.Peek(1)
	if err != nil {
		c.Close()
		return
	}
	if tag[0] != tagBootstrap && len(tc.ConnectionState().VerifiedChains) == 0 {
		m.log.Warn("cluster: stream refused without a client certificate", "remote", c.RemoteAddr(), "tag", tag[0])
		c.Close()
		return
	}
	_ = tc.SetDeadline(time.Time{})
	pc := &peekedConn{Conn: tc, r: br, m: m}
	if !m.trackPeer(pc) {
		return
	}
	if h, ok := m.handlers[tag[0]]; ok {
		_, _ = br.Discard(1)
		h(pc)
		return
	}
	select {
	case m.raftConns <- pc:
	case <-m.done:
		c.Close()
	}
}

// track registers an accepted connection; false once closed.
func (m *muxLayer) track(c net.Conn) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	select {
	case <-m.done:
		return false
	default:
	}
	m.conns[c] = struct{}{}
	return true
}

// trackPeer registers a connection that presented a certificate, unless
// that certificate was revoked since the handshake (then it is closed).
func (m *muxLayer) trackPeer(pc *peekedConn) bool {
	cs := pc.Conn.ConnectionState()
	if len(cs.PeerCertificates) == 0 {
		return true // the bootstrap stream: nothing to revoke
	}
	if err := m.guard.VerifyConnection(cs); err != nil {
		m.log.Warn("cluster: stream refused", "remote", pc.RemoteAddr(), "err", err)
		pc.Conn.Close()
		return false
	}
	m.mu.Lock()
	m.peers[pc] = CertSerial(cs.PeerCertificates[0])
	m.mu.Unlock()
	return true
}

func (m *muxLayer) untrack(c net.Conn) {
	m.mu.Lock()
	delete(m.conns, c)
	m.mu.Unlock()
}

func (m *muxLayer) Accept() (net.Conn, error) {
	select {
	case c := <-m.raftConns:
		return c, nil
	case <-m.done:
		return nil, net.ErrClosed
	}
}

func (m *muxLayer) Close() error {
	m.closeOnce.Do(func() {
		m.mu.Lock()
		close(m.done)
		// Handler streams (heartbeats, forwards) end with the node: a
		// closed node must not keep reading peers' beats.
		for c := range m.conns {
			c.Close()
		}
		m.mu.Unlock()
		m.ln.Close()
	})
	return nil
}

// wait returns once every accept and routing goroutine has ended.
func (m *muxLayer) wait() { m.wg.Wait() }

func (m *muxLayer) Addr() net.Addr { return m.advertise }

func (m *muxLayer) Dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	d := &net.Dialer{Timeout: timeout}
	return tls.DialWithDialer(d, "tcp", string(addr), m.tls)
}

// dialTagged opens one of our streams.
func (m *muxLayer) dialTagged(ctx context.Context, addr string, tag byte) (net.Conn, error) {
	d := &tls.Dialer{Config: m.tls}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	if _, err := c.Write([]byte{tag}); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

type peekedConn struct {
	*tls.Conn
	r *bufio.Reader
	m *muxLayer
}

func (p *peekedConn) Read(b []byte) (int, error) { return p.r.Read(b) }

// Close forgets the connection in the mux's peer table.
func (p *peekedConn) Close() error {
	p.m.mu.Lock()
	delete(p.m.peers, p)
	p.m.mu.Unlock()
	return p.Conn.Close()
}

// ConnectionState lets PeerID see through the wrapper.
func (p *peekedConn) ConnectionState() tls.ConnectionState { return p.Conn.ConnectionState() }

// Forwarding: a follower's proposal travels to the leader as the encoded
// command; the answer carries Apply's value and an error code, so the
// sentinels survive the hop (errors.Is works on the follower).

type forwardRequest struct{ Cmd []byte }

type forwardResponse struct {
	Value any
	Code  string
	Msg   string
}

func init() {
	gob.Register(replication.MembershipState{})
}

// wireErrors lists the sentinels that keep their identity over the wire.
var wireErrors = map[string]error{
	"not-found": ErrNotFound, "exists": ErrExists, "invalid": ErrInvalid, "in-use": ErrInUse,
	"not-owner": ErrNotOwner, "not-fenced": ErrNotFenced, "token": ErrToken, "node-state": ErrNodeState,
	"group-owned": ErrGroupOwned, "owner-differ": ErrOwnerDiffer, "decode": ErrDecode, "not-leader": ErrNotLeader,
	"stale-epoch": replication.ErrStaleEpoch, "not-primary": replication.ErrNotPrimary,
	"not-caught-up": replication.ErrNotCaughtUp, "not-in-isr": replication.ErrNotInISR,
	"unknown-volume": replication.ErrUnknownVolume, "forbidden": ErrForbidden,
	"cert-revoked": ErrCertRevoked,
}

func errorCode(err error) string {
	for code, s := range wireErrors {
		if errors.Is(err, s) {
			return code
		}
	}
	return "other"
}

func errorFromWire(code, msg string) error {
	if code == "" {
		return nil
	}
	if s, ok := wireErrors[code]; ok {
		return &wireError{sentinel: s, msg: msg}
	}
	return errors.New(msg)
}

type wireError struct {
	sentinel error
	msg      string
}

func (e *wireError) Error() string { return e.msg }
func (e *wireError) Unwrap() error { return e.sentinel }

// contactTransport notes every raft RPC that a peer answered: an answer
// proves the peer's process is up and reachable from here, whatever
// happened to its heartbeat stream. The leader sends AppendEntries
// heartbeats to every follower many times per failure timeout, so its
// controller never declares a node failed that is still answering raft
// (see Node.Heartbeat). Pipelined appends are passed through unobserved:
// raft's heartbeats and every VerifyLeader round use AppendEntries.
type contactTransport struct {
	raft.Transport
	note func(id raft.ServerID)
}

var (
	_ raft.WithPreVote = (*contactTransport)(nil)
	_ raft.WithClose   = (*contactTransport)(nil)
)

func (t *contactTransport) answered(id raft.ServerID, err error) error {
	if err == nil {
		t.note(id)
	}
	return err
}

func (t *contactTransport) AppendEntries(id raft.ServerID, target raft.ServerAddress, args *raft.AppendEntriesRequest, resp *raft.AppendEntriesResponse) error {
	return t.answered(id, t.Transport.AppendEntries(id, target, args, resp))
}

func (t *contactTransport) RequestVote(id raft.ServerID, target raft.ServerAddress, args *raft.RequestVoteRequest, resp *raft.RequestVoteResponse) error {
	return t.answered(id, t.Transport.RequestVote(id, target, args, resp))
}

func (t *contactTransport) TimeoutNow(id raft.ServerID, target raft.ServerAddress, args *raft.TimeoutNowRequest, resp *raft.TimeoutNowResponse) error {
	return t.answered(id, t.Transport.TimeoutNow(id, target, args, resp))
}

// RequestPreVote keeps pre-vote working: raft enables it only when the
// transport implements raft.WithPreVote.
func (t *contactTransport) RequestPreVote(id raft.ServerID, target raft.ServerAddress, args *raft.RequestPreVoteRequest, resp *raft.RequestPreVoteResponse) error {
	pv, ok := t.Transport.(raft.WithPreVote)
	if !ok {
		return errors.New("cluster: transport does not support pre-vote")
	}
	return t.answered(id, pv.RequestPreVote(id, target, args, resp))
}

// Close closes the wrapped transport (raft calls it on shutdown).
func (t *contactTransport) Close() error {
	if c, ok := t.Transport.(raft.WithClose); ok {
		return c.Close()
	}
	return nil
}
