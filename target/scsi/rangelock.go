package scsi

import (
	"context"
	"sync"
)

// rangeLock serialises writers whose block ranges overlap; writers to
// disjoint ranges never wait for each other. Every command that changes the
// medium (WRITE, WRITE SAME, UNMAP, ORWRITE, COMPARE AND WRITE) holds it over
// its blocks, which is what makes COMPARE AND WRITE atomic and lets the
// Backend assume no two overlapping writes run at once. Reads take no lock.
//
// The held set is a short slice: it holds one entry per write in flight, so a
// linear scan is cheaper than any tree at the queue depths iSCSI allows.
type rangeLock struct {
	mu   sync.Mutex
	held []*rangeHold
	free []*rangeHold // recycled holds, guarded by mu
}

// rangeHold is one held range [start, end) in blocks.
type rangeHold struct {
	start, end uint64
	// wait is created by the first writer that has to wait for this hold and
	// closed on unlock.
	wait chan struct{}
}

// lock blocks until [start, end) overlaps no held range, then holds it.
func (r *rangeLock) lock(ctx context.Context, start, end uint64) (*rangeHold, error) {
	for {
		r.mu.Lock()
		var busy *rangeHold
		for _, h := range r.held {
			if h.start < end && start < h.end {
				busy = h
				break
			}
		}
		if busy == nil {
			var h *rangeHold
			if n := len(r.free); n > 0 {
				h = r.free[n-1]
				r.free = r.free[:n-1]
			} else {
				h = new(rangeHold)
			}
			h.start, h.end, h.wait = start, end, nil
			r.held = append(r.held, h)
			r.mu.Unlock()
			return h, nil
		}
		if busy.wait == nil {
			busy.wait = make(chan struct{})
		}
		ch := busy.wait
		r.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// unlock releases h and wakes everyone waiting for it.
func (r *rangeLock) unlock(h *rangeHold) {
	r.mu.Lock()
	for i, x := range r.held {
		if x == h {
			last := len(r.held) - 1
			r.held[i] = r.held[last]
			r.held[last] = nil
			r.held = r.held[:last]
			break
		}
	}
	if h.wait != nil {
		close(h.wait)
		h.wait = nil
	}
	if len(r.free) < 256 {
		r.free = append(r.free, h)
	}
	r.mu.Unlock()
}
