// Package fencing will own fence agents (IPMI lanplus, APC SNMP power strips,
// Redfish, external fence_* programs, manual confirmation) and the per-node
// fencing topology. A fence counts only when a Status read confirms the node
// is off (issue 4).
//
// Nothing is implemented yet; the package exists so the layout matches the
// product card.
package fencing
