package fencing

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func fencerWith(levels [][]string, devs map[string]Agent) (*Fencer, *MemoryHistory) {
	h := &MemoryHistory{}
	f := &Fencer{Devices: map[string]Device{}, Nodes: map[string]NodeTopology{"n1": {Levels: levels}}, History: h, Logger: quiet()}
	for n, a := range devs {
		f.Devices[n] = Device{Agent: a, Timeout: 300 * time.Millisecond, PollInterval: 10 * time.Millisecond}
	}
	return f, h
}

func TestCommandSuccessIsNotConfirmation(t *testing.T) {
	a := NewFakeAgent()
	a.IgnoreOff = true
	f, h := fencerWith([][]string{{"d"}}, map[string]Agent{"d": a})
	res, err := f.Fence(context.Background(), "n1")
	if err == nil || res.Fenced || !errors.Is(err, ErrNotConfirmed) {
		t.Fatalf("fence of a device that ignores off: fenced=%v err=%v", res.Fenced, err)
	}
	recs, _ := h.List(context.Background(), "", 0)
	if len(recs) != 1 || recs[0].Outcome != OutcomeFailure || recs[0].Error == "" || recs[0].Level != 1 {
		t.Fatalf("history %+v", recs)
	}
}

func TestLateSwitchIsConfirmedByPolling(t *testing.T) {
	a := NewFakeAgent()
	a.OffDelay = 80 * time.Millisecond
	f, _ := fencerWith([][]string{{"d"}}, map[string]Agent{"d": a})
	start := time.Now()
	if _, err := f.Fence(context.Background(), "n1"); err != nil {
		t.Fatal(err)
	}
	if time.Since(start) < 80*time.Millisecond {
		t.Fatal("confirmed before the device switched")
	}
	var statuses int
	for _, c := range a.Calls() {
		if c == "status" {
			statuses++
		}
	}
	if statuses < 2 {
		t.Fatalf("calls %v: want several status polls", a.Calls())
	}
}

func TestUnreadableStatusFails(t *testing.T) {
	a := NewFakeAgent()
	a.StatusErr = errors.New("snmp: no such instance")
	f, _ := fencerWith([][]string{{"d"}}, map[string]Agent{"d": a})
	_, err := f.Fence(context.Background(), "n1")
	if !errors.Is(err, ErrStatusUnreadable) || !errors.Is(err, ErrFenceFailed) {
		t.Fatalf("err %v", err)
	}
	if a.Power() != PowerOff {
		t.Fatal("fake did switch off; the failure must come from the unreadable status alone")
	}
}

func TestHangingDeviceFailsWithinDeadline(t *testing.T) {
	a := NewFakeAgent()
	a.Hang = true
	f, _ := fencerWith([][]string{{"d"}}, map[string]Agent{"d": a})
	start := time.Now()
	_, err := f.Fence(context.Background(), "n1")
	if err == nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("took %v with a 300ms device timeout", d)
	}
}

func TestLevelsInOrderAndEveryReasonKept(t *testing.T) {
	bad := NewFakeAgent()
	bad.OffErr = ErrAuth
	stuck := NewFakeAgent()
	stuck.IgnoreOff = true
	good := NewFakeAgent()
	f, h := fencerWith([][]string{{"bad"}, {"stuck"}, {"good"}}, map[string]Agent{"bad": bad, "stuck": stuck, "good": good})
	res, err := f.Fence(context.Background(), "n1")
	if err != nil || res.Level != 3 || len(res.Attempts) != 3 {
		t.Fatalf("err %v\n%s", err, res.Summary())
	}
	// Now every level fails.
	good.Set(func(f *FakeAgent) { f.IgnoreOff = true; f.power = PowerOn })
	res, err = f.Fence(context.Background(), "n1")
	if res.Fenced || !errors.Is(err, ErrFenceFailed) || !errors.Is(err, ErrAuth) || !errors.Is(err, ErrNotConfirmed) {
		t.Fatalf("err %v", err)
	}
	for _, want := range []string{"level 1", "level 2", "level 3", "device bad", "device stuck", "device good"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q: %v", want, err)
		}
	}
	recs, _ := h.List(context.Background(), "n1", 0)
	if len(recs) != 6 {
		t.Fatalf("history has %d records, want 6", len(recs))
	}
	if _, err := f.Fence(context.Background(), "nobody"); !errors.Is(err, ErrNoTopology) {
		t.Fatalf("unknown node: %v", err)
	}
}

// orderAgent logs every verb of several agents into one shared sequence.
type orderAgent struct {
	*FakeAgent
	name string
	mu   *sync.Mutex
	seq  *[]string
}

func (o orderAgent) log(v string) { o.mu.Lock(); *o.seq = append(*o.seq, o.name+":"+v); o.mu.Unlock() }
func (o orderAgent) Off(ctx context.Context) error {
	o.log("off")
	return o.FakeAgent.Off(ctx)
}
func (o orderAgent) On(ctx context.Context) error { o.log("on"); return o.FakeAgent.On(ctx) }
func (o orderAgent) Status(ctx context.Context) (PowerState, error) {
	st, err := o.FakeAgent.Status(ctx)
	o.log("status=" + st.String())
	return st, err
}

func TestTwoPSUAllOffConfirmedBeforeAnyOn(t *testing.T) {
	var mu sync.Mutex
	var seq []string
	a := orderAgent{NewFakeAgent(), "psu1", &mu, &seq}
	b := orderAgent{NewFakeAgent(), "psu2", &mu, &seq}
	b.OffDelay = 60 * time.Millisecond // the second outlet is slow
	f, _ := fencerWith([][]string{{"psu1", "psu2"}}, map[string]Agent{"psu1": a, "psu2": b})
	f.Nodes["n1"] = NodeTopology{Action: ActionReboot, Levels: [][]string{{"psu1", "psu2"}}}
	res, err := f.Fence(context.Background(), "n1")
	if err != nil {
		t.Fatalf("%v\n%s", err, res.Summary())
	}
	firstOn, lastOffConfirm := -1, -1
	for i, s := range seq {
		if strings.HasSuffix(s, ":on") && firstOn < 0 {
			firstOn = i
		}
		if strings.HasSuffix(s, "status=off") {
			lastOffConfirm = i
		}
	}
	// the last "status=off" before the first on must come from each PSU
	confirmed := map[string]bool{}
	for _, s := range seq[:firstOn] {
		if strings.HasSuffix(s, "status=off") {
			confirmed[strings.Split(s, ":")[0]] = true
		}
	}
	if firstOn < 0 || !confirmed["psu1"] || !confirmed["psu2"] {
		t.Fatalf("an outlet went on before both were confirmed off: %v (lastOff %d)", seq, lastOffConfirm)
	}
	if a.Power() != PowerOn || b.Power() != PowerOn {
		t.Fatal("reboot left an outlet off")
	}
}

func TestTwoPSUOneOutletFailsFailsTheLevel(t *testing.T) {
	a := NewFakeAgent()
	b := NewFakeAgent()
	b.IgnoreOff = true
	f, _ := fencerWith([][]string{{"psu1", "psu2"}}, map[string]Agent{"psu1": a, "psu2": b})
	f.Nodes["n1"] = NodeTopology{Action: ActionReboot, Levels: [][]string{{"psu1", "psu2"}}}
	res, err := f.Fence(context.Background(), "n1")
	if err == nil || res.Fenced || !errors.Is(err, ErrNotConfirmed) {
		t.Fatalf("err %v", err)
	}
	for _, c := range a.Calls() {
		if c == "on" {
			t.Fatal("psu1 was powered on although psu2 never confirmed off")
		}
	}
	if !strings.Contains(err.Error(), "device psu2") {
		t.Fatalf("error does not name the failed outlet: %v", err)
	}
}

func TestRebootOnFailureKeepsFence(t *testing.T) {
	a := NewFakeAgent()
	a.OnErr = errors.New("bmc busy")
	f, _ := fencerWith([][]string{{"d"}}, map[string]Agent{"d": a})
	f.Nodes["n1"] = NodeTopology{Action: ActionReboot, Levels: [][]string{{"d"}}}
	res, err := f.Fence(context.Background(), "n1")
	if err != nil || !res.Fenced {
		t.Fatalf("confirmed off must stand although on failed: %v", err)
	}
	if len(res.Attempts) != 2 || res.Attempts[1].Outcome != OutcomeFailure {
		t.Fatalf("%s", res.Summary())
	}
}

func TestManualConfirmation(t *testing.T) {
	clock := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	var mu sync.Mutex
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); clock = clock.Add(time.Millisecond); return clock }
	m, err := NewManual(ManualConfig{Node: "n1"}, now, quiet())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.ConfirmOff("alice", "early"); !errors.Is(err, ErrNoManualRequest) {
		t.Fatalf("confirmation without a request: %v", err)
	}
	f, h := fencerWith([][]string{{"m"}}, map[string]Agent{"m": m})
	// Nobody confirms: the fence fails at its deadline.
	if _, err := f.Fence(context.Background(), "n1"); !errors.Is(err, ErrNotConfirmed) {
		t.Fatalf("unconfirmed manual fence: %v", err)
	}
	d := f.Devices["m"]
	d.Timeout = 5 * time.Second
	f.Devices["m"] = d
	if _, err := m.ConfirmOff("", ""); err == nil {
		t.Error("anonymous confirmation accepted")
	}
	done := make(chan struct{})
	defer close(done)
	go func() {
		// Confirm whenever a request is open; Off wipes any confirmation
		// given before it, so this also covers the previous request.
		for {
			select {
			case <-done:
				return
			case <-time.After(5 * time.Millisecond):
			}
			if m.Pending() {
				if _, err := m.ConfirmOff("alice", "pulled both power cords"); err != nil {
					t.Error(err)
				}
			}
		}
	}()
	res, err := f.Fence(context.Background(), "n1")
	if err != nil {
		t.Fatal(err)
	}
	if a := res.Attempts[0]; a.ConfirmedBy != "alice" || a.ConfirmedAt.IsZero() || a.Note == "" {
		t.Fatalf("confirmation not recorded: %+v", a)
	}
	recs, _ := h.List(context.Background(), "n1", 1)
	if recs[0].ConfirmedBy != "alice" {
		t.Fatalf("history: %+v", recs[0])
	}
	// A new request invalidates the old confirmation.
	_ = m.Off(context.Background())
	if st, _ := m.Status(context.Background()); st != PowerOn {
		t.Fatal("stale confirmation counted for a new fence")
	}
}

func TestSecretsNeverPrinted(t *testing.T) {
	const pw = "hunter2-very-secret"
	cfg := IPMIConfig{Host: "10.0.0.1", User: "admin", Password: NewSecret(pw)}
	var buf bytes.Buffer
	slog.New(slog.NewJSONHandler(&buf, nil)).Info("x", "cfg", cfg, "pw", cfg.Password)
	slog.New(slog.NewTextHandler(&buf, nil)).Info("x", "cfg", cfg, "pw", cfg.Password)
	j, _ := json.Marshal(cfg)
	outs := []string{fmt.Sprintf("%v %+v %#v %s", cfg, cfg, cfg, cfg.Password), buf.String(), string(j)}
	for _, o := range outs {
		if strings.Contains(o, pw) {
			t.Fatalf("secret printed: %s", o)
		}
	}
	if !strings.Contains(string(j), redacted) {
		t.Fatalf("json: %s", j)
	}
	// Errors from libraries that echo the password are scrubbed, and
	// markers survive.
	err := redactError(fmt.Errorf("%w: login with password %s refused", ErrAuth, pw), cfg.Password)
	if strings.Contains(err.Error(), pw) || !errors.Is(err, ErrAuth) {
		t.Fatalf("redactError: %v", err)
	}
	var back IPMIConfig
	if err := json.Unmarshal([]byte(`{"host":"h","user":"u","password":"p@ss"}`), &back); err != nil || back.Password.Reveal() != "p@ss" {
		t.Fatalf("unmarshal: %v %q", err, back.Password.Reveal())
	}
	if err := json.Unmarshal(j, &back); err == nil {
		t.Fatal("a redacted config was accepted as credentials")
	}
}

func TestFileHistory(t *testing.T) {
	h := NewFileHistory(filepath.Join(t.TempDir(), "history.jsonl"))
	ctx := context.Background()
	for i, n := range []string{"n1", "n2", "n1"} {
		r := Record{Time: time.Unix(int64(i), 0).UTC(), Node: n, Level: 1, Device: "d", Action: "off", Outcome: OutcomeSuccess, Duration: time.Duration(i) * time.Millisecond}
		if err := h.Append(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	recs, err := h.List(ctx, "n1", 0)
	if err != nil || len(recs) != 2 || recs[0].Duration != 2*time.Millisecond {
		t.Fatalf("%v %+v", err, recs)
	}
	all, _ := NewFileHistory(h.Path).List(ctx, "", 1)
	if len(all) != 1 || all[0].Time.Unix() != 2 {
		t.Fatalf("reopened: %+v", all)
	}
}

func TestHealthMonitorEvents(t *testing.T) {
	a := NewFakeAgent()
	var mu sync.Mutex
	var evs []HealthEvent
	m := &HealthMonitor{
		Devices:  map[string]Device{"d": {Agent: a}},
		Interval: 10 * time.Millisecond,
		Logger:   quiet(),
		OnChange: func(e HealthEvent) { mu.Lock(); evs = append(evs, e); mu.Unlock() },
	}
	ctx := context.Background()
	m.CheckAll(ctx)
	m.CheckAll(ctx) // no change, no event
	a.Set(func(f *FakeAgent) { f.MonitorErr = ErrAuth })
	hs := m.CheckAll(ctx)
	if hs[0].State != HealthUnhealthy || !strings.Contains(hs[0].Error, "authentication") {
		t.Fatalf("%+v", hs)
	}
	a.Set(func(f *FakeAgent) { f.MonitorErr = nil })
	rctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if err := m.Run(rctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	want := []HealthState{HealthOK, HealthUnhealthy, HealthOK}
	if len(evs) != len(want) {
		t.Fatalf("events %+v", evs)
	}
	for i, e := range evs {
		if e.To != want[i] {
			t.Fatalf("event %d: %+v", i, e)
		}
	}
}

func TestValidateNamesTheField(t *testing.T) {
	cases := []struct {
		err   error
		field string
	}{
		{IPMIConfig{User: "u"}.Validate(), "ipmi.host"},
		{IPMIConfig{Host: "h", User: "u", CipherSuite: 5}.Validate(), "ipmi.cipher_suite"},
		{IPMIConfig{Host: "h", User: "u", Privilege: "root"}.Validate(), "ipmi.privilege"},
		{ManualConfig{}.Validate(), "manual.node"},
		{(&Fencer{Nodes: map[string]NodeTopology{"n1": {Levels: [][]string{{"x"}}}}}).Validate(), "nodes.n1.levels[0]"},
		{(&Fencer{Nodes: map[string]NodeTopology{"n1": {Action: "kill", Levels: [][]string{{"x"}}}}}).Validate(), "nodes.n1.action"},
	}
	for _, c := range cases {
		if !errors.Is(c.err, ErrInvalidConfig) || !strings.Contains(c.err.Error(), c.field) {
			t.Errorf("want %s named, got %v", c.field, c.err)
		}
	}
}
