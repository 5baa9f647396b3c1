// Package cluster is hasan's control plane: the hashicorp/raft group and
// its state machine, the failover controller that runs on the leader, and
// the self-demotion lease of storage nodes. It is the one package that
// drives the leaves (replication/, fencing/, target/, vip/), and it does so
// through small interfaces (Proposer, Fencer, Demoter) so tests use fakes.
//
// State and commands. State holds nodes, volumes (size, replicas, ISR,
// primary, epoch), targets (IQN, LUN map, ACL, CHAP), groups (VIPs plus the
// targets that move with them, owner, epoch), persistent reservations per
// volume, fence devices, fence history, a bounded event log, join tokens and
// the maintenance flag. It changes only through Command entries of the Raft
// log. State.Apply validates each command against the current state and
// either applies all of it or nothing, returning typed errors. It reads no
// clock and does no I/O: times arrive inside the command (Command.At).
// Commands are encoded as a version byte plus gob; JSON is only for output
// and redacts every secret.
//
// The leaves' storage interfaces are implemented on the state: Membership
// (replication.Membership), PRStore (scsi.PRStore; restores non-APTPL state
// too, because a failover is not a power loss) and FenceHistory
// (fencing.HistoryStore). Their writes are proposals that return once
// committed.
//
// Raft. Node wraps hashicorp/raft with raft-boltdb (log and stable store),
// file snapshots and a mutual-TLS transport on one port, where tagged
// streams also carry follower proposals to the leader and node heartbeats.
// NewCA/CA.Issue/TLSConfig make the cluster PKI; NewJoinToken and
// Node.Join admit nodes with short-lived single-use tokens.
//
// Controller. ControllerCore is a pure state machine fed heartbeats, fence
// and proposal results and the committed state with the time; it returns
// actions. Controller is its shell on the leader (Node.RunController):
//
//	for each input or tick:
//		acts := core.Step(fsm.State(), clock.Now())
//		for _, a := range acts {
//			if a.Fence != "" { go fence (VerifyLeader first); core.FenceDone(...) }
//			if a.Propose != nil { go propose; core.ProposeDone(...) }
//		}
//
// An unplanned takeover is fence, wait for a confirmed off, then one
// TakeoverCmd entry (new owner from the ISR, epoch+1, shrunken ISR, old
// owner marked fenced) that Apply refuses unless the fence history holds
// the confirmation. SelfDemotion drops a storage node's VIPs and sessions
// once its quorum lease (shorter than the failure timeout) runs out.
//
// Agent is the node agent (over LocalVIPs, LocalTargets and
// LocalReplicas): it reconciles local resources with the state, drains and
// releases on a planned move, records the owner's initiator connections
// and tickles them after each acquisition, hands groups over on a graceful
// stop, and is the Demoter.
//
// docs/cluster.md describes the state model, the commands, the
// controller's phases and the timeouts.
package cluster
