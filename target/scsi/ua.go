package scsi

import "sync/atomic"

// nexusState is what the LU keeps per I_T nexus: its queue of unit
// attentions. count mirrors len(pending) so the hot path can skip the lock.
type nexusState struct {
	key     string
	count   atomic.Int32
	pending []Reason // guarded by LogicalUnit.mu
}

const maxPendingUA = 16

// pushLocked queues r unless it is already queued. Power-on and reset
// conditions outrank everything else (SAM-5 5.14): they go first and replace
// any other reset condition.
func (s *nexusState) pushLocked(r Reason) {
	for _, p := range s.pending {
		if p == r {
			return
		}
	}
	if isResetUA(r) {
		kept := s.pending[:0]
		for _, p := range s.pending {
			if !isResetUA(p) {
				kept = append(kept, p)
			}
		}
		s.pending = append([]Reason{r}, kept...)
	} else if len(s.pending) < maxPendingUA {
		s.pending = append(s.pending, r)
	}
	s.count.Store(int32(len(s.pending)))
}

func (s *nexusState) popLocked() Reason {
	if len(s.pending) == 0 {
		return ReasonNone
	}
	r := s.pending[0]
	copy(s.pending, s.pending[1:])
	s.pending = s.pending[:len(s.pending)-1]
	s.count.Store(int32(len(s.pending)))
	return r
}

func isResetUA(r Reason) bool {
	switch r {
	case ReasonUAPowerOnReset, ReasonUAPowerOn, ReasonUABusDeviceReset, ReasonUAITNexusLoss:
		return true
	}
	return false
}

// nexus returns the state of n, creating it with POWER ON, RESET OR BUS
// DEVICE RESET OCCURRED queued the first time n is seen.
func (lu *LogicalUnit) nexus(n *ITNexus) *nexusState {
	lu.mu.RLock()
	st := lu.nexuses[*n]
	lu.mu.RUnlock()
	if st != nil {
		return st
	}
	lu.mu.Lock()
	defer lu.mu.Unlock()
	if st = lu.nexuses[*n]; st != nil {
		return st
	}
	key := n.Key()
	st = lu.byKey[key]
	if st == nil {
		st = &nexusState{key: key}
		lu.byKey[key] = st
	}
	st.pushLocked(ReasonUAPowerOnReset)
	lu.nexuses[*n] = st
	return st
}

func (lu *LogicalUnit) noteNexus(n *ITNexus) { lu.nexus(n) }

// takeUA removes and returns the oldest unit attention queued for n.
func (lu *LogicalUnit) takeUA(n *ITNexus) Reason {
	st := lu.nexus(n)
	if st.count.Load() == 0 {
		return ReasonNone
	}
	lu.mu.Lock()
	defer lu.mu.Unlock()
	return st.popLocked()
}

// establishUA implements uaSink for the reservation code: the nexus may not
// have sent a command yet, in which case the condition waits for it.
func (lu *LogicalUnit) establishUA(nexusKey string, r Reason) {
	lu.mu.Lock()
	defer lu.mu.Unlock()
	st := lu.byKey[nexusKey]
	if st == nil {
		if len(lu.byKey) > maxNexusStates {
			return
		}
		st = &nexusState{key: nexusKey}
		lu.byKey[nexusKey] = st
	}
	st.pushLocked(r)
}

// establishUAAll queues r for every known nexus except the one given.
func (lu *LogicalUnit) establishUAAll(r Reason, except *ITNexus) {
	lu.mu.Lock()
	defer lu.mu.Unlock()
	var skip *nexusState
	if except != nil {
		skip = lu.nexuses[*except]
	}
	for _, st := range lu.byKey {
		if st != skip {
			st.pushLocked(r)
		}
	}
}

var _ uaSink = (*LogicalUnit)(nil)
