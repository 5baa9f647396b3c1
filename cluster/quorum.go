package cluster

import (
	"slices"
	"sync"
	"time"
)

// Quorum contact through heartbeats. A storage node's serving lease
// (lease.go) needs proof that it can still reach a majority of the voters.
// Raft gives one proof, the leader's last contact, but it vanishes with
// the leader: when a witness that leads loses power, the owner would
// demote and close every session although the other storage node still
// answers. The heartbeat streams give a second proof that does not depend
// on who leads: every beat is echoed, and an echo proves the peer heard
// this node no earlier than the beat was sent.

// beatTimes matches echoes to the beats they answer: the receiver echoes
// every byte it reads, so the i-th echo answers the i-th beat of the stream.
type beatTimes struct {
	mu   sync.Mutex
	sent []time.Time
}

func (b *beatTimes) push(t time.Time) {
	b.mu.Lock()
	// A peer that stopped echoing while the stream takes writes would let
	// this grow; heartbeatStale redials long before, but bound it anyway.
	if len(b.sent) < 1024 {
		b.sent = append(b.sent, t)
	}
	b.mu.Unlock()
}

// pop returns the send time of the oldest unanswered beat.
func (b *beatTimes) pop() (time.Time, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.sent) == 0 {
		return time.Time{}, false
	}
	t := b.sent[0]
	b.sent = b.sent[1:]
	return t, true
}

// heardBy records that peer heard this node at or after at.
func (n *Node) heardBy(peer string, at time.Time) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.heard == nil {
		n.heard = map[string]time.Time{}
	}
	if at.After(n.heard[peer]) {
		n.heard[peer] = at
	}
}

// QuorumContact returns the latest time at which a majority of the Raft
// voters, this node included, had heard from this node through the
// heartbeat streams; zero when this node is not a voter, when it is the
// only one, or when too few peers have answered.
func (n *Node) QuorumContact() time.Time {
	voters := n.voterIDs()
	n.mu.Lock()
	defer n.mu.Unlock()
	return quorumTime(n.cfg.ID, voters, n.heard)
}

// quorumTime is QuorumContact's rule: with self among the voters, the
// time by which enough other voters had heard from self to make a
// majority with it (the k-th latest of their times).
func quorumTime(self string, voters []string, heard map[string]time.Time) time.Time {
	if !slices.Contains(voters, self) || len(voters) < 2 {
		return time.Time{}
	}
	need := len(voters) / 2 // other voters needed: a majority is len/2+1 with self
	var times []time.Time
	for _, id := range voters {
		if t, ok := heard[id]; ok && id != self {
			times = append(times, t)
		}
	}
	if len(times) < need {
		return time.Time{}
	}
	slices.SortFunc(times, func(a, b time.Time) int { return b.Compare(a) })
	return times[need-1]
}
