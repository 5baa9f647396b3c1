package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/hasan-storage/hasan/fencing"
)

// Controller defaults. Detection is sub-second so that detect + fence +
// commit + VIP fits the 2 s budget with IPMI's usual fence times.
const (
	DefaultFailureTimeout = 700 * time.Millisecond
	DefaultTickInterval   = 50 * time.Millisecond
	DefaultFenceRetryMin  = 500 * time.Millisecond
	DefaultFenceRetryMax  = 30 * time.Second
	DefaultFenceTimeout   = 20 * time.Second
	DefaultProposeTimeout = 5 * time.Second
	DefaultMoveTimeout    = 10 * time.Second
)

// ControllerConfig tunes the controller. The zero value uses the defaults.
type ControllerConfig struct {
	// Self is the leader's own node id: it is alive by definition.
	Self string
	// FailureTimeout: a node whose last heartbeat is older is failed.
	FailureTimeout time.Duration
	// TickInterval: how often the controller re-evaluates without input.
	TickInterval time.Duration
	// FenceRetryMin and FenceRetryMax bound the backoff between fence
	// attempts after a failure.
	FenceRetryMin, FenceRetryMax time.Duration
	// FenceTimeout bounds one fence attempt (every level).
	FenceTimeout time.Duration
	// MoveTimeout bounds a planned move: an owner that has not released
	// the group by then keeps it, and the move is cancelled with an alert.
	MoveTimeout time.Duration
	// NoLeaderPlacement keeps Raft leadership where elections put it
	// (see leader.go for what placement does).
	NoLeaderPlacement bool
}

func (c *ControllerConfig) setDefaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.FailureTimeout, DefaultFailureTimeout)
	def(&c.TickInterval, DefaultTickInterval)
	def(&c.FenceRetryMin, DefaultFenceRetryMin)
	def(&c.FenceRetryMax, DefaultFenceRetryMax)
	def(&c.FenceTimeout, DefaultFenceTimeout)
	def(&c.MoveTimeout, DefaultMoveTimeout)
}

// GroupPhase is where the controller is with one group.
//
//	detecting ──owner heartbeat older than FailureTimeout──▶ fencing
//	fencing ──fence confirmed off──▶ transferring
//	fencing ──fence failed──▶ fencing (retry after backoff, alert)
//	fencing ──owner beats again before any fence started──▶ detecting
//	transferring ──takeover committed──▶ detecting (new owner)
//	transferring ──takeover refused──▶ fencing or detecting
//	placing ──grant committed──▶ detecting   (group without owner)
//	moving ──owner released, grant committed──▶ detecting (planned)
//	moving ──no release within MoveTimeout──▶ detecting (move cancelled, alert)
//	any ──cluster maintenance──▶ paused ──maintenance off──▶ detecting
type GroupPhase int

const (
	PhaseDetecting GroupPhase = iota
	PhaseFencing
	PhaseTransferring
	PhasePlacing
	PhaseMoving
	PhasePaused
)

func (p GroupPhase) String() string {
	switch p {
	case PhaseDetecting:
		return "detecting"
	case PhaseFencing:
		return "fencing"
	case PhaseTransferring:
		return "transferring"
	case PhasePlacing:
		return "placing"
	case PhaseMoving:
		return "moving"
	case PhasePaused:
		return "paused"
	default:
		return fmt.Sprintf("phase(%d)", int(p))
	}
}

// Action is what the controller core asks its shell to do.
type Action struct {
	// Fence, when set, starts a fence of that node (at most one at a time
	// per node). The result comes back through FenceDone.
	Fence string
	// DetectedAt is when the fenced node was declared failed.
	DetectedAt time.Time
	// Propose, when set, is a command to commit. The result comes back
	// through ProposeDone with the same Group.
	Propose *Command
	Group   string
	// TransferLeader, when set, hands Raft leadership to that voter.
	TransferLeader string
}

type fenceStatus int

const (
	fenceNone fenceStatus = iota
	fenceRunning
	fenceFailed
	fenceConfirmed
)

type nodeTrack struct {
	lastSeen   time.Time
	detectedAt time.Time // zero while alive
	fence      fenceStatus
	failures   int
	retryAt    time.Time
	alerted    bool // no-candidate alert sent
	// confirmUsed is the operator confirmation that last cut a fence
	// retry's backoff short.
	confirmUsed time.Time
}

type groupTrack struct {
	phase    GroupPhase
	inFlight bool // a proposal for this group is pending
	// The planned move being watched, and since when.
	movingTo    string
	movingSince time.Time
}

// ControllerCore is the controller as a pure state machine: fed heartbeats,
// fence and proposal results and the committed state with the time, it
// returns actions. It reads no clock and does no I/O; it is not safe for
// concurrent use (the Controller shell serialises calls).
type ControllerCore struct {
	cfg    ControllerConfig
	start  time.Time
	nodes  map[string]*nodeTrack
	groups map[string]*groupTrack
	// voters is the Raft voter set (SetVoters); nil: unknown, and
	// leadership stays put.
	voters       map[string]bool
	lastTransfer time.Time
}

// NewControllerCore starts tracking at now. Every node gets a full
// FailureTimeout of grace: a new leader has seen no heartbeat yet.
func NewControllerCore(cfg ControllerConfig, now time.Time) *ControllerCore {
	cfg.setDefaults()
	return &ControllerCore{cfg: cfg, start: now, nodes: map[string]*nodeTrack{}, groups: map[string]*groupTrack{}}
}

func (c *ControllerCore) node(id string) *nodeTrack {
	t, ok := c.nodes[id]
	if !ok {
		t = &nodeTrack{lastSeen: c.start}
		c.nodes[id] = t
	}
	return t
}

func (c *ControllerCore) group(name string) *groupTrack {
	t, ok := c.groups[name]
	if !ok {
		t = &groupTrack{}
		c.groups[name] = t
	}
	return t
}

// Seen seeds a node's last-seen time, replacing the start-up grace: a new
// leader that heard the node's beats as a follower knows how long it has
// been silent.
func (c *ControllerCore) Seen(node string, at time.Time) {
	c.node(node).lastSeen = at
}

// Heartbeat records that node was alive at at.
func (c *ControllerCore) Heartbeat(node string, at time.Time) {
	t := c.node(node)
	if at.After(t.lastSeen) {
		t.lastSeen = at
	}
}

// FenceDone reports a fence attempt's outcome.
func (c *ControllerCore) FenceDone(node string, err error, now time.Time) {
	t := c.node(node)
	if err == nil {
		t.fence = fenceConfirmed
		t.failures = 0
		return
	}
	t.fence = fenceFailed
	t.failures++
	backoff := c.cfg.FenceRetryMin << min(t.failures-1, 16)
	if backoff > c.cfg.FenceRetryMax || backoff <= 0 {
		backoff = c.cfg.FenceRetryMax
	}
	t.retryAt = now.Add(backoff)
}

// FenceAborted reports that a fence was not carried out because node
// proved alive at at (after it had been declared failed): it is tracked
// as alive again, and nothing moves.
func (c *ControllerCore) FenceAborted(node string, at time.Time) {
	t := c.node(node)
	if t.fence == fenceRunning {
		t.fence = fenceNone
	}
	if at.After(t.lastSeen) {
		t.lastSeen = at
	}
}

// ProposeDone reports the outcome of a proposal made for group.
func (c *ControllerCore) ProposeDone(group string, cmd *Command, err error) {
	g := c.group(group)
	g.inFlight = false
	if err != nil && cmd.Kind == KindTakeover && errors.Is(err, ErrNotFenced) {
		// The state disagrees that the fence is confirmed: fence again.
		c.node(cmd.Takeover.From).fence = fenceNone
	}
}

// Phase returns the group's phase (for status and tests).
func (c *ControllerCore) Phase(group string) GroupPhase { return c.group(group).phase }

// NextDeadline returns when the next storage node that is alive now will
// be declared failed if it stays silent (just past its failure timeout);
// with none, a timeout and a tick from now. The shell wakes then.
func (c *ControllerCore) NextDeadline(st *State, now time.Time) time.Time {
	next := now.Add(c.cfg.FailureTimeout + c.cfg.TickInterval)
	for id, n := range st.Nodes {
		if id == c.cfg.Self || n.Role != RoleStorage || !c.alive(id, now) {
			continue
		}
		if d := c.node(id).lastSeen.Add(c.cfg.FailureTimeout + time.Millisecond); d.Before(next) {
			next = d
		}
	}
	return next
}

func (c *ControllerCore) alive(id string, now time.Time) bool {
	if id == c.cfg.Self {
		return true
	}
	return now.Sub(c.node(id).lastSeen) <= c.cfg.FailureTimeout
}

// candidates lists the nodes that may own group, best first: online
// storage nodes that are alive and in every ISR of the group, in the
// group's preference order, then by id.
func (c *ControllerCore) candidates(st *State, g *Group, now time.Time, exclude string) []string {
	return Candidates(st, g.Name, exclude, func(id string) bool { return c.alive(id, now) })
}

// Candidates lists the nodes other than exclude that may own group, best
// first: online storage nodes that alive reports alive and that are in
// every ISR of the group, in the group's preference order, then by id.
func Candidates(st *State, group, exclude string, alive func(node string) bool) []string {
	g, ok := st.Groups[group]
	if !ok {
		return nil
	}
	var out []string
	for _, id := range sortedKeys(st.Nodes) {
		if id == exclude || !alive(id) || st.canOwn(g.Name, id) != nil {
			continue
		}
		out = append(out, id)
	}
	rank := func(id string) int {
		if i := slices.Index(g.Preferred, id); i >= 0 {
			return i
		}
		return len(g.Preferred)
	}
	slices.SortStableFunc(out, func(a, b string) int { return rank(a) - rank(b) })
	return out
}

// Step evaluates the state at now and returns what to do. Call it after
// every input and on every tick.
func (c *ControllerCore) Step(st *State, now time.Time) []Action {
	var acts []Action
	alert := func(group, node, msg string) {
		acts = append(acts, Action{Group: "", Propose: &Command{Kind: KindEvent, At: now, Event: &EventCmd{Event: Event{
			Severity: SeverityAlert, Kind: "controller", Node: node, Group: group, Message: msg}}}})
	}
	// Liveness and fence bookkeeping per node, whatever the mode.
	for id, n := range st.Nodes {
		t := c.node(id)
		switch {
		case n.State == NodeFenced:
			// Its takeover committed: the episode is over. A confirmed
			// fence must never be reused for a later failure.
			t.detectedAt, t.fence, t.failures, t.alerted = time.Time{}, fenceNone, 0, false
		case c.alive(id, now):
			if t.fence != fenceRunning && t.fence != fenceConfirmed {
				// Beating again before a fence ran, or after every fence
				// failed: the node is up and nothing moves.
				t.detectedAt, t.fence, t.failures, t.alerted = time.Time{}, fenceNone, 0, false
			}
		case t.detectedAt.IsZero() && n.Role == RoleStorage:
			t.detectedAt = now
		}
	}
	if st.Maintenance {
		for _, name := range sortedKeys(st.Groups) {
			c.group(name).phase = PhasePaused
		}
		return acts
	}
	fencing := map[string]bool{}
	for _, name := range sortedKeys(st.Groups) {
		g := st.Groups[name]
		gt := c.group(name)
		if gt.inFlight {
			continue
		}
		if g.MovingTo == "" || g.Owner == "" {
			gt.movingTo, gt.movingSince = "", time.Time{}
		} else if gt.movingTo != g.MovingTo {
			gt.movingTo, gt.movingSince = g.MovingTo, now
		}
		if g.Owner == "" {
			gt.phase = PhasePlacing
			to := g.MovingTo
			if to == "" || !c.alive(to, now) || st.canOwn(name, to) != nil {
				if g.MovingTo != "" {
					// The planned target went away after the release: fall
					// back to ordinary placement.
					to = ""
				}
				if cs := c.candidates(st, g, now, ""); len(cs) > 0 {
					to = cs[0]
				}
			}
			if to == "" {
				continue
			}
			if g.MovingTo != "" && to != g.MovingTo {
				// Grant refuses a node other than MovingTo; retarget first.
				acts = append(acts, Action{Group: name, Propose: &Command{Kind: KindGroupMove, At: now, GroupMove: &GroupMoveCmd{Group: name, Node: to}}})
			} else {
				acts = append(acts, Action{Group: name, Propose: &Command{Kind: KindGroupGrant, At: now, GroupGrant: &GroupGrantCmd{Group: name, Node: to}}})
			}
			gt.inFlight = true
			continue
		}
		owner := st.Nodes[g.Owner]
		ot := c.node(g.Owner)
		if c.alive(g.Owner, now) || (owner != nil && owner.State == NodeMaintenance) {
			gt.phase = PhaseDetecting
			if g.MovingTo != "" {
				gt.phase = PhaseMoving // the owner's agent drains and releases
				if now.Sub(gt.movingSince) > c.cfg.MoveTimeout {
					// The owner never released: it keeps the group (its
					// agent serves again once moving_to is gone).
					acts = append(acts, Action{Group: name, Propose: &Command{Kind: KindGroupMoveCancel, At: now,
						GroupMoveCancel: &GroupMoveCancelCmd{Group: name, Node: g.MovingTo}}})
					gt.inFlight = true
				}
				continue
			}
			if owner != nil && (owner.State == NodeStandby || owner.State == NodeMaintenance) {
				if cs := c.candidates(st, g, now, g.Owner); len(cs) > 0 {
					acts = append(acts, Action{Group: name, Propose: &Command{Kind: KindGroupMove, At: now, GroupMove: &GroupMoveCmd{Group: name, Node: cs[0]}}})
					gt.inFlight = true
				}
				continue
			}
			if g.Failback {
				if cs := c.candidates(st, g, now, ""); len(cs) > 0 && cs[0] != g.Owner &&
					slices.Index(g.Preferred, cs[0]) >= 0 &&
					(slices.Index(g.Preferred, g.Owner) < 0 || slices.Index(g.Preferred, cs[0]) < slices.Index(g.Preferred, g.Owner)) {
					acts = append(acts, Action{Group: name, Propose: &Command{Kind: KindGroupMove, At: now, GroupMove: &GroupMoveCmd{Group: name, Node: cs[0]}}})
					gt.inFlight = true
				}
			}
			continue
		}
		// The owner is failed. Fence before anything moves (invariant 4).
		cs := c.candidates(st, g, now, g.Owner)
		if len(cs) == 0 {
			gt.phase = PhaseFencing
			if !ot.alerted {
				ot.alerted = true
				alert(name, g.Owner, fmt.Sprintf("owner %s of group %s failed and no node in the ISR can take over", g.Owner, name))
			}
			continue
		}
		switch ot.fence {
		case fenceNone:
			gt.phase = PhaseFencing
			if !fencing[g.Owner] {
				ot.fence = fenceRunning
				acts = append(acts, Action{Fence: g.Owner, DetectedAt: ot.detectedAt})
			}
		case fenceRunning:
			gt.phase = PhaseFencing
		case fenceFailed:
			gt.phase = PhaseFencing
			// An operator's confirmation made since the failure retries
			// at once: after a few failed attempts the backoff reaches
			// 30 s, and the operator who just checked the node is off
			// must not wait that long for the takeover. Each
			// confirmation triggers one early retry only.
			conf := st.FenceConfirms[g.Owner].At
			early := conf.After(ot.detectedAt) && conf.After(ot.confirmUsed)
			if early || !now.Before(ot.retryAt) {
				if early {
					ot.confirmUsed = conf
				}
				ot.fence = fenceRunning
				acts = append(acts, Action{Fence: g.Owner, DetectedAt: ot.detectedAt})
			}
		case fenceConfirmed:
			gt.phase = PhaseTransferring
			gt.inFlight = true
			acts = append(acts, Action{Group: name, Propose: &Command{Kind: KindTakeover, At: now, Takeover: &TakeoverCmd{
				Group: name, From: g.Owner, To: cs[0], DetectedAt: ot.detectedAt}}})
		}
		fencing[g.Owner] = true
	}
	if len(acts) == 0 {
		if to := c.leaderTarget(st, now); to != "" {
			acts = append(acts, Action{TransferLeader: to})
		}
	}
	return acts
}

// Fencer fences a node and returns nil only once it is confirmed off;
// *fencing.Fencer implements it.
type Fencer interface {
	Fence(ctx context.Context, node string) (fencing.Result, error)
}

// Controller runs a ControllerCore on the leader: it feeds it heartbeats,
// ticks, committed state and results, and carries out its actions.
type Controller struct {
	Config ControllerConfig
	FSM    *FSM
	P      Proposer
	// Fencer returns the fencer to use with the current state (devices and
	// topologies live in the state; see BuildFencer).
	Fencer func(st *State) (Fencer, error)
	Clock  Clock
	Logger *slog.Logger
	// VerifyLeader, if set, must confirm leadership with a quorum before
	// any fence: an isolated leader that has not yet stepped down sees
	// every other node as silent and must not power them off.
	VerifyLeader func(ctx context.Context) error
	// Seed holds last-seen times heard before this controller started
	// (Node.LastSeen); nodes absent from it get a full grace period.
	Seed map[string]time.Time
	// LastSeen, if set, is read once leadership is verified and before a
	// node is fenced (RunController: Node's last-seen times, which raft
	// answers update too). A node seen after it was declared failed is
	// not fenced: VerifyLeader's round reaches every voter, and when the
	// quorum needed the suspect's own answer (two storage nodes, the
	// witness gone), that answer proves it alive. Fencing a healthy owner
	// over a lost heartbeat stream is the worst outcome: the survivor then
	// has no quorum to commit the takeover, and I/O stops.
	LastSeen func(node string) time.Time
	// Voters, if set, lists the Raft voters, and TransferLeader hands
	// leadership to one of them (leader placement; both set by
	// RunController).
	Voters         func() []string
	TransferLeader func(ctx context.Context, id string) error

	mu     sync.Mutex
	core   *ControllerCore
	beats  chan beat
	events chan func(*ControllerCore)
}

type beat struct {
	node string
	at   time.Time
}

// Heartbeat feeds a node's liveness; safe from any goroutine.
func (c *Controller) Heartbeat(node string, at time.Time) {
	c.mu.Lock()
	ch := c.beats
	c.mu.Unlock()
	if ch == nil {
		return
	}
	select {
	case ch <- beat{node, at}:
	default: // a full queue means the loop is busy; the next beat will do
	}
}

// Phase returns a group's phase; for status and tests.
func (c *Controller) Phase(group string) GroupPhase {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.core == nil {
		return PhaseDetecting
	}
	return c.core.Phase(group)
}

// Run drives the controller until ctx ends. Run it only on the leader and
// cancel ctx when leadership is lost.
func (c *Controller) Run(ctx context.Context) error {
	c.Config.setDefaults()
	if c.Clock == nil {
		c.Clock = SystemClock{}
	}
	log := c.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c.mu.Lock()
	c.core = NewControllerCore(c.Config, c.Clock.Now())
	for id, at := range c.Seed {
		c.core.Seen(id, at)
	}
	c.beats = make(chan beat, 1024)
	c.events = make(chan func(*ControllerCore), 64)
	c.mu.Unlock()
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	post := func(f func(*ControllerCore)) {
		select {
		case c.events <- f:
		case <-ctx.Done():
		}
	}
	tickAt := c.Clock.Now().Add(c.Config.TickInterval)
	tick := c.Clock.After(c.Config.TickInterval)
	for {
		changed := c.FSM.Changed()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case b := <-c.beats:
			c.mu.Lock()
			c.core.Heartbeat(b.node, b.at)
			c.mu.Unlock()
			continue // cheap; evaluate on the next tick or change
		case f := <-c.events:
			c.mu.Lock()
			f(c.core)
			c.mu.Unlock()
		case <-changed:
		case <-tick:
			tick = nil
		}
		now := c.Clock.Now()
		st := c.FSM.State()
		c.mu.Lock()
		if c.Voters != nil && c.TransferLeader != nil {
			c.core.SetVoters(c.Voters())
		}
		acts := c.core.Step(st, now)
		next := c.core.NextDeadline(st, now)
		c.mu.Unlock()
		if tick == nil || next.Before(tickAt) {
			// Wake on the tick or exactly when a node's failure timeout
			// runs out, whichever is first: waiting for the next tick
			// would add up to a tick to every detection.
			tickAt = now.Add(c.Config.TickInterval)
			if next.Before(tickAt) {
				tickAt = next
			}
			tick = c.Clock.After(tickAt.Sub(now))
		}
		for _, a := range acts {
			switch {
			case a.TransferLeader != "":
				to := a.TransferLeader
				log.Info("cluster: handing Raft leadership to a node whose loss costs less", "to", to,
					"rank_self", leaderRank(st, c.Config.Self), "rank_to", leaderRank(st, to))
				wg.Add(1)
				go func() {
					defer wg.Done()
					tctx, cancel := context.WithTimeout(ctx, 2*time.Second)
					defer cancel()
					if err := c.TransferLeader(tctx, to); err != nil && ctx.Err() == nil {
						// ctx ends when leadership is gone: that is success.
						log.Warn("cluster: leadership transfer failed; keeping leadership", "to", to, "err", err)
					}
				}()
			case a.Fence != "":
				node, detectedAt := a.Fence, a.DetectedAt
				f, err := c.Fencer(st)
				if err != nil {
					log.Error("cluster: no fencer", "err", err)
					post(func(core *ControllerCore) { core.FenceDone(node, err, c.Clock.Now()) })
					continue
				}
				log.Warn("cluster: node failed; fencing it before takeover", "node", node, "detected_at", a.DetectedAt)
				wg.Add(1)
				go func() {
					defer wg.Done()
					fctx, cancel := context.WithTimeout(ctx, c.Config.FenceTimeout)
					var (
						res fencing.Result
						err error
					)
					if c.VerifyLeader != nil {
						err = c.VerifyLeader(fctx)
					}
					if err != nil {
						err = fmt.Errorf("cluster: not fencing %s: leadership unconfirmed: %w", node, err)
					} else if c.LastSeen != nil {
						if at := c.LastSeen(node); !at.IsZero() && !at.Before(detectedAt) {
							cancel()
							log.Warn("cluster: not fencing a node that answered after it was declared failed",
								"node", node, "detected_at", detectedAt, "seen", at)
							post(func(core *ControllerCore) { core.FenceAborted(node, at) })
							return
						}
					}
					if err == nil {
						res, err = f.Fence(fctx, node)
					}
					cancel()
					if err != nil {
						log.Error("cluster: fence failed; nothing moves", "node", node, "err", err)
						ectx, ecancel := context.WithTimeout(ctx, DefaultProposeTimeout)
						_, _ = c.P.Propose(ectx, &Command{Kind: KindEvent, Event: &EventCmd{Event: Event{
							Severity: SeverityAlert, Kind: "fence-failed", Node: node,
							Message: fmt.Sprintf("fencing %s failed; no takeover, retrying: %v", node, err)}}})
						ecancel()
					} else {
						log.Warn("cluster: node fenced", "node", node, "level", res.Level, "duration", res.Duration)
					}
					post(func(core *ControllerCore) { core.FenceDone(node, err, c.Clock.Now()) })
				}()
			case a.Propose != nil:
				cmd, group := a.Propose, a.Group
				wg.Add(1)
				go func() {
					defer wg.Done()
					pctx, cancel := context.WithTimeout(ctx, DefaultProposeTimeout)
					_, err := c.P.Propose(pctx, cmd)
					cancel()
					if err != nil {
						log.Warn("cluster: controller proposal refused", "kind", cmd.Kind, "group", group, "err", err)
					} else {
						log.Info("cluster: controller committed", "kind", cmd.Kind, "group", group)
					}
					if group != "" {
						post(func(core *ControllerCore) { core.ProposeDone(group, cmd, err) })
					}
				}()
			}
		}
	}
}

// BuildFencer makes a fencing.Fencer from the devices and topologies in
// the state, recording into history (use FenceHistory so the takeover
// entry can see the confirmation).
func BuildFencer(st *State, history fencing.HistoryStore, logger *slog.Logger, now func() time.Time) (*fencing.Fencer, error) {
	cfg := fencing.Config{Devices: map[string]fencing.DeviceConfig{}, Nodes: map[string]fencing.NodeTopology{}}
	for name, d := range st.FenceDevices {
		dc, err := d.DeviceConfig()
		if err != nil {
			return nil, err
		}
		cfg.Devices[name] = dc
	}
	for id, n := range st.Nodes {
		if len(n.Fence.Levels) > 0 {
			cfg.Nodes[id] = n.Fence
		}
	}
	devs, err := cfg.Build(logger)
	if err != nil {
		return nil, fmt.Errorf("cluster: fencer: %w", err)
	}
	return &fencing.Fencer{Devices: devs, Nodes: cfg.Nodes, History: history, Logger: logger, Now: now}, nil
}

// VerifyLeader confirms with a quorum that n still leads.
func (n *Node) VerifyLeader(ctx context.Context) error {
	done, err := awaitFuture(ctx, n.raft.VerifyLeader())
	if done && err != nil {
		return fmt.Errorf("%w: %w", ErrNotLeader, err)
	}
	return err
}

// RunController runs a fresh controller from mk whenever n is the Raft
// leader, and stops it as soon as n is not: only one controller acts at a
// time, and a deposed leader's controller stops within one poll. Heartbeats
// arriving at n are routed to the running controller.
func (n *Node) RunController(ctx context.Context, mk func() *Controller) error {
	const poll = 20 * time.Millisecond
	for {
		if err := waitFor(ctx, n.IsLeader); err != nil {
			return ctx.Err()
		}
		c := mk()
		if c.Seed == nil {
			c.Seed = n.LastSeen()
		}
		if c.LastSeen == nil {
			c.LastSeen = n.lastSeenOf
		}
		if c.Voters == nil && c.TransferLeader == nil {
			c.Voters, c.TransferLeader = n.voterIDs, n.TransferLeadershipTo
		}
		cctx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- c.Run(cctx) }()
		n.SetHeartbeatSink(c.Heartbeat)
		for n.IsLeader() && cctx.Err() == nil {
			select {
			case <-time.After(poll):
			case <-ctx.Done():
			}
		}
		n.SetHeartbeatSink(nil)
		cancel()
		<-done
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

func waitFor(ctx context.Context, cond func() bool) error {
	for !cond() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
	return nil
}
