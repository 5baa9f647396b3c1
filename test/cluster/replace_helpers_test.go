package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/fencing"
	"github.com/hasan-storage/hasan/test/lab"
)

// replaceAPI is every node's REST API in the replacement scenario: plain
// HTTP on the loopback of the node's own namespace, so only a process in
// that namespace (the harness through lab's Run or DialContext) reaches it.
const replaceAPI = "127.0.0.1:7402"

// startReplaceCluster is startCluster's layout plus n3, a spare storage
// node with a BMC that has joined but holds no replica. startCluster
// builds exactly three nodes (and WaitHealthy counts them), so this is its
// setup again with a fourth node and the REST API on loopback (the
// node-replace path: removing a Raft voter runs only in the leader's API).
func startReplaceCluster(t *testing.T, ctx context.Context) *testCluster {
	t.Helper()
	root, err := os.MkdirTemp("", "hcr-")
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
	cfg := lab.Config{Nodes: []lab.NodeSpec{{Name: "n1", BMC: true}, {Name: "n2", BMC: true}, {Name: "w1"}, {Name: "n3", BMC: true}}}
	cfg.Dir, cfg.KeepDir = filepath.Join(root, "lab"), true
	cfg.Logger = slog.New(slog.NewTextHandler(testLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	l := lab.Start(t, cfg)
	c := &testCluster{L: l, Bin: lab.BuildHasan(t), Root: root, Failure: clusterFailureTimeout,
		VIP: lab.VIP(0).String(), Portal: lab.VIP(0).Addr().String() + ":3260",
		Storage: []string{"n1", "n2", "n3"}, procs: map[string]*lab.Process{}}
	c.Confs = map[string]nodeConf{}
	for _, id := range []string{"n1", "n2", "n3", "w1"} {
		role := "storage"
		if id == "w1" {
			role = "witness"
		}
		nc := writeConfig(t, root, l.Node(id), role, c.Failure)
		y, err := os.ReadFile(nc.Config)
		if err != nil {
			t.Fatal(err)
		}
		y = []byte(strings.Replace(string(y), "api_listen: \"off\"", "api_listen: "+replaceAPI, 1))
		if err := os.WriteFile(nc.Config, y, 0o600); err != nil {
			t.Fatal(err)
		}
		c.Confs[id] = nc
	}
	n1 := c.Confs["n1"]
	if out, err := l.Node("n1").Run(ctx, c.Bin, "cluster", "init", "--config", n1.Config, "--name", "e2e-replace"); err != nil {
		t.Fatalf("cluster init: %v\n%s", err, out)
	}
	for _, id := range []string{"n2", "w1", "n3"} {
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
	c.prop = &proposer{tls: tlsCfg, dial: l.Initiator().DialContext}

	c.Serve(t, ctx, "n1")
	waitFor(t, ctx, 15*time.Second, "n1 to lead", func() (bool, error) {
		st, err := getStatus(ctx, n1)
		return err == nil && st.RaftState == "Leader", err
	})
	// n3 joins last, as the spare an operator adds once the cluster runs.
	for _, id := range []string{"n2", "w1", "n3"} {
		c.Serve(t, ctx, id)
		joinNode(t, ctx, n1, c.Confs[id])
	}
	for _, id := range c.Storage {
		c.Do(t, ctx, &cluster.Command{Kind: cluster.KindFenceDevicePut, FenceDevicePut: &cluster.FenceDevicePutCmd{Name: "ipmi-" + id, Config: c.FenceDeviceConfig(t, id, "")}})
		c.Do(t, ctx, &cluster.Command{Kind: cluster.KindNodeSetFence, NodeSetFence: &cluster.NodeSetFenceCmd{ID: id, Topology: fencing.NodeTopology{Levels: [][]string{{"ipmi-" + id}}}}})
	}
	c.Do(t, ctx, &cluster.Command{Kind: cluster.KindVolumeCreate, VolumeCreate: &cluster.VolumeCreateCmd{UUID: volUUID, Name: "v0", Size: volSize, Primary: "n1", Replicas: []string{"n1", "n2"}}})
	c.Do(t, ctx, &cluster.Command{Kind: cluster.KindTargetPut, TargetPut: &cluster.TargetPutCmd{Target: cluster.Target{IQN: iqn, LUNs: map[uint64]string{0: volUUID}}}})
	c.Do(t, ctx, &cluster.Command{Kind: cluster.KindGroupPut, GroupPut: &cluster.GroupPutCmd{Group: cluster.Group{Name: group, VIPs: []string{c.VIP}, Targets: []string{iqn}, Preferred: []string{"n1"}}}})
	waitHealthyNodes(t, ctx, c, []string{"n1", "n2", "n3", "w1"})
	return c
}

// joinNode admits nc through the admin socket of the node at (a token,
// then /join), as startCluster does.
func joinNode(t *testing.T, ctx context.Context, at, nc nodeConf) {
	t.Helper()
	var tok struct {
		Token string `json:"token"`
	}
	if err := adminCall(ctx, at.adminSocket(), http.MethodPost, "/token?role="+nc.Role+"&ttl=2m", nil, &tok); err != nil {
		t.Fatalf("token for %s: %v", nc.ID, err)
	}
	if err := adminCall(ctx, at.adminSocket(), http.MethodPost, "/join", map[string]any{"token": tok.Token, "node": nc.nodeInfo("0.0.0.0:3260")}, nil); err != nil {
		t.Fatalf("join %s: %v", nc.ID, err)
	}
}

// waitHealthyNodes is WaitHealthy for a cluster whose members are exactly
// nodes: g0 owned and not moving, every member online, full ISR, the
// witness leading, the portal answering on the VIP.
func waitHealthyNodes(t *testing.T, ctx context.Context, c *testCluster, nodes []string) {
	t.Helper()
	waitFor(t, ctx, 60*time.Second, fmt.Sprintf("a healthy cluster of %v (g0 owned, nodes online, full ISR)", nodes), func() (bool, error) {
		st, err := c.State(ctx)
		if err != nil {
			return false, err
		}
		g, v := st.Groups[group], st.Volumes[volUUID]
		if g == nil || g.Owner == "" || g.MovingTo != "" || v == nil {
			return false, fmt.Errorf("group %+v", g)
		}
		if got := slices.Sorted(maps.Keys(st.Nodes)); !slices.Equal(got, slices.Sorted(slices.Values(nodes))) {
			return false, fmt.Errorf("members %v", got)
		}
		for id, n := range st.Nodes {
			if n.State != cluster.NodeOnline {
				return false, fmt.Errorf("%s is %s", id, n.State)
			}
		}
		for _, r := range v.Replicas {
			if !slices.Contains(v.ISR, r) {
				return false, fmt.Errorf("ISR %v lacks %s", v.ISR, r)
			}
		}
		return true, nil
	})
	waitFor(t, ctx, 20*time.Second, "the witness to lead (leader placement)", func() (bool, error) {
		if l := leaderAmong(ctx, c, nodes); l != "w1" {
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

// leaderAmong is the id of the running node among ids that leads ("" if
// none). testCluster.Leader asks only n1, n2 and w1.
func leaderAmong(ctx context.Context, c *testCluster, ids []string) string {
	for _, id := range ids {
		if !c.Running(id) {
			continue
		}
		if st, err := getStatus(ctx, c.Confs[id]); err == nil && st.RaftState == "Leader" {
			return id
		}
	}
	return ""
}

// restCall is one request to node id's REST API, dialled inside its
// namespace; it returns the HTTP status and the body.
func restCall(ctx context.Context, c *testCluster, id, method, path string, in any) (int, []byte, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return 0, nil, err
		}
		body = strings.NewReader(string(b))
	}
	node := c.L.Node(id)
	cl := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return node.DialContext(ctx, network, addr)
		},
	}}
	defer cl.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, method, "http://"+replaceAPI+path, body)
	if err != nil {
		return 0, nil, err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := cl.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	return resp.StatusCode, raw, err
}

// pairClock records when the probe's verified pairs complete, so that the
// pause of one phase can be told from the pauses before it (the probe's
// own Gap is the longest of the whole run).
type pairClock struct {
	cancel context.CancelFunc
	done   chan struct{}

	mu     sync.Mutex
	stamps []time.Time
	missed int // pairs that completed between two stamps
}

func startPairClock(ctx context.Context, p *runningProbe) *pairClock {
	ctx, cancel := context.WithCancel(ctx)
	pc := &pairClock{cancel: cancel, done: make(chan struct{})}
	// The first stamp is a pair's completion, so that a pause starting
	// right after this call is measured from the pair before it.
	if err := p.WaitPairs(ctx, 1); err == nil {
		pc.stamps = append(pc.stamps, time.Now())
	}
	last := p.Snapshot().Pairs
	go func() {
		defer close(pc.done)
		for {
			if err := p.WaitPairs(ctx, 1); err != nil {
				return
			}
			now := time.Now()
			n := p.Snapshot().Pairs
			pc.mu.Lock()
			pc.stamps = append(pc.stamps, now)
			pc.missed += max(0, n-last-1)
			pc.mu.Unlock()
			last = n
		}
	}()
	return pc
}

// Stop ends the recording.
func (pc *pairClock) Stop() {
	pc.cancel()
	<-pc.done
}

// MaxPause is the longest time without a verified pair between from and
// to: the intervals between consecutive stamps that overlap the window,
// and the open interval at to if no pair completed since. A pair that
// completed unseen between two stamps makes it larger, never smaller.
func (pc *pairClock) MaxPause(from, to time.Time) time.Duration {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	var worst time.Duration
	// No stamp before from: the pause is counted from from (a lower bound).
	prev := from
	for _, s := range pc.stamps {
		if s.After(from) && prev.Before(to) {
			worst = max(worst, s.Sub(prev))
		}
		prev = s
	}
	if prev.Before(to) {
		worst = max(worst, to.Sub(prev))
	}
	return worst
}

// Missed is how many pairs completed unseen between two stamps.
func (pc *pairClock) Missed() int {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	return pc.missed
}

// Pauses lists the intervals longer than over between two stamps, as
// offsets from ref, for the log.
func (pc *pairClock) Pauses(over time.Duration, ref time.Time) []string {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	var out []string
	for i := 1; i < len(pc.stamps); i++ {
		if d := pc.stamps[i].Sub(pc.stamps[i-1]); d > over {
			out = append(out, fmt.Sprintf("%v from %v", d.Round(time.Millisecond), pc.stamps[i-1].Sub(ref).Round(time.Millisecond)))
		}
	}
	return out
}

// TestPairClockMaxPause checks the phase-pause rule of the scenario's
// clock (always runs: no namespace).
func TestPairClockMaxPause(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	pc := &pairClock{stamps: []time.Time{at(0), at(100), at(200), at(1300), at(1400), at(1500)}}
	for _, c := range []struct {
		from, to int
		want     time.Duration
	}{
		{250, 1450, 1100 * time.Millisecond}, // the pause straddles from
		{0, 150, 100 * time.Millisecond},
		{1310, 1450, 100 * time.Millisecond}, // the pause ended before the window
		{1450, 2000, 500 * time.Millisecond}, // still open at to
		{-500, 50, 500 * time.Millisecond},   // no stamp before from
	} {
		if got := pc.MaxPause(at(c.from), at(c.to)); got != c.want {
			t.Errorf("MaxPause(%d, %d) = %v, want %v", c.from, c.to, got, c.want)
		}
	}
}
