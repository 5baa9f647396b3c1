package replication

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
)

// Sentinel errors of the membership rules.
var (
	// ErrStaleEpoch: the request carries an epoch lower than the current
	// one. A zombie primary gets this from replicas and from Membership.
	ErrStaleEpoch = errors.New("replication: stale epoch")
	// ErrNotPrimary: only the current primary may change the ISR.
	ErrNotPrimary = errors.New("replication: not the current primary")
	// ErrNotCaughtUp: a replica may rejoin the ISR only once resync is done.
	ErrNotCaughtUp = errors.New("replication: replica has not caught up")
	// ErrNotInISR: a new primary must come from the ISR.
	ErrNotInISR = errors.New("replication: node is not in the in-sync set")
	// ErrUnknownVolume: Membership has no such volume.
	ErrUnknownVolume = errors.New("replication: unknown volume")
)

// MembershipState is the committed ownership of one volume.
type MembershipState struct {
	Epoch   uint64
	Primary string
	// ISR lists the replicas (the primary included) that hold every
	// acknowledged write.
	ISR []string
}

// InISR reports whether node is in the ISR.
func (s MembershipState) InISR(node string) bool { return slices.Contains(s.ISR, node) }

// CatchUp is the primary's evidence, with an AddToISR request, that the
// replica holds everything: it acknowledged the primary's generation and no
// dirty region is left.
type CatchUp struct {
	PrimaryGen uint64
	ReplicaGen uint64
	DirtyBytes int64
}

// Membership is how the replication layer changes the ISR. The cluster
// implements it on Raft; every method returns only once the change is
// committed (or refused), so a caller that waits for it waits for the commit.
//
// Rules every implementation enforces:
//   - only the current primary, for the current epoch, may remove or add a
//     replica (ErrStaleEpoch, ErrNotPrimary);
//   - a replica is added only with a CatchUp showing no dirty data and equal
//     generations (ErrNotCaughtUp);
//   - the primary never removes itself.
type Membership interface {
	State(ctx context.Context, volume string) (MembershipState, error)
	RemoveFromISR(ctx context.Context, volume string, epoch uint64, primary, replica string) (MembershipState, error)
	AddToISR(ctx context.Context, volume string, epoch uint64, primary, replica string, proof CatchUp) (MembershipState, error)
}

// MemMembership is an in-memory Membership for tests and single-process
// use. It also plays the controller's part with Create and Promote.
type MemMembership struct {
	mu   sync.Mutex
	vols map[string]*MembershipState
	// Log records every committed change, for tests.
	log []string
}

var _ Membership = (*MemMembership)(nil)

// NewMemMembership returns an empty membership store.
func NewMemMembership() *MemMembership {
	return &MemMembership{vols: make(map[string]*MembershipState)}
}

// Create registers a volume owned by primary at epoch 1 with every replica
// (primary included) in the ISR.
func (m *MemMembership) Create(volume, primary string, replicas ...string) MembershipState {
	m.mu.Lock()
	defer m.mu.Unlock()
	isr := append([]string{primary}, replicas...)
	st := &MembershipState{Epoch: 1, Primary: primary, ISR: isr}
	m.vols[volume] = st
	m.log = append(m.log, fmt.Sprintf("create %s primary=%s isr=%v", volume, primary, isr))
	return cloneState(*st)
}

// Promote makes node the primary with a new epoch. The node must be in the
// ISR: that is what guarantees it holds every acknowledged write.
func (m *MemMembership) Promote(volume, node string) (MembershipState, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	st, ok := m.vols[volume]
	if !ok {
		return MembershipState{}, ErrUnknownVolume
	}
	if !st.InISR(node) {
		return MembershipState{}, fmt.Errorf("%w: %s", ErrNotInISR, node)
	}
	st.Epoch++
	st.Primary = node
	m.log = append(m.log, fmt.Sprintf("promote %s primary=%s epoch=%d", volume, node, st.Epoch))
	return cloneState(*st), nil
}

// State returns the committed state.
func (m *MemMembership) State(_ context.Context, volume string) (MembershipState, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	st, ok := m.vols[volume]
	if !ok {
		return MembershipState{}, ErrUnknownVolume
	}
	return cloneState(*st), nil
}

func (m *MemMembership) checkLocked(volume string, epoch uint64, primary string) (*MembershipState, error) {
	st, ok := m.vols[volume]
	if !ok {
		return nil, ErrUnknownVolume
	}
	if epoch < st.Epoch {
		return nil, fmt.Errorf("%w: %d < %d", ErrStaleEpoch, epoch, st.Epoch)
	}
	if epoch != st.Epoch || primary != st.Primary {
		return nil, fmt.Errorf("%w: %s at epoch %d", ErrNotPrimary, primary, epoch)
	}
	return st, nil
}

// RemoveFromISR removes replica from the ISR if the caller is the current
// primary at the current epoch.
func (m *MemMembership) RemoveFromISR(ctx context.Context, volume string, epoch uint64, primary, replica string) (MembershipState, error) {
	if err := ctx.Err(); err != nil {
		return MembershipState{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	st, err := m.checkLocked(volume, epoch, primary)
	if err != nil {
		return MembershipState{}, err
	}
	if replica == primary {
		return MembershipState{}, fmt.Errorf("replication: primary %s cannot remove itself", primary)
	}
	if i := slices.Index(st.ISR, replica); i >= 0 {
		st.ISR = slices.Delete(st.ISR, i, i+1)
		m.log = append(m.log, fmt.Sprintf("remove %s %s epoch=%d isr=%v", volume, replica, epoch, st.ISR))
	}
	return cloneState(*st), nil
}

// AddToISR adds replica once proof shows it has caught up.
func (m *MemMembership) AddToISR(ctx context.Context, volume string, epoch uint64, primary, replica string, proof CatchUp) (MembershipState, error) {
	if err := ctx.Err(); err != nil {
		return MembershipState{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	st, err := m.checkLocked(volume, epoch, primary)
	if err != nil {
		return MembershipState{}, err
	}
	if proof.DirtyBytes != 0 || proof.PrimaryGen == 0 || proof.PrimaryGen != proof.ReplicaGen {
		return MembershipState{}, fmt.Errorf("%w: %s %+v", ErrNotCaughtUp, replica, proof)
	}
	if !st.InISR(replica) {
		st.ISR = append(st.ISR, replica)
		m.log = append(m.log, fmt.Sprintf("add %s %s epoch=%d isr=%v", volume, replica, epoch, st.ISR))
	}
	return cloneState(*st), nil
}

// Delete forgets a volume (the controller's part of deleting it).
func (m *MemMembership) Delete(volume string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.vols, volume)
	m.log = append(m.log, "delete "+volume)
}

// Log returns the committed changes so far.
func (m *MemMembership) Log() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.log)
}

func cloneState(s MembershipState) MembershipState {
	s.ISR = slices.Clone(s.ISR)
	return s
}
