package cluster

import (
	"context"
	"testing"
	"time"
)

// TestHeartbeatStreamRedialsDeadConnection: the heartbeat stream to a peer
// goes dead without an error (the peer lost power, the kernel keeps taking
// the writes); the peer comes back. The sender must notice that its beats
// go unanswered, redial, and be heard again well within a failure timeout.
// Before the fix the sender wrote into the dead stream for good, and the
// restarted peer, once Raft leader, fenced the healthy node (issue-5
// scenario "leader loss" with the witness leading).
func TestHeartbeatStreamRedialsDeadConnection(t *testing.T) {
	ca, err := NewCA("test", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	mk := func(id string) *Node {
		n, err := NewNode(NodeConfig{ID: id, Role: RoleStorage, BindAddr: "127.0.0.1:0", TLS: nodeTLS(t, ca, id), Logger: testLogger(t)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { n.Close() })
		return n
	}
	a, b := mk("a"), mk("b")
	px := newHoleProxy(t, string(b.Addr()))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); a.beatPeer(ctx, px.Addr()) }()
	defer func() { cancel(); <-done }()

	heard := func(within time.Duration) bool {
		at := b.lastSeenOf("a")
		return !at.IsZero() && time.Since(at) < within
	}
	waitUntil(t, 5*time.Second, "first beats", func() bool { return heard(150 * time.Millisecond) })

	px.Blackhole()
	// A beat the proxy read just before the cut may still land; none
	// is that late.
	time.Sleep(50 * time.Millisecond)
	cut := time.Now()
	// Heard again through a new connection, in less than the default
	// failure timeout after the cut.
	waitUntil(t, 5*time.Second, "beats after the redial", func() bool { return b.lastSeenOf("a").After(cut) })
	if d := b.lastSeenOf("a").Sub(cut); d > DefaultFailureTimeout {
		t.Fatalf("heard again %v after the stream died, want < %v", d, DefaultFailureTimeout)
	}
}
