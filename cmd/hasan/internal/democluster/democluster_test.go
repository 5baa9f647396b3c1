package democluster

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/bench/failover/initiator"
)

// innerEnv marks the copy of the test binary that runs inside the test's
// own network namespace.
const innerEnv = "HASAN_DEMO_INNER"

// TestDemoCluster runs the `hasan demo` cluster for real: three `hasan
// serve` processes in namespaces, writes through the floating IP, crashes
// the owner, and checks that the survivor serves the same data only after
// the owner's BMC confirmed it off. The demo's bridge lives in the root
// namespace of whoever runs it; the test runs it inside a namespace of its
// own so that nothing appears on the host.
func TestDemoCluster(t *testing.T) {
	if os.Getenv(innerEnv) == "1" {
		runDemoScenario(t)
		return
	}
	if err := Preflight(); err != nil {
		if os.Getenv("HASAN_LAB_REQUIRED") == "1" {
			t.Fatalf("demo cluster test required: %v", err)
		}
		t.Skipf("demo cluster: %v", err)
	}
	var rnd [3]byte
	_, _ = rand.Read(rnd[:])
	ns := "hdt-" + hex.EncodeToString(rnd[:])
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	if out, err := exec.Command("ip", "-n", ns, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up: %v: %s", err, out)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns, self, "-test.run=^TestDemoCluster$", "-test.v")
	cmd.Env = append(os.Environ(), innerEnv+"=1", "HASAN_DEMO_PREFIX=h"+hex.EncodeToString(rnd[:]))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Run()
	t.Log(out.String())
	if err != nil || !strings.Contains(out.String(), "--- PASS: TestDemoCluster") {
		t.Fatalf("demo scenario in namespace %s: %v", ns, err)
	}
}

func runDemoScenario(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "hasan")
	build := exec.Command("go", "build", "-o", bin, "github.com/hasan-storage/hasan/cmd/hasan")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v: %s", err, out)
	}
	dir, err := os.MkdirTemp("/tmp", "hdt")
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if t.Failed() && os.Getenv("HASAN_DEMO_KEEP") != "" {
			t.Logf("logs kept in %s", dir)
			return
		}
		if t.Failed() {
			for _, n := range []string{"n1", "n2", "w1"} {
				if b, err := os.ReadFile(filepath.Join(dir, n+".log")); err == nil {
					lines := strings.Split(string(b), "\n")
					t.Logf("--- %s.log (tail) ---\n%s", n, strings.Join(lines[max(0, len(lines)-40):], "\n"))
				}
			}
		}
		os.RemoveAll(dir)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var progress bytes.Buffer
	c, err := Start(ctx, Config{Bin: bin, Dir: dir, Prefix: os.Getenv("HASAN_DEMO_PREFIX"), Out: &progress})
	t.Log(progress.String())
	if err != nil {
		t.Fatalf("start: %v", err)
	}
	closed := false
	defer func() {
		if !closed {
			c.Close()
		}
	}()

	owner := c.Owner(ctx)
	if owner == "" {
		t.Fatal("no owner after Start")
	}
	login := func() (*initiator.Session, error) {
		lctx, lcancel := context.WithTimeout(ctx, 2*time.Second)
		defer lcancel()
		s, err := initiator.Login(lctx, initiator.Config{Portal: c.Portal(), Target: IQN})
		if err != nil {
			return nil, err
		}
		if _, err := s.ClearUnitAttention(lctx); err != nil {
			return nil, err
		}
		return s, nil
	}
	s, err := login()
	if err != nil {
		t.Fatalf("login through the floating IP: %v", err)
	}
	blocks, bs, err := s.ReadCapacity10(ctx)
	if err != nil || blocks*uint64(bs) != 1<<30 {
		t.Fatalf("capacity: %d blocks of %d, %v; want 1 GiB", blocks, bs, err)
	}
	data := make([]byte, 8*int(bs))
	_, _ = rand.Read(data)
	if err := s.Write10(ctx, 100, data, bs, true); err != nil {
		t.Fatalf("write: %v", err)
	}
	_ = s.Logout(ctx)

	// Crash the owner: its BMC then reads off, the leader fences it and the
	// survivor takes over.
	victim := c.Node(owner)
	pid := victim.BMC.NodePID()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill %s (pid %d): %v", owner, pid, err)
	}
	crashed := time.Now()
	var newOwner string
	var got []byte
	for time.Since(crashed) < 60*time.Second {
		if o := c.Owner(ctx); o != "" && o != owner {
			newOwner = o
			if s, err := login(); err == nil {
				got, err = s.Read10(ctx, 100, 8, bs)
				_ = s.Logout(ctx)
				if err == nil {
					break
				}
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	if newOwner == "" || got == nil {
		t.Fatalf("no takeover within 60 s of crashing %s (owner now %q)", owner, c.Owner(ctx))
	}
	t.Logf("%s crashed; %s serves the floating IP %v later", owner, newOwner, time.Since(crashed).Round(time.Millisecond))
	if !bytes.Equal(got, data) {
		t.Fatal("the acknowledged write is not on the new owner")
	}
	var hist []struct {
		Node    string `json:"node"`
		Device  string `json:"device"`
		Action  string `json:"action"`
		Outcome string `json:"outcome"`
	}
	if err := c.restCall(ctx, http.MethodGet, c.Node(newOwner).API()+"/api/v1/fence-history", nil, &hist); err != nil {
		t.Fatal(err)
	}
	fenced := false
	for _, h := range hist {
		if h.Node == owner && h.Device == "bmc-"+owner && h.Action == "off" && h.Outcome == "success" {
			fenced = true
		}
	}
	if !fenced {
		t.Fatalf("no confirmed fence of %s through bmc-%s in the history: %+v", owner, owner, hist)
	}
	if resets := victim.BMC.Resets(); len(resets) == 0 {
		t.Fatalf("the BMC of %s received no reset", owner)
	}

	closed = true
	if err := c.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
	out, _ := exec.Command("ip", "netns", "list").Output()
	for _, n := range c.Nodes {
		if strings.Contains(string(out), n.NS) {
			t.Errorf("namespace %s left behind", n.NS)
		}
	}
	if err := exec.Command("ip", "link", "show", c.Bridge).Run(); err == nil {
		t.Errorf("bridge %s left behind", c.Bridge)
	} else if ee := (*exec.ExitError)(nil); !errors.As(err, &ee) {
		t.Errorf("ip link show: %v", err)
	}
}
