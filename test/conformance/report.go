package conformance

import (
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
)

// Run is one iscsi-test-cu run and its verdict.
type Run struct {
	Name string // thick, thin, chap
	Peer string // hasan, tgt
	Desc string
	Wall time.Duration
	// Report is nil when the suite could not run at all.
	Report *Report
	// Err is a run-level problem: the target did not start, the suite did not
	// finish, or the parse disagrees with CUnit's summary.
	Err error
	// Enforce makes unlisted skips fail the run (hasan); for a peer such as
	// tgt they are only reported.
	Enforce bool
	// Unlisted are skipped tests that no allowlist rule covers.
	Unlisted []TestResult
	// Allowed maps each skipped-and-allowed test to its rule.
	Allowed map[string]*SkipRule
}

// Judge fills Unlisted and Allowed from the allowlist.
func (r *Run) Judge(a *Allowlist) {
	r.Unlisted, r.Allowed = nil, map[string]*SkipRule{}
	if r.Report == nil {
		return
	}
	for _, t := range r.Report.Tests {
		if t.Outcome != Skipped {
			continue
		}
		if rule := a.Match(r.Name, t); rule != nil {
			r.Allowed[t.ID()] = rule
		} else {
			r.Unlisted = append(r.Unlisted, t)
		}
	}
}

// Problems lists why the run fails; empty means it passes.
func (r *Run) Problems() []string {
	var p []string
	if r.Err != nil {
		p = append(p, r.Err.Error())
	}
	if r.Report != nil {
		if _, failed, _ := r.Report.Count(); failed > 0 {
			p = append(p, fmt.Sprintf("%d failed tests", failed))
		}
	}
	if r.Enforce && len(r.Unlisted) > 0 {
		p = append(p, fmt.Sprintf("%d skipped tests not listed in skips.txt", len(r.Unlisted)))
	}
	return p
}

// WriteSummary prints one compact table over all runs, then each run's
// detail: per-family counts, failures per suite, and the failing and skipped
// tests (a test run under several families is listed once, with them).
func WriteSummary(w io.Writer, runs []*Run) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "run\tpeer\ttotal\tpassed\tfailed\tskipped\tunlisted skips\twall\tverdict\t")
	for _, r := range runs {
		total, passed, failed, skipped := 0, 0, 0, 0
		if r.Report != nil {
			passed, failed, skipped = r.Report.Count()
			total = len(r.Report.Tests)
			if r.Report.Summary != nil {
				total = r.Report.Summary.Total
			}
		}
		verdict := "PASS"
		if len(r.Problems()) > 0 {
			verdict = "FAIL"
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%d\t%d\t%.0fs\t%s\t\n", r.Name, r.Peer, total, passed, failed, skipped, len(r.Unlisted), r.Wall.Seconds(), verdict)
	}
	tw.Flush()
	for _, r := range runs {
		writeRun(w, r)
	}
}

func writeRun(w io.Writer, r *Run) {
	fmt.Fprintf(w, "\n=== %s / %s: %s (%.0fs)\n", r.Peer, r.Name, r.Desc, r.Wall.Seconds())
	for _, p := range r.Problems() {
		fmt.Fprintf(w, "  FAIL: %s\n", p)
	}
	if r.Report == nil {
		return
	}
	type tally struct{ total, passed, failed, skipped int }
	fams := map[string]*tally{}
	var order []string
	failedBySuite := map[string]int{}
	for _, t := range r.Report.Tests {
		f := fams[t.Family]
		if f == nil {
			f = &tally{}
			fams[t.Family] = f
			order = append(order, t.Family)
		}
		f.total++
		switch t.Outcome {
		case Passed:
			f.passed++
		case Failed:
			f.failed++
			failedBySuite[t.Suite]++
		case Skipped:
			f.skipped++
		}
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "  family\ttotal\tpassed\tfailed\tskipped\t")
	for _, name := range order {
		f := fams[name]
		fmt.Fprintf(tw, "  %s\t%d\t%d\t%d\t%d\t\n", name, f.total, f.passed, f.failed, f.skipped)
	}
	tw.Flush()
	if len(failedBySuite) > 0 {
		suites := make([]string, 0, len(failedBySuite))
		for s := range failedBySuite {
			suites = append(suites, s)
		}
		sort.Slice(suites, func(i, j int) bool {
			if failedBySuite[suites[i]] != failedBySuite[suites[j]] {
				return failedBySuite[suites[i]] > failedBySuite[suites[j]]
			}
			return suites[i] < suites[j]
		})
		parts := make([]string, len(suites))
		for i, s := range suites {
			parts[i] = fmt.Sprintf("%s %d", s, failedBySuite[s])
		}
		fmt.Fprintf(w, "  failures by suite: %s\n", strings.Join(parts, ", "))
	}
	writeGroup(w, "failed", r.Report.Tests, func(t TestResult) (bool, string) {
		return t.Outcome == Failed, t.FailReason()
	})
	unlisted := map[string]bool{}
	for _, t := range r.Unlisted {
		unlisted[t.ID()] = true
	}
	label := "skipped, NOT in skips.txt"
	if !r.Enforce {
		label = "skipped, not in skips.txt (peer: not enforced)"
	}
	writeGroup(w, label, r.Report.Tests, func(t TestResult) (bool, string) {
		return t.Outcome == Skipped && unlisted[t.ID()], t.SkipReason()
	})
	writeGroup(w, "skipped, allowed by skips.txt", r.Report.Tests, func(t TestResult) (bool, string) {
		rule := r.Allowed[t.ID()]
		if t.Outcome != Skipped || rule == nil {
			return false, ""
		}
		return true, fmt.Sprintf("%s (skips.txt:%d)", t.SkipReason(), rule.Line)
	})
}

// writeGroup lists the selected tests as Suite.Test [families]: reason.
func writeGroup(w io.Writer, label string, tests []TestResult, pick func(TestResult) (bool, string)) {
	type entry struct {
		families []string
		reason   string
	}
	byKey := map[string]*entry{}
	var keys []string
	for _, t := range tests {
		ok, reason := pick(t)
		if !ok {
			continue
		}
		e := byKey[t.Key()]
		if e == nil {
			e = &entry{reason: reason}
			byKey[t.Key()] = e
			keys = append(keys, t.Key())
		}
		if !slices.Contains(e.families, t.Family) {
			e.families = append(e.families, t.Family)
		}
	}
	if len(keys) == 0 {
		return
	}
	fmt.Fprintf(w, "  %s (%d distinct):\n", label, len(keys))
	for _, k := range keys {
		e := byKey[k]
		fmt.Fprintf(w, "    %s [%s]: %s\n", k, strings.Join(e.families, ","), e.reason)
	}
}
