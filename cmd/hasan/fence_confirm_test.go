package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/bench/failover/initiator"
	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/fencing"
)

// TestServeManualFenceConfirm runs the manual-fencing path end to end with
// serve's wiring in one process: the owner's only fence device is manual,
// the owner crashes, and nothing moves until an operator confirms through
// the REST API; a confirmation given while the owner was still beating
// does not count. Then the takeover happens, the fence history names who
// confirmed and when, and every acknowledged write is served.
func TestServeManualFenceConfirm(t *testing.T) {
	if testing.Short() {
		t.Skip("starts three nodes")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	sc := newServeCluster(ctx, t)
	cfgs, servers, n1 := sc.cfgs, sc.servers, sc.n1
	api := "http://" + cfgs[0].APIListen // n1: the Raft leader, not the owner
	waitFor(t, 5*time.Second, "n1's REST API", func() bool {
		resp, err := http.Get(api + "/api/v1/cluster")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	post := func(path, body string) (int, string) {
		t.Helper()
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, api+path, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}

	const (
		uuid  = "7a1f0a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5c"
		iqn   = "iqn.2026-11.io.hasan:manual-fence"
		size  = 8 << 20
		owner = "n2"
		heir  = "n1"
	)
	manual, err := json.Marshal(fencing.DeviceConfig{Type: "manual", Manual: &fencing.ManualConfig{Node: owner},
		PollInterval: fencing.Duration(50 * time.Millisecond)})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []*cluster.Command{
		{Kind: cluster.KindVolumeCreate, VolumeCreate: &cluster.VolumeCreateCmd{UUID: uuid, Name: "v", Size: size, Primary: owner, Replicas: []string{heir, owner}}},
		{Kind: cluster.KindTargetPut, TargetPut: &cluster.TargetPutCmd{Target: cluster.Target{IQN: iqn, LUNs: map[uint64]string{0: uuid}}}},
		{Kind: cluster.KindGroupPut, GroupPut: &cluster.GroupPutCmd{Group: cluster.Group{Name: "g", VIPs: []string{"127.0.0.1/32"}, Targets: []string{iqn}, Preferred: []string{owner}}}},
		{Kind: cluster.KindFenceDevicePut, FenceDevicePut: &cluster.FenceDevicePutCmd{Name: "hand-" + owner, Config: manual}},
		{Kind: cluster.KindNodeSetFence, NodeSetFence: &cluster.NodeSetFenceCmd{ID: owner, Topology: fencing.NodeTopology{Levels: [][]string{{"hand-" + owner}}}}},
	} {
		if _, err := n1.Propose(ctx, c); err != nil {
			t.Fatalf("%v: %v", c.Kind, err)
		}
	}
	group := func() cluster.Group { return *n1.FSM().State().Groups["g"] }
	waitFor(t, 15*time.Second, "the controller to place g on "+owner, func() bool { return group().Owner == owner })
	login := func(id string) (*initiator.Session, error) {
		lctx, lcancel := context.WithTimeout(ctx, 3*time.Second)
		defer lcancel()
		return initiator.Login(lctx, initiator.Config{Portal: servers[id].portal.String(), Target: iqn})
	}
	var s *initiator.Session
	relogin := func() {
		t.Helper()
		if s != nil {
			s.Close()
		}
		waitFor(t, 10*time.Second, owner+" to serve the LUN", func() bool {
			var err error
			if s, err = login(owner); err != nil {
				return false
			}
			if _, err = s.ClearUnitAttention(ctx); err != nil {
				s.Close()
				return false
			}
			return true
		})
	}
	relogin()
	// Acknowledged writes (FUA) the heir must serve after the takeover. A
	// write that fails is retried on a new session, as an initiator would;
	// only acknowledged writes are recorded. (On a loaded host the owner can
	// drop its sessions, for example when its Raft lease lapses.)
	acked := map[uint32][]byte{}
	for i := range 16 {
		lba := uint32(8 + 8*i)
		blk := bytes.Repeat([]byte(fmt.Sprintf("%-15s\n", fmt.Sprintf("acked-%d", i))), 32)
		for try := 1; ; try++ {
			err := s.Write10(ctx, lba, blk, 512, true)
			if err == nil {
				break
			}
			if try == 5 {
				t.Fatalf("write LBA %d via %s: %v", lba, owner, err)
			}
			t.Logf("write LBA %d via %s failed (%v); logging in again", lba, owner, err)
			relogin()
		}
		acked[lba] = blk
	}
	waitFor(t, 30*time.Second, heir+" in sync and in the ISR", func() bool {
		return slices.Contains(n1.FSM().State().Volumes[uuid].ISR, heir) && inSync(ctx, servers[owner], uuid, heir)
	})

	// While the owner beats, the API refuses a confirmation outright (409),
	// and never takes one without the explicit acknowledgement (400).
	if code, b := post("/api/v1/nodes/"+owner+"/fence-confirm", `{"operator":"alice"}`); code != http.StatusBadRequest || !strings.Contains(b, "verified_off") {
		t.Fatalf("confirmation without verified_off: %d %s", code, b)
	}
	waitFor(t, 5*time.Second, "a fresh heartbeat of "+owner, func() bool { return time.Since(n1.LastSeen()[owner]) < 300*time.Millisecond })
	if code, b := post("/api/v1/nodes/"+owner+"/fence-confirm", `{"operator":"alice","verified_off":true}`); code != http.StatusConflict || !strings.Contains(b, "heartbeat") {
		t.Fatalf("confirmation of a node still beating: %d %s", code, b)
	}
	// A premature confirmation committed directly (cluster.Node.ConfirmFence,
	// bypassing the API's check) while the owner still beats: it must not
	// count once the owner fails, because it is older than its last beat.
	if err := n1.ConfirmFence(ctx, owner, "mallory"); err != nil {
		t.Fatal(err)
	}
	premature := n1.FSM().State().FenceConfirms[owner].At
	waitFor(t, 5*time.Second, "a heartbeat of "+owner+" after the premature confirmation", func() bool {
		return n1.LastSeen()[owner].After(premature)
	})

	// The owner crashes: Raft, portal and replicas stop; nothing released.
	s.Close()
	cs := servers[owner]
	servers[owner] = nil
	tCrash := time.Now()
	cs.cancel()
	_ = cs.node.Close()
	cs.tsrv.Close()
	_ = cs.reps.CloseAll(context.Background())
	cs.rsrv.Close()
	cs.admin.Close()
	cs.agentWG.Wait()
	cs.wg.Wait()
	cs.srvWG.Wait()

	events := func(kind, node string) []cluster.Event {
		var out []cluster.Event
		for _, e := range n1.FSM().State().Events {
			if e.Kind == kind && e.Node == node {
				out = append(out, e)
			}
		}
		return out
	}
	// Nothing moves while unconfirmed (the premature confirmation is in the
	// state all along): no takeover, no successful fence, for a while; and
	// the event log says the takeover waits for an operator.
	hold := 3 * time.Second
	for end := time.Now().Add(hold); time.Now().Before(end) || len(events("fence-manual-wait", owner)) == 0; time.Sleep(100 * time.Millisecond) {
		if time.Since(tCrash) > hold+10*time.Second {
			t.Fatal("no alert that the takeover waits for a manual confirmation")
		}
		st := n1.FSM().State()
		if g := st.Groups["g"]; g.Owner != owner || st.Nodes[owner].State == cluster.NodeFenced {
			t.Fatalf("moved without a valid confirmation: owner %q, %s is %s", g.Owner, owner, st.Nodes[owner].State)
		}
		for _, r := range st.FenceHistory {
			if r.Node == owner && r.Outcome == fencing.OutcomeSuccess {
				t.Fatalf("fence of %s succeeded on the premature confirmation: %+v", owner, r)
			}
		}
		if len(events("takeover", heir)) > 0 {
			t.Fatal("takeover event without a valid confirmation")
		}
	}
	wait := events("fence-manual-wait", owner)[0]
	if wait.Severity != cluster.SeverityAlert || !strings.Contains(wait.Message, "hasan fence confirm "+owner) {
		t.Fatalf("manual-wait event %+v", wait)
	}
	t.Logf("manual-wait alert %v after the crash: %s", wait.Time.Sub(tCrash).Round(time.Millisecond), wait.Message)
	if ss, err := login(heir); err == nil {
		ss.Close()
		t.Fatalf("%s serves the LUN before the fence was confirmed", heir)
	}
	if got := n1.FSM().State().FenceConfirms[owner]; got.By != "mallory" {
		t.Fatalf("the premature confirmation vanished: %+v", got)
	}

	// The operator checked the power: confirm through the CLI, which goes
	// over the REST API of n1 (a real webui server on loopback).
	tConfirm := time.Now()
	out, _, err := runHasan(t, "", "--api", api, "fence", "confirm", owner, "--by", "alice", "--yes-i-verified-it-is-off")
	if err != nil {
		t.Fatalf("hasan fence confirm: %v\n%s", err, out)
	}
	for _, want := range []string{"CORRUPTS DATA", "At stake: " + owner + " owns group(s) g", "alice confirmed that " + owner + " is powered off"} {
		if !strings.Contains(out, want) {
			t.Fatalf("hasan fence confirm output lacks %q:\n%s", want, out)
		}
	}
	var s2 *initiator.Session
	waitFor(t, 20*time.Second, heir+" to take over and serve", func() bool {
		if group().Owner != heir {
			return false
		}
		var err error
		s2, err = login(heir)
		return err == nil
	})
	defer s2.Close()
	t.Logf("takeover: LUN served on %s %v after the confirmation (%v after the crash)", heir,
		time.Since(tConfirm).Round(time.Millisecond), time.Since(tCrash).Round(time.Millisecond))

	st := n1.FSM().State()
	if st.Nodes[owner].State != cluster.NodeFenced || slices.Contains(st.Volumes[uuid].ISR, owner) {
		t.Fatalf("after takeover: %s is %s, ISR %v", owner, st.Nodes[owner].State, st.Volumes[uuid].ISR)
	}
	if _, ok := st.FenceConfirms[owner]; ok {
		t.Fatal("the takeover did not use up the confirmation")
	}
	// The history, as the REST API returns it, names who confirmed and when.
	resp, err := http.Get(api + "/api/v1/fence-history?node=" + owner)
	if err != nil {
		t.Fatal(err)
	}
	var recs []fencing.Record
	err = json.NewDecoder(resp.Body).Decode(&recs)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(recs, func(r fencing.Record) bool { return r.Outcome == fencing.OutcomeSuccess })
	if i < 0 {
		t.Fatalf("no successful fence of %s in the history: %+v", owner, recs)
	}
	r := recs[i]
	if r.Device != "hand-"+owner || r.Action != "off" || r.ConfirmedBy != "alice" ||
		r.ConfirmedAt.Before(tConfirm.Add(-time.Second)) || r.ConfirmedAt.After(time.Now()) {
		t.Fatalf("history record %+v (confirmed at %v)", r, tConfirm)
	}
	if ev := events("fence-confirmed", owner); len(ev) != 2 || !strings.Contains(ev[1].Message, "alice") {
		t.Fatalf("confirmation events %+v", ev)
	}
	t.Logf("history: %s off via %s, confirmed by %s at %s", r.Node, r.Device, r.ConfirmedBy, r.ConfirmedAt.Format(time.RFC3339Nano))

	if _, err := s2.ClearUnitAttention(ctx); err != nil {
		t.Fatal(err)
	}
	for lba, want := range acked {
		got, err := s2.Read10(ctx, lba, 1, 512)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("LBA %d: acknowledged write lost across the takeover (read %.15q): %v", lba, got, err)
		}
	}
	if os.Getenv("HASAN_TEST_LOG") != "" {
		t.Logf("confirm output:\n%s", out)
	}
}
