package conformance

import (
	"bytes"
	"compress/gzip"
	"io"
	"os"
	"strings"
	"testing"
)

func readTestdata(t *testing.T, name string) []byte {
	t.Helper()
	raw, err := os.ReadFile("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	if strings.HasSuffix(name, ".gz") {
		zr, err := gzip.NewReader(bytes.NewReader(raw))
		if err != nil {
			t.Fatal(err)
		}
		if raw, err = io.ReadAll(zr); err != nil {
			t.Fatal(err)
		}
	}
	return raw
}

func catalog(t *testing.T) [][2]string {
	t.Helper()
	c, err := ParseCatalog(bytes.NewReader(readTestdata(t, "catalog.txt")))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// tgt-getlbastatus.out is `iscsi-test-cu -d -t SCSI.GetLBAStatus` against
// tgtd 1.0.85: one pass, one failure, one skip.
func TestParseSmallRun(t *testing.T) {
	rep, err := ParseVerbose(bytes.NewReader(readTestdata(t, "tgt-getlbastatus.out")), [][2]string{{"SCSI", "GetLBAStatus"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := rep.Check(); err != nil {
		t.Fatal(err)
	}
	want := []struct {
		id      string
		outcome Outcome
		reason  string
	}{
		{"SCSI.GetLBAStatus.Simple", Passed, ""},
		{"SCSI.GetLBAStatus.BeyondEol", Failed, "GET_LBA_STATUS successful but should have failed with ILLEGAL_REQUEST(0x05)/LBA_OUT_OF_RANGE(0x2100)"},
		{"SCSI.GetLBAStatus.UnmapSingle", Skipped, "Logical unit is fully provisioned. Skipping test"},
	}
	if len(rep.Tests) != len(want) {
		t.Fatalf("got %d tests, want %d", len(rep.Tests), len(want))
	}
	for i, w := range want {
		got := rep.Tests[i]
		reason := got.SkipReason()
		if got.Outcome == Failed {
			reason = got.FailReason()
		}
		if got.ID() != w.id || got.Outcome != w.outcome || reason != w.reason {
			t.Errorf("test %d = %s %s %q, want %s %s %q", i, got.ID(), got.Outcome, reason, w.id, w.outcome, w.reason)
		}
	}
	if !strings.Contains(strings.Join(rep.Tests[1].Messages, "\n"), "test_get_lba_status_beyond_eol.c:38") {
		t.Errorf("assertion line not kept: %q", rep.Tests[1].Messages)
	}
}

// tgt-thick-multipath.out.gz is a full `iscsi-test-cu -d URL URL` run against
// tgtd 1.0.85 with a 1 GiB preallocated LUN: 615 tests, 595 passed (CUnit's
// count, skips included), 20 failed.
func TestParseFullRun(t *testing.T) {
	rep, err := ParseVerbose(bytes.NewReader(readTestdata(t, "tgt-thick-multipath.out.gz")), catalog(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := rep.Check(); err != nil {
		t.Fatal(err)
	}
	passed, failed, skipped := rep.Count()
	if passed+skipped != 595 || failed != 20 || len(rep.Tests) != 615 {
		t.Fatalf("passed %d + skipped %d, failed %d, total %d; want 595, 20, 615", passed, skipped, failed, len(rep.Tests))
	}
	if skipped == 0 {
		t.Fatal("no skips found; tgt skips COMPARE AND WRITE tests")
	}
	perFamily := map[string]int{}
	for _, tr := range rep.Tests {
		perFamily[tr.Family]++
	}
	// The catalog (iscsi-test-cu -l) has 230 ALL, 215 SCSI, 15 iSCSI and 155
	// LINUX tests; the run must map every test to one of them.
	for fam, n := range map[string]int{"ALL": 230, "SCSI": 215, "iSCSI": 15, "LINUX": 155} {
		if perFamily[fam] != n {
			t.Errorf("family %s: %d tests, want %d (all: %v)", fam, perFamily[fam], n, perFamily)
		}
	}
	var caw *TestResult
	for i := range rep.Tests {
		if rep.Tests[i].ID() == "LINUX.MultipathIO.CompareAndWriteAsync" {
			caw = &rep.Tests[i]
		}
	}
	if caw == nil || caw.Outcome != Failed {
		t.Fatalf("LINUX.MultipathIO.CompareAndWriteAsync = %+v, want failed", caw)
	}
}

// A suite that dies mid-run (target crash, timeout) must not pass: the test
// it was in fails and Check reports the missing summary.
func TestParseTruncatedRun(t *testing.T) {
	full := string(readTestdata(t, "tgt-getlbastatus.out"))
	cut := full[:strings.Index(full, "  Test: UnmapSingle")+len("  Test: UnmapSingle ...")]
	rep, err := ParseVerbose(strings.NewReader(cut), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := rep.Check(); err == nil {
		t.Fatal("Check accepted a run without a summary")
	}
	last := rep.Tests[len(rep.Tests)-1]
	if last.Name != "UnmapSingle" || last.Outcome != Failed || !last.NoResult {
		t.Fatalf("last test = %+v, want UnmapSingle failed with no result", last)
	}
}

// A summary that disagrees with the parsed tests means the parser lost
// something; Check must say so instead of trusting either.
func TestCheckCatchesMismatch(t *testing.T) {
	full := string(readTestdata(t, "tgt-getlbastatus.out"))
	doctored := strings.Replace(full, "tests      3      3      2      1", "tests      4      4      3      1", 1)
	rep, err := ParseVerbose(strings.NewReader(doctored), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := rep.Check(); err == nil {
		t.Fatal("Check accepted 3 parsed tests against a summary of 4")
	}
}

func TestAllowlist(t *testing.T) {
	a, err := ParseAllowlist(strings.NewReader(`
# comment
thick,chap  Unmap.*             LU is thick: no UNMAP to test
*           *.Eject             media is not removable
thin        LINUX.Foo.Bar       only under LINUX
`))
	if err != nil {
		t.Fatal(err)
	}
	unmap := TestResult{Family: "SCSI", Suite: "Unmap", Name: "Simple", Outcome: Skipped}
	eject := TestResult{Family: "ALL", Suite: "PreventAllow", Name: "Eject", Outcome: Skipped}
	fooLinux := TestResult{Family: "LINUX", Suite: "Foo", Name: "Bar", Outcome: Skipped}
	fooSCSI := TestResult{Family: "SCSI", Suite: "Foo", Name: "Bar", Outcome: Skipped}
	cases := []struct {
		run  string
		t    TestResult
		line int // 0: no rule
	}{
		{"thick", unmap, 3},
		{"chap", unmap, 3},
		{"thin", unmap, 0},
		{"thin", eject, 4},
		{"thin", fooLinux, 5},
		{"thin", fooSCSI, 0},
	}
	for _, c := range cases {
		got := a.Match(c.run, c.t)
		gotLine := 0
		if got != nil {
			gotLine = got.Line
		}
		if gotLine != c.line {
			t.Errorf("Match(%s, %s) = line %d, want %d", c.run, c.t.ID(), gotLine, c.line)
		}
	}
	if r := a.Match("thick", unmap); r.Reason != "LU is thick: no UNMAP to test" {
		t.Errorf("reason = %q", r.Reason)
	}
	for _, bad := range []string{"thick Unmap.*", "* [ reason"} {
		if _, err := ParseAllowlist(strings.NewReader(bad)); err == nil {
			t.Errorf("ParseAllowlist(%q) accepted a bad line", bad)
		}
	}
}

// Judge and Problems are the verdict: failures always fail a run, unlisted
// skips fail only an enforced (hasan) run.
func TestVerdict(t *testing.T) {
	a, err := ParseAllowlist(strings.NewReader("* A.Listed listed on purpose\n"))
	if err != nil {
		t.Fatal(err)
	}
	rep := &Report{
		Tests: []TestResult{
			{Family: "ALL", Suite: "A", Name: "Listed", Outcome: Skipped, Messages: []string{"[SKIPPED] x"}},
			{Family: "ALL", Suite: "A", Name: "Unlisted", Outcome: Skipped, Messages: []string{"[SKIPPED] y"}},
			{Family: "ALL", Suite: "A", Name: "Ok", Outcome: Passed},
		},
		Summary: &Counts{Total: 3, Ran: 3, Passed: 3},
	}
	r := &Run{Name: "thick", Peer: "hasan", Report: rep, Enforce: true}
	r.Judge(a)
	if len(r.Unlisted) != 1 || r.Unlisted[0].Name != "Unlisted" || len(r.Allowed) != 1 {
		t.Fatalf("unlisted %v, allowed %v", r.Unlisted, r.Allowed)
	}
	if len(r.Problems()) != 1 {
		t.Fatalf("problems = %v, want the unlisted skip", r.Problems())
	}
	r.Enforce = false
	if len(r.Problems()) != 0 {
		t.Fatalf("peer run problems = %v, want none", r.Problems())
	}
	rep.Tests[2].Outcome = Failed
	if len(r.Problems()) != 1 {
		t.Fatalf("problems = %v, want the failure", r.Problems())
	}
	var out bytes.Buffer
	WriteSummary(&out, []*Run{r})
	for _, want := range []string{"A.Unlisted [ALL]: y", "A.Listed [ALL]: x (skips.txt:1)", "FAIL"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("summary lacks %q:\n%s", want, out.String())
		}
	}
}

// The checked-in allowlist must parse, so a broken edit fails plain go test
// rather than the long conformance run.
func TestSkipsFileParses(t *testing.T) {
	a, err := loadAllowlist("skips.txt")
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range a.Rules {
		for _, run := range r.Runs {
			if run != "*" && run != "thick" && run != "thin" && run != "chap" {
				t.Errorf("skips.txt:%d: unknown run %q", r.Line, run)
			}
		}
	}
}
