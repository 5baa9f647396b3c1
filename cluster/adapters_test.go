package cluster

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/bench/failover/initiator"
	"github.com/hasan-storage/hasan/replication"
	"github.com/hasan-storage/hasan/target"
	"github.com/hasan-storage/hasan/vip"
)

// fakeVIPManager stands in for vip.Manager (which needs CAP_NET_ADMIN and
// a link); it records calls.
type fakeVIPManager struct {
	mu      sync.Mutex
	held    []netip.Prefix
	ops     []string
	tickled []vip.TCPConn
}

func (f *fakeVIPManager) Acquire(_ context.Context, v vip.VIP) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if v.Link != "eth-test" {
		return errors.New("wrong link " + v.Link)
	}
	f.ops = append(f.ops, "+"+v.Addr.String())
	if !slices.Contains(f.held, v.Addr) {
		f.held = append(f.held, v.Addr)
	}
	return nil
}

func (f *fakeVIPManager) Release(_ context.Context, v vip.VIP) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ops = append(f.ops, "-"+v.Addr.String())
	f.held = slices.DeleteFunc(f.held, func(p netip.Prefix) bool { return p == v.Addr })
	return nil
}

func (f *fakeVIPManager) Tickle(_ context.Context, conns []vip.TCPConn) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.tickled = append(f.tickled, conns...)
	return nil
}

func (f *fakeVIPManager) holds(p netip.Prefix) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Contains(f.held, p)
}

// adapterNode is one storage node's data plane: a real iSCSI target on a
// loopback portal, a real replica server, and the agent with the real
// adapters over them; the VIP manager is faked.
type adapterNode struct {
	id       string
	portal   string
	dataAddr string
	tsrv     *target.Server
	rsrv     *replication.Server
	vips     *fakeVIPManager
	reps     *ReplicaAdapter
	agent    *Agent
}

func testTLS(t *testing.T, ca *CA, id string) *tls.Config {
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

func newAdapterNode(t *testing.T, id string, ca *CA, l *Local, log *slog.Logger) *adapterNode {
	t.Helper()
	tlsCfg := testTLS(t, ca, id)
	n := &adapterNode{id: id, tsrv: target.NewServer(target.Config{Logger: log.With("node", id)}), vips: &fakeVIPManager{}}
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n.portal = tl.Addr().String()
	go func() { _ = n.tsrv.Serve(tl) }()
	n.rsrv, err = replication.NewServer(replication.ServerConfig{TLS: tlsCfg, Logger: log.With("node", id)})
	if err != nil {
		t.Fatal(err)
	}
	rl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n.dataAddr = rl.Addr().String()
	go func() { _ = n.rsrv.Serve(rl) }()
	n.reps = &ReplicaAdapter{Self: id, Dir: t.TempDir(), Server: n.rsrv, TLS: tlsCfg, FSM: l.FSM, P: l,
		Volume: replication.VolumeConfig{TickInterval: 20 * time.Millisecond, AckTimeoutTicks: 25}, Logger: log.With("node", id)}
	n.agent = &Agent{
		Self: id, FSM: l.FSM, P: l,
		VIPs:     &VIPAdapter{Manager: n.vips, Link: "eth-test", Logger: log},
		Targets:  &TargetAdapter{Server: n.tsrv, Replicas: n.reps, FSM: l.FSM, P: l, Logger: log.With("node", id)},
		Replicas: n.reps,
		Logger:   log.With("node", id),
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = n.agent.Demote(ctx, "test end")
		n.tsrv.Close()
		_ = n.reps.CloseAll(ctx)
		n.rsrv.Close()
	})
	return n
}

func mustPropose(t *testing.T, p Proposer, c *Command) {
	t.Helper()
	if _, err := p.Propose(context.Background(), c); err != nil {
		t.Fatalf("%v: %v", c.Kind, err)
	}
}

func waitUntil(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

const (
	adIQN  = "iqn.2026-11.io.hasan:adapters"
	adUUID = "0a1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d"
	adSize = 8 << 20
)

// TestAdaptersServeAndMove: with real target, real replication over TLS
// and a fake VIP manager, the owner's agent serves the LUN (an iSCSI
// initiator logs in, writes and reads), the other node does not export it;
// a planned move releases the VIP, closes the session and the target, and
// the new owner serves the same data under the same identity.
func TestAdaptersServeAndMove(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	ca, err := NewCA("test", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	l := NewLocal(nil)
	n1 := newAdapterNode(t, "n1", ca, l, log)
	n2 := newAdapterNode(t, "n2", ca, l, log)
	for _, n := range []*adapterNode{n1, n2} {
		mustPropose(t, l, &Command{Kind: KindNodeAdd, NodeAdd: &NodeAddCmd{Node: NodeInfo{
			ID: n.id, Role: RoleStorage, RaftAddr: "127.0.0.1:1" + n.id[1:], DataAddr: n.dataAddr, PortalAddr: n.portal}}})
	}
	mustPropose(t, l, &Command{Kind: KindVolumeCreate, VolumeCreate: &VolumeCreateCmd{
		UUID: adUUID, Name: "v", Size: adSize, Primary: "n1", Replicas: []string{"n1", "n2"}}})
	mustPropose(t, l, &Command{Kind: KindTargetPut, TargetPut: &TargetPutCmd{Target: Target{IQN: adIQN, LUNs: map[uint64]string{0: adUUID}}}})
	vipAddr := netip.MustParsePrefix("192.0.2.10/32")
	mustPropose(t, l, &Command{Kind: KindGroupPut, GroupPut: &GroupPutCmd{Group: Group{Name: "g", VIPs: []string{vipAddr.String()}, Targets: []string{adIQN}}}})

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	reconcile := func(ns ...*adapterNode) {
		t.Helper()
		for _, n := range ns {
			if err := n.agent.Reconcile(ctx); err != nil {
				t.Fatalf("%s reconcile: %v", n.id, err)
			}
		}
	}
	// Unowned: both nodes open their replica as secondary, nobody serves.
	reconcile(n1, n2)
	if n1.agent.Targets.Serving() != nil || n1.vips.holds(vipAddr) {
		t.Fatal("served before any grant")
	}
	mustPropose(t, l, &Command{Kind: KindGroupGrant, GroupGrant: &GroupGrantCmd{Group: "g", Node: "n1"}})
	reconcile(n2, n1)
	if !n1.vips.holds(vipAddr) || n2.vips.holds(vipAddr) {
		t.Fatalf("vip: n1 %v n2 %v", n1.vips.holds(vipAddr), n2.vips.holds(vipAddr))
	}
	if p, _ := n1.reps.Primary(adUUID); p == nil {
		t.Fatal("n1 is not primary")
	}

	login := func(n *adapterNode) (*initiator.Session, error) {
		lctx, lcancel := context.WithTimeout(ctx, 3*time.Second)
		defer lcancel()
		return initiator.Login(lctx, initiator.Config{Portal: n.portal, Target: adIQN})
	}
	if s, err := login(n2); err == nil {
		s.Close()
		t.Fatal("n2 exports the target while n1 owns the group")
	}
	s, err := login(n1)
	if err != nil {
		t.Fatalf("login to owner n1: %v", err)
	}
	defer s.Close()
	if _, err := s.ClearUnitAttention(ctx); err != nil {
		t.Fatal(err)
	}
	blocks, bs, err := s.ReadCapacity10(ctx)
	if err != nil || blocks != adSize/512 || bs != 512 {
		t.Fatalf("capacity %d x %d: %v", blocks, bs, err)
	}
	data := bytes.Repeat([]byte("hasan-adapters!\n"), 4096/16)
	if err := s.Write10(ctx, 8, data, bs, true); err != nil {
		t.Fatalf("write on n1: %v", err)
	}
	if got, err := s.Read10(ctx, 8, 8, bs); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back on n1: %v", err)
	}

	// n2 must be in the ISR before the group may move to it (it starts
	// there: both replicas were created at the creation generation).
	waitUntil(t, 30*time.Second, "n2 in the ISR", func() bool {
		var in bool
		l.FSM.Read(func(st *State) { in = slices.Contains(st.Volumes[adUUID].ISR, "n2") })
		return in
	})

	// Planned move: n1 drains (VIP, target, primary) and releases.
	mustPropose(t, l, &Command{Kind: KindGroupMove, GroupMove: &GroupMoveCmd{Group: "g", Node: "n2"}})
	reconcile(n1)
	if n1.vips.holds(vipAddr) || len(n1.agent.Targets.Serving()) != 0 {
		t.Fatal("n1 still serves after draining")
	}
	// The session itself must be gone (RemoveTarget closed it), not merely
	// answering with CHECK CONDITION because the volume closed under it.
	var ce *initiator.CheckError
	if _, err := s.Read10(ctx, 8, 8, bs); err == nil || errors.As(err, &ce) {
		t.Fatalf("the old owner's session is still open after the release: %v", err)
	}
	var owner string
	l.FSM.Read(func(st *State) { owner = st.Groups["g"].Owner })
	if owner != "" {
		t.Fatalf("group not released: owner %q", owner)
	}
	// The controller's grant, then both agents.
	mustPropose(t, l, &Command{Kind: KindGroupGrant, GroupGrant: &GroupGrantCmd{Group: "g", Node: "n2"}})
	reconcile(n1, n2)
	if !n2.vips.holds(vipAddr) || n1.vips.holds(vipAddr) {
		t.Fatal("vip did not move to n2")
	}
	if _, err := login(n1); err == nil {
		t.Fatal("n1 exports the target after the move")
	}
	s2, err := login(n2)
	if err != nil {
		t.Fatalf("login to new owner n2: %v", err)
	}
	defer s2.Close()
	if _, err := s2.ClearUnitAttention(ctx); err != nil {
		t.Fatal(err)
	}
	if got, err := s2.Read10(ctx, 8, 8, bs); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("n2 does not serve what n1 acknowledged: %v", err)
	}
	if err := s2.Write10(ctx, 16, data, bs, true); err != nil {
		t.Fatalf("write on n2: %v", err)
	}
	_ = s2.Logout(ctx)
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimSpace(p)))
	return len(p), nil
}

type failingRelease struct{ fakeVIPManager }

func (f *failingRelease) Release(context.Context, vip.VIP) error {
	return errors.New("netlink says no")
}

// TestVIPAdapterTickleAndRelease: the connections recorded for a VIP are
// tickled right after it is acquired (and only those of that VIP); a VIP
// whose release failed stays held so the next pass or Demote retries.
func TestVIPAdapterTickleAndRelease(t *testing.T) {
	ctx := context.Background()
	a1 := netip.MustParsePrefix("192.0.2.10/32")
	a2 := netip.MustParsePrefix("192.0.2.11/32")
	c1 := vip.TCPConn{Local: netip.MustParseAddrPort("192.0.2.10:3260"), Remote: netip.MustParseAddrPort("192.0.2.99:40000")}
	m := &fakeVIPManager{}
	a := &VIPAdapter{Manager: m, Link: "eth-test", Conns: func(p netip.Prefix) []vip.TCPConn {
		if p == a1 {
			return []vip.TCPConn{c1}
		}
		return nil
	}}
	if err := a.Acquire(ctx, a1); err != nil {
		t.Fatal(err)
	}
	if err := a.Acquire(ctx, a2); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(m.tickled, []vip.TCPConn{c1}) {
		t.Fatalf("tickled %v", m.tickled)
	}
	if got := a.Held(); !slices.Equal(got, []netip.Prefix{a1, a2}) {
		t.Fatalf("held %v", got)
	}
	if err := a.Release(ctx, a1); err != nil || slices.Contains(a.Held(), a1) || m.holds(a1) {
		t.Fatalf("release: %v, held %v", err, a.Held())
	}
	bad := &VIPAdapter{Manager: &failingRelease{}, Link: "eth-test"}
	if err := bad.Acquire(ctx, a1); err != nil {
		t.Fatal(err)
	}
	if err := bad.Release(ctx, a1); err == nil || !slices.Contains(bad.Held(), a1) {
		t.Fatalf("failed release: %v, held %v", err, bad.Held())
	}
	if err := (&VIPAdapter{Manager: m, Link: "wrong"}).Acquire(ctx, a1); err == nil {
		t.Fatal("acquire error not returned")
	}
}

// TestVIPAdapterTicklesRecordedConns: the agent's recorded connections
// reach vip.Manager.Tickle as TCPConns, only for VIPs held here.
func TestVIPAdapterTicklesRecordedConns(t *testing.T) {
	ctx := context.Background()
	m := &fakeVIPManager{}
	a := &VIPAdapter{Manager: m, Link: "eth-test"}
	if err := a.Acquire(ctx, netip.MustParsePrefix("192.0.2.10/32")); err != nil {
		t.Fatal(err)
	}
	err := a.Tickle(ctx, []InitiatorConn{
		{Local: "192.0.2.10:3260", Remote: "198.51.100.7:51000"},
		{Local: "192.0.2.11:3260", Remote: "198.51.100.7:51001"}, // not held here
		{Local: "junk", Remote: "198.51.100.7:51002"},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []vip.TCPConn{{Local: netip.MustParseAddrPort("192.0.2.10:3260"), Remote: netip.MustParseAddrPort("198.51.100.7:51000")}}
	if !slices.Equal(m.tickled, want) {
		t.Fatalf("tickled %v, want %v", m.tickled, want)
	}
}

// foreignVIPs has the address configured already (a previous run of this
// node left it): Acquire refuses it as foreign, Adopt takes it.
type foreignVIPs struct {
	fakeVIPManager
	adopted []netip.Prefix
}

func (f *foreignVIPs) Acquire(context.Context, vip.VIP) error { return vip.ErrForeignAddress }

func (f *foreignVIPs) Adopt(_ context.Context, v vip.VIP) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.adopted = append(f.adopted, v.Addr)
	return nil
}

// TestVIPAdapterAdoptsAfterRestart: an address the state says is ours but
// that this Manager did not add (left by the previous run) is adopted, not
// refused; without Adopt the refusal is returned.
func TestVIPAdapterAdoptsAfterRestart(t *testing.T) {
	ctx := context.Background()
	p := netip.MustParsePrefix("192.0.2.10/32")
	m := &foreignVIPs{}
	a := &VIPAdapter{Manager: m, Link: "eth-test"}
	if err := a.Acquire(ctx, p); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(m.adopted, []netip.Prefix{p}) || !slices.Equal(a.Held(), []netip.Prefix{p}) {
		t.Fatalf("adopted %v, held %v", m.adopted, a.Held())
	}
	plain := &VIPAdapter{Manager: &refusingVIPs{}, Link: "eth-test"}
	if err := plain.Acquire(ctx, p); !errors.Is(err, vip.ErrForeignAddress) {
		t.Fatalf("without Adopt: %v", err)
	}
}

type refusingVIPs struct{ fakeVIPManager }

func (*refusingVIPs) Acquire(context.Context, vip.VIP) error { return vip.ErrForeignAddress }

// TestTargetNotExportedWithoutItsLUNs: a target whose volume is not open as
// primary here yet must not be exported at all. Exported without its LUN,
// an initiator logs in and gets LOGICAL UNIT NOT SUPPORTED for its I/O (seen
// in TestServeGracefulStopHandsOver under load), where a refused login is
// simply retried.
func TestTargetNotExportedWithoutItsLUNs(t *testing.T) {
	l := NewLocal(nil)
	ca, err := NewCA("test", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	n := newAdapterNode(t, "n1", ca, l, log)
	ta := n.agent.Targets.(*TargetAdapter)
	const iqn = "iqn.2026-11.io.hasan:not-yet"
	err = ta.Serve(context.Background(), Target{IQN: iqn, LUNs: map[uint64]string{0: "6f1c2d3e-0000-4000-8000-000000000001"}}, nil)
	if err == nil {
		t.Fatal("Serve exported a target whose volume is not open as primary")
	}
	// Not exported: the server still accepts a target of that name.
	if err := n.tsrv.AddTarget(target.TargetConfig{Name: iqn}); err != nil {
		t.Fatalf("the target was exported without its LUN: %v", err)
	}
}
