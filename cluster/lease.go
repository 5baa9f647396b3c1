package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
)

// DefaultLeaseDuration is how long a storage node keeps serving after its
// last proof of contact with a Raft quorum. It must stay below the
// controller's FailureTimeout, so an isolated owner has stopped before the
// leader even starts to fence it (DESIGN.md invariant 5).
const DefaultLeaseDuration = 500 * time.Millisecond

// Lease is a time-bounded right to serve, renewed by proofs of quorum
// contact. It only moves forward and reads time from the injected clock.
type Lease struct {
	Duration time.Duration
	Clock    Clock

	mu      sync.Mutex
	expires time.Time
}

// NewLease returns an expired lease.
func NewLease(d time.Duration, clock Clock) *Lease {
	if clock == nil {
		clock = SystemClock{}
	}
	return &Lease{Duration: d, Clock: clock}
}

// Renew extends the lease to contact+Duration, where contact is when quorum
// contact was last proven (not when Renew runs: a late renewal must not
// stretch the lease).
func (l *Lease) Renew(contact time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e := contact.Add(l.Duration); e.After(l.expires) {
		l.expires = e
	}
}

// Valid reports whether the lease is held now.
func (l *Lease) Valid() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.Clock.Now().Before(l.expires)
}

// Expires returns the expiry time.
func (l *Lease) Expires() time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.expires
}

// Demoter stops a node serving: drop its VIPs, close its iSCSI sessions
// and stop its targets. The node agent implements it.
type Demoter interface {
	Demote(ctx context.Context, reason string) error
}

// quorumContact is what SelfDemotion needs from raft; *raft.Raft and tests'
// fakes satisfy it.
type quorumContact interface {
	State() raft.RaftState
	LastContact() time.Time
	LeaderWithID() (raft.ServerAddress, raft.ServerID)
	VerifyLeader() raft.Future
}

// SelfDemotion keeps a storage node's lease alive while it is in contact
// with a quorum and demotes the node once the lease runs out.
//
// Proof of contact: a follower that knows a leader uses the time it last
// heard from it; a leader runs VerifyLeader (a heartbeat round to a quorum) and
// uses the time the round started. Either may also use Contact, the time a
// majority of the voters last echoed its heartbeats (Node.QuorumContact),
// which outlives the leader: when the leader (normally the witness) is lost,
// an owner still in touch with a majority keeps serving instead of closing
// every session for the length of an election.
type SelfDemotion struct {
	Raft    quorumContact
	Lease   *Lease
	Demoter Demoter
	// Interval between checks; default Lease.Duration/5.
	Interval time.Duration
	Logger   *slog.Logger
	// OnDemote, if set, is called after each demotion (tests, metrics).
	OnDemote func(at time.Time)
	// Contact, if set, returns a proof of quorum contact from outside
	// raft (zero for none); see above.
	Contact func() time.Time

	verifying atomic.Bool
	wg        sync.WaitGroup
}

// Run checks until ctx ends. The lease starts expired: a node serves only
// after its first proof of contact.
func (d *SelfDemotion) Run(ctx context.Context) error {
	iv := d.Interval
	if iv <= 0 {
		iv = d.Lease.Duration / 5
	}
	log := d.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	serving := false
	defer d.wg.Wait() // raft resolves every VerifyLeader future, at the latest on shutdown
	for {
		d.renew(ctx, iv)
		valid := d.Lease.Valid()
		switch {
		case valid && !serving:
			serving = true
		case !valid && serving:
			serving = false
			now := d.Lease.Clock.Now()
			log.Error("cluster: lost quorum contact; demoting", "lease_expired", d.Lease.Expires())
			if err := d.Demoter.Demote(ctx, "quorum lease expired"); err != nil {
				log.Error("cluster: demote", "err", err)
			}
			if d.OnDemote != nil {
				d.OnDemote(now)
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-d.Lease.Clock.After(iv):
		}
	}
}

// Serving reports whether the node may serve: the lease is valid.
func (d *SelfDemotion) Serving() bool { return d.Lease.Valid() }

// renew never blocks the expiry check: a leader's VerifyLeader round runs
// in the background (one at a time) and renews from its start time once it
// succeeds. An isolated leader's round hangs until raft steps down, and the
// lease must run out meanwhile.
func (d *SelfDemotion) renew(ctx context.Context, _ time.Duration) {
	if d.Contact != nil {
		if at := d.Contact(); !at.IsZero() {
			d.Lease.Renew(at)
		}
	}
	switch d.Raft.State() {
	case raft.Leader:
		if !d.verifying.CompareAndSwap(false, true) {
			return
		}
		start := d.Lease.Clock.Now()
		f := d.Raft.VerifyLeader()
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			defer d.verifying.Store(false)
			if f.Error() == nil {
				d.Lease.Renew(start)
			}
		}()
	case raft.Follower:
		// LastContact alone is no proof: raft also sets it when a leader
		// steps down and when it grants a vote. Only while a leader is
		// known does it date the leader's last AppendEntries.
		if addr, _ := d.Raft.LeaderWithID(); addr == "" {
			return
		}
		if lc := d.Raft.LastContact(); !lc.IsZero() {
			d.Lease.Renew(lc)
		}
	}
}

// ErrLeaseTooLong: the lease would outlive failure detection.
var ErrLeaseTooLong = errors.New("cluster: lease must be shorter than the failure timeout")

// CheckTimeouts validates the timing relation invariant 5 depends on.
func CheckTimeouts(lease, failure time.Duration) error {
	if lease <= 0 || lease >= failure {
		return fmt.Errorf("%w: lease %v, failure timeout %v", ErrLeaseTooLong, lease, failure)
	}
	return nil
}
