package cluster

import (
	"context"
	"crypto/tls"
	"encoding/gob"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/hasan-storage/hasan/fencing"
	"github.com/hasan-storage/hasan/replication"
)

type testLogWriter struct{ t *testing.T }

func (w testLogWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(p))
	return len(p), nil
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

type tlsCluster struct {
	t     *testing.T
	ca    *CA
	nodes []*Node
}

func nodeTLS(t *testing.T, ca *CA, id string) *tls.Config {
	t.Helper()
	cert, key, err := ca.Issue(id, time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := TLSConfig(ca.CertPEM, cert, key)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func (c *tlsCluster) start(id string, role Role, dir string) *Node {
	c.t.Helper()
	n, err := NewNode(NodeConfig{ID: id, Role: role, DataDir: dir, BindAddr: "127.0.0.1:0",
		TLS: nodeTLS(c.t, c.ca, id), Logger: testLogger(c.t)})
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { n.Close() })
	c.nodes = append(c.nodes, n)
	return n
}

func newTLSCluster(t *testing.T, ids ...string) *tlsCluster {
	t.Helper()
	ca, err := NewCA("test", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	c := &tlsCluster{t: t, ca: ca}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	first := c.start(ids[0], RoleStorage, t.TempDir())
	if err := first.Bootstrap(ctx, NodeInfo{}); err != nil {
		t.Fatal(err)
	}
	for _, id := range ids[1:] {
		role := RoleStorage
		if id[0] == 'w' {
			role = RoleWitness
		}
		n := c.start(id, role, t.TempDir())
		if err := first.AddVoter(ctx, id, string(n.Addr())); err != nil {
			t.Fatal(err)
		}
		// Registered by the leader (as a join is); then a proposal through
		// the follower exercises forwarding, which needs membership.
		if _, err := first.Propose(ctx, cNodeAdd(id, role, string(n.Addr()))); err != nil {
			t.Fatalf("register %s: %v", id, err)
		}
		if err := waitFor(ctx, func() bool { a, _ := n.raft.LeaderWithID(); return a != "" }); err != nil {
			t.Fatal(err)
		}
		if _, err := n.Propose(ctx, &Command{Kind: KindEvent, Event: &EventCmd{Event: Event{Kind: "test", Node: id, Message: "forwarded"}}}); err != nil {
			t.Fatalf("forward from %s: %v", id, err)
		}
	}
	return c
}

func (c *tlsCluster) leader(ctx context.Context, among ...*Node) (*Node, error) {
	if len(among) == 0 {
		among = c.nodes
	}
	var l *Node
	err := waitFor(ctx, func() bool {
		for _, n := range among {
			if n.IsLeader() {
				l = n
				return true
			}
		}
		return false
	})
	return l, err
}

func TestTLSClusterReplicatesAndFailsOver(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := newTLSCluster(t, "a", "b", "w")
	a, b, w := c.nodes[0], c.nodes[1], c.nodes[2]

	// Every replica converges on the same state.
	for _, cmd := range []*Command{cVol(u1, "a", "a", "b")} {
		if _, err := b.Propose(ctx, cmd); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range c.nodes {
		if err := waitFor(ctx, func() bool {
			var ok bool
			n.FSM().Read(func(s *State) { _, ok = s.Volumes[u1]; ok = ok && len(s.Nodes) == 3 })
			return ok
		}); err != nil {
			t.Fatalf("%s did not converge: %v", n.ID(), err)
		}
	}
	// A refused command forwarded from a follower keeps its sentinel.
	m := &Membership{P: w, FSM: w.FSM()}
	if _, err := m.RemoveFromISR(ctx, u1, 0, "a", "b"); !errors.Is(err, replication.ErrStaleEpoch) {
		t.Fatalf("forwarded stale epoch: %v", err)
	}
	st, err := m.RemoveFromISR(ctx, u1, 1, "a", "b")
	if err != nil || fmt.Sprint(st.ISR) != "[a]" {
		t.Fatalf("forwarded remove: %+v %v", st, err)
	}

	// Leader loss: the other two elect a new leader and keep committing.
	lost := time.Now()
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	nl, err := c.leader(ctx, b, w)
	if err != nil {
		t.Fatal("no new leader", err)
	}
	t.Logf("new leader %s after %v", nl.ID(), time.Since(lost))
	if _, err := w.Propose(ctx, cSetState("b", NodeStandby)); err != nil {
		t.Fatal(err)
	}
	if err := waitFor(ctx, func() bool {
		var s NodeState
		b.FSM().Read(func(st *State) { s = st.Nodes["b"].State })
		return s == NodeStandby
	}); err != nil {
		t.Fatal(err)
	}

	// Remove the dead node from the configuration.
	if err := nl.RemoveServer(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	cf := nl.Raft().GetConfiguration()
	if err := cf.Error(); err != nil {
		t.Fatal(err)
	}
	for _, s := range cf.Configuration().Servers {
		if s.ID == "a" {
			t.Fatal("a still in configuration")
		}
	}
}

func TestTLSRefusesStrangers(t *testing.T) {
	c := newTLSCluster(t, "a")
	other, err := NewCA("other", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	// A node certificate from another CA cannot reach raft or forwarding.
	cfg := nodeTLS(t, other, "mallory")
	conn, err := tls.Dial("tcp", string(c.nodes[0].Addr()), cfg)
	if err == nil {
		// TLS 1.3 reports the client-cert refusal on first read.
		_, _ = conn.Write([]byte{tagForward})
		_ = conn.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, err = conn.Read(make([]byte, 1))
		conn.Close()
	}
	if err == nil {
		t.Fatal("stranger was served")
	}
	// No certificate at all.
	conn, err = tls.Dial("tcp", string(c.nodes[0].Addr()), &tls.Config{RootCAs: cfg.RootCAs, ServerName: clusterServerName, InsecureSkipVerify: true}) //nolint:gosec // test of refusal
	if err == nil {
		_, _ = conn.Write([]byte{tagForward})
		_ = conn.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, err = conn.Read(make([]byte, 1))
		conn.Close()
	}
	if err == nil {
		t.Fatal("client without certificate was served")
	}
}

// forwardAs sends one forwarded proposal to addr with cfg's certificate,
// as a follower (or an operator's tool) would.
func forwardAs(ctx context.Context, cfg *tls.Config, addr string, c *Command) error {
	d := &tls.Dialer{Config: cfg}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write([]byte{tagForward}); err != nil {
		return err
	}
	b, err := c.Encode()
	if err != nil {
		return err
	}
	if err := gob.NewEncoder(conn).Encode(forwardRequest{Cmd: b}); err != nil {
		return err
	}
	var resp forwardResponse
	if err := gob.NewDecoder(conn).Decode(&resp); err != nil {
		return err
	}
	return errorFromWire(resp.Code, resp.Msg)
}

// TestForwardChecksMembership: a certificate the cluster CA signed is not
// enough to change the state: the leader takes forwarded proposals only
// from nodes of the state and from admin certificates.
func TestForwardChecksMembership(t *testing.T) {
	c := newTLSCluster(t, "a", "b")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	l, err := c.leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ev := func(msg string) *Command {
		return &Command{Kind: KindEvent, At: time.Now(), Event: &EventCmd{Event: Event{Kind: "test", Message: msg}}}
	}
	count := func(msg string) int {
		n := 0
		for _, e := range l.FSM().State().Events {
			if e.Message == msg {
				n++
			}
		}
		return n
	}
	// A stranger with a CA-signed node certificate is refused, and
	// nothing is applied.
	err = forwardAs(ctx, nodeTLS(t, c.ca, "mallory"), string(l.Addr()), ev("from mallory"))
	if !errors.Is(err, ErrForbidden) {
		t.Fatalf("stranger's proposal: %v, want ErrForbidden", err)
	}
	if count("from mallory") != 0 {
		t.Fatal("a stranger's proposal was applied")
	}
	// A member's certificate is accepted (b is in the state).
	if err := forwardAs(ctx, nodeTLS(t, c.ca, "b"), string(l.Addr()), ev("from b")); err != nil {
		t.Fatalf("member: %v", err)
	}
	// An admin certificate is accepted though it names no node.
	cert, key, err := c.ca.IssueAdmin("e2e-harness", time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	admin, err := TLSConfig(c.ca.CertPEM, cert, key)
	if err != nil {
		t.Fatal(err)
	}
	if err := forwardAs(ctx, admin, string(l.Addr()), ev("from admin")); err != nil {
		t.Fatalf("admin: %v", err)
	}
	if count("from b") != 1 || count("from admin") != 1 {
		t.Fatal("accepted proposals not applied")
	}
	// A removed node loses the right with its membership.
	if _, err := l.Propose(ctx, &Command{Kind: KindNodeRemove, NodeRemove: &NodeRemoveCmd{ID: "b"}}); err != nil {
		t.Fatal(err)
	}
	if err := forwardAs(ctx, nodeTLS(t, c.ca, "b"), string(l.Addr()), ev("from removed b")); !errors.Is(err, ErrForbidden) {
		t.Fatalf("removed node: %v, want ErrForbidden", err)
	}
}

func TestJoinTokenSingleUse(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c := newTLSCluster(t, "a")
	a := c.nodes[0]
	tok, issue, err := NewJoinToken(RoleWitness, time.Now(), time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Propose(ctx, issue); err != nil {
		t.Fatal(err)
	}
	w := c.start("w", RoleWitness, "")
	if err := a.Join(ctx, tok, NodeInfo{ID: "w", RaftAddr: string(w.Addr())}); err != nil {
		t.Fatal(err)
	}
	if err := a.Join(ctx, tok, NodeInfo{ID: "w2", RaftAddr: "127.0.0.1:1"}); !errors.Is(err, ErrToken) {
		t.Fatalf("second use: %v", err)
	}
	if err := a.Join(ctx, "hsn1.bogus.token", NodeInfo{ID: "w3", RaftAddr: "127.0.0.1:2"}); !errors.Is(err, ErrToken) {
		t.Fatalf("bogus: %v", err)
	}
	// The state never holds the token itself.
	var leaked bool
	a.FSM().Read(func(s *State) {
		for h := range s.Tokens {
			leaked = leaked || h == tok
		}
	})
	if leaked {
		t.Fatal("token stored in clear")
	}
	cf := a.Raft().GetConfiguration()
	if err := cf.Error(); err != nil || len(cf.Configuration().Servers) != 2 {
		t.Fatalf("configuration %+v %v", cf.Configuration(), err)
	}
	if err := waitFor(ctx, func() bool { return w.FSM().State().Nodes["w"] != nil }); err != nil {
		t.Fatal("witness did not receive the log")
	}
	_ = raft.Voter
}

// TestTLSEndToEndTakeover runs the real path: heartbeats over the mutual-TLS
// stream (identity from the certificate), controllers on every node (only
// the leader's acts), fence history through raft, and a crashed owner.
func TestTLSEndToEndTakeover(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := newTLSCluster(t, "a", "b", "w")
	lead, err := c.leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	agents := map[string]*fencing.FakeAgent{"a": fencing.NewFakeAgent(), "b": fencing.NewFakeAgent()}
	for _, cmd := range []*Command{
		cDevice("bmc-a", ipmiCfg("x")), cDevice("bmc-b", ipmiCfg("y")),
		cSetFence("a", []string{"bmc-a"}), cSetFence("b", []string{"bmc-b"}),
		cVol(u1, "a", "a", "b"),
		cTarget(Target{IQN: iqn1, LUNs: map[uint64]string{0: u1}}),
		cGroup(Group{Name: "g1", VIPs: []string{"192.0.2.10/24"}, Targets: []string{iqn1}, Preferred: []string{"a", "b"}}),
	} {
		if _, err := lead.Propose(ctx, cmd); err != nil {
			t.Fatalf("%s: %v", cmd.Kind, err)
		}
	}
	rctx, rcancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { rcancel(); wg.Wait() }()
	for _, n := range c.nodes {
		wg.Add(2)
		go func() { defer wg.Done(); _ = n.Run(rctx) }()
		go func() {
			defer wg.Done()
			_ = n.RunController(rctx, func() *Controller {
				return &Controller{Config: ControllerConfig{Self: n.ID()}, FSM: n.FSM(), P: n, VerifyLeader: n.VerifyLeader,
					Logger: testLogger(t),
					Fencer: func(st *State) (Fencer, error) {
						devs := map[string]fencing.Device{}
						for id, ag := range agents {
							devs["bmc-"+id] = fencing.Device{Agent: ag, Timeout: time.Second, PollInterval: 5 * time.Millisecond}
						}
						topo := map[string]fencing.NodeTopology{}
						for id, nd := range st.Nodes {
							topo[id] = nd.Fence
						}
						return &fencing.Fencer{Devices: devs, Nodes: topo, History: &FenceHistory{P: n, FSM: n.FSM()}, Logger: testLogger(t)}, nil
					}}
			})
		}()
	}
	state := func() *State { l, _ := c.leader(ctx); return l.FSM().State() }
	if err := waitFor(ctx, func() bool { return state().Groups["g1"].Owner == "a" }); err != nil {
		t.Fatal("no placement")
	}
	// Heartbeats flow: nothing is fenced while everyone is up.
	time.Sleep(2 * DefaultFailureTimeout)
	for id, ag := range agents {
		if calls := ag.Calls(); len(calls) != 0 {
			t.Fatalf("healthy node %s fenced: %v", id, calls)
		}
	}
	crash := time.Now()
	t.Logf("crash at %s", crash.Format("15:04:05.000"))
	if err := c.nodes[0].Close(); err != nil { // a
		t.Fatal(err)
	}
	if d := time.Since(crash); d > time.Second {
		t.Fatalf("Close took %v: peers' streams kept it open", d)
	}
	if err := waitFor(ctx, func() bool {
		l, err := c.leader(ctx, c.nodes[1], c.nodes[2])
		return err == nil && l.FSM().State().Groups["g1"].Owner == "b"
	}); err != nil {
		t.Fatal("no takeover", err)
	}
	t.Logf("owner crash to committed takeover: %v (real clock, TLS, -race)", time.Since(crash))
	if agents["a"].Power() != fencing.PowerOff || len(agents["b"].Calls()) != 0 {
		t.Fatalf("a %v, b calls %v", agents["a"].Power(), agents["b"].Calls())
	}
}
