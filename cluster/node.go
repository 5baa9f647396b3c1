package cluster

import (
	"context"
	"crypto/tls"
	"encoding/gob"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
)

// ErrNotLeader: no leader is known, or a forwarded proposal reached a node
// that is no longer leader. Callers retry.
var ErrNotLeader = errors.New("cluster: no leader")

// ErrForbidden: a forwarded proposal came from a certificate that is
// neither a node of the cluster nor an admin certificate.
var ErrForbidden = errors.New("cluster: proposer is not a cluster member")

// Defaults of NodeConfig. The raft timeouts are well under a second so a
// lost leader is replaced within the 2 s failover budget. The leader lease
// is as long as raft allows (the heartbeat timeout): at 250 ms a leader on
// a loaded machine stepped down now and then although nothing failed, and
// with the witness leading (leader placement) every such flap pauses I/O
// for an election. Nothing relies on a short leader lease: the controller
// confirms leadership with a quorum round before it fences, and an owner's
// own serving lease is separate (lease.go).
const (
	DefaultHeartbeatTimeout   = 500 * time.Millisecond
	DefaultElectionTimeout    = 500 * time.Millisecond
	DefaultLeaderLeaseTimeout = 500 * time.Millisecond
	DefaultHeartbeatInterval  = 100 * time.Millisecond
)

// NodeConfig configures a Node. ID, Role and either TLS+BindAddr or
// Transport are required.
type NodeConfig struct {
	ID   string
	Role Role
	// DataDir holds raft.db (log and stable store, bbolt) and snapshots/.
	// Empty keeps everything in memory (tests).
	DataDir string

	// BindAddr is the host:port of the mutual-TLS listener; AdvertiseAddr
	// what peers dial (default: the listener's address).
	BindAddr, AdvertiseAddr string
	TLS                     *tls.Config

	// Transport replaces the TLS transport (tests: raft.InmemTransport).
	// Forward must then carry proposals to the leader.
	Transport raft.Transport
	Forward   func(ctx context.Context, leader raft.ServerAddress, cmd []byte) (any, error)

	HeartbeatTimeout, ElectionTimeout, LeaderLeaseTimeout time.Duration
	// HeartbeatInterval is how often a node tells the leader it is alive.
	HeartbeatInterval time.Duration

	// ForwardFromAnyCert makes the leader accept forwarded proposals from
	// any certificate the cluster CA signed. By default only the nodes in
	// the state and admin certificates (CA.IssueAdmin) may propose: a
	// certificate issued for a node that was never joined, or was
	// removed, cannot change the cluster.
	ForwardFromAnyCert bool

	// CA, when set (the node holding the CA key), lets this node answer
	// network joins: it signs the new node's CSR (join.go). Nodes without
	// it refuse joins with ErrNoCAKey.
	CA *CA

	Clock  Clock
	Logger *slog.Logger
}

func (c *NodeConfig) setDefaults() error {
	if err := validID("NodeConfig.ID", c.ID); err != nil {
		return err
	}
	if c.Role != RoleStorage && c.Role != RoleWitness {
		return fmt.Errorf("cluster: NodeConfig.Role %q: want storage or witness", c.Role)
	}
	if c.Transport == nil && (c.TLS == nil || c.BindAddr == "") {
		return errors.New("cluster: NodeConfig needs TLS and BindAddr, or a Transport")
	}
	if c.Transport != nil && c.Forward == nil {
		return errors.New("cluster: NodeConfig.Transport needs Forward")
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.HeartbeatTimeout, DefaultHeartbeatTimeout)
	def(&c.ElectionTimeout, DefaultElectionTimeout)
	def(&c.LeaderLeaseTimeout, DefaultLeaderLeaseTimeout)
	def(&c.HeartbeatInterval, DefaultHeartbeatInterval)
	if c.LeaderLeaseTimeout > c.HeartbeatTimeout {
		return fmt.Errorf("cluster: NodeConfig.LeaderLeaseTimeout %v must not exceed HeartbeatTimeout %v", c.LeaderLeaseTimeout, c.HeartbeatTimeout)
	}
	if c.Clock == nil {
		c.Clock = SystemClock{}
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// Node is one member of the Raft group: the FSM, the log and stable store,
// snapshots and the transport. It implements Proposer: on a follower a
// proposal is forwarded to the leader.
type Node struct {
	cfg  NodeConfig
	fsm  *FSM
	raft *raft.Raft
	mux  *muxLayer // nil with an injected transport
	log  *slog.Logger

	closers []io.Closer

	mu        sync.Mutex
	heartbeat func(node string, at time.Time) // set while the controller runs
	seen      map[string]time.Time
	heard     map[string]time.Time // peer -> send time of its latest echoed beat (quorum.go)

	closeOnce sync.Once
	done      chan struct{} // closed by Close: stops Run's loops
}

var _ Proposer = (*Node)(nil)

// NewNode opens the stores and starts Raft. A brand-new cluster then needs
// Bootstrap on exactly one node; the others are added with AddVoter.
func NewNode(cfg NodeConfig) (*Node, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	n := &Node{cfg: cfg, fsm: NewFSM(cfg.Logger), log: cfg.Logger.With("node", cfg.ID), done: make(chan struct{})}
	ok := false
	defer func() {
		if !ok {
			n.closeResources()
		}
	}()

	var (
		logs   raft.LogStore
		stable raft.StableStore
		snaps  raft.SnapshotStore
	)
	hlog := hclog.New(&hclog.LoggerOptions{Name: "raft", Output: slogWriter{n.log}, Level: hclog.Warn})
	if cfg.DataDir == "" {
		s := raft.NewInmemStore()
		logs, stable, snaps = s, s, raft.NewInmemSnapshotStore()
	} else {
		if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
			return nil, fmt.Errorf("cluster: data dir: %w", err)
		}
		bs, err := raftboltdb.NewBoltStore(filepath.Join(cfg.DataDir, "raft.db"))
		if err != nil {
			return nil, fmt.Errorf("cluster: raft.db: %w", err)
		}
		n.closers = append(n.closers, bs)
		logs, stable = bs, bs
		fs, err := raft.NewFileSnapshotStoreWithLogger(cfg.DataDir, 2, hlog)
		if err != nil {
			return nil, fmt.Errorf("cluster: snapshots: %w", err)
		}
		snaps = fs
	}

	trans := cfg.Transport
	if trans == nil {
		var adv net.Addr
		if cfg.AdvertiseAddr != "" {
			a, err := net.ResolveTCPAddr("tcp", cfg.AdvertiseAddr)
			if err != nil {
				return nil, fmt.Errorf("cluster: advertise address: %w", err)
			}
			adv = a
		}
		m, err := newMuxLayer(cfg.BindAddr, adv, cfg.TLS, n.log)
		if err != nil {
			return nil, err
		}
		n.mux = m
		m.handle(tagForward, n.serveForward)
		m.handle(tagHeartbeat, n.serveHeartbeat)
		m.handle(tagBootstrap, n.serveBootstrap)
		m.handle(tagAdmit, n.serveAdmit)
		m.watchRevocations(n.fsm)
		m.start()
		nt := raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
			Stream: m, MaxPool: 3, Timeout: 2 * time.Second, Logger: hlog,
		})
		trans = nt
		n.closers = append(n.closers, nt)
	}

	if _, ok := trans.(raft.WithPreVote); ok {
		// Only a transport with pre-vote is wrapped: the wrapper claims
		// pre-vote, and raft would otherwise send pre-votes that fail.
		trans = &contactTransport{Transport: trans, note: func(id raft.ServerID) {
			n.Heartbeat(string(id), n.cfg.Clock.Now())
		}}
	}

	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.ID)
	rc.HeartbeatTimeout = cfg.HeartbeatTimeout
	rc.ElectionTimeout = cfg.ElectionTimeout
	rc.LeaderLeaseTimeout = cfg.LeaderLeaseTimeout
	rc.CommitTimeout = 5 * time.Millisecond
	rc.Logger = hlog
	r, err := raft.NewRaft(rc, n.fsm, logs, stable, snaps, trans)
	if err != nil {
		return nil, fmt.Errorf("cluster: raft: %w", err)
	}
	n.raft = r
	ok = true
	return n, nil
}

// FSM returns the node's replica of the state.
func (n *Node) FSM() *FSM { return n.fsm }

// Raft exposes the raft instance for status and tests.
func (n *Node) Raft() *raft.Raft { return n.raft }

// ID is the node id.
func (n *Node) ID() string { return n.cfg.ID }

// Addr is the address peers dial.
func (n *Node) Addr() raft.ServerAddress {
	if n.mux != nil {
		return raft.ServerAddress(n.mux.Addr().String())
	}
	return n.cfg.Transport.LocalAddr()
}

// IsLeader reports whether this node is the Raft leader.
func (n *Node) IsLeader() bool { return n.raft.State() == raft.Leader }

// Bootstrap starts a new cluster with this node as its only voter, waits
// for it to lead and registers it in the state.
func (n *Node) Bootstrap(ctx context.Context, self NodeInfo) error {
	f := n.raft.BootstrapCluster(raft.Configuration{Servers: []raft.Server{{
		Suffrage: raft.Voter, ID: raft.ServerID(n.cfg.ID), Address: n.Addr(),
	}}})
	if err := f.Error(); err != nil {
		return fmt.Errorf("cluster: bootstrap: %w", err)
	}
	if err := n.WaitLeader(ctx); err != nil {
		return err
	}
	nd := self
	nd.ID, nd.Role, nd.RaftAddr = n.cfg.ID, n.cfg.Role, string(n.Addr())
	_, err := n.Propose(ctx, &Command{Kind: KindNodeAdd, NodeAdd: &NodeAddCmd{Node: nd}})
	return err
}

// WaitLeader blocks until some leader is known.
func (n *Node) WaitLeader(ctx context.Context) error {
	for {
		if addr, _ := n.raft.LeaderWithID(); addr != "" {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("cluster: waiting for a leader: %w", ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// Propose commits c and returns Apply's result. On a follower the command
// is forwarded to the leader. The context bounds the wait.
func (n *Node) Propose(ctx context.Context, c *Command) (any, error) {
	c.stamp(n.cfg.Clock.Now)
	b, err := c.Encode()
	if err != nil {
		return nil, err
	}
	return n.proposeEncoded(ctx, b)
}

// proposeEncoded applies b on the leader, forwarding when this node is a
// follower. Right after an election a follower may not know the new leader
// yet; since nothing has been sent then, it waits (within ctx) for one to be
// known rather than failing a proposal that would succeed a moment later.
// Outcomes that may have been applied (leadership lost mid-apply, forwarding
// errors) are returned as they are: retrying them could apply twice.
func (n *Node) proposeEncoded(ctx context.Context, b []byte) (any, error) {
	wait := 10 * time.Millisecond
	for {
		var (
			res any
			err error
		)
		if n.raft.State() == raft.Leader {
			res, err = n.applyLocal(ctx, b)
			if !errors.Is(err, raft.ErrNotLeader) {
				return res, err
			}
		} else if addr, _ := n.raft.LeaderWithID(); addr != "" {
			if n.mux == nil {
				return n.cfg.Forward(ctx, addr, b)
			}
			res, err = n.forward(ctx, string(addr), b)
			if !errors.Is(err, errForwardDial) {
				return res, err
			}
			// Nothing was sent: the leader we knew is gone (a dead
			// node does not even refuse the connection). Look again
			// instead of spending the caller's whole deadline on it.
		}
		select {
		case <-ctx.Done():
			if err == nil {
				err = ErrNotLeader
			}
			return nil, fmt.Errorf("%w (no leader before %w)", err, ctx.Err())
		case <-time.After(wait):
		}
		wait = min(2*wait, 200*time.Millisecond)
	}
}

func (n *Node) applyLocal(ctx context.Context, b []byte) (any, error) {
	timeout := 5 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
		if timeout <= 0 {
			return nil, ctx.Err()
		}
	}
	f := n.raft.Apply(b, timeout)
	if err := f.Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipLost) {
			return nil, fmt.Errorf("%w: %w", ErrNotLeader, err)
		}
		return nil, fmt.Errorf("cluster: apply: %w", err)
	}
	r, _ := f.Response().(Result)
	return r.Value, r.Err
}

// ApplyForwarded is what a leader does with a forwarded proposal; tests
// with an in-memory transport call it from their Forward func.
func (n *Node) ApplyForwarded(ctx context.Context, b []byte) (any, error) {
	if n.raft.State() != raft.Leader {
		return nil, ErrNotLeader
	}
	return n.applyLocal(ctx, b)
}

// forwardDialTimeout bounds reaching the leader (TCP and TLS handshake).
// A leader on the cluster network answers in milliseconds; one that lost
// power answers nothing, and a proposal (an ISR removal that writes are
// waiting for) must not spend its whole deadline on it: proposeEncoded
// looks for the new leader instead.
const forwardDialTimeout = time.Second

// errForwardDial marks a forward that failed before anything was sent, so
// it is safe to retry.
var errForwardDial = errors.New("cluster: leader unreachable")

func (n *Node) forward(ctx context.Context, addr string, b []byte) (any, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
	}
	dctx, dcancel := context.WithTimeout(ctx, forwardDialTimeout)
	c, err := n.mux.dialTagged(dctx, addr, tagForward)
	dcancel()
	if err != nil {
		return nil, fmt.Errorf("%w: %w: dial %s: %w", ErrNotLeader, errForwardDial, addr, err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	if err := gob.NewEncoder(c).Encode(forwardRequest{Cmd: b}); err != nil {
		return nil, fmt.Errorf("cluster: forward: %w", err)
	}
	var resp forwardResponse
	if err := gob.NewDecoder(c).Decode(&resp); err != nil {
		return nil, fmt.Errorf("cluster: forward: %w", err)
	}
	return resp.Value, errorFromWire(resp.Code, resp.Msg)
}

func (n *Node) serveForward(c net.Conn) {
	defer c.Close()
	peer, _ := PeerID(c)
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	var req forwardRequest
	if err := gob.NewDecoder(c).Decode(&req); err != nil {
		n.log.Warn("cluster: bad forward request", "peer", peer, "err", err)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var (
		v   any
		err error
	)
	if n.forwardAllowed(c, peer) {
		v, err = n.ApplyForwarded(ctx, req.Cmd)
	} else {
		err = fmt.Errorf("%w: certificate %q is neither a node nor an admin", ErrForbidden, peer)
		n.log.Warn("cluster: forwarded proposal refused", "peer", peer, "err", err)
	}
	resp := forwardResponse{Value: v}
	if err != nil {
		resp.Code, resp.Msg = errorCode(err), err.Error()
	}
	if err := gob.NewEncoder(c).Encode(resp); err != nil {
		n.log.Warn("cluster: forward reply", "peer", peer, "err", err)
	}
}

// forwardAllowed: the peer's certificate names a node of the state (as
// this leader has applied it) or is an admin certificate.
func (n *Node) forwardAllowed(c net.Conn, peer string) bool {
	if n.cfg.ForwardFromAnyCert || PeerIsAdmin(c) {
		return true
	}
	member := false
	n.fsm.Read(func(s *State) { _, member = s.Nodes[peer] })
	return member
}

// serveHeartbeat reads one byte per beat from a peer whose identity is its
// certificate, so a node cannot beat on another's behalf, and answers each
// read with one byte: the sender redials a stream that stops answering
// (runHeartbeats).
func (n *Node) serveHeartbeat(c net.Conn) {
	defer c.Close()
	peer, err := PeerID(c)
	if err != nil {
		return
	}
	buf := make([]byte, 64)
	for {
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		k, err := c.Read(buf)
		if k > 0 {
			n.Heartbeat(peer, n.cfg.Clock.Now())
			_ = c.SetWriteDeadline(time.Now().Add(n.cfg.HeartbeatInterval * 3))
			// Echo every beat: the sender matches echoes to beats to
			// date its quorum contact (quorum.go).
			if _, werr := c.Write(buf[:k]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// Heartbeat records that node is alive: a beat on its heartbeat stream,
// or an answer to one of this node's raft RPCs (contactTransport). Every
// node keeps the last sign of life of each peer, so a newly elected
// leader's controller starts from real last-seen times instead of a blind
// grace period; the running controller (leader only) also gets it.
func (n *Node) Heartbeat(node string, at time.Time) {
	n.mu.Lock()
	if n.seen == nil {
		n.seen = map[string]time.Time{}
	}
	if at.After(n.seen[node]) {
		n.seen[node] = at
	}
	h := n.heartbeat
	n.mu.Unlock()
	if h != nil {
		h(node, at)
	}
}

// LastSeen returns the last heartbeat time of every peer heard from.
func (n *Node) LastSeen() map[string]time.Time {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make(map[string]time.Time, len(n.seen))
	for k, v := range n.seen {
		out[k] = v
	}
	return out
}

// lastSeenOf is LastSeen for one peer (zero if never heard from).
func (n *Node) lastSeenOf(node string) time.Time {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.seen[node]
}

// SetHeartbeatSink routes heartbeats to the controller (nil: drop).
func (n *Node) SetHeartbeatSink(h func(node string, at time.Time)) {
	n.mu.Lock()
	n.heartbeat = h
	n.mu.Unlock()
}

// runHeartbeats keeps one sender per other voter (beatPeer), refreshed
// from the raft configuration every ten intervals. With an injected
// transport there is nothing to dial: the test harness delivers beats
// itself.
func (n *Node) runHeartbeats(ctx context.Context) {
	if n.mux == nil {
		return
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		// A closed node must fall silent: beats from a node whose raft
		// is gone would keep it "alive" forever.
		select {
		case <-n.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	var wg sync.WaitGroup
	defer wg.Wait()
	senders := map[string]context.CancelFunc{} // by address
	defer func() {
		for _, stop := range senders {
			stop()
		}
	}()
	t := time.NewTicker(n.cfg.HeartbeatInterval * 10)
	defer t.Stop()
	for {
		var peers []string
		ids := map[string]string{} // address -> id
		if f := n.raft.GetConfiguration(); f.Error() == nil {
			for _, s := range f.Configuration().Servers {
				if string(s.ID) != n.cfg.ID {
					peers = append(peers, string(s.Address))
					ids[string(s.Address)] = string(s.ID)
				}
			}
		}
		for addr, stop := range senders {
			if !slices.Contains(peers, addr) {
				stop()
				delete(senders, addr)
			}
		}
		for _, addr := range peers {
			if senders[addr] == nil {
				pctx, stop := context.WithCancel(ctx)
				senders[addr] = stop
				wg.Add(1)
				go func() {
					defer wg.Done()
					n.beatPeer(pctx, ids[addr], addr)
				}()
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// heartbeatStale is how long a heartbeat stream may go without an answer
// before it is redialled: well under the failure timeout, so that a peer
// that restarted (power cycle) hears from this node again in time.
func (n *Node) heartbeatStale() time.Duration { return n.cfg.HeartbeatInterval * 4 }

// beatPeer sends a beat to addr every interval over a kept-open stream
// until ctx ends. The receiver answers each beat; a stream that has not
// answered for heartbeatStale is closed and redialled. Without that, a
// peer that lost power leaves a connection that still takes writes (the
// kernel buffers them and retransmits into the void for minutes), and
// after the peer comes back it would never hear this node: its
// controller, once it leads, would declare this node failed and fence it.
// Each peer has its own sender, so dialling a dead peer (which can take
// the whole dial timeout) never delays the beats to the live ones.
func (n *Node) beatPeer(ctx context.Context, id, addr string) {
	type stream struct {
		c        net.Conn
		answered atomic.Int64 // unix nanoseconds of the last answer (or the dial)
		beats    beatTimes
	}
	var cur *stream
	drop := func() {
		if cur != nil {
			cur.c.Close()
			cur = nil
		}
	}
	defer drop()
	t := time.NewTicker(n.cfg.HeartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if cur != nil && time.Since(time.Unix(0, cur.answered.Load())) > n.heartbeatStale() {
			n.log.Debug("cluster: heartbeat stream unanswered; redialling", "peer", addr)
			drop()
		}
		if cur == nil {
			dctx, cancel := context.WithTimeout(ctx, n.cfg.HeartbeatInterval*3)
			nc, err := n.mux.dialTagged(dctx, addr, tagHeartbeat)
			cancel()
			if err != nil {
				continue
			}
			s := &stream{c: nc}
			s.answered.Store(time.Now().UnixNano())
			go func() {
				buf := make([]byte, 64)
				for {
					k, err := nc.Read(buf)
					if k > 0 {
						s.answered.Store(time.Now().UnixNano())
					}
					for range k {
						if at, ok := s.beats.pop(); ok && id != "" {
							n.heardBy(id, at)
						}
					}
					if err != nil {
						return
					}
				}
			}()
			cur = s
		}
		_ = cur.c.SetWriteDeadline(time.Now().Add(n.cfg.HeartbeatInterval * 3))
		cur.beats.push(time.Now())
		if _, err := cur.c.Write([]byte{1}); err != nil {
			drop()
		}
	}
}

// TransferLeadership hands Raft leadership to another voter, so a leader
// that stops on purpose leaves no election gap behind. It is a no-op on a
// follower.
func (n *Node) TransferLeadership(ctx context.Context) error {
	if !n.IsLeader() {
		return nil
	}
	done, err := awaitFuture(ctx, n.raft.LeadershipTransfer())
	if !done {
		return err
	}
	if err != nil {
		return fmt.Errorf("cluster: leadership transfer: %w", err)
	}
	// Return once another node leads: shutting raft down while the
	// hand-over is still settling has been seen to hang its shutdown.
	return waitFor(ctx, func() bool {
		_, id := n.raft.LeaderWithID()
		return id != "" && string(id) != n.cfg.ID
	})
}

// awaitFuture waits for f or for ctx to end, whichever comes first. done
// reports whether f finished; err is then f's error, else ctx.Err(). A
// raft future cannot be cancelled, so the waiting goroutine outlives an
// abandoned wait until raft resolves f (at the latest on shutdown).
func awaitFuture(ctx context.Context, f raft.Future) (done bool, err error) {
	ch := make(chan error, 1)
	go func() { ch <- f.Error() }()
	select {
	case err := <-ch:
		return true, err
	case <-ctx.Done():
		return false, ctx.Err()
	}
}

// AddVoter adds a voting member (storage or witness). Only the leader can.
func (n *Node) AddVoter(ctx context.Context, id string, addr string) error {
	f := n.raft.AddVoter(raft.ServerID(id), raft.ServerAddress(addr), 0, timeoutOf(ctx))
	if err := f.Error(); err != nil {
		return fmt.Errorf("cluster: add voter %s: %w", id, err)
	}
	return nil
}

// RemoveServer removes a member from the Raft configuration.
func (n *Node) RemoveServer(ctx context.Context, id string) error {
	f := n.raft.RemoveServer(raft.ServerID(id), 0, timeoutOf(ctx))
	if err := f.Error(); err != nil {
		return fmt.Errorf("cluster: remove server %s: %w", id, err)
	}
	return nil
}

// Join admits a node that presented token: the JoinCmd consumes the token
// (single use, checked by Apply), then the node becomes a voter. Runs on
// the leader (the API forwards to it).
// The token may be a full ticket (JoinTicket): only its secret counts.
func (n *Node) Join(ctx context.Context, token string, nd NodeInfo) error {
	t, err := ParseJoinTicket(token)
	if err != nil {
		return err
	}
	if _, err := n.Propose(ctx, &Command{Kind: KindJoin, Join: &JoinCmd{Hash: TokenHash(t.Secret), Node: nd}}); err != nil {
		return err
	}
	return n.AddVoter(ctx, nd.ID, nd.RaftAddr)
}

func timeoutOf(ctx context.Context) time.Duration {
	if dl, ok := ctx.Deadline(); ok {
		if d := time.Until(dl); d > 0 {
			return d
		}
		return time.Millisecond
	}
	return 10 * time.Second
}

// Run serves until ctx ends: heartbeats to the leader and, through hooks
// set by the caller, the controller and lease. It returns ctx.Err().
func (n *Node) Run(ctx context.Context) error {
	n.runHeartbeats(ctx)
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-n.done:
		return ErrClosed
	}
}

// ErrClosed is returned by Run after Close.
var ErrClosed = errors.New("cluster: node closed")

// Close shuts Raft down and releases the stores and listener.
func (n *Node) Close() error {
	var err error
	n.closeOnce.Do(func() {
		close(n.done)
		if n.raft != nil {
			err = n.raft.Shutdown().Error()
		}
		n.closeResources()
	})
	return err
}

func (n *Node) closeResources() {
	if n.mux != nil {
		n.mux.Close()
	}
	for i := len(n.closers) - 1; i >= 0; i-- {
		_ = n.closers[i].Close()
	}
	if n.mux != nil {
		n.mux.wait()
	}
}

// slogWriter turns hclog's text lines into slog records.
type slogWriter struct{ l *slog.Logger }

func (w slogWriter) Write(p []byte) (int, error) {
	w.l.Warn("raft", "msg", strings.TrimSpace(string(p)))
	return len(p), nil
}
