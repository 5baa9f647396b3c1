package replication

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// benchVolume starts a 1 GiB 2-replica volume over TLS on loopback with real
// files in the test's temp dir (a disk, so activity-log syncs cost what
// they cost) and waits until the replica is in the ISR. alSlots and
// prefetch 0 are the defaults (VolumeConfig).
func benchVolume(b *testing.B, alSlots, prefetch int) *Volume {
	b.Helper()
	h := &fharness{pki: newPKI(b), mem: NewMemMembership(), base: b.TempDir(), nodes: map[string]*fnode{}}
	l2, err := OpenLocal(LocalOptions{Dir: h.dir("n2"), Volume: fVol, Size: 1 << 30, Gen: fGen})
	if err != nil {
		b.Fatal(err)
	}
	srv, _ := NewServer(ServerConfig{TLS: h.pki.server(b, "n2")})
	srv.AddVolume(l2)
	ln, _ := listenRetry("127.0.0.1:0")
	go srv.Serve(ln)
	b.Cleanup(func() { srv.Close() })
	l1, err := OpenLocal(LocalOptions{Dir: h.dir("n1"), Volume: fVol, Size: 1 << 30, Gen: fGen})
	if err != nil {
		b.Fatal(err)
	}
	h.mem.Create(fVol, "n1", "n2")
	v, err := OpenVolume(context.Background(), VolumeConfig{Self: "n1", Peers: map[string]string{"n2": ln.Addr().String()},
		Local: l1, Membership: h.mem, TLS: h.pki.client(b, "n1"), ALSlots: alSlots, ALPrefetch: prefetch})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { v.Close() })
	for {
		ps, _ := v.Status(context.Background())
		if ps[0].Mode == "up" && ps[0].InISR {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	return v
}

// runWriters runs b.N writes of buf from 16 goroutines, offsets from off,
// and reports p50/p99 latency.
func runWriters(b *testing.B, v *Volume, buf []byte, off func(i int64, rng *rand.Rand) int64) {
	var next atomic.Int64
	var mu sync.Mutex
	var lats []time.Duration
	b.SetBytes(int64(len(buf)))
	tx0, meta0, ns0 := v.alTx.Load(), v.metaTx.Load(), v.persistNs.Load()
	cpu0 := cpuTime()
	b.ResetTimer()
	var wg sync.WaitGroup
	for w := 0; w < 16; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 99))
			var mine []time.Duration
			for {
				i := next.Add(1)
				if i > int64(b.N) {
					break
				}
				start := time.Now()
				if err := v.WriteAt(context.Background(), buf, off(i, rng), false); err != nil {
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
	// CPU time of the whole process (primary and replica) per MB written:
	// unlike MB/s it hardly depends on what else the machine runs.
	b.ReportMetric(float64(cpuTime()-cpu0)/1e3/(float64(b.N)*float64(len(buf))/1e6), "cpu-µs/MB")
	slices.Sort(lats)
	b.ReportMetric(float64(v.alTx.Load()-tx0)/float64(b.N), "al-tx/op")
	if n := v.alTx.Load() + v.metaTx.Load() - tx0 - meta0; n > 0 {
		b.ReportMetric(float64(v.persistNs.Load()-ns0)/float64(n)/1e3, "µs/persist")
	}
	if len(lats) > 0 {
		b.ReportMetric(float64(lats[len(lats)/2].Microseconds()), "p50-µs")
		b.ReportMetric(float64(lats[len(lats)*99/100].Microseconds()), "p99-µs")
	}
}

// BenchmarkRandomWrite4K measures 4 KiB random writes, 16 in flight, on a
// 2-replica volume over TLS on loopback with real files. "hot" writes stay
// inside 64 MiB, which the activity log covers after warm-up, so no
// activity-log transaction is needed; "cold" writes anywhere in 1 GiB, so
// most writes bring a new region into the activity log, which costs an
// activity-log transaction (batched across the writes queued at that
// moment) on the primary and an MsgAL on the replica before the write is
// issued. "cold-al127" is "cold" with the activity log of 127 regions that
// was the default before the activity-log file.
func BenchmarkRandomWrite4K(b *testing.B) {
	for _, bc := range []struct {
		name    string
		span    int64
		alSlots int
	}{{"hot", 64 << 20, 0}, {"cold", 1 << 30, 0}, {"cold-al127", 1 << 30, 127}} {
		b.Run(bc.name, func(b *testing.B) {
			v := benchVolume(b, bc.alSlots, 0)
			buf := makeBlock(0, 1, 1)
			blocks := bc.span / 4096
			// Warm-up fills the activity log for the hot span.
			for i := int64(0); i < min(blocks, 127); i++ {
				v.WriteAt(context.Background(), buf, i*(1<<20)%bc.span, false)
			}
			runWriters(b, v, buf, func(_ int64, rng *rand.Rand) int64 { return rng.Int64N(blocks) * 4096 })
		})
	}
}

// BenchmarkSeqWrite128K measures one sequential stream of 128 KiB writes,
// 16 in flight, wrapping at 1 GiB: every 8 writes enter a new 1 MiB region,
// so it shows the activity-log cost of streaming workloads.
//
// "stream-noprefetch" turns off the sequential prefetch (one transaction per
// region). "warm" wraps at 64 MiB instead, inside the activity log and over
// already allocated blocks after the first pass: no activity-log
// transactions and no block allocation, the floor.
func BenchmarkSeqWrite128K(b *testing.B) {
	for _, bc := range []struct {
		name     string
		span     int64
		prefetch int
	}{{"stream", 1 << 30, 0}, {"stream-noprefetch", 1 << 30, -1}, {"warm", 64 << 20, 0}} {
		b.Run(bc.name, func(b *testing.B) {
			v := benchVolume(b, 0, bc.prefetch)
			buf := make([]byte, 128<<10)
			for i := range buf {
				buf[i] = byte(i)
			}
			if bc.span < 1<<30 {
				for off := int64(0); off < bc.span; off += 1 << 20 {
					v.WriteAt(context.Background(), buf, off, false)
				}
			}
			runWriters(b, v, buf, func(i int64, _ *rand.Rand) int64 { return (i * int64(len(buf))) % bc.span })
		})
	}
}

// plainShmVolume starts a 1 GiB 2-replica volume over plaintext TCP on
// loopback with files on tmpfs (the make-bench tmpfs rows in one process,
// for profiling and tracing the protocol's own overhead).
func plainShmVolume(b *testing.B) *Volume {
	dir, err := os.MkdirTemp("/dev/shm", "hrep-bench-")
	if err != nil {
		b.Skip("no /dev/shm:", err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	mem := NewMemMembership()
	l2, err := OpenLocal(LocalOptions{Dir: filepath.Join(dir, "n2"), Volume: fVol, Size: 1 << 30, Gen: fGen})
	if err != nil {
		b.Fatal(err)
	}
	srv, _ := NewServer(ServerConfig{Plaintext: true})
	srv.AddVolume(l2)
	ln, _ := listenRetry("127.0.0.1:0")
	go srv.Serve(ln)
	b.Cleanup(func() { srv.Close() })
	l1, err := OpenLocal(LocalOptions{Dir: filepath.Join(dir, "n1"), Volume: fVol, Size: 1 << 30, Gen: fGen})
	if err != nil {
		b.Fatal(err)
	}
	mem.Create(fVol, "n1", "n2")
	v, err := OpenVolume(context.Background(), VolumeConfig{Self: "n1", Peers: map[string]string{"n2": ln.Addr().String()},
		Local: l1, Membership: mem, Plaintext: true})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { v.Close() })
	for {
		ps, _ := v.Status(context.Background())
		if ps[0].Mode == "up" && ps[0].InISR {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	return v
}

// BenchmarkSeqWrite128KPlainShm is the make-bench 128K row in one process
// (16 writers; go test -bench ... -trace / -cpuprofile).
func BenchmarkSeqWrite128KPlainShm(b *testing.B) {
	v := plainShmVolume(b)
	buf := make([]byte, 128<<10)
	for i := range buf {
		buf[i] = byte(i)
	}
	runWriters(b, v, buf, func(i int64, _ *rand.Rand) int64 { return (i * int64(len(buf))) % (1 << 30) })
}

// BenchmarkRandomWrite4KPlainShm is the make-bench 4K IOPS row in one
// process: 16 writers, random 4 KiB writes over 1 GiB.
func BenchmarkRandomWrite4KPlainShm(b *testing.B) {
	v := plainShmVolume(b)
	buf := makeBlock(0, 1, 1)
	runWriters(b, v, buf, func(_ int64, rng *rand.Rand) int64 { return rng.Int64N(1<<30/4096) * 4096 })
}

// cpuTime is the process's user + system CPU time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkResyncPlainShm times a full sync of 256 MiB of data to a replica
// of unknown contents (generation 0), plaintext on loopback, files on
// tmpfs: the resync row of make bench in one process. One op = one full
// sync; cpu-µs/MB is the process's CPU per MB copied.
func BenchmarkResyncPlainShm(b *testing.B) {
	const size = 256 << 20
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		dir, err := os.MkdirTemp("/dev/shm", "hrep-bench-")
		if err != nil {
			b.Skip("no /dev/shm:", err)
		}
		mem := NewMemMembership()
		l2, err := OpenLocal(LocalOptions{Dir: filepath.Join(dir, "n2"), Volume: fVol, Size: size})
		if err != nil {
			b.Fatal(err)
		}
		srv, _ := NewServer(ServerConfig{Plaintext: true})
		srv.AddVolume(l2)
		ln, _ := listenRetry("127.0.0.1:0")
		go srv.Serve(ln)
		l1, err := OpenLocal(LocalOptions{Dir: filepath.Join(dir, "n1"), Volume: fVol, Size: size, Gen: fGen})
		if err != nil {
			b.Fatal(err)
		}
		buf := make([]byte, 1<<20)
		for j := range buf {
			buf[j] = byte(j*7 + 1)
		}
		for off := int64(0); off < size; off += 1 << 20 {
			l1.Store.WriteAt(buf, off, false)
		}
		mem.Create(fVol, "n1")
		cpu0 := cpuTime()
		b.StartTimer()
		v, err := OpenVolume(context.Background(), VolumeConfig{Self: "n1", Peers: map[string]string{"n2": ln.Addr().String()},
			Local: l1, Membership: mem, Plaintext: true})
		if err != nil {
			b.Fatal(err)
		}
		for {
			ps, _ := v.Status(context.Background())
			if ps[0].Mode == "up" && ps[0].InISR && ps[0].DirtyBytes == 0 {
				break
			}
			time.Sleep(2 * time.Millisecond)
		}
		b.StopTimer()
		b.ReportMetric(float64(cpuTime()-cpu0)/1e3/(size/1e6), "cpu-µs/MB")
		v.Close()
		srv.Close()
		os.RemoveAll(dir)
	}
	b.SetBytes(size)
}
