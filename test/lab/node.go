package lab

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ErrPoweredOff: the node has no power, so nothing can start on it.
var ErrPoweredOff = errors.New("lab: node is powered off")

// ErrUnsupported: the kernel lacks what a fault needs (e.g. sch_netem).
var ErrUnsupported = errors.New("lab: not supported by this kernel")

// PowerState is a node's simulated power.
type PowerState int

const (
	PowerOn PowerState = iota
	PowerOff
)

func (p PowerState) String() string {
	if p == PowerOn {
		return "on"
	}
	return "off"
}

// Node is one cluster node: a namespace with eth0 on the cluster network
// and mgmt0 on the management network, simulated power, and (for storage
// nodes) a BMC.
//
// Every process started with Start joins the node's process group, led by
// a placeholder process (`sleep infinity`) that exists while the node is
// powered; power off or Crash SIGKILLs that group and then anything else
// left in the namespace.
type Node struct {
	*NS
	// Addr is eth0's address on the cluster network, MgmtAddr mgmt0's.
	Addr     netip.Prefix
	MgmtAddr netip.Prefix

	spec NodeSpec
	dir  string // state shared with the BMC hook
	bmc  *BMC

	mu     sync.Mutex
	leader *Process // process-group leader while powered
	procs  []*Process
	closed bool
}

// NodeName is the node's name in the Config.
func (n *Node) NodeName() string { return n.spec.Name }

func (l *Lab) addNode(ctx context.Context, i int, spec NodeSpec) (*Node, error) {
	ns, err := l.newNS(ctx, spec.Name)
	if err != nil {
		return nil, err
	}
	n := &Node{
		NS:       ns,
		Addr:     withBits(hostAddr(ClusterNet, 11+i), ClusterNet.Bits()),
		MgmtAddr: withBits(hostAddr(MgmtNet, 11+i), MgmtNet.Bits()),
		spec:     spec,
		dir:      filepath.Join(l.Dir, "nodes", spec.Name),
	}
	if err := os.MkdirAll(n.dir, 0o755); err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	if err := n.setPower(PowerOn); err != nil {
		return nil, err
	}
	if err := l.plug(ctx, ns, "br-c", "c-"+spec.Name, "eth0", n.Addr); err != nil {
		return nil, err
	}
	if err := l.plug(ctx, ns, "br-m", "m-"+spec.Name, "mgmt0", n.MgmtAddr); err != nil {
		return nil, err
	}
	// The NICs and their boot-time addresses, for the power transitions
	// here and in the BMC hook.
	links := fmt.Sprintf("eth0 %s\nmgmt0 %s\n", n.Addr, n.MgmtAddr)
	if err := os.WriteFile(filepath.Join(n.dir, "links"), []byte(links), 0o644); err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	return n, nil
}

// nicNames are the node's links, in the order of the links file.
var nicNames = [...]string{"eth0", "mgmt0"}

// linksDown takes the node's NICs down, as a power cut does: the peers see
// the carrier go, nothing more leaves the node, and its kernel stops
// answering ARP for any address it held.
func (n *Node) linksDown() error {
	var b strings.Builder
	for _, ifname := range nicNames {
		fmt.Fprintf(&b, "link set dev %s down\n", ifname)
	}
	return n.ipBatch(b.String())
}

// linksBoot brings the NICs up as a boot does: with their configured
// addresses only, so an address added at run time (a floating IP the node
// held before it lost power) does not come back with them.
func (n *Node) linksBoot() error {
	var b strings.Builder
	for ifname, addr := range map[string]netip.Prefix{"eth0": n.Addr, "mgmt0": n.MgmtAddr} {
		fmt.Fprintf(&b, "link set dev %s down\naddr flush dev %s\naddr add %s dev %s\nlink set dev %s up\n", ifname, ifname, addr, ifname, ifname)
	}
	if err := n.ipBatch(b.String()); err != nil {
		return err
	}
	return n.applyIsolation()
}

func (n *Node) ipBatch(cmds string) error {
	cmd := exec.Command("ip", "-n", n.name, "-batch", "-")
	cmd.Stdin = strings.NewReader(cmds)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("lab: %s: ip -batch: %w: %s", n.spec.Name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// PowerState reads the node's power, as its BMC would report it.
func (n *Node) PowerState() PowerState {
	b, err := os.ReadFile(filepath.Join(n.dir, "power"))
	if err == nil && strings.TrimSpace(string(b)) == "on" {
		return PowerOn
	}
	return PowerOff
}

func (n *Node) cutting() bool {
	_, err := os.Stat(filepath.Join(n.dir, "cutting"))
	return err == nil
}

// setPower writes the state file atomically; the BMC hook writes it too.
func (n *Node) setPower(p PowerState) error {
	tmp := filepath.Join(n.dir, "power.go.tmp")
	if err := os.WriteFile(tmp, []byte(p.String()+"\n"), 0o644); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(n.dir, "power")); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	return nil
}

// Start runs a process on the node, in its namespace and process group, with
// output to NODE-NAME.log in the lab directory. It fails with ErrPoweredOff
// when the node has no power.
func (n *Node) Start(spec ProcSpec) (*Process, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil, errors.New("lab: closed")
	}
	if n.PowerState() != PowerOn || n.cutting() {
		return nil, fmt.Errorf("lab: start %s on %s: %w", spec.Name, n.spec.Name, ErrPoweredOff)
	}
	if n.leader == nil || n.leader.Exited() || !ProcAlive(n.leader.Pid()) {
		leader, err := startProcess(n.lab.spawn, n.name, filepath.Join(n.lab.Dir, n.spec.Name+"-pgleader.log"), n.lab.Dir, 0,
			ProcSpec{Name: n.spec.Name + "/pgleader", Argv: []string{"sleep", "infinity"}})
		if err != nil {
			return nil, err
		}
		n.lab.track(leader)
		n.leader = leader
		if err := os.WriteFile(filepath.Join(n.dir, "pgid"), []byte(strconv.Itoa(leader.Pid())+"\n"), 0o644); err != nil {
			return nil, fmt.Errorf("lab: %w", err)
		}
	}
	if spec.Name == "" {
		spec.Name = filepath.Base(spec.Argv[0])
	}
	p, err := startProcess(n.lab.spawn, n.name, filepath.Join(n.lab.Dir, n.spec.Name+"-"+spec.Name+".log"), n.lab.Dir, n.leader.Pid(), spec)
	if err != nil {
		return nil, err
	}
	n.lab.track(p)
	n.procs = append(n.procs, p)
	// A BMC power cut may have raced with the start; a dead machine runs
	// nothing.
	if n.PowerState() != PowerOn {
		p.Kill()
		return nil, fmt.Errorf("lab: start %s on %s: %w", spec.Name, n.spec.Name, ErrPoweredOff)
	}
	return p, nil
}

// Processes returns the processes started on the node, dead or alive.
func (n *Node) Processes() []*Process {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]*Process(nil), n.procs...)
}

// kill SIGKILLs the node's process group, then anything left in its
// namespace, and waits until the processes the lab started are reaped.
func (n *Node) killLocked() error {
	if n.leader != nil {
		_ = syscall.Kill(-n.leader.Pid(), syscall.SIGKILL)
	}
	err := n.killAll()
	deadline := time.After(5 * time.Second)
	for _, p := range append([]*Process{n.leader}, n.procs...) {
		if p == nil {
			continue
		}
		select {
		case <-p.Done():
		case <-deadline:
			return errors.Join(err, fmt.Errorf("lab: %s: %s (pid %d) survived SIGKILL", n.spec.Name, p.Name, p.Pid()))
		}
	}
	return err
}

// PowerOff simulates a power cut, not through the BMC: the node's links go
// down, then every process of the node dies and the node reports power off.
// The links go first, so nothing the dying processes send (FIN, RST) leaves
// the machine, as with a real cut.
func (n *Node) PowerOff() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if err := os.WriteFile(filepath.Join(n.dir, "cutting"), nil, 0o644); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	err := n.linksDown()
	err = errors.Join(err, n.killLocked())
	if perr := n.setPower(PowerOff); perr != nil {
		err = errors.Join(err, perr)
	}
	_ = os.Remove(filepath.Join(n.dir, "cutting"))
	return err
}

// PowerOn restores power: the node boots with its links up and only their
// configured addresses. Nothing restarts by itself: the test decides. On a
// node that has power it does nothing.
func (n *Node) PowerOn() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	_ = os.Remove(filepath.Join(n.dir, "cutting"))
	if n.PowerState() == PowerOn {
		return nil
	}
	// Power first: applyIsolation needs to know the port has a carrier.
	if err := n.setPower(PowerOn); err != nil {
		return err
	}
	return n.linksBoot()
}

// Crash SIGKILLs the node's processes and leaves the power on, like a
// kernel panic that reboots into nothing.
func (n *Node) Crash() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.killLocked()
}

// Isolate disables the node's port on the cluster bridge: frames no longer
// pass either way, while the node's own link stays up (a failure somewhere
// in the network, not an unplugged cable). The management network, and so
// fencing through the BMC, is unaffected. The isolation is a fault of the
// network, so it outlives the node's power cycles (a bridge port whose
// carrier returns would otherwise forward again): it lasts until Heal.
func (n *Node) Isolate() error {
	if err := os.WriteFile(n.isolatedPath(), []byte(n.lab.sw.name+" c-"+n.spec.Name+"\n"), 0o644); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	return n.applyIsolation()
}

// Heal puts an isolated node's port back to forwarding.
func (n *Node) Heal() error {
	if err := os.Remove(n.isolatedPath()); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("lab: %w", err)
	}
	err := n.bridgePortState("c-"+n.spec.Name, "3")
	if errors.Is(err, errNoCarrier) {
		// A dark port cannot be set; it forwards when its carrier returns.
		return nil
	}
	return err
}

func (n *Node) isolatedPath() string { return filepath.Join(n.dir, "isolated") }

// applyIsolation disables the port if the node is isolated. A powered-off
// node's port has no carrier and refuses the change, so at power on this
// waits (briefly) for the carrier the boot brings back.
func (n *Node) applyIsolation() error {
	if _, err := os.Stat(n.isolatedPath()); err != nil {
		return nil
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		err := n.bridgePortState("c-"+n.spec.Name, "0")
		if !errors.Is(err, errNoCarrier) {
			return err
		}
		if n.PowerState() == PowerOff {
			return nil // applied by the next power on
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// errNoCarrier: the bridge refuses to change the state of a port whose
// carrier is down (the node's end is down: no power).
var errNoCarrier = errors.New("lab: bridge port has no carrier")

func (n *Node) bridgePortState(port, state string) error {
	out, err := exec.Command("bridge", "-n", n.lab.sw.name, "link", "set", "dev", port, "state", state).CombinedOutput()
	if err != nil {
		if strings.Contains(string(out), "Network is down") {
			return fmt.Errorf("lab: bridge link set %s state %s: %w", port, state, errNoCarrier)
		}
		return fmt.Errorf("lab: bridge link set %s state %s: %w: %s", port, state, err, out)
	}
	return nil
}

// SetLatency delays every frame to and from the node on the cluster
// network by d in each direction (netem on both ends of its veth pair);
// d = 0 removes the delay. ErrUnsupported when the kernel has no netem.
func (n *Node) SetLatency(d time.Duration) error {
	ends := [][2]string{{n.lab.sw.name, "c-" + n.spec.Name}, {n.name, "eth0"}}
	for _, e := range ends {
		args := []string{"-n", e[0], "qdisc", "replace", "dev", e[1], "root", "netem", "delay", fmt.Sprintf("%dus", d.Microseconds())}
		if d == 0 {
			args = []string{"-n", e[0], "qdisc", "del", "dev", e[1], "root"}
		}
		out, err := exec.Command("tc", args...).CombinedOutput()
		if err != nil {
			if d == 0 && (strings.Contains(string(out), "No such file") || strings.Contains(string(out), "handle of zero")) {
				continue
			}
			if strings.Contains(string(out), "qdisc kind is unknown") {
				return fmt.Errorf("%w: latency needs sch_netem", ErrUnsupported)
			}
			return fmt.Errorf("lab: tc %s: %w: %s", strings.Join(args, " "), err, out)
		}
	}
	return nil
}
