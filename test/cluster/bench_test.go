package cluster

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/bench/failover/initiator"
	"github.com/hasan-storage/hasan/bench/failover/probe"
	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/fencing"
)

// BenchEnv turns TestFailoverBench on (with E2EEnv): it takes minutes.
const BenchEnv = "HASAN_CLUSTER_BENCH"

// benchRow is one line of the failover table.
type benchRow struct {
	sum      probe.Summary
	goal     time.Duration
	overlaps int
	// unplanned: runs whose takeover did not follow a confirmed fence of
	// the old owner; planned: runs that fenced anything.
	fenceViolations int
}

// TestFailoverBench is the failover-gap part of `make bench`: on one
// cluster, the owner's hasan serve is SIGKILLed (the node stays powered,
// so the cluster must fence it through IPMI), the owner loses power, and
// the group is moved (planned), HASAN_BENCH_REPEATS times each (10). The
// probe (FUA write + read-back every 100 ms, 0.3 s login and 1 s I/O
// deadlines, ring check after every re-login) measures each gap. After an
// unplanned run the old owner is powered on, restarted, set online and
// resynced before the next. It prints p50/p99 per scenario, the I/O errors
// the client saw and the lost acknowledged writes, against the issue-5
// goals, and fails when a goal is missed.
func TestFailoverBench(t *testing.T) {
	requireE2E(t)
	if os.Getenv(BenchEnv) != "1" {
		t.Skip("failover bench: set " + BenchEnv + "=1 (make bench)")
	}
	repeats := 10
	if s := os.Getenv("HASAN_BENCH_REPEATS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("HASAN_BENCH_REPEATS=%q", s)
		}
		repeats = n
	}
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	c := startCluster(t, ctx)
	probeCfg := probe.Config{Initiator: initiator.Config{Portal: c.Portal, Target: iqn, Dial: c.L.Initiator().DialContext},
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}

	var rows []benchRow
	unplanned := func(name string, cut func(owner string) error) benchRow {
		row := benchRow{goal: 2 * time.Second}
		var owner string
		var cutAt time.Time
		sc := probe.Scenario{
			Name: name,
			Disrupt: func(ctx context.Context, run int) error {
				owner = c.Owner(t, ctx)
				cutAt = time.Now()
				return cut(owner)
			},
			Restore: func(ctx context.Context, run int) error {
				surv := c.Other(owner)
				waitFor(t, ctx, 30*time.Second, "the takeover by "+surv, func() (bool, error) {
					st, err := c.State(ctx)
					if err != nil {
						return false, err
					}
					return st.Groups[group].Owner == surv, nil
				})
				st, err := c.State(ctx)
				if err != nil {
					return err
				}
				if ok, line := fencedBeforeTakeover(st, owner, cutAt); ok {
					t.Logf("%s run %d: %s", name, run, line)
				} else {
					row.fenceViolations++
					t.Errorf("%s run %d: %s", name, run, line)
				}
				c.Restore(t, ctx, owner)
				c.WaitHealthy(t, ctx)
				return nil
			},
		}
		w := c.WatchWriters(ctx)
		sum, err := probe.Repeat(ctx, probeCfg, sc, repeats, func(r probe.Run) { logRun(t, r) })
		overlaps, _ := w.Stop()
		row.sum, row.overlaps = sum, len(overlaps)
		for _, o := range overlaps {
			t.Errorf("%s: two writers: %s", name, o)
		}
		if err != nil {
			t.Errorf("%s: %v", name, err)
		}
		return row
	}
	rows = append(rows, unplanned("owner crash (SIGKILL, IPMI fence)", func(owner string) error { return c.L.Crash(owner) }))
	rows = append(rows, unplanned("owner power loss", func(owner string) error { return c.L.PowerOff(owner) }))

	{
		row := benchRow{goal: 300 * time.Millisecond}
		var since time.Time
		sc := probe.Scenario{
			Name: "planned move (group-move)",
			Disrupt: func(ctx context.Context, run int) error {
				since = time.Now()
				owner := c.Owner(t, ctx)
				return c.Propose(ctx, &cluster.Command{Kind: cluster.KindGroupMove, GroupMove: &cluster.GroupMoveCmd{Group: group, Node: c.Other(owner)}})
			},
			Restore: func(ctx context.Context, run int) error {
				c.WaitHealthy(t, ctx)
				st, err := c.State(ctx)
				if err != nil {
					return err
				}
				if recs := st.FenceHistory; len(recs) > 0 && !recs[len(recs)-1].Time.Before(since) {
					row.fenceViolations++
					t.Errorf("planned move run %d fenced %s", run, recs[len(recs)-1].Node)
				}
				return nil
			},
		}
		w := c.WatchWriters(ctx)
		sum, err := probe.Repeat(ctx, probeCfg, sc, repeats, func(r probe.Run) { logRun(t, r) })
		overlaps, _ := w.Stop()
		row.sum, row.overlaps = sum, len(overlaps)
		for _, o := range overlaps {
			t.Errorf("planned move: two writers: %s", o)
		}
		if err != nil {
			t.Errorf("planned move: %v", err)
		}
		rows = append(rows, row)
	}

	var b strings.Builder
	writeBenchTable(&b, rows)
	fmt.Print(b.String())
	for _, r := range rows {
		switch {
		case r.sum.LostWrites > 0:
			t.Errorf("%s: %d acknowledged writes lost (goal 0)", r.sum.Scenario, r.sum.LostWrites)
		case r.sum.Failed > 0:
			t.Errorf("%s: %d runs did not recover", r.sum.Scenario, r.sum.Failed)
		case time.Duration(r.sum.P99) > r.goal:
			t.Errorf("%s: p99 gap %v over the goal %v", r.sum.Scenario, time.Duration(r.sum.P99), r.goal)
		}
	}
}

// fencedBeforeTakeover checks, in the committed state, that owner was
// fenced off (confirmed) after cutAt and that the takeover came after the
// confirmation, and describes the timeline.
func fencedBeforeTakeover(st *cluster.State, owner string, cutAt time.Time) (bool, string) {
	var fenced *fencing.Record
	for _, r := range fenceRecords(st, owner, cutAt) {
		if r.Action == "off" && r.Outcome == fencing.OutcomeSuccess {
			fenced = &r
			break
		}
	}
	if fenced == nil {
		return false, "no confirmed fence of " + owner + " before its group moved"
	}
	confirmed := fenced.Time.Add(fenced.Duration)
	var takeover time.Time
	for _, e := range eventsSince(st, "takeover", cutAt) {
		if e.Group == group {
			takeover = e.Time
			break
		}
	}
	line := fmt.Sprintf("fence of %s via %s started +%v, confirmed +%v, takeover +%v", owner, fenced.Device,
		fenced.Time.Sub(cutAt).Round(time.Millisecond), confirmed.Sub(cutAt).Round(time.Millisecond), takeover.Sub(cutAt).Round(time.Millisecond))
	if takeover.IsZero() || takeover.Before(confirmed) {
		return false, line + ": takeover not after the confirmation"
	}
	return true, line
}

func logRun(t *testing.T, r probe.Run) {
	t.Logf("%s run %d: gap %.3f s, recovered %v, io_errors %d, reconnects %d, lost %d %s",
		r.Scenario, r.Run, time.Duration(r.Gap).Seconds(), r.Recovered, r.IOErrors, r.Reconnects, r.LostWrites, r.Error)
}

// writeBenchTable prints the `make bench` failover table.
func writeBenchTable(w io.Writer, rows []benchRow) {
	fmt.Fprintf(w, "\nfailover gap through the VIP (probe: FUA write + read-back every 100 ms, login 0.3 s, I/O 1 s)\n")
	fmt.Fprintf(w, "%-36s %5s %7s %7s %7s %9s %5s %6s %8s %9s  %s\n",
		"scenario", "runs", "p50 s", "p99 s", "max s", "io_errors", "lost", "failed", "2writers", "fence_bad", "goal")
	for _, r := range rows {
		s := r.sum
		verdict := "met"
		if time.Duration(s.P99) > r.goal || s.LostWrites > 0 || s.Failed > 0 || r.overlaps > 0 || r.fenceViolations > 0 {
			verdict = "MISSED"
		}
		fmt.Fprintf(w, "%-36s %5d %7.3f %7.3f %7.3f %9d %5d %6d %8d %9d  p99 <= %.1f s, 0 lost: %s\n",
			s.Scenario, s.Runs, time.Duration(s.P50).Seconds(), time.Duration(s.P99).Seconds(), time.Duration(s.Max).Seconds(),
			s.IOErrors, s.LostWrites, s.Failed, r.overlaps, r.fenceViolations, r.goal.Seconds(), verdict)
	}
	for _, r := range rows {
		var gaps []string
		for _, g := range r.sum.Gaps {
			gaps = append(gaps, fmt.Sprintf("%.3f", time.Duration(g).Seconds()))
		}
		fmt.Fprintf(w, "  %s gaps (s): %s\n", r.sum.Scenario, strings.Join(gaps, " "))
	}
}
