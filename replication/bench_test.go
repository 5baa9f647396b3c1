package replication

import (
	"context"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkRandomWrite4K measures 4 KiB random writes, 16 in flight, on a
// 2-replica volume over TLS on loopback with real files. "hot" writes stay
// inside 64 MiB, which the activity log (127 x 1 MiB regions) covers after
// warm-up, so no metadata is written; "cold" writes anywhere in 1 GiB, so
// nearly every write brings a new region into the activity log, which costs
// a whole-metadata rewrite with fsync (batched across the writes of one
// Ready) plus an MsgAL round to the replica before the write is issued.
func BenchmarkRandomWrite4K(b *testing.B) {
	for _, bc := range []struct {
		name string
		span int64
	}{{"hot", 64 << 20}, {"cold", 1 << 30}} {
		b.Run(bc.name, func(b *testing.B) {
			h := &fharness{pki: newPKI(b), mem: NewMemMembership(), base: b.TempDir(), nodes: map[string]*fnode{}}
			dir2 := h.dir("n2")
			l2, err := OpenLocal(LocalOptions{Dir: dir2, Volume: fVol, Size: 1 << 30, Gen: fGen})
			if err != nil {
				b.Fatal(err)
			}
			srv, _ := NewServer(ServerConfig{TLS: h.pki.server(b, "n2")})
			srv.AddVolume(l2)
			ln, _ := listenRetry("127.0.0.1:0")
			go srv.Serve(ln)
			defer srv.Close()
			l1, err := OpenLocal(LocalOptions{Dir: h.dir("n1"), Volume: fVol, Size: 1 << 30, Gen: fGen})
			if err != nil {
				b.Fatal(err)
			}
			h.mem.Create(fVol, "n1", "n2")
			v, err := OpenVolume(context.Background(), VolumeConfig{Self: "n1", Peers: map[string]string{"n2": ln.Addr().String()},
				Local: l1, Membership: h.mem, TLS: h.pki.client(b, "n1")})
			if err != nil {
				b.Fatal(err)
			}
			defer v.Close()
			for {
				ps, _ := v.Status(context.Background())
				if ps[0].Mode == "up" && ps[0].InISR {
					break
				}
				time.Sleep(5 * time.Millisecond)
			}
			buf := makeBlock(0, 1, 1)
			blocks := bc.span / 4096
			// Warm-up fills the activity log for the hot span.
			for i := int64(0); i < min(blocks, 127); i++ {
				v.WriteAt(context.Background(), buf, i*(1<<20)%bc.span, false)
			}
			var next atomic.Int64
			var mu sync.Mutex
			var lats []time.Duration
			b.ResetTimer()
			var wg sync.WaitGroup
			for w := 0; w < 16; w++ {
				wg.Add(1)
				go func(w int) {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(w), 99))
					var mine []time.Duration
					for next.Add(1) <= int64(b.N) {
						start := time.Now()
						if err := v.WriteAt(context.Background(), buf, rng.Int64N(blocks)*4096, false); err != nil {
							b.Error(err)
							return
						}
						mine = append(mine, time.Since(start))
					}
					mu.Lock()
					lats = append(lats, mine...)
					mu.Unlock()
				}(w)
			}
			wg.Wait()
			b.StopTimer()
			slices.Sort(lats)
			if len(lats) > 0 {
				b.ReportMetric(float64(lats[len(lats)/2].Microseconds()), "p50-µs")
				b.ReportMetric(float64(lats[len(lats)*99/100].Microseconds()), "p99-µs")
			}
		})
	}
}
