package webui

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/hasan-storage/hasan/cluster"
)

// TestReplaceOverAPI drives the replica-set routes against a real one-node
// cluster whose state also lists storage nodes n2, n3 and n4 (state only:
// no Raft member, no data plane, which these routes do not need).
func TestReplaceOverAPI(t *testing.T) {
	n := newClusterNode(t)
	svc := NewNodeService(n)
	h := newTestServer(t, svc, Config{}).Handler()
	ctx := context.Background()
	for i, id := range []string{"n2", "n3", "n4"} {
		if _, err := n.Propose(ctx, &cluster.Command{Kind: cluster.KindNodeAdd, NodeAdd: &cluster.NodeAddCmd{Node: cluster.NodeInfo{
			ID: id, Role: cluster.RoleStorage, RaftAddr: "127.0.0.1:1700" + string(rune('1'+i))}}}); err != nil {
			t.Fatal(err)
		}
	}
	must := func(method, path, body string, status int, want ...string) string {
		t.Helper()
		w := do(t, h, method, path, body)
		if w.Code != status {
			t.Fatalf("%s %s %s: %d, want %d: %s", method, path, body, w.Code, status, w.Body)
		}
		for _, s := range want {
			if !strings.Contains(w.Body.String(), s) {
				t.Fatalf("%s %s: body %s lacks %q", method, path, w.Body, s)
			}
		}
		return w.Body.String()
	}
	var a, b cluster.Volume
	mustJSON(t, must("POST", "/api/v1/volumes", `{"name":"a","size":8388608,"replicas":["n1","n2"]}`, 201), &a)
	mustJSON(t, must("POST", "/api/v1/volumes", `{"name":"b","size":8388608,"replicas":["n2","n1"]}`, 201), &b)
	const iqn = "iqn.2026-11.io.hasan:rep"
	must("POST", "/api/v1/targets", `{"iqn":"`+iqn+`"}`, 201)
	must("PUT", "/api/v1/targets/"+iqn+"/luns/0", `{"volume":"`+b.UUID+`"}`, 204)
	must("POST", "/api/v1/groups", `{"name":"gb","vips":["192.0.2.30/24"],"targets":["`+iqn+`"]}`, 201)

	// One volume: replace, with errors that say what to fix.
	var v cluster.Volume
	mustJSON(t, must("POST", "/api/v1/volumes/"+a.UUID+"/replicas", `{"remove":"n2","add":"n3"}`, 200), &v)
	if !slices.Equal(v.Replicas, []string{"n1", "n3"}) || !slices.Equal(v.ISR, []string{"n1"}) {
		t.Fatalf("after replace: %+v", v)
	}
	must("POST", "/api/v1/volumes/"+a.UUID+"/replicas", `{"remove":"n1","add":"n4"}`, 409, "primary", "n1")
	must("POST", "/api/v1/volumes/"+a.UUID+"/replicas", `{"remove":"n3","add":"ghost"}`, 404, "ghost")
	must("POST", "/api/v1/volumes/"+a.UUID+"/replicas", `{"add":"n3"}`, 409, "already holds")
	must("POST", "/api/v1/volumes/"+a.UUID+"/replicas", `{}`, 400, "remove, add")
	must("POST", "/api/v1/volumes/"+a.UUID+"/replicas", `{"replace":"n3"}`, 400, "replace")
	must("POST", "/api/v1/volumes/00000000-0000-4000-8000-00000000dead/replicas", `{"add":"n4"}`, 404)
	// Grow to three, shrink back.
	mustJSON(t, must("POST", "/api/v1/volumes/"+a.UUID+"/replicas", `{"add":"n4"}`, 200), &v)
	if !slices.Equal(v.Replicas, []string{"n1", "n3", "n4"}) {
		t.Fatalf("after add: %+v", v)
	}
	mustJSON(t, must("POST", "/api/v1/volumes/"+a.UUID+"/replicas", `{"remove":"n4"}`, 200), &v)
	if !slices.Equal(v.Replicas, []string{"n1", "n3"}) {
		t.Fatalf("after remove: %+v", v)
	}

	// Node replace: n2 is b's primary, so nothing changes and the error
	// names the volume and its group.
	must("POST", "/api/v1/nodes/n2/replace", `{"with":"n4"}`, 409, b.UUID, "group gb", "nothing was changed")
	if got, _ := svc.Volume(ctx, b.UUID); !slices.Equal(got.Replicas, []string{"n2", "n1"}) {
		t.Fatalf("refused replace changed b: %+v", got)
	}
	must("POST", "/api/v1/nodes/n2/replace", `{}`, 400, "with")
	must("POST", "/api/v1/nodes/n2/replace", `{"with":"n2"}`, 400, "itself")
	must("POST", "/api/v1/nodes/ghost/replace", `{"with":"n4"}`, 404)

	// n3 holds a replica of a only (not primary): replaced by n2 there,
	// then removed from the cluster.
	var res ReplaceNodeResult
	mustJSON(t, must("POST", "/api/v1/nodes/n3/replace", `{"with":"n2","remove":true}`, 200), &res)
	if !res.Removed || len(res.Volumes) != 1 || res.Volumes[0].UUID != a.UUID || !slices.Equal(res.Volumes[0].Replicas, []string{"n1", "n2"}) {
		t.Fatalf("node replace result %+v", res)
	}
	must("GET", "/api/v1/nodes/n3", "", 404)
	// A node with no replica: nothing to replace, removal still works.
	mustJSON(t, must("POST", "/api/v1/nodes/n4/replace", `{"with":"n2","remove":true}`, 200), &res)
	if !res.Removed || len(res.Volumes) != 0 {
		t.Fatalf("empty node replace %+v", res)
	}
}

// noReplicas is a Service without ReplicaService.
type noReplicas struct{ Service }

func TestReplicaRoutesWithoutReplicaService(t *testing.T) {
	h := newTestServer(t, noReplicas{newFake()}, Config{}).Handler()
	if w := do(t, h, "POST", "/api/v1/nodes/n2/replace", `{"with":"n3"}`); w.Code != 501 {
		t.Fatalf("%d %s", w.Code, w.Body)
	}
	if w := do(t, h, "POST", "/api/v1/volumes/x/replicas", `{"add":"n3"}`); w.Code != 501 {
		t.Fatalf("%d %s", w.Code, w.Body)
	}
}
