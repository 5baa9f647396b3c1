package fencing

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"
)

// Action is what a fence does to a node.
type Action string

const (
	// ActionOff powers the node off and confirms it (the default).
	ActionOff Action = "off"
	// ActionReboot powers off, confirms off for every device of the level,
	// then powers on. The fence counts as done once off is confirmed; a
	// failed power-on is recorded but does not undo it.
	ActionReboot Action = "reboot"
)

// Device is one configured fence device: an agent plus its time budget.
type Device struct {
	Name  string
	Agent Agent
	// Timeout bounds one off+confirm (or on+confirm). Zero means 30s.
	Timeout time.Duration
	// PollInterval between Status reads. Zero means DefaultPollInterval.
	PollInterval time.Duration
}

func (d Device) timeout() time.Duration {
	if d.Timeout > 0 {
		return d.Timeout
	}
	return 30 * time.Second
}

// NodeTopology lists a node's fence levels in the order they are tried.
// Each level names one or more devices, and every one of them must confirm
// off for the level to succeed (a server with two PSUs on two outlets).
type NodeTopology struct {
	Action Action     `json:"action,omitempty"`
	Levels [][]string `json:"levels"`
}

// Fencer runs fences over a topology and records every device action.
type Fencer struct {
	Devices map[string]Device
	Nodes   map[string]NodeTopology
	History HistoryStore     // nil: records are only logged
	Logger  *slog.Logger     // nil: slog.Default()
	Now     func() time.Time // nil: time.Now
}

// Result is the outcome of one Fence call.
type Result struct {
	Node     string        `json:"node"`
	Action   Action        `json:"action"`
	Fenced   bool          `json:"fenced"`
	Level    int           `json:"level,omitempty"` // 1-based level that succeeded
	Duration time.Duration `json:"duration_ns"`
	Attempts []Record      `json:"attempts"`
}

func (f *Fencer) now() time.Time {
	if f.Now != nil {
		return f.Now()
	}
	return time.Now()
}

func (f *Fencer) log() *slog.Logger {
	if f.Logger != nil {
		return f.Logger
	}
	return slog.Default()
}

// Fence powers node off through its levels, in order, until one level
// confirms off on every device. It returns a nil error only when the node is
// confirmed off. Otherwise the error wraps ErrFenceFailed and carries the
// reason from every attempt, and the caller must not take over the node's
// resources.
func (f *Fencer) Fence(ctx context.Context, node string) (Result, error) {
	start := f.now()
	topo, ok := f.Nodes[node]
	res := Result{Node: node, Action: topo.Action}
	if res.Action == "" {
		res.Action = ActionOff
	}
	if !ok || len(topo.Levels) == 0 {
		return res, fmt.Errorf("%w: %q", ErrNoTopology, node)
	}
	var errs []error
	for i, level := range topo.Levels {
		lvl := i + 1
		recs, err := f.runLevel(ctx, node, lvl, level, res.Action)
		res.Attempts = append(res.Attempts, recs...)
		if err == nil {
			res.Fenced, res.Level = true, lvl
			res.Duration = f.now().Sub(start)
			f.log().Info("fencing: node fenced", "node", node, "level", lvl, "action", res.Action, "duration", res.Duration)
			return res, nil
		}
		errs = append(errs, fmt.Errorf("level %d: %w", lvl, err))
		f.log().Warn("fencing: level failed", "node", node, "level", lvl, "err", err)
		if ctx.Err() != nil {
			break
		}
	}
	res.Duration = f.now().Sub(start)
	err := fmt.Errorf("%w: node %s: %w", ErrFenceFailed, node, errors.Join(errs...))
	f.log().Error("fencing: node NOT fenced", "node", node, "err", err)
	return res, err
}

// runLevel confirms off on every device of one level in parallel (so two
// PSU outlets drop together), and only then, for a reboot, powers them on.
func (f *Fencer) runLevel(ctx context.Context, node string, lvl int, names []string, action Action) ([]Record, error) {
	if len(names) == 0 {
		return nil, errors.New("level has no devices")
	}
	devs := make([]Device, len(names))
	for i, n := range names {
		d, ok := f.Devices[n]
		if !ok || d.Agent == nil {
			err := fmt.Errorf("device %q is not configured", n)
			rec := Record{Time: f.now(), Node: node, Level: lvl, Device: n, Action: "off", Outcome: OutcomeFailure, Error: err.Error()}
			f.record(ctx, rec)
			return []Record{rec}, err
		}
		if d.Name == "" {
			d.Name = n
		}
		devs[i] = d
	}
	recs, errs := f.parallel(ctx, node, lvl, devs, "off")
	var failed []error
	for i, err := range errs {
		if err != nil {
			failed = append(failed, fmt.Errorf("device %s: %w", recs[i].Device, err))
		}
	}
	if len(failed) > 0 {
		return recs, errors.Join(failed...)
	}
	if action == ActionReboot {
		// Every outlet is confirmed off; only now may any come back.
		onRecs, _ := f.parallel(ctx, node, lvl, devs, "on")
		for _, r := range onRecs {
			if r.Outcome != OutcomeSuccess {
				f.log().Warn("fencing: power on after confirmed off failed; node stays off", "node", node, "device", r.Device, "err", r.Error)
			}
		}
		recs = append(recs, onRecs...)
	}
	return recs, nil
}

func (f *Fencer) parallel(ctx context.Context, node string, lvl int, devs []Device, action string) ([]Record, []error) {
	recs := make([]Record, len(devs))
	errs := make([]error, len(devs))
	var wg sync.WaitGroup
	for i, d := range devs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			recs[i], errs[i] = f.runDevice(ctx, node, lvl, d, action)
		}()
	}
	wg.Wait()
	for _, r := range recs {
		f.record(ctx, r)
	}
	return recs, errs
}

func (f *Fencer) runDevice(ctx context.Context, node string, lvl int, d Device, action string) (Record, error) {
	start := f.now()
	dctx, cancel := context.WithTimeout(ctx, d.timeout())
	defer cancel()
	var err error
	if action == "on" {
		err = OnAndConfirm(dctx, d.Agent, d.PollInterval)
	} else {
		err = OffAndConfirm(dctx, d.Agent, d.PollInterval)
	}
	rec := Record{
		Time: start, Node: node, Level: lvl, Device: d.Name, Action: action,
		Outcome: OutcomeSuccess, Duration: f.now().Sub(start),
	}
	if err != nil {
		rec.Outcome = OutcomeFailure
		rec.Error = err.Error()
	}
	if c, ok := d.Agent.(WithConfirmer); ok && action == "off" && err == nil {
		if conf, ok := c.LastConfirmation(); ok {
			rec.ConfirmedBy, rec.ConfirmedAt, rec.Note = conf.By, conf.At, conf.Note
		}
	}
	return rec, err
}

func (f *Fencer) record(ctx context.Context, r Record) {
	f.log().Info("fencing: attempt", "node", r.Node, "level", r.Level, "device", r.Device,
		"action", r.Action, "outcome", r.Outcome, "duration", r.Duration, "err", r.Error)
	if f.History == nil {
		return
	}
	// The history write must not be skipped because the fence used up ctx.
	hctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if err := f.History.Append(hctx, r); err != nil {
		f.log().Error("fencing: history append failed", "node", r.Node, "device", r.Device, "err", err)
	}
}

// Validate checks that every level names configured devices.
func (f *Fencer) Validate() error {
	for node, t := range f.Nodes {
		if t.Action != "" && t.Action != ActionOff && t.Action != ActionReboot {
			return invalid("nodes."+node+".action", "%q: want off or reboot", t.Action)
		}
		if len(t.Levels) == 0 {
			return invalid("nodes."+node+".levels", "at least one level is required")
		}
		for i, lvl := range t.Levels {
			field := fmt.Sprintf("nodes.%s.levels[%d]", node, i)
			if len(lvl) == 0 {
				return invalid(field, "a level needs at least one device")
			}
			seen := map[string]bool{}
			for _, n := range lvl {
				if _, ok := f.Devices[n]; !ok {
					return invalid(field, "device %q is not defined", n)
				}
				if seen[n] {
					return invalid(field, "device %q listed twice", n)
				}
				seen[n] = true
			}
		}
	}
	return nil
}

// Summary renders a result for humans, one attempt per line.
func (r Result) Summary() string {
	var b strings.Builder
	verdict := "NOT FENCED"
	if r.Fenced {
		verdict = fmt.Sprintf("fenced at level %d", r.Level)
	}
	fmt.Fprintf(&b, "node %s: %s (%s, %v)\n", r.Node, verdict, r.Action, r.Duration.Round(time.Millisecond))
	for _, a := range r.Attempts {
		fmt.Fprintf(&b, "  level %d %-12s %-3s %-7s %8v", a.Level, a.Device, a.Action, a.Outcome, a.Duration.Round(time.Millisecond))
		if a.ConfirmedBy != "" {
			fmt.Fprintf(&b, " confirmed by %s at %s", a.ConfirmedBy, a.ConfirmedAt.Format(time.RFC3339))
		}
		if a.Error != "" {
			fmt.Fprintf(&b, " %s", a.Error)
		}
		b.WriteByte('\n')
	}
	return b.String()
}
