package replication

import (
	"bytes"
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestVolumeWriteAtBufferReuse: WriteAt sends the caller's buffer itself,
// not a copy, so it may return only once nothing refers to it. Every writer
// here reuses one buffer and scribbles over it as soon as WriteAt returns;
// no replica may ever hold a scribbled block. It runs while the replica is
// in the ISR, while it is down, and while it resyncs outside the ISR (whose
// messages get a copy: the caller must not wait for it), over the
// plaintext (writev) and the TLS writer.
func TestVolumeWriteAtBufferReuse(t *testing.T) {
	for _, plain := range []bool{true, false} {
		t.Run(fmt.Sprintf("plaintext=%v", plain), func(t *testing.T) {
			c := &cluster{t: t, pki: newPKI(t), mem: NewMemMembership(), vol: "vol1", size: 16 << 20, rs: 1 << 20,
				nodes: map[string]*testNode{}, unhlth: make(chan error, 4), plain: plain}
			base := t.TempDir()
			for _, n := range []string{"n1", "n2"} {
				c.nodes[n] = &testNode{name: n, dir: filepath.Join(base, n)}
			}
			c.mem.Create(c.vol, "n1", "n2")
			c.startReplica("n2", "")
			c.openPrimary("n1")
			t.Cleanup(c.close)
			c.waitISR(2)

			const writers, bs = 16, 16 << 10
			blocks := int(c.size / bs / writers) // each writer owns a stripe of blocks
			last := make([]atomic.Int64, writers*blocks)
			ctx, stop := context.WithCancel(context.Background())
			var wg sync.WaitGroup
			var iters atomic.Int64
			for w := 0; w < writers; w++ {
				wg.Add(1)
				go func(w int) {
					defer wg.Done()
					buf := make([]byte, bs)
					for i := 1; ctx.Err() == nil; i++ {
						blk := w*blocks + i%blocks
						ver := int64(i)
						fill(buf, blk, ver)
						if err := c.prim.WriteAt(context.Background(), buf, int64(blk)*bs, i%5 == 0); err != nil {
							t.Error(err)
							return
						}
						last[blk].Store(ver)
						for j := range buf {
							buf[j] = 0xee
						}
						iters.Add(1)
					}
				}(w)
			}
			waitIters := func(n int64) {
				for target := iters.Load() + n; iters.Load() < target && !t.Failed(); {
					runtimeGosched()
				}
			}
			waitIters(2000)
			c.killReplica("n2")
			waitIters(500)
			c.startReplica("n2", c.nodes["n2"].addr)
			c.waitISR(2)
			waitIters(1000)
			stop()
			wg.Wait()
			if err := c.prim.Flush(context.Background()); err != nil {
				t.Fatal(err)
			}
			img1, img2 := c.img("n1"), c.img("n2")
			if !bytes.Equal(img1, img2) {
				t.Fatal("replicas differ")
			}
			want := make([]byte, bs)
			for blk := range last {
				ver := last[blk].Load()
				if ver == 0 {
					continue
				}
				fill(want, blk, ver)
				if got := img1[int64(blk)*bs : int64(blk+1)*bs]; !bytes.Equal(got, want) {
					t.Fatalf("block %d: want version %d, got %x… (0xee is the caller's scribble)", blk, ver, got[:16])
				}
			}
		})
	}
}

func fill(b []byte, blk int, ver int64) {
	for i := range b {
		b[i] = byte(int64(blk)*13 + ver*7 + int64(i)/64)
		if b[i] == 0xee {
			b[i] = 0
		}
	}
}

func runtimeGosched() { time.Sleep(time.Millisecond) }
