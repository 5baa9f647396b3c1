package iscsi

// SNLess reports a < b in serial number arithmetic (RFC 1982, 32 bits).
func SNLess(a, b uint32) bool { return a != b && int32(a-b) < 0 }

// SNInWindow reports lo <= x <= hi in serial number arithmetic.
func SNInWindow(x, lo, hi uint32) bool { return !SNLess(x, lo) && !SNLess(hi, x) }

// CmdWindow is the target's CmdSN window for one session (RFC 7143 4.2.2.1).
// Non-immediate commands are delivered in CmdSN order: one that arrives
// early (inside the window, beyond ExpCmdSN) waits in a reorder buffer;
// one outside the window is dropped silently, as the RFC requires.
//
// MaxCmdSN advances only when a delivered command completes, so the window
// also bounds the number of commands the initiator can have outstanding.
// It is not safe for concurrent use.
type CmdWindow[T any] struct {
	exp, max uint32
	queued   map[uint32]T
}

// NewCmdWindow starts a window at ExpCmdSN = first with room for size
// outstanding commands.
func NewCmdWindow[T any](first, size uint32) *CmdWindow[T] {
	if size == 0 {
		size = 1
	}
	return &CmdWindow[T]{exp: first, max: first + size - 1, queued: map[uint32]T{}}
}

// ExpCmdSN and MaxCmdSN are the values to report to the initiator.
func (w *CmdWindow[T]) ExpCmdSN() uint32 { return w.exp }
func (w *CmdWindow[T]) MaxCmdSN() uint32 { return w.max }

// Submit offers a non-immediate command. It returns the commands that may
// run now, in order (possibly none), and whether cmdSN was accepted at all.
func (w *CmdWindow[T]) Submit(cmdSN uint32, item T) (ready []T, accepted bool) {
	if !SNInWindow(cmdSN, w.exp, w.max) {
		return nil, false
	}
	if cmdSN != w.exp {
		if _, dup := w.queued[cmdSN]; dup {
			return nil, false
		}
		w.queued[cmdSN] = item
		return nil, true
	}
	ready = append(ready, item)
	w.exp++
	for {
		next, ok := w.queued[w.exp]
		if !ok {
			break
		}
		delete(w.queued, w.exp)
		ready = append(ready, next)
		w.exp++
	}
	return ready, true
}

// Complete records that one delivered command finished, opening one slot.
func (w *CmdWindow[T]) Complete() { w.max++ }

// Queued is the number of commands waiting for a CmdSN gap to fill.
func (w *CmdWindow[T]) Queued() int { return len(w.queued) }

// Remove drops a queued command (an ABORT TASK for a command that has not
// been delivered yet) and reports whether it was there.
func (w *CmdWindow[T]) Remove(cmdSN uint32) (T, bool) {
	it, ok := w.queued[cmdSN]
	if ok {
		delete(w.queued, cmdSN)
	}
	return it, ok
}
