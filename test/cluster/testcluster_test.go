package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/bench/failover/initiator"
	"github.com/hasan-storage/hasan/bench/failover/probe"
	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/fencing"
	"github.com/hasan-storage/hasan/test/lab"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// testCluster is the issue-5 layout running for real: a lab (n1, n2
// storage with BMCs, w1 witness, an initiator), `hasan serve` in each node
// namespace, fencing through the lab BMCs, and volume v0 (replicas n1+n2)
// exported by target iqn in group g0 on VIP lab.VIP(0). Scenarios share one
// testCluster and bring it back to health between them (restore, healthy).
type testCluster struct {
	L       *lab.Lab
	Bin     string
	Root    string // node data directories and the lab's logs
	Failure time.Duration
	VIP     string // CIDR
	Portal  string // VIP:3260
	Confs   map[string]nodeConf
	Storage []string // storage node ids, sorted

	prop *proposer

	mu    sync.Mutex
	procs map[string]*lab.Process
}

// clusterFailureTimeout is the controller's failure detection in the
// namespace tests, the documented default.
const clusterFailureTimeout = cluster.DefaultFailureTimeout

// startCluster builds the lab and the cluster and returns once g0 is owned,
// every replica is in the ISR and the portal answers on the VIP. Everything
// is torn down in t.Cleanup; node data and logs are kept when t fails (or
// with HASAN_CLUSTER_KEEP=1).
func startCluster(t *testing.T, ctx context.Context) *testCluster {
	t.Helper()
	root, err := os.MkdirTemp("", "hce-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() || os.Getenv("HASAN_CLUSTER_KEEP") != "" {
			t.Logf("node data and process logs kept in %s", root)
			return
		}
		os.RemoveAll(root)
	})
	cfg := lab.ThreeNodes()
	cfg.Dir, cfg.KeepDir = filepath.Join(root, "lab"), true
	// The lab's own log at warn: its debug lines would drown the scenario
	// figures (the process logs are dumped when a test fails).
	cfg.Logger = slog.New(slog.NewTextHandler(testLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	l := lab.Start(t, cfg)
	c := &testCluster{L: l, Bin: lab.BuildHasan(t), Root: root, Failure: clusterFailureTimeout,
		VIP: lab.VIP(0).String(), Portal: lab.VIP(0).Addr().String() + ":3260",
		Storage: []string{"n1", "n2"}, procs: map[string]*lab.Process{}}
	c.Confs = map[string]nodeConf{
		"n1": writeConfig(t, root, l.Node("n1"), "storage", c.Failure),
		"n2": writeConfig(t, root, l.Node("n2"), "storage", c.Failure),
		"w1": writeConfig(t, root, l.Node("w1"), "witness", c.Failure),
	}
	n1 := c.Confs["n1"]
	if out, err := l.Node("n1").Run(ctx, c.Bin, "cluster", "init", "--config", n1.Config, "--name", "e2e"); err != nil {
		t.Fatalf("cluster init: %v\n%s", err, out)
	}
	for _, id := range []string{"n2", "w1"} {
		if out, err := l.Node("n1").Run(ctx, c.Bin, "cluster", "cert", "--config", n1.Config, "--node", id, "--out", filepath.Join(c.Confs[id].Dir, "tls")); err != nil {
			t.Fatalf("cluster cert %s: %v\n%s", id, err, out)
		}
	}
	adminTLS := filepath.Join(root, "admin-tls")
	if err := harnessCert(ctx, l.Node("n1"), c.Bin, n1.Config, adminTLS); err != nil {
		t.Fatal(err)
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
	// The harness proposes from the initiator's namespace: it is on the
	// cluster network and no scenario disrupts it (any node may be
	// powered off or isolated).
	c.prop = &proposer{tls: tlsCfg, dial: l.Initiator().DialContext}

	c.Serve(t, ctx, "n1")
	waitFor(t, ctx, 15*time.Second, "n1 to lead", func() (bool, error) {
		st, err := getStatus(ctx, n1)
		return err == nil && st.RaftState == "Leader", err
	})
	for _, id := range []string{"n2", "w1"} {
		c.Serve(t, ctx, id)
		nc := c.Confs[id]
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
	for _, id := range c.Storage {
		c.Do(t, ctx, &cluster.Command{Kind: cluster.KindFenceDevicePut, FenceDevicePut: &cluster.FenceDevicePutCmd{Name: "ipmi-" + id, Config: c.FenceDeviceConfig(t, id, "")}})
		c.Do(t, ctx, &cluster.Command{Kind: cluster.KindNodeSetFence, NodeSetFence: &cluster.NodeSetFenceCmd{ID: id, Topology: fencing.NodeTopology{Levels: [][]string{{"ipmi-" + id}}}}})
	}
	c.Do(t, ctx, &cluster.Command{Kind: cluster.KindVolumeCreate, VolumeCreate: &cluster.VolumeCreateCmd{UUID: volUUID, Name: "v0", Size: volSize, Primary: "n1", Replicas: []string{"n1", "n2"}}})
	c.Do(t, ctx, &cluster.Command{Kind: cluster.KindTargetPut, TargetPut: &cluster.TargetPutCmd{Target: cluster.Target{IQN: iqn, LUNs: map[uint64]string{0: volUUID}}}})
	c.Do(t, ctx, &cluster.Command{Kind: cluster.KindGroupPut, GroupPut: &cluster.GroupPutCmd{Group: cluster.Group{Name: group, VIPs: []string{c.VIP}, Targets: []string{iqn}, Preferred: []string{"n1"}}}})
	c.WaitHealthy(t, ctx)
	return c
}

type testLogWriter struct{ t testing.TB }

func (w testLogWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// FenceDeviceConfig is the fence device JSON for id's lab BMC (cipher
// suite 3, the one ipmi_sim serves). A non-empty password replaces the
// BMC's (a wrong one makes a failing device). The password goes in as
// plain JSON: fencing.Secret redacts itself when marshalled.
func (c *testCluster) FenceDeviceConfig(t *testing.T, id, password string) []byte {
	t.Helper()
	b := c.L.BMC(id)
	if password == "" {
		password = b.Password
	}
	dev, err := json.Marshal(map[string]any{
		"type": "ipmi", "timeout": "10s", "poll_interval": "100ms",
		"ipmi": map[string]any{"host": b.Addr.Addr().String(), "port": int(b.Addr.Port()), "user": b.User,
			"password": password, "cipher_suite": b.CipherSuite, "privilege": "administrator",
			"request_timeout": "300ms", "retries": 2},
	})
	if err != nil {
		t.Fatal(err)
	}
	return dev
}

// Serve starts `hasan serve` on id (a process of the node: its power cut
// kills it) and waits for its admin socket.
func (c *testCluster) Serve(t *testing.T, ctx context.Context, id string) {
	t.Helper()
	p, err := c.L.Node(id).Start(lab.ProcSpec{Name: "hasan", Argv: []string{c.Bin, "serve", "--log-level", "debug", "--config", c.Confs[id].Config}})
	if err != nil {
		t.Fatalf("start %s: %v", id, err)
	}
	c.mu.Lock()
	c.procs[id] = p
	c.mu.Unlock()
	waitFor(t, ctx, 30*time.Second, id+"'s admin socket", func() (bool, error) {
		if p.Exited() {
			t.Fatalf("hasan serve on %s exited: %v", id, p.Err())
		}
		_, err := getStatus(ctx, c.Confs[id])
		return err == nil, err
	})
}

// Running reports whether id's `hasan serve` is alive.
func (c *testCluster) Running(id string) bool {
	c.mu.Lock()
	p := c.procs[id]
	c.mu.Unlock()
	return p != nil && !p.Exited()
}

// Process is id's current `hasan serve` (nil before the first Serve).
func (c *testCluster) Process(id string) *lab.Process {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.procs[id]
}

// Status asks every running node and returns the leader's answer, or else
// the answer with the highest applied index.
func (c *testCluster) Status(ctx context.Context) (*status, error) {
	var best *status
	var errs []error
	for _, id := range []string{"n1", "n2", "w1"} {
		if !c.Running(id) {
			continue
		}
		st, err := getStatus(ctx, c.Confs[id])
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if st.RaftState == "Leader" {
			return st, nil
		}
		if best == nil || st.State.Index > best.State.Index {
			best = st
		}
	}
	if best == nil {
		return nil, fmt.Errorf("no node answers: %w", errors.Join(errs...))
	}
	return best, nil
}

// State is the most up-to-date committed state a running node reports.
func (c *testCluster) State(ctx context.Context) (*cluster.State, error) {
	st, err := c.Status(ctx)
	if err != nil {
		return nil, err
	}
	return st.State, nil
}

// Leader is the id of the node that currently leads ("" if none does).
func (c *testCluster) Leader(ctx context.Context) string {
	for _, id := range []string{"n1", "n2", "w1"} {
		if !c.Running(id) {
			continue
		}
		if st, err := getStatus(ctx, c.Confs[id]); err == nil && st.RaftState == "Leader" {
			return id
		}
	}
	return ""
}

// Propose sends cmd to the current leader.
func (c *testCluster) Propose(ctx context.Context, cmd *cluster.Command) error {
	st, err := c.Status(ctx)
	if err != nil {
		return err
	}
	n, ok := st.State.Nodes[st.Leader]
	if st.Leader == "" || !ok {
		return fmt.Errorf("no leader known (asked %s)", st.Node)
	}
	return c.prop.propose(ctx, n.RaftAddr, cmd)
}

// Do proposes cmd, retrying for up to 10 s while there is no leader.
func (c *testCluster) Do(t *testing.T, ctx context.Context, cmd *cluster.Command) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		cmd.At = time.Time{}
		err := c.Propose(ctx, cmd)
		if err == nil {
			return
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			t.Fatalf("propose %s: %v", cmd.Kind, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Owner is g0's owner in the committed state.
func (c *testCluster) Owner(t *testing.T, ctx context.Context) string {
	t.Helper()
	st, err := c.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return st.Groups[group].Owner
}

// Other is the storage node that is not id.
func (c *testCluster) Other(id string) string {
	if id == "n1" {
		return "n2"
	}
	return "n1"
}

// WaitHealthy waits until g0 has an owner that serves the portal on the
// VIP, every node is online, and every replica is in the ISR.
func (c *testCluster) WaitHealthy(t *testing.T, ctx context.Context) {
	t.Helper()
	waitFor(t, ctx, 60*time.Second, "a healthy cluster (g0 owned, nodes online, full ISR)", func() (bool, error) {
		st, err := c.State(ctx)
		if err != nil {
			return false, err
		}
		g, v := st.Groups[group], st.Volumes[volUUID]
		if g == nil || g.Owner == "" || g.MovingTo != "" || v == nil {
			return false, fmt.Errorf("group %+v", g)
		}
		for id, n := range st.Nodes {
			if n.State != cluster.NodeOnline {
				return false, fmt.Errorf("%s is %s", id, n.State)
			}
		}
		if len(st.Nodes) != 3 {
			return false, fmt.Errorf("%d nodes", len(st.Nodes))
		}
		for _, r := range v.Replicas {
			if !slices.Contains(v.ISR, r) {
				return false, fmt.Errorf("ISR %v lacks %s", v.ISR, r)
			}
		}
		return true, nil
	})
	// Steady state includes leader placement: the witness leads, so an
	// owner's loss needs no election (cluster/leader.go). A run started
	// before that measures a cluster a few seconds old, not the product.
	waitFor(t, ctx, 20*time.Second, "the witness to lead (leader placement)", func() (bool, error) {
		if l := c.Leader(ctx); l != "w1" {
			return false, fmt.Errorf("%q leads", l)
		}
		return true, nil
	})
	waitFor(t, ctx, 15*time.Second, "the portal on the VIP", func() (bool, error) {
		dctx, dcancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer dcancel()
		conn, err := c.L.Initiator().DialContext(dctx, "tcp", c.Portal)
		if err == nil {
			conn.Close()
		}
		return err == nil, err
	})
}

// Restore brings id back after a scenario: power, network, `hasan serve`,
// and the online state (a fenced node stays fenced until an operator sets
// it online). It does not wait for the resync: WaitHealthy does.
func (c *testCluster) Restore(t *testing.T, ctx context.Context, id string) {
	t.Helper()
	if c.L.PowerState(id) != lab.PowerOn {
		if err := c.L.PowerOn(id); err != nil {
			t.Fatalf("power on %s: %v", id, err)
		}
	}
	if err := c.L.Heal(id); err != nil {
		t.Fatalf("heal %s: %v", id, err)
	}
	if !c.Running(id) {
		c.Serve(t, ctx, id)
	}
	waitFor(t, ctx, 20*time.Second, id+" back in the state", func() (bool, error) {
		st, err := c.State(ctx)
		if err != nil {
			return false, err
		}
		n := st.Nodes[id]
		if n == nil {
			return false, fmt.Errorf("%s not a member", id)
		}
		if n.State == cluster.NodeOnline {
			return true, nil
		}
		// fenced (or left in standby by a failed scenario): an operator's
		// node-set-state online.
		if err := c.Propose(ctx, &cluster.Command{Kind: cluster.KindNodeSetState, NodeSetState: &cluster.NodeSetStateCmd{ID: id, State: cluster.NodeOnline}}); err != nil {
			return false, err
		}
		return false, fmt.Errorf("%s was %s", id, n.State)
	})
}

// RestoreAll restores every node that is down, isolated or not online and
// waits for a healthy cluster.
func (c *testCluster) RestoreAll(t *testing.T, ctx context.Context) {
	t.Helper()
	for _, id := range []string{"w1", "n1", "n2"} {
		c.Restore(t, ctx, id)
	}
	c.WaitHealthy(t, ctx)
}

// ExportsOnOwnAddress reports whether id serves the target on its own
// (non-floating) address: only the owner may, through the VIP.
func (c *testCluster) ExportsOnOwnAddress(ctx context.Context, id string) bool {
	lctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	s, err := initiator.Login(lctx, initiator.Config{Portal: c.L.NodeAddr(id).String() + ":3260", Target: iqn, Dial: c.L.Initiator().DialContext})
	if err != nil {
		return false
	}
	s.Close()
	return true
}

// runningProbe is a failover probe writing through the VIP from the
// initiator namespace.
type runningProbe struct {
	*probe.Probe
	stop func() (probe.Result, error)
}

// StartProbe starts the issue-5 probe and waits for 10 verified pairs.
// Stop returns the result and the probe's own error (a lost write).
func (c *testCluster) StartProbe(t *testing.T, ctx context.Context) *runningProbe {
	t.Helper()
	p := probe.New(probe.Config{Initiator: initiator.Config{Portal: c.Portal, Target: iqn, Dial: c.L.Initiator().DialContext}})
	pctx, cancel := context.WithCancel(ctx)
	type out struct {
		r   probe.Result
		err error
	}
	done := make(chan out, 1)
	go func() { r, err := p.Run(pctx); done <- out{r, err} }()
	var once sync.Once
	var o out
	rp := &runningProbe{Probe: p, stop: func() (probe.Result, error) {
		once.Do(func() { cancel(); o = <-done })
		return o.r, o.err
	}}
	t.Cleanup(func() { rp.stop() })
	if err := rp.Wait(ctx, 10); err != nil {
		t.Fatalf("no verified I/O through the VIP: %v", err)
	}
	return rp
}

// ioWait bounds every wait for verified I/O in the scenarios: far above
// any expected outage, far below the test's deadline.
const ioWait = 30 * time.Second

// Wait waits up to ioWait for n more verified pairs.
func (p *runningProbe) Wait(ctx context.Context, n int) error {
	ctx, cancel := context.WithTimeout(ctx, ioWait)
	defer cancel()
	if err := p.WaitPairs(ctx, n); err != nil {
		s := p.Snapshot()
		return fmt.Errorf("%w (no verified I/O for %v; last error: %s)", err, time.Duration(s.SinceLastPair).Round(time.Millisecond), s.LastError)
	}
	return nil
}

// Stop stops the probe and returns its result; err is non-nil when it
// found an acknowledged write missing.
func (p *runningProbe) Stop() (probe.Result, error) { return p.stop() }

// nodeView is what the writer sampler saw on one storage node.
type nodeView struct {
	Process  bool // hasan serve alive
	VIP      bool // the VIP is on one of its interfaces
	Sessions int  // established TCP connections to its port 3260
}

func (v nodeView) serving() bool { return v.Process && (v.VIP || v.Sessions > 0) }

// writerSample is one observation of a node.
type writerSample struct {
	At   time.Time
	Node string
	nodeView
}

// writerSampler watches the storage nodes every interval for the "never
// two writers" invariant. A node counts as a writer while its hasan serve
// runs and it holds the VIP or has an established iSCSI connection. The
// nodes are read one after the other, so a planned handover can fall
// between two reads of one round; an overlap is therefore reported only
// when node A is a writer, then B, then A again in consecutive reads: A
// served before and after B did.
type writerSampler struct {
	c       *testCluster
	cancel  context.CancelFunc
	done    chan struct{}
	readers map[string]*nsThread

	mu       sync.Mutex
	samples  []writerSample
	overlaps []string
	rounds   int
}

// WatchWriters starts sampling every 20 ms until Stop.
func (c *testCluster) WatchWriters(ctx context.Context) *writerSampler {
	ctx, cancel := context.WithCancel(ctx)
	w := &writerSampler{c: c, cancel: cancel, done: make(chan struct{}), readers: map[string]*nsThread{}}
	for _, id := range c.Storage {
		w.readers[id] = newNSThread(c.L.Node(id).Path(), ctx.Done())
	}
	go w.run(ctx)
	return w
}

func (w *writerSampler) run(ctx context.Context) {
	defer close(w.done)
	vip := strings.Split(w.c.VIP, "/")[0]
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	var prev []writerSample // the previous round's reads, in order
	for {
		round := make([]writerSample, 0, 2*len(w.c.Storage))
		// Read each node, then the first again: a writer seen on both
		// sides of another writer proves an overlap.
		order := append(slices.Clone(w.c.Storage), w.c.Storage[0])
		for _, id := range order {
			// At is when the read started: a read that finds a writer
			// proves it served no earlier than that.
			at := time.Now()
			round = append(round, writerSample{At: at, Node: id, nodeView: w.view(id, vip)})
		}
		w.mu.Lock()
		w.rounds++
		w.samples = append(w.samples, round...)
		for _, o := range overlapsIn(slices.Concat(prev, round)) {
			// Windows overlap by a round: report each finding once.
			if !slices.Contains(w.overlaps, o) {
				w.overlaps = append(w.overlaps, o)
			}
		}
		w.mu.Unlock()
		prev = round
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// overlapsIn finds writer B read between two reads of another node A that
// both show A a writer (the nearest reads of A before and after B's): A
// served before and after B did, so both served at once. A handover that
// falls between two reads is not an overlap.
func overlapsIn(seq []writerSample) []string {
	var out []string
	seen := map[[2]int]bool{} // one report per pair of A reads
	for j, b := range seq {
		if !b.serving() {
			continue
		}
		before := map[string]int{}
		for i := j - 1; i >= 0; i-- {
			if _, seen := before[seq[i].Node]; !seen && seq[i].Node != b.Node {
				before[seq[i].Node] = i
			}
		}
		for k := j + 1; k < len(seq); k++ {
			a2 := seq[k]
			i, ok := before[a2.Node]
			if !ok {
				continue
			}
			delete(before, a2.Node) // only the nearest read after B counts
			if a := seq[i]; a.serving() && a2.serving() && !seen[[2]int{i, k}] {
				seen[[2]int{i, k}] = true
				out = append(out, fmt.Sprintf("%s %+v at %s, %s %+v at %s, %s %+v at %s",
					a.Node, a.nodeView, a.At.Format("15:04:05.000"), b.Node, b.nodeView, b.At.Format("15:04:05.000"),
					a2.Node, a2.nodeView, a2.At.Format("15:04:05.000")))
			}
		}
	}
	return out
}

// view reads one node: process, VIP and established port-3260 sessions,
// from inside its namespace.
func (w *writerSampler) view(id, vip string) nodeView {
	v := nodeView{Process: w.c.Running(id)}
	_ = w.readers[id].do(func() {
		if addrs, err := net.InterfaceAddrs(); err == nil {
			for _, a := range addrs {
				if ipn, ok := a.(*net.IPNet); ok && ipn.IP.String() == vip {
					v.VIP = true
				}
			}
		}
		// sock_diag, not /proc/net/tcp: reading the latter walks the
		// host's whole TCP hash once per page, seconds of CPU a minute at
		// this rate. A Go listener on 0.0.0.0 is a dual-stack IPv6
		// socket, so its connections are AF_INET6 (v4-mapped).
		for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
			socks, err := netlink.SocketDiagTCP(fam)
			if err != nil {
				continue
			}
			for _, sk := range socks {
				if sk.ID.SourcePort == 3260 && sk.State == tcpEstablished {
					v.Sessions++
				}
			}
		}
	})
	return v
}

// tcpEstablished is TCP_ESTABLISHED in sock_diag's state field.
const tcpEstablished = 1

// nsThread is an OS thread that entered a namespace once and runs
// functions there: sampling every 20 ms through lab's NS.Do would pay two
// setns calls per read, CPU taken from the cluster under test.
type nsThread struct {
	reqs chan func()
	done chan struct{} // f ran
	stop <-chan struct{}
	err  error
}

func newNSThread(path string, stop <-chan struct{}) *nsThread {
	th := &nsThread{reqs: make(chan func()), done: make(chan struct{}), stop: stop}
	ready := make(chan struct{})
	go func() {
		// Never unlocked: the thread ends with the goroutine and the Go
		// runtime discards it instead of reusing a thread in a foreign
		// namespace.
		runtime.LockOSThread()
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err == nil {
			err = unix.Setns(fd, unix.CLONE_NEWNET)
			unix.Close(fd)
		}
		th.err = err
		close(ready)
		if err != nil {
			return
		}
		for {
			select {
			case f := <-th.reqs:
				f()
				th.done <- struct{}{}
			case <-stop:
				return
			}
		}
	}()
	<-ready
	return th
}

func (th *nsThread) do(f func()) error {
	if th.err != nil {
		return th.err
	}
	select {
	case th.reqs <- f:
		<-th.done
		return nil
	case <-th.stop:
		return errors.New("sampler stopped")
	}
}

// Stop ends sampling and returns the overlaps seen (nil: never two
// writers) and how many rounds ran.
func (w *writerSampler) Stop() (overlaps []string, rounds int) {
	w.cancel()
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.overlaps), w.rounds
}

// LastServing is the start of the last read of id before before that found
// it a writer (zero if none after after): proof that it served until then.
func (w *writerSampler) LastServing(id string, after, before time.Time) time.Time {
	w.mu.Lock()
	defer w.mu.Unlock()
	var last time.Time
	for _, s := range w.samples {
		if s.Node == id && s.At.After(after) && s.At.Before(before) && s.serving() {
			last = s.At
		}
	}
	return last
}

// LastBefore is the last read of id before at.
func (w *writerSampler) LastBefore(id string, at time.Time) (nodeView, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, s := range slices.Backward(w.samples) {
		if s.Node == id && s.At.Before(at) {
			return s.nodeView, true
		}
	}
	return nodeView{}, false
}

// FirstDemoted is the first read of id after after in which its hasan
// serve ran but held neither the VIP nor a session: it had demoted itself.
func (w *writerSampler) FirstDemoted(id string, after time.Time) (time.Time, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, s := range w.samples {
		if s.Node == id && s.At.After(after) && s.Process && !s.VIP && s.Sessions == 0 {
			return s.At, true
		}
	}
	return time.Time{}, false
}

// checkWriters stops w and fails t if two nodes ever served at once or if
// the sampler barely ran.
func checkWriters(t *testing.T, w *writerSampler) {
	t.Helper()
	overlaps, rounds := w.Stop()
	if rounds < 10 {
		t.Errorf("writer sampler ran only %d rounds", rounds)
	}
	for _, o := range overlaps {
		t.Errorf("two writers: %s", o)
	}
	t.Logf("writer sampler: %d rounds, %d overlaps", rounds, len(overlaps))
}

// durEnv reads a Go duration from env, def when unset.
func durEnv(t *testing.T, env string, def time.Duration) time.Duration {
	t.Helper()
	if s := os.Getenv(env); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			t.Fatalf("%s: %v", env, err)
		}
		return d
	}
	return def
}

// plannedGap is the issue-5 goal for a planned move (HASAN_CLUSTER_MAX_PLANNED_GAP
// overrides it on a loaded machine).
func plannedGap(t *testing.T) time.Duration {
	return durEnv(t, "HASAN_CLUSTER_MAX_PLANNED_GAP", 300*time.Millisecond)
}

// steadyGap bounds the I/O pause when the disruption must change nothing
// for the data path (witness loss): the probe's interval plus jitter
// (HASAN_CLUSTER_MAX_STEADY_GAP overrides it).
func steadyGap(t *testing.T) time.Duration {
	return durEnv(t, "HASAN_CLUSTER_MAX_STEADY_GAP", 300*time.Millisecond)
}

// fenceRecords returns the fence history entries for node after since.
func fenceRecords(st *cluster.State, node string, since time.Time) []fencing.Record {
	var out []fencing.Record
	for _, r := range st.FenceHistory {
		if r.Node == node && !r.Time.Before(since) {
			out = append(out, r)
		}
	}
	return out
}

// eventsSince returns the events of kind (any kind if "") after since.
func eventsSince(st *cluster.State, kind string, since time.Time) []cluster.Event {
	var out []cluster.Event
	for _, e := range st.Events {
		if (kind == "" || e.Kind == kind) && !e.Time.Before(since) {
			out = append(out, e)
		}
	}
	return out
}
