package cluster

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"log/slog"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

func cRevoke(serial, cn, ou string, force bool) *Command {
	return &Command{Kind: KindCertRevoke, CertRevoke: &CertRevokeCmd{Serial: serial, CN: cn, OU: ou, Force: force}}
}

func cNodeAddCerts(id, addr string, serials ...string) *Command {
	c := cNodeAdd(id, RoleStorage, addr)
	c.NodeAdd.Node.CertSerials = serials
	return c
}

func TestParseSerial(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"1a2b", "1a2b"},
		{"1A2B", "1a2b"},
		{"0x1a2b", "1a2b"},
		{"00:1A:2B", "1a2b"},
		{"serial=001A2B", "1a2b"},
		{" 1a2b\n", "1a2b"},
		{strings.Repeat("f", 40), strings.Repeat("f", 40)},
		{"", ""},
		{"0", ""},
		{"00", ""},
		{"xyz", ""},
		{"-1a", ""},
		{strings.Repeat("f", 41), ""},
	} {
		got, err := ParseSerial(tc.in)
		if tc.want == "" {
			if err == nil || !errors.Is(err, ErrInvalid) {
				t.Errorf("ParseSerial(%q) = %q, %v; want ErrInvalid", tc.in, got, err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("ParseSerial(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
	// Every certificate the CA issues has a serial in the form the
	// state keeps (ParseSerial is the identity on it).
	ca, err := NewCA("t", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	for range 20 {
		p, _, err := ca.Issue("n", time.Now(), time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		info, err := ParseCertInfo(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := validSerial(info.Serial); err != nil {
			t.Fatalf("issued serial %s: %v", info.Serial, err)
		}
	}
}

// TestCertRevokeApply: revocation is recorded once, repeated without
// change, and every refused input leaves the state as it was.
func TestCertRevokeApply(t *testing.T) {
	a := newApplier(t, append(fixtureCommands(), cNodeAddCerts("d", "127.0.0.1:7010", "d1", "d2"))...)

	if _, err := a.apply(cRevoke("abc123", "alice", AdminOU, false)); err != nil {
		t.Fatal(err)
	}
	rc, ok := a.st.RevokedCerts["abc123"]
	if !ok || rc.CN != "alice" || rc.OU != AdminOU || rc.Reason != RevokeReasonOperator || rc.At.IsZero() {
		t.Fatalf("revoked entry %+v", rc)
	}
	if ev := a.st.Events[len(a.st.Events)-1]; ev.Kind != "cert-revoked" || !strings.Contains(ev.Message, "abc123") {
		t.Fatalf("event %+v", ev)
	}
	// Idempotent: the same serial again, even with other display fields
	// and a later time, changes nothing (no event, first record kept).
	before := a.st.Clone()
	for _, c := range []*Command{cRevoke("abc123", "alice", AdminOU, false), cRevoke("abc123", "bob", "", true)} {
		if _, err := a.apply(c); err != nil {
			t.Fatalf("repeat: %v", err)
		}
		if !reflect.DeepEqual(before, a.st) {
			t.Fatalf("repeated revocation changed the state")
		}
	}

	for _, tc := range []struct {
		name string
		cmd  *Command
		want error
	}{
		{"empty serial", cRevoke("", "x", "", false), ErrInvalid},
		{"upper-case serial", cRevoke("ABC", "x", "", false), ErrInvalid},
		{"leading zero", cRevoke("0abc", "x", "", false), ErrInvalid},
		{"not hex", cRevoke("xyz", "x", "", false), ErrInvalid},
		{"zero", cRevoke("0", "x", "", false), ErrInvalid},
		{"too long", cRevoke(strings.Repeat("f", 41), "x", "", false), ErrInvalid},
		{"cn with newline", cRevoke("abd", "a\nb", "", false), ErrInvalid},
		{"cn too long", cRevoke("abd", strings.Repeat("a", 65), "", false), ErrInvalid},
		{"ou too long", cRevoke("abd", "a", strings.Repeat("o", 65), false), ErrInvalid},
		{"member's certificate", cRevoke("d2", "", "", false), ErrInUse},
		{"missing payload", &Command{Kind: KindCertRevoke}, ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := a.st.Clone()
			if _, err := a.apply(tc.cmd); !errors.Is(err, tc.want) {
				t.Fatalf("error %v, want %v", err, tc.want)
			}
			if !reflect.DeepEqual(before, a.st) {
				t.Fatal("refused command changed the state")
			}
		})
	}

	// Forced, a member's certificate is revoked and named after it.
	if _, err := a.apply(cRevoke("d2", "", "", true)); err != nil {
		t.Fatal(err)
	}
	if rc := a.st.RevokedCerts["d2"]; rc.CN != "d" || rc.Reason != RevokeReasonOperator {
		t.Fatalf("forced revocation %+v", rc)
	}
}

// TestNodeRemoveRevokes: removing a node revokes the serials recorded for
// it; the id can come back with a new certificate but never with a
// revoked one.
func TestNodeRemoveRevokes(t *testing.T) {
	a := newApplier(t, append(fixtureCommands(), cNodeAddCerts("d", "127.0.0.1:7010", "d1"))...)
	if _, err := a.apply(&Command{Kind: KindNodeRemove, NodeRemove: &NodeRemoveCmd{ID: "d"}}); err != nil {
		t.Fatal(err)
	}
	rc, ok := a.st.RevokedCerts["d1"]
	if !ok || rc.CN != "d" || rc.Reason != RevokeReasonNodeRemove {
		t.Fatalf("after node-remove: %+v %v", rc, ok)
	}
	// A refused removal (the node holds a replica) revokes nothing.
	before := a.st.Clone()
	if _, err := a.apply(&Command{Kind: KindNodeRemove, NodeRemove: &NodeRemoveCmd{ID: "b"}}); !errors.Is(err, ErrInUse) {
		t.Fatalf("remove b: %v", err)
	}
	if !reflect.DeepEqual(before, a.st) {
		t.Fatal("refused node-remove changed the state")
	}

	for _, tc := range []struct {
		name string
		cmd  *Command
		want error
	}{
		{"rejoin with the revoked certificate", cNodeAddCerts("d", "127.0.0.1:7010", "d1"), ErrCertRevoked},
		{"serial listed twice", cNodeAddCerts("d", "127.0.0.1:7010", "d3", "d3"), ErrInvalid},
		{"non-canonical serial", cNodeAddCerts("d", "127.0.0.1:7010", "D3"), ErrInvalid},
		{"too many serials", cNodeAddCerts("d", "127.0.0.1:7010", "1", "2", "3", "4", "5", "6", "7", "8", "9"), ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := a.st.Clone()
			if _, err := a.apply(tc.cmd); !errors.Is(err, tc.want) {
				t.Fatalf("error %v, want %v", err, tc.want)
			}
			if !reflect.DeepEqual(before, a.st) {
				t.Fatal("refused command changed the state")
			}
		})
	}
	if _, err := a.apply(cNodeAddCerts("d", "127.0.0.1:7010", "d3")); err != nil {
		t.Fatalf("rejoin with a new certificate: %v", err)
	}
	if a.st.CertRevoked("d3") || !a.st.CertRevoked("d1") {
		t.Fatal("rejoin: wrong revocation state")
	}
	// Another node cannot claim d's certificate.
	if _, err := a.apply(cNodeAddCerts("e", "127.0.0.1:7011", "d3")); !errors.Is(err, ErrExists) {
		t.Fatalf("claiming another node's serial: %v", err)
	}
}

// TestRevokedSurvivesSnapshot: a restored replica refuses what the
// original refused.
func TestRevokedSurvivesSnapshot(t *testing.T) {
	a := newApplier(t, cNodeAddCerts("d", "127.0.0.1:7010", "d1"), cRevoke("abc", "alice", AdminOU, false))
	var b bytes.Buffer
	if err := WriteState(&b, a.st); err != nil {
		t.Fatal(err)
	}
	got, err := ReadState(&b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got.RevokedCerts, a.st.RevokedCerts) || !got.CertRevoked("abc") ||
		!reflect.DeepEqual(got.Nodes["d"].CertSerials, []string{"d1"}) {
		t.Fatalf("after restore: %+v %+v", got.RevokedCerts, got.Nodes["d"])
	}
}

// tlsOf builds a client configuration from a PEM pair of ca.
func tlsOf(t *testing.T, ca *CA, cert, key []byte) *tls.Config {
	t.Helper()
	cfg, err := TLSConfig(ca.CertPEM, cert, key)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func serialOf(t *testing.T, certPEM []byte) string {
	t.Helper()
	info, err := ParseCertInfo(certPEM)
	if err != nil {
		t.Fatal(err)
	}
	return info.Serial
}

// TestRevokedAdminCannotForward: an admin certificate may forward
// proposals to the leader whatever node it names; once revoked it is
// refused, nothing it sends is applied, and the heartbeat stream it had
// open is closed. Another admin certificate keeps working.
func TestRevokedAdminCannotForward(t *testing.T) {
	c := newTLSCluster(t, "a")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
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
	lostCert, lostKey, err := c.ca.IssueAdmin("laptop", time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	otherCert, otherKey, err := c.ca.IssueAdmin("desk", time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	lost, other := tlsOf(t, c.ca, lostCert, lostKey), tlsOf(t, c.ca, otherCert, otherKey)
	if err := forwardAs(ctx, lost, string(l.Addr()), ev("before")); err != nil {
		t.Fatalf("admin before revocation: %v", err)
	}

	// A stream opened before the revocation (heartbeats answer each byte).
	d := &tls.Dialer{Config: lost}
	hb, err := d.DialContext(ctx, "tcp", string(l.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer hb.Close()
	if _, err := hb.Write([]byte{tagHeartbeat, 1}); err != nil {
		t.Fatal(err)
	}
	_ = hb.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := hb.Read(make([]byte, 1)); err != nil {
		t.Fatalf("heartbeat stream before revocation: %v", err)
	}

	if _, err := l.Propose(ctx, cRevoke(serialOf(t, lostCert), "laptop", AdminOU, false)); err != nil {
		t.Fatal(err)
	}

	// The open stream is closed: reads end with an error well before the
	// heartbeat read deadline (5 s) would have ended it.
	start := time.Now()
	_ = hb.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		_, _ = hb.Write([]byte{1})
		if _, err := hb.Read(make([]byte, 1)); err != nil {
			break
		}
	}
	if el := time.Since(start); el > 3*time.Second {
		t.Fatalf("open stream of the revoked certificate lasted %v", el)
	}

	err = forwardAs(ctx, lost, string(l.Addr()), ev("after"))
	if err == nil || errors.Is(err, ErrForbidden) {
		t.Fatalf("revoked admin's proposal: %v, want a TLS refusal", err)
	}
	if count("after") != 0 {
		t.Fatal("a revoked certificate's proposal was applied")
	}
	if err := forwardAs(ctx, other, string(l.Addr()), ev("other")); err != nil {
		t.Fatalf("another admin after the revocation: %v", err)
	}
	if count("before") != 1 || count("other") != 1 {
		t.Fatal("accepted proposals not applied")
	}
}

// TestRemovedNodeCertRefused: a node admitted by a network join has its
// certificate serial recorded; removing it revokes that certificate, and
// the same id joining again with a new certificate is accepted while the
// old one stays refused.
func TestRemovedNodeCertRefused(t *testing.T) {
	ca, err := NewCA("test", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	cfg := NodeConfig{ID: "a", Role: RoleStorage, BindAddr: "127.0.0.1:0", TLS: nodeTLS(t, ca, "a"), CA: ca,
		Logger: slog.New(slog.NewTextHandler(testLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))}
	joinTestTimeouts(&cfg)
	a, err := NewNode(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := a.Bootstrap(ctx, NodeInfo{}); err != nil {
		t.Fatal(err)
	}
	ev := func(msg string) *Command {
		return &Command{Kind: KindEvent, At: time.Now(), Event: &EventCmd{Event: Event{Kind: "test", Message: msg}}}
	}
	join := func() *tls.Config {
		t.Helper()
		tk := issueTicket(t, ctx, a, ca, string(a.Addr()), time.Minute)
		res, err := JoinNetwork(ctx, tk, "", NodeInfo{ID: "d", Role: RoleStorage, RaftAddr: freeAddr(t)})
		if err != nil {
			t.Fatalf("join: %v", err)
		}
		var recorded []string
		a.FSM().Read(func(s *State) { recorded = s.Nodes["d"].CertSerials })
		if want := serialOf(t, res.Cert); len(recorded) != 1 || recorded[0] != want {
			t.Fatalf("recorded serials %v, want [%s]", recorded, want)
		}
		return tlsOf(t, ca, res.Cert, res.Key)
	}
	remove := func() {
		t.Helper()
		if _, err := a.Propose(ctx, &Command{Kind: KindNodeRemove, NodeRemove: &NodeRemoveCmd{ID: "d"}}); err != nil {
			t.Fatal(err)
		}
		if err := a.RemoveServer(ctx, "d"); err != nil {
			t.Fatal(err)
		}
	}

	first := join()
	if err := forwardAs(ctx, first, string(a.Addr()), ev("d member")); err != nil {
		t.Fatalf("joined node's proposal: %v", err)
	}
	remove()
	// Refused at the TLS layer, not merely as a non-member (ErrForbidden).
	if err := forwardAs(ctx, first, string(a.Addr()), ev("d removed")); err == nil || errors.Is(err, ErrForbidden) {
		t.Fatalf("removed node's certificate: %v, want a TLS refusal", err)
	}

	second := join()
	if err := forwardAs(ctx, second, string(a.Addr()), ev("d rejoined")); err != nil {
		t.Fatalf("rejoined node's new certificate: %v", err)
	}
	if err := forwardAs(ctx, first, string(a.Addr()), ev("d old cert")); err == nil {
		t.Fatal("the removed node's old certificate works again after the rejoin")
	}
	n := map[string]int{}
	for _, e := range a.FSM().State().Events {
		n[e.Message]++
	}
	if n["d member"] != 1 || n["d rejoined"] != 1 || n["d removed"] != 0 || n["d old cert"] != 0 {
		t.Fatalf("applied events %v", n)
	}
}

// TestCertGuard: a configuration protected before the FSM exists admits
// everything until Attach, then refuses revoked leaves; its own
// VerifyConnection still runs first.
func TestCertGuard(t *testing.T) {
	ca, err := NewCA("t", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	cert, _, err := ca.Issue("n", time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := parseCert(cert)
	if err != nil {
		t.Fatal(err)
	}
	cs := tls.ConnectionState{PeerCertificates: []*x509.Certificate{leaf}}
	var g CertGuard
	errOwn := errors.New("own check")
	own := false
	cfg := g.Protect(&tls.Config{VerifyConnection: func(tls.ConnectionState) error {
		if own {
			return errOwn
		}
		return nil
	}})
	if err := cfg.VerifyConnection(cs); err != nil {
		t.Fatalf("before Attach: %v", err)
	}
	f := NewFSM(nil)
	g.Attach(f)
	if err := cfg.VerifyConnection(cs); err != nil {
		t.Fatalf("not revoked: %v", err)
	}
	b, _ := cRevoke(CertSerial(leaf), "n", "", false).Encode()
	f.Apply(&raft.Log{Index: 1, Type: raft.LogCommand, Data: b})
	if err := cfg.VerifyConnection(cs); !errors.Is(err, ErrCertRevoked) {
		t.Fatalf("revoked: %v", err)
	}
	if err := cfg.VerifyConnection(tls.ConnectionState{}); err != nil {
		t.Fatalf("no certificate: %v", err)
	}
	own = true
	if err := cfg.VerifyConnection(cs); !errors.Is(err, errOwn) {
		t.Fatalf("chained check: %v", err)
	}
	if g.Protect(nil) != nil {
		t.Fatal("Protect(nil)")
	}
}
