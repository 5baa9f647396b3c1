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
	// alert, if set, commits an alert event: the operator must learn
	// from the event log, not only from the leader's log, that a takeover
	// waits for them.
	alert func(ctx context.Context, node, msg string)

	mu        sync.Mutex
	requested bool
	used      *FenceConfirmation // the confirmation Status accepted
}

var (
	_ fencing.Agent         = (*stateManualAgent)(nil)
	_ fencing.WithConfirmer = (*stateManualAgent)(nil)
)

func (m *stateManualAgent) Off(ctx context.Context) error {
	m.mu.Lock()
	m.requested = true
	m.used = nil
	m.mu.Unlock()
	if _, ok := m.valid(); ok {
		return nil
	}
	m.log.Warn("cluster: manual fence requested; an operator must check the node is off and confirm it",
		"node", m.node, "warning", fencing.ManualWarning)
	if m.alert != nil {
		m.alert(ctx, m.node, fmt.Sprintf("node %s failed; its fence is manual: no takeover until an operator checks it is powered off "+
			"and confirms (hasan fence confirm %s --by NAME, or POST /api/v1/nodes/%s/fence-confirm)", m.node, m.node, m.node))
	}
	return nil
}

// valid returns the node's confirmation if it was made after the node was
// last heard from. A confirmation older than the last heartbeat was about
// an earlier state of the node: it has been up since.
func (m *stateManualAgent) valid() (FenceConfirmation, bool) {
	c, ok := m.state().FenceConfirms[m.node]
	if ok && c.At.After(m.lastSeen(m.node)) {
		return c, true
	}
	return FenceConfirmation{}, false
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
	if c, ok := m.valid(); ok {
		m.mu.Lock()
		m.used = &c
		m.mu.Unlock()
		return fencing.PowerOff, nil
	}
	return fencing.PowerOn, nil
}

// ConfirmOff is refused: in a cluster the confirmation must be committed
// (ConfirmFence) so that whichever node leads sees it.
func (m *stateManualAgent) ConfirmOff(string, string) (fencing.Confirmation, error) {
	return fencing.Confirmation{}, fmt.Errorf("cluster: confirm %s through the cluster (fence-confirm), not the device", m.node)
}

// Pending reports whether a fence waits for a confirmation.
func (m *stateManualAgent) Pending() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.requested && m.used == nil
}

// LastConfirmation is the confirmation that made Status read off, so the
// fence history records who confirmed and when.
func (m *stateManualAgent) LastConfirmation() (fencing.Confirmation, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.used == nil {
		return fencing.Confirmation{}, false
	}
	return fencing.Confirmation{By: m.used.By, At: m.used.At}, true
}

func (m *stateManualAgent) Monitor(context.Context) error { return nil }

func (m *stateManualAgent) List(context.Context) ([]fencing.Plug, error) {
	return []fencing.Plug{{ID: m.node}}, nil
}

// BuildClusterFencer is BuildFencer with manual devices answered from the
// state: fsm is read for confirmations (ConfirmFence), and lastSeen gives
// each node's last heartbeat (Node.LastSeen on the leader; zero if never
// heard). A manual device stands for the node whose topology uses it, or,
// if none or several do, for the node its manual.node names. Each manual
// attempt that finds no valid confirmation commits a fence-manual-wait
// alert event when history is a *FenceHistory, and the history record of
// a confirmed fence carries the confirmation's operator and time.
func BuildClusterFencer(st *State, fsm *FSM, history fencing.HistoryStore, logger *slog.Logger, now func() time.Time,
	lastSeen func(node string) time.Time) (*fencing.Fencer, error) {
	f, err := BuildFencer(st, history, logger, now)
	if err != nil {
		return nil, err
	}
	// The history's proposer, when it has one, also carries the "waiting
	// for an operator" alert into the event log.
	var alert func(ctx context.Context, node, msg string)
	if h, ok := history.(*FenceHistory); ok && h.P != nil {
		alert = func(ctx context.Context, node, msg string) {
			_, err := h.P.Propose(ctx, &Command{Kind: KindEvent, Event: &EventCmd{Event: Event{
				Severity: SeverityAlert, Kind: "fence-manual-wait", Node: node, Message: msg}}})
			if err != nil {
				logOr(logger).Warn("cluster: manual fence alert not recorded", "err", err)
			}
		}
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
		dev.Agent = &stateManualAgent{node: node, state: fsm.State, lastSeen: lastSeen, log: logOr(logger), alert: alert}
		f.Devices[name] = dev
	}
	return f, nil
}
