package fencing

import (
	"context"
	"fmt"
	"os"
	"sort"
	"testing"
	"time"
)

// TestBenchFencePeers measures fence-plus-confirm (Off, then Status polled
// until off) per agent against its real peer, 20 runs each, and prints
// median and p99. Run by `make bench` through:
//
//	HASAN_FENCE_BENCH=1 go test -count=1 -run TestBenchFencePeers -v ./fencing/
func TestBenchFencePeers(t *testing.T) {
	if os.Getenv("HASAN_FENCE_BENCH") != "1" {
		t.Skip("set HASAN_FENCE_BENCH=1 to run the fencing benchmark against real peers")
	}
	const runs = 20
	ipmi := startIPMISim(t)
	ipmiAgent := ipmi.agent(t, simPass)
	snmp := startSNMPSim(t, ".1.3.6.1.4.1.318.1.3.4.5")
	apcAgent := snmp.agent(t, "2c", "", "1")
	rf := startRedfishDouble(t)
	rfAgent := rf.agent(t, rf.config(rfPass, "session"))
	rfBasic := rf.agent(t, rf.config(rfPass, "basic"))
	type bench struct {
		name  string
		agent func(t *testing.T) Agent
		on    Agent // restores power between runs, untimed
		poll  time.Duration
	}
	benches := []bench{
		{"ipmi (go-ipmi) vs ipmi_sim", func(*testing.T) Agent { return ipmiAgent }, ipmiAgent, 10 * time.Millisecond},
		{"apc-snmp (gosnmp v2c) vs snmpd", func(*testing.T) Agent { return apcAgent }, apcAgent, 10 * time.Millisecond},
		{"redfish (gofish, session) vs double", func(*testing.T) Agent { return rfAgent }, rfAgent, 10 * time.Millisecond},
		{"redfish (gofish, basic) vs double", func(*testing.T) Agent { return rfBasic }, rfAgent, 10 * time.Millisecond},
		{"external fence_ipmilan vs ipmi_sim", func(t *testing.T) Agent {
			needTools(t, "fence_ipmilan")
			a, err := NewExternal(ipmilanConfig(ipmi, simPass))
			if err != nil {
				t.Fatal(err)
			}
			return a
		}, ipmiAgent, 100 * time.Millisecond},
		{"external fence_apc_snmp vs snmpd", func(t *testing.T) Agent {
			needTools(t, "fence_apc_snmp")
			a, err := NewExternal(ExternalConfig{Program: "fence_apc_snmp",
				Params:  map[string]string{"ip": "127.0.0.1", "ipport": fmt.Sprint(snmp.port), "snmp_version": "2c", "plug": "1"},
				Secrets: map[string]Secret{"community": NewSecret(snmpRW)}})
			if err != nil {
				t.Fatal(err)
			}
			return a
		}, apcAgent, 100 * time.Millisecond},
	}
	benches = append(benches, bench{"external fence_redfish vs double", func(t *testing.T) Agent {
		needTools(t, "fence_redfish")
		a, err := NewExternal(fenceRedfishConfig(rf, rfPass))
		if err != nil {
			t.Fatal(err)
		}
		return a
	}, rfAgent, 100 * time.Millisecond})
	var report []string
	for _, b := range benches {
		a := b.agent(t)
		var ds []time.Duration
		for i := 0; i < runs; i++ {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			if err := OnAndConfirm(ctx, b.on, 10*time.Millisecond); err != nil {
				cancel()
				t.Fatalf("%s: power on before run %d: %v", b.name, i, err)
			}
			start := time.Now()
			err := OffAndConfirm(ctx, a, b.poll)
			ds = append(ds, time.Since(start))
			cancel()
			if err != nil {
				t.Fatalf("%s run %d: %v", b.name, i, err)
			}
		}
		sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
		med := ds[len(ds)/2]
		p99 := ds[(len(ds)*99+99)/100-1]
		report = append(report, fmt.Sprintf("fence+confirm %-36s n=%d median=%v p99=%v", b.name, runs, med.Round(100*time.Microsecond), p99.Round(100*time.Microsecond)))
	}
	for _, r := range report {
		fmt.Println(r)
	}
}
