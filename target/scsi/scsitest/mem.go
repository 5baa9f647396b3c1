// Package scsitest provides test doubles for code that drives a
// target/scsi logical unit: MemBackend is an in-memory, thin-provisioned
// Backend with failure injection.
//
// It deliberately does not import target/scsi (the Backend interface uses only
// standard types), so scsi's own tests can use it too.
package scsitest

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
)

// Granule is the allocation unit MemBackend tracks mapped state in.
const Granule = 512

// ErrInjected is returned by MemBackend when a failure was injected.
var ErrInjected = errors.New("scsitest: injected I/O error")

// MemBackend stores a LU's blocks in memory and records which granules are
// mapped, so it also answers MapStatus. It is safe for concurrent use and,
// unlike a real backend, panics if two overlapping writes ever run at once:
// the LU promises they never do.
type MemBackend struct {
	mu     sync.RWMutex
	data   []byte
	mapped []bool

	wmu     sync.Mutex
	writing map[int64]int64 // in-flight writes: offset -> end

	FailReads  atomic.Bool
	FailWrites atomic.Bool
	FailFlush  atomic.Bool
	// Counters for assertions.
	Writes    atomic.Int64
	FUAWrites atomic.Int64
	Flushes   atomic.Int64
	Unmaps    atomic.Int64
}

// NewMemBackend returns a zero-filled, fully deallocated backend of size bytes.
func NewMemBackend(size int64) *MemBackend {
	return &MemBackend{
		data:    make([]byte, size),
		mapped:  make([]bool, (size+Granule-1)/Granule),
		writing: make(map[int64]int64),
	}
}

func (m *MemBackend) check(off int64, n int) error {
	if off < 0 || off+int64(n) > int64(len(m.data)) {
		return fmt.Errorf("scsitest: access [%d,+%d) beyond size %d", off, n, len(m.data))
	}
	return nil
}

// ReadAt implements Backend.
func (m *MemBackend) ReadAt(ctx context.Context, p []byte, off int64) error {
	if m.FailReads.Load() {
		return ErrInjected
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if err := m.check(off, len(p)); err != nil {
		return err
	}
	copy(p, m.data[off:])
	return nil
}

// WriteAt implements Backend.
func (m *MemBackend) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if m.FailWrites.Load() {
		return ErrInjected
	}
	end := off + int64(len(p))
	m.enter(off, end)
	defer m.leave(off)
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(off, len(p)); err != nil {
		return err
	}
	copy(m.data[off:], p)
	for g := off / Granule; g < (end+Granule-1)/Granule; g++ {
		m.mapped[g] = true
	}
	m.Writes.Add(1)
	if fua {
		m.FUAWrites.Add(1)
	}
	return nil
}

func (m *MemBackend) enter(off, end int64) {
	m.wmu.Lock()
	defer m.wmu.Unlock()
	for o, e := range m.writing {
		if o < end && off < e {
			panic(fmt.Sprintf("scsitest: overlapping writes [%d,%d) and [%d,%d)", off, end, o, e))
		}
	}
	m.writing[off] = end
}

func (m *MemBackend) leave(off int64) {
	m.wmu.Lock()
	delete(m.writing, off)
	m.wmu.Unlock()
}

// Flush implements Backend.
func (m *MemBackend) Flush(ctx context.Context) error {
	if m.FailFlush.Load() {
		return ErrInjected
	}
	m.Flushes.Add(1)
	return nil
}

// Unmap implements Backend: whole granules become deallocated, and every
// byte in the range reads as zero.
func (m *MemBackend) Unmap(ctx context.Context, off, length int64) error {
	if m.FailWrites.Load() {
		return ErrInjected
	}
	m.enter(off, off+length)
	defer m.leave(off)
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(off, int(length)); err != nil {
		return err
	}
	clear(m.data[off : off+length])
	for g := (off + Granule - 1) / Granule; (g+1)*Granule <= off+length; g++ {
		m.mapped[g] = false
	}
	m.Unmaps.Add(1)
	return nil
}

// Size implements Backend.
func (m *MemBackend) Size() int64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return int64(len(m.data))
}

// Resize implements Backend.
func (m *MemBackend) Resize(ctx context.Context, size int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if size < 0 {
		return fmt.Errorf("scsitest: negative size %d", size)
	}
	data := make([]byte, size)
	copy(data, m.data)
	mapped := make([]bool, (size+Granule-1)/Granule)
	copy(mapped, m.mapped)
	m.data, m.mapped = data, mapped
	return nil
}

// MapStatus implements MapStatusBackend.
func (m *MemBackend) MapStatus(ctx context.Context, off int64) (bool, int64, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if off < 0 || off >= int64(len(m.data)) {
		return false, 0, fmt.Errorf("scsitest: map status at %d beyond size %d", off, len(m.data))
	}
	g := off / Granule
	state := m.mapped[g]
	e := g + 1
	for e < int64(len(m.mapped)) && m.mapped[e] == state {
		e++
	}
	return state, min(e*Granule, int64(len(m.data))) - off, nil
}

// Bytes returns a copy of [off, off+n) for assertions.
func (m *MemBackend) Bytes(off, n int64) []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return append([]byte(nil), m.data[off:off+n]...)
}

// Mapped reports whether the granule holding off is mapped.
func (m *MemBackend) Mapped(off int64) bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.mapped[off/Granule]
}
