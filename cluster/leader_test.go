package cluster

import (
	"testing"
	"time"
)

// leaderStep beats every node in beats at now and returns the leadership
// transfer Step asks for ("" for none).
func leaderStep(t *testing.T, c *ControllerCore, st *State, now time.Time, beats ...string) string {
	t.Helper()
	for _, id := range beats {
		c.Heartbeat(id, now)
	}
	to := ""
	for _, a := range c.Step(st, now) {
		if a.TransferLeader != "" {
			if to != "" {
				t.Fatalf("two transfers in one step: %s and %s", to, a.TransferLeader)
			}
			to = a.TransferLeader
		}
	}
	return to
}

// TestLeaderPlacement: the owner's controller hands leadership to the
// witness once it has settled, then not again within the retry interval; it
// falls back to a storage node that serves nothing when the witness is
// not fresh or not a voter; never to a busier node, and never while the
// cluster is not calm.
func TestLeaderPlacement(t *testing.T) {
	cfg := ControllerConfig{Self: "a", FailureTimeout: 800 * time.Millisecond}
	all := []string{"a", "b", "c", "w"}

	st := coreFixture(t) // g1 owned by a; a is every volume's primary
	c := NewControllerCore(cfg, t0)
	c.SetVoters(all)
	if to := leaderStep(t, c, st, t0.Add(time.Second), all...); to != "" {
		t.Fatalf("transfer to %s before the leader settled", to)
	}
	at := t0.Add(leaderSettle)
	if to := leaderStep(t, c, st, at, all...); to != "w" {
		t.Fatalf("transfer to %q, want the witness", to)
	}
	if to := leaderStep(t, c, st, at.Add(time.Second), all...); to != "" {
		t.Fatalf("second transfer to %s within the retry interval", to)
	}
	if to := leaderStep(t, c, st, at.Add(leaderTransferRetry), all...); to != "w" {
		t.Fatalf("after the retry interval: transfer to %q, want the witness", to)
	}

	// The witness heard from too long ago (still inside the failure
	// timeout): the next best is a storage node that serves nothing.
	c = NewControllerCore(cfg, t0)
	c.SetVoters(all)
	at = t0.Add(leaderSettle)
	c.Heartbeat("w", at.Add(-cfg.FailureTimeout/2-time.Millisecond))
	if to := leaderStep(t, c, st, at, "a", "b", "c"); to != "b" {
		t.Fatalf("stale witness: transfer to %q, want b", to)
	}

	// The witness is not a voter (still joining).
	c = NewControllerCore(cfg, t0)
	c.SetVoters([]string{"a", "b"})
	if to := leaderStep(t, c, st, t0.Add(leaderSettle), all...); to != "b" {
		t.Fatalf("non-voter witness: transfer to %q, want b", to)
	}

	// A leader that already costs least, or equal, keeps leadership.
	for _, self := range []string{"w", "b"} {
		c = NewControllerCore(ControllerConfig{Self: self, FailureTimeout: cfg.FailureTimeout}, t0)
		c.SetVoters([]string{"a", "b", "c"}) // the witness cannot be chosen
		if to := leaderStep(t, c, st, t0.Add(leaderSettle), all...); to != "" && self == "w" || to != "" && to != "c" && self == "b" {
			t.Fatalf("leader %s: transfer to %q", self, to)
		}
		if self == "b" {
			if to := leaderStep(t, c, st, t0.Add(2*leaderSettle), all...); to != "" {
				t.Fatalf("leader b handed leadership to an equal node %s", to)
			}
		}
	}

	// Unknown voters, placement off, maintenance: nothing.
	c = NewControllerCore(cfg, t0)
	if to := leaderStep(t, c, st, t0.Add(leaderSettle), all...); to != "" {
		t.Fatalf("voters unknown: transfer to %s", to)
	}
	off := cfg
	off.NoLeaderPlacement = true
	c = NewControllerCore(off, t0)
	c.SetVoters(all)
	if to := leaderStep(t, c, st, t0.Add(leaderSettle), all...); to != "" {
		t.Fatalf("placement off: transfer to %s", to)
	}
	maint := coreFixture(t)
	maint.Maintenance = true
	c = NewControllerCore(cfg, t0)
	c.SetVoters(all)
	if to := leaderStep(t, c, maint, t0.Add(leaderSettle), all...); to != "" {
		t.Fatalf("maintenance: transfer to %s", to)
	}

	// A storage node silent past the failure timeout is being handled
	// (detected, fenced): leadership stays where the controller runs.
	c = NewControllerCore(cfg, t0)
	c.SetVoters(all)
	now := t0
	for range 40 {
		now = now.Add(100 * time.Millisecond)
		if to := leaderStep(t, c, st, now, "a", "b", "w"); to != "" {
			t.Fatalf("transfer to %s at +%v while c is silent", to, now.Sub(t0))
		}
	}
}
