package cluster

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeLocal records every operation, in order, across the three fakes.
type fakeLocal struct {
	mu      sync.Mutex
	ops     []string
	vips    []netip.Prefix
	targets []string
	opened  map[string]bool
}

func newFakeLocal() *fakeLocal { return &fakeLocal{opened: map[string]bool{}} }

func (f *fakeLocal) log(s string) { f.ops = append(f.ops, s) }

func (f *fakeLocal) take() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	o := f.ops
	f.ops = nil
	return o
}

func (f *fakeLocal) Acquire(_ context.Context, p netip.Prefix) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.log("vip+ " + p.String())
	f.vips = append(f.vips, p)
	return nil
}

func (f *fakeLocal) Release(_ context.Context, p netip.Prefix) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.log("vip- " + p.String())
	f.vips = slices.DeleteFunc(f.vips, func(x netip.Prefix) bool { return x == p })
	return nil
}

func (f *fakeLocal) Held() []netip.Prefix {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.vips)
}

func (f *fakeLocal) Serve(_ context.Context, t Target, vols []Volume) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !slices.Contains(f.targets, t.IQN) {
		var s []string
		for _, v := range vols {
			if !f.opened[v.UUID] {
				return fmt.Errorf("serving %s before its volume %s is primary", t.IQN, v.UUID)
			}
			s = append(s, fmt.Sprintf("%s@%d", v.UUID[len(v.UUID)-1:], v.Epoch))
		}
		f.log("target+ " + t.IQN[len(t.IQN)-2:] + " " + strings.Join(s, ","))
		f.targets = append(f.targets, t.IQN)
	}
	return nil
}

func (f *fakeLocal) Stop(_ context.Context, iqn string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.log("target- " + iqn[len(iqn)-2:])
	f.targets = slices.DeleteFunc(f.targets, func(x string) bool { return x == iqn })
	return nil
}

func (f *fakeLocal) Serving() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.targets)
}

func (f *fakeLocal) Open(_ context.Context, v Volume, primary bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	role := "secondary"
	if primary {
		role = "primary"
	}
	f.log(fmt.Sprintf("open %s %s@%d", v.UUID[len(v.UUID)-1:], role, v.Epoch))
	f.opened[v.UUID] = primary
	return nil
}

func (f *fakeLocal) Close(_ context.Context, uuid string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.log("close " + uuid[len(uuid)-1:])
	delete(f.opened, uuid)
	return nil
}

func (f *fakeLocal) Opened() map[string]bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[string]bool{}
	for k, v := range f.opened {
		out[k] = v
	}
	return out
}

func (f *fakeLocal) Tickle(_ context.Context, conns []InitiatorConn) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	var s []string
	for _, c := range conns {
		s = append(s, c.Remote)
	}
	f.log("tickle " + strings.Join(s, ","))
	return nil
}

// fakeSessions is the target's session list.
type fakeSessions struct {
	mu    sync.Mutex
	conns []InitiatorConn
}

func (f *fakeSessions) Conns() []InitiatorConn {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.conns)
}

func (f *fakeSessions) set(c ...InitiatorConn) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.conns = c
}

// countingProposer counts group-conns proposals on the way to the state.
type countingProposer struct {
	Proposer
	mu    sync.Mutex
	conns int
}

func (p *countingProposer) Propose(ctx context.Context, c *Command) (any, error) {
	if c.Kind == KindGroupConns {
		p.mu.Lock()
		p.conns++
		p.mu.Unlock()
	}
	return p.Proposer.Propose(ctx, c)
}

func (p *countingProposer) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.conns
}

// TestAgentTicklesAfterAcquireAndRecordsConns: the owner records its
// sessions' connections on the group's VIPs (only when they change, rate
// limited); after a takeover the new owner tickles exactly those, once,
// after its targets are served and its VIP is up, and only then records
// its own (so the old list is not wiped before it was used).
func TestAgentTicklesAfterAcquireAndRecordsConns(t *testing.T) {
	ctx := context.Background()
	loc := NewLocal(nil)
	for _, c := range fixtureCommands() {
		if _, err := loc.Propose(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	p := &countingProposer{Proposer: loc}
	fa, fb := newFakeLocal(), newFakeLocal()
	sa, sb := &fakeSessions{}, &fakeSessions{}
	aa, ab := newAgent("a", loc, fa), newAgent("b", loc, fb)
	aa.P, ab.P = p, p
	aa.Sessions, ab.Sessions = sa, sb
	aa.ConnsInterval, ab.ConnsInterval = time.Hour, time.Hour
	step := func(ag *Agent, f *fakeLocal, want ...string) {
		t.Helper()
		if err := ag.Reconcile(ctx); err != nil {
			t.Fatal(err)
		}
		if got := f.take(); !slices.Equal(got, want) {
			t.Fatalf("%s ops:\n got %q\nwant %q", ag.Self, got, want)
		}
	}
	conns := func() []InitiatorConn { return loc.FSM.State().Groups["g1"].Conns }

	// a logs two initiators in on the VIP and one on its own address
	// (not recorded: it does not move with the group).
	sa.set(ic("192.0.2.10:3260", "198.51.100.9:40000"), ic("192.0.2.1:3260", "198.51.100.8:40000"), ic("192.0.2.10:3260", "198.51.100.7:51000"))
	// Nothing recorded yet, so nothing to tickle; then the report.
	step(aa, fa, "open 1 primary@2", "open 2 primary@2", "target+ t1 1@2,2@2", "vip+ 192.0.2.10/24")
	want := []InitiatorConn{ic("192.0.2.10:3260", "198.51.100.7:51000"), ic("192.0.2.10:3260", "198.51.100.9:40000")}
	if got := conns(); !slices.Equal(got, want) || p.count() != 1 {
		t.Fatalf("recorded %v after %d proposals", got, p.count())
	}
	// Unchanged set: no proposal.
	step(aa, fa)
	if p.count() != 1 {
		t.Fatalf("%d proposals for an unchanged set", p.count())
	}
	// A change within the rate limit waits; after it, it is recorded.
	sa.set(ic("192.0.2.10:3260", "198.51.100.9:40000"))
	step(aa, fa)
	if p.count() != 1 || len(conns()) != 2 {
		t.Fatalf("rate limit not kept: %d proposals, %v", p.count(), conns())
	}
	aa.ConnsInterval = time.Nanosecond
	step(aa, fa)
	if p.count() != 2 || len(conns()) != 1 {
		t.Fatalf("change not recorded: %d proposals, %v", p.count(), conns())
	}
	sa.set(ic("192.0.2.10:3260", "198.51.100.9:40000"), ic("192.0.2.10:3260", "198.51.100.7:51000"))
	step(aa, fa)

	// a crashes; the takeover to b keeps the list. b serves, then tickles
	// once, and records its own connections only after the tickle.
	for _, c := range []*Command{cFenceRec("a", t0.Add(time.Hour), true), cTakeover("g1", "a", "b", t0)} {
		if _, err := loc.Propose(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	before := p.count()
	ab.ConnsInterval = time.Nanosecond
	step(ab, fb, "open 1 primary@3", "open 2 primary@3", "target+ t1 1@3,2@3", "vip+ 192.0.2.10/24", "tickle 198.51.100.7:51000,198.51.100.9:40000")
	if p.count() != before+1 || len(conns()) != 0 {
		t.Fatalf("after the tickle b should record its (empty) set: %d proposals, %v", p.count()-before, conns())
	}
	step(ab, fb) // once per acquisition
	sb.set(ic("192.0.2.10:3260", "198.51.100.7:51002"))
	step(ab, fb)
	if got := conns(); len(got) != 1 || got[0].Remote != "198.51.100.7:51002" {
		t.Fatalf("b's connections not recorded: %v", got)
	}
}

// TestAgentTickleWaitsForPortal: with a target that cannot be served yet,
// the VIP may be up but no tickle is sent (the reconnects would find no
// LUN), and nothing is recorded.
func TestAgentTickleWaitsForPortal(t *testing.T) {
	ctx := context.Background()
	loc := NewLocal(nil)
	for _, c := range append(fixtureCommands(), cConns("g1", "a", 1, ic("192.0.2.10:3260", "198.51.100.9:40000"))) {
		if _, err := loc.Propose(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	f := newFakeLocal()
	ag := newAgent("a", loc, f)
	ag.Sessions = &fakeSessions{}
	ft := &failingTargets{fakeLocal: f, fail: true}
	ag.Targets = ft
	if err := ag.Reconcile(ctx); err == nil {
		t.Fatal("want the serve error")
	}
	if ops := f.take(); slices.ContainsFunc(ops, func(s string) bool { return strings.HasPrefix(s, "tickle") }) {
		t.Fatalf("tickled before the portal served: %q", ops)
	}
	if len(loc.FSM.State().Groups["g1"].Conns) != 1 {
		t.Fatal("recorded connections overwritten before the tickle")
	}
	ft.fail = false
	if err := ag.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if ops := f.take(); !slices.Equal(ops, []string{"target+ t1 1@2,2@2", "tickle 198.51.100.9:40000"}) {
		t.Fatalf("ops %q", ops)
	}
}

type failingTargets struct {
	*fakeLocal
	fail bool
}

func (f *failingTargets) Serve(ctx context.Context, t Target, vols []Volume) error {
	if f.fail {
		return fmt.Errorf("lun not ready")
	}
	return f.fakeLocal.Serve(ctx, t, vols)
}

func newAgent(self string, loc *Local, f *fakeLocal) *Agent {
	return &Agent{Self: self, FSM: loc.FSM, P: loc, VIPs: f, Targets: f, Replicas: f}
}

func TestAgentReconcilesAndMovesInOrder(t *testing.T) {
	ctx := context.Background()
	loc := NewLocal(nil)
	for _, c := range fixtureCommands() {
		if _, err := loc.Propose(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	fa, fb := newFakeLocal(), newFakeLocal()
	aa, ab := newAgent("a", loc, fa), newAgent("b", loc, fb)
	step := func(ag *Agent, f *fakeLocal, want ...string) {
		t.Helper()
		if err := ag.Reconcile(ctx); err != nil {
			t.Fatal(err)
		}
		if got := f.take(); !slices.Equal(got, want) {
			t.Fatalf("%s ops:\n got %q\nwant %q", ag.Self, got, want)
		}
	}
	// Owner a: volumes as primary, then the target, then the VIP.
	step(aa, fa, "open 1 primary@2", "open 2 primary@2", "target+ t1 1@2,2@2", "vip+ 192.0.2.10/24")
	step(aa, fa) // idempotent
	// b holds secondaries only.
	step(ab, fb, "open 1 secondary@2", "open 2 secondary@2")

	// Planned move to b: a drains (VIP, target, primaries) and releases.
	if _, err := loc.Propose(ctx, cMove("g1", "b")); err != nil {
		t.Fatal(err)
	}
	// Its replicas come back as secondaries before the release, so b's
	// new primary finds them and a stays in the ISR.
	step(aa, fa, "vip- 192.0.2.10/24", "target- t1", "close 1", "close 2", "open 1 secondary@2", "open 2 secondary@2")
	if g := loc.FSM.State().Groups["g1"]; g.Owner != "" {
		t.Fatalf("not released: %+v", g)
	}
	// The controller grants; b opens as primary at the new epoch, then
	// serves.
	if _, err := loc.Propose(ctx, cGrant("g1", "b")); err != nil {
		t.Fatal(err)
	}
	step(ab, fb, "open 1 primary@3", "open 2 primary@3", "target+ t1 1@3,2@3", "vip+ 192.0.2.10/24")
	// a already waits as a secondary.
	step(aa, fa)

	// Lease lost on b: Demote drops VIP and target; Reconcile keeps it so.
	ab.Serving = func() bool { return false }
	if err := ab.Demote(ctx, "test"); err != nil {
		t.Fatal(err)
	}
	if got := fb.take(); !slices.Equal(got, []string{"vip- 192.0.2.10/24", "target- t1"}) {
		t.Fatalf("demote ops %q", got)
	}
	step(ab, fb, "close 1", "close 2")
	step(ab, fb)
	// Lease back: serving resumes in acquire order.
	ab.Serving = func() bool { return true }
	step(ab, fb, "open 1 primary@3", "open 2 primary@3", "target+ t1 1@3,2@3", "vip+ 192.0.2.10/24")
}

// TestMoveOffFailedDisk: a failed disk under the owner's primary raises an
// alert and starts a planned move of its group to a node in every ISR (no
// fence); a volume of a group the node does not own moves nothing.
func TestMoveOffFailedDisk(t *testing.T) {
	ctx := context.Background()
	loc := NewLocal(nil)
	for _, c := range fixtureCommands() {
		if _, err := loc.Propose(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	if err := MoveOffFailedDisk(ctx, loc, loc.FSM, "b", u1, fmt.Errorf("EIO")); err != nil {
		t.Fatal(err)
	}
	if g := loc.FSM.State().Groups["g1"]; g.MovingTo != "" {
		t.Fatalf("a non-owner's disk moved the group: %+v", g)
	}
	if err := MoveOffFailedDisk(ctx, loc, loc.FSM, "a", u2, fmt.Errorf("EIO")); err != nil {
		t.Fatal(err)
	}
	st := loc.FSM.State()
	if g := st.Groups["g1"]; g.MovingTo != "b" || g.Owner != "a" {
		t.Fatalf("group after a's disk failed: %+v", g)
	}
	if e := st.Events[len(st.Events)-2]; e.Kind != "disk-failed" || e.Severity != SeverityAlert || e.Node != "a" {
		t.Fatalf("event %+v", e)
	}
	if st.Nodes["a"].State == NodeFenced {
		t.Fatal("fenced for a disk failure")
	}
}

// TestAgentHandOver: a graceful stop's hand-over proposes a planned move
// to the best live peer and returns once the group is granted elsewhere
// (not merely released); with no live storage peer it returns at once.
func TestAgentHandOver(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	loc := NewLocal(nil)
	for _, c := range fixtureCommands() {
		if _, err := loc.Propose(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	fa := newFakeLocal()
	aa := newAgent("a", loc, fa)
	if err := aa.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	// No live peer: nothing to wait for.
	if err := aa.HandOver(ctx, func(string) bool { return false }); err != nil {
		t.Fatal(err)
	}
	if g := loc.FSM.State().Groups["g1"]; g.MovingTo != "" || g.Owner != "a" {
		t.Fatalf("moved without a live peer: %+v", g)
	}
	done := make(chan error, 1)
	go func() { done <- aa.HandOver(ctx, func(id string) bool { return id == "b" }) }()
	// The agent drains and releases; this loop stands in for the running
	// agent and for the leader's controller.
	granted := false
	for !granted {
		select {
		case err := <-done:
			t.Fatalf("hand-over returned before the grant: %v", err)
		case <-time.After(10 * time.Millisecond):
		}
		g := loc.FSM.State().Groups["g1"]
		switch {
		case g.Owner == "a" && g.MovingTo != "":
			if g.MovingTo != "b" {
				t.Fatalf("moving to %s, want the live peer b", g.MovingTo)
			}
			if err := aa.Reconcile(ctx); err != nil {
				t.Fatal(err)
			}
		case g.Owner == "":
			time.Sleep(50 * time.Millisecond) // released, not granted: still waiting
			select {
			case err := <-done:
				t.Fatalf("hand-over returned on release: %v", err)
			default:
			}
			if _, err := loc.Propose(ctx, cGrant("g1", "b")); err != nil {
				t.Fatal(err)
			}
			granted = true
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if g := loc.FSM.State().Groups["g1"]; g.Owner != "b" {
		t.Fatalf("%+v", g)
	}
}

// TestAgentRecordsConnsBeforeHandOver: on a planned move the owner records
// its latest connections before it drops the VIP, whatever the rate limit:
// the new owner must tickle every session, even one a moment old.
func TestAgentRecordsConnsBeforeHandOver(t *testing.T) {
	ctx := context.Background()
	loc := NewLocal(nil)
	for _, c := range fixtureCommands() {
		if _, err := loc.Propose(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	f, s := newFakeLocal(), &fakeSessions{}
	ag := newAgent("a", loc, f)
	ag.Sessions, ag.ConnsInterval = s, time.Hour
	s.set(ic("192.0.2.10:3260", "198.51.100.9:40000"))
	if err := ag.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	s.set(ic("192.0.2.10:3260", "198.51.100.9:40000"), ic("192.0.2.10:3260", "198.51.100.9:40001"))
	if err := ag.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if n := len(loc.FSM.State().Groups["g1"].Conns); n != 1 {
		t.Fatalf("rate limit not kept: %d conns", n)
	}
	if _, err := loc.Propose(ctx, cMove("g1", "b")); err != nil {
		t.Fatal(err)
	}
	if err := ag.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	g := loc.FSM.State().Groups["g1"]
	if g.Owner != "" || len(g.Conns) != 2 {
		t.Fatalf("after the drain: owner %q, conns %v", g.Owner, g.Conns)
	}
}
