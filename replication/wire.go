package replication

import (
	"bufio"
	"context"
	"math/bits"
	"net"
	"sync"
	"sync/atomic"
)

// Hold counts the references the shell keeps to a buffer it does not own,
// so that Volume.WriteAt can send the caller's buffer itself instead of a
// copy and still return only when nothing refers to it any more: the local
// write has returned and every message carrying it has been written to its
// connection (the kernel has copied it) or dropped with that connection.
type Hold struct {
	n    atomic.Int64
	free chan struct{} // closed when n drops to zero
}

// newHold returns a Hold with one reference, the owner's.
func newHold() *Hold {
	h := &Hold{free: make(chan struct{})}
	h.n.Store(1)
	return h
}

func (h *Hold) ref() {
	if h != nil {
		h.n.Add(1)
	}
}

func (h *Hold) unref() {
	if h != nil && h.n.Add(-1) == 0 {
		close(h.free)
	}
}

// vecMin is the payload size from which the plaintext writer hands the
// payload to writev by reference instead of copying it into its buffer.
const vecMin = 16 << 10

// vecFlushAt bounds how many bytes a plaintext batch holds before it is
// written even though more messages are queued.
const vecFlushAt = 4 << 20

// writeLoop encodes messages onto c, flushing whenever the queue drains so
// pipelined messages share syscalls. On a plain TCP connection a batch is
// one writev: headers and small messages are gathered in a scratch buffer
// and large payloads are referenced, not copied (a TLS connection encrypts
// into its own records anyway, so it keeps the buffered writer).
func writeLoop(ctx context.Context, c net.Conn, out <-chan Message) {
	if tc, ok := c.(*net.TCPConn); ok {
		vecWriteLoop(ctx, tc, out)
		return
	}
	bw := bufio.NewWriterSize(c, 256<<10)
	for {
		var m Message
		select {
		case m = <-out:
		case <-ctx.Done():
			bw.Flush()
			return
		}
		err := encodeMessage(bw, &m)
		// bufio copied the payload, or wrote it through to the connection.
		m.Hold.unref()
		if err != nil {
			c.Close()
			return
		}
		if len(out) == 0 {
			if err := bw.Flush(); err != nil {
				c.Close()
				return
			}
		}
	}
}

func vecWriteLoop(ctx context.Context, c *net.TCPConn, out <-chan Message) {
	var (
		scratch []byte      // headers and small parts of the current batch
		mark    int         // scratch[mark:] is not yet in vec
		vec     net.Buffers // the batch, in order
		pending int
		holds   []*Hold // references to payloads in vec
	)
	flush := func() error {
		if len(scratch) > mark {
			vec = append(vec, scratch[mark:])
		}
		iov := vec // WriteTo consumes its receiver
		_, err := iov.WriteTo(c)
		// The kernel has the bytes (or the connection failed): the
		// payloads are no longer needed.
		for _, h := range holds {
			h.unref()
		}
		clear(holds)
		clear(vec)
		vec, scratch, mark, pending, holds = vec[:0], scratch[:0], 0, 0, holds[:0]
		return err
	}
	for {
		var m Message
		select {
		case m = <-out:
		case <-ctx.Done():
			flush()
			return
		}
		h, errStr, err := encodeHeader(&m)
		if err != nil {
			m.Hold.unref()
			flush()
			c.Close()
			return
		}
		// Slices of scratch already in vec stay valid when an append
		// moves it: they keep the old array, which nothing writes again.
		scratch = append(scratch, h[:]...)
		scratch = appendVariable(scratch, &m, errStr)
		if len(m.Data) >= vecMin {
			vec = append(vec, scratch[mark:], m.Data)
			mark = len(scratch)
		} else {
			scratch = append(scratch, m.Data...)
		}
		if m.Hold != nil {
			holds = append(holds, m.Hold)
		}
		pending += headerLen + len(m.Data)
		if len(out) == 0 || pending >= vecFlushAt {
			if err := flush(); err != nil {
				c.Close()
				return
			}
		}
	}
}

// bufPool recycles payload buffers by power-of-two size class, from 4 KiB to
// 4 MiB; other sizes are plainly allocated (and dropped by put).
type bufPool struct {
	classes [11]sync.Pool // 1<<12 .. 1<<22
}

const poolMinShift, poolMaxShift = 12, 22

func (p *bufPool) get(n int) []byte {
	if n < 1<<poolMinShift || n > 1<<poolMaxShift {
		return make([]byte, n)
	}
	shift := bits.Len(uint(n - 1))
	if b, ok := p.classes[shift-poolMinShift].Get().(*[]byte); ok {
		return (*b)[:n]
	}
	return make([]byte, n, 1<<shift)
}

// put returns b for reuse; the caller must hold no other reference to it.
func (p *bufPool) put(b []byte) {
	c := cap(b)
	if c < 1<<poolMinShift || c > 1<<poolMaxShift || c&(c-1) != 0 {
		return
	}
	b = b[:c]
	p.classes[bits.Len(uint(c))-1-poolMinShift].Put(&b)
}
