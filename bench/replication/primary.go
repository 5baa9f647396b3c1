package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hasan-storage/hasan/replication"
)

// config is one way of running the volume.
type config struct {
	name     string
	replicas int
	tls      bool
}

// primary is the primary side of the bench: it owns the volumes and a
// control connection to the replica process.
type primary struct {
	log  *slog.Logger
	o    options
	size int64
	ctl  net.Conn
	br   *bufio.Reader
	seq  int
}

func runPrimary(ctx context.Context, log *slog.Logger, o options) error {
	backings := []string{"tmpfs"}
	if o.diskDir != "" {
		backings = append(backings, "disk")
	}
	for _, d := range []string{o.dir, o.diskDir} {
		if d == "" {
			continue
		}
		if err := os.MkdirAll(d, 0o700); err != nil {
			return fmt.Errorf("bench/replication: %w", err)
		}
	}
	var ctl net.Conn
	var err error
	for i := 0; i < 50; i++ {
		if ctl, err = net.Dial("tcp", net.JoinHostPort(o.replica, ctlPort)); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("bench/replication: control connection: %w", err)
	}
	defer ctl.Close()
	p := &primary{log: log, o: o, size: o.sizeMiB << 20, ctl: ctl, br: bufio.NewReader(ctl)}
	configs := []config{{"1 replica", 1, false}, {"2 replicas", 2, false}}
	if o.tls {
		configs = append(configs, config{"2 replicas TLS", 2, true})
	}
	rec := newRecorder(o, configs, backings)
	start := time.Now()
	rec.loadStart = loadAvg()

	// Rows are run one after the other; within a row, configurations are
	// interleaved and the order reversed every repeat, so slow drifts in
	// the machine's load hit every configuration alike.
	for _, row := range []string{rowIOPS, rowLat, rowSeq} {
		if !o.wantRow(row) {
			continue
		}
		for _, backing := range backings {
			for rep := 0; rep < o.repeats; rep++ {
				if row == rowLat && backing == backings[0] {
					// The network's own round trip, measured next to the
					// latency runs it explains.
					rtt, err := p.rtt(ctx, 2000)
					if err != nil {
						return err
					}
					rec.add(row, "veth RTT", rep, rtt)
				}
				for _, c := range interleave(configs, rep) {
					if ctx.Err() != nil {
						return ctx.Err()
					}
					r, err := p.measure(ctx, row, c, backing)
					if err != nil {
						return fmt.Errorf("bench/replication: %s, %s, %s: %w", row, backing, c.name, err)
					}
					log.Info("run", "row", row, "backing", backing, "config", c.name, "repeat", rep+1, "value", r.Value, "p99", r.P99, "unit", r.Unit)
					rec.add(row+"/"+backing, c.name, rep, r)
				}
			}
		}
	}
	for _, backing := range backings {
		for rep := 0; rep < o.repeats && o.wantRow(rowResync); rep++ {
			for _, c := range interleave(configs[1:], rep) {
				r, err := p.resync(ctx, c, backing)
				if err != nil {
					return fmt.Errorf("bench/replication: resync, %s, %s: %w", backing, c.name, err)
				}
				log.Info("run", "row", rowResync, "backing", backing, "config", c.name, "repeat", rep+1, "MBps", r.Value, "secs", r.Seconds)
				rec.add(rowResync+"/"+backing, c.name, rep, r)
			}
		}
	}
	rec.loadEnd = loadAvg()
	rec.wall = time.Since(start)
	rec.print(os.Stdout)
	return rec.write(o.out)
}

// wantRow reports whether -rows selects row (short names: iops, lat, seq,
// resync).
func (o options) wantRow(row string) bool {
	if o.rows == "" {
		return true
	}
	short := map[string]string{rowIOPS: "iops", rowLat: "lat", rowSeq: "seq", rowResync: "resync"}[row]
	return slices.Contains(strings.Split(o.rows, ","), short)
}

func interleave(cs []config, rep int) []config {
	out := slices.Clone(cs)
	if rep%2 == 1 {
		slices.Reverse(out)
	}
	return out
}

func (p *primary) command(format string, args ...any) error {
	fmt.Fprintf(p.ctl, format+"\n", args...)
	line, err := p.br.ReadString('\n')
	if err != nil {
		return fmt.Errorf("control: %w", err)
	}
	if line = strings.TrimSpace(line); line != "ok" {
		return fmt.Errorf("replica: %s", line)
	}
	return nil
}

// rtt measures TCP round trips of 64 bytes over the veth pair, on a
// connection of its own (Nagle off, like the replication connections).
func (p *primary) rtt(ctx context.Context, n int) (run, error) {
	c, err := net.Dial("tcp", net.JoinHostPort(p.o.replica, ctlPort))
	if err != nil {
		return run{}, fmt.Errorf("bench/replication: rtt: %w", err)
	}
	defer c.Close()
	c.(*net.TCPConn).SetNoDelay(true)
	br := bufio.NewReader(c)
	fmt.Fprintln(c, "echo")
	if l, err := br.ReadString('\n'); err != nil || strings.TrimSpace(l) != "ok" {
		return run{}, fmt.Errorf("bench/replication: rtt: %q %v", l, err)
	}
	buf := make([]byte, 64)
	lats := make([]time.Duration, 0, n)
	for i := 0; i < n && ctx.Err() == nil; i++ {
		t := time.Now()
		if _, err := c.Write(buf); err != nil {
			return run{}, err
		}
		if _, err := ioReadFull(br, buf); err != nil {
			return run{}, err
		}
		lats = append(lats, time.Since(t))
	}
	slices.Sort(lats)
	return run{Value: us(lats[len(lats)/2]), P99: us(lats[len(lats)*99/100]), Unit: "µs", Count: len(lats)}, nil
}

func ioReadFull(br *bufio.Reader, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := br.Read(b[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// open creates a fresh volume in configuration c: a new local replica here
// and, for 2 replicas, a new one on the replica node with generation gen
// (0: unknown contents, which gets a full sync; the replica then starts
// outside the ISR). With fill the local replica is first filled with data.
func (p *primary) open(ctx context.Context, c config, backing string, gen uint64, fill bool) (*replication.Volume, func() error, error) {
	p.seq++
	name := fmt.Sprintf("bench%d", p.seq)
	dir := p.o.dir
	if backing == "disk" {
		dir = p.o.diskDir
	}
	l, err := replication.OpenLocal(replication.LocalOptions{Dir: dir, Volume: name, Size: p.size, Gen: 5})
	if err != nil {
		return nil, nil, err
	}
	if fill {
		if err := fillStore(l.Store, p.size); err != nil {
			return nil, nil, err
		}
		// On disk the fill's writeback would otherwise compete with the
		// resync being timed.
		if err := l.Store.Sync(); err != nil {
			return nil, nil, err
		}
	}
	mem := replication.NewMemMembership()
	vc := replication.VolumeConfig{Self: "p", Local: l, Membership: mem, Plaintext: true, Logger: quiet("primary")}
	mode := "plain"
	if c.replicas == 2 {
		port := replPort
		if c.tls {
			port, mode = tlsPort, "tls"
			tc, err := tlsConfig(p.o.certs, "primary", false)
			if err != nil {
				return nil, nil, err
			}
			vc.TLS, vc.Plaintext = tc, false
		}
		if err := p.command("add %s %d %d %s %s", name, p.size, gen, mode, backing); err != nil {
			return nil, nil, err
		}
		vc.Peers = map[string]string{"r": net.JoinHostPort(p.o.replica, port)}
		if gen == 5 {
			mem.Create(name, "p", "r")
		} else {
			mem.Create(name, "p")
		}
	} else {
		mem.Create(name, "p")
	}
	v, err := replication.OpenVolume(ctx, vc)
	if err != nil {
		return nil, nil, err
	}
	closer := func() error {
		err := v.Delete(context.Background())
		if c.replicas == 2 {
			if e := p.command("del %s", name); err == nil {
				err = e
			}
		}
		return err
	}
	return v, closer, nil
}

// fillStore writes non-zero data over the whole volume, so a resync copies
// real data (all-zero chunks are punched as holes instead).
func fillStore(st *replication.Store, size int64) error {
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	for off := int64(0); off < size; off += int64(len(buf)) {
		binary.BigEndian.PutUint64(buf, uint64(off))
		if err := st.WriteAt(buf[:min(int64(len(buf)), size-off)], off, false); err != nil {
			return err
		}
	}
	return nil
}

func waitReady(ctx context.Context, v *replication.Volume, c config, inISR bool, within time.Duration) error {
	if c.replicas == 1 {
		return nil
	}
	deadline := time.Now().Add(within)
	for {
		ps, err := v.Status(ctx)
		if err != nil {
			return err
		}
		if ps[0].Mode == "up" && (!inISR || (ps[0].InISR && ps[0].DirtyBytes == 0)) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("replica not ready after %s: %+v", within, ps[0])
		}
		time.Sleep(5 * time.Millisecond)
	}
}

const (
	rowIOPS   = "write-4k-iops"
	rowLat    = "write-4k-latency-qd1"
	rowSeq    = "write-128k-seq"
	rowResync = "resync"
)

// measure runs one row's workload on a fresh volume in configuration c.
func (p *primary) measure(ctx context.Context, row string, c config, backing string) (run, error) {
	v, closer, err := p.open(ctx, c, backing, 5, false)
	if err != nil {
		return run{}, err
	}
	if err := waitReady(ctx, v, c, true, 20*time.Second); err != nil {
		closer()
		return run{}, err
	}
	var r run
	switch row {
	case rowIOPS:
		r = p.writes(ctx, v, 4096, p.o.qd, true, false)
	case rowLat:
		r = p.writes(ctx, v, 4096, 1, true, false)
	case rowSeq:
		// On disk one pass over the volume: a stream that overwrites the
		// same 1 GiB for 3 s measures the page cache, not the disk.
		r = p.writes(ctx, v, 128<<10, p.o.qd, false, backing == "disk")
	}
	if err := closer(); err != nil && r.Err == "" {
		r.Err = err.Error()
	}
	if r.Err != "" {
		return r, fmt.Errorf("%s", r.Err)
	}
	return r, nil
}

// writes runs qd writers of bs bytes for the configured duration, random
// (4 KiB aligned) or one sequential stream wrapping at the end. Each writer
// has a buffer of its own, as an initiator's commands would: one buffer
// shared by all writers would stay in the CPU cache and flatter memcpy.
// Throughput runs end with a Flush, inside the timed span, so the figures
// are for durable data (this matters on disk; on tmpfs it is free). With
// onePass the sequential stream stops at the end of the volume instead of
// after the duration: every byte written must reach the disk.
func (p *primary) writes(ctx context.Context, v *replication.Volume, bs, qd int, random, onePass bool) run {
	var next atomic.Int64
	var mu sync.Mutex
	var lats []time.Duration
	var firstErr error
	stop := time.Now().Add(p.o.duration)
	begin := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < qd; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), uint64(p.seq)))
			buf := make([]byte, bs)
			for i := range buf {
				buf[i] = byte(i + w + 1)
			}
			mine := make([]time.Duration, 0, 1<<14)
			for (onePass || time.Now().Before(stop)) && ctx.Err() == nil {
				var off int64
				if random {
					off = rng.Int64N(p.size/4096) * 4096
				} else {
					off = (next.Add(1) - 1) * int64(bs)
					if onePass && off >= p.size {
						break
					}
					off %= p.size
				}
				t := time.Now()
				if err := v.WriteAt(ctx, buf, off, false); err != nil {
					mu.Lock()
					firstErr = err
					mu.Unlock()
					return
				}
				mine = append(mine, time.Since(t))
			}
			mu.Lock()
			lats = append(lats, mine...)
			mu.Unlock()
		}(w)
	}
	wg.Wait()
	if qd > 1 && firstErr == nil {
		firstErr = v.Flush(ctx)
	}
	secs := time.Since(begin).Seconds()
	r := run{Seconds: secs, Count: len(lats)}
	if firstErr != nil {
		r.Err = firstErr.Error()
		return r
	}
	slices.Sort(lats)
	switch {
	case qd == 1:
		r.Value, r.P99, r.Unit = us(lats[len(lats)/2]), us(lats[len(lats)*99/100]), "µs"
	case bs == 4096:
		r.Value, r.Unit = float64(len(lats))/secs, "IOPS"
	default:
		r.Value, r.Unit = float64(len(lats))*float64(bs)/secs/1e6, "MB/s"
	}
	return r
}

// resync times a full sync of a volume holding size bytes of data to a
// replica of unknown contents (every region dirty), from OpenVolume's
// return until the replica is in the ISR with nothing dirty and a Flush
// has made it durable there, unthrottled.
func (p *primary) resync(ctx context.Context, c config, backing string) (run, error) {
	v, closer, err := p.open(ctx, c, backing, 0, true)
	if err != nil {
		return run{}, err
	}
	begin := time.Now()
	err = waitReady(ctx, v, c, true, 5*time.Minute)
	if err == nil {
		// Durable on the replica too (resync writes are not FUA).
		err = v.Flush(ctx)
	}
	secs := time.Since(begin).Seconds()
	if cerr := closer(); err == nil {
		err = cerr
	}
	if err != nil {
		return run{}, err
	}
	return run{Value: float64(p.size) / secs / 1e6, Unit: "MB/s", Seconds: secs}, nil
}

// quiet passes on only warnings and errors of the replication library (its
// ISR changes are expected here, one per resync run).
func quiet(role string) *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})).With("role", role)
}

func loadAvg() string {
	raw, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(raw))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}
