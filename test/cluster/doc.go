// Package cluster holds the issue-5 integration scenarios: the real `hasan
// serve` binary on two storage nodes and a witness, each in its own network
// namespace of a test/lab lab, fenced through the lab's ipmi_sim BMCs, with
// the failover probe writing through the floating IP from the initiator
// namespace. The tests run only with HASAN_CLUSTER_E2E=1 (and as root).
package cluster
