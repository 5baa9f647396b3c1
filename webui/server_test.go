package webui

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/fencing"
	"github.com/hasan-storage/hasan/replication"
)

const t1 = "iqn.2026-01.io.hasan:t1"

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func newTestServer(t *testing.T, svc Service, cfg Config) *Server {
	t.Helper()
	cfg.Logger = testLogger(t)
	s, err := New(cfg, svc)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func do(t *testing.T, h http.Handler, method, path, body string) *httptest.ResponseRecorder {
	t.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req := httptest.NewRequest(method, path, r)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req)
	return w
}

func decodeErr(t *testing.T, w *httptest.ResponseRecorder) errorBody {
	t.Helper()
	var eb errorBody
	if err := json.Unmarshal(w.Body.Bytes(), &eb); err != nil || eb.Error == "" {
		t.Fatalf("error body %q: not {\"error\":...}: %v", w.Body.String(), err)
	}
	return eb
}

// endpoint is one route with a request that succeeds against newFake.
type endpoint struct {
	method, path, body string
	status             int
	call               string // the Service method the handler must reach
	check              func(t *testing.T, f *fakeService, body string)
}

func endpoints() []endpoint {
	return []endpoint{
		{"GET", "/api/v1/cluster", "", 200, "Status", func(t *testing.T, f *fakeService, b string) {
			var s Status
			mustJSON(t, b, &s)
			if s.Volumes != 1 || s.Nodes["online"] != 2 || len(s.Groups) != 1 || s.Groups[0].Owner != "n1" {
				t.Errorf("status %+v", s)
			}
		}},
		{"PUT", "/api/v1/cluster/maintenance", `{"on":true}`, 204, "SetMaintenance", func(t *testing.T, f *fakeService, b string) {
			if !f.st.Maintenance {
				t.Error("maintenance not set")
			}
		}},
		{"GET", "/api/v1/nodes", "", 200, "Nodes", func(t *testing.T, f *fakeService, b string) {
			var ns []cluster.NodeInfo
			mustJSON(t, b, &ns)
			if len(ns) != 2 || ns[0].ID != "n1" || ns[1].ID != "w1" {
				t.Errorf("nodes %+v", ns)
			}
		}},
		{"GET", "/api/v1/nodes/n1", "", 200, "Node", func(t *testing.T, f *fakeService, b string) {
			var n cluster.NodeInfo
			mustJSON(t, b, &n)
			if n.ID != "n1" || n.Role != cluster.RoleStorage {
				t.Errorf("node %+v", n)
			}
		}},
		{"DELETE", "/api/v1/nodes/w1", "", 204, "RemoveNode", func(t *testing.T, f *fakeService, b string) {
			if f.st.Nodes["w1"] != nil {
				t.Error("node not removed")
			}
		}},
		{"PUT", "/api/v1/nodes/n1/state", `{"state":"standby"}`, 204, "SetNodeState", func(t *testing.T, f *fakeService, b string) {
			if f.st.Nodes["n1"].State != cluster.NodeStandby {
				t.Errorf("state %s", f.st.Nodes["n1"].State)
			}
		}},
		{"GET", "/api/v1/volumes", "", 200, "Volumes", func(t *testing.T, f *fakeService, b string) {
			var vs []cluster.Volume
			mustJSON(t, b, &vs)
			if len(vs) != 1 || vs[0].UUID != "v1" {
				t.Errorf("volumes %+v", vs)
			}
		}},
		{"POST", "/api/v1/volumes", `{"name":"vol2","size":1048576,"replicas":["n1"]}`, 201, "CreateVolume", func(t *testing.T, f *fakeService, b string) {
			var v cluster.Volume
			mustJSON(t, b, &v)
			if v.Name != "vol2" || f.st.Volumes[v.UUID] == nil {
				t.Errorf("created %+v", v)
			}
		}},
		{"GET", "/api/v1/volumes/v1", "", 200, "Volume", func(t *testing.T, f *fakeService, b string) {
			var v cluster.Volume
			mustJSON(t, b, &v)
			if v.UUID != "v1" || v.Size != 1<<20 {
				t.Errorf("volume %+v", v)
			}
		}},
		{"DELETE", "/api/v1/volumes/v1", "", 204, "DeleteVolume", nil}, // fake: prepared below
		{"GET", "/api/v1/targets", "", 200, "Targets", func(t *testing.T, f *fakeService, b string) {
			var ts []targetView
			mustJSON(t, b, &ts)
			if len(ts) != 1 || ts[0].IQN != t1 || ts[0].CHAP == nil || !ts[0].CHAP.SecretSet || ts[0].CHAP.User != "alice" {
				t.Errorf("targets %+v", ts)
			}
		}},
		{"POST", "/api/v1/targets", `{"iqn":"iqn.2026-01.io.hasan:t2","acl":["iqn.1993-08.org.debian:01:x"],"chap":{"user":"bob","secret":"new-secret-1234"}}`, 201, "CreateTarget", func(t *testing.T, f *fakeService, b string) {
			tg := f.st.Targets["iqn.2026-01.io.hasan:t2"]
			if tg == nil || tg.CHAP == nil || tg.CHAP.Secret.Reveal() != "new-secret-1234" || len(tg.ACL) != 1 {
				t.Errorf("stored %+v", tg)
			}
			var v targetView
			mustJSON(t, b, &v)
			if v.IQN != "iqn.2026-01.io.hasan:t2" || v.CHAP == nil || !v.CHAP.SecretSet {
				t.Errorf("reply %+v", v)
			}
		}},
		{"GET", "/api/v1/targets/" + t1, "", 200, "Target", func(t *testing.T, f *fakeService, b string) {
			var v targetView
			mustJSON(t, b, &v)
			if v.IQN != t1 || v.LUNs[0] != "v1" {
				t.Errorf("target %+v", v)
			}
		}},
		{"DELETE", "/api/v1/targets/" + t1, "", 204, "DeleteTarget", nil},
		{"PUT", "/api/v1/targets/" + t1 + "/luns/3", `{"volume":"v9"}`, 204, "AddLUN", func(t *testing.T, f *fakeService, b string) {
			if f.st.Targets[t1].LUNs[3] != "v9" {
				t.Errorf("luns %v", f.st.Targets[t1].LUNs)
			}
		}},
		{"DELETE", "/api/v1/targets/" + t1 + "/luns/0", "", 204, "RemoveLUN", func(t *testing.T, f *fakeService, b string) {
			if _, ok := f.st.Targets[t1].LUNs[0]; ok {
				t.Errorf("luns %v", f.st.Targets[t1].LUNs)
			}
		}},
		{"PUT", "/api/v1/targets/" + t1 + "/acl", `{"initiators":["iqn.a","iqn.b"]}`, 204, "SetACL", func(t *testing.T, f *fakeService, b string) {
			if got := f.st.Targets[t1].ACL; len(got) != 2 || got[1] != "iqn.b" {
				t.Errorf("acl %v", got)
			}
		}},
		{"PUT", "/api/v1/targets/" + t1 + "/chap", `{"chap":{"user":"carol","secret":"chap-secret-xyz"},"mutual_chap":{"user":"tgt","secret":"mutual-secret-xyz"}}`, 204, "SetCHAP", func(t *testing.T, f *fakeService, b string) {
			tg := f.st.Targets[t1]
			if tg.CHAP.User != "carol" || tg.CHAP.Secret.Reveal() != "chap-secret-xyz" || tg.MutualCHAP.Secret.Reveal() != "mutual-secret-xyz" {
				t.Errorf("chap %+v %+v", tg.CHAP, tg.MutualCHAP)
			}
		}},
		{"GET", "/api/v1/groups", "", 200, "Groups", func(t *testing.T, f *fakeService, b string) {
			var gs []cluster.Group
			mustJSON(t, b, &gs)
			if len(gs) != 1 || gs[0].Name != "g1" || gs[0].Epoch != 2 {
				t.Errorf("groups %+v", gs)
			}
		}},
		{"POST", "/api/v1/groups", `{"name":"g2","vips":["192.0.2.20/24"],"targets":[]}`, 201, "CreateGroup", func(t *testing.T, f *fakeService, b string) {
			var g cluster.Group
			mustJSON(t, b, &g)
			if g.Name != "g2" || f.st.Groups["g2"] == nil {
				t.Errorf("group %+v", g)
			}
		}},
		{"GET", "/api/v1/groups/g1", "", 200, "Group", func(t *testing.T, f *fakeService, b string) {
			var g cluster.Group
			mustJSON(t, b, &g)
			if g.Owner != "n1" {
				t.Errorf("group %+v", g)
			}
		}},
		{"POST", "/api/v1/groups/g1/move", `{"to":"n2"}`, 202, "MoveGroup", func(t *testing.T, f *fakeService, b string) {
			if f.st.Groups["g1"].MovingTo != "n2" {
				t.Errorf("moving_to %q", f.st.Groups["g1"].MovingTo)
			}
		}},
		{"GET", "/api/v1/fence-devices", "", 200, "FenceDevices", func(t *testing.T, f *fakeService, b string) {
			var ds []deviceOut
			mustJSON(t, b, &ds)
			if len(ds) != 2 || ds[0].Name != "bmc1" || ds[0].Type != "ipmi" || ds[0].section("ipmi")["host"] != "10.0.0.11" ||
				!slices.Equal(ds[0].UsedBy, []string{"n1"}) || ds[1].UsedBy == nil || len(ds[1].UsedBy) != 0 {
				t.Errorf("devices %+v", ds)
			}
			if !strings.Contains(b, `"password":"[redacted]"`) {
				t.Errorf("password not shown as redacted: %s", b)
			}
		}},
		{"GET", "/api/v1/fence-devices/bmc1", "", 200, "FenceDevice", func(t *testing.T, f *fakeService, b string) {
			var d deviceOut
			mustJSON(t, b, &d)
			if d.Name != "bmc1" || d.section("ipmi")["user"] != "fence" {
				t.Errorf("device %+v", d)
			}
		}},
		{"PUT", "/api/v1/fence-devices/pdu1", `{"type":"apc-snmp","timeout":"10s","apc_snmp":{"host":"10.0.0.21","version":"2c","community":"put-community-77","outlets":["3"]}}`, 200, "PutFenceDevice", func(t *testing.T, f *fakeService, b string) {
			d := f.st.FenceDevices["pdu1"]
			if d == nil || d.Type != "apc-snmp" {
				t.Fatalf("stored %+v", d)
			}
			dc, err := d.DeviceConfig()
			if err != nil || dc.APC.Community.Reveal() != "put-community-77" || time.Duration(dc.Timeout) != 10*time.Second {
				t.Errorf("stored config %+v %v", dc, err)
			}
			var v deviceOut
			mustJSON(t, b, &v)
			if v.Name != "pdu1" || v.Type != "apc-snmp" || v.section("apc_snmp")["community"] != "[redacted]" || v.Config["timeout"] != "10s" {
				t.Errorf("reply %+v", v)
			}
		}},
		{"DELETE", "/api/v1/fence-devices/spare", "", 204, "DeleteFenceDevice", func(t *testing.T, f *fakeService, b string) {
			if f.st.FenceDevices["spare"] != nil {
				t.Error("device not deleted")
			}
		}},
		{"PUT", "/api/v1/nodes/w1/fence", `{"action":"reboot","levels":[["bmc1"],["bmc1","spare"]]}`, 204, "SetNodeFence", func(t *testing.T, f *fakeService, b string) {
			got := f.st.Nodes["w1"].Fence
			if got.Action != fencing.ActionReboot || len(got.Levels) != 2 || !slices.Equal(got.Levels[1], []string{"bmc1", "spare"}) {
				t.Errorf("topology %+v", got)
			}
		}},
		{"POST", "/api/v1/nodes/n1/fence-confirm", `{"operator":"alice","verified_off":true}`, 204, "ConfirmFence", func(t *testing.T, f *fakeService, b string) {
			if got := f.st.FenceConfirms["n1"]; got.By != "alice" {
				t.Errorf("confirmation %+v", got)
			}
		}},
		{"GET", "/api/v1/fence-history?node=n2&limit=5", "", 200, "FenceHistory", func(t *testing.T, f *fakeService, b string) {
			var rs []map[string]any
			mustJSON(t, b, &rs)
			if len(rs) != 1 || rs[0]["node"] != "n2" {
				t.Errorf("history %v", rs)
			}
		}},
		{"GET", "/api/v1/events?limit=1", "", 200, "Events", func(t *testing.T, f *fakeService, b string) {
			var es []cluster.Event
			mustJSON(t, b, &es)
			if len(es) != 1 || es[0].Seq != 2 {
				t.Errorf("events %+v (want newest only)", es)
			}
		}},
	}
}

func mustJSON(t *testing.T, s string, v any) {
	t.Helper()
	if err := json.Unmarshal([]byte(s), v); err != nil {
		t.Fatalf("decode %q: %v", s, err)
	}
}

func TestEndpointsSucceed(t *testing.T) {
	for _, ep := range endpoints() {
		t.Run(ep.method+" "+ep.path, func(t *testing.T) {
			f := newFake()
			if ep.call == "DeleteVolume" {
				delete(f.st.Targets, t1) // unexport v1 so it can go
			}
			if ep.call == "DeleteTarget" {
				f.st.Groups["g1"].Targets = nil
			}
			s := newTestServer(t, f, Config{})
			w := do(t, s.Handler(), ep.method, ep.path, ep.body)
			if w.Code != ep.status {
				t.Fatalf("status %d, want %d: %s", w.Code, ep.status, w.Body)
			}
			if len(f.calls) == 0 || f.calls[0] != ep.call {
				t.Fatalf("calls %v, want %s first", f.calls, ep.call)
			}
			if ep.status != 204 && ep.status != 202 && !strings.HasPrefix(w.Header().Get("Content-Type"), "application/json") {
				t.Errorf("content type %q", w.Header().Get("Content-Type"))
			}
			switch ep.call {
			case "DeleteVolume":
				if f.st.Volumes["v1"] != nil {
					t.Error("volume not deleted")
				}
			case "DeleteTarget":
				if f.st.Targets[t1] != nil {
					t.Error("target not deleted")
				}
			}
			if ep.check != nil {
				ep.check(t, f, w.Body.String())
			}
		})
	}
}

// TestEndpointsMapErrors sends each endpoint's valid request while the
// service fails with each class of error.
func TestEndpointsMapErrors(t *testing.T) {
	cases := []struct {
		err    error
		status int
		leader string
		leak   string // must not appear in the body
	}{
		{fmt.Errorf("%w: node x", cluster.ErrNotFound), 404, "", ""},
		{fmt.Errorf("%w: size", cluster.ErrInvalid), 400, "", ""},
		{fmt.Errorf("%w: v9", replication.ErrUnknownVolume), 404, "", ""},
		{cluster.ErrToken, 403, "", ""},
		{fmt.Errorf("%w: volume v", cluster.ErrExists), 409, "", ""},
		{fmt.Errorf("%w: volume v exported", cluster.ErrInUse), 409, "", ""},
		{fmt.Errorf("%w: 1 < 2", replication.ErrStaleEpoch), 409, "", ""},
		{fmt.Errorf("%w: n1", cluster.ErrNotFenced), 409, "", ""},
		{fmt.Errorf("%w: g1", cluster.ErrGroupOwned), 409, "", ""},
		{fmt.Errorf("%w: n2 is standby", cluster.ErrNodeState), 409, "", ""},
		{&NotLeaderError{LeaderAPI: "10.0.0.9:8080", Err: cluster.ErrNotLeader}, 503, "10.0.0.9:8080", ""},
		{cluster.ErrNotLeader, 503, "", ""},
		{fmt.Errorf("apply: %w", context.DeadlineExceeded), 504, "", "apply"},
		{errors.New("bolt: open /var/lib/hasan/raft.db: password=hunter2"), 500, "", "hunter2"},
	}
	for _, ep := range endpoints() {
		for _, c := range cases {
			t.Run(fmt.Sprintf("%s %s/%d", ep.method, ep.path, c.status), func(t *testing.T) {
				f := newFake()
				f.err = c.err
				s := newTestServer(t, f, Config{})
				w := do(t, s.Handler(), ep.method, ep.path, ep.body)
				if w.Code != c.status {
					t.Fatalf("status %d, want %d: %s", w.Code, c.status, w.Body)
				}
				eb := decodeErr(t, w)
				if got := w.Header().Get(LeaderHeader); got != c.leader {
					t.Errorf("%s %q, want %q", LeaderHeader, got, c.leader)
				}
				if c.leak != "" && strings.Contains(w.Body.String(), c.leak) {
					t.Errorf("body leaks %q: %s", c.leak, w.Body)
				}
				if c.status < 500 && !strings.Contains(eb.Error, "cluster:") && !strings.Contains(eb.Error, "replication:") {
					t.Errorf("client error %q should carry the cause", eb.Error)
				}
			})
		}
	}
}

func TestValidation(t *testing.T) {
	cases := []struct {
		method, path, body string
		status             int
		field              string
		msg                string // substring of the error
	}{
		{"POST", "/api/v1/volumes", `{"name":`, 400, "body", "JSON"},
		{"POST", "/api/v1/volumes", `{"name":"x",}`, 400, "body", "invalid JSON"},
		{"POST", "/api/v1/volumes", ``, 400, "body", "required"},
		{"POST", "/api/v1/volumes", `{"name":"x","size":"big","replicas":["n1"]}`, 400, "size", "int64"},
		{"POST", "/api/v1/volumes", `{"name":"x","size":1,"replicas":["n1"],"colour":"red"}`, 400, "colour", "unknown"},
		{"POST", "/api/v1/volumes", `{"name":"x","size":1,"replicas":["n1"]} {}`, 400, "body", "trailing"},
		{"POST", "/api/v1/volumes", `{"size":1,"replicas":["n1"]}`, 400, "name", "required"},
		{"POST", "/api/v1/volumes", `{"name":"x","size":0,"replicas":["n1"]}`, 400, "size", "positive"},
		{"POST", "/api/v1/volumes", `{"name":"x","size":1}`, 400, "replicas", "at least"},
		{"PUT", "/api/v1/cluster/maintenance", `{}`, 400, "on", "required"},
		{"PUT", "/api/v1/nodes/n1/state", `{"state":"fenced"}`, 400, "state", "fenced"},
		{"POST", "/api/v1/targets", `{"alias":"x"}`, 400, "iqn", "required"},
		{"POST", "/api/v1/targets", `{"iqn":"iqn.x","luns":{"abc":"v1"}}`, 400, "luns", "uint64"},
		{"PUT", "/api/v1/targets/" + t1 + "/luns/x", `{"volume":"v1"}`, 400, "lun", "integer"},
		{"PUT", "/api/v1/targets/" + t1 + "/luns/99999", `{"volume":"v1"}`, 400, "lun", "16383"},
		{"DELETE", "/api/v1/targets/" + t1 + "/luns/-1", ``, 400, "lun", "integer"},
		{"PUT", "/api/v1/targets/" + t1 + "/luns/1", `{}`, 400, "volume", "required"},
		{"PUT", "/api/v1/targets/" + t1 + "/acl", `{"initiators":["a",""]}`, 400, "initiators[1]", "required"},
		{"PUT", "/api/v1/targets/" + t1 + "/chap", `{"mutual_chap":{"user":"u","secret":"s"}}`, 400, "mutual_chap", "needs chap"},
		{"POST", "/api/v1/groups", `{"vips":[]}`, 400, "name", "required"},
		{"POST", "/api/v1/groups/g1/move", `{}`, 400, "to", "required"},
		{"GET", "/api/v1/events?limit=-3", ``, 400, "limit", "non-negative"},
		{"GET", "/api/v1/fence-history?limit=x", ``, 400, "limit", "non-negative"},
		{"POST", "/api/v1/targets", `{"iqn":"` + t1 + `"}`, 409, "", "exists"},
		{"GET", "/api/v1/volumes/nope", ``, 404, "", "not found"},
		{"GET", "/api/v1/nope", ``, 404, "", "not found"},
		{"PATCH", "/api/v1/volumes", `{}`, 405, "", "not allowed"},
	}
	for _, c := range cases {
		t.Run(c.method+" "+c.path+" "+c.body, func(t *testing.T) {
			f := newFake()
			s := newTestServer(t, f, Config{})
			w := do(t, s.Handler(), c.method, c.path, c.body)
			if w.Code != c.status {
				t.Fatalf("status %d, want %d: %s", w.Code, c.status, w.Body)
			}
			eb := decodeErr(t, w)
			if eb.Field != c.field || !strings.Contains(eb.Error, c.msg) {
				t.Errorf("got %+v, want field %q and %q in the message", eb, c.field, c.msg)
			}
			if c.status == 400 && len(f.calls) != 0 {
				t.Errorf("invalid request reached the service: %v", f.calls)
			}
		})
	}
}

func TestOversizedBody(t *testing.T) {
	f := newFake()
	s := newTestServer(t, f, Config{MaxBodyBytes: 256})
	big := `{"name":"` + strings.Repeat("x", 1000) + `","size":1,"replicas":["n1"]}`
	// With Content-Length: refused before reading.
	w := do(t, s.Handler(), "POST", "/api/v1/volumes", big)
	if w.Code != http.StatusRequestEntityTooLarge {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
	decodeErr(t, w)
	// Without Content-Length (chunked): cut by MaxBytesReader while decoding.
	req := httptest.NewRequest("POST", "/api/v1/volumes", io.MultiReader(strings.NewReader(big)))
	req.ContentLength = -1
	w = httptest.NewRecorder()
	s.Handler().ServeHTTP(w, req)
	if w.Code != http.StatusRequestEntityTooLarge {
		t.Fatalf("chunked: status %d: %s", w.Code, w.Body)
	}
	decodeErr(t, w)
	if len(f.calls) != 0 {
		t.Errorf("oversized request reached the service: %v", f.calls)
	}
	// Just under the limit passes.
	ok := `{"name":"small","size":1,"replicas":["n1"]}`
	if w := do(t, s.Handler(), "POST", "/api/v1/volumes", ok); w.Code != 201 {
		t.Fatalf("small body: %d %s", w.Code, w.Body)
	}
}

// TestSecretsNeverReturned sets secrets through every input path and then
// reads every GET endpoint, checking no secret byte sequence comes back.
func TestSecretsNeverReturned(t *testing.T) {
	f := newFake()
	s := newTestServer(t, f, Config{})
	h := s.Handler()
	secrets := []string{"stored-secret-000", "create-secret-1", "create-mutual-1", "put-secret-222", "put-mutual-333"}
	steps := []struct{ method, path, body string }{
		{"POST", "/api/v1/targets", `{"iqn":"iqn.2026-01.io.hasan:s","chap":{"user":"u","secret":"create-secret-1"},"mutual_chap":{"user":"m","secret":"create-mutual-1"}}`},
		{"PUT", "/api/v1/targets/" + t1 + "/chap", `{"chap":{"user":"u2","secret":"put-secret-222"},"mutual_chap":{"user":"m2","secret":"put-mutual-333"}}`},
	}
	var bodies []string
	for _, st := range steps {
		w := do(t, h, st.method, st.path, st.body)
		if w.Code >= 300 {
			t.Fatalf("%s %s: %d %s", st.method, st.path, w.Code, w.Body)
		}
		bodies = append(bodies, w.Body.String())
	}
	for _, ep := range endpoints() {
		if ep.method == "GET" {
			bodies = append(bodies, do(t, h, "GET", ep.path, "").Body.String())
		}
	}
	bodies = append(bodies, do(t, h, "GET", "/api/v1/targets/iqn.2026-01.io.hasan:s", "").Body.String())
	// A failing CHAP update must not echo the secret either.
	f.err = fmt.Errorf("%w: chap.secret: 12 to 255 bytes", cluster.ErrInvalid)
	bodies = append(bodies, do(t, h, "PUT", "/api/v1/targets/"+t1+"/chap", `{"chap":{"user":"u","secret":"put-secret-222"}}`).Body.String())
	all := strings.Join(bodies, "\n")
	for _, sec := range secrets {
		if strings.Contains(all, sec) {
			t.Errorf("secret %q returned", sec)
		}
	}
	// The secrets were stored (the test would be vacuous otherwise).
	if got := f.st.Targets[t1].MutualCHAP; got == nil || got.Secret.Reveal() != "put-mutual-333" {
		t.Fatalf("mutual chap not stored: %+v", got)
	}
	if !strings.Contains(all, `"secret_set":true`) {
		t.Error("secret_set not reported")
	}
}

func TestHealthMetricsOpenAPI(t *testing.T) {
	f := newFake()
	s := newTestServer(t, f, Config{})
	h := s.Handler()
	if w := do(t, h, "GET", "/healthz", ""); w.Code != 200 || !strings.Contains(w.Body.String(), "ok") {
		t.Fatalf("healthz %d %s", w.Code, w.Body)
	}
	w := do(t, h, "GET", "/metrics", "")
	if w.Code != 200 {
		t.Fatalf("metrics %d", w.Code)
	}
	for _, want := range []string{
		`hasan_raft_state{state="Leader"} 1`, `hasan_raft_state{state="Follower"} 0`,
		`hasan_nodes{state="online"} 2`, `hasan_volumes 1`, `hasan_targets 1`,
		`hasan_groups{owner="n1"} 1`, `hasan_maintenance 0`, `hasan_status_up 1`,
	} {
		if !strings.Contains(w.Body.String(), want) {
			t.Errorf("metrics lack %q:\n%s", want, w.Body)
		}
	}
	f.err = errors.New("down")
	if w := do(t, h, "GET", "/metrics", ""); !strings.Contains(w.Body.String(), "hasan_status_up 0") {
		t.Errorf("failed status not reported:\n%s", w.Body)
	}
}

// TestOpenAPICoversRoutes checks the hand-written document against the
// router in both directions.
func TestOpenAPICoversRoutes(t *testing.T) {
	s := newTestServer(t, newFake(), Config{})
	w := do(t, s.Handler(), "GET", "/api/openapi.json", "")
	if w.Code != 200 {
		t.Fatalf("openapi %d", w.Code)
	}
	var doc struct {
		OpenAPI string                    `json:"openapi"`
		Paths   map[string]map[string]any `json:"paths"`
	}
	mustJSON(t, w.Body.String(), &doc)
	if !strings.HasPrefix(doc.OpenAPI, "3.") {
		t.Fatalf("openapi version %q", doc.OpenAPI)
	}
	param := regexp.MustCompile(`:([a-z]+)`)
	routes := map[string]bool{}
	for _, r := range s.gin.Routes() {
		key := strings.ToLower(r.Method) + " " + param.ReplaceAllString(r.Path, "{$1}")
		routes[key] = true
	}
	documented := map[string]bool{}
	for p, ops := range doc.Paths {
		for m := range ops {
			documented[m+" "+p] = true
		}
	}
	for r := range routes {
		if !documented[r] {
			t.Errorf("route %s not in openapi.json", r)
		}
	}
	for d := range documented {
		if !routes[d] {
			t.Errorf("openapi.json documents %s, which is not routed", d)
		}
	}
}

func TestRunAndShutdown(t *testing.T) {
	s := newTestServer(t, newFake(), Config{Addr: "127.0.0.1:0", ShutdownTimeout: time.Second})
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- s.Run(ctx) }()
	deadline := time.Now().Add(5 * time.Second)
	for s.Addr() == nil {
		if time.Now().After(deadline) {
			t.Fatal("server did not listen")
		}
		time.Sleep(5 * time.Millisecond)
	}
	resp, err := http.Get("http://" + s.Addr().String() + "/api/v1/nodes")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(b), `"n1"`) {
		t.Fatalf("%d %s", resp.StatusCode, b)
	}
	cancel()
	select {
	case err := <-errc:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
	if _, err := http.Get("http://" + s.Addr().String() + "/healthz"); err == nil {
		t.Error("server still answers after shutdown")
	}
	if err := s.Close(); err != nil {
		t.Errorf("Close after Run: %v", err)
	}
}

func TestConfigValidation(t *testing.T) {
	if _, err := New(Config{}, nil); err == nil {
		t.Error("nil service accepted")
	}
	if _, err := New(Config{ReadTimeout: -1}, newFake()); err == nil || !strings.Contains(err.Error(), "ReadTimeout") {
		t.Errorf("negative timeout: %v", err)
	}
}
