package main

import (
	"context"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/fencing"
)

const fenceUser, fencePass = "fence", "Cli-Rf-S3cret"

// fenceBMC is fencing's Redfish double over TLS on 127.0.0.1 with a real
// node process behind it: cheap enough to start per test.
type fenceBMC struct {
	d    *fencing.RedfishDouble
	port int
	ca   string
}

func startFenceBMC(t *testing.T) *fenceBMC {
	t.Helper()
	d := fencing.NewRedfishDouble(fenceUser, fencePass, []string{"sleep", "86400"})
	srv := httptest.NewUnstartedServer(d)
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.StartTLS()
	t.Cleanup(func() { d.Close(); srv.Close() })
	_, p, _ := net.SplitHostPort(srv.Listener.Addr().String())
	port, _ := strconv.Atoi(p)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := d.PowerOn(); err != nil {
		t.Fatal(err)
	}
	if !nodeAlive(d.NodePID()) {
		t.Fatal("node not running after power on")
	}
	return &fenceBMC{d: d, port: port, ca: ca}
}

// writeConfig writes a topology with one redfish device "bmc" for node n1;
// edit changes the device's redfish section first.
func (b *fenceBMC) writeConfig(t *testing.T, edit func(rf map[string]any)) string {
	t.Helper()
	rf := map[string]any{
		"host": "127.0.0.1", "port": b.port, "user": fenceUser, "password": fencePass,
		"ca_file": b.ca, "request_timeout": "1s",
	}
	if edit != nil {
		edit(rf)
	}
	cfg := map[string]any{
		"devices": map[string]any{"bmc": map[string]any{
			"type": "redfish", "timeout": "2s", "poll_interval": "20ms", "redfish": rf,
		}},
		"nodes": map[string]any{"n1": map[string]any{"levels": [][]string{{"bmc"}}}},
	}
	js, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "fence.json")
	if err := os.WriteFile(p, js, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// nodeAlive reads /proc: a SIGKILLed, reaped process is gone.
func nodeAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && i+2 < len(s) && s[i+2] != 'Z' && s[i+2] != 'X'
}

// runHasan runs the cobra root with args and stdin, returning stdout,
// stderr (where the slog default handler writes) and the error main would
// turn into exit status 1.
func runHasan(t *testing.T, stdin string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	prev := slog.Default()
	t.Cleanup(func() { slog.SetDefault(prev) })
	var out, errb syncBuffer
	root := newRootCmd()
	root.SetArgs(args)
	root.SetOut(&out)
	root.SetErr(&errb)
	root.SetIn(strings.NewReader(stdin))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err = root.ExecuteContext(ctx)
	return out.String(), errb.String(), err
}

func noSecret(t *testing.T, where string, texts ...string) {
	t.Helper()
	for _, s := range texts {
		if strings.Contains(s, fencePass) {
			t.Fatalf("%s prints the password:\n%s", where, s)
		}
	}
}

func TestFenceStatusHealthy(t *testing.T) {
	b := startFenceBMC(t)
	cfg := b.writeConfig(t, nil)
	out, errOut, err := runHasan(t, "", "fence", "status", "--config", cfg)
	if err != nil {
		t.Fatalf("status: %v\n%s%s", err, out, errOut)
	}
	if !strings.Contains(out, "DEVICE") || !regexpLine(out, "bmc", "redfish", "ok") {
		t.Fatalf("status output:\n%s", out)
	}
	noSecret(t, "fence status", out, errOut)
	if n := b.d.Sessions(); n != 0 {
		t.Fatalf("fence status left %d Redfish sessions open on the BMC", n)
	}
	if len(b.d.Resets()) != 0 || !nodeAlive(b.d.NodePID()) {
		t.Fatal("fence status touched power")
	}

	// Verification off: works, but the operator is warned on stderr.
	insecure := b.writeConfig(t, func(rf map[string]any) { delete(rf, "ca_file"); rf["insecure_skip_verify"] = true })
	out, errOut, err = runHasan(t, "", "fence", "status", "--config", insecure)
	if err != nil || !regexpLine(out, "bmc", "redfish", "ok") {
		t.Fatalf("insecure status: %v\n%s", err, out)
	}
	if !strings.Contains(errOut, "verification is DISABLED") {
		t.Fatalf("no warning about insecure_skip_verify on stderr:\n%s", errOut)
	}
	noSecret(t, "fence status", out, errOut)
}

// regexpLine reports whether one line of out holds every field in order.
func regexpLine(out string, fields ...string) bool {
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) >= len(fields) {
			ok := true
			for i, want := range fields {
				if f[i] != want {
					ok = false
				}
			}
			if ok {
				return true
			}
		}
	}
	return false
}

func TestFenceStatusUnhealthy(t *testing.T) {
	b := startFenceBMC(t)
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadPort := closed.Addr().(*net.TCPAddr).Port
	closed.Close()
	for _, tc := range []struct {
		name, want string
		edit       func(rf map[string]any)
	}{
		{"wrong password", "authentication failed", func(rf map[string]any) { rf["password"] = "Wrong-" + fencePass }},
		{"unreachable", "unreachable", func(rf map[string]any) { rf["port"] = deadPort }},
		{"untrusted certificate", "TLS verification", func(rf map[string]any) { delete(rf, "ca_file") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := b.writeConfig(t, tc.edit)
			out, errOut, err := runHasan(t, "", "fence", "status", "--config", cfg)
			if err == nil || !strings.Contains(err.Error(), "1 of 1 devices unhealthy") {
				t.Fatalf("want an unhealthy error, got %v\n%s", err, out)
			}
			if !regexpLine(out, "bmc", "redfish", "unhealthy") || !strings.Contains(out, tc.want) {
				t.Fatalf("status output lacks %q:\n%s", tc.want, out)
			}
			noSecret(t, "fence status", out, errOut, err.Error())
			t.Logf("hasan fence status:\n%s", out)
		})
	}
}

func TestFenceTestPromptRefused(t *testing.T) {
	b := startFenceBMC(t)
	cfg := b.writeConfig(t, nil)
	hist := filepath.Join(t.TempDir(), "history.jsonl")
	for _, answer := range []string{"no\n", "", "n2\n"} {
		out, errOut, err := runHasan(t, answer, "fence", "test", "n1", "--config", cfg, "--history", hist)
		if err == nil || !strings.Contains(err.Error(), "not confirmed; nothing was done") {
			t.Fatalf("answer %q: %v\n%s", answer, err, out)
		}
		if !strings.Contains(out, "Type the node name to continue") {
			t.Fatalf("no prompt shown:\n%s", out)
		}
		noSecret(t, "fence test", out, errOut)
	}
	if r := b.d.Resets(); len(r) != 0 {
		t.Fatalf("refused prompt, but the BMC received %v", r)
	}
	if !nodeAlive(b.d.NodePID()) {
		t.Fatal("refused prompt, but the node died")
	}
	if _, err := os.Stat(hist); !os.IsNotExist(err) {
		t.Fatalf("history written although nothing was fenced: %v", err)
	}
	if logins, _ := b.d.Logins(); logins != 0 {
		t.Fatalf("refused prompt, but %d logins reached the BMC", logins)
	}
}

func TestFenceTestFencesAndRecords(t *testing.T) {
	for _, tc := range []struct {
		name  string
		stdin string
		flags []string
	}{
		{"typed node name", "n1\n", nil},
		{"--yes", "", []string{"--yes"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := startFenceBMC(t)
			pid := b.d.NodePID()
			cfg := b.writeConfig(t, nil)
			hist := filepath.Join(t.TempDir(), "history.jsonl")
			args := append([]string{"fence", "test", "n1", "--config", cfg, "--history", hist}, tc.flags...)
			out, errOut, err := runHasan(t, tc.stdin, args...)
			if err != nil {
				t.Fatalf("fence test: %v\n%s%s", err, out, errOut)
			}
			if !strings.Contains(out, "node n1: fenced at level 1") {
				t.Fatalf("output:\n%s", out)
			}
			if nodeAlive(pid) {
				t.Fatalf("hasan fence test reported success but node %d runs", pid)
			}
			t.Logf("hasan fence test:\n%s", out)
			if r := b.d.Resets(); len(r) != 1 || r[0] != "ForceOff" {
				t.Fatalf("resets %v", r)
			}
			recs, err := fencing.NewFileHistory(hist).List(context.Background(), "n1", 0)
			if err != nil || len(recs) != 1 {
				t.Fatalf("history: %v %+v", err, recs)
			}
			if r := recs[0]; r.Outcome != fencing.OutcomeSuccess || r.Device != "bmc" || r.Level != 1 || r.Action != "off" || r.Duration <= 0 {
				t.Fatalf("history record: %+v", r)
			}
			raw, _ := os.ReadFile(hist)
			noSecret(t, "fence test", out, errOut, string(raw))
			if n := b.d.Sessions(); n != 0 {
				t.Fatalf("fence test left %d Redfish sessions open on the BMC", n)
			}
		})
	}
}

func TestFenceTestFailureIsAnError(t *testing.T) {
	b := startFenceBMC(t)
	b.d.SetFaults(fencing.RedfishFaults{Stuck: true})
	cfg := b.writeConfig(t, nil)
	hist := filepath.Join(t.TempDir(), "history.jsonl")
	start := time.Now()
	out, errOut, err := runHasan(t, "", "fence", "test", "n1", "--yes", "--config", cfg, "--history", hist)
	if err == nil || !errors.Is(err, fencing.ErrFenceFailed) || !errors.Is(err, fencing.ErrNotConfirmed) {
		t.Fatalf("stuck BMC: %v\n%s", err, out)
	}
	if d := time.Since(start); d > 4*time.Second {
		t.Fatalf("took %v with a 2s device timeout", d)
	}
	if !strings.Contains(out, "NOT FENCED") || !nodeAlive(b.d.NodePID()) {
		t.Fatalf("output:\n%s", out)
	}
	recs, _ := fencing.NewFileHistory(hist).List(context.Background(), "n1", 0)
	if len(recs) != 1 || recs[0].Outcome != fencing.OutcomeFailure || !strings.Contains(recs[0].Error, "not confirmed") {
		t.Fatalf("history: %+v", recs)
	}
	noSecret(t, "fence test", out, errOut, err.Error())
}

func TestFenceBadConfig(t *testing.T) {
	b := startFenceBMC(t)
	for _, tc := range []struct {
		name string
		cfg  func(t *testing.T) string
		args []string
		want []string
	}{
		{"missing user", func(t *testing.T) string {
			return b.writeConfig(t, func(rf map[string]any) { delete(rf, "user") })
		}, []string{"fence", "status"}, []string{"devices.bmc", "redfish.user", "required"}},
		{"unknown field", func(t *testing.T) string {
			return b.writeConfig(t, func(rf map[string]any) { rf["pasword"] = "x" })
		}, []string{"fence", "test", "n1", "--yes"}, []string{"unknown field", "pasword"}},
		{"bad auth", func(t *testing.T) string {
			return b.writeConfig(t, func(rf map[string]any) { rf["auth"] = "digest" })
		}, []string{"fence", "test", "n1", "--yes"}, []string{"devices.bmc", "redfish.auth", "digest"}},
		{"CA file missing", func(t *testing.T) string {
			return b.writeConfig(t, func(rf map[string]any) { rf["ca_file"] = "/nonexistent/ca.pem" })
		}, []string{"fence", "test", "n1", "--yes"}, []string{"devices.bmc", "redfish.ca_file"}},
		{"unknown node", func(t *testing.T) string { return b.writeConfig(t, nil) },
			[]string{"fence", "test", "n9", "--yes"}, []string{`node "n9" is not in`}},
		{"no config file", func(*testing.T) string { return "/nonexistent/fence.json" },
			[]string{"fence", "status"}, []string{"no such file"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append(tc.args, "--config", tc.cfg(t))
			out, errOut, err := runHasan(t, "", args...)
			if err == nil {
				t.Fatalf("accepted:\n%s", out)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Fatalf("error %q does not name %q", err, w)
				}
			}
			noSecret(t, "bad config", out, errOut, err.Error())
		})
	}
	if len(b.d.Resets()) != 0 || !nodeAlive(b.d.NodePID()) {
		t.Fatal("a bad config still reached the BMC's power control")
	}
}

// TestFenceStatusExitCode runs the real main() in a child process: an
// unhealthy device must end `hasan fence status` with a non-zero exit.
func TestFenceStatusExitCode(t *testing.T) {
	if cfg := os.Getenv("HASAN_FENCE_CLI_CHILD"); cfg != "" {
		os.Args = []string{"hasan", "fence", "status", "--config", cfg}
		main()
		os.Exit(0)
	}
	b := startFenceBMC(t)
	for _, tc := range []struct {
		name string
		edit func(rf map[string]any)
		code int
	}{
		{"healthy", nil, 0},
		{"wrong password", func(rf map[string]any) { rf["password"] = "Wrong-" + fencePass }, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run=^TestFenceStatusExitCode$")
			cmd.Env = append(os.Environ(), "HASAN_FENCE_CLI_CHILD="+b.writeConfig(t, tc.edit))
			out, err := cmd.CombinedOutput()
			code := 0
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				code = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			if code != tc.code {
				t.Fatalf("exit %d, want %d:\n%s", code, tc.code, out)
			}
			noSecret(t, "hasan fence status", string(out))
		})
	}
}
