package conformance

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/bench/peer"
)

// The suite's persistent-reservation tests log in under two initiator names;
// these are libiscsi's defaults, passed explicitly so a target ACL can name
// them.
const (
	initiator1 = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test"
	initiator2 = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2"
	targetIQN  = "iqn.2026-01.io.hasan:conformance"
	lunSize    = 1 << 30
)

type runSpec struct {
	name string
	desc string
	thin bool
	chap *peer.CHAP
}

var allRuns = []runSpec{
	{name: "thick", desc: "1 GiB preallocated file LUN"},
	{name: "thin", desc: "1 GiB sparse file LUN, thin provisioned", thin: true},
	{name: "chap", desc: "1 GiB preallocated file LUN, one-way CHAP", chap: &peer.CHAP{User: "conformance", Secret: "conformance-secret"}},
}

func TestConformance(t *testing.T) {
	if os.Getenv("HASAN_CONFORMANCE") != "1" {
		t.Skip("libiscsi conformance runs only with HASAN_CONFORMANCE=1 (root, apt, ~3-10 min): " +
			"HASAN_CONFORMANCE=1 go test -v -count=1 -timeout 30m ./test/conformance/")
	}
	ctx := t.Context()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	target := envOr("HASAN_CONFORMANCE_TARGET", "hasan")
	if target != "hasan" && target != "tgt" {
		t.Fatalf("HASAN_CONFORMANCE_TARGET=%q: want hasan or tgt", target)
	}
	runs, err := selectRuns(envOr("HASAN_CONFORMANCE_RUNS", "thick,thin,chap"))
	if err != nil {
		t.Fatal(err)
	}
	pkgs := []string{"libiscsi-bin"}
	if target == "tgt" {
		pkgs = append(pkgs, "tgt")
	}
	if err := peer.EnsurePackages(ctx, log, pkgs...); err != nil {
		t.Fatal(err)
	}
	allow, err := loadAllowlist("skips.txt")
	if err != nil {
		t.Fatal(err)
	}
	outDir, err := outputDir()
	if err != nil {
		t.Fatal(err)
	}
	var bin string
	if target == "hasan" {
		if bin, err = peer.BuildHasan(ctx, t.TempDir()); err != nil {
			t.Fatal(err)
		}
	}
	listing, err := exec.CommandContext(ctx, "iscsi-test-cu", "-l").Output()
	if err != nil {
		t.Fatalf("iscsi-test-cu -l: %v", err)
	}
	catalog, err := ParseCatalog(bytes.NewReader(listing))
	if err != nil {
		t.Fatal(err)
	}
	runTimeout := 15 * time.Minute
	if v := os.Getenv("HASAN_CONFORMANCE_RUN_TIMEOUT"); v != "" {
		if runTimeout, err = time.ParseDuration(v); err != nil {
			t.Fatalf("HASAN_CONFORMANCE_RUN_TIMEOUT: %v", err)
		}
	}

	var results []*Run
	for _, spec := range runs {
		dir := filepath.Join(outDir, target+"-"+spec.name)
		if err := os.RemoveAll(dir); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		r := runOnce(ctx, log, target, bin, spec, dir, t.TempDir(), catalog, runTimeout)
		r.Judge(allow)
		results = append(results, r)
	}

	var sum bytes.Buffer
	WriteSummary(&sum, results)
	os.Stdout.Write(sum.Bytes())
	if err := os.WriteFile(filepath.Join(outDir, target+"-summary.txt"), sum.Bytes(), 0o644); err != nil {
		t.Error(err)
	}
	if err := writeJSON(filepath.Join(outDir, target+"-results.json"), results); err != nil {
		t.Error(err)
	}
	fmt.Printf("\nraw outputs and daemon logs: %s\n", outDir)
	for _, r := range results {
		if !r.Enforce {
			continue
		}
		for _, p := range r.Problems() {
			t.Errorf("%s run: %s", r.Name, p)
		}
	}
}

// runOnce starts a fresh target for one run, runs the suite against it and
// parses the output. Every failure ends up in Run.Err, so the remaining runs
// still happen and the summary shows all of them.
func runOnce(ctx context.Context, log *slog.Logger, target, bin string, spec runSpec, outDir, dataDir string,
	catalog [][2]string, timeout time.Duration) *Run {
	r := &Run{Name: spec.name, Peer: target, Desc: spec.desc, Enforce: target == "hasan"}
	start := time.Now()
	defer func() { r.Wall = time.Since(start) }()

	o := peer.Options{Dir: dataDir, LogDir: outDir, IQN: targetIQN, Size: lunSize, Thin: spec.thin, CHAP: spec.chap, Portals: 2}
	var tg *peer.Target
	var err error
	switch target {
	case "hasan":
		tg, err = peer.StartHasan(ctx, bin, o)
		if err != nil {
			// A second portal only adds a path for MultipathIO; without it
			// the second URL is another session through the same portal.
			log.Warn("hasan did not start with two --listen addresses, retrying with one", "err", err)
			o.Portals = 1
			tg, err = peer.StartHasan(ctx, bin, o)
		}
	case "tgt":
		tg, err = peer.StartTgt(ctx, o)
	}
	if err != nil {
		r.Err = fmt.Errorf("start %s: %w", target, err)
		return r
	}
	defer func() {
		if err := tg.Close(); err != nil {
			log.Warn("stopping target", "err", err)
		}
	}()
	r.Desc += fmt.Sprintf("; MultipathIO via %d portal(s)", len(tg.Portals))
	if spec.chap != nil {
		// The suite passing proves the right secret works; only this proves
		// CHAP is enforced at all.
		if err := checkCHAPEnforced(ctx, tg); err != nil {
			r.Err = err
			return r
		}
		r.Desc += "; logins without CHAP or with a wrong secret refused"
	}

	rctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	args := []string{"-d", "-i", initiator1, "-I", initiator2, tg.URL(0), tg.URL(1)}
	cmd := exec.CommandContext(rctx, "iscsi-test-cu", args...)
	cmd.Dir = outDir // CUnit may drop its XML files into the working directory
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	log.Info("running iscsi-test-cu", "peer", target, "run", spec.name, "args", strings.Join(args, " "))
	// A test binary that panics must not leave the suite spinning against
	// a dead portal.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	runErr := cmd.Run()
	_ = os.WriteFile(filepath.Join(outDir, "iscsi-test-cu.out"), stdout.Bytes(), 0o644)
	_ = os.WriteFile(filepath.Join(outDir, "iscsi-test-cu.err"), stderr.Bytes(), 0o644)

	rep, err := ParseVerbose(bytes.NewReader(stdout.Bytes()), catalog)
	if err != nil {
		r.Err = err
		return r
	}
	r.Report = rep
	var errs []error
	if rctx.Err() != nil {
		errs = append(errs, fmt.Errorf("iscsi-test-cu killed after %s", timeout))
	}
	if err := rep.Check(); err != nil {
		errs = append(errs, fmt.Errorf("%w (iscsi-test-cu: %v)", err, runErr))
	}
	if !tg.Alive() {
		errs = append(errs, fmt.Errorf("%s exited during the run (log %s)", target, tg.Log))
	}
	r.Err = errors.Join(errs...)
	return r
}

// checkCHAPEnforced logs in without credentials and with a wrong secret;
// both must fail.
func checkCHAPEnforced(ctx context.Context, tg *peer.Target) error {
	for _, c := range []*peer.CHAP{nil, {User: tg.CHAP.User, Secret: tg.CHAP.Secret + "-wrong"}} {
		probe := *tg
		probe.CHAP = c
		cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		out, err := exec.CommandContext(cctx, "iscsi-inq", probe.URL(0)).CombinedOutput()
		cancel()
		if err == nil {
			return fmt.Errorf("CHAP not enforced: iscsi-inq %s logged in: %s", probe.URL(0), out)
		}
	}
	return nil
}

func selectRuns(list string) ([]runSpec, error) {
	var out []runSpec
	for _, name := range strings.Split(list, ",") {
		found := false
		for _, s := range allRuns {
			if s.name == strings.TrimSpace(name) {
				out, found = append(out, s), true
			}
		}
		if !found {
			return nil, fmt.Errorf("HASAN_CONFORMANCE_RUNS: unknown run %q (have thick, thin, chap)", name)
		}
	}
	return out, nil
}

func loadAllowlist(path string) (*Allowlist, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return ParseAllowlist(f)
}

func outputDir() (string, error) {
	dir := os.Getenv("HASAN_CONFORMANCE_OUT")
	if dir == "" {
		wd, err := os.Getwd()
		if err != nil {
			return "", err
		}
		dir = filepath.Join(wd, "out")
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	return dir, os.MkdirAll(dir, 0o755)
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// jsonRun is the machine-readable form of a Run for CI artifacts.
type jsonRun struct {
	Run      string   `json:"run"`
	Peer     string   `json:"peer"`
	Desc     string   `json:"desc"`
	WallSec  float64  `json:"wall_seconds"`
	Total    int      `json:"total"`
	Passed   int      `json:"passed"`
	Failed   []string `json:"failed"`
	Skipped  []string `json:"skipped"`
	Unlisted []string `json:"unlisted_skips"`
	Problems []string `json:"problems"`
}

func writeJSON(path string, runs []*Run) error {
	var out []jsonRun
	for _, r := range runs {
		j := jsonRun{Run: r.Name, Peer: r.Peer, Desc: r.Desc, WallSec: r.Wall.Seconds(), Problems: r.Problems()}
		if r.Report != nil {
			j.Total = len(r.Report.Tests)
			for _, t := range r.Report.Tests {
				switch t.Outcome {
				case Passed:
					j.Passed++
				case Failed:
					j.Failed = append(j.Failed, t.ID()+": "+t.FailReason())
				case Skipped:
					j.Skipped = append(j.Skipped, t.ID()+": "+t.SkipReason())
				}
			}
		}
		for _, t := range r.Unlisted {
			j.Unlisted = append(j.Unlisted, t.ID())
		}
		out = append(out, j)
	}
	raw, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, raw, 0o644)
}
