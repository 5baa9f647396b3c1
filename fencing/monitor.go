package fencing

import (
	"context"
	"log/slog"
	"sort"
	"sync"
	"time"
)

// HealthState of a fence device as seen by Monitor.
type HealthState string

const (
	HealthUnknown   HealthState = "unknown" // not checked yet
	HealthOK        HealthState = "ok"
	HealthUnhealthy HealthState = "unhealthy"
)

// Health is the latest check of one device.
type Health struct {
	Device  string        `json:"device"`
	State   HealthState   `json:"state"`
	Error   string        `json:"error,omitempty"`
	Checked time.Time     `json:"checked"`
	Since   time.Time     `json:"since"` // when State last changed
	Latency time.Duration `json:"latency_ns"`
}

// HealthEvent reports a change of a device's health.
type HealthEvent struct {
	Device string      `json:"device"`
	From   HealthState `json:"from"`
	To     HealthState `json:"to"`
	Error  string      `json:"error,omitempty"`
	At     time.Time   `json:"at"`
}

// HealthMonitor checks every device with Agent.Monitor on an interval and
// reports changes, so a broken fence device is found before it is needed.
type HealthMonitor struct {
	Devices  map[string]Device
	Interval time.Duration // zero: 60s
	// Timeout per check; zero: 10s.
	Timeout time.Duration
	// OnChange is called (from the monitor goroutine) for every change,
	// including the first check of each device.
	OnChange func(HealthEvent)
	Logger   *slog.Logger

	mu     sync.Mutex
	health map[string]Health
}

// Run checks at once and then every Interval until ctx ends; it returns
// ctx's error.
func (m *HealthMonitor) Run(ctx context.Context) error {
	iv := m.Interval
	if iv <= 0 {
		iv = 60 * time.Second
	}
	t := time.NewTicker(iv)
	defer t.Stop()
	for {
		m.CheckAll(ctx)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// CheckAll runs one round of checks in parallel and returns the health of
// every device, sorted by name.
func (m *HealthMonitor) CheckAll(ctx context.Context) []Health {
	var wg sync.WaitGroup
	for name, d := range m.Devices {
		wg.Add(1)
		go func() {
			defer wg.Done()
			m.check(ctx, name, d)
		}()
	}
	wg.Wait()
	return m.Snapshot()
}

// Snapshot returns the latest health of every checked device.
func (m *HealthMonitor) Snapshot() []Health {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Health, 0, len(m.health))
	for _, h := range m.health {
		out = append(out, h)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Device < out[j].Device })
	return out
}

func (m *HealthMonitor) check(ctx context.Context, name string, d Device) {
	to := m.Timeout
	if to <= 0 {
		to = 10 * time.Second
	}
	cctx, cancel := context.WithTimeout(ctx, to)
	start := time.Now()
	err := d.Agent.Monitor(cctx)
	cancel()
	if ctx.Err() != nil {
		return // shutting down: not the device's fault
	}
	h := Health{Device: name, State: HealthOK, Checked: time.Now(), Latency: time.Since(start)}
	if err != nil {
		h.State, h.Error = HealthUnhealthy, err.Error()
	}
	m.mu.Lock()
	if m.health == nil {
		m.health = map[string]Health{}
	}
	prev, seen := m.health[name]
	if !seen {
		prev.State = HealthUnknown
	}
	h.Since = prev.Since
	changed := prev.State != h.State
	if changed {
		h.Since = h.Checked
	}
	m.health[name] = h
	m.mu.Unlock()
	if !changed {
		return
	}
	ev := HealthEvent{Device: name, From: prev.State, To: h.State, Error: h.Error, At: h.Checked}
	lg := m.Logger
	if lg == nil {
		lg = slog.Default()
	}
	if h.State == HealthOK {
		lg.Info("fencing: device healthy", "device", name, "from", prev.State)
	} else {
		lg.Error("fencing: device unhealthy: fencing through it will fail", "device", name, "from", prev.State, "err", h.Error)
	}
	if m.OnChange != nil {
		m.OnChange(ev)
	}
}
