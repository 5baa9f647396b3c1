package cluster

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/hasan-storage/hasan/fencing"
)

// Manual fencing through the cluster. fencing.ManualAgent keeps an
// operator's confirmation in memory, but the controller builds a new fencer
// for every fence on whichever node leads, so the confirmation has to live
// in the replicated state: an operator confirms with ConfirmFence (a
// fence-confirm entry), and the cluster's manual agent reads it.

// ConfirmFence records that operator checked node is powered off. A manual
// fence device of that node then reads off, and the controller's takeover
// can go on. The confirmation counts only if it is newer than the node's
// last heartbeat, and a takeover consumes it.
func (n *Node) ConfirmFence(ctx context.Context, node, operator string) error {
	_, err := n.Propose(ctx, &Command{Kind: KindFenceConfirm, FenceConfirm: &FenceConfirmCmd{Node: node, Operator: operator}})
	return err
}

// stateManualAgent is the manual fence device of one cluster node: Off
// opens a request (it does nothing by itself), and Status reads off once
// the state holds an operator confirmation for the node made after the
// node was last heard from.
type stateManualAgent struct {
	node     string
	state    func() *State
	lastSeen func(node string) time.Time
	log      *slog.Logger

	mu        sync.Mutex
	requested bool
}

var _ fencing.Agent = (*stateManualAgent)(nil)

func (m *stateManualAgent) Off(context.Context) error {
	m.mu.Lock()
	m.requested = true
	m.mu.Unlock()
	m.log.Warn("cluster: manual fence requested; an operator must check the node is off and confirm it",
		"node", m.node, "warning", fencing.ManualWarning)
	return nil
}

func (m *stateManualAgent) On(context.Context) error {
	return fmt.Errorf("%w: power on %s by hand", fencing.ErrNotSupported, m.node)
}

func (m *stateManualAgent) Status(context.Context) (fencing.PowerState, error) {
	m.mu.Lock()
	requested := m.requested
	m.mu.Unlock()
	if !requested {
		return fencing.PowerOn, nil
	}
	c, ok := m.state().FenceConfirms[m.node]
	// A confirmation older than the node's last heartbeat was about an
	// earlier state of the node: it has been up since.
	if ok && c.At.After(m.lastSeen(m.node)) {
		return fencing.PowerOff, nil
	}
	return fencing.PowerOn, nil
}

func (m *stateManualAgent) Monitor(context.Context) error { return nil }

func (m *stateManualAgent) List(context.Context) ([]fencing.Plug, error) {
	return []fencing.Plug{{ID: m.node}}, nil
}

// BuildClusterFencer is BuildFencer with manual devices answered from the
// state: fsm is read for confirmations (ConfirmFence), and lastSeen gives
// each node's last heartbeat (Node.LastSeen on the leader; zero if never
// heard). A manual device stands for the node whose topology uses it, or,
// if none or several do, for the node its manual.node names.
func BuildClusterFencer(st *State, fsm *FSM, history fencing.HistoryStore, logger *slog.Logger, now func() time.Time,
	lastSeen func(node string) time.Time) (*fencing.Fencer, error) {
	f, err := BuildFencer(st, history, logger, now)
	if err != nil {
		return nil, err
	}
	for name, d := range st.FenceDevices {
		if d.Type != "manual" {
			continue
		}
		dc, err := d.DeviceConfig()
		if err != nil || dc.Manual == nil {
			continue
		}
		node := dc.Manual.Node
		var users []string
		for _, id := range sortedKeys(st.Nodes) {
			for _, l := range st.Nodes[id].Fence.Levels {
				if slices.Contains(l, name) && !slices.Contains(users, id) {
					users = append(users, id)
				}
			}
		}
		if len(users) == 1 {
			node = users[0]
		}
		dev := f.Devices[name]
		dev.Agent = &stateManualAgent{node: node, state: fsm.State, lastSeen: lastSeen, log: logOr(logger)}
		f.Devices[name] = dev
	}
	return f, nil
}
