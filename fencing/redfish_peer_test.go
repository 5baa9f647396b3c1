package fencing

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"
)

// fenceRedfishConfig drives Debian fence-agents' fence_redfish against the
// double. fence_redfish cannot be given a CA file, only ssl_insecure.
func fenceRedfishConfig(p *rfPeer, pass string) ExternalConfig {
	return ExternalConfig{
		Program: "fence_redfish",
		Params: map[string]string{
			"ip": "127.0.0.1", "ipport": strconv.Itoa(p.port), "username": rfUser, "ssl_insecure": "1",
		},
		Secrets: map[string]Secret{"password": NewSecret(pass)},
	}
}

func TestExternalPeerFenceRedfish(t *testing.T) {
	needTools(t, "fence_redfish")
	p := startRedfishDouble(t)
	pid := p.powerOn(t)
	a, err := NewExternal(fenceRedfishConfig(p, rfPass))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := a.CheckMetadata(ctx); err != nil {
		t.Fatalf("metadata: %v", err)
	}
	if err := a.Monitor(ctx); err != nil {
		t.Fatalf("monitor: %v", err)
	}
	if st, err := a.Status(ctx); err != nil || st != PowerOn {
		t.Fatalf("status before fence: %v %v", st, err)
	}
	h := &MemoryHistory{}
	f := &Fencer{
		Devices: map[string]Device{"ext": {Agent: a, Timeout: 15 * time.Second, PollInterval: 200 * time.Millisecond}},
		Nodes:   map[string]NodeTopology{"n1": {Levels: [][]string{{"ext"}}}},
		History: h, Logger: quiet(),
	}
	res, err := f.Fence(ctx, "n1")
	if err != nil {
		t.Fatalf("%v\n%s", err, res.Summary())
	}
	if procAlive(pid) {
		t.Fatal("fence_redfish fence reported success but the node runs")
	}
	if r := p.d.Resets(); len(r) != 1 || r[0] != "ForceOff" {
		t.Fatalf("fence_redfish sent resets %v, want [ForceOff]", r)
	}
	t.Logf("fence_redfish off+confirm %v", res.Duration)

	// Wrong password: failure within the deadline, the password not echoed
	// in the error or the history.
	p.powerOn(t)
	bad, _ := NewExternal(fenceRedfishConfig(p, "wrong-rf-pw"))
	f.Devices["ext"] = Device{Agent: bad, Timeout: 8 * time.Second, PollInterval: 200 * time.Millisecond}
	start := time.Now()
	res, err = f.Fence(ctx, "n1")
	if err == nil || res.Fenced || !errors.Is(err, ErrFenceFailed) {
		t.Fatalf("wrong password fenced: %v", err)
	}
	recs, _ := h.List(ctx, "", 0)
	hist, _ := json.Marshal(recs)
	if time.Since(start) > 9*time.Second || strings.Contains(err.Error(), "wrong-rf-pw") || strings.Contains(string(hist), "wrong-rf-pw") {
		t.Fatalf("took %v or leaked: %v", time.Since(start), err)
	}
	if !procAlive(p.d.NodePID()) {
		t.Fatal("node died although the password was wrong")
	}

	// Acks ForceOff but stays on: fence_redfish's own wait and ours both
	// time out; never a success.
	p.d.SetFaults(RedfishFaults{Stuck: true})
	f.Devices["ext"] = Device{Agent: a, Timeout: 3 * time.Second, PollInterval: 200 * time.Millisecond}
	start = time.Now()
	res, err = f.Fence(ctx, "n1")
	if err == nil || res.Fenced || time.Since(start) > 4*time.Second {
		t.Fatalf("stuck BMC: fenced=%v after %v: %v", res.Fenced, time.Since(start), err)
	}
	t.Logf("stuck BMC via fence_redfish failed in %v: %v", time.Since(start).Round(time.Millisecond), err)
}
