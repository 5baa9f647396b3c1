// Package replication will own a volume's replicas on each node: the
// primary's synchronous write fan-out to the in-sync set, the replica server,
// dirty-region tracking, resync and online verify (issue 3). A replicated
// volume satisfies target/scsi.Backend using only standard types, so this
// package never imports target/.
//
// Nothing is implemented yet; the package exists so the layout matches the
// product card.
package replication
