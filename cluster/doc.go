// Package cluster will own the hashicorp/raft group and its state machine
// (nodes, volumes, targets, ACLs, persistent reservations, fence devices,
// ownership and epochs), the failover controller (detect, fence, transfer)
// and the node agent that brings local resources in line (issue 5).
//
// Nothing is implemented yet; the package exists so the layout matches the
// product card.
package cluster
