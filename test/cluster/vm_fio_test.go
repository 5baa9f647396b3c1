package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/fencing"
	"github.com/hasan-storage/hasan/test/lab"
)

// The kernel-initiator scenario has its own names so that it never
// depends on constants another scenario may change.
const (
	vmVolUUID = "3d8f0a6b-5c2e-4b1a-8e7d-6f9a0b1c2d3e"
	vmIQN     = "iqn.2026-11.io.hasan:e2e-vm"
	vmGroup   = "g0"
	vmVolSize = 256 << 20
	// vmInitiator is the guest's initiator name.
	vmInitiator = "iqn.2026-11.io.hasan:e2e-vm-guest"
	// vmGuestAddr is the guest's address on the lab's cluster network: no
	// lab host and no lab.VIP uses it.
	vmGuestAddr = "10.77.1.150/24"
	vmGuestMAC  = "52:54:00:77:01:96"
	vmTap       = "vmtap0"
)

// Debian bookworm's stock iscsid.conf values the scenario is about: NOP-Out
// every 5 s with a 5 s timeout, sessions kept 120 s for recovery.
var vmStockTimeouts = map[string]string{
	"node.session.timeo.replacement_timeout": "120",
	"node.conn[0].timeo.noop_out_interval":   "5",
	"node.conn[0].timeo.noop_out_timeout":    "5",
}

// vmMaxStall is the issue-5 bound on the stall fio sees;
// HASAN_VM_MAX_STALL (a Go duration) loosens it while developing.
func vmMaxStall(t *testing.T) time.Duration {
	if s := os.Getenv("HASAN_VM_MAX_STALL"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			t.Fatalf("HASAN_VM_MAX_STALL: %v", err)
		}
		return d
	}
	return 3 * time.Second
}

func vmSkipOrFail(t *testing.T, why string) {
	t.Helper()
	if os.Getenv(lab.RequiredEnv) == "1" {
		t.Fatal(why + " (" + lab.RequiredEnv + "=1)")
	}
	t.Skip(why)
}

// vmGuestDir finds the test/vm guest (kernel, initramfs, root image). It
// builds it only when asked to (HASAN_VM_BUILD=1 or HASAN_LAB_REQUIRED=1):
// the build takes a minute and a half and downloads Debian packages.
func vmGuestDir(t *testing.T) string {
	t.Helper()
	script, err := filepath.Abs(filepath.Join("..", "vm", "build-guest.sh"))
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd := exec.Command(script, "--check")
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err == nil {
		return strings.TrimSpace(string(out))
	}
	if os.Getenv("HASAN_VM_BUILD") != "1" && os.Getenv(lab.RequiredEnv) != "1" {
		vmSkipOrFail(t, fmt.Sprintf("kernel-initiator guest not built (%v: %s): run test/vm/build-guest.sh as root, or set HASAN_VM_BUILD=1",
			err, strings.TrimSpace(stderr.String())))
	}
	t.Logf("building the guest with %s (about 90 s)", script)
	stderr.Reset()
	cmd = exec.Command(script)
	cmd.Stderr = &stderr
	out, err = cmd.Output()
	if err != nil {
		t.Fatalf("build-guest.sh: %v\n%s", err, stderr.String())
	}
	return strings.TrimSpace(string(out))
}

// vmCluster is the issue-5 three-node cluster (n1, n2 storage with BMCs,
// w1 witness) with one volume exported through group vmGroup on lab.VIP(0).
type vmCluster struct {
	l      *lab.Lab
	confs  map[string]nodeConf
	procs  map[string]*lab.Process
	prop   *proposer
	owner  string
	portal string // VIP:3260
}

func (c *vmCluster) state(ctx context.Context, id string) (*cluster.State, error) {
	st, err := getStatus(ctx, c.confs[id])
	if err != nil {
		return nil, err
	}
	return st.State, nil
}

func (c *vmCluster) do(t *testing.T, ctx context.Context, cmd *cluster.Command) {
	t.Helper()
	addr := ""
	for _, id := range []string{"w1", "n1", "n2"} {
		st, err := getStatus(ctx, c.confs[id])
		if err != nil || st.Leader == "" {
			continue
		}
		if n, ok := st.State.Nodes[st.Leader]; ok {
			addr = n.RaftAddr
			break
		}
	}
	if addr == "" {
		t.Fatal("no Raft leader known")
	}
	if err := c.prop.propose(ctx, addr, cmd); err != nil {
		t.Fatalf("propose %s: %v", cmd.Kind, err)
	}
}

// startVMCluster builds the lab and the cluster the way TestOwnerPowerLoss
// does (see README.md there) and waits until the portal answers on the VIP
// with the survivor in the ISR.
func startVMCluster(t *testing.T, ctx context.Context, root string) *vmCluster {
	t.Helper()
	cfg := lab.ThreeNodes()
	cfg.Dir, cfg.KeepDir = filepath.Join(root, "lab"), true
	l := lab.Start(t, cfg)
	bin := os.Getenv("HASAN_VM_HASAN_BIN")
	if bin == "" {
		bin = lab.BuildHasan(t)
	} else {
		// A diagnostic: another build of hasan (an experiment) under the same scenario.
		t.Logf("NOT THIS TREE: hasan binary %s (HASAN_VM_HASAN_BIN)", bin)
	}
	// The controller's documented default; HASAN_VM_FAILURE_TIMEOUT is a
	// diagnostic (logged) to see how the stall follows detection.
	failure := cluster.DefaultFailureTimeout
	if s := os.Getenv("HASAN_VM_FAILURE_TIMEOUT"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			t.Fatalf("HASAN_VM_FAILURE_TIMEOUT: %v", err)
		}
		failure = d
		t.Logf("NOT DEFAULT: failure_timeout %v (HASAN_VM_FAILURE_TIMEOUT)", d)
	}
	c := &vmCluster{l: l, procs: map[string]*lab.Process{}, confs: map[string]nodeConf{
		"n1": writeConfig(t, root, l.Node("n1"), "storage", failure),
		"n2": writeConfig(t, root, l.Node("n2"), "storage", failure),
		"w1": writeConfig(t, root, l.Node("w1"), "witness", failure),
	}}
	n1 := c.confs["n1"]
	if out, err := l.Node("n1").Run(ctx, bin, "cluster", "init", "--config", n1.Config, "--name", "e2e-vm"); err != nil {
		t.Fatalf("cluster init: %v\n%s", err, out)
	}
	for _, id := range []string{"n2", "w1"} {
		if out, err := l.Node("n1").Run(ctx, bin, "cluster", "cert", "--config", n1.Config, "--node", id, "--out", filepath.Join(c.confs[id].Dir, "tls")); err != nil {
			t.Fatalf("cluster cert %s: %v\n%s", id, err, out)
		}
	}
	adminTLS := filepath.Join(root, "admin-tls")
	if out, err := l.Node("n1").Run(ctx, bin, "cluster", "cert", "--config", n1.Config, "--admin", "--node", "e2e-harness", "--out", adminTLS); err != nil {
		t.Fatalf("cluster cert e2e-harness: %v\n%s", err, out)
	}
	read := func(name string) []byte {
		b, err := os.ReadFile(filepath.Join(adminTLS, name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	tlsCfg, err := cluster.TLSConfig(read("ca.crt"), read("node.crt"), read("node.key"))
	if err != nil {
		t.Fatal(err)
	}
	c.prop = &proposer{tls: tlsCfg, dial: l.Node("w1").DialContext}

	serve := func(id string) {
		t.Helper()
		p, err := l.Node(id).Start(lab.ProcSpec{Name: "hasan", Argv: []string{bin, "serve", "--log-level", "debug", "--config", c.confs[id].Config}})
		if err != nil {
			t.Fatalf("start %s: %v", id, err)
		}
		c.procs[id] = p
		waitFor(t, ctx, 15*time.Second, id+"'s admin socket", func() (bool, error) {
			if p.Exited() {
				t.Fatalf("hasan serve on %s exited: %v", id, p.Err())
			}
			_, err := getStatus(ctx, c.confs[id])
			return err == nil, err
		})
	}
	serve("n1")
	waitFor(t, ctx, 15*time.Second, "n1 to lead", func() (bool, error) {
		st, err := getStatus(ctx, n1)
		return err == nil && st.RaftState == "Leader", err
	})
	for _, id := range []string{"n2", "w1"} {
		serve(id)
		nc := c.confs[id]
		var tok struct {
			Token string `json:"token"`
		}
		if err := adminCall(ctx, n1.adminSocket(), http.MethodPost, "/token?role="+nc.Role+"&ttl=2m", nil, &tok); err != nil {
			t.Fatalf("token for %s: %v", id, err)
		}
		if err := adminCall(ctx, n1.adminSocket(), http.MethodPost, "/join", map[string]any{"token": tok.Token, "node": nc.nodeInfo("0.0.0.0:3260")}, nil); err != nil {
			t.Fatalf("join %s: %v", id, err)
		}
	}
	for _, id := range []string{"n1", "n2"} {
		b := l.BMC(id)
		dev, err := json.Marshal(map[string]any{
			"type": "ipmi", "timeout": "10s", "poll_interval": "100ms",
			"ipmi": map[string]any{"host": b.Addr.Addr().String(), "port": int(b.Addr.Port()), "user": b.User,
				"password": b.Password, "cipher_suite": b.CipherSuite, "privilege": "administrator",
				"request_timeout": "300ms", "retries": 2},
		})
		if err != nil {
			t.Fatal(err)
		}
		c.do(t, ctx, &cluster.Command{Kind: cluster.KindFenceDevicePut, FenceDevicePut: &cluster.FenceDevicePutCmd{Name: "ipmi-" + id, Config: dev}})
		c.do(t, ctx, &cluster.Command{Kind: cluster.KindNodeSetFence, NodeSetFence: &cluster.NodeSetFenceCmd{ID: id, Topology: fencing.NodeTopology{Levels: [][]string{{"ipmi-" + id}}}}})
	}
	vipAddr := lab.VIP(0)
	c.do(t, ctx, &cluster.Command{Kind: cluster.KindVolumeCreate, VolumeCreate: &cluster.VolumeCreateCmd{UUID: vmVolUUID, Name: "vm0", Size: vmVolSize, Primary: "n1", Replicas: []string{"n1", "n2"}}})
	c.do(t, ctx, &cluster.Command{Kind: cluster.KindTargetPut, TargetPut: &cluster.TargetPutCmd{Target: cluster.Target{IQN: vmIQN, LUNs: map[uint64]string{0: vmVolUUID}, ACL: []string{vmInitiator}}}})
	c.do(t, ctx, &cluster.Command{Kind: cluster.KindGroupPut, GroupPut: &cluster.GroupPutCmd{Group: cluster.Group{Name: vmGroup, VIPs: []string{vipAddr.String()}, Targets: []string{vmIQN}, Preferred: []string{"n1"}}}})

	waitFor(t, ctx, 20*time.Second, "the controller to place "+vmGroup, func() (bool, error) {
		st, err := c.state(ctx, "w1")
		if err != nil {
			return false, err
		}
		if g := st.Groups[vmGroup]; g != nil {
			c.owner = g.Owner
		}
		return c.owner != "", nil
	})
	survivor := c.survivor()
	waitFor(t, ctx, 60*time.Second, survivor+" in the ISR", func() (bool, error) {
		st, err := c.state(ctx, "w1")
		if err != nil {
			return false, err
		}
		v := st.Volumes[vmVolUUID]
		return v != nil && slices.Contains(v.ISR, survivor), nil
	})
	c.portal = vipAddr.Addr().String() + ":3260"
	waitFor(t, ctx, 15*time.Second, "the portal on the VIP", func() (bool, error) {
		dctx, dcancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer dcancel()
		conn, err := l.Initiator().DialContext(dctx, "tcp", c.portal)
		if err == nil {
			conn.Close()
		}
		return err == nil, err
	})
	return c
}

func (c *vmCluster) survivor() string { return map[string]string{"n1": "n2", "n2": "n1"}[c.owner] }

// vmCheckSwitchSealed fails the test unless the lab's switch namespace,
// where the guest's tap is plugged, is a closed world: no address, no
// route, and no link but the lab's bridges, veth ports and the tap. The
// guest then reaches the lab's cluster network and nothing else.
func vmCheckSwitchSealed(t *testing.T, ctx context.Context, sw *lab.NS) {
	t.Helper()
	out, err := sw.Run(ctx, "ip", "-o", "link", "show")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		// Lines are "INDEX: NAME[@PEER]: ..."; ip also prints warnings
		// ("Peer netns reference is invalid") into the combined output.
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		if _, err := strconv.Atoi(strings.TrimSuffix(f[0], ":")); err != nil || !strings.HasSuffix(f[0], ":") {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		switch {
		case name == "lo", name == "br-c", name == "br-m", name == vmTap,
			strings.HasPrefix(name, "c-"), strings.HasPrefix(name, "m-"):
		default:
			t.Fatalf("switch namespace %s has an unexpected link %q: the guest could reach beyond the lab", sw.Name(), name)
		}
	}
	// Nothing is routed out of it either: no default route, no gateway, no
	// global address (the bridges' IPv6 link-local routes stay on the lab's links).
	for _, args := range [][]string{{"ip", "-o", "-4", "route", "show", "table", "all"}, {"ip", "-o", "-6", "route", "show", "table", "all"}} {
		out, err := sw.Run(ctx, args...)
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
			if strings.HasPrefix(line, "default") || strings.Contains(line, " via ") {
				t.Fatalf("switch namespace %s routes traffic: %q", sw.Name(), line)
			}
		}
	}
	if out, err := sw.Run(ctx, "ip", "-o", "addr", "show", "scope", "global"); err != nil || strings.TrimSpace(out) != "" {
		t.Fatalf("switch namespace %s has global addresses (%v): %s", sw.Name(), err, out)
	}
}

// vmGuest is one QEMU run of the test/vm guest with fio-failover.sh as init.
type vmGuest struct {
	dir     string // console.log, results.log, initrd
	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error // valid once exited is closed
	started time.Time
}

// startVMGuest boots the guest inside the lab's switch namespace, its NIC a
// tap on the cluster bridge. QEMU is started from a goroutine locked to its
// OS thread until QEMU exits: the parent-death SIGKILL is tied to the
// forking thread, which must therefore outlive QEMU.
func startVMGuest(t *testing.T, ctx context.Context, l *lab.Lab, guest, work string, env map[string]string) *vmGuest {
	t.Helper()
	sw := l.Switch()
	for _, args := range [][]string{
		{"ip", "tuntap", "add", "dev", vmTap, "mode", "tap"},
		{"ip", "link", "set", vmTap, "master", "br-c", "up"},
	} {
		if out, err := sw.Run(ctx, args...); err != nil {
			t.Fatalf("tap: %v %s", err, out)
		}
	}
	vmCheckSwitchSealed(t, ctx, sw)

	run := filepath.Join(work, "run")
	if err := os.MkdirAll(filepath.Join(run, "hasan-vm"), 0o755); err != nil {
		t.Fatal(err)
	}
	script, err := os.ReadFile(filepath.Join("..", "vm", "guest", "fio-failover.sh"))
	if err != nil {
		t.Fatal(err)
	}
	// The guest's initramfs /init execs /hasan-vm/test.sh.
	if err := os.WriteFile(filepath.Join(run, "hasan-vm", "test.sh"), script, 0o755); err != nil {
		t.Fatal(err)
	}
	var envFile strings.Builder
	keys := make([]string, 0, len(env))
	for k := range env {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		fmt.Fprintf(&envFile, "%s='%s'\n", k, env[k])
	}
	if err := os.WriteFile(filepath.Join(run, "hasan-vm", "test.env"), []byte(envFile.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	// The per-run cpio goes after the cached initramfs (the kernel unpacks
	// concatenated archives in order).
	pack := exec.CommandContext(ctx, "sh", "-c", "find . | cpio -o -H newc --quiet -R 0:0 | gzip -1")
	pack.Dir = run
	part, err := pack.Output()
	if err != nil {
		t.Fatalf("pack the run cpio: %v", err)
	}
	base, err := os.ReadFile(filepath.Join(guest, "initrd.cpio.gz"))
	if err != nil {
		t.Fatal(err)
	}
	initrd := filepath.Join(work, "initrd")
	if err := os.WriteFile(initrd, append(base, part...), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"console.log", "results.log"} {
		if err := os.WriteFile(filepath.Join(work, f), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}

	smp := os.Getenv("HASAN_VM_SMP")
	if smp == "" {
		smp = "1"
	}
	argv := []string{"netns", "exec", sw.Name(), "qemu-system-x86_64",
		"-accel", "tcg,thread=multi", "-cpu", "max", "-smp", smp, "-m", "768",
		"-nodefaults", "-display", "none", "-no-reboot",
		"-kernel", filepath.Join(guest, "vmlinuz"), "-initrd", initrd,
		"-append", "console=ttyS0 net.ifnames=0 panic=1 loglevel=4",
		"-drive", "file=" + filepath.Join(guest, "rootfs.img") + ",if=virtio,format=raw,snapshot=on",
		"-netdev", "tap,id=n0,ifname=" + vmTap + ",script=no,downscript=no",
		"-device", "virtio-net-pci,netdev=n0,mac=" + vmGuestMAC,
		"-serial", "file:" + filepath.Join(work, "console.log"),
		"-serial", "file:" + filepath.Join(work, "results.log"),
	}
	g := &vmGuest{dir: work, exited: make(chan struct{})}
	logf, err := os.Create(filepath.Join(work, "qemu.log"))
	if err != nil {
		t.Fatal(err)
	}
	// `ip netns exec` execs QEMU: the pid and the parent-death signal are QEMU's.
	g.cmd = exec.Command("ip", argv...)
	g.cmd.Stdout, g.cmd.Stderr = logf, logf
	g.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	startErr := make(chan error, 1)
	go func() {
		// Never unlocked: the thread ends with this goroutine, after QEMU.
		runtime.LockOSThread()
		if err := g.cmd.Start(); err != nil {
			startErr <- err
			return
		}
		startErr <- nil
		g.waitErr = g.cmd.Wait()
		logf.Close()
		close(g.exited)
	}()
	if err := <-startErr; err != nil {
		logf.Close()
		t.Fatalf("start qemu: %v", err)
	}
	g.started = time.Now()
	t.Cleanup(g.stop)
	return g
}

// stop kills QEMU if it still runs and waits for it.
func (g *vmGuest) stop() {
	select {
	case <-g.exited:
		return
	default:
	}
	_ = g.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-g.exited:
	case <-time.After(5 * time.Second):
		_ = g.cmd.Process.Kill()
		<-g.exited
	}
}

// lines follows results.log (the guest's second serial port) and sends
// each complete line, without the serial \r, until ctx ends or QEMU has
// exited and the file is drained.
func (g *vmGuest) lines(ctx context.Context) <-chan string {
	out := make(chan string, 64)
	go func() {
		defer close(out)
		f, err := os.Open(filepath.Join(g.dir, "results.log"))
		if err != nil {
			return
		}
		defer f.Close()
		var pending []byte
		buf := make([]byte, 4096)
		for {
			exited := false
			select {
			case <-g.exited:
				exited = true
			default:
			}
			for {
				n, err := f.Read(buf)
				pending = append(pending, buf[:n]...)
				if n == 0 || err != nil { // io.EOF: caught up with QEMU
					break
				}
			}
			for {
				i := bytes.IndexByte(pending, '\n')
				if i < 0 {
					break
				}
				line := strings.TrimRight(string(pending[:i]), "\r")
				pending = pending[i+1:]
				select {
				case out <- line:
				case <-ctx.Done():
					return
				}
			}
			if exited {
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	return out
}

// consoleTail is the end of the guest's console, for failure messages.
func (g *vmGuest) consoleTail(n int) string {
	b, err := os.ReadFile(filepath.Join(g.dir, "console.log"))
	if err != nil {
		return err.Error()
	}
	ls := strings.Split(strings.ReplaceAll(string(b), "\r", ""), "\n")
	if len(ls) > n {
		ls = ls[len(ls)-n:]
	}
	return strings.Join(ls, "\n")
}

// vmLogTime is the time of the first line of a node's slog text log that
// contains what and is not before after.
func vmLogTime(path, what string, after time.Time) (time.Time, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return time.Time{}, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.Contains(line, what) || !strings.HasPrefix(line, "time=") {
			continue
		}
		ts, _, _ := strings.Cut(strings.TrimPrefix(line, "time="), " ")
		at, err := time.Parse(time.RFC3339Nano, ts)
		if err == nil && !at.Before(after) {
			return at, true
		}
	}
	return time.Time{}, false
}

// vmFields parses "k=v k=v ..." (the guest's FIO, STALL and KERN lines).
func vmFields(s string) map[string]string {
	m := map[string]string{}
	for _, f := range strings.Fields(s) {
		if k, v, ok := strings.Cut(f, "="); ok {
			m[k] = v
		}
	}
	return m
}

func vmInt(t *testing.T, m map[string]string, k, line string) int {
	t.Helper()
	v, err := strconv.Atoi(m[k])
	if err != nil {
		t.Fatalf("guest line %q: %s: %v", line, k, err)
	}
	return v
}

// TestVMFioOwnerPowerLoss is issue 5's "real kernel initiator" check: a
// QEMU guest on the lab's cluster network runs the Linux open-iscsi
// initiator with Debian's stock iscsid.conf (NOP-Out 5 s/5 s, replacement
// 120 s) and fio with crc32c verify through the floating IP. Mid-run the
// owner loses power; the controller must fence it through its BMC before
// the survivor takes over. fio must finish with no I/O and no verify error,
// and the longest time without a completed I/O, measured from fio's
// per-I/O log in the guest, must stay under 3 s: stock NOP-Out detection
// alone takes 5-10 s, so this needs the new owner's tickle ACKs.
func TestVMFioOwnerPowerLoss(t *testing.T) {
	requireE2E(t)
	if os.Geteuid() != 0 {
		vmSkipOrFail(t, "the kernel-initiator scenario needs root (network namespaces, tap devices)")
	}
	for _, tool := range []string{"qemu-system-x86_64", "cpio", "gzip"} {
		if _, err := exec.LookPath(tool); err != nil {
			vmSkipOrFail(t, tool+" not installed (Debian: qemu-system-x86, cpio, gzip)")
		}
	}
	guest := vmGuestDir(t)

	root, err := os.MkdirTemp("", "hvm-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() || os.Getenv("HASAN_CLUSTER_KEEP") != "" {
			t.Logf("node data, process logs and guest logs kept in %s", root)
			return
		}
		os.RemoveAll(root)
	})
	vmTimeout := 10 * time.Minute
	if s := os.Getenv("HASAN_VM_TIMEOUT"); s != "" {
		if vmTimeout, err = time.ParseDuration(s); err != nil {
			t.Fatalf("HASAN_VM_TIMEOUT: %v", err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), vmTimeout)
	defer cancel()

	c := startVMCluster(t, ctx, root)
	owner, survivor := c.owner, c.survivor()
	t.Logf("%s owns %s, %s is the survivor; portal %s", owner, vmGroup, survivor, c.portal)

	work := filepath.Join(root, "vm")
	env := map[string]string{
		"IQN":        vmIQN,
		"INITIATOR":  vmInitiator,
		"PORTAL":     c.portal,
		"GUEST_ADDR": vmGuestAddr,
		"LUN_BYTES":  strconv.Itoa(vmVolSize),
		// Modest and steady: a constant I/O rate makes any stall stand out
		// and leaves CPU to the nodes on this 2-core machine.
		"FIO_BS":             "16k",
		"FIO_IODEPTH":        "4",
		"FIO_SIZE":           "128m",
		"FIO_RUNTIME":        "40",
		"FIO_RATE_IOPS":      "200",
		"FIO_VERIFY_BACKLOG": "64",
		"POWEROFF_AFTER":     "12",
	}
	// HASAN_VM_TIME2WAIT sets the initiator's DefaultTime2Wait offer (open-iscsi
	// waits that long before its first reconnect after a connection error): a
	// diagnostic to split the stall, not the stock configuration under test.
	if v := os.Getenv("HASAN_VM_TIME2WAIT"); v != "" {
		if _, err := strconv.ParseUint(v, 10, 16); err != nil {
			t.Fatalf("HASAN_VM_TIME2WAIT: %v", err)
		}
		env["TIME2WAIT"] = v
		t.Logf("NOT STOCK: the guest offers DefaultTime2Wait=%s (HASAN_VM_TIME2WAIT)", v)
	}
	g := startVMGuest(t, ctx, c.l, guest, work, env)

	var (
		results   []string
		conf      = map[string]string{}
		offAt     time.Time
		hooksFrom int
		done      bool
	)
	for line := range g.lines(ctx) {
		up := time.Since(g.started).Seconds()
		t.Logf("guest [%6.1f s] %s", up, line)
		results = append(results, line)
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "CONF":
			if len(f) >= 3 {
				conf[f[1]] = f[2]
			}
		case "HOST":
			if len(f) >= 2 && f[1] == "poweroff" && offAt.IsZero() {
				hooksFrom = len(c.l.BMC(owner).HookLog())
				offAt = time.Now()
				if err := c.l.PowerOff(owner); err != nil {
					t.Fatalf("power off %s: %v", owner, err)
				}
				// As in TestOwnerPowerLoss: a powered-off machine's NICs go
				// dark; the lab's power cut leaves the namespace answering ARP.
				for _, link := range []string{"eth0", "mgmt0"} {
					if out, err := c.l.Node(owner).Run(ctx, "ip", "link", "set", link, "down"); err != nil {
						t.Fatalf("%s: link %s down: %v %s", owner, link, err, out)
					}
				}
				t.Logf("%s (owner) lost power at %s (links down %v later)", owner, offAt.Format("15:04:05.000"), time.Since(offAt).Round(time.Millisecond))
			}
		case "NOTE":
			if strings.Contains(line, "::ffff:") {
				t.Logf("note: the target advertises its portal IPv4-mapped (%s); open-iscsi copes, other initiators may not", line)
			}
		case "DONE":
			done = true
		}
		if done {
			break
		}
	}
	if !done {
		g.stop() // waitErr is set once QEMU has exited
		t.Fatalf("the guest did not finish (context: %v, qemu: %v); console tail:\n%s", ctx.Err(), g.waitErr, g.consoleTail(60))
	}
	g.stop()

	find := func(prefix string) string {
		for _, l := range results {
			if strings.HasPrefix(l, prefix) {
				return l
			}
		}
		return ""
	}
	for _, s := range []string{"setup", "discovery", "login"} {
		if find("PASS "+s+" ") == "" {
			t.Fatalf("guest step %s did not pass: %q; console tail:\n%s", s, find("FAIL "+s+" "), g.consoleTail(60))
		}
	}
	for k, want := range vmStockTimeouts {
		if conf[k] != want {
			t.Errorf("the guest's session has %s = %q, want Debian's stock %q", k, conf[k], want)
		}
	}
	if offAt.IsZero() {
		t.Fatalf("the guest never asked for the power cut (fio ended early?); console tail:\n%s", g.consoleTail(60))
	}

	fioLine, stallLine, kernLine := find("FIO "), find("STALL "), find("KERN ")
	if fioLine == "" || stallLine == "" || kernLine == "" {
		t.Fatalf("the guest did not report fio's results; console tail:\n%s", g.consoleTail(80))
	}
	fio, stall, kern := vmFields(fioLine), vmFields(stallLine), vmFields(kernLine)
	maxMS := vmInt(t, stall, "max_ms", stallLine)
	fromMS, toMS := vmInt(t, stall, "from_ms", stallLine), vmInt(t, stall, "to_ms", stallLine)
	poweroffMS, ios := vmInt(t, stall, "poweroff_ms", stallLine), vmInt(t, stall, "ios", stallLine)
	stallD := time.Duration(maxMS) * time.Millisecond
	t.Logf("fio through the VIP across %s's power loss: longest stall %v (fio time %.3f-%.3f s; power cut requested at %.3f s), %d I/Os, fio rc=%s err=%s verify_errors=%s, kernel conn_errors=%s io_errors=%s",
		owner, stallD, float64(fromMS)/1000, float64(toMS)/1000, float64(poweroffMS)/1000, ios,
		fio["rc"], fio["err"], fio["verify_errors"], kern["conn_errors"], kern["io_errors"])

	if n, err := strconv.Atoi(kern["conn_errors"]); err == nil && n > 1 {
		// One failover is one reset; more mean the service moved or
		// dropped again (the longest of those stalls is in the bound too).
		t.Logf("warning: the initiator lost its connection %d times for one failover; see the survivor's log for demotions", n)
	}
	// fio itself: clean exit, no I/O error, no verify error.
	if fio["rc"] != "0" || fio["err"] != "0" || fio["verify_errors"] != "0" {
		t.Errorf("fio did not finish cleanly: %s; console tail:\n%s", fioLine, g.consoleTail(80))
	}
	if find("PASS fio ") == "" {
		t.Errorf("guest step fio did not pass: %q", find("FAIL fio "))
	}
	if kern["io_errors"] != "0" {
		t.Errorf("the guest kernel logged I/O errors: %s", kernLine)
	}
	// I/O ran on both sides of the cut, and long after it: the failover is
	// inside the measured window, not after fio ended.
	if ios < 1000 || toMS <= poweroffMS {
		t.Errorf("too little I/O around the cut to measure a stall: %s", stallLine)
	}

	// The takeover waited for a confirmed fence through the owner's BMC.
	st, err := c.state(ctx, "w1")
	if err != nil {
		t.Fatal(err)
	}
	if g := st.Groups[vmGroup]; g == nil || g.Owner != survivor {
		t.Fatalf("after the power loss %s is not owned by %s: %+v", vmGroup, survivor, st.Groups[vmGroup])
	}
	var fenced *fencing.Record
	for i := range st.FenceHistory {
		r := &st.FenceHistory[i]
		if r.Node == owner && r.Action == "off" && r.Outcome == fencing.OutcomeSuccess && r.Time.After(offAt.Add(-time.Second)) {
			fenced = r
		}
	}
	if fenced == nil || fenced.Device != "ipmi-"+owner {
		t.Fatalf("no successful fence of %s through ipmi-%s in the history: %+v", owner, owner, st.FenceHistory)
	}
	var takeoverAt time.Time
	for _, e := range st.Events {
		if e.Kind == "takeover" && e.Group == vmGroup {
			takeoverAt = e.Time
		}
	}
	if takeoverAt.IsZero() || takeoverAt.Before(fenced.Time) {
		t.Fatalf("takeover at %v is not after the confirmed fence at %v", takeoverAt, fenced.Time)
	}
	hooks := c.l.BMC(owner).HookLog()[hooksFrom:]
	if !slices.ContainsFunc(hooks, func(s string) bool { return strings.Contains(s, "set power 0") }) {
		t.Fatalf("the BMC of %s never received a power set: %v", owner, hooks)
	}
	if !c.procs[owner].Exited() {
		t.Fatalf("hasan serve on %s survived the power loss", owner)
	}
	tickled := "none logged"
	if at, ok := vmLogTime(c.procs[survivor].LogPath, "msg=tickled", offAt); ok {
		tickled = at.Sub(offAt).Round(time.Millisecond).String()
	}
	t.Logf("host timeline from the cut: fence confirmed %v (took %v), takeover committed %v, %s tickled initiators %s; guest: %s",
		fenced.Time.Sub(offAt).Round(time.Millisecond), fenced.Duration.Round(time.Millisecond),
		takeoverAt.Sub(offAt).Round(time.Millisecond), survivor, tickled, strings.TrimPrefix(find("TIMELINE "), "TIMELINE "))

	if lim := vmMaxStall(t); stallD >= lim {
		// The guest's share is fixed: open-iscsi waits the negotiated
		// DefaultTime2Wait (2 s unless both sides offer less) before it
		// reconnects after the tickle's reset.
		t.Errorf("fio stalled %v through %s's power loss, bound %v (issue 5; HASAN_VM_MAX_STALL loosens it); "+
			"the survivor tickled %s after the cut, and open-iscsi waits DefaultTime2Wait (CONF line above) after the reset before reconnecting",
			stallD, owner, lim, tickled)
	}
}
