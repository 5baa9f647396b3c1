package conformance

import (
	"bufio"
	"fmt"
	"io"
	"path"
	"slices"
	"strings"
)

// SkipRule allows matching tests to be skipped in the named runs.
type SkipRule struct {
	// Runs are run names (thick, thin, chap); "*" means every run.
	Runs []string
	// Pattern is a path.Match glob over Suite.Test, or over
	// Family.Suite.Test when it has three dot-separated parts.
	Pattern string
	Reason  string
	Line    int
}

func (r SkipRule) matches(run string, t TestResult) bool {
	if !slices.Contains(r.Runs, "*") && !slices.Contains(r.Runs, run) {
		return false
	}
	subject := t.Key()
	if strings.Count(r.Pattern, ".") >= 2 {
		subject = t.ID()
	}
	ok, _ := path.Match(r.Pattern, subject)
	return ok
}

// Allowlist is the parsed skips.txt.
type Allowlist struct {
	Rules []SkipRule
}

// ParseAllowlist reads lines of "RUNS PATTERN REASON...": RUNS is * or a
// comma-separated list of run names, PATTERN a glob, REASON free text that is
// required, because an entry without a reason is how features vanish.
// Blank lines and lines starting with # are ignored.
func ParseAllowlist(r io.Reader) (*Allowlist, error) {
	a := &Allowlist{}
	sc := bufio.NewScanner(r)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 3 {
			return nil, fmt.Errorf("conformance: skips line %d: want RUNS PATTERN REASON, got %q", n, line)
		}
		if _, err := path.Match(f[1], ""); err != nil {
			return nil, fmt.Errorf("conformance: skips line %d: bad pattern %q: %w", n, f[1], err)
		}
		rest := strings.TrimSpace(strings.TrimPrefix(line, f[0]))
		reason := strings.TrimSpace(strings.TrimPrefix(rest, f[1]))
		a.Rules = append(a.Rules, SkipRule{Runs: strings.Split(f[0], ","), Pattern: f[1], Reason: reason, Line: n})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("conformance: read skips: %w", err)
	}
	return a, nil
}

// Match returns the first rule that allows t to be skipped in run, or nil.
func (a *Allowlist) Match(run string, t TestResult) *SkipRule {
	for i := range a.Rules {
		if a.Rules[i].matches(run, t) {
			return &a.Rules[i]
		}
	}
	return nil
}
