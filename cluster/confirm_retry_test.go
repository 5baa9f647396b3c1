package cluster

import (
	"errors"
	"testing"
	"time"
)

// TestCoreConfirmationCutsBackoffShort: after fence attempts failed and
// the backoff grew, an operator's confirmation made since the failure
// starts a fence attempt at the next step, once per confirmation; an older
// confirmation (about an earlier episode) does not.
func TestCoreConfirmationCutsBackoffShort(t *testing.T) {
	st := coreFixture(t)
	cfg := ControllerConfig{Self: "w", FailureTimeout: 800 * time.Millisecond, FenceRetryMin: 4 * time.Second, FenceRetryMax: 30 * time.Second}
	c := NewControllerCore(cfg, t0)
	st.FenceConfirms["a"] = FenceConfirmation{Node: "a", By: "old", At: t0.Add(-time.Hour)}
	fences := func(now time.Time) int {
		c.Heartbeat("b", now)
		c.Heartbeat("c", now)
		n := 0
		for _, act := range c.Step(st, now) {
			if act.Fence == "a" {
				n++
			}
		}
		return n
	}
	now := t0
	for fences(now) == 0 {
		now = now.Add(100 * time.Millisecond)
		if now.Sub(t0) > 5*time.Second {
			t.Fatal("a was never fenced")
		}
	}
	c.FenceDone("a", errors.New("ipmi: timeout"), now)
	now = now.Add(100 * time.Millisecond)
	if n := fences(now); n != 0 {
		t.Fatalf("retried %d times inside the backoff with only an old confirmation", n)
	}
	st.FenceConfirms["a"] = FenceConfirmation{Node: "a", By: "alice", At: now}
	now = now.Add(100 * time.Millisecond)
	if n := fences(now); n != 1 {
		t.Fatalf("a fresh confirmation started %d fence attempts, want 1", n)
	}
	c.FenceDone("a", errors.New("manual: confirmation older than the last heartbeat"), now)
	now = now.Add(100 * time.Millisecond)
	if n := fences(now); n != 0 {
		t.Fatalf("the same confirmation cut the backoff short again (%d attempts)", n)
	}
	st.FenceConfirms["a"] = FenceConfirmation{Node: "a", By: "bob", At: now}
	now = now.Add(100 * time.Millisecond)
	if n := fences(now); n != 1 {
		t.Fatalf("a second fresh confirmation started %d fence attempts, want 1", n)
	}
}
