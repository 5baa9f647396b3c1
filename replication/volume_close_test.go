package replication

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestVolumeCloseRacesIO: a primary is closed, by two callers at once,
// while writes (plain and FUA), flushes and reads are in flight, as
// demotion, a planned move or a replica-set change do. Close must not panic (a Hold released twice closes its channel
// twice), every request must return, either normally or with ErrClosed, and
// no caller's buffer may be read after its WriteAt returned: each writer
// scribbles 0xee over its buffer the moment WriteAt returns, a byte fill
// never produces, so a scribble on either disk, or a race report, shows a
// buffer used too late. Each round reopens the primary on the same replica.
// HASAN_CLOSE_ROUNDS raises the number of rounds.
func TestVolumeCloseRacesIO(t *testing.T) {
	rounds := 6
	if s := os.Getenv("HASAN_CLOSE_ROUNDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil {
			t.Fatal(err)
		}
		rounds = n
	}
	for _, plain := range []bool{false, true} {
		t.Run(fmt.Sprintf("plaintext=%v", plain), func(t *testing.T) {
			c := &cluster{t: t, pki: newPKI(t), mem: NewMemMembership(), vol: "vol1", size: 8 << 20, rs: 1 << 20,
				nodes: map[string]*testNode{}, unhlth: make(chan error, 64), plain: plain}
			base := t.TempDir()
			for _, n := range []string{"n1", "n2"} {
				c.nodes[n] = &testNode{name: n, dir: filepath.Join(base, n)}
			}
			c.mem.Create(c.vol, "n1", "n2")
			c.startReplica("n2", "")
			t.Cleanup(c.close)
			for r := 0; r < rounds && !t.Failed(); r++ {
				c.openPrimary("n1")
				c.waitISR(2)
				closeRacingIO(t, c.prim, c.size, rand.IntN(200))
				c.prim = nil
				checkNoScribble(t, "n1 after round "+strconv.Itoa(r), c.img("n1"))
			}
			// The replica's copy once its server has applied everything
			// it received.
			c.killReplica("n2")
			checkNoScribble(t, "n2", c.img("n2"))
		})
	}
}

// closeRacingIO runs writers, flushers and readers on v and closes it once after
// ops requests have completed, then checks every request returned in time
// and that requests after Close fail with ErrClosed.
func closeRacingIO(t *testing.T, v *Volume, size int64, ops int) {
	t.Helper()
	const writers, bs = 12, 16 << 10 // at vecMin: the writev path sends the buffer by reference
	stripe := size / writers / bs
	var (
		done    atomic.Int64
		wg      sync.WaitGroup
		closing atomic.Bool
	)
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			buf := make([]byte, bs)
			for i := 1; ; i++ {
				var err error
				if w%4 == 3 && i%2 == 0 {
					err = v.Flush(context.Background())
				} else {
					blk := int64(w)*stripe + int64(i)%stripe
					fill(buf, int(blk), int64(i))
					err = v.WriteAt(context.Background(), buf, blk*bs, i%3 == 0)
					for j := range buf {
						buf[j] = 0xee
					}
				}
				if err != nil {
					if !errors.Is(err, ErrClosed) {
						t.Errorf("writer %d: %v (closing %v), want ErrClosed", w, err, closing.Load())
					}
					return
				}
				done.Add(1)
			}
		}(w)
	}
	// Readers: the store reads by descriptor, so a read racing Close must
	// fail with ErrClosed, never reach a closed (or reused) descriptor.
	for r := 0; r < 2; r++ {
		wg.Add(1)
		go func(r int) {
			defer wg.Done()
			buf := make([]byte, bs)
			for i := 0; ; i++ {
				off := int64(r*7+i) % (size / bs) * bs
				var err error
				if i%4 == 3 {
					_, _, err = v.MapStatus(context.Background(), off)
				} else {
					err = v.ReadAt(context.Background(), buf, off)
				}
				if err != nil {
					if !errors.Is(err, ErrClosed) {
						t.Errorf("reader %d: %v (closing %v), want ErrClosed", r, err, closing.Load())
					}
					return
				}
				if closing.Load() {
					time.Sleep(50 * time.Microsecond) // let Close get at the files
				}
			}
		}(r)
	}
	for done.Load() < int64(ops) && !t.Failed() {
		time.Sleep(100 * time.Microsecond)
	}
	closing.Store(true)
	// Two callers close at once, as a demotion and a shutdown may.
	closed := make(chan error, 2)
	for range 2 {
		go func() { closed <- v.Close() }()
	}
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	timeout := time.After(60 * time.Second)
	for pending := 3; pending > 0; pending-- {
		select {
		case <-finished:
			finished = nil
		case err := <-closed:
			if err != nil {
				t.Errorf("Close: %v", err)
			}
		case <-timeout:
			stacks := make([]byte, 1<<20)
			stacks = stacks[:runtime.Stack(stacks, true)]
			t.Fatalf("requests or Close still blocked 60s after Close:\n%s", stacks)
		}
	}
	// Requests after Close fail at once.
	buf := make([]byte, bs)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := v.WriteAt(ctx, buf, 0, false); !errors.Is(err, ErrClosed) {
		t.Errorf("WriteAt after Close: %v, want ErrClosed", err)
	}
	if err := v.Flush(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("Flush after Close: %v, want ErrClosed", err)
	}
	if err := v.ReadAt(ctx, buf, 0); !errors.Is(err, ErrClosed) {
		t.Errorf("ReadAt after Close: %v, want ErrClosed", err)
	}
	if err := v.Close(); err != nil {
		t.Errorf("Close after Close: %v", err)
	}
}

func checkNoScribble(t *testing.T, who string, img []byte) {
	t.Helper()
	if i := bytes.IndexByte(img, 0xee); i >= 0 {
		t.Fatalf("%s: caller's scribble (0xee) at offset %d: a buffer was written after its WriteAt returned", who, i)
	}
}
