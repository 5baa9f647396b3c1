// Package replication owns a volume's replicas on each node: the primary's
// synchronous write fan-out to the in-sync set (ISR), the replica server,
// epoch fencing, dirty-region tracking with an activity log, incremental and
// full resync, and online verify with repair. A replicated Volume satisfies
// target/scsi.Backend using only standard types, so this package never
// imports target/ (nor cluster/, fencing/, vip/ or webui/).
//
// The protocol is two pure state machines. Primary is fed events (Propose,
// LocalDone, Step, PeerConnected, PeerDown, MembershipResult, Tick, Verify)
// and returns a Ready batch {Persist, Local, Send, Disconnect, Propose,
// Acks, Verified, Unhealthy}; Replica is fed messages and returns a
// ReplicaReady {Persist, Barrier, IO, Send}. Neither performs I/O. The
// shells (Volume on the primary, Server on replicas) run them:
//
//	for core.HasReady() {
//		rd := core.Ready()
//		Local.Persist(rd.Persist)      // durable first: activity log (ALFile, one
//		                               // flush), dirty bits and epoch (SaveMeta)
//		issue rd.Local; send rd.Send   // results come back as LocalDone / Step events
//		core.Sent(rd)                  // ack timeouts of rd.Send run from now
//		hand rd.Propose to Membership  // result comes back as MembershipResult
//		complete rd.Acks               // only now is the initiator answered
//	}
//
// (Volume persists off its event loop and takes no further Ready until the
// sync completes, so activity-log changes made meanwhile share the next
// transaction; for an activity-log-only Ready it sends before the local
// sync, see docs/replication.md.)
//
// ISR changes go through the Membership interface (implemented on Raft by
// cluster/; MemMembership here enforces the same rules). Tests drive the
// state machines from scripts in testdata/ (go test -run TestScripts
// -rewrite regenerates them) and the shells over real TLS on loopback.
// docs/replication.md describes the protocol, guarantees, on-disk format
// and failure semantics.
package replication
