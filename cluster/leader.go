package cluster

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/raft"
)

// Leader placement. The controller runs on the Raft leader, and when the
// leader is also the owner that fails, the takeover first waits for an
// election (heartbeat timeout plus a vote, 0.5–1 s more, measured as the
// tail of the owner-power-loss figures). So the leader hands leadership to
// the node whose loss costs least: a witness (its loss moves nothing),
// else a storage node that serves nothing, never to a busier node than
// itself. It only does so when the cluster is calm. Leadership cannot
// ping-pong: a transfer only ever goes to a strictly lower rank.
const (
	// leaderSettle: a new leader first runs this long, so that
	// last-seen times and the groups' phases reflect the present.
	leaderSettle = 3 * time.Second
	// leaderTransferRetry spaces a leader's attempts: a successful one
	// ends its term (and its controller), so this is the retry interval
	// after a failed one, e.g. to a node that came back and is still
	// catching up on the log (raft gives up after an election timeout).
	leaderTransferRetry = 5 * time.Second
)

// leaderRank orders nodes by how much their loss would cost while they
// lead: 0 for a witness, 1 for a storage node that owns no group and is
// primary of no volume, 2 otherwise.
func leaderRank(st *State, id string) int {
	n := st.Nodes[id]
	if n == nil {
		return 2
	}
	if n.Role == RoleWitness {
		return 0
	}
	for _, g := range st.Groups {
		if g.Owner == id || g.MovingTo == id {
			return 2
		}
	}
	for _, v := range st.Volumes {
		if v.Primary == id {
			return 2
		}
	}
	return 1
}

// SetVoters tells the core which nodes are Raft voters (only a voter can
// be handed leadership).
func (c *ControllerCore) SetVoters(ids []string) {
	c.voters = map[string]bool{}
	for _, id := range ids {
		c.voters[id] = true
	}
}

// leaderTarget returns the node to hand leadership to, or "" to keep it:
// an alive, online voter of strictly lower rank than this leader, chosen
// only while nothing is in progress (no failed node, no fence, no
// proposal in flight, no group away from detecting).
func (c *ControllerCore) leaderTarget(st *State, now time.Time) string {
	self := c.cfg.Self
	if c.cfg.NoLeaderPlacement || self == "" || st.Maintenance || c.voters == nil {
		return ""
	}
	if now.Sub(c.start) < leaderSettle || (!c.lastTransfer.IsZero() && now.Sub(c.lastTransfer) < leaderTransferRetry) {
		return ""
	}
	for id, t := range c.nodes {
		if st.Nodes[id] != nil && (t.fence != fenceNone || !t.detectedAt.IsZero()) {
			return ""
		}
	}
	for _, name := range sortedKeys(st.Groups) {
		g, gt := st.Groups[name], c.group(name)
		if gt.inFlight || gt.phase != PhaseDetecting || g.MovingTo != "" || g.Owner == "" {
			return ""
		}
	}
	best, bestRank := "", leaderRank(st, self)
	for _, id := range sortedKeys(st.Nodes) {
		n := st.Nodes[id]
		if id == self || !c.voters[id] || n.State != NodeOnline {
			continue
		}
		// Freshly heard from, not merely inside the failure timeout: a
		// node about to be declared failed must not be handed the cluster.
		if now.Sub(c.node(id).lastSeen) > c.cfg.FailureTimeout/2 {
			continue
		}
		if r := leaderRank(st, id); r < bestRank {
			best, bestRank = id, r
		}
	}
	if best != "" {
		c.lastTransfer = now
	}
	return best
}

// TransferLeadershipTo hands Raft leadership to voter id. It returns once
// the transfer has been carried out or has failed; the caller's controller
// stops when leadership is gone.
func (n *Node) TransferLeadershipTo(ctx context.Context, id string) error {
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return fmt.Errorf("cluster: leadership transfer: %w", err)
	}
	var addr raft.ServerAddress
	for _, s := range f.Configuration().Servers {
		if string(s.ID) == id && s.Suffrage == raft.Voter {
			addr = s.Address
		}
	}
	if addr == "" {
		return fmt.Errorf("cluster: leadership transfer: %s is not a voter", id)
	}
	done, err := awaitFuture(ctx, n.raft.LeadershipTransferToServer(raft.ServerID(id), addr))
	if done && err != nil {
		return fmt.Errorf("cluster: leadership transfer to %s: %w", id, err)
	}
	return err
}

// voterIDs lists the Raft voters of the latest configuration.
func (n *Node) voterIDs() []string {
	f := n.raft.GetConfiguration()
	if f.Error() != nil {
		return nil
	}
	var ids []string
	for _, s := range f.Configuration().Servers {
		if s.Suffrage == raft.Voter {
			ids = append(ids, string(s.ID))
		}
	}
	return ids
}
