package cluster

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/hasan-storage/hasan/replication"
	"github.com/hasan-storage/hasan/target/scsi"
)

// ReplicaSets is the optional part of LocalReplicas that brings an open
// primary's replica set in line with the state (volume-replicas) while the
// volume stays open as primary. The agent calls it on every pass for every
// primary it serves; it does nothing while the set is unchanged.
type ReplicaSets interface {
	SetReplicas(ctx context.Context, v Volume) error
}

var _ ReplicaSets = (*ReplicaAdapter)(nil)

// replicaSwapDrain bounds how long SetReplicas waits for the I/O in flight
// on the old session before closing it. A write waits at most the replica
// ack timeout plus a commit for a dead ISR member; past this bound the
// stragglers fail with replication.ErrClosed, which the initiator sees as
// an I/O error and retries.
const replicaSwapDrain = 5 * time.Second

// SetReplicas reopens the replication session of v's open primary when v's
// replica set differs from the one it was opened with. replication.Volume
// takes its peers once, at open, so the session is closed and opened again
// over the same files at the same epoch: a removed replica is no longer
// dialled, an added one is dialled, handshakes and is synced (fully, unless
// the primary holds a bitmap for its generation). New I/O waits at the
// backend while this runs and the I/O in flight is let finish first
// (replicaSwapDrain), so the initiators see a pause, not an error.
func (a *ReplicaAdapter) SetReplicas(ctx context.Context, v Volume) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	cur := a.open[v.UUID]
	if cur == nil || !cur.primary || sameSet(cur.replicas, v.Replicas) {
		return nil
	}
	log := logOr(a.Logger)
	start := time.Now()
	drained := cur.gate.pause(ctx, replicaSwapDrain)
	if err := cur.vol.Close(); err != nil {
		log.Warn("cluster: close primary for a new replica set", "volume", v.UUID, "err", err)
	}
	fail := func(err error) error {
		// Out of the open set: the next pass opens the primary afresh
		// (and the target rebuilds its LUN on the new backend).
		delete(a.open, v.UUID)
		cur.gate.close()
		return fmt.Errorf("cluster: reopen primary %s with replicas %v: %w", v.UUID, v.Replicas, err)
	}
	local, err := a.openLocal(v)
	if err != nil {
		return fail(err)
	}
	vol, err := a.openPrimary(ctx, v, local)
	if err != nil {
		return fail(err)
	}
	log.Info("cluster: primary replica set changed", "volume", v.UUID, "from", cur.replicas, "to", v.Replicas,
		"epoch", v.Epoch, "drained", drained, "paused", time.Since(start))
	cur.vol, cur.replicas = vol, slices.Clone(v.Replicas)
	cur.gate.resume(vol)
	return nil
}

func sameSet(a, b []string) bool {
	return len(a) == len(b) && !slices.ContainsFunc(a, func(x string) bool { return !slices.Contains(b, x) })
}

// gatedBackend is the scsi.Backend of an open primary: it passes every call
// to the current replication session and can hold new calls while the
// session is swapped for one with another replica set.
type gatedBackend struct {
	mu       sync.Mutex
	vol      *replication.Volume
	inflight int
	paused   chan struct{} // closed on resume; nil when not paused
	drained  chan struct{} // closed when inflight reaches 0 while paused
	closed   bool
}

var (
	_ scsi.Backend          = (*gatedBackend)(nil)
	_ scsi.MapStatusBackend = (*gatedBackend)(nil)
)

func (g *gatedBackend) acquire(ctx context.Context) (*replication.Volume, error) {
	for {
		g.mu.Lock()
		if g.closed {
			g.mu.Unlock()
			return nil, replication.ErrClosed
		}
		if p := g.paused; p != nil {
			g.mu.Unlock()
			select {
			case <-p:
				continue
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		g.inflight++
		v := g.vol
		g.mu.Unlock()
		return v, nil
	}
}

func (g *gatedBackend) release() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.inflight--
	if g.inflight == 0 && g.drained != nil {
		close(g.drained)
		g.drained = nil
	}
}

// pause holds new calls and waits, at most max, for those in flight;
// it reports whether they all finished.
func (g *gatedBackend) pause(ctx context.Context, max time.Duration) bool {
	g.mu.Lock()
	if g.paused == nil {
		g.paused = make(chan struct{})
	}
	if g.inflight == 0 {
		g.mu.Unlock()
		return true
	}
	if g.drained == nil {
		g.drained = make(chan struct{})
	}
	d := g.drained
	g.mu.Unlock()
	t := time.NewTimer(max)
	defer t.Stop()
	select {
	case <-d:
		return true
	case <-t.C:
	case <-ctx.Done():
	}
	return false
}

// resume lets calls through to vol.
func (g *gatedBackend) resume(vol *replication.Volume) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.vol = vol
	if g.paused != nil {
		close(g.paused)
		g.paused = nil
	}
}

// close fails every later call with replication.ErrClosed and wakes those
// waiting. It does not wait for calls in flight: the session under them
// is closed by the caller, which fails them.
func (g *gatedBackend) close() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.closed = true
	if g.paused != nil {
		close(g.paused)
		g.paused = nil
	}
}

func (g *gatedBackend) ReadAt(ctx context.Context, p []byte, off int64) error {
	v, err := g.acquire(ctx)
	if err != nil {
		return err
	}
	defer g.release()
	return v.ReadAt(ctx, p, off)
}

func (g *gatedBackend) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	v, err := g.acquire(ctx)
	if err != nil {
		return err
	}
	defer g.release()
	return v.WriteAt(ctx, p, off, fua)
}

func (g *gatedBackend) Flush(ctx context.Context) error {
	v, err := g.acquire(ctx)
	if err != nil {
		return err
	}
	defer g.release()
	return v.Flush(ctx)
}

func (g *gatedBackend) Unmap(ctx context.Context, off, length int64) error {
	v, err := g.acquire(ctx)
	if err != nil {
		return err
	}
	defer g.release()
	return v.Unmap(ctx, off, length)
}

func (g *gatedBackend) Resize(ctx context.Context, size int64) error {
	v, err := g.acquire(ctx)
	if err != nil {
		return err
	}
	defer g.release()
	return v.Resize(ctx, size)
}

func (g *gatedBackend) MapStatus(ctx context.Context, off int64) (bool, int64, error) {
	v, err := g.acquire(ctx)
	if err != nil {
		return false, 0, err
	}
	defer g.release()
	return v.MapStatus(ctx, off)
}

// Size never waits: the size survives a swap (same files).
func (g *gatedBackend) Size() int64 {
	g.mu.Lock()
	v := g.vol
	g.mu.Unlock()
	return v.Size()
}

// forgetFormerPeers drops, durably, the dirty bitmaps local's metadata
// keeps for nodes outside replicas. A primary session only tracks the
// writes of its peers: the bitmap of a node that left the replica set
// stops growing when the session is reopened without it, yet still
// matches that node's generation, so if the node came back (added again,
// its old files still there) its handshake would be taken as incremental
// against a bitmap missing every write since it left. Without the bitmap
// it gets a full sync.
func forgetFormerPeers(local *replication.Local, replicas []string) error {
	m := local.Meta
	changed := false
	for id := range m.Peers {
		if !slices.Contains(replicas, id) {
			delete(m.Peers, id)
			changed = true
		}
	}
	if !changed {
		return nil
	}
	if err := replication.SaveMeta(local.MetaPath, m); err != nil {
		return fmt.Errorf("cluster: forget former replicas' dirty tracking: %w", err)
	}
	return nil
}
