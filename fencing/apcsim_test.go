package fencing

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The simulated APC PDU: net-snmp's snmpd answers SNMP and hands the
// PowerNet-MIB subtree to this pass_persist backend (the test binary
// re-executed, see TestMain). Every outlet feeds a real "node" process that
// switching the outlet off SIGKILLs. State goes to DIR/state.json after
// every change; faults are read from DIR/faults.json on every request.

type apcOutlet struct {
	N     int    `json:"n"`
	Name  string `json:"name"`
	State int    `json:"state"` // 1 on, 2 off
	PID   int    `json:"pid"`
	// OffAt (unix ms) is a pending late switch-off, applied by the first
	// request after it is due.
	OffAt int64 `json:"off_at,omitempty"`
}

type apcFaults struct {
	Stuck      []int  `json:"stuck"`       // outlets that ack off but stay on
	LateMS     int    `json:"late_ms"`     // off takes effect this late
	StatusFail bool   `json:"status_fail"` // status OIDs read as missing
	Log        string `json:"-"`
}

type apcBackend struct {
	dir     string
	mu      sync.Mutex
	outlets []*apcOutlet
}

func runAPCPassPersist(in io.Reader, out io.Writer, dir string) int {
	b := &apcBackend{dir: dir}
	b.logf("backend start pid %d", os.Getpid())
	// snmpd restarts a pass_persist program when it thinks the pipe broke,
	// so the outlets and their node processes outlive any one backend
	// process: adopt the saved state when there is one.
	if data, err := os.ReadFile(filepath.Join(dir, "state.json")); err == nil && json.Unmarshal(data, &b.outlets) == nil && len(b.outlets) > 0 {
		b.logf("backend: adopted saved state")
	} else {
		b.outlets = nil
		for i, n := range []string{"db1-psu-a", "db1-psu-b", "db2-psu-a", "db2-psu-b"} {
			o := &apcOutlet{N: i + 1, Name: n, State: 2}
			b.outlets = append(b.outlets, o)
			b.powerLocked(o, true)
		}
		b.saveLocked()
	}
	r := bufio.NewReader(in)
	w := bufio.NewWriter(out)
	line := func() (string, bool) {
		s, err := r.ReadString('\n')
		if err != nil {
			return "", false
		}
		return strings.TrimSpace(s), true
	}
	for {
		cmd, ok := line()
		if !ok {
			b.logf("backend: stdin closed, exiting")
			return 0
		}
		switch cmd {
		case "":
			// snmpd ends a set with an extra blank line; answering it would
			// desynchronise the pipe.
			continue
		case "PING":
			fmt.Fprintln(w, "PONG")
		case "get", "getnext":
			oid, ok := line()
			if !ok {
				return 0
			}
			res := b.get(oid, cmd == "getnext")
			b.logf("%s %s -> %q", cmd, oid, res)
			fmt.Fprint(w, res)
		case "set":
			oid, ok1 := line()
			val, ok2 := line()
			if !ok1 || !ok2 {
				return 0
			}
			res := b.set(oid, val)
			b.logf("set %s %q -> %s", oid, val, res)
			fmt.Fprintln(w, res)
		default:
			fmt.Fprintln(w, "NONE")
		}
		w.Flush()
	}
}

func (b *apcBackend) logf(format string, args ...any) {
	f, err := os.OpenFile(filepath.Join(b.dir, "backend.log"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, time.Now().Format("15:04:05.000 ")+format+"\n", args...)
}

func (b *apcBackend) faults() apcFaults {
	var f apcFaults
	if data, err := os.ReadFile(filepath.Join(b.dir, "faults.json")); err == nil {
		_ = json.Unmarshal(data, &f)
	}
	return f
}

func (b *apcBackend) powerLocked(o *apcOutlet, on bool) {
	if on && o.State != 1 {
		c := exec.Command("sleep", "86400")
		if err := c.Start(); err == nil {
			o.PID = c.Process.Pid
			go func() { _ = c.Wait() }() // reap while this backend lives
		}
		o.State = 1
	}
	if !on && o.State != 2 {
		if o.PID > 0 {
			_ = syscall.Kill(o.PID, syscall.SIGKILL)
			// SIGKILL is asynchronous; a real outlet reads "off" only once
			// the power is gone, so wait for the node to die first.
			for deadline := time.Now().Add(2 * time.Second); procAlive(o.PID) && time.Now().Before(deadline); {
				time.Sleep(time.Millisecond)
			}
		}
		o.State = 2
	}
}

func (b *apcBackend) saveLocked() {
	data, _ := json.Marshal(b.outlets)
	tmp := filepath.Join(b.dir, "state.json.tmp")
	if os.WriteFile(tmp, data, 0o600) == nil {
		_ = os.Rename(tmp, filepath.Join(b.dir, "state.json"))
	}
}

type apcVar struct {
	oid []int
	typ string
	val string
}

func parseOID(s string) []int {
	var out []int
	for _, p := range strings.Split(strings.Trim(s, "."), ".") {
		n, err := strconv.Atoi(p)
		if err != nil {
			return nil
		}
		out = append(out, n)
	}
	return out
}

func oidLess(a, b []int) bool {
	for i := 0; i < len(a) && i < len(b); i++ {
		if a[i] != b[i] {
			return a[i] < b[i]
		}
	}
	return len(a) < len(b)
}

func oidString(o []int) string {
	var sb strings.Builder
	for _, n := range o {
		fmt.Fprintf(&sb, ".%d", n)
	}
	return sb.String()
}

func (b *apcBackend) table(f apcFaults) []apcVar {
	now := time.Now().UnixMilli()
	for _, o := range b.outlets {
		if o.OffAt != 0 && now >= o.OffAt {
			o.OffAt = 0
			b.powerLocked(o, false)
			b.saveLocked()
		}
	}
	var vars []apcVar
	add := func(root string, n int, typ, val string) {
		vars = append(vars, apcVar{parseOID(fmt.Sprintf("%s.%d", root, n)), typ, val})
	}
	for _, o := range b.outlets {
		st := strconv.Itoa(o.State)
		add(oidRPDUCmd, o.N, "integer", st)
		if f.StatusFail {
			// rPDU state vanishes; the old MIB answers "unknown" (4).
			add(oidSPDUCtl, o.N, "integer", "4")
		} else {
			add(oidSPDUCtl, o.N, "integer", st)
			add(oidRPDUState, o.N, "integer", st)
		}
		add(oidSPDUName, o.N, "string", o.Name)
		add(oidRPDUName, o.N, "string", o.Name)
		add(".1.3.6.1.4.1.318.1.1.12.3.3.1.1.2", o.N, "string", o.Name)
	}
	sort.Slice(vars, func(i, j int) bool { return oidLess(vars[i].oid, vars[j].oid) })
	return vars
}

func (b *apcBackend) get(oid string, next bool) string {
	f := b.faults()
	b.mu.Lock()
	defer b.mu.Unlock()
	want := parseOID(oid)
	for _, v := range b.table(f) {
		if (!next && oidString(v.oid) == oidString(want)) || (next && oidLess(want, v.oid)) {
			return fmt.Sprintf("%s\n%s\n%s\n", oidString(v.oid), v.typ, v.val)
		}
	}
	return "NONE\n"
}

func (b *apcBackend) set(oid, val string) string {
	f := b.faults()
	o := parseOID(oid)
	if len(o) < 2 {
		return "not-writable"
	}
	root := oidString(o[:len(o)-1])
	if root != oidSPDUCtl && root != oidRPDUCmd {
		return "not-writable"
	}
	fields := strings.Fields(val)
	if len(fields) != 2 || fields[0] != "integer" {
		return "wrong-type"
	}
	v, err := strconv.Atoi(fields[1])
	if err != nil || v < 1 || v > 3 {
		return "wrong-value"
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	var out *apcOutlet
	for _, x := range b.outlets {
		if x.N == o[len(o)-1] {
			out = x
		}
	}
	if out == nil {
		return "no-such-name"
	}
	for _, s := range f.Stuck {
		if s == out.N {
			return "DONE" // acknowledged, never done
		}
	}
	apply := func(on bool) {
		b.powerLocked(out, on)
		b.saveLocked()
	}
	switch {
	case v == 1:
		out.OffAt = 0
		apply(true)
	case f.LateMS > 0 && v == 2:
		out.OffAt = time.Now().Add(time.Duration(f.LateMS) * time.Millisecond).UnixMilli()
		b.saveLocked()
	default:
		apply(false)
		if v == 3 {
			apply(true)
		}
	}
	return "DONE"
}

// snmpSim is snmpd plus the backend above, on 127.0.0.1.
type snmpSim struct {
	t    *testing.T
	dir  string
	port int
	cmd  *exec.Cmd
}

const (
	snmpRW     = "private-Fence9"
	snmpV3User = "hasanv3"
	snmpV3Auth = "auth-Pass-123"
	snmpV3Priv = "priv-Pass-456"
)

func startSNMPSim(t *testing.T, sysObjectID string) *snmpSim {
	t.Helper()
	needTools(t, "snmpd")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	s := &snmpSim{t: t, dir: dir, port: freeUDPPort(t)}
	conf := fmt.Sprintf(`rocommunity public 127.0.0.1
rwcommunity %s 127.0.0.1
createUser %s SHA "%s" AES "%s"
rwuser %s priv
sysObjectID %s
pass_persist .1.3.6.1.4.1.318.1.1 %s
`, snmpRW, snmpV3User, snmpV3Auth, snmpV3Priv, snmpV3User, sysObjectID, exe)
	if err := os.WriteFile(filepath.Join(dir, "snmpd.conf"), []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	persist := filepath.Join(dir, "persist")
	if err := os.Mkdir(persist, 0o700); err != nil {
		t.Fatal(err)
	}
	s.cmd = exec.Command("snmpd", "-f", "-C", "-c", filepath.Join(dir, "snmpd.conf"),
		"-Lf", filepath.Join(dir, "snmpd.log"), "-p", filepath.Join(dir, "snmpd.pid"), "udp:127.0.0.1:"+strconv.Itoa(s.port))
	s.cmd.Env = append(os.Environ(), "HASAN_FENCE_HELPER=apc-pass", "HASAN_APC_DIR="+dir,
		"SNMP_PERSISTENT_DIR="+persist, "MIBS=", "SNMPCONFPATH="+dir)
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("start snmpd: %v", err)
	}
	t.Cleanup(func() {
		_ = s.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = s.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(3 * time.Second):
			_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
		for _, o := range s.state() {
			if o.PID > 0 && procAlive(o.PID) {
				_ = syscall.Kill(o.PID, syscall.SIGKILL)
			}
		}
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "snmpd.log"))
			bl, _ := os.ReadFile(filepath.Join(dir, "backend.log"))
			t.Logf("snmpd log:\n%s\nbackend log:\n%s", b, bl)
		}
	})
	a := s.agent(t, "1", "", "1")
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := a.Status(ctx)
		cancel()
		if err == nil && len(s.state()) == 4 {
			break
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(filepath.Join(dir, "snmpd.log"))
			t.Fatalf("snmpd on 127.0.0.1:%d did not come up: %v\n%s", s.port, err, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return s
}

func (s *snmpSim) config(version, mib string, outlets ...string) APCConfig {
	c := APCConfig{Host: "127.0.0.1", Port: s.port, Version: version, MIB: mib, Outlets: outlets,
		RequestTimeout: Duration(300 * time.Millisecond), Retries: 1}
	if version == "3" {
		c.User, c.AuthPass, c.PrivPass = snmpV3User, NewSecret(snmpV3Auth), NewSecret(snmpV3Priv)
	} else {
		c.Community = NewSecret(snmpRW)
	}
	return c
}

func (s *snmpSim) agent(t *testing.T, version, mib string, outlets ...string) *APCAgent {
	t.Helper()
	a, err := NewAPCSNMP(s.config(version, mib, outlets...))
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func (s *snmpSim) state() []apcOutlet {
	var out []apcOutlet
	data, err := os.ReadFile(filepath.Join(s.dir, "state.json"))
	if err == nil {
		_ = json.Unmarshal(data, &out)
	}
	return out
}

func (s *snmpSim) outlet(n int) apcOutlet {
	for _, o := range s.state() {
		if o.N == n {
			return o
		}
	}
	s.t.Fatalf("outlet %d not in state", n)
	return apcOutlet{}
}

func (s *snmpSim) setFaults(f apcFaults) {
	data, _ := json.Marshal(f)
	if err := os.WriteFile(filepath.Join(s.dir, "faults.json"), data, 0o600); err != nil {
		s.t.Fatal(err)
	}
}
