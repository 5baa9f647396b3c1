package replication

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/target"
	"github.com/hasan-storage/hasan/target/scsi"
)

// TestConformanceReplicatedLUN runs libiscsi's whole iscsi-test-cu suite
// (every family, destructive tests allowed) against a thin LUN whose backend
// is a 2-replica Volume over TLS on loopback, and fails on any failed test.
// Afterwards both replicas must be byte-identical and verify must agree.
// It takes minutes, so it runs only with HASAN_CONFORMANCE=1.
func TestConformanceReplicatedLUN(t *testing.T) {
	if os.Getenv("HASAN_CONFORMANCE") != "1" {
		t.Skip("set HASAN_CONFORMANCE=1 to run libiscsi iscsi-test-cu -d against a replicated LUN (takes minutes)")
	}
	bin, err := exec.LookPath("iscsi-test-cu")
	if err != nil {
		t.Fatalf("iscsi-test-cu not installed (Debian libiscsi-bin): %v", err)
	}
	c := newClusterSized(t, 1<<30, DefaultRegionSize, "n1", "n2")
	c.waitISR(2)
	lu, err := scsi.New(scsi.Config{VolumeID: [16]byte{0x4a, 0x5a, 3}, Thin: true, Backend: c.prim, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	const iqn = "iqn.2025-01.io.hasan:replicated"
	srv := target.NewServer(target.Config{Logger: testLogger(t)})
	if err := srv.AddTarget(target.TargetConfig{Name: iqn}); err != nil {
		t.Fatal(err)
	}
	if err := srv.AddLUN(iqn, 0, lu); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	defer func() {
		srv.Close()
		<-served
	}()

	url := fmt.Sprintf("iscsi://%s/%s/0", ln.Addr(), iqn)
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()
	// Verbose mode (the default) names every failed test; the CUnit Run
	// Summary at the end is the same as with -s.
	cmd := exec.CommandContext(ctx, bin, "-d",
		"-i", "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test",
		"-I", "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2", url)
	cmd.Dir = t.TempDir()
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	// A test binary that panics must not leave the suite spinning against
	// a dead portal.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	runErr := cmd.Run()
	took := time.Since(start)
	if p := os.Getenv("HASAN_CONFORMANCE_OUT"); p != "" {
		_ = os.WriteFile(p, out.Bytes(), 0o644)
	}
	sum, err := parseRunSummary(out.Bytes())
	if err != nil {
		t.Fatalf("iscsi-test-cu (%v): %v\n%s", runErr, err, tail(out.String(), 4000))
	}
	t.Logf("iscsi-test-cu -d %s: wall time %s, %d tests skipped by libiscsi\n%s", url, took.Round(time.Second), skippedTests(out.Bytes()), sum.table)
	if failed := failedTests(out.Bytes()); len(failed) > 0 || sum.testsFailed > 0 || sum.assertsFailed > 0 {
		t.Errorf("%d tests failed (%d asserts): %s", sum.testsFailed, sum.assertsFailed, strings.Join(failed, ", "))
	}
	if sum.testsRun < 600 {
		t.Errorf("only %d tests ran; expected the whole suite (615 in libiscsi 1.19)", sum.testsRun)
	}

	// Both replicas must hold exactly the same bytes after everything the
	// suite did (WRITE SAME, UNMAP, COMPARE AND WRITE, ...).
	if err := c.prim.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	rep, err := c.prim.Verify(context.Background(), false)
	if err != nil || len(rep.Mismatch) != 0 || len(rep.Skipped) != 0 {
		t.Fatalf("verify after the suite: %d mismatching, %d skipped regions, err %v", len(rep.Mismatch), len(rep.Skipped), err)
	}
	if !sameFiles(t, filepath.Join(c.nodes["n1"].dir, c.vol+".img"), filepath.Join(c.nodes["n2"].dir, c.vol+".img")) {
		t.Fatal("replica files differ after the conformance run")
	}
	t.Logf("replicas byte-identical; verify: %d regions, 0 mismatches", rep.Regions)
}

type runSummary struct {
	table                                string
	testsRun, testsFailed, assertsFailed int
}

var summaryRow = regexp.MustCompile(`^\s*(suites|tests|asserts)\s+(\d+|n/a)\s+(\d+|n/a)\s+(\d+|n/a)\s+(\d+|n/a)\s+(\d+|n/a)`)

// parseRunSummary reads CUnit's "Run Summary" table: Type, Total, Ran,
// Passed, Failed, Inactive.
func parseRunSummary(out []byte) (runSummary, error) {
	var s runSummary
	i := bytes.Index(out, []byte("Run Summary"))
	if i < 0 {
		return s, fmt.Errorf("no CUnit Run Summary in the output")
	}
	var table strings.Builder
	found := 0
	sc := bufio.NewScanner(bytes.NewReader(out[i:]))
	for n := 0; sc.Scan() && n < 8; n++ {
		line := sc.Text()
		table.WriteString(line + "\n")
		m := summaryRow.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		found++
		ran, _ := strconv.Atoi(m[3])
		failed, _ := strconv.Atoi(m[5])
		switch m[1] {
		case "tests":
			s.testsRun, s.testsFailed = ran, failed
		case "asserts":
			s.assertsFailed = failed
		}
	}
	if found < 3 {
		return s, fmt.Errorf("CUnit Run Summary incomplete:\n%s", table.String())
	}
	s.table = table.String()
	return s, nil
}

var cunitAssert = regexp.MustCompile(`^\s+\d+\. \S+\.c:\d+\s+- `)

// skippedTests counts distinct tests that libiscsi skipped (CUnit counts
// them as passed).
func skippedTests(out []byte) int {
	seen := map[string]bool{}
	var suite string
	for _, line := range strings.Split(string(out), "\n") {
		t := strings.TrimSpace(line)
		if strings.HasPrefix(t, "Suite: ") {
			suite = strings.TrimPrefix(t, "Suite: ")
		}
		if strings.HasPrefix(t, "Test: ") && strings.Contains(t, "[SKIPPED]") {
			name, _, _ := strings.Cut(strings.TrimPrefix(t, "Test: "), " ...")
			seen[suite+"."+name] = true
		}
	}
	return len(seen)
}

// failedTests lists the tests verbose CUnit output marks FAILED.
func failedTests(out []byte) []string {
	var failed []string
	var suite, cur string
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		t := strings.TrimSpace(line)
		if strings.HasPrefix(t, "Suite: ") {
			suite, cur = strings.TrimPrefix(t, "Suite: "), ""
		}
		if strings.HasPrefix(t, "Test: ") {
			cur = strings.TrimPrefix(t, "Test: ")
			if j := strings.Index(cur, " ..."); j >= 0 {
				cur = cur[:j]
			}
			cur = suite + "." + cur
		}
		// libiscsi logs "[FAILED] ..." for commands a test expects to
		// fail; CUnit's own verdict is a bare FAILED, followed by the
		// failed assertions ("  1. file.c:38  - CU_ASSERT...").
		verdict := strings.Contains(strings.ReplaceAll(line, "[FAILED]", ""), "FAILED") && !strings.Contains(line, "[FAILED]") ||
			cunitAssert.MatchString(line)
		if verdict && cur != "" && (len(failed) == 0 || failed[len(failed)-1] != cur) {
			failed = append(failed, cur)
		}
	}
	return failed
}

func sameFiles(t *testing.T, a, b string) bool {
	fa, err := os.Open(a)
	if err != nil {
		t.Fatal(err)
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		t.Fatal(err)
	}
	defer fb.Close()
	ba, bb := make([]byte, 1<<20), make([]byte, 1<<20)
	for off := int64(0); ; off += int64(len(ba)) {
		na, ea := fa.ReadAt(ba, off)
		nb, eb := fb.ReadAt(bb, off)
		if na != nb || !bytes.Equal(ba[:na], bb[:nb]) {
			return false
		}
		if ea != nil || eb != nil {
			return (ea == nil) == (eb == nil)
		}
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// TestRunSummaryParser checks the conformance parser on recorded CUnit
// output, so a parser that sees no failure cannot pass silently.
func TestRunSummaryParser(t *testing.T) {
	out := []byte("Suite: GetLBAStatus\n  Test: Simple ...passed\n  Test: LUNReset ...passed    [FAILED] PRIN command: failed with sense.\n  Test: BeyondEol ...    [FAILED] GET_LBA_STATUS successful\nFAILED\n" +
		"Run Summary:    Type  Total    Ran Passed Failed Inactive\n              suites      1      1    n/a      0        0\n" +
		"               tests      3      3      2      1        0\n             asserts    516    516    515      1      n/a\n")
	s, err := parseRunSummary(out)
	if err != nil || s.testsRun != 3 || s.testsFailed != 1 || s.assertsFailed != 1 {
		t.Fatalf("parsed %+v, %v", s, err)
	}
	if f := failedTests(out); len(f) != 1 || f[0] != "GetLBAStatus.BeyondEol" {
		t.Fatalf("failed tests %v", f)
	}
}
