package webui

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/cluster"
)

// TestNodeServiceRevokeCert revokes through Raft: the serial lands in the
// state normalised, a repeat reports it was revoked already, a node's own
// certificate needs force, and bad input is a 400 that changes nothing.
func TestNodeServiceRevokeCert(t *testing.T) {
	n := newClusterNode(t)
	s := newTestServer(t, NewNodeService(n), Config{})
	h := s.Handler()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	post := func(body string, status int) RevokeCertResult {
		t.Helper()
		w := do(t, h, "POST", "/api/v1/certs/revoke", body)
		if w.Code != status {
			t.Fatalf("%s: %d, want %d: %s", body, w.Code, status, w.Body)
		}
		var r RevokeCertResult
		if status == 200 {
			if err := json.Unmarshal(w.Body.Bytes(), &r); err != nil {
				t.Fatal(err)
			}
		}
		return r
	}
	if r := post(`{"serial":"0x00AB:CD","cn":"laptop"}`, 200); r.Serial != "abcd" || r.AlreadyRevoked {
		t.Fatalf("first revocation: %+v", r)
	}
	if !n.FSM().CertRevoked("abcd") || n.FSM().State().RevokedCerts["abcd"].CN != "laptop" {
		t.Fatalf("not in the state: %+v", n.FSM().State().RevokedCerts)
	}
	if r := post(`{"serial":"ABCD"}`, 200); !r.AlreadyRevoked {
		t.Fatalf("repeat: %+v", r)
	}
	before := n.FSM().State()
	post(`{"serial":""}`, 400)
	post(`{"serial":"xyz"}`, 400)
	post(`{"serial":"12","force":"yes"}`, 400)
	// A serial recorded for a member: refused unless forced.
	if _, err := n.Propose(ctx, &cluster.Command{Kind: cluster.KindNodeAdd, NodeAdd: &cluster.NodeAddCmd{
		Node: cluster.NodeInfo{ID: "n2", Role: cluster.RoleStorage, RaftAddr: "127.0.0.1:2", CertSerials: []string{"beef"}}}}); err != nil {
		t.Fatal(err)
	}
	post(`{"serial":"beef"}`, 409)
	if n.FSM().CertRevoked("beef") || len(n.FSM().State().RevokedCerts) != len(before.RevokedCerts) {
		t.Fatal("a refused revocation changed the state")
	}
	post(`{"serial":"beef","force":true}`, 200)
	if !n.FSM().CertRevoked("beef") {
		t.Fatal("forced revocation not applied")
	}
}
