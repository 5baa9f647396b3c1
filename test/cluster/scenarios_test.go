package cluster

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/fencing"
	"github.com/hasan-storage/hasan/test/lab"
)

// TestScenarios runs the issue-5 failure scenarios one after the other on
// one cluster (setup costs seconds; each scenario first restores every
// node and waits for a healthy cluster, so one failure does not cascade).
// Each scenario runs the probe through the VIP and the writer sampler, and
// checks that no acknowledged write is lost and that two nodes never
// served at once. Run one with -run 'TestScenarios/Isolation'.
func TestScenarios(t *testing.T) {
	requireE2E(t)
	ctx, cancel := context.WithTimeout(context.Background(), 9*time.Minute)
	defer cancel()
	c := startCluster(t, ctx)
	// A cluster that cannot be brought back to health would make every
	// later scenario wait for it in vain: they are skipped instead.
	broken := ""
	run := func(name string, f func(t *testing.T)) {
		t.Run(name, func(t *testing.T) {
			if broken != "" {
				t.Skipf("the cluster could not be restored to health before %s", broken)
			}
			restored := false
			defer func() {
				if !restored {
					broken = name
				}
			}()
			c.RestoreAll(t, ctx)
			restored = true
			f(t)
		})
	}
	run("PlannedMove", func(t *testing.T) { scenarioPlannedMove(t, ctx, c) })
	run("Standby", func(t *testing.T) { scenarioStandby(t, ctx, c) })
	run("WitnessLoss", func(t *testing.T) { scenarioWitnessLoss(t, ctx, c) })
	run("LeaderNotOwner", func(t *testing.T) { scenarioLeaderNotOwner(t, ctx, c) })
	run("ReplicaLoss", func(t *testing.T) { scenarioReplicaLoss(t, ctx, c) })
	run("OwnerCrash", func(t *testing.T) { scenarioOwnerCrash(t, ctx, c) })
	run("FenceFailure", func(t *testing.T) { scenarioFenceFailure(t, ctx, c, wrongPassword) })
	run("FenceUnreachable", func(t *testing.T) { scenarioFenceFailure(t, ctx, c, bmcStopped) })
	run("Isolation", func(t *testing.T) { scenarioIsolation(t, ctx, c) })
}

// finishIO stops the probe and the sampler and checks the two invariants
// of every scenario: no lost acknowledged write, never two writers.
func finishIO(t *testing.T, p *runningProbe, w *writerSampler, what string) time.Duration {
	t.Helper()
	res, err := p.Stop()
	checkWriters(t, w)
	t.Logf("%s: gap %v, pairs %d, io_errors %d, reconnects %d, login_failures %d, unit_attentions %d, lost_writes %d",
		what, time.Duration(res.Gap).Round(time.Millisecond), res.Pairs, res.IOErrors, res.Reconnects, res.LoginFailures, res.UnitAttentions, res.LostWrites)
	if err != nil || res.LostWrites != 0 {
		t.Errorf("%s: acknowledged writes lost: %v %v", what, err, res.Lost)
	}
	return time.Duration(res.Gap)
}

// moveTo makes to the owner of g0 with a planned move and waits for it.
// The controller may retarget a move whose target is not eligible when the
// old owner releases (not in the ISR at that instant): the group then
// settles back on another node, and the move is proposed again (three
// attempts), with a log line, since the scenarios need the move itself.
func moveTo(t *testing.T, ctx context.Context, c *testCluster, to string) time.Duration {
	t.Helper()
	start := time.Now()
	for attempt := 1; ; attempt++ {
		sent := time.Now()
		c.Do(t, ctx, &cluster.Command{Kind: cluster.KindGroupMove, GroupMove: &cluster.GroupMoveCmd{Group: group, Node: to}})
		var settled string
		waitFor(t, ctx, 20*time.Second, group+" to move to "+to, func() (bool, error) {
			st, err := c.State(ctx)
			if err != nil {
				return false, err
			}
			g := st.Groups[group]
			if g.Owner != "" && g.MovingTo == "" && (g.Owner == to || time.Since(sent) > 2*time.Second) {
				settled = g.Owner
				return true, nil
			}
			return false, nil
		})
		if settled == to {
			return time.Since(start)
		}
		if attempt == 3 {
			t.Fatalf("%s stays on %s after %d planned moves to %s", group, settled, attempt, to)
		}
		t.Logf("the planned move of %s to %s ended on %s (the controller retargeted it); proposing it again", group, to, settled)
		c.WaitHealthy(t, ctx)
	}
}

// noUnplanned fails t if the state shows a fence record or a takeover
// since since.
func noUnplanned(t *testing.T, st *cluster.State, since time.Time) {
	t.Helper()
	for _, r := range st.FenceHistory {
		if !r.Time.Before(since) {
			t.Errorf("unexpected fence record: %s %s via %s: %s %s", r.Node, r.Action, r.Device, r.Outcome, r.Error)
		}
	}
	for _, e := range eventsSince(st, "takeover", since) {
		t.Errorf("unexpected takeover: %s", e.Message)
	}
}

// bmcOffs counts the power offs every storage node's BMC has received, to
// see fences the state may not record (a fence whose history append was
// lost with the leadership still powered the node off).
func bmcOffs(c *testCluster) map[string]int {
	n := map[string]int{}
	for _, id := range c.Storage {
		for _, l := range c.L.BMC(id).HookLog() {
			if strings.Contains(l, "set power 0") {
				n[id]++
			}
		}
	}
	return n
}

// untouched fails t if a storage node other than except was powered off
// through its BMC since before (a bmcOffs reading) or lost its hasan
// serve: the scenario must not fence or kill anyone but its victim.
func untouched(t *testing.T, c *testCluster, before map[string]int, except string) {
	t.Helper()
	after := bmcOffs(c)
	for _, id := range c.Storage {
		if id == except {
			continue
		}
		if after[id] != before[id] {
			t.Errorf("%s was powered off through its BMC (fenced) during the scenario", id)
		}
		if !c.Running(id) || c.L.PowerState(id) != lab.PowerOn {
			t.Errorf("%s lost its hasan serve or its power during the scenario", id)
		}
	}
}

// scenarioPlannedMove: group-move to the other storage node drains the
// owner, which releases, then the new owner acquires: no fence, and the
// I/O pause is under 0.3 s.
func scenarioPlannedMove(t *testing.T, ctx context.Context, c *testCluster) {
	owner := c.Owner(t, ctx)
	to := c.Other(owner)
	w := c.WatchWriters(ctx)
	p := c.StartProbe(t, ctx)
	start := time.Now()
	took := moveTo(t, ctx, c, to)
	if err := p.Wait(ctx, 10); err != nil {
		t.Fatalf("I/O did not resume after the move: %v", err)
	}
	gap := finishIO(t, p, w, "planned move "+owner+"->"+to)
	st, err := c.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	noUnplanned(t, st, start)
	t.Logf("planned move %s->%s committed %v after the command; I/O pause %v", owner, to, took.Round(time.Millisecond), gap.Round(time.Millisecond))
	if lim := plannedGap(t); gap > lim {
		t.Errorf("planned move paused I/O for %v, goal under %v (HASAN_CLUSTER_MAX_PLANNED_GAP overrides)", gap, lim)
	}
	if c.ExportsOnOwnAddress(ctx, owner) {
		t.Errorf("the old owner %s still exports %s", owner, iqn)
	}
}

// scenarioStandby: node-set-state standby on the owner makes the
// controller move its group away, planned, without fencing it.
func scenarioStandby(t *testing.T, ctx context.Context, c *testCluster) {
	owner := c.Owner(t, ctx)
	to := c.Other(owner)
	w := c.WatchWriters(ctx)
	p := c.StartProbe(t, ctx)
	start := time.Now()
	c.Do(t, ctx, &cluster.Command{Kind: cluster.KindNodeSetState, NodeSetState: &cluster.NodeSetStateCmd{ID: owner, State: cluster.NodeStandby}})
	waitFor(t, ctx, 20*time.Second, "the controller to move "+group+" off standby "+owner, func() (bool, error) {
		st, err := c.State(ctx)
		if err != nil {
			return false, err
		}
		g := st.Groups[group]
		return g.Owner == to && g.MovingTo == "", nil
	})
	took := time.Since(start)
	if err := p.Wait(ctx, 10); err != nil {
		t.Fatalf("I/O did not resume after the standby move: %v", err)
	}
	gap := finishIO(t, p, w, "standby of owner "+owner)
	st, err := c.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	noUnplanned(t, st, start)
	if s := st.Nodes[owner].State; s != cluster.NodeStandby {
		t.Errorf("%s is %s after standby, want standby", owner, s)
	}
	if !c.Running(owner) {
		t.Errorf("hasan serve on %s died on standby", owner)
	}
	t.Logf("standby %s: %s owned by %s %v after the command; I/O pause %v", owner, group, to, took.Round(time.Millisecond), gap.Round(time.Millisecond))
	if lim := plannedGap(t); gap > lim {
		t.Errorf("standby move paused I/O for %v, goal under %v (HASAN_CLUSTER_MAX_PLANNED_GAP overrides)", gap, lim)
	}
	c.Do(t, ctx, &cluster.Command{Kind: cluster.KindNodeSetState, NodeSetState: &cluster.NodeSetStateCmd{ID: owner, State: cluster.NodeOnline}})
}

// scenarioWitnessLoss: the witness loses power. Nothing changes: same
// owner and epoch, no fence, no takeover, and I/O goes on with no pause
// beyond its normal rhythm. Leader placement normally makes the witness
// the Raft leader; the owner then keeps its serving lease through the
// other storage node's heartbeat echoes (a majority with itself) while
// the two elect a new leader, so it must not stop serving either.
func scenarioWitnessLoss(t *testing.T, ctx context.Context, c *testCluster) {
	st0, err := c.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	g0 := *st0.Groups[group]
	offs := bmcOffs(c)
	w := c.WatchWriters(ctx)
	p := c.StartProbe(t, ctx)
	led := c.Leader(ctx) == "w1"
	offAt := time.Now()
	if err := c.L.PowerOff("w1"); err != nil {
		t.Fatal(err)
	}
	// Longer than failure detection, a lease and an election together.
	err = p.Wait(ctx, 30)
	untouched(t, c, offs, "")
	if err != nil {
		t.Fatalf("I/O stopped after the witness loss: %v", err)
	}
	gap := finishIO(t, p, w, "witness loss")
	st, err := c.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	noUnplanned(t, st, offAt)
	if g := st.Groups[group]; g.Owner != g0.Owner || g.Epoch != g0.Epoch {
		t.Errorf("witness loss changed %s: owner %s epoch %d, was %s epoch %d", group, g.Owner, g.Epoch, g0.Owner, g0.Epoch)
	}
	if v := st.Volumes[volUUID]; len(v.ISR) != len(v.Replicas) {
		t.Errorf("witness loss shrank the ISR: %v", v.ISR)
	}
	t.Logf("witness loss (witness leading: %v): owner %s epoch %d unchanged, I/O pause %v (%s observed %v later)", led, g0.Owner, g0.Epoch,
		gap.Round(time.Millisecond), st.Nodes["w1"].State, time.Since(offAt).Round(time.Millisecond))
	if lim := steadyGap(t); gap > lim {
		t.Errorf("witness loss (leading: %v) paused I/O for %v, want at most %v (HASAN_CLUSTER_MAX_STEADY_GAP overrides)", led, gap, lim)
	}
}

// scenarioLeaderNotOwner: the Raft leader, which does not own the group,
// loses power. A new leader is elected; the owner keeps its group (no
// fence, no takeover) and I/O continues. Leader placement normally makes
// that leader the witness; a storage leader is also a replica, and its
// loss stalls writes until the primary drops it from the ISR.
func scenarioLeaderNotOwner(t *testing.T, ctx context.Context, c *testCluster) {
	var leader string
	for attempt := 1; ; attempt++ {
		owner := c.Owner(t, ctx)
		leader = c.Leader(ctx)
		if leader == "" {
			t.Fatal("no leader")
		}
		if leader != owner {
			break
		}
		if attempt == 3 {
			t.Fatalf("the leader %s keeps owning %s", leader, group)
		}
		moveTo(t, ctx, c, c.Other(owner))
		c.WaitHealthy(t, ctx)
	}
	leaderLoss(t, ctx, c, leader)
}

// leaderLoss powers off leader, which does not own g0, and checks that a
// new leader is elected while g0 stays where it is.
func leaderLoss(t *testing.T, ctx context.Context, c *testCluster, leader string) {
	t.Helper()
	st0, err := c.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	g0 := *st0.Groups[group]
	if g0.Owner == leader {
		t.Fatalf("leader %s owns %s", leader, group)
	}
	offs := bmcOffs(c)
	w := c.WatchWriters(ctx)
	p := c.StartProbe(t, ctx)
	offAt := time.Now()
	if err := c.L.PowerOff(leader); err != nil {
		t.Fatal(err)
	}
	var newLeader string
	waitFor(t, ctx, 15*time.Second, "a new leader", func() (bool, error) {
		newLeader = c.Leader(ctx)
		return newLeader != "" && newLeader != leader, nil
	})
	elected := time.Since(offAt)
	err = p.Wait(ctx, 30)
	untouched(t, c, offs, leader)
	if err != nil {
		t.Fatalf("I/O stopped after the loss of leader %s (new leader %s %v after the cut): %v", leader, newLeader, elected.Round(time.Millisecond), err)
	}
	gap := finishIO(t, p, w, "loss of leader "+leader)
	st, err := c.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	noUnplanned(t, st, offAt)
	if g := st.Groups[group]; g.Owner != g0.Owner || g.Epoch != g0.Epoch {
		t.Errorf("leader loss moved %s: owner %s epoch %d, was %s epoch %d", group, g.Owner, g.Epoch, g0.Owner, g0.Epoch)
	}
	t.Logf("loss of leader %s (owner %s): %s elected %v after the cut; ISR now %v; I/O pause %v",
		leader, g0.Owner, newLeader, elected.Round(time.Millisecond), st.Volumes[volUUID].ISR, gap.Round(time.Millisecond))
	if lim := maxGap(t); gap > lim {
		t.Errorf("loss of leader %s paused I/O for %v, want at most %v (HASAN_CLUSTER_MAX_GAP overrides)", leader, gap, lim)
	}
}

// scenarioReplicaLoss: the non-owner storage node (not the leader) loses
// power. The primary drops it from the ISR and I/O goes on. It comes back
// (power on, hasan serve, online), resyncs and rejoins the ISR. A planned
// move to it then proves its copy holds every acknowledged write: the
// probe re-logs in on it and reads its whole ring back.
func scenarioReplicaLoss(t *testing.T, ctx context.Context, c *testCluster) {
	owner := c.Owner(t, ctx)
	replica := c.Other(owner)
	if c.Leader(ctx) == replica {
		// Keep this a pure replica loss: make the leader the owner.
		moveTo(t, ctx, c, replica)
		c.WaitHealthy(t, ctx)
		owner, replica = replica, owner
	}
	st0, err := c.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	g0 := *st0.Groups[group]
	offs := bmcOffs(c)
	w := c.WatchWriters(ctx)
	p := c.StartProbe(t, ctx)
	offAt := time.Now()
	if err := c.L.PowerOff(replica); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, 20*time.Second, replica+" out of the ISR", func() (bool, error) {
		st, err := c.State(ctx)
		if err != nil {
			return false, err
		}
		return !slices.Contains(st.Volumes[volUUID].ISR, replica), nil
	})
	shrunk := time.Since(offAt)
	if err := p.Wait(ctx, 10); err != nil {
		t.Fatalf("I/O stopped after the replica loss: %v", err)
	}
	lossGap := time.Duration(p.Snapshot().Gap)
	untouched(t, c, offs, replica)

	backAt := time.Now()
	c.Restore(t, ctx, replica)
	waitFor(t, ctx, 60*time.Second, replica+" to resync into the ISR", func() (bool, error) {
		st, err := c.State(ctx)
		if err != nil {
			return false, err
		}
		return slices.Contains(st.Volumes[volUUID].ISR, replica), nil
	})
	resynced := time.Since(backAt)
	if err := p.Wait(ctx, 10); err != nil {
		t.Fatalf("I/O stopped during the resync: %v", err)
	}
	st, err := c.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	noUnplanned(t, st, offAt)
	if g := st.Groups[group]; g.Owner != g0.Owner || g.Epoch != g0.Epoch {
		t.Errorf("replica loss moved %s: owner %s epoch %d, was %s epoch %d", group, g.Owner, g.Epoch, g0.Owner, g0.Epoch)
	}
	// The returned copy serves: every slot of the probe's ring must be
	// there after the re-login on the new owner.
	reconnects := p.Snapshot().Reconnects
	moveTo(t, ctx, c, replica)
	if err := p.Wait(ctx, 10); err != nil {
		t.Fatalf("I/O did not resume on the resynced replica: %v", err)
	}
	if p.Snapshot().Reconnects == reconnects {
		t.Errorf("the probe never re-logged in after the move to %s: its ring was not checked there", replica)
	}
	gap := finishIO(t, p, w, "replica loss, return and move to it")
	t.Logf("replica %s lost: out of the ISR %v after the cut, I/O pause %v; back: in the ISR %v after power on; worst pause overall %v",
		replica, shrunk.Round(time.Millisecond), lossGap.Round(time.Millisecond), resynced.Round(time.Millisecond), gap.Round(time.Millisecond))
	if lim := maxGap(t); lossGap > lim {
		t.Errorf("replica loss paused I/O for %v, want at most %v (HASAN_CLUSTER_MAX_GAP overrides)", lossGap, lim)
	}
}

// scenarioOwnerCrash: the owner's hasan serve is SIGKILLed while the node
// keeps power. Its kernel lives on and keeps answering ARP for the VIP, so
// the survivor can take the address only once the fence (the BMC's power
// off, which takes the links down) is confirmed.
func scenarioOwnerCrash(t *testing.T, ctx context.Context, c *testCluster) {
	owner := c.Owner(t, ctx)
	surv := c.Other(owner)
	w := c.WatchWriters(ctx)
	p := c.StartProbe(t, ctx)
	cutAt := time.Now()
	if err := c.L.Crash(owner); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, 30*time.Second, surv+" to take "+group+" over", func() (bool, error) {
		st, err := c.State(ctx)
		if err != nil {
			return false, err
		}
		return st.Groups[group].Owner == surv, nil
	})
	if err := p.Wait(ctx, 5); err != nil {
		t.Fatalf("I/O did not resume after the crash: %v", err)
	}
	gap := finishIO(t, p, w, "owner crash")
	st, err := c.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ok, line := fencedBeforeTakeover(st, owner, cutAt)
	if !ok {
		t.Fatal(line)
	}
	if c.L.PowerState(owner) != lab.PowerOff {
		t.Errorf("the crashed owner %s still has power after its fence", owner)
	}
	if s := st.Nodes[owner].State; s != cluster.NodeFenced {
		t.Errorf("the crashed owner %s is %s, want fenced", owner, s)
	}
	t.Logf("owner %s crashed: %s; I/O pause %v", owner, line, gap.Round(time.Millisecond))
	if lim := maxGap(t); gap > lim {
		t.Errorf("crash takeover paused I/O for %v, goal %v (HASAN_CLUSTER_MAX_GAP overrides)", gap, lim)
	}
}

// fenceFault is a way to make the owner's fence device fail, and undo it.
type fenceFault struct {
	name           string
	inject, repair func(t *testing.T, ctx context.Context, c *testCluster, owner string)
}

// wrongPassword: the device's configuration has a wrong BMC password.
var wrongPassword = fenceFault{
	name: "wrong BMC password",
	inject: func(t *testing.T, ctx context.Context, c *testCluster, owner string) {
		c.Do(t, ctx, &cluster.Command{Kind: cluster.KindFenceDevicePut, FenceDevicePut: &cluster.FenceDevicePutCmd{Name: "ipmi-" + owner, Config: c.FenceDeviceConfig(t, owner, "wrong-password")}})
	},
	repair: func(t *testing.T, ctx context.Context, c *testCluster, owner string) {
		c.Do(t, ctx, &cluster.Command{Kind: cluster.KindFenceDevicePut, FenceDevicePut: &cluster.FenceDevicePutCmd{Name: "ipmi-" + owner, Config: c.FenceDeviceConfig(t, owner, "")}})
	},
}

// bmcStopped: the BMC stops answering (ipmi_sim SIGSTOPped).
var bmcStopped = fenceFault{
	name: "BMC not answering",
	inject: func(t *testing.T, ctx context.Context, c *testCluster, owner string) {
		if err := c.L.BMC(owner).SetFault(lab.FaultUnreachable, true); err != nil {
			t.Fatal(err)
		}
	},
	repair: func(t *testing.T, ctx context.Context, c *testCluster, owner string) {
		if err := c.L.BMC(owner).SetFault(lab.FaultUnreachable, false); err != nil {
			t.Fatal(err)
		}
	},
}

// scenarioFenceFailure: the owner loses power while its fence device
// fails. Nothing moves: no takeover, the old owner stays owner in the
// state, and an alert is raised. Once the device is fixed, the retry
// fences it and the takeover follows.
func scenarioFenceFailure(t *testing.T, ctx context.Context, c *testCluster, fault fenceFault) {
	owner := c.Owner(t, ctx)
	surv := c.Other(owner)
	fault.inject(t, ctx, c, owner)
	fixed := false
	defer func() {
		if !fixed {
			fault.repair(t, ctx, c, owner)
		}
	}()
	w := c.WatchWriters(ctx)
	p := c.StartProbe(t, ctx)
	offAt := time.Now()
	if err := c.L.PowerOff(owner); err != nil {
		t.Fatal(err)
	}
	var alert cluster.Event
	waitFor(t, ctx, 20*time.Second, "a fence-failed alert for "+owner, func() (bool, error) {
		st, err := c.State(ctx)
		if err != nil {
			return false, err
		}
		for _, e := range eventsSince(st, "fence-failed", offAt) {
			if e.Node == owner && e.Severity == cluster.SeverityAlert {
				alert = e
				return true, nil
			}
		}
		return false, nil
	})
	// Leave the controller time for more failed attempts (backoff 0.5, 1,
	// 2 s), then check that nothing moved.
	time.Sleep(3 * time.Second)
	st, err := c.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if g := st.Groups[group]; g.Owner != owner {
		t.Fatalf("%s moved to %q although fencing %s failed", group, g.Owner, owner)
	}
	if n := st.Nodes[owner]; n.State == cluster.NodeFenced {
		t.Fatalf("%s marked fenced although its fence device fails", owner)
	}
	if ev := eventsSince(st, "takeover", offAt); len(ev) > 0 {
		t.Fatalf("takeover although fencing failed: %s", ev[0].Message)
	}
	failures := 0
	for _, r := range fenceRecords(st, owner, offAt) {
		if r.Outcome == fencing.OutcomeSuccess {
			t.Fatalf("fence of %s succeeded with a failing device (%s): %+v", owner, fault.name, r)
		}
		failures++
	}
	alerts := 0
	for _, e := range eventsSince(st, "fence-failed", offAt) {
		if e.Node == owner {
			alerts++
		}
	}
	stalled := p.Snapshot()
	t.Logf("fence failing (%s): alert %v after the cut (%q); %d failed fence records and %d alerts in %v; %s still owner; no verified I/O for %v",
		fault.name, alert.Time.Sub(offAt).Round(time.Millisecond), alert.Message, failures, alerts, time.Since(offAt).Round(time.Millisecond),
		owner, time.Duration(stalled.SinceLastPair).Round(time.Millisecond))

	fixAt := time.Now()
	fault.repair(t, ctx, c, owner)
	fixed = true
	waitFor(t, ctx, 45*time.Second, "the takeover once the fence device is fixed", func() (bool, error) {
		st, err := c.State(ctx)
		if err != nil {
			return false, err
		}
		return st.Groups[group].Owner == surv, nil
	})
	tookOver := time.Since(fixAt)
	if err := p.Wait(ctx, 5); err != nil {
		t.Fatalf("I/O did not resume after the takeover: %v", err)
	}
	finishIO(t, p, w, "failed fence then fixed")
	st, err = c.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ok *fencing.Record
	for _, r := range fenceRecords(st, owner, fixAt) {
		if r.Outcome == fencing.OutcomeSuccess && r.Action == "off" {
			ok = &r
		}
	}
	if ok == nil {
		t.Fatalf("no successful fence of %s after the fix", owner)
	}
	var takeover time.Time
	for _, e := range eventsSince(st, "takeover", offAt) {
		if e.Group == group {
			takeover = e.Time
		}
	}
	// A record's Time is when the attempt started; it was confirmed
	// Duration later.
	if confirmed := ok.Time.Add(ok.Duration); takeover.IsZero() || takeover.Before(confirmed) {
		t.Fatalf("takeover at %v is not after the fence confirmation at %v", takeover, confirmed)
	}
	t.Logf("device fixed: next fence attempt %v later (retry backoff), confirmed in %v, takeover committed %v after the fix",
		ok.Time.Sub(fixAt).Round(time.Millisecond), ok.Duration.Round(time.Millisecond), tookOver.Round(time.Millisecond))
}

// scenarioIsolation: the owner is cut off the cluster network (its BMC
// stays reachable on the management network). It must demote itself
// (VIP dropped, sessions closed) within its lease, before the failure
// timeout; the survivor must still wait for the fence confirmation (the
// BMC's power off, which kills the isolated node) before taking over.
func scenarioIsolation(t *testing.T, ctx context.Context, c *testCluster) {
	owner := c.Owner(t, ctx)
	surv := c.Other(owner)
	hooksBefore := len(c.L.BMC(owner).HookLog())
	w := c.WatchWriters(ctx)
	p := c.StartProbe(t, ctx)
	if err := p.Wait(ctx, 3); err != nil { // the sampler has seen the session
		t.Fatal(err)
	}
	isoAt := time.Now()
	before, _ := w.LastBefore(owner, isoAt)
	if !before.serving() || before.Sessions == 0 || !before.VIP {
		t.Fatalf("before the isolation the sampler saw owner %s as %+v: want the VIP and the probe's session", owner, before)
	}
	if err := c.L.Isolate(owner); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, 30*time.Second, surv+" to take "+group+" over", func() (bool, error) {
		st, err := c.State(ctx)
		if err != nil {
			return false, err
		}
		return st.Groups[group].Owner == surv, nil
	})
	if err := p.Wait(ctx, 5); err != nil {
		t.Fatalf("I/O did not resume after the isolation: %v", err)
	}
	demotedAt, demoted := w.FirstDemoted(owner, isoAt)
	gap := finishIO(t, p, w, "owner isolation")
	st, err := c.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var fenced *fencing.Record
	for _, r := range fenceRecords(st, owner, isoAt) {
		t.Logf("fence record: %s %s via %s: %s at +%v in %v %s", r.Node, r.Action, r.Device, r.Outcome,
			r.Time.Sub(isoAt).Round(time.Millisecond), r.Duration.Round(time.Millisecond), r.Error)
		if r.Action == "off" && r.Outcome == fencing.OutcomeSuccess && fenced == nil {
			fenced = &r
		}
	}
	if fenced == nil {
		t.Fatalf("no successful fence of the isolated owner %s", owner)
	}
	var takeover time.Time
	for _, e := range eventsSince(st, "takeover", isoAt) {
		if e.Group == group {
			takeover = e.Time
		}
	}
	// A record's Time is when the attempt started; it was confirmed
	// Duration later, and the power off itself is in the BMC hook log.
	confirmed := fenced.Time.Add(fenced.Duration)
	if takeover.IsZero() || takeover.Before(confirmed) {
		t.Fatalf("takeover at %v is not after the fence confirmation at %v", takeover, confirmed)
	}
	hooks := c.L.BMC(owner).HookLog()[hooksBefore:]
	if !slices.ContainsFunc(hooks, func(s string) bool { return strings.Contains(s, "set power 0") }) {
		t.Fatalf("the BMC of %s never received a power off: %v", owner, hooks)
	}
	if !demoted {
		t.Fatalf("%s never demoted itself while isolated (it kept the VIP or its sessions until it was killed)", owner)
	}
	if c.Running(owner) {
		t.Errorf("hasan serve on %s survived its fence", owner)
	}
	// The sampler brackets the demotion: the last read that found the
	// owner serving, and the first that found it alive without the VIP
	// or a session. The checks use the former (proof that it served that
	// long), the latter is reported too.
	lastServing := w.LastServing(owner, isoAt, demotedAt)
	if lastServing.IsZero() {
		lastServing = isoAt
	}
	t.Logf("isolation of %s: still serving at +%v, demoted by +%v, fence started +%v, confirmed +%v, takeover committed +%v, I/O pause %v",
		owner, lastServing.Sub(isoAt).Round(time.Millisecond), demotedAt.Sub(isoAt).Round(time.Millisecond), fenced.Time.Sub(isoAt).Round(time.Millisecond),
		confirmed.Sub(isoAt).Round(time.Millisecond), takeover.Sub(isoAt).Round(time.Millisecond), gap.Round(time.Millisecond))
	if !lastServing.Before(fenced.Time) {
		t.Errorf("%s still served at +%v, after its fence started at +%v", owner, lastServing.Sub(isoAt), fenced.Time.Sub(isoAt))
	}
	if d := lastServing.Sub(isoAt); d > c.Failure {
		t.Errorf("%s still served %v after the isolation, beyond its lease (shorter than the failure timeout %v)", owner, d, c.Failure)
	}
	if lim := maxGap(t); gap > lim {
		t.Errorf("isolation takeover paused I/O for %v, goal %v (HASAN_CLUSTER_MAX_GAP overrides)", gap, lim)
	}
}
