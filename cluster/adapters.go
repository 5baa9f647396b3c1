package cluster

import (
	"context"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hasan-storage/hasan/replication"
	"github.com/hasan-storage/hasan/target"
	"github.com/hasan-storage/hasan/target/scsi"
	"github.com/hasan-storage/hasan/vip"
)

// The real implementations of the agent's LocalVIPs, LocalTargets and
// LocalReplicas. Each is safe for concurrent use: the agent's reconcile
// loop and the lease's Demote may call at the same time.

// VIPManager is what VIPAdapter needs from vip.Manager (tests use a fake:
// the real one needs CAP_NET_ADMIN and a link).
type VIPManager interface {
	Acquire(ctx context.Context, v vip.VIP) error
	Release(ctx context.Context, v vip.VIP) error
	Tickle(ctx context.Context, conns []vip.TCPConn) error
}

var _ VIPManager = (*vip.Manager)(nil)

// vipAdopter is the optional part of a VIPManager that takes over an
// address already configured (vip.Manager.Adopt).
type vipAdopter interface {
	Adopt(ctx context.Context, v vip.VIP) error
}

var _ vipAdopter = (*vip.Manager)(nil)

// VIPAdapter implements LocalVIPs on a vip.Manager: every floating
// address goes on one link.
type VIPAdapter struct {
	Manager VIPManager
	Link    string
	Label   string // "" means vip.DefaultLabel
	// Conns, if set, returns extra initiator connections to tickle right
	// after a VIP is acquired. The agent itself tickles the connections
	// the cluster state records (Tickle below), so serve leaves it nil.
	Conns  func(addr netip.Prefix) []vip.TCPConn
	Logger *slog.Logger

	mu   sync.Mutex
	held map[netip.Prefix]bool
}

var (
	_ LocalVIPs = (*VIPAdapter)(nil)
	_ Tickler   = (*VIPAdapter)(nil)
)

// Tickle sends tickle ACKs to the recorded connections whose VIP this
// adapter holds; the others are skipped (another group's, or released).
func (a *VIPAdapter) Tickle(ctx context.Context, conns []InitiatorConn) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []vip.TCPConn
	for _, c := range conns {
		l, err1 := netip.ParseAddrPort(c.Local)
		r, err2 := netip.ParseAddrPort(c.Remote)
		if err1 != nil || err2 != nil {
			continue
		}
		for p := range a.held {
			if p.Addr() == l.Addr() {
				out = append(out, vip.TCPConn{Local: l, Remote: r})
				break
			}
		}
	}
	if len(out) == 0 {
		return nil
	}
	if err := a.Manager.Tickle(ctx, out); err != nil {
		return fmt.Errorf("cluster: tickle %d connections: %w", len(out), err)
	}
	return nil
}

func (a *VIPAdapter) vip(p netip.Prefix) vip.VIP {
	return vip.VIP{Addr: p, Link: a.Link, Label: a.Label}
}

// Acquire adds the address (probe, add, announce) and then tickles the
// connections recorded for it. A failed tickle is logged, not returned:
// the address is held and initiators still recover through their own
// timeouts.
func (a *VIPAdapter) Acquire(ctx context.Context, p netip.Prefix) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	err := a.Manager.Acquire(ctx, a.vip(p))
	if ad, ok := a.Manager.(vipAdopter); ok && errors.Is(err, vip.ErrForeignAddress) {
		// The address is already on our link but this Manager did not add
		// it: left by this node's previous run (the agent acquires only
		// what the committed state says this node owns, under the lease).
		// Take it over without a probe, which would not see our own
		// kernel anyway.
		logOr(a.Logger).Warn("cluster: adopting a VIP already configured here", "vip", p)
		err = ad.Adopt(ctx, a.vip(p))
	}
	if err != nil {
		return fmt.Errorf("cluster: acquire vip %s: %w", p, err)
	}
	if a.held == nil {
		a.held = map[netip.Prefix]bool{}
	}
	a.held[p] = true
	if a.Conns != nil {
		if conns := a.Conns(p); len(conns) > 0 {
			if err := a.Manager.Tickle(ctx, conns); err != nil {
				logOr(a.Logger).Warn("cluster: tickle after acquire", "vip", p, "conns", len(conns), "err", err)
			}
		}
	}
	return nil
}

// Release removes the address. On failure it stays in Held so the next
// pass (or Demote) tries again.
func (a *VIPAdapter) Release(ctx context.Context, p netip.Prefix) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.Manager.Release(ctx, a.vip(p)); err != nil {
		return fmt.Errorf("cluster: release vip %s: %w", p, err)
	}
	delete(a.held, p)
	return nil
}

// Held lists the addresses acquired and not released, sorted.
func (a *VIPAdapter) Held() []netip.Prefix {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := slices.Collect(maps.Keys(a.held))
	slices.SortFunc(out, func(x, y netip.Prefix) int { return strings.Compare(x.String(), y.String()) })
	return out
}

// ReplicaAdapter implements LocalReplicas: a primary is a
// replication.Volume opened with the committed epoch (through Membership on
// the cluster state); a secondary is a Local registered with the node's
// replica Server.
type ReplicaAdapter struct {
	Self string
	// Dir holds the replicas' files (<uuid>.img, .meta, .al).
	Dir    string
	Server *replication.Server
	// TLS is the client configuration for primaries dialling replicas
	// (the cluster's mutual-TLS configuration does).
	TLS *tls.Config
	FSM *FSM
	P   Proposer
	// Volume tunes OpenVolume (tick, resync rate); Self, Peers, Local,
	// Membership, TLS and Logger are set here, and AckTimeoutTicks from
	// AckTimeout unless Volume sets it.
	Volume replication.VolumeConfig
	// AckTimeout is how long a primary waits for a replica that leaves a
	// message unanswered before it drops it from the ISR; writes stall
	// for that long when a replica dies silently (power loss, cut link).
	// Default DefaultReplicaAckTimeout.
	AckTimeout time.Duration
	// Silent, if set, reports a replica's node that this node heard from
	// before but not within the failure timeout (serve: Node.LastSeen).
	// A new primary does not dial such a node (and gives up a dial when
	// the node falls silent): the replica is reported down at once and
	// its removal from the ISR starts, instead of every write waiting for
	// the dial timeout or AckTimeout first. Without it, a primary that
	// reopens after a Raft election (its lease lapsed with the old leader,
	// which was also the replica) stalled for PeerWait + AckTimeout more.
	Silent func(node string) bool
	// PeerWait bounds how long a new primary waits, before it serves, for
	// the replicas in the ISR to finish their handshake; default
	// DefaultPeerWait, negative: no wait. A write accepted before an ISR
	// member is up makes the primary drop that member from the ISR and
	// resync it, which is what a planned move must avoid.
	PeerWait time.Duration
	Logger   *slog.Logger

	mu   sync.Mutex
	open map[string]*openReplica
}

// DefaultReplicaAckTimeout is a cluster node's replica ack timeout. A
// silently dead replica stalls the writes of its primary for this long
// (plus one replication tick and the isr-remove commit) before the ISR
// shrinks, so with the 2 s failover budget it must stay well under 2 s,
// also when the dead replica was the Raft leader and the commit waits for
// an election (~0.5-1.3 s, overlapping the timeout). Shorter makes a
// replica that is merely slow for a moment (an fsync on a loaded host) fall
// out of the ISR and resync. Initiators see a pause, not an error: their
// command timeouts are tens of seconds.
const DefaultReplicaAckTimeout = time.Second

// AckTimeoutTicks converts an ack timeout into replication ticks of tick
// (replication's default tick when zero), rounding up, at least 1.
func AckTimeoutTicks(timeout, tick time.Duration) int {
	if tick <= 0 {
		tick = replicationDefaultTick
	}
	if timeout <= 0 {
		timeout = DefaultReplicaAckTimeout
	}
	return max(1, int((timeout+tick-1)/tick))
}

// replicationDefaultTick is replication.VolumeConfig's default
// TickInterval.
const replicationDefaultTick = 100 * time.Millisecond

// DefaultPeerWait: a live replica on the LAN completes its handshake in
// tens of milliseconds; a dead one (not yet out of the ISR) costs at most
// this much of the planned-move budget.
const DefaultPeerWait = 200 * time.Millisecond

type openReplica struct {
	primary bool
	vol     *replication.Volume // primary only
	epoch   uint64
	// Primary only: the replica set the session was opened with, and the
	// backend the target's LUN uses, which stays the same when a changed
	// replica set reopens the session.
	replicas []string
	gate     *gatedBackend
}

var _ LocalReplicas = (*ReplicaAdapter)(nil)

// Open opens v's local replica, creating its files if this node has none
// (see openLocal).
func (a *ReplicaAdapter) Open(ctx context.Context, v Volume, primary bool) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.open == nil {
		a.open = map[string]*openReplica{}
	}
	cur := a.open[v.UUID]
	if cur != nil && cur.primary == primary {
		return nil
	}
	var (
		local *replication.Local
		err   error
	)
	switch {
	case cur != nil && cur.primary: // demoted to secondary
		if err := cur.vol.Close(); err != nil {
			logOr(a.Logger).Warn("cluster: close primary", "volume", v.UUID, "err", err)
		}
		cur.gate.close()
		delete(a.open, v.UUID)
	case cur != nil: // promoted: take the replica back from the server
		local, err = a.Server.RemoveVolume(v.UUID)
		delete(a.open, v.UUID)
		if err != nil {
			return fmt.Errorf("cluster: promote %s: %w", v.UUID, err)
		}
	}
	if local == nil {
		if local, err = a.openLocal(v); err != nil {
			return err
		}
	}
	if !primary {
		if err := a.Server.AddVolume(local); err != nil {
			local.Close()
			return fmt.Errorf("cluster: serve replica %s: %w", v.UUID, err)
		}
		a.open[v.UUID] = &openReplica{epoch: v.Epoch}
		return nil
	}
	vol, err := a.openPrimary(ctx, v, local)
	if err != nil {
		return err
	}
	a.open[v.UUID] = &openReplica{primary: true, vol: vol, epoch: v.Epoch,
		replicas: slices.Clone(v.Replicas), gate: &gatedBackend{vol: vol}}
	return nil
}

// openPrimary opens the replication session of v's primary over local
// (closed on failure), with v's replica set, and waits for its ISR peers.
func (a *ReplicaAdapter) openPrimary(ctx context.Context, v Volume, local *replication.Local) (*replication.Volume, error) {
	if err := forgetFormerPeers(local, v.Replicas); err != nil {
		local.Close()
		return nil, fmt.Errorf("cluster: open primary %s: %w", v.UUID, err)
	}
	cfg := a.Volume
	cfg.Self, cfg.Local, cfg.TLS = a.Self, local, a.TLS
	if cfg.AckTimeoutTicks <= 0 {
		cfg.AckTimeoutTicks = AckTimeoutTicks(a.AckTimeout, cfg.TickInterval)
	}
	cfg.Membership = &Membership{P: a.P, FSM: a.FSM}
	cfg.Logger = logOr(a.Logger)
	if cfg.OnUnhealthy == nil {
		// The local disk failed under a primary: raise an alert and move
		// the group away by a planned move (no fence: the node is up and
		// answers, only its copy is gone).
		uuid, log := v.UUID, logOr(a.Logger)
		cfg.OnUnhealthy = func(err error) {
			log.Error("cluster: primary disk failed", "volume", uuid, "err", err)
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), DefaultProposeTimeout)
				defer cancel()
				if err := MoveOffFailedDisk(ctx, a.P, a.FSM, a.Self, uuid, err); err != nil {
					log.Error("cluster: moving the group off the failed disk", "volume", uuid, "err", err)
				}
			}()
		}
	}
	cfg.Peers = map[string]string{}
	a.FSM.Read(func(s *State) {
		for _, r := range v.Replicas {
			if r == a.Self {
				continue
			}
			// A peer without a data address is dialled at "" and fails:
			// it is treated like any unreachable replica.
			if n, ok := s.Nodes[r]; ok {
				cfg.Peers[r] = n.DataAddr
			} else {
				cfg.Peers[r] = ""
			}
		}
	})
	if a.Silent != nil && cfg.Dial == nil {
		cfg.Dial = a.silentAwareDial(cfg.Peers)
	}
	vol, err := replication.OpenVolume(ctx, cfg)
	if err != nil {
		local.Close()
		return nil, fmt.Errorf("cluster: open primary %s: %w", v.UUID, err)
	}
	up, waited := a.waitPeers(ctx, vol)
	logOr(a.Logger).Info("cluster: opened primary", "volume", v.UUID, "epoch", v.Epoch, "peers", len(cfg.Peers),
		"isr_up", up, "waited", waited)
	return vol, nil
}

// openLocal opens v's replica files. Files it creates start at v's
// creation generation: all zeros like every replica created with the
// volume, so the volume's first primary takes them in sync instead of
// copying the whole volume. Files created later (a replaced disk, a node
// that was down at creation) start there too, safely: replication takes a
// fresh replica as in sync only from a primary that has not written yet,
// and gives it a full sync otherwise. Existing files keep their own
// generation.
func (a *ReplicaAdapter) openLocal(v Volume) (*replication.Local, error) {
	var gen uint64
	_, err := replication.LoadLocalMeta(a.Dir, v.UUID)
	if errors.Is(err, fs.ErrNotExist) {
		gen = v.CreationGen
		logOr(a.Logger).Info("cluster: creating replica", "volume", v.UUID, "size", v.Size, "creation_gen", gen)
	}
	local, err := replication.OpenLocal(replication.LocalOptions{Dir: a.Dir, Volume: v.UUID, Size: v.Size, Gen: gen})
	if err != nil {
		return nil, fmt.Errorf("cluster: open replica %s: %w", v.UUID, err)
	}
	return local, nil
}

// waitPeers polls the new primary until every ISR member is up (or the
// wait is over) and reports whether they all were.
func (a *ReplicaAdapter) waitPeers(ctx context.Context, vol *replication.Volume) (bool, time.Duration) {
	wait := a.PeerWait
	if wait == 0 {
		wait = DefaultPeerWait
	}
	start := time.Now()
	if wait < 0 {
		return false, 0
	}
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	for {
		st, err := vol.Status(ctx)
		if err != nil {
			return false, time.Since(start)
		}
		up := true
		for _, p := range st {
			if p.InISR && (p.Mode != "up" || p.Removing) {
				up = false
			}
		}
		if up {
			return true, time.Since(start)
		}
		select {
		case <-ctx.Done():
			return false, time.Since(start)
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// silentAwareDial dials replicas like replication's default dialer, but
// fails at once for a node that Silent reports, and abandons a dial when
// its node falls silent meanwhile (a SYN to a powered-off host is never
// answered; the dial would hold for its whole timeout).
func (a *ReplicaAdapter) silentAwareDial(peers map[string]string) func(ctx context.Context, addr string) (net.Conn, error) {
	byAddr := map[string]string{}
	for id, addr := range peers {
		byAddr[addr] = id
	}
	d := &net.Dialer{Timeout: 3 * time.Second, KeepAlive: 5 * time.Second}
	return func(ctx context.Context, addr string) (net.Conn, error) {
		id, ok := byAddr[addr]
		if !ok {
			return d.DialContext(ctx, "tcp", addr)
		}
		if a.Silent(id) {
			return nil, fmt.Errorf("cluster: replica node %s is silent; not dialling it", id)
		}
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		go func() {
			t := time.NewTicker(50 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
					if a.Silent(id) {
						cancel()
						return
					}
				}
			}
		}()
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("cluster: dial replica node %s: %w", id, err)
		}
		return c, nil
	}
}

// MoveOffFailedDisk reacts to a failed local disk under self's primary of
// volume: an alert event, then a planned move of the volume's group, if
// self owns it, to the best node in its ISR (the controller retargets the
// grant if that node is not alive).
func MoveOffFailedDisk(ctx context.Context, p Proposer, fsm *FSM, self, volume string, cause error) error {
	var errs []error
	_, err := p.Propose(ctx, &Command{Kind: KindEvent, Event: &EventCmd{Event: Event{
		Severity: SeverityAlert, Kind: "disk-failed", Node: self,
		Message: fmt.Sprintf("local disk of primary %s failed: %v", volume, cause)}}})
	errs = append(errs, err)
	st := fsm.State()
	for _, name := range st.OwnedGroups(self) {
		g := st.Groups[name]
		if g.MovingTo != "" || !slices.Contains(st.GroupVolumes(name), volume) {
			continue
		}
		cs := Candidates(st, name, self, func(string) bool { return true })
		if len(cs) == 0 {
			errs = append(errs, fmt.Errorf("cluster: no node can take group %s off the failed disk", name))
			continue
		}
		_, err := p.Propose(ctx, &Command{Kind: KindGroupMove, GroupMove: &GroupMoveCmd{Group: name, Node: cs[0]}})
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Close closes a primary (pending requests fail with ErrClosed) or stops
// serving a secondary.
func (a *ReplicaAdapter) Close(ctx context.Context, uuid string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	cur := a.open[uuid]
	if cur == nil {
		return nil
	}
	delete(a.open, uuid)
	if cur.primary {
		err := cur.vol.Close()
		cur.gate.close()
		if err != nil {
			return fmt.Errorf("cluster: close primary %s: %w", uuid, err)
		}
		return nil
	}
	l, err := a.Server.RemoveVolume(uuid)
	if errors.Is(err, replication.ErrUnknownVolume) {
		return nil // the server is closed, and closed it with itself
	}
	if err != nil {
		return fmt.Errorf("cluster: stop replica %s: %w", uuid, err)
	}
	return l.Close()
}

// Opened maps open volumes to "is primary".
func (a *ReplicaAdapter) Opened() map[string]bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make(map[string]bool, len(a.open))
	for k, o := range a.open {
		out[k] = o.primary
	}
	return out
}

// Backend returns the I/O path of the open primary of a volume and the
// epoch it was opened at, or nil. Unlike the Volume that Primary returns,
// it stays the same across SetReplicas, so a LUN built on it keeps
// serving while the replication session under it is reopened.
func (a *ReplicaAdapter) Backend(uuid string) (scsi.Backend, uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if o := a.open[uuid]; o != nil && o.primary {
		return o.gate, o.epoch
	}
	return nil, 0
}

// Primary returns the open primary of a volume and the epoch it was
// opened at, or nil.
func (a *ReplicaAdapter) Primary(uuid string) (*replication.Volume, uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if o := a.open[uuid]; o != nil && o.primary {
		return o.vol, o.epoch
	}
	return nil, 0
}

// CloseAll closes every replica (node shutdown).
func (a *ReplicaAdapter) CloseAll(ctx context.Context) error {
	var errs []error
	for uuid := range a.Opened() {
		errs = append(errs, a.Close(ctx, uuid))
	}
	return errors.Join(errs...)
}

// TargetAdapter implements LocalTargets on a target.Server. Each LUN is a
// scsi.LogicalUnit over the volume's open primary, identified by the
// volume UUID and keeping its persistent reservations in the cluster
// state (loaded when the LU is built, that is on acquire).
type TargetAdapter struct {
	Server   *target.Server
	Replicas interface {
		Primary(uuid string) (*replication.Volume, uint64)
	}
	FSM *FSM
	P   Proposer
	// PortGroups are the ALUA target port groups of every LU; nil is one
	// active/optimized group holding relative port 1 (the only port the
	// target numbers). Only the owner exports a LUN, so its one path is
	// always active.
	PortGroups []scsi.PortGroup
	Logger     *slog.Logger

	mu      sync.Mutex
	serving map[string]*servedTarget
}

type servedTarget struct {
	cfg  target.TargetConfig
	luns map[uint64]servedLUN
}

type servedLUN struct {
	uuid  string
	be    scsi.Backend
	epoch uint64
}

// backend is the I/O path of uuid's open primary: the ReplicaAdapter's
// Backend, which survives a replica set change, when Replicas has it.
func (a *TargetAdapter) backend(uuid string) (scsi.Backend, uint64) {
	if b, ok := a.Replicas.(interface {
		Backend(uuid string) (scsi.Backend, uint64)
	}); ok {
		return b.Backend(uuid)
	}
	if vol, epoch := a.Replicas.Primary(uuid); vol != nil {
		return vol, epoch
	}
	return nil, 0
}

var _ LocalTargets = (*TargetAdapter)(nil)

// VolumeID turns a volume UUID (8-4-4-4-12 lower-case hex) into the LU's
// 16-byte identity.
func VolumeID(uuid string) ([16]byte, error) {
	var id [16]byte
	b, err := hex.DecodeString(strings.ReplaceAll(uuid, "-", ""))
	if err != nil || len(b) != 16 {
		return id, fmt.Errorf("cluster: volume uuid %q: %w", uuid, ErrInvalid)
	}
	copy(id[:], b)
	return id, nil
}

func targetConfig(t Target) target.TargetConfig {
	tc := target.TargetConfig{Name: strings.ToLower(t.IQN), Alias: t.Alias, AllowedInitiators: slices.Clone(t.ACL)}
	if t.CHAP != nil {
		tc.CHAP = &target.CHAP{User: t.CHAP.User, Secret: t.CHAP.Secret.Reveal()}
	}
	if t.MutualCHAP != nil {
		tc.MutualCHAP = &target.CHAP{User: t.MutualCHAP.User, Secret: t.MutualCHAP.Secret.Reveal()}
	}
	return tc
}

func sameTargetConfig(a, b target.TargetConfig) bool {
	eqCHAP := func(x, y *target.CHAP) bool {
		return (x == nil) == (y == nil) && (x == nil || *x == *y)
	}
	return a.Name == b.Name && a.Alias == b.Alias && slices.Equal(a.AllowedInitiators, b.AllowedInitiators) &&
		eqCHAP(a.CHAP, b.CHAP) && eqCHAP(a.MutualCHAP, b.MutualCHAP)
}

// Serve exports t, or brings an exported t in line: changed CHAP/ACL are
// applied to new logins, LUNs no longer listed are removed (waiting for
// their commands), LUNs whose primary was reopened are rebuilt. A LUN
// whose volume is not open as primary here is not exported, and the error
// says so; the others are.
func (a *TargetAdapter) Serve(ctx context.Context, t Target, _ []Volume) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.serving == nil {
		a.serving = map[string]*servedTarget{}
	}
	tc := targetConfig(t)
	cur := a.serving[tc.Name]
	if cur == nil {
		// A target is exported only once every LUN can be attached: an
		// initiator that logs in to a target without its LUNs gets
		// LOGICAL UNIT NOT SUPPORTED for its I/O, which it reports as an
		// error, where a refused login is simply retried.
		for _, lun := range slices.Sorted(maps.Keys(t.LUNs)) {
			if vol, _ := a.Replicas.Primary(t.LUNs[lun]); vol == nil {
				return fmt.Errorf("cluster: serve %s: lun %d: volume %s is not open as primary here yet", tc.Name, lun, t.LUNs[lun])
			}
		}
		if err := a.Server.AddTarget(tc); err != nil {
			return fmt.Errorf("cluster: serve %s: %w", tc.Name, err)
		}
		cur = &servedTarget{cfg: tc, luns: map[uint64]servedLUN{}}
		a.serving[tc.Name] = cur
		logOr(a.Logger).Info("cluster: target exported", "target", tc.Name)
	} else if !sameTargetConfig(cur.cfg, tc) {
		if err := a.Server.UpdateTarget(tc); err != nil {
			return fmt.Errorf("cluster: update %s: %w", tc.Name, err)
		}
		cur.cfg = tc
	}
	var errs []error
	for _, lun := range slices.Sorted(maps.Keys(cur.luns)) {
		have := cur.luns[lun]
		be, epoch := a.backend(have.uuid)
		if t.LUNs[lun] == have.uuid && be == have.be && epoch == have.epoch {
			continue
		}
		if err := a.Server.RemoveLUN(ctx, tc.Name, lun); err != nil && !errors.Is(err, target.ErrLUNNotFound) {
			errs = append(errs, fmt.Errorf("cluster: %s lun %d: %w", tc.Name, lun, err))
			continue
		}
		delete(cur.luns, lun)
	}
	for _, lun := range slices.Sorted(maps.Keys(t.LUNs)) {
		if _, ok := cur.luns[lun]; ok {
			continue
		}
		uuid := t.LUNs[lun]
		if err := a.addLUN(tc.Name, lun, uuid, cur); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (a *TargetAdapter) addLUN(name string, lun uint64, uuid string, cur *servedTarget) error {
	be, epoch := a.backend(uuid)
	if be == nil {
		return fmt.Errorf("cluster: %s lun %d: volume %s is not open as primary here", name, lun, uuid)
	}
	var v *Volume
	a.FSM.Read(func(s *State) {
		if x, ok := s.Volumes[uuid]; ok {
			v = x.clone()
		}
	})
	if v == nil {
		return fmt.Errorf("cluster: %s lun %d: %w: volume %s", name, lun, ErrNotFound, uuid)
	}
	id, err := VolumeID(uuid)
	if err != nil {
		return err
	}
	lu, err := scsi.New(scsi.Config{
		VolumeID: id, BlockSize: v.BlockSize, Thin: v.Thin, Backend: be,
		PR:         &PRStore{P: a.P, FSM: a.FSM, Volume: uuid},
		PortGroups: a.PortGroups,
		Logger:     logOr(a.Logger).With("volume", uuid),
	})
	if err != nil {
		return fmt.Errorf("cluster: %s lun %d: %w", name, lun, err)
	}
	if err := a.Server.AddLUN(name, lun, lu); err != nil {
		return fmt.Errorf("cluster: %s lun %d: %w", name, lun, err)
	}
	cur.luns[lun] = servedLUN{uuid: uuid, be: be, epoch: epoch}
	return nil
}

// Stop removes the target: its sessions are closed and it returns once no
// command can reach its LUNs (or ctx ends).
func (a *TargetAdapter) Stop(ctx context.Context, iqn string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	name := strings.ToLower(iqn)
	if _, ok := a.serving[name]; !ok {
		return nil
	}
	err := a.Server.RemoveTarget(ctx, name)
	if err != nil && !errors.Is(err, target.ErrTargetNotFound) {
		// Keep it listed: the next pass or Demote tries again.
		return fmt.Errorf("cluster: stop %s: %w", name, err)
	}
	delete(a.serving, name)
	logOr(a.Logger).Info("cluster: target stopped", "target", name)
	return nil
}

var _ LocalConns = (*TargetAdapter)(nil)

// Conns lists the TCP connections of the server's normal (not discovery)
// sessions, in canonical "IP:port" form.
func (a *TargetAdapter) Conns() []InitiatorConn {
	var out []InitiatorConn
	for _, si := range a.Server.Sessions() {
		if si.Discovery {
			continue
		}
		l, err1 := netip.ParseAddrPort(si.LocalAddr)
		r, err2 := netip.ParseAddrPort(si.RemoteAddr)
		if err1 != nil || err2 != nil {
			continue
		}
		l = netip.AddrPortFrom(l.Addr().Unmap(), l.Port())
		r = netip.AddrPortFrom(r.Addr().Unmap(), r.Port())
		out = append(out, InitiatorConn{Local: l.String(), Remote: r.String()})
	}
	return out
}

// Serving lists the exported targets.
func (a *TargetAdapter) Serving() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Sorted(maps.Keys(a.serving))
}

func logOr(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.New(slog.DiscardHandler)
	}
	return l
}
