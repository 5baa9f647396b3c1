package lab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Prefix starts the name of every namespace a lab creates:
// "hlab-<8 hex>-<role>". The random part keeps parallel labs (in one test
// binary or many) apart; Sweep recognises leftovers by it.
const Prefix = "hlab-"

// LockDir holds one flock'd file per live lab. The kernel drops the lock
// when the owning process dies, however it dies, so a namespace whose lock
// can be taken belongs to a dead lab. It is on tmpfs, as namespaces are:
// both vanish on reboot.
const LockDir = "/run/hasan-lab"

// Address plan. Every lab has its own switch namespace, so parallel labs
// reuse the same addresses without meeting.
var (
	// ClusterNet is the network nodes and the initiator share (eth0).
	ClusterNet = netip.MustParsePrefix("10.77.1.0/24")
	// MgmtNet is the management network (mgmt0 on nodes) on which the
	// BMCs listen.
	MgmtNet = netip.MustParsePrefix("10.77.2.0/24")
)

const (
	maxNodes      = 50
	initiatorHost = 100
	vipBase       = 200
	bmcPort       = 623
	// BMC credentials of every lab BMC (ipmi_sim user 2, admin).
	BMCUser     = "hasan"
	BMCPassword = "Lab-Fence-S3cret"
)

// NodeSpec describes one cluster node.
type NodeSpec struct {
	// Name: a lower-case letter then up to 9 letters or digits ("n1",
	// "w1"); it names the namespace and the node's bridge ports.
	Name string
	// BMC gives the node an ipmi_sim BMC on the management network whose
	// power off kills the node's processes. Storage nodes have one,
	// witnesses usually not.
	BMC bool
}

// Config describes a lab.
type Config struct {
	Nodes []NodeSpec
	// Dir receives process logs and BMC state. Empty: a new temporary
	// directory that Close removes unless KeepDir.
	Dir     string
	KeepDir bool
	Logger  *slog.Logger
	// NoSignalHandler: the caller handles SIGINT/SIGTERM itself and calls
	// Close. By default the lab cleans up on those signals and then
	// re-raises them.
	NoSignalHandler bool
}

// ThreeNodes is the issue-5 layout: storage nodes n1 and n2, each with a
// BMC, and witness w1 without one.
func ThreeNodes() Config {
	return Config{Nodes: []NodeSpec{{Name: "n1", BMC: true}, {Name: "n2", BMC: true}, {Name: "w1"}}}
}

// Lab is a set of network namespaces wired as a small data centre:
//
//	sw:   bridges br-c (cluster net) and br-m (management net)
//	ini:  the initiator, eth0 on br-c
//	NODE: eth0 on br-c, mgmt0 on br-m
//	bmc:  every ipmi_sim, one address each, b0 on br-m
//
// Close (or Start's cleanup) kills every process in those namespaces and
// deletes them.
type Lab struct {
	ID  string // "hlab-<8 hex>"
	Dir string

	log       *slog.Logger
	cfg       Config
	ownDir    bool
	lock      *os.File
	sw        *NS
	bmcNS     *NS
	initiator *NS
	nodes     []*Node
	byName    map[string]*Node
	made      []*NS // namespaces created, in order
	spawn     *spawner

	mu    sync.Mutex
	procs []*Process // every process started, for the final reap

	sigDone   chan struct{}
	closeOnce sync.Once
	closeErr  error
}

var nodeName = regexp.MustCompile(`^[a-z][a-z0-9]{0,9}$`)

// New builds the lab. It first sweeps namespaces left by labs whose process
// died. On error everything built so far is torn down.
func New(ctx context.Context, cfg Config) (l *Lab, err error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("lab: needs root (network namespaces, bridges, setns)")
	}
	if err := validate(cfg); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if err := Sweep(cfg.Logger); err != nil {
		cfg.Logger.Warn("lab: sweep of stale namespaces incomplete", "err", err)
	}
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	l = &Lab{ID: Prefix + hex.EncodeToString(rnd[:]), cfg: cfg, log: cfg.Logger, byName: map[string]*Node{}, spawn: newSpawner()}
	l.log = l.log.With("lab", l.ID)
	if err := os.MkdirAll(LockDir, 0o755); err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	// The lock comes first: a namespace without a held lock is fair game
	// for another process's sweep.
	l.lock, err = os.OpenFile(filepath.Join(LockDir, l.ID+".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		l.spawn.stop()
		return nil, fmt.Errorf("lab: lock: %w", err)
	}
	if err := unix.Flock(int(l.lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		l.lock.Close()
		l.spawn.stop()
		return nil, fmt.Errorf("lab: lock %s: %w", l.lock.Name(), err)
	}
	fmt.Fprintf(l.lock, "pid %d\n", os.Getpid())
	l.Dir = cfg.Dir
	if l.Dir == "" {
		if l.Dir, err = os.MkdirTemp("", l.ID+"-"); err != nil {
			l.unlock()
			l.spawn.stop()
			return nil, fmt.Errorf("lab: %w", err)
		}
		l.ownDir = true
	}
	if !cfg.NoSignalHandler {
		l.handleSignals()
	}
	defer func() {
		if err != nil {
			_ = l.Close()
			l = nil
		}
	}()
	if err := l.build(ctx); err != nil {
		return l, err
	}
	l.log.Info("lab ready", "nodes", len(l.nodes), "dir", l.Dir)
	return l, nil
}

func validate(cfg Config) error {
	if len(cfg.Nodes) == 0 {
		return errors.New("lab: Config.Nodes is empty")
	}
	if len(cfg.Nodes) > maxNodes {
		return fmt.Errorf("lab: %d nodes, at most %d", len(cfg.Nodes), maxNodes)
	}
	seen := map[string]bool{}
	for _, n := range cfg.Nodes {
		switch {
		case !nodeName.MatchString(n.Name):
			return fmt.Errorf("lab: node name %q: want a lower-case letter then up to 9 letters or digits", n.Name)
		case n.Name == "sw" || n.Name == "bmc" || n.Name == "ini":
			return fmt.Errorf("lab: node name %q is reserved", n.Name)
		case seen[n.Name]:
			return fmt.Errorf("lab: node name %q given twice", n.Name)
		}
		seen[n.Name] = true
	}
	return nil
}

func (l *Lab) build(ctx context.Context) error {
	var err error
	if l.sw, err = l.newNS(ctx, "sw"); err != nil {
		return err
	}
	for _, br := range []string{"br-c", "br-m"} {
		if err := l.ip(ctx, "-n", l.sw.name, "link", "add", br, "type", "bridge", "stp_state", "0", "forward_delay", "0"); err != nil {
			return err
		}
		if err := l.ip(ctx, "-n", l.sw.name, "link", "set", br, "up"); err != nil {
			return err
		}
	}
	if l.initiator, err = l.newNS(ctx, "ini"); err != nil {
		return err
	}
	if err := l.plug(ctx, l.initiator, "br-c", "c-ini", "eth0", InitiatorAddr()); err != nil {
		return err
	}
	needBMC := slices.ContainsFunc(l.cfg.Nodes, func(s NodeSpec) bool { return s.BMC })
	if needBMC {
		if l.bmcNS, err = l.newNS(ctx, "bmc"); err != nil {
			return err
		}
		if err := l.plug(ctx, l.bmcNS, "br-m", "m-bmc", "b0"); err != nil {
			return err
		}
	}
	for i, spec := range l.cfg.Nodes {
		n, err := l.addNode(ctx, i, spec)
		if err != nil {
			return err
		}
		l.nodes = append(l.nodes, n)
		l.byName[spec.Name] = n
	}
	for _, n := range l.nodes {
		if n.spec.BMC {
			if err := n.startBMC(ctx); err != nil {
				return err
			}
		}
	}
	return nil
}

func (l *Lab) ip(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("lab: ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (l *Lab) newNS(ctx context.Context, role string) (*NS, error) {
	s := &NS{name: l.ID + "-" + role, lab: l}
	if err := l.ip(ctx, "netns", "add", s.name); err != nil {
		return nil, err
	}
	l.made = append(l.made, s)
	if err := l.ip(ctx, "-n", s.name, "link", "set", "lo", "up"); err != nil {
		return nil, err
	}
	return s, nil
}

// plug connects ns to a bridge of the switch namespace with a veth pair
// (port on the switch side, ifname inside ns) and adds the addresses.
func (l *Lab) plug(ctx context.Context, ns *NS, bridge, port, ifname string, addrs ...netip.Prefix) error {
	steps := [][]string{
		{"-n", l.sw.name, "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", ns.name},
		{"-n", l.sw.name, "link", "set", port, "master", bridge, "up"},
		{"-n", ns.name, "link", "set", ifname, "up"},
	}
	for _, a := range addrs {
		steps = append(steps, []string{"-n", ns.name, "addr", "add", a.String(), "dev", ifname})
	}
	for _, s := range steps {
		if err := l.ip(ctx, s...); err != nil {
			return err
		}
	}
	return nil
}

func hostAddr(p netip.Prefix, host int) netip.Addr {
	b := p.Addr().As4()
	b[3] = byte(host)
	return netip.AddrFrom4(b)
}

func withBits(a netip.Addr, bits int) netip.Prefix { return netip.PrefixFrom(a, bits) }

// InitiatorAddr is the initiator's address on the cluster network.
func InitiatorAddr() netip.Prefix {
	return withBits(hostAddr(ClusterNet, initiatorHost), ClusterNet.Bits())
}

// VIP returns the k-th address (0..49) of the cluster network that no lab
// host uses, for floating IPs.
func VIP(k int) netip.Prefix {
	if k < 0 || k >= 50 {
		panic(fmt.Sprintf("lab: VIP(%d): want 0..49", k))
	}
	return withBits(hostAddr(ClusterNet, vipBase+k), ClusterNet.Bits())
}

// Initiator is the initiator's namespace (eth0 = InitiatorAddr).
func (l *Lab) Initiator() *NS { return l.initiator }

// Switch is the namespace holding the bridges br-c and br-m.
func (l *Lab) Switch() *NS { return l.sw }

// Nodes returns the nodes in Config order.
func (l *Lab) Nodes() []*Node { return slices.Clone(l.nodes) }

// Node returns the named node. An unknown name is a bug in the test: it
// panics.
func (l *Lab) Node(name string) *Node {
	n, ok := l.byName[name]
	if !ok {
		panic(fmt.Sprintf("lab: no node %q", name))
	}
	return n
}

// NodeAddr is the node's address on the cluster network.
func (l *Lab) NodeAddr(name string) netip.Addr { return l.Node(name).Addr.Addr() }

// PowerState reports whether the node is powered.
func (l *Lab) PowerState(name string) PowerState { return l.Node(name).PowerState() }

// PowerOff cuts the node's power without going through its BMC.
func (l *Lab) PowerOff(name string) error { return l.Node(name).PowerOff() }

// PowerOn restores the node's power (without starting anything).
func (l *Lab) PowerOn(name string) error { return l.Node(name).PowerOn() }

// Crash kills the node's processes and leaves it powered.
func (l *Lab) Crash(name string) error { return l.Node(name).Crash() }

// Isolate cuts the node off the cluster network.
func (l *Lab) Isolate(name string) error { return l.Node(name).Isolate() }

// Heal reconnects an isolated node.
func (l *Lab) Heal(name string) error { return l.Node(name).Heal() }

// BMC returns the node's BMC, nil if it has none.
func (l *Lab) BMC(name string) *BMC { return l.Node(name).bmc }

func (l *Lab) track(p *Process) {
	l.mu.Lock()
	l.procs = append(l.procs, p)
	l.mu.Unlock()
}

// handleSignals cleans up when the test binary is interrupted, since
// t.Cleanup does not run then, and re-raises the signal so the process still
// dies of it.
func (l *Lab) handleSignals() {
	l.sigDone = make(chan struct{})
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		select {
		case s := <-ch:
			l.log.Warn("lab: signal, cleaning up", "signal", s)
			_ = l.close()
			signal.Stop(ch)
			_ = syscall.Kill(os.Getpid(), s.(syscall.Signal))
		case <-l.sigDone:
			signal.Stop(ch)
		}
	}()
}

// Close kills every process in the lab's namespaces, deletes the
// namespaces (which destroys the bridges and veth pairs with them) and
// releases the lab's lock. It is safe to call more than once.
func (l *Lab) Close() error {
	if l.sigDone != nil {
		select {
		case <-l.sigDone:
		default:
			close(l.sigDone)
		}
	}
	return l.close()
}

func (l *Lab) close() error {
	l.closeOnce.Do(func() {
		var errs []error
		for _, n := range l.nodes {
			n.mu.Lock()
			n.closed = true
			n.mu.Unlock()
		}
		for _, s := range slices.Backward(l.made) {
			if err := s.killAll(); err != nil {
				errs = append(errs, err)
			}
		}
		// Everything was killed; reap it so no zombie outlives the lab.
		l.mu.Lock()
		procs := slices.Clone(l.procs)
		l.mu.Unlock()
		deadline := time.After(10 * time.Second)
		for _, p := range procs {
			_ = syscall.Kill(p.Pid(), syscall.SIGKILL)
			select {
			case <-p.Done():
			case <-deadline:
				errs = append(errs, fmt.Errorf("lab: %s (pid %d) not reaped", p.Name, p.Pid()))
			}
		}
		for _, s := range slices.Backward(l.made) {
			if err := l.ip(context.Background(), "netns", "del", s.name); err != nil {
				errs = append(errs, err)
			}
		}
		l.spawn.stop()
		l.unlock()
		if l.ownDir && !l.cfg.KeepDir {
			_ = os.RemoveAll(l.Dir)
		}
		l.closeErr = errors.Join(errs...)
		l.log.Info("lab closed", "err", l.closeErr)
	})
	return l.closeErr
}

func (l *Lab) unlock() {
	if l.lock == nil {
		return
	}
	_ = os.Remove(l.lock.Name())
	l.lock.Close() // drops the flock
	l.lock = nil
}

// Sweep deletes namespaces left by labs whose process is gone (their lock
// is free), killing whatever still runs in them. New calls it; a CI job
// can call it too.
func Sweep(log *slog.Logger) error {
	ents, err := os.ReadDir("/var/run/netns")
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("lab: sweep: %w", err)
	}
	byLab := map[string][]string{}
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), Prefix)
		if !ok {
			continue
		}
		id, _, ok := strings.Cut(rest, "-")
		if !ok {
			continue
		}
		byLab[Prefix+id] = append(byLab[Prefix+id], e.Name())
	}
	var errs []error
	for id, names := range byLab {
		lockPath := filepath.Join(LockDir, id+".lock")
		f, err := os.OpenFile(lockPath, os.O_RDWR, 0)
		if err == nil {
			if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) != nil {
				f.Close() // held: that lab is alive
				continue
			}
		} else if !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
			continue
		}
		for _, name := range names {
			s := &NS{name: name}
			_ = s.killAll()
			if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
				errs = append(errs, fmt.Errorf("lab: sweep %s: %w: %s", name, err, out))
			}
		}
		if log != nil {
			log.Info("lab: swept stale namespaces", "lab", id, "namespaces", names)
		}
		if f != nil {
			_ = os.Remove(lockPath)
			f.Close()
		}
	}
	return errors.Join(errs...)
}

// DumpLogs writes the last lines of every log file in the lab directory
// (process output, ipmi_sim, BMC hook) to w.
func (l *Lab) DumpLogs(w io.Writer, lines int) {
	_ = filepath.WalkDir(l.Dir, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(path, ".log") {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return nil
		}
		all := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
		if len(all) > lines {
			all = all[len(all)-lines:]
		}
		rel, _ := filepath.Rel(l.Dir, path)
		fmt.Fprintf(w, "----- %s (last %d lines) -----\n%s\n", rel, len(all), strings.Join(all, "\n"))
		return nil
	})
}
