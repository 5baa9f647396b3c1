package cluster

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
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
	step(aa, fa, "vip- 192.0.2.10/24", "target- t1", "close 1", "close 2")
	if g := loc.FSM.State().Groups["g1"]; g.Owner != "" {
		t.Fatalf("not released: %+v", g)
	}
	// The controller grants; b opens as primary at the new epoch, then
	// serves.
	if _, err := loc.Propose(ctx, cGrant("g1", "b")); err != nil {
		t.Fatal(err)
	}
	step(ab, fb, "open 1 primary@3", "open 2 primary@3", "target+ t1 1@3,2@3", "vip+ 192.0.2.10/24")
	// a, no longer primary on paper, follows as a secondary.
	step(aa, fa, "open 1 secondary@3", "open 2 secondary@3")

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
