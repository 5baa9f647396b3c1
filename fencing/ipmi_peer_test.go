package fencing

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestIPMIPeerFenceKillsNode(t *testing.T) {
	sim := startIPMISim(t)
	a := sim.agent(t, simPass)
	pid := sim.powerOnNode(t, a)

	h := &MemoryHistory{}
	f := &Fencer{
		Devices: map[string]Device{"bmc": {Agent: a, Timeout: 5 * time.Second, PollInterval: 20 * time.Millisecond}},
		Nodes:   map[string]NodeTopology{"n1": {Levels: [][]string{{"bmc"}}}},
		History: h,
	}
	res, err := f.Fence(context.Background(), "n1")
	if err != nil || !res.Fenced {
		t.Fatalf("fence: %v\n%s", err, res.Summary())
	}
	if procAlive(pid) {
		t.Fatalf("fence reported success but node process %d still runs", pid)
	}
	recs, _ := h.List(context.Background(), "n1", 0)
	if len(recs) != 1 || recs[0].Outcome != OutcomeSuccess || recs[0].Device != "bmc" {
		t.Fatalf("history: %+v", recs)
	}
	t.Logf("ipmi fence+confirm: %v", res.Duration)
}

func TestIPMIPeerReboot(t *testing.T) {
	sim := startIPMISim(t)
	a := sim.agent(t, simPass)
	pid := sim.powerOnNode(t, a)
	f := &Fencer{
		Devices: map[string]Device{"bmc": {Agent: a, Timeout: 5 * time.Second, PollInterval: 20 * time.Millisecond}},
		Nodes:   map[string]NodeTopology{"n1": {Action: ActionReboot, Levels: [][]string{{"bmc"}}}},
	}
	res, err := f.Fence(context.Background(), "n1")
	if err != nil {
		t.Fatalf("reboot: %v", err)
	}
	if procAlive(pid) {
		t.Fatalf("old node process %d survived the reboot", pid)
	}
	np := sim.nodePID()
	if np == pid || !procAlive(np) {
		t.Fatalf("no new node process after reboot (old %d new %d)\n%s", pid, np, res.Summary())
	}
	if len(res.Attempts) != 2 || res.Attempts[0].Action != "off" || res.Attempts[1].Action != "on" {
		t.Fatalf("attempts: %s", res.Summary())
	}
}

func TestIPMIPeerLateSwitchIsWaitedFor(t *testing.T) {
	sim := startIPMISim(t)
	a := sim.agent(t, simPass)
	pid := sim.powerOnNode(t, a)
	sim.fault("late", true)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	if err := OffAndConfirm(ctx, a, 20*time.Millisecond); err != nil {
		t.Fatalf("late off: %v", err)
	}
	if procAlive(pid) {
		t.Fatal("confirmed off but node alive")
	}
	if d := time.Since(start); d < 400*time.Millisecond {
		t.Fatalf("confirmed after %v, before the device switched (0.5s)", d)
	}
}

func TestIPMIPeerNegative(t *testing.T) {
	sim := startIPMISim(t)
	good := sim.agent(t, simPass)
	pid := sim.powerOnNode(t, good)
	// The unreadable-status case must run last: its off really kills the node.

	cases := []struct {
		name   string
		agent  func() Agent
		fault  string
		marker error
		// nodeDies: the device did switch off, but the fence must still
		// fail because status could not prove it.
		nodeDies bool
	}{
		{"wrong password", func() Agent { return sim.agent(t, "wrong-password") }, "", ErrAuth, false},
		{"unreachable", func() Agent {
			c := sim.config(simPass)
			c.Port = freeUDPPort(t) // nothing listens there
			a, _ := NewIPMI(c)
			return a
		}, "", ErrUnreachable, false},
		{"acks but never switches", func() Agent { return good }, "stuck", ErrNotConfirmed, false},
		{"status unreadable", func() Agent { return good }, "status", ErrStatusUnreadable, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.fault != "" {
				sim.fault(tc.fault, true)
				defer sim.fault(tc.fault, false)
			}
			const deadline = 2 * time.Second
			f := &Fencer{
				Devices: map[string]Device{"bmc": {Agent: tc.agent(), Timeout: deadline, PollInterval: 50 * time.Millisecond}},
				Nodes:   map[string]NodeTopology{"n1": {Levels: [][]string{{"bmc"}}}},
			}
			start := time.Now()
			res, err := f.Fence(context.Background(), "n1")
			took := time.Since(start)
			if err == nil || res.Fenced {
				t.Fatalf("fence succeeded: %s", res.Summary())
			}
			if !errors.Is(err, ErrFenceFailed) || !errors.Is(err, tc.marker) {
				t.Fatalf("error %v: want ErrFenceFailed and %v", err, tc.marker)
			}
			if took > deadline+time.Second {
				t.Fatalf("failure took %v, deadline %v", took, deadline)
			}
			if strings.Contains(err.Error(), simPass) || strings.Contains(err.Error(), "wrong-password") {
				t.Fatalf("error leaks password: %v", err)
			}
			if !tc.nodeDies && !procAlive(pid) {
				t.Fatal("node died although the fence failed: the fault did not hold")
			}
			t.Logf("failed in %v: %v", took.Round(time.Millisecond), err)
		})
	}
}
