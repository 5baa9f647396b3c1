package cluster

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/hasan-storage/hasan/fencing"
	"github.com/hasan-storage/hasan/replication"
	"github.com/hasan-storage/hasan/target/scsi"
)

// Proposer commits a command and returns Apply's result once the entry is
// applied. Node implements it on Raft (forwarding to the leader); Local
// applies in-process for tests and single-node tools.
type Proposer interface {
	Propose(ctx context.Context, c *Command) (any, error)
}

// Clock is the time source of everything here that waits or stamps. Tests
// inject a fake.
type Clock interface {
	Now() time.Time
	// After is time.After on this clock.
	After(d time.Duration) <-chan time.Time
}

// SystemClock is the real clock.
type SystemClock struct{}

func (SystemClock) Now() time.Time                         { return time.Now() }
func (SystemClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// Local is a Proposer that applies commands to an FSM in-process. It still
// encodes and decodes each command, so it exercises the log format.
type Local struct {
	FSM   *FSM
	Clock Clock // nil: SystemClock

	mu    sync.Mutex
	index uint64
}

var _ Proposer = (*Local)(nil)

// NewLocal returns a Local over a fresh FSM.
func NewLocal(clock Clock) *Local { return &Local{FSM: NewFSM(nil), Clock: clock} }

func (l *Local) Propose(ctx context.Context, c *Command) (any, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	clk := l.Clock
	if clk == nil {
		clk = SystemClock{}
	}
	c.stamp(clk.Now)
	b, err := c.Encode()
	if err != nil {
		return nil, err
	}
	dc, err := DecodeCommand(b)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.index++
	r := l.FSM.applyCommand(l.index, dc)
	return r.Value, r.Err
}

// Membership implements replication.Membership on the cluster state: ISR
// changes are proposals, so they return only once committed (invariant 2).
type Membership struct {
	P   Proposer
	FSM *FSM // the local replica of the state, for State
}

var _ replication.Membership = (*Membership)(nil)

// State reads the local state. On a follower it may lag the leader; the
// epoch checks on every ISR change and on the replicas make that safe.
func (m *Membership) State(ctx context.Context, volume string) (replication.MembershipState, error) {
	if err := ctx.Err(); err != nil {
		return replication.MembershipState{}, err
	}
	var (
		st replication.MembershipState
		ok bool
	)
	m.FSM.Read(func(s *State) {
		var v *Volume
		if v, ok = s.Volumes[volume]; ok {
			st = membershipOf(v)
		}
	})
	if !ok {
		return st, fmt.Errorf("%w: %s", replication.ErrUnknownVolume, volume)
	}
	return st, nil
}

func (m *Membership) RemoveFromISR(ctx context.Context, volume string, epoch uint64, primary, replica string) (replication.MembershipState, error) {
	return m.isr(ctx, &Command{Kind: KindISRRemove, ISRRemove: &ISRRemoveCmd{Volume: volume, Epoch: epoch, Primary: primary, Replica: replica}})
}

func (m *Membership) AddToISR(ctx context.Context, volume string, epoch uint64, primary, replica string, proof replication.CatchUp) (replication.MembershipState, error) {
	return m.isr(ctx, &Command{Kind: KindISRAdd, ISRAdd: &ISRAddCmd{Volume: volume, Epoch: epoch, Primary: primary, Replica: replica, Proof: proof}})
}

func (m *Membership) isr(ctx context.Context, c *Command) (replication.MembershipState, error) {
	v, err := m.P.Propose(ctx, c)
	if err != nil {
		return replication.MembershipState{}, err
	}
	st, ok := v.(replication.MembershipState)
	if !ok {
		return replication.MembershipState{}, fmt.Errorf("cluster: %s returned %T", c.Kind, v)
	}
	return st, nil
}

// PRStore implements scsi.PRStore for one LU (volume) on the cluster state.
// Unlike the file store it restores state saved without APTPL too: a
// failover is not a power loss of the logical unit, and initiators expect
// their reservations to survive it.
type PRStore struct {
	P      Proposer
	FSM    *FSM
	Volume string
}

var _ scsi.PRStore = (*PRStore)(nil)

// LoadPR returns the committed state, or an empty one.
func (p *PRStore) LoadPR(ctx context.Context) (scsi.PRState, error) {
	if err := ctx.Err(); err != nil {
		return scsi.PRState{}, err
	}
	st := scsi.PRState{Holder: -1}
	p.FSM.Read(func(s *State) {
		if v, ok := s.PR[p.Volume]; ok {
			st = clonePR(v)
		}
	})
	return st, nil
}

// SavePR returns once the state is committed by a Raft majority.
func (p *PRStore) SavePR(ctx context.Context, st scsi.PRState) error {
	_, err := p.P.Propose(ctx, &Command{Kind: KindPRSave, PRSave: &PRSaveCmd{Volume: p.Volume, State: clonePR(st)}})
	if err != nil {
		return fmt.Errorf("cluster: save persistent reservations of %s: %w", p.Volume, err)
	}
	return nil
}

// FenceHistory implements fencing.HistoryStore on the cluster state, so
// the takeover entry can check the confirmation the fencer recorded.
type FenceHistory struct {
	P   Proposer
	FSM *FSM
}

var _ fencing.HistoryStore = (*FenceHistory)(nil)

func (h *FenceHistory) Append(ctx context.Context, r fencing.Record) error {
	_, err := h.P.Propose(ctx, &Command{Kind: KindFenceRecord, FenceRecord: &FenceRecordCmd{Record: r}})
	return err
}

func (h *FenceHistory) List(ctx context.Context, node string, limit int) ([]fencing.Record, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var out []fencing.Record
	h.FSM.Read(func(s *State) {
		for i := len(s.FenceHistory) - 1; i >= 0; i-- {
			if node != "" && s.FenceHistory[i].Node != node {
				continue
			}
			out = append(out, s.FenceHistory[i])
			if limit > 0 && len(out) == limit {
				break
			}
		}
	})
	return out, nil
}
