package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
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

// Tickler sends tickle ACKs to initiator connections whose local address
// is a VIP this node holds (vip.Manager.Tickle). A LocalVIPs that also
// implements it gets the group's recorded connections after each
// acquisition.
type Tickler interface {
	Tickle(ctx context.Context, conns []InitiatorConn) error
}

// LocalConns lists the TCP connections of this node's iSCSI sessions
// (target.Server.Sessions), so the owner can record those on its VIPs.
type LocalConns interface {
	Conns() []InitiatorConn
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
// release. Each pass is a plain diff, and retries happen on the next pass.
// After each acquisition it tickles the initiator connections the state
// records for the group, and as owner it records its own.
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
	// Sessions, if set, is where the owner reads its initiator connections
	// to record them in the state (group-conns).
	Sessions LocalConns
	// ConnsInterval is the least time between two group-conns proposals
	// for one group; default DefaultConnsInterval.
	ConnsInterval time.Duration
	Logger        *slog.Logger

	mu       sync.Mutex
	tickled  map[string]uint64    // group -> epoch whose acquisition was tickled
	reported map[string]time.Time // group -> last group-conns proposal
}

// DefaultConnsInterval rate-limits group-conns proposals per group. A new
// login is recorded within about this long; one missed by a takeover is
// found by the initiator's own timeouts, as without tickles.
const DefaultConnsInterval = 500 * time.Millisecond

var _ Demoter = (*Agent)(nil)

type desired struct {
	primary, secondary map[string]Volume
	targets            map[string]Target
	vips               []netip.Prefix
	release            []*Group // groups to hand back after draining
	served             []*Group // owned groups served here
}

func (a *Agent) desired(st *State) desired {
	d := desired{primary: map[string]Volume{}, secondary: map[string]Volume{}, targets: map[string]Target{}}
	serving := a.Serving == nil || a.Serving()
	owned := map[string]bool{}    // volumes of groups this node serves
	handover := map[string]bool{} // volumes of groups this node is releasing
	for _, name := range sortedKeys(st.Groups) {
		g := st.Groups[name]
		if g.Owner == "" {
			// Released (a planned move between release and grant): our
			// replicas wait as secondaries for whoever is granted it.
			for _, uuid := range st.GroupVolumes(name) {
				handover[uuid] = true
			}
		}
		if g.Owner != a.Self {
			continue
		}
		if g.MovingTo != "" {
			d.release = append(d.release, g.clone())
			for _, uuid := range st.GroupVolumes(name) {
				handover[uuid] = true
			}
			continue // drain: serve nothing of it
		}
		if !serving {
			continue
		}
		d.served = append(d.served, g.clone())
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
		} else if v.Primary != a.Self || handover[uuid] {
			// Handing over: the closed primary comes back at once as a
			// secondary, registered before the release, so the new primary
			// finds it and keeps it in the ISR.
			d.secondary[uuid] = *v.clone()
		}
		// Primary on paper but not serving (no lease): closed, so no write
		// can reach it with this epoch.
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
	// A group about to be handed over records its latest connections
	// first, rate limit or not: the new owner tickles exactly those, and
	// once the VIP is gone the sessions' own close never reaches the
	// initiators.
	note(a.reportConns(ctx, d.release, true))
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
	opened = a.Replicas.Opened()
	for _, uuid := range sortedKeys(d.secondary) {
		if p, ok := opened[uuid]; !ok || p {
			note(a.Replicas.Open(ctx, d.secondary[uuid], false))
		}
	}
	// Drained groups go back to the cluster at the epoch we hold, once
	// their replicas wait here as secondaries. A replica that failed to
	// open does not hold the release back: the new primary then resyncs
	// it, which is slower but safe.
	for _, g := range d.release {
		_, err := a.P.Propose(ctx, &Command{Kind: KindGroupRelease, GroupRelease: &GroupReleaseCmd{Group: g.Name, Node: a.Self, Epoch: g.Epoch}})
		if err != nil && !errors.Is(err, ErrNotOwner) {
			note(fmt.Errorf("cluster: release %s: %w", g.Name, err))
		}
	}
	for _, uuid := range sortedKeys(d.primary) {
		if p, ok := opened[uuid]; !ok || !p {
			note(a.Replicas.Open(ctx, d.primary[uuid], true))
		}
	}
	// A primary already open learns a changed replica set (a replaced,
	// added or removed replica) here; opened just now, it has it.
	if rs, ok := a.Replicas.(ReplicaSets); ok {
		for _, uuid := range sortedKeys(d.primary) {
			if opened[uuid] {
				note(rs.SetReplicas(ctx, d.primary[uuid]))
			}
		}
	}
	served := map[string]bool{}
	for _, iqn := range sortedKeys(d.targets) {
		t := d.targets[iqn]
		var vols []Volume
		for _, uuid := range slices.Sorted(mapsValues(t.LUNs)) {
			vols = append(vols, d.primary[uuid])
		}
		err := a.Targets.Serve(ctx, t, vols)
		note(err)
		served[iqn] = err == nil
	}
	held := a.VIPs.Held()
	for _, p := range d.vips {
		if !slices.Contains(held, p) {
			if err := a.VIPs.Acquire(ctx, p); err != nil {
				note(err)
			} else {
				held = append(held, p)
			}
		}
	}
	a.tickle(ctx, d.served, served, held)
	note(a.reportConns(ctx, d.served, false))
	return errors.Join(errs...)
}

// tickle sends, once per acquisition (group epoch), tickle ACKs to the
// connections recorded for each served group, as soon as all its VIPs are
// up and all its targets served: the initiators' reconnects must find a
// portal that answers.
func (a *Agent) tickle(ctx context.Context, groups []*Group, served map[string]bool, held []netip.Prefix) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.tickled == nil {
		a.tickled = map[string]uint64{}
	}
	tk, _ := a.VIPs.(Tickler)
	for _, g := range groups {
		if a.tickled[g.Name] == g.Epoch {
			continue
		}
		ready := true
		for _, iqn := range g.Targets {
			ready = ready && served[iqn]
		}
		for _, v := range g.VIPs {
			p, err := netip.ParsePrefix(v)
			ready = ready && err == nil && slices.Contains(held, p)
		}
		if !ready {
			continue
		}
		a.tickled[g.Name] = g.Epoch
		if tk == nil || len(g.Conns) == 0 {
			continue
		}
		// Best effort: an initiator that misses it recovers through its
		// own timeouts, so a failure is logged, not retried.
		if err := tk.Tickle(ctx, slices.Clone(g.Conns)); err != nil {
			logOr(a.Logger).Warn("cluster: tickle", "group", g.Name, "epoch", g.Epoch, "conns", len(g.Conns), "err", err)
		} else {
			logOr(a.Logger).Info("cluster: tickled initiators", "group", g.Name, "epoch", g.Epoch, "conns", len(g.Conns))
		}
	}
	for name := range a.tickled {
		if !slices.ContainsFunc(groups, func(g *Group) bool { return g.Name == name }) {
			delete(a.tickled, name)
		}
	}
}

// reportConns records, for each served group already tickled at its
// epoch, the session connections that arrived on its VIPs, when they
// differ from the state's and the group's rate limit allows (or force
// says to ignore it). Reporting before the tickle would overwrite the
// previous owner's list with an empty one.
func (a *Agent) reportConns(ctx context.Context, groups []*Group, force bool) error {
	if a.Sessions == nil {
		return nil
	}
	iv := a.ConnsInterval
	if iv <= 0 {
		iv = DefaultConnsInterval
	}
	var all []InitiatorConn
	got := false
	var errs []error
	for _, g := range groups {
		a.mu.Lock()
		ready := a.tickled[g.Name] == g.Epoch
		last := a.reported[g.Name]
		a.mu.Unlock()
		if !ready || (!force && time.Since(last) < iv) {
			continue
		}
		if !got {
			all, got = a.Sessions.Conns(), true
		}
		var mine []InitiatorConn
		for _, c := range all {
			if g.hasVIP(c.Local) && !slices.Contains(mine, c) {
				mine = append(mine, c)
			}
		}
		slices.SortFunc(mine, compareConns)
		if len(mine) > MaxGroupConns {
			mine = mine[:MaxGroupConns]
		}
		if slices.Equal(mine, g.Conns) {
			continue
		}
		a.mu.Lock()
		if a.reported == nil {
			a.reported = map[string]time.Time{}
		}
		a.reported[g.Name] = time.Now()
		a.mu.Unlock()
		pctx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := a.P.Propose(pctx, &Command{Kind: KindGroupConns, GroupConns: &GroupConnsCmd{
			Group: g.Name, Node: a.Self, Epoch: g.Epoch, Conns: mine}})
		cancel()
		if err != nil && !errors.Is(err, ErrNotOwner) {
			errs = append(errs, fmt.Errorf("cluster: record connections of %s: %w", g.Name, err))
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

// HandOver moves every group this node owns to the best peer that alive
// reports alive (planned moves, as on a graceful stop) and waits until
// each is granted to another node, or ctx ends. The agent must keep
// running: it is what drains and releases. While a live storage peer
// exists but is not eligible yet (back in the ISR after a resync), it
// waits for it; with no live storage peer the group stays, with a warning.
func (a *Agent) HandOver(ctx context.Context, alive func(node string) bool) error {
	log := logOr(a.Logger)
	failed := map[string]error{} // the last failed move proposal per group
	proposed := map[string]bool{}
	warned := map[string]bool{}
	errs := func() []error {
		var out []error
		for _, name := range sortedKeys(failed) {
			out = append(out, failed[name])
		}
		return out
	}
	for {
		changed := a.FSM.Changed()
		st := a.FSM.State()
		var left []string
		for _, name := range sortedKeys(st.Groups) {
			g := st.Groups[name]
			switch {
			case g.Owner == a.Self && g.MovingTo == "":
				// A peer may be briefly ineligible (resyncing back into
				// the ISR): keep looking until ctx ends.
				cs := Candidates(st, name, a.Self, alive)
				if len(cs) == 0 {
					peer := false
					for id, n := range st.Nodes {
						peer = peer || (id != a.Self && n.Role == RoleStorage && alive(id))
					}
					if !peer {
						// Nobody to wait for: the group fails over the
						// unplanned way, if at all.
						if !warned[name] {
							warned[name] = true
							log.Warn("cluster: no live storage peer; the group stays", "group", name)
						}
						continue
					}
					if !warned[name] {
						warned[name] = true
						log.Warn("cluster: no peer can take this group yet", "group", name, "why", a.ineligible(st, name, alive))
					}
					left = append(left, name)
					continue
				}
				_, err := a.P.Propose(ctx, &Command{Kind: KindGroupMove, GroupMove: &GroupMoveCmd{Group: name, Node: cs[0]}})
				if err != nil && ctx.Err() == nil {
					failed[name] = fmt.Errorf("cluster: hand over %s to %s: %w", name, cs[0], err)
				} else if err == nil {
					delete(failed, name)
					log.Info("cluster: handing group over", "group", name, "to", cs[0])
				}
				proposed[name] = true
				left = append(left, name)
			case g.Owner == a.Self, g.Owner == "" && proposed[name]:
				// Granted, not only released: if this node leads, its
				// controller makes the grant, and stopping in between would
				// leave the group unowned until a new leader is elected.
				left = append(left, name)
			}
		}
		if len(left) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return errors.Join(append(errs(), fmt.Errorf("cluster: groups %v not handed over: %w", left, ctx.Err()))...)
		case <-changed:
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// ineligible says why no peer can own group, for the operator.
func (a *Agent) ineligible(st *State, group string, alive func(string) bool) []string {
	var why []string
	for _, id := range sortedKeys(st.Nodes) {
		if id == a.Self || st.Nodes[id].Role != RoleStorage {
			continue
		}
		if err := st.canOwn(group, id); err != nil {
			why = append(why, err.Error())
		} else if !alive(id) {
			why = append(why, id+" not heard from")
		}
	}
	return why
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
