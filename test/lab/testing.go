package lab

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// RequiredEnv, set to 1, turns every reason to skip a lab test (not root,
// a tool missing) into a failure; CI sets it so lab tests cannot vanish.
const RequiredEnv = "HASAN_LAB_REQUIRED"

// Start builds a lab for a test and tears it down in t.Cleanup, printing
// the tail of every process and BMC log first if the test failed. It skips
// the test, with the reason, when not root or when ip, bridge, ipmi_sim or
// ipmitool is missing (fails instead with HASAN_LAB_REQUIRED=1).
func Start(t testing.TB, cfg Config) *Lab {
	t.Helper()
	if os.Geteuid() != 0 {
		skipOrFail(t, "lab: network namespaces need root (CAP_NET_ADMIN, CAP_SYS_ADMIN); run the test as root")
	}
	tools := []string{"ip", "bridge"}
	for _, n := range cfg.Nodes {
		if n.BMC {
			tools = append(tools, "ipmi_sim", "ipmitool")
			break
		}
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			skipOrFail(t, "lab: "+tool+" not installed (Debian: iproute2, openipmi, ipmitool)")
		}
	}
	if cfg.Dir == "" {
		cfg.Dir = t.TempDir()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	l, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			var b strings.Builder
			l.DumpLogs(&b, 60)
			t.Logf("lab %s logs:\n%s", l.ID, b.String())
		}
		if err := l.Close(); err != nil {
			t.Errorf("lab cleanup: %v", err)
		}
	})
	return l
}

func skipOrFail(t testing.TB, why string) {
	t.Helper()
	if os.Getenv(RequiredEnv) == "1" {
		t.Fatal(why + " (" + RequiredEnv + "=1)")
	}
	t.Skip(why)
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// HasanBinEnv names a prebuilt hasan binary for BuildHasan to use instead
// of building the working tree (a tree other people are editing may not
// build for a while; a benchmark may want a release binary).
const HasanBinEnv = "HASAN_BIN"

// BuildHasan builds ./cmd/hasan of the module that contains the working
// directory into a temporary directory and returns the binary's path, or
// returns $HASAN_BIN when set. The Go build cache makes repeated calls
// cheap.
func BuildHasan(t testing.TB) string {
	t.Helper()
	if bin := os.Getenv(HasanBinEnv); bin != "" {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("lab: %s=%s: %v", HasanBinEnv, bin, err)
		}
		t.Logf("lab: using %s=%s", HasanBinEnv, bin)
		return bin
	}
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			break
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("lab: go.mod not found above the working directory")
		}
		dir = parent
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = "/usr/local/go/bin/go"
	}
	out := filepath.Join(t.TempDir(), "hasan")
	cmd := exec.Command(goBin, "build", "-o", out, "./cmd/hasan")
	cmd.Dir = dir
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("lab: build hasan: %v\n%s", err, b)
	}
	return out
}
