package fencing

import (
	"context"
	"errors"
	"fmt"
)

// PowerState is what a fence device reports about its target.
type PowerState int

const (
	// PowerUnknown is never a confirmation of anything. Agents return it
	// together with a non-nil error.
	PowerUnknown PowerState = iota
	// PowerOn means the target has power (for several outlets: at least one
	// of them is on, because one live PSU keeps the host running).
	PowerOn
	// PowerOff means the device reports the target without power.
	PowerOff
)

func (p PowerState) String() string {
	switch p {
	case PowerOn:
		return "on"
	case PowerOff:
		return "off"
	default:
		return "unknown"
	}
}

// MarshalText makes PowerState read well in JSON.
func (p PowerState) MarshalText() ([]byte, error) { return []byte(p.String()), nil }

// Plug is one controllable outlet or system a device reports through List.
type Plug struct {
	ID    string `json:"id"`
	Alias string `json:"alias,omitempty"`
}

// Agent drives one fence device for one target. Every method must honour
// ctx's deadline: a fence that hangs is as bad as one that fails.
//
// Contract:
//   - Off and On only send the command. A nil error means the device
//     accepted it, not that power changed: callers confirm with Status
//     (see OffAndConfirm). Agents must not pretend otherwise.
//   - Status returns PowerOn or PowerOff with a nil error, or PowerUnknown
//     with a non-nil error. An unreadable status is an error, never a guess.
//   - Monitor returns nil when the device is reachable and the credentials
//     are accepted, without changing power.
//   - List returns the plugs the device controls; agents for single-system
//     devices (IPMI, Redfish) return the one system.
//   - Errors never contain secrets (see Secret and redactError).
type Agent interface {
	Off(ctx context.Context) error
	On(ctx context.Context) error
	Status(ctx context.Context) (PowerState, error)
	Monitor(ctx context.Context) error
	List(ctx context.Context) ([]Plug, error)
}

// WithClose is implemented by agents that hold resources (sessions, sockets)
// between calls. Callers that built the agent close it when done.
type WithClose interface {
	Close() error
}

// WithConfirmer is implemented by the manual agent: an operator confirms the
// node is off and the confirmation is recorded.
type WithConfirmer interface {
	ConfirmOff(by, note string) (Confirmation, error)
	Pending() bool
	LastConfirmation() (Confirmation, bool)
}

// Sentinel errors. Agents wrap them with %w so callers can branch.
var (
	// ErrNotConfirmed: the off command was sent but Status never read off
	// before the deadline. The node must be treated as still running.
	ErrNotConfirmed = errors.New("fencing: power off not confirmed by status")
	// ErrStatusUnreadable: the device did not give a usable power state.
	ErrStatusUnreadable = errors.New("fencing: power status unreadable")
	// ErrAuth: the device refused the credentials.
	ErrAuth = errors.New("fencing: authentication failed")
	// ErrUnreachable: the device did not answer.
	ErrUnreachable = errors.New("fencing: device unreachable")
	// ErrNotSupported: the device cannot do this operation.
	ErrNotSupported = errors.New("fencing: operation not supported by device")
	// ErrFenceFailed: every level of a node's topology failed.
	ErrFenceFailed = errors.New("fencing: every fence level failed")
	// ErrNoTopology: the node has no fence levels configured.
	ErrNoTopology = errors.New("fencing: node has no fence levels")
	// ErrInvalidConfig: a config field is wrong; the message names it.
	ErrInvalidConfig = errors.New("fencing: invalid config")
)

// markerErrors survive redaction (see redactError).
var markerErrors = []error{
	ErrNotConfirmed, ErrStatusUnreadable, ErrAuth, ErrUnreachable, ErrNotSupported,
	ErrFenceFailed, ErrNoTopology, ErrInvalidConfig,
	context.DeadlineExceeded, context.Canceled,
}

func invalid(field, format string, args ...any) error {
	return fmt.Errorf("%w: %s: %s", ErrInvalidConfig, field, fmt.Sprintf(format, args...))
}
