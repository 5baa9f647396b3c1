package fencing

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestAPCPeerFenceKillsNode(t *testing.T) {
	sim := startSNMPSim(t, ".1.3.6.1.4.1.318.1.3.4.5") // rPDU
	for _, tc := range []struct {
		name, version, mib string
		outlet             string
		n                  int
	}{
		{"v1 spdu by number", "1", "spdu", "1", 1},
		{"v2c rpdu by name", "2c", "rpdu", "db1-psu-b", 2},
		{"v3 auto(rpdu) by name", "3", "", "db2-psu-a", 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := sim.agent(t, tc.version, tc.mib, tc.outlet)
			pid := sim.outlet(tc.n).PID
			if !procAlive(pid) {
				t.Fatalf("outlet %d node %d not running before the fence", tc.n, pid)
			}
			f := &Fencer{
				Devices: map[string]Device{"pdu": {Agent: a, Timeout: 3 * time.Second, PollInterval: 20 * time.Millisecond}},
				Nodes:   map[string]NodeTopology{"db": {Levels: [][]string{{"pdu"}}}},
				Logger:  quiet(),
			}
			res, err := f.Fence(context.Background(), "db")
			if err != nil {
				t.Fatalf("%v\n%s", err, res.Summary())
			}
			if procAlive(pid) || sim.outlet(tc.n).State != 2 {
				t.Fatalf("fence succeeded but outlet %d node %d still powered", tc.n, pid)
			}
			for _, o := range sim.state() {
				if o.N != tc.n && o.N > 3 && o.State != 1 {
					t.Fatalf("outlet %d switched although not configured", o.N)
				}
			}
			t.Logf("off+confirm %v", res.Duration)
		})
	}
	plugs, err := sim.agent(t, "2c", "", "1").List(context.Background())
	if err != nil || len(plugs) != 4 || plugs[1].Alias != "db1-psu-b" {
		t.Fatalf("list: %v %+v", err, plugs)
	}
}

func TestAPCPeerTwoPSURebootAndLateSwitch(t *testing.T) {
	sim := startSNMPSim(t, ".1.3.6.1.4.1.318.1.3.4.5")
	sim.setFaults(apcFaults{LateMS: 300})
	// One device with both outlets, and the same two outlets as two devices
	// in one level: both must end with every outlet off before any is on.
	a := sim.agent(t, "2c", "", "db1-psu-a", "db1-psu-b")
	p1, p2 := sim.outlet(1).PID, sim.outlet(2).PID
	f := &Fencer{
		Devices: map[string]Device{"pdu": {Agent: a, Timeout: 3 * time.Second, PollInterval: 20 * time.Millisecond}},
		Nodes:   map[string]NodeTopology{"db1": {Action: ActionReboot, Levels: [][]string{{"pdu"}}}},
		Logger:  quiet(),
	}
	start := time.Now()
	res, err := f.Fence(context.Background(), "db1")
	if err != nil {
		t.Fatalf("%v\n%s", err, res.Summary())
	}
	if off := res.Attempts[0].Duration; off < 250*time.Millisecond {
		t.Fatalf("off confirmed after %v, before the late (300ms) switch", off)
	}
	if procAlive(p1) || procAlive(p2) {
		t.Fatal("a PSU node survived the reboot's off phase")
	}
	o1, o2 := sim.outlet(1), sim.outlet(2)
	if o1.State != 1 || o2.State != 1 || !procAlive(o1.PID) || !procAlive(o2.PID) {
		t.Fatalf("reboot did not power the outlets back: %+v %+v", o1, o2)
	}
	t.Logf("two-PSU reboot %v", time.Since(start))
}

func TestAPCPeerNegative(t *testing.T) {
	sim := startSNMPSim(t, ".1.3.6.1.4.1.318.1.3.4.5")
	bad := func(mut func(*APCConfig)) func() Agent {
		return func() Agent {
			c := sim.config("3", "", "db2-psu-a")
			mut(&c)
			a, err := NewAPCSNMP(c)
			if err != nil {
				t.Fatal(err)
			}
			return a
		}
	}
	cases := []struct {
		name     string
		devs     map[string]func() Agent
		faults   apcFaults
		marker   error
		survivor int // outlet whose node must still run
	}{
		{"wrong v3 password", map[string]func() Agent{"a": bad(func(c *APCConfig) { c.AuthPass = NewSecret("wrong-auth-pass") })}, apcFaults{}, ErrAuth, 3},
		{"wrong community", map[string]func() Agent{"a": bad(func(c *APCConfig) {
			c.Version, c.User, c.AuthPass, c.PrivPass, c.Community = "2c", "", Secret{}, Secret{}, NewSecret("wrong-community")
		})}, apcFaults{}, ErrUnreachable, 3},
		{"unreachable", map[string]func() Agent{"a": bad(func(c *APCConfig) { c.Port = freeUDPPort(t) })}, apcFaults{}, ErrUnreachable, 3},
		{"acks but never switches", map[string]func() Agent{"a": bad(func(*APCConfig) {})}, apcFaults{Stuck: []int{3}}, ErrNotConfirmed, 3},
		{"one of two PSU outlets fails", map[string]func() Agent{
			"a": bad(func(*APCConfig) {}),
			"b": bad(func(c *APCConfig) { c.Outlets = []string{"db2-psu-b"} }),
		}, apcFaults{Stuck: []int{4}}, ErrNotConfirmed, 4},
		{"status unreadable", map[string]func() Agent{"a": bad(func(*APCConfig) {})}, apcFaults{StatusFail: true}, ErrStatusUnreadable, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sim.setFaults(tc.faults)
			defer sim.setFaults(apcFaults{})
			const deadline = 1500 * time.Millisecond
			f := &Fencer{Devices: map[string]Device{}, Nodes: map[string]NodeTopology{}, Logger: quiet()}
			var lvl []string
			for n, mk := range tc.devs {
				f.Devices[n] = Device{Agent: mk(), Timeout: deadline, PollInterval: 50 * time.Millisecond}
				lvl = append(lvl, n)
			}
			f.Nodes["db2"] = NodeTopology{Action: ActionReboot, Levels: [][]string{lvl}}
			var survivorPID int
			if tc.survivor > 0 {
				survivorPID = sim.outlet(tc.survivor).PID
			}
			start := time.Now()
			res, err := f.Fence(context.Background(), "db2")
			took := time.Since(start)
			if err == nil || res.Fenced {
				t.Fatalf("fence succeeded: %s", res.Summary())
			}
			if !errors.Is(err, ErrFenceFailed) || !errors.Is(err, tc.marker) {
				t.Fatalf("err %v: want %v", err, tc.marker)
			}
			if took > deadline+time.Second {
				t.Fatalf("took %v, deadline %v", took, deadline)
			}
			for _, s := range []string{snmpRW, snmpV3Auth, snmpV3Priv, "wrong-auth-pass", "wrong-community"} {
				if strings.Contains(err.Error(), s) {
					t.Fatalf("error leaks a secret: %v", err)
				}
			}
			if survivorPID > 0 && !procAlive(survivorPID) {
				t.Fatal("the outlet that failed did lose power: fault did not hold")
			}
			for _, a := range res.Attempts {
				if a.Action == "on" {
					t.Fatalf("power on attempted although off was not confirmed on every outlet: %s", res.Summary())
				}
			}
			t.Logf("failed in %v: %v", took.Round(time.Millisecond), err)
		})
	}
}
