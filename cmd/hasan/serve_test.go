package main

import (
	"bytes"
	"context"
	"encoding/json"
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
		{good + "bogus: [\n", "c.yaml"},
	} {
		_, err := loadServeConfig(write(c.yaml))
		if err == nil || !strings.Contains(err.Error(), c.field) {
			t.Errorf("%q: error %v does not name %s", c.yaml, err, c.field)
		}
	}
	// A witness needs no replication or portal address.
	if _, err := loadServeConfig(write("node: w\nrole: witness\ndata_dir: " + dir + "\ncluster_advertise: 192.0.2.3:7400\n")); err != nil {
		t.Fatal(err)
	}
}

type fakeVIPs struct {
	mu   sync.Mutex
	held map[netip.Prefix]bool
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

func (f *fakeVIPs) Tickle(context.Context, []vip.TCPConn) error { return nil }

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
	log := slog.New(slog.DiscardHandler)
	if os.Getenv("HASAN_TEST_LOG") != "" {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()

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
	vipAddr := netip.MustParsePrefix("192.0.2.50/32")
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
	waitFor(t, 30*time.Second, other+" back in the ISR", func() bool {
		return slices.Contains(n1.FSM().State().Volumes[uuid].ISR, other)
	})

	// Planned move (what `hasan target move` / POST /groups/g/move do).
	t0 := time.Now()
	if _, err := n1.Propose(ctx, &cluster.Command{Kind: cluster.KindGroupMove, GroupMove: &cluster.GroupMoveCmd{Group: "g", Node: other}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 15*time.Second, "g to move to "+other, func() bool { g := group(); return g.Owner == other && g.MovingTo == "" })
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
