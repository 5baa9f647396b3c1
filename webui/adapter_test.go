package webui

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/cluster"
)

// newClusterNode bootstraps a one-node cluster over loopback TLS with its
// stores in a temp dir, as cluster's own tests do.
func newClusterNode(t *testing.T) *cluster.Node {
	t.Helper()
	now := time.Now()
	ca, err := cluster.NewCA("webui-test", now)
	if err != nil {
		t.Fatal(err)
	}
	cert, key, err := ca.Issue("n1", now, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	tlsCfg, err := cluster.TLSConfig(ca.CertPEM, cert, key)
	if err != nil {
		t.Fatal(err)
	}
	n, err := cluster.NewNode(cluster.NodeConfig{ID: "n1", Role: cluster.RoleStorage, DataDir: t.TempDir(),
		BindAddr: "127.0.0.1:0", TLS: tlsCfg, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := n.Bootstrap(ctx, cluster.NodeInfo{APIAddr: "127.0.0.1:8080"}); err != nil {
		t.Fatal(err)
	}
	return n
}

func TestNodeServiceEndToEnd(t *testing.T) {
	n := newClusterNode(t)
	s := newTestServer(t, NewNodeService(n), Config{})
	h := s.Handler()
	must := func(method, path, body string, status int) string {
		t.Helper()
		w := do(t, h, method, path, body)
		if w.Code != status {
			t.Fatalf("%s %s: %d, want %d: %s", method, path, w.Code, status, w.Body)
		}
		return w.Body.String()
	}

	var st Status
	mustJSON(t, must("GET", "/api/v1/cluster", "", 200), &st)
	if st.NodeID != "n1" || st.RaftState != "Leader" || st.LeaderID != "n1" || st.LeaderAPI != "127.0.0.1:8080" || st.Nodes["online"] != 1 {
		t.Fatalf("status %+v", st)
	}

	var v cluster.Volume
	mustJSON(t, must("POST", "/api/v1/volumes", `{"name":"db","size":8388608,"replicas":["n1"]}`, 201), &v)
	if v.UUID == "" || v.Primary != "n1" || v.Epoch != 1 || v.BlockSize != 512 {
		t.Fatalf("volume %+v", v)
	}
	var got cluster.Volume
	mustJSON(t, must("GET", "/api/v1/volumes/"+v.UUID, "", 200), &got)
	if got.Name != "db" || got.Size != 8388608 {
		t.Fatalf("read back %+v", got)
	}
	// The cluster's own validation comes back as 400 / 404.
	must("POST", "/api/v1/volumes", `{"name":"bad","size":1000,"replicas":["n1"]}`, 400)
	must("POST", "/api/v1/volumes", `{"name":"x","size":4096,"replicas":["ghost"]}`, 404)

	const iqn = "iqn.2026-11.io.hasan:web"
	must("POST", "/api/v1/targets", `{"iqn":"`+iqn+`","chap":{"user":"alice","secret":"real-secret-0001"}}`, 201)
	must("POST", "/api/v1/targets", `{"iqn":"`+iqn+`"}`, 409)
	must("PUT", "/api/v1/targets/"+iqn+"/luns/0", `{"volume":"`+v.UUID+`"}`, 204)
	must("PUT", "/api/v1/targets/"+iqn+"/acl", `{"initiators":["iqn.1993-08.org.debian:01:abc"]}`, 204)
	must("PUT", "/api/v1/targets/"+iqn+"/chap", `{"chap":{"user":"alice","secret":"short"}}`, 400)

	body := must("GET", "/api/v1/targets/"+iqn, "", 200)
	if strings.Contains(body, "real-secret-0001") {
		t.Fatalf("secret returned: %s", body)
	}
	var tv targetView
	mustJSON(t, body, &tv)
	if tv.LUNs[0] != v.UUID || len(tv.ACL) != 1 || tv.CHAP == nil || tv.CHAP.User != "alice" || !tv.CHAP.SecretSet {
		t.Fatalf("target %+v", tv)
	}
	// The secret is kept by the cluster, only hidden from the API.
	ct, err := NewNodeService(n).Target(context.Background(), iqn)
	if err != nil || ct.CHAP.Secret.Reveal() != "real-secret-0001" {
		t.Fatalf("stored chap %v %v", ct.CHAP, err)
	}

	must("DELETE", "/api/v1/volumes/"+v.UUID, "", 409) // exported
	must("POST", "/api/v1/groups", `{"name":"g1","vips":["192.0.2.10/24"],"targets":["`+iqn+`"]}`, 201)
	must("POST", "/api/v1/groups/g1/move", `{"to":"nobody"}`, 404)
	must("DELETE", "/api/v1/targets/"+iqn, "", 409) // in a group
	must("PUT", "/api/v1/nodes/n1/state", `{"state":"standby"}`, 204)
	var nd cluster.NodeInfo
	mustJSON(t, must("GET", "/api/v1/nodes/n1", "", 200), &nd)
	if nd.State != cluster.NodeStandby {
		t.Fatalf("node %+v", nd)
	}
	must("PUT", "/api/v1/cluster/maintenance", `{"on":true}`, 204)

	var evs []cluster.Event
	mustJSON(t, must("GET", "/api/v1/events?limit=50", "", 200), &evs)
	if len(evs) == 0 {
		t.Fatal("no events after state changes")
	}
	for i := 1; i < len(evs); i++ {
		if evs[i].Seq >= evs[i-1].Seq {
			t.Fatalf("events not newest first: %+v", evs)
		}
	}
	if raw := must("GET", "/api/v1/fence-history", "", 200); strings.TrimSpace(raw) != "[]" {
		t.Errorf("fence history %s", raw)
	}
	w := do(t, h, "GET", "/metrics", "")
	if !strings.Contains(w.Body.String(), `hasan_volumes 1`) || !strings.Contains(w.Body.String(), `hasan_raft_state{state="Leader"} 1`) {
		t.Errorf("metrics:\n%s", w.Body)
	}
}

// TestNodeServiceFence drives the fence routes through Raft: the secret is
// stored in clear in the state (the fencer needs it) and never returned.
func TestNodeServiceFence(t *testing.T) {
	n := newClusterNode(t)
	s := newTestServer(t, NewNodeService(n), Config{})
	h := s.Handler()
	var bodies []string
	must := func(method, path, body string, status int) string {
		t.Helper()
		w := do(t, h, method, path, body)
		if w.Code != status {
			t.Fatalf("%s %s: %d, want %d: %s", method, path, w.Code, status, w.Body)
		}
		bodies = append(bodies, w.Body.String())
		return w.Body.String()
	}
	const secret = "raft-bmc-password-1"
	must("PUT", "/api/v1/fence-devices/bmc-n1", `{"type":"ipmi","timeout":"5s","ipmi":{"host":"127.0.0.1","user":"fence","password":"`+secret+`"}}`, 200)
	must("PUT", "/api/v1/fence-devices/ops", `{"type":"manual","manual":{"node":"n1"}}`, 200)
	must("PUT", "/api/v1/nodes/n1/fence", `{"levels":[["bmc-n1"],["ops"]]}`, 204)
	must("PUT", "/api/v1/nodes/n1/fence", `{"levels":[["ghost"]]}`, 404)
	must("PUT", "/api/v1/nodes/n9/fence", `{"levels":[["ops"]]}`, 404)
	must("DELETE", "/api/v1/fence-devices/ops", "", 409)
	must("DELETE", "/api/v1/fence-devices/ghost", "", 404)

	var devs []deviceOut
	mustJSON(t, must("GET", "/api/v1/fence-devices", "", 200), &devs)
	if len(devs) != 2 || devs[0].Name != "bmc-n1" || devs[0].section("ipmi")["password"] != "[redacted]" || !slices.Equal(devs[1].UsedBy, []string{"n1"}) {
		t.Fatalf("devices %+v", devs)
	}
	var nd cluster.NodeInfo
	mustJSON(t, must("GET", "/api/v1/nodes/n1", "", 200), &nd)
	if len(nd.Fence.Levels) != 2 || nd.Fence.Levels[1][0] != "ops" {
		t.Fatalf("topology %+v", nd.Fence)
	}
	// Replace the topology, then the device is free to go.
	must("PUT", "/api/v1/nodes/n1/fence", `{"action":"reboot","levels":[["bmc-n1"]]}`, 204)
	must("DELETE", "/api/v1/fence-devices/ops", "", 204)
	must("GET", "/api/v1/fence-devices/ops", "", 404)
	must("GET", "/api/v1/cluster", "", 200)
	// Manual confirmation: never for the node answering (it is running),
	// nor for a node still heard from, nor without the acknowledgement.
	if _, err := n.Propose(context.Background(), &cluster.Command{Kind: cluster.KindNodeAdd, NodeAdd: &cluster.NodeAddCmd{
		Node: cluster.NodeInfo{ID: "n2", Role: cluster.RoleStorage, RaftAddr: "127.0.0.1:1"}}}); err != nil {
		t.Fatal(err)
	}
	const ack = `{"operator":"alice","verified_off":true}`
	if b := must("POST", "/api/v1/nodes/n1/fence-confirm", ack, 409); !strings.Contains(b, "serving this request") {
		t.Errorf("self confirmation refused with %s", b)
	}
	must("POST", "/api/v1/nodes/n2/fence-confirm", `{"operator":"alice"}`, 400)
	n.Heartbeat("n2", time.Now())
	if b := must("POST", "/api/v1/nodes/n2/fence-confirm", ack, 409); !strings.Contains(b, "sent a heartbeat") {
		t.Errorf("confirmation of a beating node refused with %s", b)
	}
	if _, ok := n.FSM().State().FenceConfirms["n2"]; ok {
		t.Fatal("a refused confirmation was recorded")
	}
	n.Heartbeat("n2", time.Now().Add(-time.Minute)) // no effect: older
	time.Sleep(heardRecently)
	must("POST", "/api/v1/nodes/n2/fence-confirm", ack, 204)
	must("POST", "/api/v1/nodes/n7/fence-confirm", ack, 404)
	if got := n.FSM().State().FenceConfirms["n2"]; got.By != "alice" || got.At.IsZero() {
		t.Fatalf("confirmation in the state: %+v", got)
	}
	if ev := must("GET", "/api/v1/events?limit=100", "", 200); !strings.Contains(ev, "alice confirmed node n2") {
		t.Errorf("no confirmation event: %s", ev)
	}

	for _, b := range bodies {
		if strings.Contains(b, secret) {
			t.Fatalf("secret returned: %s", b)
		}
	}
	d, err := NewNodeService(n).FenceDevice(context.Background(), "bmc-n1")
	if err != nil {
		t.Fatal(err)
	}
	dc, err := d.DeviceConfig()
	if err != nil || dc.IPMI.Password.Reveal() != secret || time.Duration(dc.Timeout) != 5*time.Second {
		t.Fatalf("stored device %+v %v", dc.IPMI, err)
	}
}

// TestNodeServiceRemoveNode removes nodes through Raft: from the state and
// from the Raft configuration, refusing busy nodes and the answering node.
func TestNodeServiceRemoveNode(t *testing.T) {
	n := newClusterNode(t)
	s := newTestServer(t, NewNodeService(n), Config{})
	h := s.Handler()
	must := func(method, path, body string, status int) string {
		t.Helper()
		w := do(t, h, method, path, body)
		if w.Code != status {
			t.Fatalf("%s %s: %d, want %d: %s", method, path, w.Code, status, w.Body)
		}
		return w.Body.String()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	add := func(id string, role cluster.Role, raftAddr string) {
		t.Helper()
		if _, err := n.Propose(ctx, &cluster.Command{Kind: cluster.KindNodeAdd, NodeAdd: &cluster.NodeAddCmd{
			Node: cluster.NodeInfo{ID: id, Role: role, RaftAddr: raftAddr}}}); err != nil {
			t.Fatal(err)
		}
	}
	// w9 is in the state and a Raft non-voter (a voter that never answers
	// would cost this one-node cluster its quorum).
	add("w9", cluster.RoleWitness, "127.0.0.1:1")
	if err := n.Raft().AddNonvoter("w9", "127.0.0.1:1", 0, 5*time.Second).Error(); err != nil {
		t.Fatal(err)
	}
	add("n2", cluster.RoleStorage, "127.0.0.1:2")
	must("POST", "/api/v1/volumes", `{"name":"db","size":8388608,"replicas":["n1","n2"]}`, 201)

	if eb := decodeErr(t, do(t, h, "DELETE", "/api/v1/nodes/n1", "")); eb.Field != "id" {
		t.Errorf("removing the answering node: %+v", eb)
	}
	must("DELETE", "/api/v1/nodes/n1", "", 400)
	must("DELETE", "/api/v1/nodes/n2", "", 409) // holds a replica
	must("DELETE", "/api/v1/nodes/ghost", "", 404)
	must("DELETE", "/api/v1/nodes/w9", "", 204)
	must("GET", "/api/v1/nodes/w9", "", 404)
	inRaft, err := NewNodeService(n).raftMember("w9")
	if err != nil || inRaft {
		t.Fatalf("w9 still in the raft configuration (%v, %v)", inRaft, err)
	}
	must("DELETE", "/api/v1/nodes/w9", "", 404)
	if _, ok := n.FSM().State().Nodes["n2"]; !ok {
		t.Fatal("refused removal changed the state")
	}
}
