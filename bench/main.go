// Command bench compares hasan's iSCSI target with tgt (and, when it builds,
// gotgt) on this machine, in one session, with the same clients, LUN size and
// backing-file kind for every peer.
//
//	go run ./bench                      # hasan vs tgt vs gotgt
//	go run ./bench -peers tgt,tgt       # harness self-check: tgt against itself
//
// Each workload runs -repeats times per peer, peers interleaved, each run at
// least -duration long. Reads use libiscsi's iscsi-perf, writes qemu-img bench
// through QEMU's iscsi driver, all at queue depth 32. It prints a table per
// workload and writes every run to -out/results.json and results.csv.
//
// Backing files live on tmpfs (/dev/shm) by default: the shared virtual disk
// of this machine is the noisiest part of it, and on tmpfs what remains is the
// target's own cost per command, which is what the comparison is about. Pass
// -dir to measure on a disk instead.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hasan-storage/hasan/bench/peer"
)

type config struct {
	peers    []string
	baseline string
	repeats  int
	duration time.Duration
	size     int64
	dir      string
	out      string
	gotgtDir string
	only     map[string]bool
}

func main() {
	var c config
	var peers, only string
	flag.StringVar(&peers, "peers", "hasan,tgt,gotgt", "peers in run order; a name may repeat (tgt,tgt) to measure the harness's own noise")
	flag.StringVar(&c.baseline, "baseline", "tgt", "peer the others are divided by")
	flag.IntVar(&c.repeats, "repeats", 3, "measured runs per workload and peer (gotgt: 1, it stalls)")
	flag.DurationVar(&c.duration, "duration", 10*time.Second, "length of each run; at least 10s so runs cross the clients' NOP-Out intervals")
	sizeMiB := flag.Int64("size-mib", 1024, "LUN size in MiB")
	flag.StringVar(&c.dir, "dir", "", "directory for backing files (default /dev/shm, else the temp dir)")
	flag.StringVar(&c.out, "out", "bench/out", "directory for results.json, results.csv and daemon logs")
	flag.StringVar(&c.gotgtDir, "gotgt-cache", "", "where gotgt "+peer.GotgtVersion+" is built, outside the repository (default: user cache dir)")
	flag.StringVar(&only, "workloads", "", "comma-separated subset of: "+workloadNames())
	flag.Parse()
	c.size = *sizeMiB << 20
	c.peers = strings.Split(peers, ",")
	if only != "" {
		c.only = map[string]bool{}
		for _, w := range strings.Split(only, ",") {
			c.only[w] = true
		}
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, log, c)
	stop()
	if err != nil {
		log.Error("bench failed", "err", err)
		os.Exit(1)
	}
}

func workloadNames() string {
	var n []string
	for _, w := range workloads {
		n = append(n, w.Name)
	}
	return strings.Join(n, ",")
}

// peerRun is one started peer and what the bench knows about it.
type peerRun struct {
	label  string // unique: tgt, tgt#2
	target *peer.Target
	lbs    int  // logical block length
	once   bool // gotgt: one run per workload, it stalls under load
	// rate per workload, IOPS, to size qemu-img's request count.
	rate map[string]float64
}

func run(ctx context.Context, log *slog.Logger, c config) error {
	if c.duration < 10*time.Second {
		return fmt.Errorf("bench: -duration %s is under 10s", c.duration)
	}
	start := time.Now()
	if err := peer.EnsurePackages(ctx, log, "tgt", "libiscsi-bin", "qemu-utils", "qemu-block-extra"); err != nil {
		return err
	}
	if err := os.MkdirAll(c.out, 0o755); err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	out, err := filepath.Abs(c.out)
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	dataDir, err := backingDir(c.dir, c.size*int64(len(c.peers)))
	if err != nil {
		return err
	}
	defer os.RemoveAll(dataDir)
	buildDir, err := os.MkdirTemp("", "hasan-bench-bin-")
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	defer os.RemoveAll(buildDir)

	var peers []*peerRun
	defer func() {
		for _, p := range peers {
			if err := p.target.Close(); err != nil {
				log.Warn("stopping peer", "peer", p.label, "err", err)
			}
		}
	}()
	var skipped []string
	seen := map[string]int{}
	for _, name := range c.peers {
		seen[name]++
		label := name
		if seen[name] > 1 {
			label = fmt.Sprintf("%s#%d", name, seen[name])
		}
		o := peer.Options{
			Dir: dataDir, LogDir: out, Size: c.size,
			IQN: "iqn.2026-01.io.hasan:bench-" + strings.ReplaceAll(label, "#", "-"),
		}
		// Each peer instance needs its own file names in the shared dirs.
		o.Dir = filepath.Join(dataDir, strings.ReplaceAll(label, "#", "-"))
		if err := os.MkdirAll(o.Dir, 0o755); err != nil {
			return fmt.Errorf("bench: %w", err)
		}
		if seen[name] > 1 {
			o.LogDir = o.Dir
		}
		t, err := startPeer(ctx, log, name, o, buildDir, c.gotgtDir)
		if err != nil {
			if name == "gotgt" {
				// gotgt is an optional peer; its absence is reported, not fatal.
				log.Warn("gotgt skipped", "err", err)
				skipped = append(skipped, "gotgt: "+err.Error())
				continue
			}
			return err
		}
		p := &peerRun{label: label, target: t, once: name == "gotgt", rate: map[string]float64{}}
		peers = append(peers, p)
		if p.lbs, err = blockLength(ctx, t); err != nil {
			return err
		}
		log.Info("peer ready", "peer", label, "url", t.URL(0), "block", p.lbs)
	}

	rec := &recorder{started: start, cfg: c, skipped: skipped, loadStart: loadAvg()}
	for _, w := range workloads {
		if c.only != nil && !c.only[w.Name] {
			continue
		}
		if err := runWorkload(ctx, log, c, w, peers, rec); err != nil {
			return err
		}
	}
	rec.loadEnd = loadAvg()
	rec.wall = time.Since(start)
	if err := rec.write(out); err != nil {
		return err
	}
	rec.print(os.Stdout, peers)
	return nil
}

func startPeer(ctx context.Context, log *slog.Logger, name string, o peer.Options, buildDir, gotgtDir string) (*peer.Target, error) {
	switch name {
	case "hasan":
		bin := filepath.Join(buildDir, "hasan")
		if _, err := os.Stat(bin); err != nil {
			log.Info("building hasan")
			if bin, err = peer.BuildHasan(ctx, buildDir); err != nil {
				return nil, err
			}
		}
		return peer.StartHasan(ctx, bin, o)
	case "tgt":
		return peer.StartTgt(ctx, o)
	case "gotgt":
		if gotgtDir == "" {
			cache, err := os.UserCacheDir()
			if err != nil {
				return nil, fmt.Errorf("bench: gotgt cache: %w", err)
			}
			gotgtDir = filepath.Join(cache, "hasan-bench", "gotgt-"+peer.GotgtVersion)
		}
		bctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
		defer cancel()
		log.Info("building gotgt from the module proxy", "dir", gotgtDir)
		bin, err := peer.BuildGotgt(bctx, gotgtDir)
		if err != nil {
			return nil, err
		}
		return peer.StartGotgt(ctx, bin, o)
	}
	return nil, fmt.Errorf("bench: unknown peer %q (have hasan, tgt, gotgt)", name)
}

// runWorkload runs the repeats of one workload, alternating the peer order
// every repeat (A B, B A, ...) so slow drifts in machine load hit every peer
// alike.
func runWorkload(ctx context.Context, log *slog.Logger, c config, w workload, peers []*peerRun, rec *recorder) error {
	deadline := c.duration + 8*time.Second
	if w.Tool == "qemu-img" {
		// Calibrate the request count per peer with a short unrecorded run.
		for _, p := range peers {
			if p.once {
				// Not worth 15 s of a stalled calibration: guess.
				p.rate[w.Name] = float64(w.guessIOPS)
				continue
			}
			n := max(w.guessIOPS*3, 1000)
			r := runQemu(ctx, p.target, w, n, 15*time.Second)
			switch r.Status {
			case "ok":
				p.rate[w.Name] = r.IOPS
			default:
				p.rate[w.Name] = float64(w.guessIOPS)
				log.Warn("calibration run failed", "peer", p.label, "workload", w.Name, "status", r.Status, "detail", r.Detail)
			}
		}
	}
	for rep := 0; rep < c.repeats; rep++ {
		order := make([]*peerRun, len(peers))
		copy(order, peers)
		if rep%2 == 1 {
			for i, j := 0, len(order)-1; i < j; i, j = i+1, j-1 {
				order[i], order[j] = order[j], order[i]
			}
		}
		for _, p := range order {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if p.once && rep > 0 {
				continue
			}
			if !p.target.Alive() {
				rec.add(w, p, rep, result{Status: "error", Detail: "target process has exited"})
				continue
			}
			var r result
			// A slow but live peer gets room; gotgt, known to stall after a
			// few seconds of load, gets a short deadline and is reported
			// "stalled" instead of holding the bench up.
			perfDeadline, qemuDeadline := deadline, deadline+c.duration
			if p.once {
				perfDeadline, qemuDeadline = c.duration+5*time.Second, c.duration+5*time.Second
			}
			switch w.Tool {
			case "iscsi-perf":
				r = runPerf(ctx, p.target, w, p.lbs, c.duration, perfDeadline)
			case "qemu-img":
				// Aim 40% past the duration: the calibration run is short and
				// often faster than a sustained one, and a run must not end
				// under the duration.
				// A run that ends early (the calibration guessed low) is run
				// once more with the rate it just measured.
				for attempt := 0; attempt < 2; attempt++ {
					count := int(p.rate[w.Name] * c.duration.Seconds() * 1.4)
					r = runQemu(ctx, p.target, w, max(count, 1000), qemuDeadline)
					if r.Status != "ok" {
						break
					}
					p.rate[w.Name] = r.IOPS
					if r.Seconds >= c.duration.Seconds() {
						break
					}
					r.Status = "short"
					r.Detail = fmt.Sprintf("ran %.1fs, under %s", r.Seconds, c.duration)
					log.Info("run too short, repeating it", "workload", w.Name, "peer", p.label, "secs", r.Seconds)
				}
			}
			log.Info("run", "workload", w.Name, "peer", p.label, "repeat", rep+1, "status", r.Status,
				"iops", int(r.IOPS), "MiBps", int(r.MiBps(w.BlockSize)), "secs", fmt.Sprintf("%.1f", r.Seconds), "detail", r.Detail)
			rec.add(w, p, rep, r)
		}
	}
	return nil
}

// backingDir picks tmpfs when it has room for every peer's file plus slack.
func backingDir(dir string, need int64) (string, error) {
	if dir == "" {
		dir = os.TempDir()
		var st syscall.Statfs_t
		if err := syscall.Statfs("/dev/shm", &st); err == nil && int64(st.Bavail)*st.Bsize > need+need/2 {
			dir = "/dev/shm"
		}
	}
	d, err := os.MkdirTemp(dir, "hasan-bench-")
	if err != nil {
		return "", fmt.Errorf("bench: backing dir: %w", err)
	}
	return d, nil
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
