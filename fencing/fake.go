package fencing

import (
	"context"
	"sync"
	"time"
)

// FakeAgent is a scripted Agent for tests of this package and of the
// cluster controller. It models a device whose power changes only when the
// script allows, so tests can show that a command's success is not taken
// for confirmation. Set fields before use or through the setters; all
// methods are safe for concurrent use.
type FakeAgent struct {
	mu    sync.Mutex
	power PowerState
	// offAt is when a pending off takes effect (zero: none pending).
	offAt time.Time
	calls []string

	// OffErr, OnErr, StatusErr and MonitorErr are returned by the verbs
	// when non-nil.
	OffErr, OnErr, StatusErr, MonitorErr error
	// IgnoreOff: Off succeeds but power stays on (a device that acks and
	// never switches).
	IgnoreOff bool
	// OffDelay: power goes off this long after Off (a device that switches
	// late).
	OffDelay time.Duration
	// Hang: every verb blocks until its context ends.
	Hang bool
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

var _ Agent = (*FakeAgent)(nil)

// NewFakeAgent returns a fake whose power is on.
func NewFakeAgent() *FakeAgent { return &FakeAgent{power: PowerOn} }

func (f *FakeAgent) now() time.Time {
	if f.Now != nil {
		return f.Now()
	}
	return time.Now()
}

// Calls lists the verbs called so far, in order.
func (f *FakeAgent) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...)
}

// Power returns the modelled power state (what the test "sees" at the host).
func (f *FakeAgent) Power() PowerState {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.settleLocked()
	return f.power
}

// SetPower forces the modelled state.
func (f *FakeAgent) SetPower(p PowerState) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.power, f.offAt = p, time.Time{}
}

// Set runs fn under the fake's lock, to change script fields while other
// goroutines use the fake.
func (f *FakeAgent) Set(fn func(f *FakeAgent)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

func (f *FakeAgent) settleLocked() {
	if !f.offAt.IsZero() && !f.now().Before(f.offAt) {
		f.power, f.offAt = PowerOff, time.Time{}
	}
}

func (f *FakeAgent) enter(ctx context.Context, verb string) (hang bool) {
	f.mu.Lock()
	f.calls = append(f.calls, verb)
	hang = f.Hang
	f.mu.Unlock()
	if hang {
		<-ctx.Done()
	}
	return hang
}

func (f *FakeAgent) Off(ctx context.Context) error {
	if f.enter(ctx, "off") {
		return ctx.Err()
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.OffErr != nil {
		return f.OffErr
	}
	if f.IgnoreOff {
		return nil
	}
	if f.OffDelay > 0 {
		f.offAt = f.now().Add(f.OffDelay)
		return nil
	}
	f.power, f.offAt = PowerOff, time.Time{}
	return nil
}

func (f *FakeAgent) On(ctx context.Context) error {
	if f.enter(ctx, "on") {
		return ctx.Err()
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.OnErr != nil {
		return f.OnErr
	}
	f.power, f.offAt = PowerOn, time.Time{}
	return nil
}

func (f *FakeAgent) Status(ctx context.Context) (PowerState, error) {
	if f.enter(ctx, "status") {
		return PowerUnknown, ctx.Err()
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.StatusErr != nil {
		return PowerUnknown, f.StatusErr
	}
	f.settleLocked()
	return f.power, nil
}

func (f *FakeAgent) Monitor(ctx context.Context) error {
	if f.enter(ctx, "monitor") {
		return ctx.Err()
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.MonitorErr
}

func (f *FakeAgent) List(ctx context.Context) ([]Plug, error) {
	if f.enter(ctx, "list") {
		return nil, ctx.Err()
	}
	return []Plug{{ID: "1", Alias: "fake"}}, nil
}
