package fencing

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Real-peer tests start ipmi_sim, snmpd and friends on 127.0.0.1. With
// HASAN_FENCE_PEERS=1 (make test) a peer that cannot start fails the test;
// without it, a missing tool skips the test with the reason.
func peersRequired() bool { return os.Getenv("HASAN_FENCE_PEERS") == "1" }

func needTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			if _, err2 := os.Stat("/usr/sbin/" + tool); err2 == nil {
				continue
			}
			if peersRequired() {
				t.Fatalf("HASAN_FENCE_PEERS=1 but %s is missing (run fencing/testdata/deps.sh): %v", tool, err)
			}
			t.Skipf("real-peer test skipped: %s not installed (run fencing/testdata/deps.sh as root, then HASAN_FENCE_PEERS=1 go test ./fencing/)", tool)
		}
	}
}

func freeUDPPort(t *testing.T) int {
	t.Helper()
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).Port
}

// procAlive reports whether pid exists and is not a zombie: a SIGKILLed
// process that nobody reaped yet no longer runs.
func procAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 >= len(s) {
		return false
	}
	st := s[i+2]
	return st != 'Z' && st != 'X'
}

// ipmiSim is OpenIPMI's BMC simulator whose chassis_control hook runs a
// real "node" process (testdata/ipmi-hook.sh).
type ipmiSim struct {
	t    *testing.T
	dir  string
	port int
	cmd  *exec.Cmd
}

const simUser, simPass = "hasan", "Fence-S3cret"

func startIPMISim(t *testing.T) *ipmiSim {
	t.Helper()
	needTools(t, "ipmi_sim")
	dir := t.TempDir()
	hook, err := filepath.Abs("testdata/ipmi-hook.sh")
	if err != nil {
		t.Fatal(err)
	}
	s := &ipmiSim{t: t, dir: dir, port: freeUDPPort(t)}
	conf := fmt.Sprintf(`name "hasanfence"
set_working_mc 0x20
  startlan 1
    addr 127.0.0.1 %d
    priv_limit admin
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid a123456789abcdefa123456789abcdef
  endlan
  chassis_control "%s %s"
user 2 true "%s" "%s" admin 10 none md2 md5 straight
`, s.port, hook, dir, simUser, simPass)
	emu := "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\nmc_enable 0x20\n"
	for name, body := range map[string]string{"lan.conf": conf, "sim.emu": emu} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	state := filepath.Join(dir, "state") // fresh every run: no stale users
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	log, err := os.Create(filepath.Join(dir, "ipmi_sim.log"))
	if err != nil {
		t.Fatal(err)
	}
	s.cmd = exec.Command("ipmi_sim", "-c", filepath.Join(dir, "lan.conf"), "-f", filepath.Join(dir, "sim.emu"), "-s", state, "-n")
	s.cmd.Stdout, s.cmd.Stderr = log, log
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("start ipmi_sim: %v", err)
	}
	t.Cleanup(func() {
		_ = s.cmd.Process.Kill()
		_ = s.cmd.Wait()
		log.Close()
		if pid := s.nodePID(); pid > 0 {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "ipmi_sim.log"))
			h, _ := os.ReadFile(filepath.Join(dir, "hook.log"))
			t.Logf("ipmi_sim log:\n%s\nhook log:\n%s", b, h)
		}
	})
	// Ready when a session opens and status reads.
	a := s.agent(t, simPass)
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := a.Status(ctx)
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ipmi_sim on 127.0.0.1:%d did not come up: %v", s.port, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return s
}

func (s *ipmiSim) config(pass string) IPMIConfig {
	return IPMIConfig{
		Host: "127.0.0.1", Port: s.port, User: simUser, Password: NewSecret(pass),
		CipherSuite: 3, RequestTimeout: Duration(300 * time.Millisecond), Retries: 1,
	}
}

func (s *ipmiSim) agent(t *testing.T, pass string) *IPMIAgent {
	t.Helper()
	a, err := NewIPMI(s.config(pass))
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func (s *ipmiSim) nodePID() int {
	b, err := os.ReadFile(filepath.Join(s.dir, "node.pid"))
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

func (s *ipmiSim) fault(name string, on bool) {
	p := filepath.Join(s.dir, "fault-"+name)
	if on {
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			s.t.Fatal(err)
		}
		return
	}
	_ = os.Remove(p)
}

// powerOnNode starts the node through the BMC and returns its pid.
func (s *ipmiSim) powerOnNode(t *testing.T, a Agent) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := OnAndConfirm(ctx, a, 20*time.Millisecond); err != nil {
		t.Fatalf("power on node: %v", err)
	}
	pid := s.nodePID()
	if pid == 0 || !procAlive(pid) {
		t.Fatalf("node process %d not running after power on", pid)
	}
	return pid
}
