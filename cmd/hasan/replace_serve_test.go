package main

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/bench/failover/initiator"
	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/fencing"
)

// crashServer stops every part of s at once, as a power loss: Raft, portal
// and replicas stop, nothing is released or handed over.
func crashServer(s *server) {
	s.cancel()
	_ = s.node.Close()
	s.tsrv.Close()
	_ = s.reps.CloseAll(context.Background())
	s.rsrv.Close()
	s.admin.Close()
	s.agentWG.Wait()
	s.wg.Wait()
	s.srvWG.Wait()
}

// TestServeReplaceFailedNode: serve's wiring, three processes' worth in
// one (n1, n2 storage, w witness). n2, a replica of n1's volume holding
// written data, dies for good. A new storage node n3 joins, and
// `hasan node replace n2 --with n3 --remove` over n1's real REST API gives
// n3 the replica and takes n2 out of the state and the Raft voters. n1's
// agent swaps its replication session under the served LUN, n3's agent
// creates its replica, n3 is fully synced into the ISR and its image is
// byte-identical to n1's. Then n1, owner and Raft leader, crashes: n3 and
// w elect a leader, fence n1 and n3 serves every acknowledged write.
func TestServeReplaceFailedNode(t *testing.T) {
	if testing.Short() {
		t.Skip("starts four nodes")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	sc := newServeCluster(ctx, t)
	cfgs, servers, n1 := sc.cfgs, sc.servers, sc.n1
	api := "http://" + cfgs[0].APIListen

	const (
		uuid = "7a1f0a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b"
		iqn  = "iqn.2026-11.io.hasan:replace-test"
		size = 8 << 20
	)
	for _, c := range []*cluster.Command{
		{Kind: cluster.KindVolumeCreate, VolumeCreate: &cluster.VolumeCreateCmd{UUID: uuid, Name: "v", Size: size, Primary: "n1", Replicas: []string{"n1", "n2"}}},
		{Kind: cluster.KindTargetPut, TargetPut: &cluster.TargetPutCmd{Target: cluster.Target{IQN: iqn, LUNs: map[uint64]string{0: uuid}}}},
		{Kind: cluster.KindGroupPut, GroupPut: &cluster.GroupPutCmd{Group: cluster.Group{Name: "g", VIPs: []string{"127.0.0.1/32"}, Targets: []string{iqn}, Preferred: []string{"n1"}}}},
	} {
		if _, err := n1.Propose(ctx, c); err != nil {
			t.Fatalf("%v: %v", c.Kind, err)
		}
	}
	state := func() *cluster.State { return servers["n1"].node.FSM().State() }
	waitFor(t, 15*time.Second, "the controller to place g on n1", func() bool { return state().Groups["g"].Owner == "n1" })
	login := func(id string) (*initiator.Session, error) {
		lctx, lcancel := context.WithTimeout(ctx, 3*time.Second)
		defer lcancel()
		return initiator.Login(lctx, initiator.Config{Portal: servers[id].portal.String(), Target: iqn})
	}
	var s *initiator.Session
	waitFor(t, 10*time.Second, "n1 to serve the LUN", func() bool {
		var err error
		s, err = login("n1")
		return err == nil
	})
	defer s.Close()
	if _, err := s.ClearUnitAttention(ctx); err != nil {
		t.Fatal(err)
	}
	const bs = 512
	want := make([]byte, size)
	write := func(lba uint32, fill string) {
		t.Helper()
		p := bytes.Repeat([]byte(fill), 64*bs/len(fill)+1)[:64*bs]
		if err := s.Write10(ctx, lba, p, bs, true); err != nil {
			t.Fatalf("write lba %d: %v", lba, err)
		}
		copy(want[int(lba)*bs:], p)
	}
	for i, lba := range []uint32{0, 4000, 9000, 16000} {
		write(lba, strings.Repeat(string(rune('a'+i)), 15)+"\n")
	}
	waitFor(t, 30*time.Second, "n2 in sync", func() bool {
		return slices.Contains(state().Volumes[uuid].ISR, "n2") && inSync(ctx, servers["n1"], uuid, "n2")
	})

	// n2 dies for good. It owns nothing: no fence, no takeover; n1 drops
	// it from the ISR on the next write.
	crashServer(servers["n2"])
	servers["n2"] = nil
	write(100, "after-n2-died!\n")
	waitFor(t, 15*time.Second, "n2 out of the ISR", func() bool { return !slices.Contains(state().Volumes[uuid].ISR, "n2") })

	// A new machine, n3, joins as in docs/operations.md section 3.
	c3 := &serveConfig{Node: "n3", Role: "storage", ClusterListen: freeAddr(t), APIListen: freeAddr(t),
		ReplicationListen: freeAddr(t), PortalListen: freeAddr(t), VIPLink: "lo-test",
		FailureTimeout: cfgs[0].FailureTimeout, ShutdownTimeout: 10 * time.Second}
	dir, err := os.MkdirTemp("", "hs-n3")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	c3.DataDir = dir
	c3.setDefaults()
	if err := c3.Validate(); err != nil {
		t.Fatal(err)
	}
	if err := issueNodeCert(cfgs[0], "n3", c3.tlsDir()); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	if os.Getenv("HASAN_TEST_LOG") != "" {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	v3 := &fakeVIPs{}
	s3srv, err := startServer(c3, serveOptions{Logger: log, VIPs: v3})
	if err != nil {
		t.Fatalf("start n3: %v", err)
	}
	servers["n3"] = s3srv
	t.Cleanup(func() {
		if servers["n3"] != nil {
			_ = servers["n3"].Close()
		}
	})
	var tok struct {
		Token string `json:"token"`
	}
	if err := adminCall(ctx, cfgs[0].adminSocket(), "POST", "/token?role=storage&ttl=1m", nil, &tok); err != nil {
		t.Fatal(err)
	}
	if err := adminCall(ctx, cfgs[0].adminSocket(), "POST", "/join", joinRequest{Token: tok.Token, Node: c3.nodeInfo()}, nil); err != nil {
		t.Fatalf("join n3: %v", err)
	}
	waitFor(t, 10*time.Second, "n3 to see the cluster", func() bool { return len(s3srv.node.FSM().State().Nodes) == 4 })

	// The replacement, through the CLI and n1's REST API.
	out, _, err := runHasan(t, "", "--api", api, "node", "replace", "n2", "--with", "n3", "--remove")
	if err != nil {
		t.Fatalf("hasan node replace: %v\n%s", err, out)
	}
	for _, w := range []string{"replica n2 replaced by n3", "node n2 removed"} {
		if !strings.Contains(out, w) {
			t.Fatalf("hasan node replace output lacks %q:\n%s", w, out)
		}
	}
	t.Logf("hasan node replace:\n%s", out)
	if _, ok := state().Nodes["n2"]; ok {
		t.Fatal("n2 still in the state")
	}
	f := n1.Raft().GetConfiguration()
	if err := f.Error(); err != nil {
		t.Fatal(err)
	}
	for _, srv := range f.Configuration().Servers {
		if srv.ID == "n2" {
			t.Fatal("n2 still a Raft server")
		}
	}
	t0 := time.Now()
	waitFor(t, 60*time.Second, "n3 in sync and in the ISR", func() bool {
		write(200, "while-n3-syncs\n")
		return slices.Contains(state().Volumes[uuid].ISR, "n3") && inSync(ctx, servers["n1"], uuid, "n3")
	})
	t.Logf("n3 in the ISR %v after the replacement", time.Since(t0))
	// The same session kept working across the swap (write above); the
	// images are identical.
	img := func(c *serveConfig) []byte {
		b, err := os.ReadFile(filepath.Join(c.replicaDir(), uuid+".img"))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	if a, b := img(cfgs[0]), img(c3); !bytes.Equal(a, want) || !bytes.Equal(a, b) {
		t.Fatalf("images: n1 as written %v, n3 identical to n1 %v", bytes.Equal(a, want), bytes.Equal(a, b))
	}

	// n1, owner and leader, crashes. Its fence device records the off.
	devCfg, offFile := fenceDevice(t, cfgs[0].DataDir, "n1")
	for _, c := range []*cluster.Command{
		{Kind: cluster.KindFenceDevicePut, FenceDevicePut: &cluster.FenceDevicePutCmd{Name: "pdu-n1", Config: devCfg}},
		{Kind: cluster.KindNodeSetFence, NodeSetFence: &cluster.NodeSetFenceCmd{ID: "n1", Topology: fencing.NodeTopology{Levels: [][]string{{"pdu-n1"}}}}},
	} {
		if _, err := n1.Propose(ctx, c); err != nil {
			t.Fatalf("%v: %v", c.Kind, err)
		}
	}
	waitFor(t, 15*time.Second, "n3 a Raft voter", func() bool {
		f := n1.Raft().GetConfiguration()
		if f.Error() != nil {
			return false
		}
		for _, srv := range f.Configuration().Servers {
			if srv.ID == "n3" {
				return srv.Suffrage == 0 // raft.Voter
			}
		}
		return false
	})
	s.Close()
	crashServer(servers["n1"])
	servers["n1"] = nil
	tCrash := time.Now()
	var s3 *initiator.Session
	waitFor(t, 30*time.Second, "n3 to take over and serve", func() bool {
		if s3srv.node.FSM().State().Groups["g"].Owner != "n3" {
			return false
		}
		var err error
		s3, err = login("n3")
		return err == nil
	})
	defer s3.Close()
	t.Logf("n3 serves %v after n1 (owner and leader) crashed", time.Since(tCrash))
	if _, err := os.Stat(offFile); err != nil {
		t.Fatalf("takeover without the fence: %v", err)
	}
	if _, err := s3.ClearUnitAttention(ctx); err != nil {
		t.Fatal(err)
	}
	for lba := 0; lba < size/bs; lba += 128 {
		got, err := s3.Read10(ctx, uint32(lba), 128, bs)
		if err != nil {
			t.Fatalf("read lba %d on n3: %v", lba, err)
		}
		if !bytes.Equal(got, want[lba*bs:(lba+128)*bs]) {
			t.Fatalf("n3 lost an acknowledged write near lba %d", lba)
		}
	}
}
