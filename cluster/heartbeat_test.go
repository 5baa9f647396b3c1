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
	go func() { defer close(done); a.beatPeer(ctx, "b", px.Addr()) }()
	defer func() { cancel(); <-done }()

	heard := func(within time.Duration) bool {
		at := b.lastSeenOf("a")
		return !at.IsZero() && time.Since(at) < within
	}
	waitUntil(t, 5*time.Second, "first beats", func() bool { return heard(150 * time.Millisecond) })

	// Echoes date a's contact with b (quorum.go) by when the beat left.
	echoed := func() time.Time {
		a.mu.Lock()
		defer a.mu.Unlock()
		return a.heard["b"]
	}
	waitUntil(t, 5*time.Second, "echoed beats", func() bool { return time.Since(echoed()) < 150*time.Millisecond })

	px.Blackhole()
	// A beat the proxy read just before the cut may still land; none
	// is that late.
	time.Sleep(50 * time.Millisecond)
	cut := time.Now()
	// No echo comes back through the dead stream: the contact a can
	// prove stays before the cut until the redial.
	time.Sleep(200 * time.Millisecond)
	if e := echoed(); e.After(cut) {
		t.Fatalf("contact with b dated %v after the stream died", e.Sub(cut))
	}
	// Heard again through a new connection, in less than the default
	// failure timeout after the cut.
	waitUntil(t, 5*time.Second, "beats after the redial", func() bool { return b.lastSeenOf("a").After(cut) })
	if d := b.lastSeenOf("a").Sub(cut); d > DefaultFailureTimeout {
		t.Fatalf("heard again %v after the stream died, want < %v", d, DefaultFailureTimeout)
	}
	waitUntil(t, 5*time.Second, "echoes after the redial", func() bool { return echoed().After(cut) })
}

// TestQuorumTime: the proof of quorum contact is the time by which enough
// other voters to make a majority with this node had heard from it.
func TestQuorumTime(t *testing.T) {
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	for _, c := range []struct {
		name   string
		voters []string
		heard  map[string]time.Time
		want   time.Time
	}{
		{"three voters, one peer answering", []string{"a", "b", "w"}, map[string]time.Time{"b": at(100)}, at(100)},
		{"three voters, the later of two", []string{"a", "b", "w"}, map[string]time.Time{"b": at(100), "w": at(300)}, at(300)},
		{"three voters, none answering", []string{"a", "b", "w"}, map[string]time.Time{}, time.Time{}},
		{"non-voters do not count", []string{"a", "b", "w"}, map[string]time.Time{"x": at(500)}, time.Time{}},
		{"five voters need two others: the second latest", []string{"a", "b", "c", "d", "w"},
			map[string]time.Time{"b": at(100), "c": at(400), "w": at(200)}, at(200)},
		{"five voters, one other is not enough", []string{"a", "b", "c", "d", "w"}, map[string]time.Time{"b": at(100)}, time.Time{}},
		{"four voters need two others", []string{"a", "b", "c", "w"}, map[string]time.Time{"b": at(100), "w": at(200)}, at(100)},
		{"self not a voter", []string{"b", "c", "w"}, map[string]time.Time{"b": at(100), "c": at(100)}, time.Time{}},
		{"alone", []string{"a"}, map[string]time.Time{}, time.Time{}},
	} {
		if got := quorumTime("a", c.voters, c.heard); !got.Equal(c.want) {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
		}
	}
}
