package probe

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"time"
)

// Scenario is one disruption the driver repeats.
type Scenario struct {
	Name string
	// Disrupt breaks the path and returns once the system has been left to
	// recover (for example: kill the target, wait, restart it; or power
	// off the owner through the lab). It must not wait for I/O to resume:
	// the driver does that.
	Disrupt func(ctx context.Context, run int) error
	// Restore, if set, runs after each run to bring the system back to its
	// starting state (for example restart the node that was killed).
	Restore func(ctx context.Context, run int) error
	// Warmup pairs before the disruption (5) and pairs required after it to
	// call the run recovered (5).
	Warmup, Recover int
	// RecoverTimeout bounds the wait for recovery (30 s); a run that does
	// not recover counts as failed with its gap so far.
	RecoverTimeout time.Duration
}

// Run is one repeat's outcome.
type Run struct {
	Scenario string `json:"scenario"`
	Run      int    `json:"run"`
	Result
	Recovered bool   `json:"recovered"`
	Error     string `json:"error,omitempty"`
}

// Summary aggregates the runs of one scenario.
type Summary struct {
	Scenario string    `json:"scenario"`
	Runs     int       `json:"runs"`
	Failed   int       `json:"failed"` // did not recover, or lost a write
	Gaps     []Seconds `json:"gaps_s"`
	P50      Seconds   `json:"p50_s"`
	P99      Seconds   `json:"p99_s"`
	Max      Seconds   `json:"max_s"`
	// Totals over the runs.
	IOErrors       int `json:"io_errors"`
	LoginFailures  int `json:"login_failures"`
	Reconnects     int `json:"reconnects"`
	UnitAttentions int `json:"unit_attentions"`
	LostWrites     int `json:"lost_writes"`
}

// Repeat runs sc n times, each with a fresh probe on cfg, calling each after
// every run (to print its JSON line), and summarises the gaps. It returns an
// error only when ctx ends or Disrupt/Restore fail; lost writes and runs that
// never recover are in the Summary.
func Repeat(ctx context.Context, cfg Config, sc Scenario, n int, each func(Run)) (Summary, error) {
	if sc.Warmup == 0 {
		sc.Warmup = 5
	}
	if sc.Recover == 0 {
		sc.Recover = 5
	}
	if sc.RecoverTimeout == 0 {
		sc.RecoverTimeout = 30 * time.Second
	}
	var runs []Run
	for i := range n {
		r, err := repeatOnce(ctx, cfg, sc, i)
		if err != nil {
			return summarize(sc.Name, runs), err
		}
		runs = append(runs, r)
		if each != nil {
			each(r)
		}
	}
	return summarize(sc.Name, runs), nil
}

func repeatOnce(ctx context.Context, cfg Config, sc Scenario, i int) (Run, error) {
	p := New(cfg)
	pctx, stop := context.WithCancel(ctx)
	defer stop()
	type out struct {
		r   Result
		err error
	}
	var o out
	probeDone := make(chan struct{})
	go func() {
		o.r, o.err = p.Run(pctx)
		close(probeDone)
	}()
	// A probe that stops early (lost write) ends the waits at once.
	waitCtx, cancelWait := context.WithCancel(ctx)
	defer cancelWait()
	go func() {
		select {
		case <-probeDone:
			cancelWait()
		case <-waitCtx.Done():
		}
	}()
	finish := func() out {
		stop()
		<-probeDone
		return o
	}
	run := Run{Scenario: sc.Name, Run: i}
	wctx, cancel := context.WithTimeout(waitCtx, sc.RecoverTimeout)
	err := p.WaitPairs(wctx, sc.Warmup)
	cancel()
	if err != nil {
		o = finish()
		run.Result, run.Error = o.r, fmt.Sprintf("no I/O before the disruption: %v", errors.Join(o.err, err))
		return run, ctx.Err()
	}
	if err := sc.Disrupt(ctx, i); err != nil {
		finish()
		return run, fmt.Errorf("probe: %s run %d: disrupt: %w", sc.Name, i, err)
	}
	wctx, cancel = context.WithTimeout(waitCtx, sc.RecoverTimeout)
	err = p.WaitPairs(wctx, sc.Recover)
	cancel()
	o = finish()
	run.Result = o.r
	run.Recovered = err == nil && o.err == nil
	if o.err != nil {
		run.Error = o.err.Error()
	} else if err != nil {
		run.Error = "did not recover: " + err.Error()
		// The outage is still open: it is at least this long.
		run.Gap = max(run.Gap, run.SinceLastPair)
	}
	if sc.Restore != nil {
		if err := sc.Restore(ctx, i); err != nil {
			return run, fmt.Errorf("probe: %s run %d: restore: %w", sc.Name, i, err)
		}
	}
	return run, ctx.Err()
}

func summarize(name string, runs []Run) Summary {
	s := Summary{Scenario: name, Runs: len(runs)}
	for _, r := range runs {
		s.Gaps = append(s.Gaps, r.Gap)
		if !r.Recovered || r.LostWrites > 0 {
			s.Failed++
		}
		s.IOErrors += r.IOErrors
		s.LoginFailures += r.LoginFailures
		s.Reconnects += r.Reconnects
		s.UnitAttentions += r.UnitAttentions
		s.LostWrites += r.LostWrites
	}
	s.P50 = Percentile(s.Gaps, 50)
	s.P99 = Percentile(s.Gaps, 99)
	s.Max = Percentile(s.Gaps, 100)
	return s
}

// Percentile is the nearest-rank percentile (0 < p <= 100): the smallest
// value with at least p% of the values at or below it. With 10 runs p99 is
// the maximum, which is what a "p99 <= 2 s over 10 repeats" goal can
// honestly claim.
func Percentile(v []Seconds, p float64) Seconds {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	k := int(math.Ceil(p/100*float64(len(s)))) - 1
	return s[min(max(k, 0), len(s)-1)]
}

// WriteHuman prints a summary the way `make bench` prints its tables.
func (s Summary) WriteHuman(w io.Writer) {
	var gaps []string
	for _, g := range s.Gaps {
		gaps = append(gaps, fmt.Sprintf("%.3f", time.Duration(g).Seconds()))
	}
	fmt.Fprintf(w, "failover gap: %s (%d runs, %d failed)\n", s.Scenario, s.Runs, s.Failed)
	fmt.Fprintf(w, "  p50 %.3f s   p99 %.3f s   max %.3f s\n", time.Duration(s.P50).Seconds(), time.Duration(s.P99).Seconds(), time.Duration(s.Max).Seconds())
	fmt.Fprintf(w, "  gaps (s): %s\n", strings.Join(gaps, " "))
	fmt.Fprintf(w, "  I/O errors seen by the client: %d   reconnects: %d   failed logins: %d   unit attentions: %d\n",
		s.IOErrors, s.Reconnects, s.LoginFailures, s.UnitAttentions)
	fmt.Fprintf(w, "  lost acknowledged writes: %d\n", s.LostWrites)
}
