package scsi

import (
	"sync"
	"sync/atomic"
)

// Data buffers come from power-of-two size classes so a READ allocates
// nothing in the steady state: the transport hands the buffer back through
// Response.Release once the Data-In is on the wire.
const (
	minBufShift = 12 // 4 KiB
	maxBufShift = 23 // 8 MiB = maxTransferBytes
	bufClasses  = maxBufShift - minBufShift + 1
)

type bufferPool struct {
	classes [bufClasses]sync.Pool
}

// ioBuf is one pooled buffer. release is bound once at creation so handing
// it out as Response.Release costs no allocation.
type ioBuf struct {
	b        []byte
	class    int
	released atomic.Bool
	pool     *bufferPool
	release  func()
}

func (p *bufferPool) init() {}

func bufClass(n int) int {
	c := 0
	for (1 << (minBufShift + c)) < n {
		c++
	}
	return c
}

// get returns a buffer of exactly n bytes (contents undefined).
func (p *bufferPool) get(n int) *ioBuf {
	c := bufClass(n)
	if c >= bufClasses {
		b := &ioBuf{b: make([]byte, n), class: -1}
		b.release = func() {}
		return b
	}
	if v := p.classes[c].Get(); v != nil {
		b := v.(*ioBuf)
		b.b = b.b[:n]
		b.released.Store(false)
		return b
	}
	b := &ioBuf{b: make([]byte, n, 1<<(minBufShift+c)), class: c, pool: p}
	b.release = b.put
	return b
}

// put returns the buffer to its pool; a second call (a transport bug) is
// ignored rather than letting two commands share the memory.
func (b *ioBuf) put() {
	if b.released.Swap(true) {
		return
	}
	b.b = b.b[:cap(b.b)]
	b.pool.classes[b.class].Put(b)
}
