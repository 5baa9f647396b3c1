package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	yaml "go.yaml.in/yaml/v3"

	"github.com/hasan-storage/hasan/bench/failover/initiator"
	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/fencing"
	"github.com/hasan-storage/hasan/vip"
)

func TestServeConfigValidate(t *testing.T) {
	dir := t.TempDir()
	write := func(s string) string {
		p := filepath.Join(dir, "c.yaml")
		if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := "node: n1\ndata_dir: " + dir + "\ncluster_advertise: 192.0.2.1:7400\nreplication_advertise: 192.0.2.1:7401\n"
	cfg, err := loadServeConfig(write(good))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Role != "storage" || cfg.PortalListen != defaultPortalListen || cfg.FailureTimeout != cluster.DefaultFailureTimeout ||
		cfg.Lease != cluster.DefaultLeaseDuration || cfg.nodeInfo().DataAddr != "192.0.2.1:7401" || cfg.APIListen != defaultAPIListen {
		t.Fatalf("defaults: %+v", cfg)
	}
	for _, c := range []struct{ yaml, field string }{
		{"data_dir: " + dir + "\n", "node"},
		{good + "role: arbiter\n", "role"},
		{"node: n1\ndata_dir: rel\n", "data_dir"},
		{"node: n1\ndata_dir: " + dir + "\n", "cluster_advertise"},
		{"node: n1\ndata_dir: " + dir + "\ncluster_advertise: 192.0.2.1:7400\n", "replication_advertise"},
		{good + "portal_listen: nope\n", "portal_listen"},
		{good + "api_listen: localhost\n", "api_listen"},
		{good + "lease: 2s\n", "lease"},
		{good + "api_advertise: 0.0.0.0:7402\n", "api_advertise"},
		{good + "api_advertise: nope\n", "api_advertise"},
		{good + "bogus: [\n", "c.yaml"},
	} {
		_, err := loadServeConfig(write(c.yaml))
		if err == nil || !strings.Contains(err.Error(), c.field) {
			t.Errorf("%q: error %v does not name %s", c.yaml, err, c.field)
		}
	}
	// The API address recorded in the state is one a client can dial.
	for _, c := range []struct{ extra, want string }{
		{"", defaultAPIListen},
		{"api_listen: 0.0.0.0:7402\napi_tls_cert: /c.pem\napi_tls_key: /k.pem\n", "192.0.2.1:7402"},
		{"api_listen: 0.0.0.0:7402\napi_advertise: 198.51.100.7:443\napi_tls_cert: /c.pem\napi_tls_key: /k.pem\n", "198.51.100.7:443"},
	} {
		cfg, err := loadServeConfig(write(good + c.extra))
		if err != nil {
			t.Fatalf("%q: %v", c.extra, err)
		}
		if got := cfg.nodeInfo().APIAddr; got != c.want {
			t.Errorf("%q: api address %q, want %q", c.extra, got, c.want)
		}
	}
	// Leader placement is on unless switched off.
	for extra, off := range map[string]bool{"": false, "leader_placement: true\n": false, "leader_placement: false\n": true} {
		cfg, err := loadServeConfig(write(good + extra))
		if err != nil {
			t.Fatal(err)
		}
		if cc := cfg.controllerConfig(); cc.NoLeaderPlacement != off || cc.Self != "n1" || cc.FailureTimeout != cluster.DefaultFailureTimeout {
			t.Errorf("%q: controller config %+v", extra, cc)
		}
	}
	// A witness needs no replication or portal address.
	if _, err := loadServeConfig(write("node: w\nrole: witness\ndata_dir: " + dir + "\ncluster_advertise: 192.0.2.3:7400\n")); err != nil {
		t.Fatal(err)
	}
}

type fakeVIPs struct {
	mu      sync.Mutex
	held    map[netip.Prefix]bool
	tickled []vip.TCPConn
}

func (f *fakeVIPs) Acquire(_ context.Context, v vip.VIP) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.held == nil {
		f.held = map[netip.Prefix]bool{}
	}
	f.held[v.Addr] = true
	return nil
}

func (f *fakeVIPs) Release(_ context.Context, v vip.VIP) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.held, v.Addr)
	return nil
}

func (f *fakeVIPs) Tickle(_ context.Context, conns []vip.TCPConn) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range conns {
		if !f.held[netip.PrefixFrom(c.Local.Addr(), 32)] {
			return fmt.Errorf("tickle %v: %w", c, vip.ErrNotHeld)
		}
	}
	f.tickled = append(f.tickled, conns...)
	return nil
}

func (f *fakeVIPs) tickles() []vip.TCPConn {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.tickled)
}

func (f *fakeVIPs) holds(p netip.Prefix) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.held[p]
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// TestServeThreeNodesPlaceAndMove runs serve's wiring for 2 storage nodes
// and a witness in one process on loopback: init, tokens and joins through
// the admin socket, the controller places a group, its owner serves the LUN
// to an iSCSI initiator, a planned move hands it to the other storage node
// which serves the same data, and every node stops within its bound.
func TestServeThreeNodesPlaceAndMove(t *testing.T) {
	if testing.Short() {
		t.Skip("starts three nodes")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()

	sc := newServeCluster(ctx, t)
	cfgs, servers, vips, n1 := sc.cfgs, sc.servers, sc.vips, sc.n1

	// The REST API (webui) runs on each node.
	waitFor(t, 5*time.Second, "n2's REST API", func() bool {
		resp, err := http.Get("http://" + cfgs[1].APIListen + "/api/v1/cluster")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})

	const (
		uuid = "5e1f0a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b"
		iqn  = "iqn.2026-11.io.hasan:serve-test"
		size = 8 << 20
	)
	// The VIP is the loopback address the portals listen on, so the
	// sessions' connections are on the VIP and get recorded (the fake VIP
	// manager adds no address).
	vipAddr := netip.MustParsePrefix("127.0.0.1/32")
	for _, c := range []*cluster.Command{
		{Kind: cluster.KindVolumeCreate, VolumeCreate: &cluster.VolumeCreateCmd{UUID: uuid, Name: "v", Size: size, Primary: "n1", Replicas: []string{"n1", "n2"}}},
		{Kind: cluster.KindTargetPut, TargetPut: &cluster.TargetPutCmd{Target: cluster.Target{IQN: iqn, LUNs: map[uint64]string{0: uuid}}}},
		{Kind: cluster.KindGroupPut, GroupPut: &cluster.GroupPutCmd{Group: cluster.Group{Name: "g", VIPs: []string{vipAddr.String()}, Targets: []string{iqn}, Preferred: []string{"n1"}}}},
	} {
		if _, err := n1.Propose(ctx, c); err != nil {
			t.Fatalf("%v: %v", c.Kind, err)
		}
	}
	group := func() cluster.Group {
		st := n1.FSM().State()
		return *st.Groups["g"]
	}
	waitFor(t, 15*time.Second, "the controller to place g", func() bool { return group().Owner != "" })
	owner := group().Owner
	if owner != "n1" {
		t.Fatalf("placed on %s, preferred n1", owner)
	}
	other := "n2"
	portal := func(id string) string { return servers[id].portal.String() }
	login := func(id string) (*initiator.Session, error) {
		lctx, lcancel := context.WithTimeout(ctx, 3*time.Second)
		defer lcancel()
		return initiator.Login(lctx, initiator.Config{Portal: portal(id), Target: iqn})
	}
	var s *initiator.Session
	waitFor(t, 10*time.Second, owner+" to serve the LUN", func() bool {
		var err error
		s, err = login(owner)
		return err == nil
	})
	defer s.Close()
	waitFor(t, 5*time.Second, owner+" to hold the VIP", func() bool { return vips[owner].holds(vipAddr) })
	if ss, err := login(other); err == nil {
		ss.Close()
		t.Fatalf("%s exports the target while %s owns the group", other, owner)
	}
	if _, err := s.ClearUnitAttention(ctx); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("serve-wiring-ok\n"), 512/16*8)
	if err := s.Write10(ctx, 32, data, 512, true); err != nil {
		t.Fatalf("write via %s: %v", owner, err)
	}
	waitFor(t, 30*time.Second, other+" in sync and back in the ISR", func() bool {
		return slices.Contains(n1.FSM().State().Volumes[uuid].ISR, other) && inSync(ctx, servers[owner], uuid, other)
	})

	// The owner records its sessions' connections in the state.
	recorded := func() []cluster.InitiatorConn { return group().Conns }
	var sessConns []cluster.InitiatorConn
	waitFor(t, 5*time.Second, "the owner to record its initiator connections", func() bool {
		sessConns = servers[owner].agent.Sessions.Conns()
		return len(sessConns) > 0 && slices.Equal(recorded(), sessConns)
	})

	// Planned move (what `hasan target move` / POST /groups/g/move do),
	// under a write loop that measures the I/O pause and checks that the
	// old owner never leaves the ISR.
	ww := startWriteLoop(ctx, t, login, owner, other)
	isrLeft := watchISR(ctx, n1, uuid, owner)
	time.Sleep(300 * time.Millisecond)
	t0 := time.Now()
	if _, err := n1.Propose(ctx, &cluster.Command{Kind: cluster.KindGroupMove, GroupMove: &cluster.GroupMoveCmd{Group: "g", Node: other}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 15*time.Second, "g to move to "+other, func() bool { g := group(); return g.Owner == other && g.MovingTo == "" })
	waitFor(t, 10*time.Second, "writes to resume on "+other, func() bool { return ww.writesOn(other) >= 5 })
	pause, acked := ww.stop()
	t.Logf("planned move: I/O pause %v (longest gap between acknowledged writes; move proposed at +0, grant committed and served within %v)", pause, time.Since(t0))
	maxPause := 1500 * time.Millisecond // -race, 2 shared cores; the figure is logged
	if v := os.Getenv("HASAN_PLANNED_MAX_PAUSE"); v != "" {
		if d, err := time.ParseDuration(v); err == nil {
			maxPause = d
		}
	}
	if pause > maxPause {
		t.Errorf("planned move paused I/O for %v (limit %v)", pause, maxPause)
	}
	if left := isrLeft(); left {
		t.Errorf("the old owner %s left the ISR during the planned move", owner)
	}
	// The new owner tickled the connections the old owner recorded.
	waitFor(t, 5*time.Second, other+" to tickle the recorded connections", func() bool {
		got := vips[other].tickles()
		for _, c := range sessConns {
			if !slices.ContainsFunc(got, func(v vip.TCPConn) bool { return v.Local.String() == c.Local && v.Remote.String() == c.Remote }) {
				return false
			}
		}
		return true
	})
	var s2 *initiator.Session
	waitFor(t, 10*time.Second, other+" to serve the LUN", func() bool {
		var err error
		s2, err = login(other)
		return err == nil
	})
	t.Logf("planned move: committed and LUN served on %s %v after the move was proposed", other, time.Since(t0))
	defer s2.Close()
	if vips[owner].holds(vipAddr) || !vips[other].holds(vipAddr) {
		waitFor(t, 5*time.Second, "the VIP to move", func() bool { return !vips[owner].holds(vipAddr) && vips[other].holds(vipAddr) })
	}
	if ss, err := login(owner); err == nil {
		ss.Close()
		t.Fatalf("old owner %s still exports the target", owner)
	}
	if _, err := s2.ClearUnitAttention(ctx); err != nil {
		t.Fatal(err)
	}
	got, err := s2.Read10(ctx, 32, uint16(len(data)/512), 512)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("%s does not serve what %s acknowledged: %v", other, owner, err)
	}
	for lba, ok := range acked {
		got, err := s2.Read10(ctx, lba, 1, 512)
		if err != nil || !slices.ContainsFunc(ok, func(b []byte) bool { return bytes.Equal(got, b) }) {
			t.Fatalf("LBA %d: acknowledged write lost across the planned move (read %.15q): %v", lba, got, err)
		}
	}

	// cluster status over the admin socket, as the CLI reads it.
	var st statusReply
	if err := adminCall(ctx, cfgs[2].adminSocket(), "GET", "/status", nil, &st); err != nil {
		t.Fatal(err)
	}
	if st.Node != "w" || st.State.Groups["g"].Owner != other || len(st.State.Nodes) != 3 {
		t.Fatalf("status from the witness: %+v", st)
	}
	// The same through the CLI with a YAML config file.
	raw, err := yaml.Marshal(cfgs[2])
	if err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(cfgs[2].DataDir, "w.yaml")
	if err := os.WriteFile(cfgPath, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	root := newRootCmd()
	root.SetOut(&out)
	root.SetArgs([]string{"cluster", "status", "--config", cfgPath})
	if err := root.ExecuteContext(ctx); err != nil {
		t.Fatal(err)
	}
	ownerShown := false
	for _, line := range strings.Split(out.String(), "\n") {
		if f := strings.Fields(line); len(f) > 1 && f[0] == "g" && f[1] == other {
			ownerShown = true
		}
	}
	if !ownerShown {
		t.Fatalf("cluster status does not show g owned by %s:\n%s", other, out.String())
	}
	for _, want := range []string{"node w: raft Follower", "n1", "n2", uuid} {
		if !strings.Contains(out.String(), want) {
			t.Fatalf("cluster status output lacks %q:\n%s", want, out.String())
		}
	}
	t.Logf("cluster status:\n%s", out.String())

	// Unplanned: the owner crashes. Its fence device is a fence-agents
	// style program whose "off" is recorded in a file; the controller on
	// the leader (n1) must fence it before the takeover, and n1 must then
	// serve every write the crashed owner acknowledged.
	crashed := other
	survivor := owner
	offFile := filepath.Join(cfgs[0].DataDir, "power-off-"+crashed)
	script := filepath.Join(cfgs[0].DataDir, "fence_test.sh")
	if err := os.WriteFile(script, []byte(`#!/bin/sh
action=; statefile=
while read -r line; do
  case "$line" in action=*) action=${line#action=};; statefile=*) statefile=${line#statefile=};; esac
done
case "$action" in
  off) touch "$statefile"; exit 0;;
  on) rm -f "$statefile"; exit 0;;
  status) [ -e "$statefile" ] && exit 2; exit 0;;
  monitor) exit 0;;
esac
exit 1
`), 0o700); err != nil {
		t.Fatal(err)
	}
	devCfg, err := json.Marshal(fencing.DeviceConfig{Type: "external", PollInterval: fencing.Duration(50 * time.Millisecond),
		Timeout:  fencing.Duration(5 * time.Second),
		External: &fencing.ExternalConfig{Program: script, Params: map[string]string{"statefile": offFile}}})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []*cluster.Command{
		{Kind: cluster.KindFenceDevicePut, FenceDevicePut: &cluster.FenceDevicePutCmd{Name: "pdu-" + crashed, Config: devCfg}},
		{Kind: cluster.KindNodeSetFence, NodeSetFence: &cluster.NodeSetFenceCmd{ID: crashed, Topology: fencing.NodeTopology{Levels: [][]string{{"pdu-" + crashed}}}}},
	} {
		if _, err := n1.Propose(ctx, c); err != nil {
			t.Fatalf("%v: %v", c.Kind, err)
		}
	}
	data2 := bytes.Repeat([]byte(fmt.Sprintf("%-15s\n", "acked-by-"+crashed)), 512/16*8)
	if err := s2.Write10(ctx, 64, data2, 512, true); err != nil {
		t.Fatalf("write via %s: %v", crashed, err)
	}
	waitFor(t, 30*time.Second, survivor+" in the ISR", func() bool {
		return slices.Contains(n1.FSM().State().Volumes[uuid].ISR, survivor)
	})
	cs := servers[crashed]
	servers[crashed] = nil
	tCrash := time.Now()
	// A crash: Raft, portal and replicas stop at once; nothing is released.
	cs.cancel()
	_ = cs.node.Close()
	cs.tsrv.Close()
	_ = cs.reps.CloseAll(context.Background())
	cs.rsrv.Close()
	cs.admin.Close()
	cs.agentWG.Wait()
	cs.wg.Wait()
	cs.srvWG.Wait()
	s2.Close()
	if _, err := os.Stat(offFile); err == nil {
		t.Fatal("fenced before anything happened")
	}
	var s3 *initiator.Session
	waitFor(t, 20*time.Second, survivor+" to take over and serve", func() bool {
		if group().Owner != survivor {
			return false
		}
		var err error
		s3, err = login(survivor)
		return err == nil
	})
	t.Logf("unplanned takeover: LUN served on %s %v after %s crashed (failure timeout %v)", survivor, time.Since(tCrash), crashed, cfgs[0].FailureTimeout)
	defer s3.Close()
	if _, err := os.Stat(offFile); err != nil {
		t.Fatalf("takeover without the fence device being used: %v", err)
	}
	st2 := n1.FSM().State()
	if st2.Nodes[crashed].State != cluster.NodeFenced || slices.Contains(st2.Volumes[uuid].ISR, crashed) {
		t.Fatalf("after takeover: %s is %s, ISR %v", crashed, st2.Nodes[crashed].State, st2.Volumes[uuid].ISR)
	}
	if _, err := s3.ClearUnitAttention(ctx); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		lba  uint32
		want []byte
	}{{32, data}, {64, data2}} {
		got, err := s3.Read10(ctx, c.lba, uint16(len(c.want)/512), 512)
		if err != nil || !bytes.Equal(got, c.want) {
			t.Fatalf("after takeover, LBA %d on %s lost an acknowledged write: %v", c.lba, survivor, err)
		}
	}
}

// serveCluster is two storage nodes (n1, n2) and a witness (w) started
// with serve's wiring in this process, joined, with n1 leading.
type serveCluster struct {
	cfgs    []*serveConfig
	servers map[string]*server
	vips    map[string]*fakeVIPs
	n1      *cluster.Node
}

func newServeCluster(ctx context.Context, t *testing.T) *serveCluster {
	t.Helper()
	log := slog.New(slog.DiscardHandler)
	if os.Getenv("HASAN_TEST_LOG") != "" {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	mk := func(id, role string) *serveConfig {
		// Unix socket paths are limited to 108 bytes; t.TempDir can be long.
		dir, err := os.MkdirTemp("", "hs-"+id)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		c := &serveConfig{Node: id, Role: role, DataDir: dir, ClusterListen: freeAddr(t), APIListen: freeAddr(t),
			VIPLink: "lo-test", FailureTimeout: 800 * time.Millisecond, ShutdownTimeout: 10 * time.Second}
		if role == "storage" {
			c.ReplicationListen, c.PortalListen = freeAddr(t), freeAddr(t)
		}
		c.setDefaults()
		if err := c.Validate(); err != nil {
			t.Fatal(err)
		}
		return c
	}
	cfgs := []*serveConfig{mk("n1", "storage"), mk("n2", "storage"), mk("w", "witness")}
	if err := clusterInit(ctx, cfgs[0], "test"); err != nil {
		t.Fatal(err)
	}
	for _, c := range cfgs[1:] {
		if err := issueNodeCert(cfgs[0], c.Node, c.tlsDir()); err != nil {
			t.Fatal(err)
		}
	}
	vips := map[string]*fakeVIPs{}
	servers := map[string]*server{}
	start := func(c *serveConfig) {
		vips[c.Node] = &fakeVIPs{}
		s, err := startServer(c, serveOptions{Logger: log, VIPs: vips[c.Node]})
		if err != nil {
			t.Fatalf("start %s: %v", c.Node, err)
		}
		servers[c.Node] = s
	}
	t.Cleanup(func() {
		for _, id := range []string{"w", "n2", "n1"} {
			if s := servers[id]; s != nil {
				t0 := time.Now()
				if err := s.Close(); err != nil {
					t.Errorf("close %s: %v", id, err)
				}
				if d := time.Since(t0); d > 10*time.Second {
					t.Errorf("close %s took %v", id, d)
				}
			}
		}
	})
	start(cfgs[0])
	n1 := servers["n1"].node
	waitFor(t, 10*time.Second, "n1 to lead", n1.IsLeader)

	for _, c := range cfgs[1:] {
		start(c)
		var tok struct {
			Token string `json:"token"`
		}
		if err := adminCall(ctx, cfgs[0].adminSocket(), "POST", "/token?role="+c.Role+"&ttl=1m", nil, &tok); err != nil {
			t.Fatal(err)
		}
		if err := adminCall(ctx, cfgs[0].adminSocket(), "POST", "/join", joinRequest{Token: tok.Token, Node: c.nodeInfo()}, nil); err != nil {
			t.Fatalf("join %s: %v", c.Node, err)
		}
		// The token is single-use.
		if err := adminCall(ctx, cfgs[0].adminSocket(), "POST", "/join", joinRequest{Token: tok.Token, Node: c.nodeInfo()}, nil); err == nil {
			t.Fatal("a used token was accepted again")
		}
	}
	for _, id := range []string{"n2", "w"} {
		waitFor(t, 10*time.Second, id+" to see the 3 nodes", func() bool {
			return len(servers[id].node.FSM().State().Nodes) == 3
		})
	}

	return &serveCluster{cfgs: cfgs, servers: servers, vips: vips, n1: n1}
}

// TestServeStopsOnCancel: runServe (what SIGTERM cancels) returns, within
// the shutdown bound, once its context ends.
func TestServeStopsOnCancel(t *testing.T) {
	dir, err := os.MkdirTemp("", "hs-stop")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	cfg := &serveConfig{Node: "n1", DataDir: dir, ClusterListen: freeAddr(t), ReplicationListen: freeAddr(t),
		PortalListen: freeAddr(t), APIListen: "off", ShutdownTimeout: 5 * time.Second}
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	if err := clusterInit(ctx, cfg, "test"); err != nil {
		t.Fatal(err)
	}
	if err := clusterInit(ctx, cfg, "test"); err == nil {
		t.Fatal("a second init was accepted")
	}
	done := make(chan error, 1)
	go func() { done <- runServe(ctx, cfg, serveOptions{}) }()
	waitFor(t, 10*time.Second, "the admin socket", func() bool {
		var st statusReply
		return adminCall(context.Background(), cfg.adminSocket(), "GET", "/status", nil, &st) == nil && st.RaftState == "Leader"
	})
	t0 := time.Now()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("runServe: %v", err)
		}
		t.Logf("stopped in %v", time.Since(t0))
	case <-time.After(8 * time.Second):
		t.Fatal("runServe did not return after cancel")
	}
}

// writeLoop writes one block at a time through the group's owner and, on
// an error, logs in to the next owner, as an initiator following the VIP
// would. It records the longest gap between two acknowledged writes.
type writeLoop struct {
	mu sync.Mutex
	on map[string]int
	// acked holds, per LBA, the last acknowledged block followed by the
	// blocks of later writes that failed: a failed write may or may not
	// have landed, so each is an acceptable read.
	acked  map[uint32][][]byte
	maxGap time.Duration
	cancel context.CancelFunc
	done   chan struct{}
}

func startWriteLoop(ctx context.Context, t *testing.T, login func(string) (*initiator.Session, error), from, to string) *writeLoop {
	t.Helper()
	ctx, cancel := context.WithCancel(ctx)
	w := &writeLoop{on: map[string]int{}, acked: map[uint32][][]byte{}, cancel: cancel, done: make(chan struct{})}
	sess, err := login(from)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sess.ClearUnitAttention(ctx); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(w.done)
		cur := from
		last := time.Now()
		for i := 0; ctx.Err() == nil; i++ {
			lba := uint32(200 + i%16)
			blk := bytes.Repeat([]byte(fmt.Sprintf("%-15d\n", i)), 32)
			wctx, wcancel := context.WithTimeout(ctx, time.Second)
			err := sess.Write10(wctx, lba, blk, 512, true)
			wcancel()
			if err == nil {
				now := time.Now()
				w.mu.Lock()
				w.maxGap = max(w.maxGap, now.Sub(last))
				w.on[cur]++
				w.acked[lba] = [][]byte{blk}
				w.mu.Unlock()
				last = now
				time.Sleep(2 * time.Millisecond)
				continue
			}
			w.mu.Lock()
			if _, ok := w.acked[lba]; ok {
				w.acked[lba] = append(w.acked[lba], blk)
			}
			w.mu.Unlock()
			sess.Close()
			// Re-login to whichever node serves now, as through the VIP.
			sess = nil
			for sess == nil && ctx.Err() == nil {
				for _, id := range []string{to, from} {
					s, err := login(id)
					if err != nil {
						continue
					}
					if _, err := s.ClearUnitAttention(ctx); err != nil {
						s.Close()
						continue
					}
					sess, cur = s, id
					break
				}
			}
			if sess == nil {
				return
			}
		}
		sess.Close()
	}()
	return w
}

func (w *writeLoop) writesOn(id string) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.on[id]
}

func (w *writeLoop) stop() (time.Duration, map[uint32][][]byte) {
	w.cancel()
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.maxGap, w.acked
}

// watchISR reports whether node ever left the volume's ISR while watched.
func watchISR(ctx context.Context, n *cluster.Node, uuid, node string) func() bool {
	var mu sync.Mutex
	left := false
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			ch := n.FSM().Changed()
			if v := n.FSM().State().Volumes[uuid]; v != nil && !slices.Contains(v.ISR, node) {
				mu.Lock()
				left = true
				mu.Unlock()
			}
			select {
			case <-ctx.Done():
				return
			case <-ch:
			}
		}
	}()
	return func() bool {
		cancel()
		<-done
		mu.Lock()
		defer mu.Unlock()
		return left
	}
}

// fenceDevice writes a fence-agents style program whose "off" creates
// offFile, and returns its device configuration.
func fenceDevice(t *testing.T, dir, node string) (devCfg []byte, offFile string) {
	t.Helper()
	offFile = filepath.Join(dir, "power-off-"+node)
	script := filepath.Join(dir, "fence_"+node+".sh")
	if err := os.WriteFile(script, []byte(`#!/bin/sh
action=; statefile=
while read -r line; do
  case "$line" in action=*) action=${line#action=};; statefile=*) statefile=${line#statefile=};; esac
done
case "$action" in
  off) touch "$statefile"; exit 0;;
  on) rm -f "$statefile"; exit 0;;
  status) [ -e "$statefile" ] && exit 2; exit 0;;
  monitor) exit 0;;
esac
exit 1
`), 0o700); err != nil {
		t.Fatal(err)
	}
	devCfg, err := json.Marshal(fencing.DeviceConfig{Type: "external", PollInterval: fencing.Duration(50 * time.Millisecond),
		Timeout:  fencing.Duration(5 * time.Second),
		External: &fencing.ExternalConfig{Program: script, Params: map[string]string{"statefile": offFile}}})
	if err != nil {
		t.Fatal(err)
	}
	return devCfg, offFile
}

// TestServeGracefulStopHandsOver: a graceful stop (SIGTERM) of the owner,
// which is also the Raft leader, moves its group to the other storage node
// by a planned move before it stops serving, so the cluster neither fences
// it nor takes over, and every acknowledged write is served by the new
// owner.
func TestServeGracefulStopHandsOver(t *testing.T) {
	if testing.Short() {
		t.Skip("starts three nodes")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	sc := newServeCluster(ctx, t)
	n1, n2 := sc.n1, sc.servers["n2"].node
	const (
		uuid = "6e1f0a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b"
		iqn  = "iqn.2026-11.io.hasan:stop-test"
	)
	devCfg, offFile := fenceDevice(t, sc.cfgs[0].DataDir, "n1")
	for _, c := range []*cluster.Command{
		{Kind: cluster.KindFenceDevicePut, FenceDevicePut: &cluster.FenceDevicePutCmd{Name: "pdu-n1", Config: devCfg}},
		{Kind: cluster.KindNodeSetFence, NodeSetFence: &cluster.NodeSetFenceCmd{ID: "n1", Topology: fencing.NodeTopology{Levels: [][]string{{"pdu-n1"}}}}},
		{Kind: cluster.KindVolumeCreate, VolumeCreate: &cluster.VolumeCreateCmd{UUID: uuid, Name: "v", Size: 4 << 20, Primary: "n1", Replicas: []string{"n1", "n2"}}},
		{Kind: cluster.KindTargetPut, TargetPut: &cluster.TargetPutCmd{Target: cluster.Target{IQN: iqn, LUNs: map[uint64]string{0: uuid}}}},
		{Kind: cluster.KindGroupPut, GroupPut: &cluster.GroupPutCmd{Group: cluster.Group{Name: "g", VIPs: []string{"127.0.0.1/32"}, Targets: []string{iqn}, Preferred: []string{"n1"}}}},
	} {
		if _, err := n1.Propose(ctx, c); err != nil {
			t.Fatalf("%v: %v", c.Kind, err)
		}
	}
	group := func(n *cluster.Node) cluster.Group { return *n.FSM().State().Groups["g"] }
	waitFor(t, 15*time.Second, "g placed on n1", func() bool { return group(n1).Owner == "n1" })
	waitFor(t, 30*time.Second, "n2 in sync and in the ISR", func() bool {
		return inSync(ctx, sc.servers["n1"], uuid, "n2")
	})
	portals := map[string]string{"n1": sc.servers["n1"].portal.String(), "n2": sc.servers["n2"].portal.String()}
	login := func(id string) (*initiator.Session, error) {
		lctx, lcancel := context.WithTimeout(ctx, 3*time.Second)
		defer lcancel()
		return initiator.Login(lctx, initiator.Config{Portal: portals[id], Target: iqn})
	}
	waitFor(t, 10*time.Second, "n1 to serve the LUN", func() bool {
		s, err := login("n1")
		if err == nil {
			s.Close()
		}
		return err == nil
	})
	ww := startWriteLoop(ctx, t, login, "n1", "n2")
	waitFor(t, 5*time.Second, "writes on n1", func() bool { return ww.writesOn("n1") >= 5 })

	s1 := sc.servers["n1"]
	sc.servers["n1"] = nil
	t0 := time.Now()
	if err := s1.Stop(); err != nil {
		t.Fatalf("graceful stop: %v", err)
	}
	t.Logf("graceful stop of the owner (and leader) took %v", time.Since(t0))
	waitFor(t, 5*time.Second, "n2 to see itself owner and n2 or w to lead", func() bool {
		return group(n2).Owner == "n2" && (n2.IsLeader() || sc.servers["w"].node.IsLeader())
	})
	waitFor(t, 10*time.Second, "writes to resume on n2", func() bool { return ww.writesOn("n2") >= 5 })
	pause, acked := ww.stop()
	t.Logf("graceful stop: I/O pause %v", pause)
	// Well past the failure timeout: a stopped node that owns nothing is
	// not fenced, and nothing was taken over.
	time.Sleep(2 * sc.cfgs[0].FailureTimeout)
	st := n2.FSM().State()
	if st.Nodes["n1"].State == cluster.NodeFenced {
		t.Fatalf("n1 was fenced after a graceful stop; events: %+v", st.Events)
	}
	if _, err := os.Stat(offFile); err == nil {
		t.Fatal("n1's fence device was used after a graceful stop")
	}
	for _, e := range st.Events {
		if e.Kind == "takeover" {
			t.Fatalf("takeover after a graceful stop: %+v", e)
		}
	}
	s2, err := login("n2")
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if _, err := s2.ClearUnitAttention(ctx); err != nil {
		t.Fatal(err)
	}
	for lba, ok := range acked {
		got, err := s2.Read10(ctx, lba, 1, 512)
		if err != nil || !slices.ContainsFunc(ok, func(b []byte) bool { return bytes.Equal(got, b) }) {
			t.Fatalf("LBA %d: acknowledged write lost across the graceful stop: %v", lba, err)
		}
	}
}

// inSync reports whether s's open primary of uuid sees peer up, caught up
// and in the ISR (the state's ISR alone reads true before the first full
// sync of a new replica has even started).
func inSync(ctx context.Context, s *server, uuid, peer string) bool {
	vol, _ := s.reps.Primary(uuid)
	if vol == nil {
		return false
	}
	st, err := vol.Status(ctx)
	if err != nil {
		return false
	}
	for _, p := range st {
		if p.ID == peer {
			return p.InISR && p.Mode == "up" && !p.Removing && p.DirtyBytes == 0
		}
	}
	return false
}

// TestClusterCertAdmin: `hasan cluster cert --admin` issues a certificate
// the CA marks as an operator's (cluster.AdminOU); without --admin it is a
// plain node certificate.
func TestClusterCertAdmin(t *testing.T) {
	dir, err := os.MkdirTemp("", "hs-cert")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	cfg := &serveConfig{Node: "n1", DataDir: dir, ClusterListen: freeAddr(t), ReplicationListen: freeAddr(t),
		PortalListen: freeAddr(t), APIListen: "off"}
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := clusterInit(ctx, cfg, "test"); err != nil {
		t.Fatal(err)
	}
	raw, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "n1.yaml")
	if err := os.WriteFile(cfgPath, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	ou := func(args ...string) []string {
		t.Helper()
		out := filepath.Join(dir, "out-"+args[0])
		root := newRootCmd()
		root.SetOut(&bytes.Buffer{})
		root.SetArgs(append([]string{"cluster", "cert", "--config", cfgPath, "--node", args[0], "--out", out}, args[1:]...))
		if err := root.ExecuteContext(ctx); err != nil {
			t.Fatal(err)
		}
		p, err := os.ReadFile(filepath.Join(out, nodeCertFile))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := pem.Decode(p)
		if b == nil {
			t.Fatal("no PEM certificate")
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		if c.Subject.CommonName != args[0] {
			t.Fatalf("CN %q", c.Subject.CommonName)
		}
		return c.Subject.OrganizationalUnit
	}
	if got := ou("ops", "--admin"); !slices.Contains(got, cluster.AdminOU) {
		t.Fatalf("admin certificate OU %v", got)
	}
	if got := ou("n2"); slices.Contains(got, cluster.AdminOU) {
		t.Fatalf("node certificate marked admin: %v", got)
	}
}
