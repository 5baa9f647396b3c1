package fencing

import (
	"context"
	"fmt"
	"time"
)

// DefaultPollInterval is how often Confirm re-reads the power state.
const DefaultPollInterval = 100 * time.Millisecond

// DefaultDeadline bounds Confirm when the caller's context has none: a fence
// must always end.
const DefaultDeadline = 60 * time.Second

// OffAndConfirm sends Off and then polls Status until it reads off or ctx ends.
// A nil return is the only proof that the target is down: the command's own
// success counts for nothing, and a status that cannot be read is a failure
// (wrapping ErrStatusUnreadable). If status keeps reading on, the error wraps
// ErrNotConfirmed.
func OffAndConfirm(ctx context.Context, a Agent, poll time.Duration) error {
	ctx, cancel := ensureDeadline(ctx)
	defer cancel()
	if err := a.Off(ctx); err != nil {
		return fmt.Errorf("fencing: off command: %w", err)
	}
	return waitFor(ctx, a, PowerOff, poll)
}

// OnAndConfirm sends On and polls Status until it reads on. It is used for the
// second half of a reboot; its failure never undoes a confirmed off.
func OnAndConfirm(ctx context.Context, a Agent, poll time.Duration) error {
	ctx, cancel := ensureDeadline(ctx)
	defer cancel()
	if err := a.On(ctx); err != nil {
		return fmt.Errorf("fencing: on command: %w", err)
	}
	return waitFor(ctx, a, PowerOn, poll)
}

func ensureDeadline(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, DefaultDeadline)
}

// waitFor polls until Status reports want. Transient read errors are retried
// until the deadline. The verdict rests on the last state the device actually
// reported: "still on" is stronger evidence than a later read that failed
// (under load, one slow read at the deadline must not turn a device that
// said ON into "could not read"), and "could not read" is the verdict only
// when no read ever succeeded, so an operator can tell the two apart.
func waitFor(ctx context.Context, a Agent, want PowerState, poll time.Duration) error {
	if poll <= 0 {
		poll = DefaultPollInterval
	}
	var (
		lastErr  error
		lastGood = PowerUnknown // last state the device reported
		reads    int
	)
	for {
		st, err := a.Status(ctx)
		reads++
		switch {
		case err != nil && ctx.Err() != nil && reads > 1:
			// The deadline cut this read short; it says nothing.
			return confirmVerdict(ctx.Err(), want, lastGood, lastErr, reads-1)
		case err != nil:
			lastErr = err
		case st == want:
			return nil
		case st != PowerOn && st != PowerOff:
			lastErr = fmt.Errorf("agent returned %v without an error", st)
		default:
			lastGood = st
		}
		t := time.NewTimer(poll)
		select {
		case <-ctx.Done():
			t.Stop()
			return confirmVerdict(ctx.Err(), want, lastGood, lastErr, reads)
		case <-t.C:
		}
	}
}

func confirmVerdict(ctxErr error, want, lastGood PowerState, lastErr error, reads int) error {
	if lastGood == PowerUnknown && lastErr != nil {
		// Keep the agent's own markers (ErrAuth, ErrUnreachable) reachable
		// next to ErrStatusUnreadable.
		return fmt.Errorf("%w after %d reads (wanted %v): %w: %w", ErrStatusUnreadable, reads, want, lastErr, ctxErr)
	}
	also := ""
	if lastErr != nil {
		also = fmt.Sprintf(" (a later read failed: %v)", lastErr)
	}
	if want == PowerOff {
		return fmt.Errorf("%w: status still %v after %d reads%s: %w", ErrNotConfirmed, lastGood, reads, also, ctxErr)
	}
	return fmt.Errorf("fencing: power on not confirmed: status still %v after %d reads%s: %w", lastGood, reads, also, ctxErr)
}
