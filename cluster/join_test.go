package cluster

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/gob"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// newJoinCluster builds a, b, c over mutual TLS; only a holds the CA key,
// as the init node does. Logs of every node also go to logs.
func newJoinCluster(t *testing.T, logs io.Writer) *tlsCluster {
	t.Helper()
	ca, err := NewCA("test", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	c := &tlsCluster{t: t, ca: ca}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	var first *Node
	for _, id := range []string{"a", "b", "c"} {
		cfg := NodeConfig{ID: id, Role: RoleStorage, BindAddr: "127.0.0.1:0", TLS: nodeTLS(t, ca, id),
			Logger: slog.New(slog.NewTextHandler(io.MultiWriter(logs, testLogWriter{t}), nil))}
		joinTestTimeouts(&cfg)
		if id == "a" {
			cfg.CA = ca
		}
		n, err := NewNode(cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { n.Close() })
		c.nodes = append(c.nodes, n)
		if first == nil {
			first = n
			if err := n.Bootstrap(ctx, NodeInfo{}); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := first.AddVoter(ctx, id, string(n.Addr())); err != nil {
			t.Fatal(err)
		}
		if _, err := first.Propose(ctx, cNodeAdd(id, RoleStorage, string(n.Addr()))); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// joinTestTimeouts: these tests are about admission, not failover; slow
// raft timeouts keep leadership still under -race on a loaded host.
func joinTestTimeouts(c *NodeConfig) {
	c.HeartbeatTimeout, c.ElectionTimeout, c.LeaderLeaseTimeout = 2*time.Second, 2*time.Second, time.Second
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func issueTicket(t *testing.T, ctx context.Context, p Proposer, ca *CA, addr string, ttl time.Duration) JoinTicket {
	t.Helper()
	tok, cmd, err := NewJoinToken(RoleStorage, time.Now(), ttl)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Propose(ctx, cmd); err != nil {
		t.Fatal(err)
	}
	h, err := CAHash(ca.CertPEM)
	if err != nil {
		t.Fatal(err)
	}
	tk, err := ParseJoinTicket(JoinTicket{Secret: tok, CAHash: h, Addr: addr}.String())
	if err != nil {
		t.Fatal(err)
	}
	return tk
}

// TestNetworkJoin: a new node without any certificate joins a 3-node
// cluster over the network through the CA holder while another node
// leads (so admission is forwarded), then takes part in replication.
func TestNetworkJoin(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var logs lockedBuffer
	c := newJoinCluster(t, &logs)
	a := c.nodes[0]
	if err := a.TransferLeadership(ctx); err != nil {
		t.Fatal(err)
	}
	if err := waitFor(ctx, func() bool { return !a.IsLeader() && (c.nodes[1].IsLeader() || c.nodes[2].IsLeader()) }); err != nil {
		t.Fatal("leadership did not move off the CA holder")
	}

	tk := issueTicket(t, ctx, a, c.ca, string(a.Addr()), time.Minute)
	addr := freeAddr(t)
	res, err := JoinNetwork(ctx, tk, "", NodeInfo{ID: "d", Role: RoleStorage, RaftAddr: addr})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := TLSConfig(res.CACert, res.Cert, res.Key)
	if err != nil {
		t.Fatal(err)
	}
	dcfg := NodeConfig{ID: "d", Role: RoleStorage, BindAddr: addr, TLS: cfg, Logger: testLogger(t)}
	joinTestTimeouts(&dcfg)
	d, err := NewNode(dcfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })

	// d becomes a voter once it answers, and proposals through it are
	// replicated everywhere.
	if err := waitFor(ctx, func() bool {
		l, err := c.leader(ctx)
		if err != nil {
			return false
		}
		cf := l.Raft().GetConfiguration()
		if cf.Error() != nil {
			return false
		}
		for _, s := range cf.Configuration().Servers {
			if s.ID == "d" {
				return s.Suffrage == raft.Voter
			}
		}
		return false
	}); err != nil {
		t.Fatal("d was not promoted to voter")
	}
	if _, err := d.Propose(ctx, &Command{Kind: KindEvent, Event: &EventCmd{Event: Event{Kind: "test", Node: "d", Message: "from d"}}}); err != nil {
		t.Fatalf("propose through d: %v", err)
	}
	if _, err := a.Propose(ctx, cNodeAdd("e", RoleWitness, "127.0.0.1:9")); err != nil {
		t.Fatal(err)
	}
	if err := waitFor(ctx, func() bool { return d.FSM().State().Nodes["e"] != nil && d.FSM().State().Nodes["d"] != nil }); err != nil {
		t.Fatal("d does not receive the log")
	}
	for _, n := range c.nodes {
		found := false
		for _, e := range n.FSM().State().Events {
			found = found || e.Message == "from d"
		}
		if !found {
			if err := waitFor(ctx, func() bool {
				for _, e := range n.FSM().State().Events {
					if e.Message == "from d" {
						return true
					}
				}
				return false
			}); err != nil {
				t.Fatalf("%s lacks d's proposal", n.ID())
			}
		}
	}
	if strings.Contains(logs.String(), tk.Secret) {
		t.Fatal("token secret in the logs")
	}
}

func TestNetworkJoinRefusals(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var logs lockedBuffer
	c := newJoinCluster(t, &logs)
	a, b := c.nodes[0], c.nodes[1]
	nd := func(id string) NodeInfo { return NodeInfo{ID: id, Role: RoleStorage, RaftAddr: freeAddr(t)} }
	var secrets []string
	check := func(name string, err, want error) {
		t.Helper()
		if !errors.Is(err, want) {
			t.Fatalf("%s: got %v, want %v", name, err, want)
		}
		for _, s := range secrets {
			if strings.Contains(err.Error(), s) {
				t.Fatalf("%s: secret in error %q", name, err)
			}
		}
	}

	tk := issueTicket(t, ctx, a, c.ca, string(a.Addr()), time.Minute)
	secrets = append(secrets, tk.Secret)

	// Another cluster's CA hash: refused before the secret is sent, so
	// the token is still good afterwards.
	other, err := NewCA("other", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	bad := tk
	bad.CAHash, _ = CAHash(other.CertPEM)
	_, err = JoinNetwork(ctx, bad, "", nd("x1"))
	check("wrong CA hash", err, ErrCAMismatch)

	// A member without the CA key cannot sign.
	_, err = JoinNetwork(ctx, tk, string(b.Addr()), nd("x1"))
	check("no CA key", err, ErrNoCAKey)

	// A CSR for another name.
	_, _, err = joinNetwork(ctx, tk, "", nd("x1"), "mallory")
	check("CSR CN", err, ErrInvalid)

	// An existing node id.
	_, err = JoinNetwork(ctx, tk, "", nd("b"))
	check("existing id", err, ErrExists)

	// The token is still unused: it admits x1 once, and then never again.
	if _, err := JoinNetwork(ctx, tk, "", nd("x1")); err != nil {
		t.Fatalf("good join after refusals: %v", err)
	}
	_, err = JoinNetwork(ctx, tk, "", nd("x2"))
	check("used token", err, ErrToken)

	exp := issueTicket(t, ctx, a, c.ca, string(a.Addr()), time.Nanosecond)
	secrets = append(secrets, exp.Secret)
	time.Sleep(5 * time.Millisecond)
	_, err = JoinNetwork(ctx, exp, "", nd("x3"))
	check("expired token", err, ErrToken)

	if a.FSM().State().Nodes["x2"] != nil || a.FSM().State().Nodes["x3"] != nil || a.FSM().State().Nodes["mallory"] != nil {
		t.Fatal("a refused join registered a node")
	}
	for _, s := range secrets {
		if strings.Contains(logs.String(), s) {
			t.Fatal("token secret in the logs")
		}
	}
}

// TestNoCertOnlyBootstrap: a client without a certificate completes the
// TLS handshake (for the bootstrap stream) but gets nothing on raft's
// tags or ours.
func TestNoCertOnlyBootstrap(t *testing.T) {
	c := newJoinCluster(t, io.Discard)
	addr := string(c.nodes[0].Addr())
	noCert := &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13} //nolint:gosec // test of refusal
	// Well-formed requests, which a stream would answer if it let the
	// client in: raft's own client for raft's tags, gob for ours.
	nt := raft.NewNetworkTransport(&dialOnly{cfg: noCert, done: make(chan struct{})}, 1, 2*time.Second, io.Discard)
	defer nt.Close()
	var vr raft.RequestVoteResponse
	if err := nt.RequestVote("a", raft.ServerAddress(addr), &raft.RequestVoteRequest{RPCHeader: raft.RPCHeader{ID: []byte("x"), Addr: []byte("x")}, Term: 1}, &vr); err == nil {
		t.Fatal("raft answered a client without a certificate")
	}
	var ar raft.AppendEntriesResponse
	if err := nt.AppendEntries("a", raft.ServerAddress(addr), &raft.AppendEntriesRequest{RPCHeader: raft.RPCHeader{ID: []byte("x"), Addr: []byte("x")}, Term: 1}, &ar); err == nil {
		t.Fatal("raft answered a client without a certificate")
	}
	ev, err := (&Command{Kind: KindEvent, Event: &EventCmd{Event: Event{Kind: "test", Message: "stranger"}}}).Encode()
	if err != nil {
		t.Fatal(err)
	}
	payloads := map[byte]any{tagForward: forwardRequest{Cmd: ev}, tagAdmit: admitRequest{Secret: "hsn1.a.b", Node: NodeInfo{ID: "z"}}}
	for _, tag := range []byte{0, 1, 2, 3, 4, tagForward, tagHeartbeat, tagAdmit} {
		conn, err := tls.Dial("tcp", addr, noCert)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = conn.Write([]byte{tag})
		if p, ok := payloads[tag]; ok {
			_ = gob.NewEncoder(conn).Encode(p)
		} else {
			_, _ = conn.Write(make([]byte, 64))
		}
		_ = conn.SetReadDeadline(time.Now().Add(3 * time.Second))
		n, err := conn.Read(make([]byte, 64))
		conn.Close()
		if n != 0 || err == nil {
			t.Fatalf("tag %#x: read %d bytes, err %v", tag, n, err)
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("tag %#x: connection held open instead of closed", tag)
		}
	}
	// The bootstrap stream answers with the CA certificate.
	conn, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}) //nolint:gosec // test
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, _ = conn.Write([]byte{tagBootstrap})
	_ = conn.SetReadDeadline(time.Now().Add(3 * time.Second))
	if n, err := conn.Read(make([]byte, 64)); n == 0 {
		t.Fatalf("bootstrap stream silent: %v", err)
	}
}

// dialOnly is a raft.StreamLayer that dials with cfg and accepts nothing.
type dialOnly struct {
	cfg  *tls.Config
	once sync.Once
	done chan struct{}
}

func (d *dialOnly) Dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	return tls.DialWithDialer(&net.Dialer{Timeout: timeout}, "tcp", string(addr), d.cfg)
}
func (d *dialOnly) Accept() (net.Conn, error) { <-d.done; return nil, net.ErrClosed }
func (d *dialOnly) Close() error              { d.once.Do(func() { close(d.done) }); return nil }
func (d *dialOnly) Addr() net.Addr            { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }

func TestJoinTicketParse(t *testing.T) {
	tk := JoinTicket{Secret: "hsn1.abcd.0123", CAHash: strings.Repeat("ab", 32), Addr: "[::1]:7000"}
	got, err := ParseJoinTicket(" " + tk.String() + "\n")
	if err != nil || got != tk {
		t.Fatalf("round trip: %+v %v", got, err)
	}
	if got, err := ParseJoinTicket("hsn1.abcd.0123"); err != nil || got.Secret != "hsn1.abcd.0123" || got.CAHash != "" {
		t.Fatalf("bare token: %+v %v", got, err)
	}
	for _, s := range []string{"", "hsn2.a.b", "hsn1.a", "hsn1.a.b.nothex", "hsn1.a.b.abcd", "hsn1..b"} {
		if _, err := ParseJoinTicket(s); !errors.Is(err, ErrToken) {
			t.Fatalf("%q accepted", s)
		}
	}
}

// TestAnyStorageNodeAdmits: n1 inits; n2 joins as storage and receives
// the CA key, a witness w1 does not (not even by claiming storage); n1
// is then lost for good and n2 alone admits the next node, which gets a
// certificate of the same CA and becomes a voting member. The token n1
// printed before it died is refused by nobody: the joiner is told n1 is
// unreachable and the same token works through n2, once.
func TestAnyStorageNodeAdmits(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	ca, err := NewCA("test", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	start := func(id string, role Role, tlsCfg *tls.Config, bind string, nodeCA *CA) *Node {
		t.Helper()
		cfg := NodeConfig{ID: id, Role: role, BindAddr: bind, TLS: tlsCfg, CA: nodeCA, Logger: testLogger(t)}
		joinTestTimeouts(&cfg)
		n, err := NewNode(cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { n.Close() })
		return n
	}
	// startJoined starts a node from what its network join returned; it
	// holds the CA (and so admits joins) only if the join handed it the key.
	startJoined := func(id string, role Role, addr string, res *JoinResult) *Node {
		t.Helper()
		cfg, err := TLSConfig(res.CACert, res.Cert, res.Key)
		if err != nil {
			t.Fatal(err)
		}
		var nodeCA *CA
		if res.CAKey != nil {
			if nodeCA, err = LoadCA(res.CACert, res.CAKey); err != nil {
				t.Fatal(err)
			}
		}
		return start(id, role, cfg, addr, nodeCA)
	}
	ticket := func(p Proposer, role Role, addr string) JoinTicket {
		t.Helper()
		tok, cmd, err := NewJoinToken(role, time.Now(), time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := p.Propose(ctx, cmd); err != nil {
			t.Fatal(err)
		}
		h, _ := CAHash(ca.CertPEM)
		return JoinTicket{Secret: tok, CAHash: h, Addr: addr}
	}
	isVoter := func(l *Node, id string) bool {
		cf := l.Raft().GetConfiguration()
		if cf.Error() != nil {
			return false
		}
		for _, s := range cf.Configuration().Servers {
			if string(s.ID) == id {
				return s.Suffrage == raft.Voter
			}
		}
		return false
	}

	n1 := start("n1", RoleStorage, nodeTLS(t, ca, "n1"), "127.0.0.1:0", ca)
	if err := n1.Bootstrap(ctx, NodeInfo{}); err != nil {
		t.Fatal(err)
	}
	n1Addr := string(n1.Addr())

	// n2 joins through n1 as storage and gets the CA key.
	n2Addr := freeAddr(t)
	res2, resp2, err := joinNetwork(ctx, ticket(n1, RoleStorage, n1Addr), "", NodeInfo{ID: "n2", Role: RoleStorage, RaftAddr: n2Addr}, "n2")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(res2.CAKey, ca.KeyPEM) || !bytes.Equal(resp2.CAKey, ca.KeyPEM) {
		t.Fatal("a storage node was admitted without the CA key")
	}
	n2 := startJoined("n2", RoleStorage, n2Addr, res2)
	caHash, _ := CAHash(ca.CertPEM)
	if err := HoldsCAKey(ctx, n2Addr, caHash); err != nil {
		t.Fatalf("n2 does not answer as a key holder: %v", err)
	}

	// A witness token cannot fetch the key by claiming storage: the
	// JoinCmd refuses the role, and nothing is sent.
	wAddr := freeAddr(t)
	wtk := ticket(n1, RoleWitness, n2Addr)
	_, resp, err := joinNetwork(ctx, wtk, "", NodeInfo{ID: "w1", Role: RoleStorage, RaftAddr: wAddr}, "w1")
	if !errors.Is(err, ErrToken) || resp == nil || resp.CAKey != nil {
		t.Fatalf("witness token claiming storage: err %v, reply %+v", err, resp)
	}
	// w1 joins as a witness through n2 (admission forwarded to the leader
	// n1) and gets a certificate but no key, as sent on the wire.
	resW, respW, err := joinNetwork(ctx, wtk, "", NodeInfo{ID: "w1", Role: RoleWitness, RaftAddr: wAddr}, "w1")
	if err != nil {
		t.Fatal(err)
	}
	if respW.CAKey != nil || resW.CAKey != nil {
		t.Fatal("the witness was handed the CA key")
	}
	w1 := startJoined("w1", RoleWitness, wAddr, resW)
	if err := HoldsCAKey(ctx, wAddr, caHash); !errors.Is(err, ErrNoCAKey) {
		t.Fatalf("witness probe: %v, want ErrNoCAKey", err)
	}
	if err := waitFor(ctx, func() bool { return n1.IsLeader() && isVoter(n1, "n2") && isVoter(n1, "w1") }); err != nil {
		t.Fatal("n2 and w1 did not become voters")
	}

	// A token printed on n1 just before n1 is lost for good.
	tk := ticket(n1, RoleStorage, n1Addr)
	if err := n1.Close(); err != nil {
		t.Fatal(err)
	}
	leader, err := (&tlsCluster{}).leader(ctx, n2, w1)
	if err != nil {
		t.Fatal("no leader among n2 and w1")
	}

	n3Addr, n4Addr := freeAddr(t), freeAddr(t)
	_, err = JoinNetwork(ctx, tk, "", NodeInfo{ID: "n3", Role: RoleStorage, RaftAddr: n3Addr})
	if !errors.Is(err, ErrMemberUnreachable) || !strings.Contains(err.Error(), "--join") {
		t.Fatalf("join through the dead n1: %v, want ErrMemberUnreachable naming --join", err)
	}
	// The same token through n2, by two joiners at once: the token is
	// consumed through raft, so exactly one is admitted.
	type outcome struct {
		id  string
		res *JoinResult
		err error
	}
	out := make(chan outcome, 2)
	for _, j := range []struct{ id, addr string }{{"n3", n3Addr}, {"n4", n4Addr}} {
		go func() {
			res, err := JoinNetwork(ctx, tk, n2Addr, NodeInfo{ID: j.id, Role: RoleStorage, RaftAddr: j.addr})
			out <- outcome{j.id, res, err}
		}()
	}
	var won *outcome
	for range 2 {
		o := <-out
		switch {
		case o.err == nil && won == nil:
			won = &o
		case o.err == nil:
			t.Fatalf("one token admitted both %s and %s", won.id, o.id)
		case !errors.Is(o.err, ErrToken):
			t.Fatalf("%s: %v, want ErrToken", o.id, o.err)
		}
	}
	if won == nil {
		t.Fatal("neither joiner was admitted through n2")
	}
	id, addr := won.id, n3Addr
	if id == "n4" {
		addr = n4Addr
	}
	cert, err := parseCert(won.res.Cert)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, DNSName: clusterServerName,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil || cert.Subject.CommonName != id {
		t.Fatalf("certificate from n2: CN %q, %v", cert.Subject.CommonName, err)
	}
	if !bytes.Equal(won.res.CAKey, ca.KeyPEM) {
		t.Fatal("the node n2 admitted as storage did not get the CA key")
	}
	n3 := startJoined(id, RoleStorage, addr, won.res)
	if err := waitFor(ctx, func() bool {
		l, err := (&tlsCluster{}).leader(ctx, n2, w1, n3)
		return err == nil && isVoter(l, id) && n3.FSM().State().Nodes[id] != nil
	}); err != nil {
		t.Fatalf("%s did not become a voting member (leader was %s)", id, leader.ID())
	}
	// Its certificate makes it a member: its proposals are forwarded and
	// committed by the quorum n2, w1, n3 of four voters.
	if _, err := n3.Propose(ctx, &Command{Kind: KindEvent, Event: &EventCmd{Event: Event{Kind: "test", Node: id, Message: "after n1"}}}); err != nil {
		t.Fatalf("propose through %s: %v", id, err)
	}
}
