package replication

import "sort"

// Network is an in-memory, ordered, lossy message network for driving the
// state machines in tests: one FIFO queue per directed link, with partitions
// that drop whatever crosses them.
type Network struct {
	queues map[[2]string][]Message
	cut    map[[2]string]bool
}

// NewNetwork returns an empty network.
func NewNetwork() *Network {
	return &Network{queues: make(map[[2]string][]Message), cut: make(map[[2]string]bool)}
}

// Send queues m from → to; it is dropped if the link is partitioned.
func (n *Network) Send(from, to string, m Message) bool {
	if n.cut[[2]string{from, to}] {
		return false
	}
	k := [2]string{from, to}
	n.queues[k] = append(n.queues[k], m)
	return true
}

// Partition cuts both directions between a and b and drops what is queued.
func (n *Network) Partition(a, b string) {
	n.cut[[2]string{a, b}], n.cut[[2]string{b, a}] = true, true
	n.Drop(a, b)
	n.Drop(b, a)
}

// Heal removes every partition.
func (n *Network) Heal() { n.cut = make(map[[2]string]bool) }

// Partitioned reports whether a → b is cut.
func (n *Network) Partitioned(a, b string) bool { return n.cut[[2]string{a, b}] }

// Drop discards everything queued from → to and returns how many.
func (n *Network) Drop(from, to string) int {
	k := [2]string{from, to}
	c := len(n.queues[k])
	delete(n.queues, k)
	return c
}

// DropNode discards everything queued to or from node.
func (n *Network) DropNode(node string) {
	for k := range n.queues {
		if k[0] == node || k[1] == node {
			delete(n.queues, k)
		}
	}
}

// Pop removes and returns the oldest message on from → to.
func (n *Network) Pop(from, to string) (Message, bool) {
	k := [2]string{from, to}
	q := n.queues[k]
	if len(q) == 0 {
		return Message{}, false
	}
	m := q[0]
	if len(q) == 1 {
		delete(n.queues, k)
	} else {
		n.queues[k] = q[1:]
	}
	return m, true
}

// Links lists links with queued messages in a stable order.
func (n *Network) Links() [][2]string {
	var out [][2]string
	for k, q := range n.queues {
		if len(q) > 0 {
			out = append(out, k)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i][0] != out[j][0] {
			return out[i][0] < out[j][0]
		}
		return out[i][1] < out[j][1]
	})
	return out
}
