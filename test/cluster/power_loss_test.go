package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/bench/failover/initiator"
	"github.com/hasan-storage/hasan/bench/failover/probe"
	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/fencing"
	"github.com/hasan-storage/hasan/test/lab"
)

const (
	volUUID = "7a3c1e2f-0b4d-4c6e-9f81-2a3b4c5d6e7f"
	iqn     = "iqn.2026-11.io.hasan:e2e"
	volSize = 16 << 20
	group   = "g0"
)

// maxGap is the issue-5 goal for an unplanned takeover (fence included);
// HASAN_CLUSTER_MAX_GAP overrides it (a Go duration) on a loaded machine.
func maxGap(t *testing.T) time.Duration {
	if s := os.Getenv("HASAN_CLUSTER_MAX_GAP"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			t.Fatalf("HASAN_CLUSTER_MAX_GAP: %v", err)
		}
		return d
	}
	return 2 * time.Second
}

// TestOwnerPowerLoss: two storage nodes and a witness run `hasan serve` in
// their namespaces; a volume with two replicas is exported through a
// target group whose VIP floats on the cluster link. The probe writes
// (FUA) and reads back through the VIP from the initiator namespace. The
// owner loses power (a cut: its processes die, its BMC then reports the
// chassis off). The controller must fence it through its ipmi_sim BMC and
// see the power off confirmed before the survivor takes over. The probe
// must recover with every acknowledged write present.
func TestOwnerPowerLoss(t *testing.T) {
	requireE2E(t)
	// Node data and the lab's logs live under root, kept when the test
	// fails (or with HASAN_CLUSTER_KEEP=1). Registered before the lab so
	// that it runs after the lab's cleanup has killed every process.
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
	l := lab.Start(t, cfg)
	bin := lab.BuildHasan(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const failure = cluster.DefaultFailureTimeout
	confs := map[string]nodeConf{
		"n1": writeConfig(t, root, l.Node("n1"), "storage", failure),
		"n2": writeConfig(t, root, l.Node("n2"), "storage", failure),
		"w1": writeConfig(t, root, l.Node("w1"), "witness", failure),
	}
	n1 := confs["n1"]

	// cluster init binds the Raft listener briefly: in n1's namespace.
	if out, err := l.Node("n1").Run(ctx, bin, "cluster", "init", "--config", n1.Config, "--name", "e2e"); err != nil {
		t.Fatalf("cluster init: %v\n%s", err, out)
	}
	for _, id := range []string{"n2", "w1"} {
		if out, err := l.Node("n1").Run(ctx, bin, "cluster", "cert", "--config", n1.Config, "--node", id, "--out", filepath.Join(confs[id].Dir, "tls")); err != nil {
			t.Fatalf("cluster cert %s: %v\n%s", id, err, out)
		}
	}
	adminTLS := filepath.Join(root, "admin-tls")
	if err := harnessCert(ctx, l.Node("n1"), bin, n1.Config, adminTLS); err != nil {
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
	// The harness talks to the cluster from the witness's namespace: it is
	// never disrupted here.
	prop := &proposer{tls: tlsCfg, dial: l.Node("w1").DialContext}

	procs := map[string]*lab.Process{}
	serve := func(id string) {
		t.Helper()
		p, err := l.Node(id).Start(lab.ProcSpec{Name: "hasan", Argv: []string{bin, "serve", "--log-level", "debug", "--config", confs[id].Config}})
		if err != nil {
			t.Fatalf("start %s: %v", id, err)
		}
		procs[id] = p
		waitFor(t, ctx, 15*time.Second, id+"'s admin socket", func() (bool, error) {
			if p.Exited() {
				t.Fatalf("hasan serve on %s exited: %v", id, p.Err())
			}
			_, err := getStatus(ctx, confs[id])
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
		c := confs[id]
		var tok struct {
			Token string `json:"token"`
		}
		if err := adminCall(ctx, n1.adminSocket(), http.MethodPost, "/token?role="+c.Role+"&ttl=2m", nil, &tok); err != nil {
			t.Fatalf("token for %s: %v", id, err)
		}
		if err := adminCall(ctx, n1.adminSocket(), http.MethodPost, "/join", map[string]any{"token": tok.Token, "node": c.nodeInfo("0.0.0.0:3260")}, nil); err != nil {
			t.Fatalf("join %s: %v", id, err)
		}
	}
	state := func(id string) (*cluster.State, error) {
		st, err := getStatus(ctx, confs[id])
		if err != nil {
			return nil, err
		}
		return st.State, nil
	}
	leaderAddr := func() (string, error) {
		for _, id := range []string{"w1", "n1", "n2"} {
			st, err := getStatus(ctx, confs[id])
			if err != nil || st.Leader == "" {
				continue
			}
			if n, ok := st.State.Nodes[st.Leader]; ok {
				return n.RaftAddr, nil
			}
		}
		return "", fmt.Errorf("no leader known")
	}
	do := func(c *cluster.Command) {
		t.Helper()
		addr, err := leaderAddr()
		if err != nil {
			t.Fatal(err)
		}
		if err := prop.propose(ctx, addr, c); err != nil {
			t.Fatalf("propose %s: %v", c.Kind, err)
		}
	}

	// Fencing: one ipmi device per storage node, on its lab BMC (cipher
	// suite 3, the one ipmi_sim serves). The password goes in as plain
	// JSON: fencing.Secret redacts itself when marshalled.
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
		do(&cluster.Command{Kind: cluster.KindFenceDevicePut, FenceDevicePut: &cluster.FenceDevicePutCmd{Name: "ipmi-" + id, Config: dev}})
		do(&cluster.Command{Kind: cluster.KindNodeSetFence, NodeSetFence: &cluster.NodeSetFenceCmd{ID: id, Topology: fencing.NodeTopology{Levels: [][]string{{"ipmi-" + id}}}}})
	}
	vipAddr := lab.VIP(0)
	do(&cluster.Command{Kind: cluster.KindVolumeCreate, VolumeCreate: &cluster.VolumeCreateCmd{UUID: volUUID, Name: "v0", Size: volSize, Primary: "n1", Replicas: []string{"n1", "n2"}}})
	do(&cluster.Command{Kind: cluster.KindTargetPut, TargetPut: &cluster.TargetPutCmd{Target: cluster.Target{IQN: iqn, LUNs: map[uint64]string{0: volUUID}}}})
	do(&cluster.Command{Kind: cluster.KindGroupPut, GroupPut: &cluster.GroupPutCmd{Group: cluster.Group{Name: group, VIPs: []string{vipAddr.String()}, Targets: []string{iqn}, Preferred: []string{"n1"}}}})

	var owner string
	waitFor(t, ctx, 20*time.Second, "the controller to place "+group, func() (bool, error) {
		st, err := state("w1")
		if err != nil {
			return false, err
		}
		if g := st.Groups[group]; g != nil {
			owner = g.Owner
		}
		return owner != "", nil
	})
	survivor := map[string]string{"n1": "n2", "n2": "n1"}[owner]
	waitFor(t, ctx, 30*time.Second, survivor+" in the ISR", func() (bool, error) {
		st, err := state("w1")
		if err != nil {
			return false, err
		}
		v := st.Volumes[volUUID]
		return v != nil && slices.Contains(v.ISR, survivor), nil
	})
	portal := vipAddr.Addr().String() + ":3260"
	waitFor(t, ctx, 15*time.Second, "the portal on the VIP", func() (bool, error) {
		dctx, dcancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer dcancel()
		c, err := l.Initiator().DialContext(dctx, "tcp", portal)
		if err == nil {
			c.Close()
		}
		return err == nil, err
	})

	p := probe.New(probe.Config{Initiator: initiator.Config{Portal: portal, Target: iqn, Dial: l.Initiator().DialContext}})
	pctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { _, err := p.Run(pctx); done <- err }()
	stopped := false
	stopProbe := func() error {
		if stopped {
			return nil
		}
		stopped = true
		stop()
		return <-done
	}
	defer stopProbe()
	if err := p.WaitPairs(ctx, 10); err != nil {
		t.Fatalf("no verified I/O through the VIP before the disruption: %v (%+v)", err, p.Snapshot())
	}

	// One writer before the cut: the other storage node does not export
	// the target on its own address while the owner serves it.
	{
		lctx, lcancel := context.WithTimeout(ctx, 2*time.Second)
		s, err := initiator.Login(lctx, initiator.Config{Portal: l.NodeAddr(survivor).String() + ":3260", Target: iqn, Dial: l.Initiator().DialContext})
		lcancel()
		if err == nil {
			s.Close()
			t.Fatalf("%s exports %s while %s owns %s", survivor, iqn, owner, group)
		}
	}

	hooksBefore := len(l.BMC(owner).HookLog())
	offAt := time.Now()
	if err := l.PowerOff(owner); err != nil {
		t.Fatalf("power off %s: %v", owner, err)
	}
	// lab.PowerOff takes the node's links down before its processes die,
	// as a real cut does: its kernel stops answering ARP for the VIP, so
	// the survivor's duplicate-address probe finds the address free.
	t.Logf("%s (owner) lost power at %s", owner, offAt.Format("15:04:05.000"))
	rctx, rcancel := context.WithTimeout(ctx, 30*time.Second)
	err = p.WaitPairs(rctx, 5)
	rcancel()
	// recovered is when the fifth verified pair after the cut completed;
	// the gap (from the probe) is the real interruption.
	recovered := time.Since(offAt)
	if perr := stopProbe(); perr != nil {
		t.Errorf("probe: %v", perr)
	}
	res := p.Snapshot()
	if err != nil {
		// The outage is still open: it is at least this long.
		res.Gap = max(res.Gap, res.SinceLastPair)
	}
	t.Logf("owner power loss: gap %v (5 verified pairs done %v after the cut), io_errors %d, reconnects %d, login_failures %d, unit_attentions %d, lost_writes %d",
		time.Duration(res.Gap), recovered.Round(time.Millisecond), res.IOErrors, res.Reconnects, res.LoginFailures, res.UnitAttentions, res.LostWrites)
	if err != nil {
		t.Fatalf("I/O did not resume within 30 s of %s's power loss: %v", owner, err)
	}
	if res.LostWrites != 0 {
		t.Fatalf("%d acknowledged writes lost", res.LostWrites)
	}

	// The takeover waited for a confirmed fence through the BMC.
	st, err := state("w1")
	if err != nil {
		t.Fatal(err)
	}
	g := st.Groups[group]
	if g.Owner != survivor {
		t.Fatalf("after the takeover %s is owned by %q, want %s", group, g.Owner, survivor)
	}
	if st.Nodes[owner].State != cluster.NodeFenced || slices.Contains(st.Volumes[volUUID].ISR, owner) {
		t.Fatalf("after the takeover %s is %s, ISR %v", owner, st.Nodes[owner].State, st.Volumes[volUUID].ISR)
	}
	var fenced *fencing.Record
	for i := range st.FenceHistory {
		r := &st.FenceHistory[i]
		t.Logf("fence record: %s %s via %s: %s in %v %s", r.Node, r.Action, r.Device, r.Outcome, r.Duration, r.Error)
		if r.Node == owner && r.Action == "off" && r.Outcome == fencing.OutcomeSuccess && r.Time.After(offAt.Add(-time.Second)) {
			fenced = r
		}
	}
	if fenced == nil || fenced.Device != "ipmi-"+owner {
		t.Fatalf("no successful fence of %s through ipmi-%s in the history", owner, owner)
	}
	takeoverAt := time.Time{}
	for _, e := range st.Events {
		t.Logf("event %d %s %s node=%s group=%s: %s", e.Seq, e.Severity, e.Kind, e.Node, e.Group, e.Message)
		if e.Kind == "takeover" && e.Group == group {
			takeoverAt = e.Time
		}
	}
	if takeoverAt.IsZero() || takeoverAt.Before(fenced.Time) {
		t.Fatalf("takeover at %v is not after the confirmed fence at %v", takeoverAt, fenced.Time)
	}
	t.Logf("timeline from the cut: fence record %v (took %v), takeover committed %v, probe gap %v",
		fenced.Time.Sub(offAt).Round(time.Millisecond), fenced.Duration.Round(time.Millisecond),
		takeoverAt.Sub(offAt).Round(time.Millisecond), time.Duration(res.Gap).Round(time.Millisecond))
	hooks := l.BMC(owner).HookLog()[hooksBefore:]
	t.Logf("BMC of %s received: %v", owner, hooks)
	if !slices.ContainsFunc(hooks, func(s string) bool { return strings.Contains(s, "set power 0") }) {
		t.Fatalf("the BMC of %s never received a power set: %v", owner, hooks)
	}
	// One writer: the powered-off owner is dead (the lab took its links
	// down and killed every process in its namespace).
	if !procs[owner].Exited() {
		t.Fatalf("hasan serve on %s survived the power loss", owner)
	}
	if lim := maxGap(t); time.Duration(res.Gap) > lim {
		t.Errorf("gap %v exceeds %v (issue-5 goal; HASAN_CLUSTER_MAX_GAP overrides)", time.Duration(res.Gap), lim)
	}
}
