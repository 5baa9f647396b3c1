package fencing

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// ManualWarning is what a console must show before accepting a manual
// confirmation. A wrong confirmation lets two nodes write the same volume.
const ManualWarning = "WARNING: confirm only after you have checked that the node is powered off " +
	"or disconnected from storage and network. If it is still running, confirming lets two nodes " +
	"write the same volumes and CORRUPTS DATA."

// ManualConfig configures a manual device: an operator is the fence.
type ManualConfig struct {
	// Node is the machine the operator must switch off (shown in prompts).
	Node string `json:"node"`
}

// Validate names the bad field.
func (c ManualConfig) Validate() error {
	if c.Node == "" {
		return invalid("manual.node", "required")
	}
	return nil
}

// Confirmation is an operator's statement that the node is off.
type Confirmation struct {
	By   string    `json:"by"`
	At   time.Time `json:"at"`
	Note string    `json:"note,omitempty"`
}

// ManualAgent waits for an operator. Off opens a request; Status reads off
// only once an operator confirmed after that request, so a confirmation
// given for an earlier incident never counts for a new one.
type ManualAgent struct {
	cfg    ManualConfig
	now    func() time.Time
	logger *slog.Logger

	mu        sync.Mutex
	requested time.Time // zero: no fence pending
	conf      *Confirmation
}

var (
	_ Agent         = (*ManualAgent)(nil)
	_ WithConfirmer = (*ManualAgent)(nil)
)

// ErrNoManualRequest: ConfirmOff was called while no fence waits for it.
var ErrNoManualRequest = errors.New("fencing: no manual fence is pending")

// NewManual returns a manual agent. now and logger may be nil.
func NewManual(cfg ManualConfig, now func() time.Time, logger *slog.Logger) (*ManualAgent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if now == nil {
		now = time.Now
	}
	if logger == nil {
		logger = slog.Default()
	}
	return &ManualAgent{cfg: cfg, now: now, logger: logger}, nil
}

// Off opens a confirmation request. It never blocks: the waiting happens in
// the Status polling, bounded by the fence deadline.
func (m *ManualAgent) Off(context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.requested = m.now()
	m.conf = nil
	m.logger.Warn("fencing: manual fence requested; an operator must confirm the node is off",
		"node", m.cfg.Node, "warning", ManualWarning)
	return nil
}

// On cannot be done by software.
func (m *ManualAgent) On(context.Context) error {
	return fmt.Errorf("%w: power on %s by hand", ErrNotSupported, m.cfg.Node)
}

// Status reads off only after an operator confirmed the current request;
// until then it reads on, because nothing has shown otherwise.
func (m *ManualAgent) Status(context.Context) (PowerState, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.conf != nil && !m.requested.IsZero() && !m.conf.At.Before(m.requested) {
		return PowerOff, nil
	}
	return PowerOn, nil
}

// Monitor has nothing to reach.
func (m *ManualAgent) Monitor(context.Context) error { return nil }

// List returns the node.
func (m *ManualAgent) List(context.Context) ([]Plug, error) {
	return []Plug{{ID: m.cfg.Node}}, nil
}

// Pending reports whether a fence waits for an operator.
func (m *ManualAgent) Pending() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return !m.requested.IsZero() && m.conf == nil
}

// ConfirmOff records that operator by checked the node is off. by is
// required: an anonymous confirmation is refused.
func (m *ManualAgent) ConfirmOff(by, note string) (Confirmation, error) {
	if by == "" {
		return Confirmation{}, invalid("by", "the confirming operator must be named")
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.requested.IsZero() {
		return Confirmation{}, ErrNoManualRequest
	}
	c := Confirmation{By: by, At: m.now(), Note: note}
	m.conf = &c
	m.logger.Warn("fencing: operator confirmed node is off", "node", m.cfg.Node, "by", by, "at", c.At, "note", note)
	return c, nil
}

// LastConfirmation returns the confirmation for the current request.
func (m *ManualAgent) LastConfirmation() (Confirmation, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.conf == nil {
		return Confirmation{}, false
	}
	return *m.conf, true
}
