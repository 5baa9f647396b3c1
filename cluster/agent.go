package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"time"
)

// The node agent's view of local resources. cmd/ adapts target.Server,
// replication and vip.Manager to these; tests use fakes.

// LocalVIPs adds and removes floating addresses on this node.
type LocalVIPs interface {
	Acquire(ctx context.Context, addr netip.Prefix) error
	Release(ctx context.Context, addr netip.Prefix) error
	Held() []netip.Prefix
}

// LocalTargets starts, updates and stops exported targets on this node.
// Stop closes the target's sessions.
type LocalTargets interface {
	Serve(ctx context.Context, t Target, volumes []Volume) error
	Stop(ctx context.Context, iqn string) error
	Serving() []string
}

// LocalReplicas opens volumes as primary or secondary at an epoch.
type LocalReplicas interface {
	Open(ctx context.Context, v Volume, primary bool) error
	Close(ctx context.Context, uuid string) error
	// Opened maps open volume UUIDs to "is primary".
	Opened() map[string]bool
}

// Agent brings one node's resources in line with the committed state:
// replicas open with the right role, owned groups' targets served and VIPs
// held, everything else stopped, and, on a planned move, drain then
// release. It is a skeleton: each pass is a plain diff, and retries happen
// on the next pass.
type Agent struct {
	Self     string
	FSM      *FSM
	P        Proposer
	VIPs     LocalVIPs
	Targets  LocalTargets
	Replicas LocalReplicas
	// Serving reports whether the node holds its quorum lease; nil means
	// always. Without the lease the agent serves nothing.
	Serving  func() bool
	Interval time.Duration // re-check period; default 100ms
	Logger   *slog.Logger
}

var _ Demoter = (*Agent)(nil)

type desired struct {
	primary, secondary map[string]Volume
	targets            map[string]Target
	vips               []netip.Prefix
	release            []*Group // groups to hand back after draining
}

func (a *Agent) desired(st *State) desired {
	d := desired{primary: map[string]Volume{}, secondary: map[string]Volume{}, targets: map[string]Target{}}
	serving := a.Serving == nil || a.Serving()
	owned := map[string]bool{} // volumes of groups this node serves
	for _, name := range sortedKeys(st.Groups) {
		g := st.Groups[name]
		if g.Owner != a.Self {
			continue
		}
		if g.MovingTo != "" {
			d.release = append(d.release, g.clone())
			continue // drain: serve nothing of it
		}
		if !serving {
			continue
		}
		for _, uuid := range st.GroupVolumes(name) {
			owned[uuid] = true
		}
		for _, iqn := range g.Targets {
			if t, ok := st.Targets[iqn]; ok {
				d.targets[iqn] = *t.clone()
			}
		}
		for _, v := range g.VIPs {
			if p, err := netip.ParsePrefix(v); err == nil {
				d.vips = append(d.vips, p)
			}
		}
	}
	for _, uuid := range sortedKeys(st.Volumes) {
		v := st.Volumes[uuid]
		if !slices.Contains(v.Replicas, a.Self) {
			continue
		}
		if v.Primary == a.Self && owned[uuid] {
			d.primary[uuid] = *v.clone()
		} else if v.Primary != a.Self {
			d.secondary[uuid] = *v.clone()
		}
		// Primary on paper but not serving (draining, no lease): closed,
		// so no write can reach it with this epoch.
	}
	return d
}

// Reconcile runs one pass. Release order is VIPs, targets, replicas; the
// acquire order is the reverse, so an initiator only reaches a portal whose
// LUNs are open as primary.
func (a *Agent) Reconcile(ctx context.Context) error {
	st := a.FSM.State()
	d := a.desired(st)
	var errs []error
	note := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	for _, p := range a.VIPs.Held() {
		if !slices.Contains(d.vips, p) {
			note(a.VIPs.Release(ctx, p))
		}
	}
	for _, iqn := range a.Targets.Serving() {
		if _, ok := d.targets[iqn]; !ok {
			note(a.Targets.Stop(ctx, iqn))
		}
	}
	opened := a.Replicas.Opened()
	for _, uuid := range sortedKeys(opened) {
		primary := opened[uuid]
		_, wantP := d.primary[uuid]
		_, wantS := d.secondary[uuid]
		if (!wantP && !wantS) || (primary && !wantP) {
			note(a.Replicas.Close(ctx, uuid))
		}
	}
	// Drained groups go back to the cluster at the epoch we hold.
	for _, g := range d.release {
		_, err := a.P.Propose(ctx, &Command{Kind: KindGroupRelease, GroupRelease: &GroupReleaseCmd{Group: g.Name, Node: a.Self, Epoch: g.Epoch}})
		if err != nil && !errors.Is(err, ErrNotOwner) {
			note(fmt.Errorf("cluster: release %s: %w", g.Name, err))
		}
	}
	opened = a.Replicas.Opened()
	for _, uuid := range sortedKeys(d.secondary) {
		if _, ok := opened[uuid]; !ok {
			note(a.Replicas.Open(ctx, d.secondary[uuid], false))
		}
	}
	for _, uuid := range sortedKeys(d.primary) {
		if p, ok := opened[uuid]; !ok || !p {
			note(a.Replicas.Open(ctx, d.primary[uuid], true))
		}
	}
	for _, iqn := range sortedKeys(d.targets) {
		t := d.targets[iqn]
		var vols []Volume
		for _, uuid := range slices.Sorted(mapsValues(t.LUNs)) {
			vols = append(vols, d.primary[uuid])
		}
		note(a.Targets.Serve(ctx, t, vols))
	}
	held := a.VIPs.Held()
	for _, p := range d.vips {
		if !slices.Contains(held, p) {
			note(a.VIPs.Acquire(ctx, p))
		}
	}
	return errors.Join(errs...)
}

func mapsValues[K comparable, V any](m map[K]V) func(func(V) bool) {
	return func(yield func(V) bool) {
		for _, v := range m {
			if !yield(v) {
				return
			}
		}
	}
}

// Demote stops serving at once: VIPs first, then targets (closing their
// sessions). The lease calls it; the next Reconcile keeps it that way
// while the lease is lost.
func (a *Agent) Demote(ctx context.Context, reason string) error {
	var errs []error
	for _, p := range a.VIPs.Held() {
		if err := a.VIPs.Release(ctx, p); err != nil {
			errs = append(errs, err)
		}
	}
	for _, iqn := range a.Targets.Serving() {
		if err := a.Targets.Stop(ctx, iqn); err != nil {
			errs = append(errs, err)
		}
	}
	if a.Logger != nil {
		a.Logger.Warn("cluster: demoted", "node", a.Self, "reason", reason)
	}
	return errors.Join(errs...)
}

// Run reconciles on every committed change and every Interval. The periodic
// pass is what notices a serving lease that became valid again (the lease has
// no channel), so it must be short: a takeover committed while the lease was
// momentarily lapsed would otherwise wait a whole interval before serving.
// A pass is an in-memory diff, so 100 ms costs little; a persistent error is
// logged when it changes, not on every pass.
func (a *Agent) Run(ctx context.Context) error {
	iv := a.Interval
	if iv <= 0 {
		iv = 100 * time.Millisecond
	}
	var lastErr string
	for {
		changed := a.FSM.Changed()
		err := a.Reconcile(ctx)
		if msg := fmt.Sprint(err); err != nil && msg != lastErr && a.Logger != nil {
			a.Logger.Warn("cluster: reconcile", "node", a.Self, "err", err)
		}
		lastErr = ""
		if err != nil {
			lastErr = err.Error()
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
		case <-time.After(iv):
		}
	}
}
