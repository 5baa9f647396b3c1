package conformance

import (
	"bufio"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// Outcome is what one iscsi-test-cu test ended with.
type Outcome int

const (
	Passed Outcome = iota
	Failed
	// Skipped is a test that CUnit counts as passed but that logged
	// "[SKIPPED]": libiscsi skips by CU_PASS and return, so only the log shows
	// that nothing was checked.
	Skipped
)

func (o Outcome) String() string {
	switch o {
	case Passed:
		return "passed"
	case Failed:
		return "failed"
	case Skipped:
		return "skipped"
	}
	return "Outcome(" + strconv.Itoa(int(o)) + ")"
}

// TestResult is one test of one run.
type TestResult struct {
	Family  string // libiscsi family: ALL, SCSI, iSCSI, LINUX ("?" if unknown)
	Suite   string
	Name    string
	Outcome Outcome
	// Messages are the test's log lines: [SKIPPED]/[FAILED] notes and the
	// numbered assertion failures.
	Messages []string
	// NoResult is set when the output ended (crash, timeout) before the test
	// printed passed or FAILED; such a test counts as failed.
	NoResult bool
}

// ID is Family.Suite.Name, the form `iscsi-test-cu -t` takes.
func (r TestResult) ID() string { return r.Family + "." + r.Suite + "." + r.Name }

// Key is Suite.Name: the same test run under several families.
func (r TestResult) Key() string { return r.Suite + "." + r.Name }

// SkipReason is the first [SKIPPED] message, without the marker.
func (r TestResult) SkipReason() string {
	for _, m := range r.Messages {
		if s, ok := strings.CutPrefix(m, "[SKIPPED]"); ok {
			return strings.TrimSpace(s)
		}
	}
	return ""
}

// FailReason is the first [FAILED] message, else the first assertion.
func (r TestResult) FailReason() string {
	if r.NoResult {
		return "no result: output ended inside this test"
	}
	for _, m := range r.Messages {
		if s, ok := strings.CutPrefix(m, "[FAILED]"); ok {
			return strings.TrimSpace(s)
		}
	}
	if len(r.Messages) > 0 {
		return r.Messages[0]
	}
	return ""
}

// Counts is one row of CUnit's "Run Summary".
type Counts struct {
	Total, Ran, Passed, Failed, Inactive int
}

// Report is a parsed iscsi-test-cu run.
type Report struct {
	Tests []TestResult
	// Summary is CUnit's "tests" row; nil when the run never printed one
	// (crashed or killed).
	Summary *Counts
}

// Count tallies outcomes.
func (r *Report) Count() (passed, failed, skipped int) {
	for _, t := range r.Tests {
		switch t.Outcome {
		case Passed:
			passed++
		case Failed:
			failed++
		case Skipped:
			skipped++
		}
	}
	return
}

// Check compares the parsed tests with CUnit's own summary, so a parser that
// loses tests is caught rather than trusted.
func (r *Report) Check() error {
	if r.Summary == nil {
		return fmt.Errorf("conformance: incomplete run: no CUnit run summary after %d tests", len(r.Tests))
	}
	passed, failed, skipped := r.Count()
	s := r.Summary
	if len(r.Tests) != s.Ran || failed != s.Failed || passed+skipped != s.Passed {
		return fmt.Errorf("conformance: parsed %d tests (%d failed, %d passed incl. skips) but CUnit reports ran %d, failed %d, passed %d",
			len(r.Tests), failed, passed+skipped, s.Ran, s.Failed, s.Passed)
	}
	if s.Ran != s.Total {
		return fmt.Errorf("conformance: CUnit ran %d of %d tests", s.Ran, s.Total)
	}
	return nil
}

// ParseCatalog reads `iscsi-test-cu -l` and returns the (family, suite)
// pairs in the order the suite runs them. The run's own output names suites
// but not families, and the same suite runs under several families.
func ParseCatalog(r io.Reader) ([][2]string, error) {
	var out [][2]string
	seen := map[[2]string]bool{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		parts := strings.Split(strings.TrimSpace(sc.Text()), ".")
		if len(parts) != 3 {
			continue
		}
		k := [2]string{parts[0], parts[1]}
		if !seen[k] {
			seen[k] = true
			out = append(out, k)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("conformance: read catalog: %w", err)
	}
	return out, nil
}

// ParseVerbose parses iscsi-test-cu's default (verbose) output:
//
//	Suite: GetLBAStatus
//	  Test: Simple ...passed
//	  Test: BeyondEol ...    [FAILED] GET_LBA_STATUS successful but ...
//	FAILED
//	    1. test_get_lba_status_beyond_eol.c:38  - CU_ASSERT_EQUAL(_r,0)
//	  Test: UnmapSingle ...    [SKIPPED] Logical unit is fully provisioned. Skipping test
//	passed
//	Run Summary:    Type  Total    Ran Passed Failed Inactive
//	              suites      1      1    n/a      0        0
//	               tests      3      3      2      1        0
//
// catalog (from ParseCatalog) names each suite's family; it may be nil.
func ParseVerbose(r io.Reader, catalog [][2]string) (*Report, error) {
	rep := &Report{}
	var cur *TestResult
	family, suite := "?", ""
	next := 0 // position in catalog
	finish := func() {
		if cur == nil {
			return
		}
		if cur.NoResult {
			cur.Outcome = Failed
		}
		rep.Tests = append(rep.Tests, *cur)
		cur = nil
	}
	// content feeds one piece of a test's output. The result word starts a
	// line (or follows "..."); text after it on the same line was logged by
	// the next test's or suite's setup and does not change the outcome.
	content := func(s string) {
		t := strings.TrimSpace(s)
		if cur.NoResult {
			for word, outcome := range map[string]Outcome{"passed": Passed, "FAILED": Failed} {
				if rest, ok := strings.CutPrefix(t, word); ok {
					cur.NoResult = false
					cur.Outcome = outcome
					if outcome == Passed && cur.SkipReason() != "" {
						cur.Outcome = Skipped
					}
					t = strings.TrimSpace(rest)
					break
				}
			}
		}
		if t != "" {
			cur.Messages = append(cur.Messages, t)
		}
	}
	inSummary := false
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 16*1024*1024)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "Suite: "):
			finish()
			suite = strings.TrimSpace(strings.TrimPrefix(line, "Suite: "))
			family = "?"
			for j := next; j < len(catalog); j++ {
				if catalog[j][1] == suite {
					family, next = catalog[j][0], j+1
					break
				}
			}
		case strings.HasPrefix(line, "  Test: "):
			finish()
			rest := strings.TrimPrefix(line, "  Test: ")
			name, after, ok := strings.Cut(rest, " ...")
			if !ok {
				name, after = rest, ""
			}
			cur = &TestResult{Family: family, Suite: suite, Name: strings.TrimSpace(name), NoResult: true}
			content(after)
		case strings.HasPrefix(line, "Run Summary:"):
			finish()
			inSummary = true
		case inSummary:
			f := strings.Fields(line)
			if len(f) == 6 && f[0] == "tests" {
				var n [5]int
				for i := range n {
					v, err := strconv.Atoi(f[i+1])
					if err != nil {
						return nil, fmt.Errorf("conformance: run summary %q: %w", line, err)
					}
					n[i] = v
				}
				rep.Summary = &Counts{Total: n[0], Ran: n[1], Passed: n[2], Failed: n[3], Inactive: n[4]}
			}
		case cur != nil:
			content(line)
		}
	}
	finish()
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("conformance: read output: %w", err)
	}
	return rep, nil
}
