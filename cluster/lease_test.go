package cluster

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

func TestLeaseRenewsFromContactTime(t *testing.T) {
	clk := newFakeClock(t0)
	l := NewLease(500*time.Millisecond, clk)
	if l.Valid() {
		t.Fatal("a new lease must start expired")
	}
	l.Renew(t0)
	clk.Advance(499 * time.Millisecond)
	if !l.Valid() {
		t.Fatal("expired early")
	}
	clk.Advance(time.Millisecond)
	if l.Valid() {
		t.Fatal("valid at contact+duration")
	}
	// A late renewal counts from its contact time, not from now.
	l.Renew(t0)
	if l.Valid() {
		t.Fatal("old proof renewed the lease")
	}
	l.Renew(t0.Add(100 * time.Millisecond))
	if !l.Valid() || !l.Expires().Equal(t0.Add(600*time.Millisecond)) {
		t.Fatalf("expires %v", l.Expires().Sub(t0))
	}
	// An older proof never shortens a newer one.
	l.Renew(clk.Now())
	l.Renew(t0)
	if !l.Expires().Equal(clk.Now().Add(500 * time.Millisecond)) {
		t.Fatalf("expires %v", l.Expires())
	}
	if err := CheckTimeouts(DefaultLeaseDuration, DefaultFailureTimeout); err != nil {
		t.Fatal(err)
	}
	if err := CheckTimeouts(time.Second, DefaultFailureTimeout); !errors.Is(err, ErrLeaseTooLong) {
		t.Fatal(err)
	}
}

type recDemoter struct {
	mu  sync.Mutex
	at  []time.Time
	why []string
}

func (d *recDemoter) Demote(_ context.Context, reason string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.at = append(d.at, time.Now())
	d.why = append(d.why, reason)
	return nil
}

func (d *recDemoter) times() []time.Time {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]time.Time(nil), d.at...)
}

// TestSelfDemotionOnPartition isolates, in turn, a follower and the leader
// of a three-node in-memory raft cluster. Each isolated node must demote
// itself before the failure timeout has passed; the others must not.
func TestSelfDemotionOnPartition(t *testing.T) {
	for _, victimIsLeader := range []bool{false, true} {
		name := "follower"
		if victimIsLeader {
			name = "leader"
		}
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			c := newMemCluster(t, "a", "b", "w")
			l := c.leader(ctx)
			dem := map[string]*recDemoter{}
			sds := map[string]*SelfDemotion{}
			var wg sync.WaitGroup
			rctx, rcancel := context.WithCancel(ctx)
			defer func() { rcancel(); wg.Wait() }()
			for id, n := range c.nodes {
				dem[id] = &recDemoter{}
				sd := &SelfDemotion{Raft: n.Raft(), Lease: NewLease(DefaultLeaseDuration, nil), Demoter: dem[id]}
				sds[id] = sd
				wg.Add(1)
				go func() { defer wg.Done(); _ = sd.Run(rctx) }()
			}
			// Everyone gets a lease.
			if err := waitFor(ctx, func() bool {
				for _, sd := range sds {
					if !sd.Serving() {
						return false
					}
				}
				return true
			}); err != nil {
				t.Fatal("leases not granted:", err)
			}
			victim := l.ID()
			if !victimIsLeader {
				for id := range c.nodes {
					if id != victim {
						victim = id
						break
					}
				}
			}
			// Let leases settle, then cut the victim off.
			time.Sleep(200 * time.Millisecond)
			cut := time.Now()
			c.isolate(victim)
			if err := waitFor(ctx, func() bool { return len(dem[victim].times()) > 0 }); err != nil {
				t.Fatal("victim never demoted")
			}
			took := dem[victim].times()[0].Sub(cut)
			t.Logf("%s %s demoted %v after isolation (lease %v, failure timeout %v)", name, victim, took, DefaultLeaseDuration, DefaultFailureTimeout)
			if took >= DefaultFailureTimeout {
				t.Fatalf("demotion took %v, not within the failure timeout %v", took, DefaultFailureTimeout)
			}
			if sds[victim].Serving() {
				t.Fatal("victim still serving")
			}
			// The majority keeps (or regains, after an election) its leases.
			time.Sleep(1500 * time.Millisecond)
			for id, sd := range sds {
				if id == victim {
					continue
				}
				if !sd.Serving() {
					t.Fatalf("%s lost its lease", id)
				}
				if n := len(dem[id].times()); n > 0 && !victimIsLeader {
					t.Fatalf("%s demoted %d times though in the majority", id, n)
				}
			}
		})
	}
}
