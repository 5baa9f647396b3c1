package cluster

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/fencing"
)

// TestManualFenceWaitsForConfirmation: a manual fence device reads off
// only once an operator confirmation newer than the node's last heartbeat
// is in the state; a takeover consumes the confirmation.
func TestManualFenceWaitsForConfirmation(t *testing.T) {
	ctx := context.Background()
	loc := NewLocal(nil)
	cfg, err := json.Marshal(fencing.DeviceConfig{Type: "manual", Manual: &fencing.ManualConfig{Node: "rack1-a"},
		Timeout: fencing.Duration(300 * time.Millisecond), PollInterval: fencing.Duration(10 * time.Millisecond)})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range append(fixtureCommands(), cDevice("hand-a", string(cfg)), cSetFence("a", []string{"hand-a"})) {
		if _, err := loc.Propose(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	var lastSeen time.Time
	fence := func() error {
		f, err := BuildClusterFencer(loc.FSM.State(), loc.FSM, &FenceHistory{P: loc, FSM: loc.FSM}, nil, time.Now,
			func(string) time.Time { return lastSeen })
		if err != nil {
			t.Fatal(err)
		}
		fctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		_, err = f.Fence(fctx, "a")
		return err
	}
	lastSeen = time.Now()
	detected := time.Now()
	if err := fence(); err == nil {
		t.Fatal("manual fence confirmed without an operator")
	}
	// A confirmation older than the node's last heartbeat does not count.
	if _, err := loc.Propose(ctx, cFenceConfirm("a", "alice")); err != nil {
		t.Fatal(err)
	}
	lastSeen = time.Now().Add(time.Millisecond)
	if err := fence(); err == nil {
		t.Fatal("a confirmation older than the last heartbeat was accepted")
	}
	time.Sleep(2 * time.Millisecond)
	if _, err := loc.Propose(ctx, cFenceConfirm("a", "alice")); err != nil {
		t.Fatal(err)
	}
	confirmedAt := loc.FSM.State().FenceConfirms["a"].At
	if err := fence(); err != nil {
		t.Fatalf("confirmed manual fence: %v", err)
	}
	// The history says who confirmed and when; the unconfirmed attempts
	// left an alert naming what the operator must do.
	st := loc.FSM.State()
	last := st.FenceHistory[len(st.FenceHistory)-1]
	if last.Outcome != fencing.OutcomeSuccess || last.ConfirmedBy != "alice" || !last.ConfirmedAt.Equal(confirmedAt) {
		t.Fatalf("history record of the confirmed fence: %+v (confirmation at %v)", last, confirmedAt)
	}
	waits := 0
	for _, e := range st.Events {
		if e.Kind == "fence-manual-wait" && e.Node == "a" && e.Severity == SeverityAlert {
			waits++
		}
	}
	if waits != 2 {
		t.Fatalf("%d manual-wait alerts for the two unconfirmed attempts, want 2: %+v", waits, st.Events)
	}
	// The history now allows the takeover, which consumes the
	// confirmation: the next incident needs a new one.
	if _, err := loc.Propose(ctx, cTakeover("g1", "a", "b", detected)); err != nil {
		t.Fatal(err)
	}
	if _, ok := loc.FSM.State().FenceConfirms["a"]; ok {
		t.Fatal("the takeover did not consume the confirmation")
	}
}
