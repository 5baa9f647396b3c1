package fencing

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"
)

func ipmilanConfig(sim *ipmiSim, pass string) ExternalConfig {
	return ExternalConfig{
		Program: "fence_ipmilan",
		Params: map[string]string{
			"ip": "127.0.0.1", "ipport": strconv.Itoa(sim.port), "username": simUser,
			"lanplus": "1", "cipher": "3", "privlvl": "administrator",
		},
		Secrets: map[string]Secret{"password": NewSecret(pass)},
	}
}

func TestExternalPeerFenceIPMILan(t *testing.T) {
	needTools(t, "fence_ipmilan", "ipmitool")
	sim := startIPMISim(t)
	pid := sim.powerOnNode(t, sim.agent(t, simPass))
	a, err := NewExternal(ipmilanConfig(sim, simPass))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := a.CheckMetadata(ctx); err != nil {
		t.Fatalf("metadata: %v", err)
	}
	f := &Fencer{
		Devices: map[string]Device{"ext": {Agent: a, Timeout: 15 * time.Second, PollInterval: 200 * time.Millisecond}},
		Nodes:   map[string]NodeTopology{"n1": {Levels: [][]string{{"ext"}}}},
		Logger:  quiet(),
	}
	res, err := f.Fence(ctx, "n1")
	if err != nil {
		t.Fatalf("%v\n%s", err, res.Summary())
	}
	if procAlive(pid) {
		t.Fatal("fence_ipmilan fence reported success but the node runs")
	}
	t.Logf("fence_ipmilan off+confirm %v", res.Duration)

	// Wrong password: failure, within the deadline, password not echoed.
	bad, _ := NewExternal(ipmilanConfig(sim, "wrong-password-x"))
	sim.powerOnNode(t, sim.agent(t, simPass))
	f.Devices["ext"] = Device{Agent: bad, Timeout: 8 * time.Second, PollInterval: 200 * time.Millisecond}
	start := time.Now()
	res, err = f.Fence(ctx, "n1")
	if err == nil || res.Fenced || !errors.Is(err, ErrFenceFailed) {
		t.Fatalf("wrong password fenced: %v", err)
	}
	if time.Since(start) > 9*time.Second || strings.Contains(err.Error(), "wrong-password-x") {
		t.Fatalf("took %v or leaked: %v", time.Since(start), err)
	}

	// A typo in a parameter is caught from the agent's metadata.
	typo := ipmilanConfig(sim, simPass)
	typo.Params["ipprot"] = "623"
	ta, _ := NewExternal(typo)
	if err := ta.CheckMetadata(ctx); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "ipprot") {
		t.Fatalf("typo not caught: %v", err)
	}
}

func TestExternalPeerFenceAPCSNMP(t *testing.T) {
	needTools(t, "fence_apc_snmp")
	sim := startSNMPSim(t, ".1.3.6.1.4.1.318.1.3.4.5")
	pid := sim.outlet(2).PID
	a, err := NewExternal(ExternalConfig{
		Program: "fence_apc_snmp",
		Params:  map[string]string{"ip": "127.0.0.1", "ipport": strconv.Itoa(sim.port), "snmp_version": "2c", "plug": "db1-psu-b"},
		Secrets: map[string]Secret{"community": NewSecret(snmpRW)},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := a.CheckMetadata(ctx); err != nil {
		t.Fatalf("metadata: %v", err)
	}
	plugs, err := a.List(ctx)
	if err != nil || len(plugs) != 4 {
		t.Fatalf("list: %v %+v", err, plugs)
	}
	f := &Fencer{
		Devices: map[string]Device{"ext": {Agent: a, Timeout: 15 * time.Second, PollInterval: 200 * time.Millisecond}},
		Nodes:   map[string]NodeTopology{"db1": {Levels: [][]string{{"ext"}}}},
		Logger:  quiet(),
	}
	res, err := f.Fence(ctx, "db1")
	if err != nil {
		t.Fatalf("%v\n%s", err, res.Summary())
	}
	if procAlive(pid) || sim.outlet(2).State != 2 {
		t.Fatal("fence_apc_snmp reported success but the outlet's node runs")
	}
	t.Logf("fence_apc_snmp off+confirm %v", res.Duration)
}
