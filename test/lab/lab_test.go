package lab

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
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

// echoServer accepts connections in ns on addr:port and echoes lines.
func echoServer(t *testing.T, ns *NS, addr string) {
	t.Helper()
	ln, err := ns.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
}

// roundTrip dials addr from ns and checks an echo comes back within d.
func roundTrip(ns *NS, addr string, d time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	c, err := ns.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(d))
	if _, err := c.Write([]byte("ping\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if line != "ping\n" {
		return fmt.Errorf("echo %q", line)
	}
	return nil
}

func TestLabReachability(t *testing.T) {
	l := Start(t, ThreeNodes())
	for _, n := range l.Nodes() {
		echoServer(t, n.NS, net.JoinHostPort(n.Addr.Addr().String(), "7000"))
	}
	from := append([]*NS{l.Initiator()}, nsOf(l.Nodes())...)
	for _, src := range from {
		for _, dst := range l.Nodes() {
			addr := net.JoinHostPort(dst.Addr.Addr().String(), "7000")
			if err := roundTrip(src, addr, 2*time.Second); err != nil {
				t.Errorf("%s -> %s (%s): %v", src.Name(), dst.NodeName(), addr, err)
			}
		}
	}
	// The initiator is not on the management network.
	if err := roundTrip(l.Initiator(), net.JoinHostPort(l.Node("n1").MgmtAddr.Addr().String(), "7000"), 300*time.Millisecond); err == nil {
		t.Error("initiator reached the management network")
	}
	// Every node reaches every BMC over the management network.
	for _, src := range l.Nodes() {
		for _, dst := range []string{"n1", "n2"} {
			out, err := l.BMC(dst).IPMITool(context.Background(), src.NS, "chassis", "power", "status")
			if err != nil || !strings.Contains(out, "on") {
				t.Errorf("%s -> BMC of %s: %q %v", src.NodeName(), dst, out, err)
			}
		}
	}
	if l.BMC("w1") != nil {
		t.Error("witness has a BMC")
	}
}

func nsOf(nodes []*Node) []*NS {
	var s []*NS
	for _, n := range nodes {
		s = append(s, n.NS)
	}
	return s
}

func TestIsolateBlocksTraffic(t *testing.T) {
	l := Start(t, ThreeNodes())
	n1 := l.Node("n1")
	addr := net.JoinHostPort(n1.Addr.Addr().String(), "7000")
	echoServer(t, n1.NS, addr)
	if err := roundTrip(l.Initiator(), addr, 2*time.Second); err != nil {
		t.Fatalf("before isolate: %v", err)
	}
	// An established connection must stall too, not only new ones.
	c, err := l.Initiator().DialContext(context.Background(), "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	if err := l.Isolate("n1"); err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(l.Initiator(), addr, 500*time.Millisecond); err == nil {
		t.Fatal("initiator reached isolated n1")
	}
	if err := roundTrip(l.Node("n2").NS, addr, 500*time.Millisecond); err == nil {
		t.Fatal("n2 reached isolated n1")
	}
	_ = c.SetDeadline(time.Now().Add(500 * time.Millisecond))
	if _, err := c.Write([]byte("x\n")); err == nil {
		if _, err := bufio.NewReader(c).ReadString('\n'); err == nil {
			t.Fatal("established connection still carries data to isolated n1")
		}
	}
	// The node sees its link up: the failure is in the network.
	out, err := n1.Run(context.Background(), "ip", "-o", "link", "show", "eth0")
	if err != nil || !strings.Contains(out, "LOWER_UP") {
		t.Fatalf("n1 eth0 while isolated: %q %v", out, err)
	}
	// Fencing still reaches n1's BMC.
	if out, err := l.BMC("n1").IPMITool(context.Background(), l.Node("n2").NS, "chassis", "power", "status"); err != nil {
		t.Fatalf("BMC of isolated n1 unreachable: %q %v", out, err)
	}
	// n2 and the initiator still talk.
	echoServer(t, l.Node("n2").NS, net.JoinHostPort(l.NodeAddr("n2").String(), "7000"))
	if err := roundTrip(l.Initiator(), net.JoinHostPort(l.NodeAddr("n2").String(), "7000"), 2*time.Second); err != nil {
		t.Fatalf("isolating n1 cut n2: %v", err)
	}

	if err := l.Heal("n1"); err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(l.Initiator(), addr, 2*time.Second); err != nil {
		t.Fatalf("after heal: %v", err)
	}
}

// startTree starts on n a sleep and a shell whose child escapes the process
// group with setsid, and returns every pid involved.
func startTree(t *testing.T, n *Node) []int {
	t.Helper()
	p1, err := n.Start(ProcSpec{Name: "sleeper", Argv: []string{"sleep", "1000"}})
	if err != nil {
		t.Fatal(err)
	}
	pidFile := filepath.Join(t.TempDir(), "escapee.pid")
	p2, err := n.Start(ProcSpec{Name: "daemon", Argv: []string{"bash", "-c",
		"setsid sleep 1001 </dev/null >/dev/null 2>&1 & echo $! >" + pidFile + "; exec sleep 1002"}})
	if err != nil {
		t.Fatal(err)
	}
	var escapee int
	for deadline := time.Now().Add(3 * time.Second); escapee == 0; {
		b, _ := os.ReadFile(pidFile)
		escapee, _ = strconv.Atoi(strings.TrimSpace(string(b)))
		if time.Now().After(deadline) {
			t.Fatal("daemon did not start its child")
		}
		time.Sleep(10 * time.Millisecond)
	}
	pids := []int{p1.Pid(), p2.Pid(), escapee}
	for _, p := range pids {
		if !ProcAlive(p) {
			t.Fatalf("pid %d not running after start", p)
		}
	}
	return pids
}

func waitDead(t *testing.T, pids []int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for _, p := range pids {
		for ProcAlive(p) {
			if time.Now().After(deadline) {
				st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p))
				t.Fatalf("pid %d still alive: %s", p, st)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

func TestBMCPowerOffKillsNode(t *testing.T) {
	l := Start(t, ThreeNodes())
	n1, n2 := l.Node("n1"), l.Node("n2")
	victims := startTree(t, n1)
	bystanders := startTree(t, n2)
	bmc := l.BMC("n1")
	ctx := context.Background()

	// The fencer runs on n2 and reaches n1's BMC over the management net.
	start := time.Now()
	if out, err := bmc.IPMITool(ctx, n2.NS, "chassis", "power", "off"); err != nil {
		t.Fatalf("power off: %q %v", out, err)
	}
	t.Logf("ipmitool power off returned after %v", time.Since(start).Round(time.Millisecond))
	// The hook reports off only once the processes are dead: no grace here
	// beyond the reaper.
	waitDead(t, victims, time.Second)
	if st := l.PowerState("n1"); st != PowerOff {
		t.Fatalf("PowerState = %v after BMC power off", st)
	}
	out, err := bmc.IPMITool(ctx, n2.NS, "chassis", "power", "status")
	if err != nil || !strings.Contains(out, "off") {
		t.Fatalf("status after off: %q %v", out, err)
	}
	if pids, _ := n1.PIDs(); len(pids) != 0 {
		t.Fatalf("processes left in n1's namespace: %v", pids)
	}
	for _, p := range bystanders {
		if !ProcAlive(p) {
			t.Fatalf("n2's pid %d died with n1", p)
		}
	}
	if _, err := n1.Start(ProcSpec{Name: "x", Argv: []string{"true"}}); !errors.Is(err, ErrPoweredOff) {
		t.Fatalf("start on powered-off node: %v", err)
	}

	if out, err := bmc.IPMITool(ctx, n2.NS, "chassis", "power", "on"); err != nil {
		t.Fatalf("power on: %q %v", out, err)
	}
	if st := l.PowerState("n1"); st != PowerOn {
		t.Fatalf("PowerState = %v after BMC power on", st)
	}
	// Nothing came back by itself; the test restarts what it wants.
	for _, p := range victims {
		if ProcAlive(p) {
			t.Fatalf("pid %d alive after power on", p)
		}
	}
	again := startTree(t, n1)
	if again[0] == victims[0] {
		t.Fatal("pid reuse confuses the test")
	}
	if log := bmc.HookLog(); len(log) < 2 {
		t.Fatalf("hook log: %q", log)
	}
}

func TestCrashAndPowerCut(t *testing.T) {
	l := Start(t, ThreeNodes())
	n1 := l.Node("n1")
	victims := startTree(t, n1)
	if err := l.Crash("n1"); err != nil {
		t.Fatal(err)
	}
	waitDead(t, victims, 0)
	if st := l.PowerState("n1"); st != PowerOn {
		t.Fatalf("crash changed power to %v", st)
	}
	out, err := l.BMC("n1").IPMITool(context.Background(), l.Node("n2").NS, "chassis", "power", "status")
	if err != nil || !strings.Contains(out, "on") {
		t.Fatalf("BMC status after crash: %q %v (want on: the machine still has power)", out, err)
	}
	startTree(t, n1) // a crashed node can run again at once

	// A witness without a BMC still has simulated power.
	w := l.Node("w1")
	wp := startTree(t, w)
	if err := l.PowerOff("w1"); err != nil {
		t.Fatal(err)
	}
	waitDead(t, wp, 0)
	if st := l.PowerState("w1"); st != PowerOff {
		t.Fatalf("w1 power %v after PowerOff", st)
	}
	if _, err := w.Start(ProcSpec{Argv: []string{"true"}}); !errors.Is(err, ErrPoweredOff) {
		t.Fatalf("start on powered-off w1: %v", err)
	}
	if err := l.PowerOn("w1"); err != nil {
		t.Fatal(err)
	}
	startTree(t, w)
}

func TestBMCFaults(t *testing.T) {
	l := Start(t, ThreeNodes())
	ctx := context.Background()
	n1, n2 := l.Node("n1"), l.Node("n2")
	bmc := l.BMC("n1")
	victims := startTree(t, n1)

	if err := bmc.SetFault(FaultStuck, true); err != nil {
		t.Fatal(err)
	}
	if out, err := bmc.IPMITool(ctx, n2.NS, "chassis", "power", "off"); err != nil {
		t.Fatalf("stuck BMC must still acknowledge: %q %v", out, err)
	}
	time.Sleep(100 * time.Millisecond)
	for _, p := range victims {
		if !ProcAlive(p) {
			t.Fatalf("stuck BMC killed pid %d", p)
		}
	}
	if out, _ := bmc.IPMITool(ctx, n2.NS, "chassis", "power", "status"); !strings.Contains(out, "on") {
		t.Fatalf("stuck BMC status %q, want on", out)
	}
	_ = bmc.SetFault(FaultStuck, false)

	if err := bmc.SetFault(FaultStatus, true); err != nil {
		t.Fatal(err)
	}
	if out, err := bmc.IPMITool(ctx, n2.NS, "chassis", "power", "status"); err == nil {
		t.Fatalf("status fault: status read succeeded: %q", out)
	}
	_ = bmc.SetFault(FaultStatus, false)

	if err := bmc.SetFault(FaultUnreachable, true); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if out, err := bmc.IPMITool(ctx, n2.NS, "chassis", "power", "status"); err == nil {
		t.Fatalf("unreachable BMC answered: %q", out)
	}
	t.Logf("unreachable BMC: ipmitool gave up after %v", time.Since(start).Round(time.Millisecond))
	if err := bmc.SetFault(FaultUnreachable, false); err != nil {
		t.Fatal(err)
	}
	if out, err := bmc.IPMITool(ctx, n2.NS, "chassis", "power", "status"); err != nil {
		t.Fatalf("BMC after SIGCONT: %q %v", out, err)
	}
	for _, p := range victims {
		if !ProcAlive(p) {
			t.Fatalf("pid %d died during non-killing faults", p)
		}
	}
}

func TestLatency(t *testing.T) {
	l := Start(t, Config{Nodes: []NodeSpec{{Name: "n1"}}})
	err := l.Node("n1").SetLatency(20 * time.Millisecond)
	if errors.Is(err, ErrUnsupported) {
		t.Skipf("kernel without netem: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	addr := net.JoinHostPort(l.NodeAddr("n1").String(), "7000")
	echoServer(t, l.Node("n1").NS, addr)
	start := time.Now()
	if err := roundTrip(l.Initiator(), addr, 2*time.Second); err != nil {
		t.Fatal(err)
	}
	// Connect plus one echo: at least two round trips of 2 x 20 ms.
	if d := time.Since(start); d < 80*time.Millisecond {
		t.Fatalf("round trips took %v with 20 ms added each way", d)
	}
	if err := l.Node("n1").SetLatency(0); err != nil {
		t.Fatal(err)
	}
}

func labNamespaces(t *testing.T, id string) []string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], id+"-") {
			got = append(got, f[0])
		}
	}
	return got
}

func rootLinks(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("ip", "-o", "link", "show").Output()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 1 {
			names = append(names, f[1])
		}
	}
	return strings.Join(names, " ")
}

func TestCloseLeavesNothing(t *testing.T) {
	if os.Geteuid() != 0 {
		skipOrFail(t, "lab: needs root")
	}
	before := rootLinks(t)
	l, err := New(context.Background(), ThreeNodes())
	if err != nil {
		t.Fatal(err)
	}
	if got := labNamespaces(t, l.ID); len(got) != 6 { // sw ini bmc n1 n2 w1
		l.Close()
		t.Fatalf("namespaces: %v", got)
	}
	if rootLinks(t) != before {
		l.Close()
		t.Fatalf("lab touched the root namespace's links:\nbefore %s\nafter  %s", before, rootLinks(t))
	}
	var pids []int
	for _, n := range l.Nodes() {
		p, err := n.Start(ProcSpec{Name: "s", Argv: []string{"sleep", "1000"}})
		if err != nil {
			l.Close()
			t.Fatal(err)
		}
		pids = append(pids, p.Pid())
	}
	for _, n := range []string{"n1", "n2"} {
		pids = append(pids, l.BMC(n).proc.Pid())
	}
	dir := l.Dir
	if err := l.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	if got := labNamespaces(t, l.ID); len(got) != 0 {
		t.Fatalf("namespaces left: %v", got)
	}
	for _, p := range pids {
		// Reaped, not merely dead.
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", p)); err == nil {
			st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p))
			t.Fatalf("pid %d left: %s", p, st)
		}
	}
	if _, err := os.Stat(filepath.Join(LockDir, l.ID+".lock")); !os.IsNotExist(err) {
		t.Fatalf("lock file left: %v", err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("lab dir left: %v", err)
	}
	if rootLinks(t) != before {
		t.Fatalf("root links changed:\nbefore %s\nafter  %s", before, rootLinks(t))
	}
}

func TestSweepRemovesOnlyDeadLabs(t *testing.T) {
	if os.Geteuid() != 0 {
		skipOrFail(t, "lab: needs root")
	}
	dead := Prefix + "dead0001-n1" // no lock file: its process is gone
	live := Prefix + "live0001-n1" // lock held below: alive
	for _, name := range []string{dead, live} {
		if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
			t.Fatalf("%v %s", err, out)
		}
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	}
	// A leftover process in the dead namespace, as after a crashed run.
	orphan := exec.Command("ip", "netns", "exec", dead, "sleep", "1000")
	orphan.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := orphan.Start(); err != nil {
		t.Fatal(err)
	}
	reaped := make(chan struct{})
	go func() { _ = orphan.Wait(); close(reaped) }()
	for deadline := time.Now().Add(2 * time.Second); ; {
		if pids, _ := (&NS{name: dead}).PIDs(); len(pids) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("orphan never entered the namespace")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := os.MkdirAll(LockDir, 0o755); err != nil {
		t.Fatal(err)
	}
	lockPath := filepath.Join(LockDir, Prefix+"live0001.lock")
	lf, err := os.Create(lockPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lf.Close(); os.Remove(lockPath) })
	if err := syscall.Flock(int(lf.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}

	if err := Sweep(nil); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat("/var/run/netns/" + dead); !os.IsNotExist(err) {
		t.Fatalf("dead lab's namespace survived the sweep: %v", err)
	}
	select {
	case <-reaped:
	case <-time.After(2 * time.Second):
		t.Fatal("process in the dead lab's namespace survived the sweep")
	}
	if _, err := os.Stat("/var/run/netns/" + live); err != nil {
		t.Fatalf("live lab's namespace swept: %v", err)
	}
}

// TestSignalCleanup runs a lab in a child test binary, interrupts it with
// SIGTERM, and checks that the child's lab cleaned up before dying.
func TestSignalCleanup(t *testing.T) {
	if os.Getenv("HASAN_LAB_CHILD") == "1" {
		l, err := New(context.Background(), Config{Nodes: []NodeSpec{{Name: "n1", BMC: true}}})
		if err != nil {
			fmt.Println("ERR", err)
			os.Exit(2)
		}
		p, err := l.Node("n1").Start(ProcSpec{Name: "s", Argv: []string{"sleep", "1000"}})
		if err != nil {
			fmt.Println("ERR", err)
			os.Exit(2)
		}
		fmt.Println("LAB", l.ID, p.Pid(), l.BMC("n1").proc.Pid())
		time.Sleep(time.Minute)
		os.Exit(3) // not reached: the signal kills us
	}
	if os.Geteuid() != 0 {
		skipOrFail(t, "lab: needs root")
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestSignalCleanup$", "-test.count=1")
	cmd.Env = append(os.Environ(), "HASAN_LAB_CHILD=1")
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	f := strings.Fields(line)
	if err != nil || len(f) != 4 || f[0] != "LAB" {
		t.Fatalf("child said %q: %v", line, err)
	}
	id := f[1]
	if got := labNamespaces(t, id); len(got) == 0 {
		t.Fatal("child lab has no namespaces")
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	err = cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGTERM {
		t.Fatalf("child ended with %v, want death by SIGTERM (re-raised after cleanup)", err)
	}
	if got := labNamespaces(t, id); len(got) != 0 {
		t.Fatalf("namespaces left after SIGTERM: %v", got)
	}
	for _, s := range f[2:] {
		pid, _ := strconv.Atoi(s)
		if ProcAlive(pid) {
			t.Fatalf("pid %d survived the child's cleanup", pid)
		}
	}
}

// TestParallelLabs: two labs at once in one process use the same addresses
// and interface names without meeting.
func TestParallelLabs(t *testing.T) {
	for _, name := range []string{"a", "b"} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			l := Start(t, Config{Nodes: []NodeSpec{{Name: "n1"}, {Name: "n2"}}})
			addr := net.JoinHostPort(l.NodeAddr("n1").String(), "7000")
			echoServer(t, l.Node("n1").NS, addr)
			for range 20 {
				if err := roundTrip(l.Initiator(), addr, 2*time.Second); err != nil {
					t.Fatal(err)
				}
			}
			if got := labNamespaces(t, l.ID); len(got) != 4 { // sw ini n1 n2
				t.Fatalf("namespaces of %s: %v", l.ID, got)
			}
		})
	}
}

// TestPowerOffTakesLinksDown: a powered-off machine's NICs go dark, by a
// power cut or through its BMC. Before the cut the node's kernel answers
// for an address it added at run time (a VIP: a dial to a closed port is
// refused at once); after it nothing answers (the dial times out), so a
// survivor can claim the address. Power on is a boot: the links come back
// with the configured addresses and without the run-time one.
func TestPowerOffTakesLinksDown(t *testing.T) {
	l := Start(t, ThreeNodes())
	ctx := context.Background()
	vip := VIP(0)
	closedPort := netipJoin(vip.Addr().String(), 9)
	answers := func() error {
		dctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		c, err := l.Initiator().DialContext(dctx, "tcp", closedPort)
		if err == nil {
			c.Close()
			return nil
		}
		if errors.Is(err, syscall.ECONNREFUSED) {
			return nil // a live kernel answered with a reset
		}
		return err
	}
	linkUp := func(n *Node, ifname string) bool {
		out, err := n.Run(ctx, "ip", "-o", "link", "show", "dev", ifname)
		if err != nil {
			t.Fatal(err)
		}
		return strings.Contains(out, ",UP") || strings.Contains(out, "<UP")
	}
	hasAddr := func(n *Node, a string) bool {
		out, err := n.Run(ctx, "ip", "-o", "addr", "show", "dev", "eth0")
		if err != nil {
			t.Fatal(err)
		}
		return strings.Contains(out, " "+a+" ") || strings.Contains(out, " "+a+"/")
	}
	echoServer(t, l.Node("n2").NS, l.NodeAddr("n2").String()+":7000")
	for _, how := range []string{"cut", "bmc"} {
		n1 := l.Node("n1")
		if out, err := n1.Run(ctx, "ip", "addr", "add", vip.String(), "dev", "eth0"); err != nil {
			t.Fatalf("%s: add VIP: %v %s", how, err, out)
		}
		if err := answers(); err != nil {
			t.Fatalf("%s: n1 does not answer for the VIP before the cut: %v", how, err)
		}
		startTree(t, n1)
		switch how {
		case "cut":
			if err := l.PowerOff("n1"); err != nil {
				t.Fatal(err)
			}
		case "bmc":
			if out, err := l.BMC("n1").IPMITool(ctx, l.Node("n2").NS, "chassis", "power", "off"); err != nil {
				t.Fatalf("power off: %q %v", out, err)
			}
		}
		for _, ifname := range []string{"eth0", "mgmt0"} {
			if linkUp(n1, ifname) {
				t.Fatalf("%s: %s still up after power off", how, ifname)
			}
		}
		if err := answers(); err == nil {
			t.Fatalf("%s: something still answers for the VIP after n1 lost power", how)
		}
		switch how {
		case "cut":
			if err := l.PowerOn("n1"); err != nil {
				t.Fatal(err)
			}
		case "bmc":
			if out, err := l.BMC("n1").IPMITool(ctx, l.Node("n2").NS, "chassis", "power", "on"); err != nil {
				t.Fatalf("power on: %q %v", out, err)
			}
		}
		for _, ifname := range []string{"eth0", "mgmt0"} {
			if !linkUp(n1, ifname) {
				t.Fatalf("%s: %s down after power on", how, ifname)
			}
		}
		if hasAddr(n1, vip.Addr().String()) {
			t.Fatalf("%s: the run-time address survived the power cycle", how)
		}
		if !hasAddr(n1, n1.Addr.Addr().String()) {
			t.Fatalf("%s: n1 booted without its address", how)
		}
		// The node is back on both networks.
		if out, err := l.BMC("n2").IPMITool(ctx, n1.NS, "chassis", "power", "status"); err != nil {
			t.Fatalf("%s: management net after power on: %q %v", how, out, err)
		}
		deadline := time.Now().Add(3 * time.Second)
		for {
			err := roundTrip(n1.NS, l.NodeAddr("n2").String()+":7000", 500*time.Millisecond)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: cluster net after power on: %v", how, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

func netipJoin(host string, port int) string { return net.JoinHostPort(host, strconv.Itoa(port)) }

// TestIsolationOutlivesPowerCycle: isolation is a fault of the network, so
// a node fenced through its BMC while isolated boots still isolated (a
// bridge port whose carrier returns would otherwise forward again), and
// Heal of a dark node takes effect when it boots.
func TestIsolationOutlivesPowerCycle(t *testing.T) {
	l := Start(t, ThreeNodes())
	ctx := context.Background()
	n1, n2 := l.Node("n1"), l.Node("n2")
	addr := net.JoinHostPort(l.NodeAddr("n2").String(), "7000")
	echoServer(t, n2.NS, addr)
	if err := l.Isolate("n1"); err != nil {
		t.Fatal(err)
	}
	if out, err := l.BMC("n1").IPMITool(ctx, n2.NS, "chassis", "power", "off"); err != nil {
		t.Fatalf("power off: %q %v", out, err)
	}
	if out, err := l.BMC("n1").IPMITool(ctx, n2.NS, "chassis", "power", "on"); err != nil {
		t.Fatalf("power on: %q %v", out, err)
	}
	if err := roundTrip(n1.NS, addr, 700*time.Millisecond); err == nil {
		t.Fatal("n1 reaches the cluster network after a power cycle while isolated")
	}
	// Heal while dark: the port forwards once the node boots.
	if err := l.PowerOff("n1"); err != nil {
		t.Fatal(err)
	}
	if err := l.Heal("n1"); err != nil {
		t.Fatal(err)
	}
	if err := l.PowerOn("n1"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		err := roundTrip(n1.NS, addr, 500*time.Millisecond)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("n1 healed while dark does not reach n2 after power on: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
