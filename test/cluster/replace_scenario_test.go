package cluster

import (
	"context"
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/fencing"
	"github.com/hasan-storage/hasan/test/lab"
	"github.com/hasan-storage/hasan/webui"
)

// TestScenarioReplaceNode: a storage node lost for good is replaced by a
// spare (docs/operations.md, "Replacing a failed node"). n1 owns g0, n2
// holds the other replica, w1 is the witness and n3 a spare storage node
// that has joined. The probe writes through the VIP the whole time and the
// writer sampler watches n1, n2 and n3.
//
//  1. n2 loses power for good: the owner drops it from the ISR.
//  2. `hasan node replace n2 --with n3 --remove` through the leader's REST
//     API: n3 is synced into the ISR, n2 leaves the state and the Raft
//     voters, and the LUN's replication swap under the live session pauses
//     I/O no longer than a steady-state hiccup, without a re-login.
//  3. n1 (the owner) loses power: n3 must take over after fencing n1
//     through its BMC (n3 and w1 are a majority only if n2 left the Raft
//     configuration), and the probe's re-login there reads back every
//     acknowledged write.
func TestScenarioReplaceNode(t *testing.T) {
	requireE2E(t)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	c := startReplaceCluster(t, ctx)
	if owner := c.Owner(t, ctx); owner != "n1" {
		moveTo(t, ctx, c, "n1")
		waitHealthyNodes(t, ctx, c, []string{"n1", "n2", "n3", "w1"})
	}

	offs := bmcOffs(c)
	w := c.WatchWriters(ctx)
	p := c.StartProbe(t, ctx)
	clock := startPairClock(ctx, p)
	defer clock.Stop()

	// 1. n2 is lost.
	offAt := time.Now()
	if err := c.L.PowerOff("n2"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, 20*time.Second, "n2 out of the ISR", func() (bool, error) {
		st, err := c.State(ctx)
		if err != nil {
			return false, err
		}
		return !slices.Contains(st.Volumes[volUUID].ISR, "n2"), nil
	})
	shrunk := time.Since(offAt)
	if err := p.Wait(ctx, 10); err != nil {
		t.Fatalf("I/O stopped after n2's loss: %v", err)
	}
	lossPause := clock.MaxPause(offAt, time.Now())
	st0, err := c.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	g0 := *st0.Groups[group]
	if g0.Owner != "n1" {
		t.Fatalf("n2's loss moved %s to %q", group, g0.Owner)
	}

	// 2. Replace n2 by n3 and remove n2, through the leader's API (a Raft
	// voter is removed only there).
	leader := leaderAmong(ctx, c, []string{"w1", "n1", "n3"})
	if leader == "" {
		t.Fatal("no leader among w1, n1, n3")
	}
	before := p.Snapshot()
	replAt := time.Now()
	out, err := c.L.Node(leader).Run(ctx, c.Bin, "node", "replace", "n2", "--with", "n3", "--remove", "--json", "--api", "http://"+replaceAPI)
	if err != nil {
		t.Fatalf("hasan node replace n2 --with n3 --remove on %s: %v", leader, err)
	}
	var res webui.ReplaceNodeResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("node replace output: %v: %s", err, out)
	}
	if !res.Removed || len(res.Volumes) != 1 || res.Volumes[0].UUID != volUUID {
		t.Fatalf("node replace: %s", out)
	}
	committed := time.Since(replAt)
	waitFor(t, ctx, 60*time.Second, "n3 synced into the ISR", func() (bool, error) {
		st, err := c.State(ctx)
		if err != nil {
			return false, err
		}
		return slices.Contains(st.Volumes[volUUID].ISR, "n3"), nil
	})
	inISR := time.Since(replAt)
	if err := p.Wait(ctx, 10); err != nil {
		t.Fatalf("I/O stopped during the replacement: %v", err)
	}
	replDone := time.Now()
	replPause := clock.MaxPause(replAt, replDone)
	after := p.Snapshot()
	st, err := c.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	v := st.Volumes[volUUID]
	if got := slices.Sorted(slices.Values(v.Replicas)); !slices.Equal(got, []string{"n1", "n3"}) || v.Primary != "n1" {
		t.Errorf("after the replacement v0 has replicas %v, primary %s; want n1+n3, primary n1", v.Replicas, v.Primary)
	}
	if _, ok := st.Nodes["n2"]; ok {
		t.Errorf("n2 is still in the cluster state: %+v", st.Nodes["n2"])
	}
	if g := st.Groups[group]; g.Owner != g0.Owner || g.Epoch != g0.Epoch {
		t.Errorf("the replacement moved %s: owner %s epoch %d, was %s epoch %d", group, g.Owner, g.Epoch, g0.Owner, g0.Epoch)
	}
	// The leader's API finds n2 neither in the state nor among the Raft
	// servers: removing it again is "no such node".
	code, body, err := restCall(ctx, c, leader, http.MethodDelete, "/api/v1/nodes/n2", nil)
	if err != nil {
		t.Fatalf("DELETE /api/v1/nodes/n2 on %s: %v", leader, err)
	}
	if code != http.StatusNotFound {
		t.Errorf("DELETE /api/v1/nodes/n2 after the replacement: %d %s; want 404 (n2 gone from the state and the Raft configuration)", code, strings.TrimSpace(string(body)))
	}
	noUnplanned(t, st, offAt)
	untouched(t, c, offs, "n2")
	if after.Reconnects != before.Reconnects || after.IOErrors != before.IOErrors {
		t.Errorf("the replacement disturbed the initiator's session: reconnects %d->%d, io_errors %d->%d (last error %q)",
			before.Reconnects, after.Reconnects, before.IOErrors, after.IOErrors, after.LastError)
	}
	if lim := steadyGap(t); replPause > lim {
		t.Errorf("the replacement paused I/O for %v, want at most %v (HASAN_CLUSTER_MAX_STEADY_GAP overrides)", replPause, lim)
	}
	if lim := maxGap(t); lossPause > lim {
		t.Errorf("n2's loss paused I/O for %v, want at most %v (HASAN_CLUSTER_MAX_GAP overrides)", lossPause, lim)
	}

	// 3. The owner n1 is lost: n3 takes over after n1's fence.
	hooksBefore := len(c.L.BMC("n1").HookLog())
	n3Offs := bmcOffs(c)["n3"]
	cutAt := time.Now()
	if err := c.L.PowerOff("n1"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, 30*time.Second, "n3 to take "+group+" over", func() (bool, error) {
		st, err := c.State(ctx)
		if err != nil {
			return false, err
		}
		g := st.Groups[group]
		return g.Owner == "n3" && g.MovingTo == "", nil
	})
	if err := p.Wait(ctx, 10); err != nil {
		t.Fatalf("I/O did not resume on n3: %v", err)
	}
	takeoverPause := clock.MaxPause(cutAt, time.Now())
	if p.Snapshot().Reconnects == after.Reconnects {
		t.Errorf("the probe never re-logged in on n3: its ring was not read back there")
	}
	clock.Stop()
	t.Logf("pauses over 150ms seen by the clock, from n2's cut: %v", clock.Pauses(150*time.Millisecond, offAt))
	last := p.Snapshot()
	worst := finishIO(t, p, w, "replace n2 by n3, then n1's power loss")
	st, err = c.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Nodes["n1"].State != cluster.NodeFenced || slices.Contains(st.Volumes[volUUID].ISR, "n1") {
		t.Errorf("after the takeover n1 is %s, ISR %v", st.Nodes["n1"].State, st.Volumes[volUUID].ISR)
	}
	var fenced *fencing.Record
	for i, r := range fenceRecords(st, "n1", cutAt.Add(-time.Second)) {
		t.Logf("fence record %d: %s %s via %s: %s in %v %s", i, r.Node, r.Action, r.Device, r.Outcome, r.Duration, r.Error)
		if r.Action == "off" && r.Outcome == fencing.OutcomeSuccess && r.Device == "ipmi-n1" {
			fenced = &r
		}
	}
	var takeoverAt time.Time
	for _, e := range eventsSince(st, "takeover", cutAt) {
		if e.Group == group {
			takeoverAt = e.Time
		}
	}
	switch {
	case fenced == nil:
		t.Errorf("no successful fence of n1 through ipmi-n1 in the history")
	case takeoverAt.IsZero() || takeoverAt.Before(fenced.Time):
		t.Errorf("takeover at %v is not after the confirmed fence at %v", takeoverAt, fenced.Time)
	}
	hooks := c.L.BMC("n1").HookLog()[hooksBefore:]
	if !slices.ContainsFunc(hooks, func(s string) bool { return strings.Contains(s, "set power 0") }) {
		t.Errorf("n1's BMC never received a power off: %v", hooks)
	}
	if bmcOffs(c)["n3"] != n3Offs || !c.Running("n3") || c.L.PowerState("n3") != lab.PowerOn {
		t.Errorf("n3 was fenced or lost its hasan serve during the takeover")
	}
	if lim := maxGap(t); takeoverPause > lim {
		t.Errorf("n3's takeover paused I/O for %v, want at most %v (HASAN_CLUSTER_MAX_GAP overrides)", takeoverPause, lim)
	}
	t.Logf("n2 lost: out of the ISR %v after the cut, I/O pause %v", shrunk.Round(time.Millisecond), lossPause.Round(time.Millisecond))
	t.Logf("replace n2 by n3 via %s's API: committed %v after the call, n3 in the ISR %v after it, I/O pause %v (reconnects %d, io_errors %d)",
		leader, committed.Round(time.Millisecond), inISR.Round(time.Millisecond), replPause.Round(time.Millisecond),
		after.Reconnects-before.Reconnects, after.IOErrors-before.IOErrors)
	if fenced != nil {
		t.Logf("n1 lost: fence record %v after the cut (took %v), takeover %v after, I/O pause %v",
			fenced.Time.Sub(cutAt).Round(time.Millisecond), fenced.Duration.Round(time.Millisecond),
			takeoverAt.Sub(cutAt).Round(time.Millisecond), takeoverPause.Round(time.Millisecond))
	}
	t.Logf("worst pause over the run %v, ended %v after n2's cut (n1's cut at %v); pairs seen late by the clock %d",
		worst.Round(time.Millisecond), last.GapEnd.Sub(offAt).Round(time.Millisecond), cutAt.Sub(offAt).Round(time.Millisecond), clock.Missed())
}
