// Command failover measures the failover gap of an iSCSI portal with the
// issue-5 probe (package probe): FUA write + read-back every 100 ms, 0.3 s
// login deadline, 1 s I/O deadline, re-login on error, ring check after every
// re-login.
//
//	go run ./bench/failover -scenario restart -repeats 10 -down 500ms
//	    kill -9 a standalone `hasan target run` and restart it after -down,
//	    -repeats times; p50/p99 of the gap
//	go run ./bench/failover -scenario watch -portal 10.77.1.200:3260 -iqn IQN [-duration 60s]
//	    probe any portal until -duration or Ctrl-C while you disrupt it by
//	    hand (move a VIP, kill a node)
//
// The cluster scenarios (owner crash fenced through IPMI, owner power loss,
// planned move, each on a namespace cluster) use the same probe and driver
// from TestFailoverBench in test/cluster (`make bench`).
//
// Standard output gets one JSON line per run and a final summary line
// ({"summary":...}); standard error gets the human summary. The exit status
// is 1 when an acknowledged write was lost or a run never recovered.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/hasan-storage/hasan/bench/failover/initiator"
	"github.com/hasan-storage/hasan/bench/failover/probe"
)

type options struct {
	scenario string
	repeats  int
	down     time.Duration
	hasan    string
	dir      string
	portal   string
	iqn      string
	lun      uint64
	chapUser string
	chapPass string
	duration time.Duration
	interval time.Duration
	login    time.Duration
	io       time.Duration
	verbose  bool
}

func main() {
	var o options
	flag.StringVar(&o.scenario, "scenario", "restart", "restart (kill -9 and restart a standalone hasan target) or watch (probe -portal)")
	flag.IntVar(&o.repeats, "repeats", 10, "restart: number of runs")
	flag.DurationVar(&o.down, "down", 500*time.Millisecond, "restart: how long the target stays dead")
	flag.StringVar(&o.hasan, "hasan", "", "restart: hasan binary (default: go build ./cmd/hasan into a temp dir)")
	flag.StringVar(&o.dir, "dir", "", "restart: directory for the LUN file and target log (default /dev/shm or the temp dir)")
	flag.StringVar(&o.portal, "portal", "", "watch: portal host:port")
	flag.StringVar(&o.iqn, "iqn", "", "watch: target IQN")
	flag.Uint64Var(&o.lun, "lun", 0, "watch: LUN")
	flag.StringVar(&o.chapUser, "chap-user", "", "watch: CHAP user")
	flag.StringVar(&o.chapPass, "chap-secret", "", "watch: CHAP secret")
	flag.DurationVar(&o.duration, "duration", 0, "watch: stop after this long (default: until Ctrl-C)")
	flag.DurationVar(&o.interval, "interval", 100*time.Millisecond, "time between write+read pairs")
	flag.DurationVar(&o.login, "login-timeout", 300*time.Millisecond, "login deadline")
	flag.DurationVar(&o.io, "io-timeout", time.Second, "I/O deadline per command")
	flag.BoolVar(&o.verbose, "v", false, "log every error and login")
	flag.Parse()

	level := slog.LevelInfo
	if o.verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var ok bool
	var err error
	switch o.scenario {
	case "restart":
		ok, err = runRestart(ctx, log, o)
	case "watch":
		ok, err = runWatch(ctx, log, o)
	default:
		err = fmt.Errorf("-scenario %q: want restart or watch", o.scenario)
	}
	if err != nil {
		log.Error("failover bench failed", "err", err)
		os.Exit(2)
	}
	if !ok {
		os.Exit(1)
	}
}

func (o options) probeConfig(log *slog.Logger, ini initiator.Config) probe.Config {
	return probe.Config{Initiator: ini, Interval: o.interval, LoginTimeout: o.login, IOTimeout: o.io, Logger: log}
}

func emit(v any) {
	b, _ := json.Marshal(v)
	fmt.Println(string(b))
}

func runRestart(ctx context.Context, log *slog.Logger, o options) (bool, error) {
	dir := o.dir
	if dir == "" {
		dir = os.TempDir()
		if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
			dir = "/dev/shm"
		}
	}
	work, err := os.MkdirTemp(dir, "hasan-failover-")
	if err != nil {
		return false, err
	}
	defer os.RemoveAll(work)
	bin := o.hasan
	if bin == "" {
		bin = filepath.Join(work, "hasan")
		log.Info("building hasan", "out", bin)
		cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/hasan")
		if out, err := cmd.CombinedOutput(); err != nil {
			return false, fmt.Errorf("go build ./cmd/hasan (run from the repository root): %w: %s", err, out)
		}
	}
	port, err := freePort()
	if err != nil {
		return false, err
	}
	tg := &probe.Standalone{Bin: bin, Listen: port, IQN: "iqn.2026-11.io.hasan:failover-bench",
		File: filepath.Join(work, "lun.img"), Size: 64 << 20, Log: filepath.Join(work, "target.log")}
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err = tg.Start(sctx)
	cancel()
	if err != nil {
		return false, err
	}
	defer tg.Kill()
	sc := probe.Scenario{
		Name:    fmt.Sprintf("standalone kill -9, restart after %v", o.down),
		Disrupt: func(ctx context.Context, _ int) error { return tg.KillRestart(ctx, o.down) },
	}
	cfg := o.probeConfig(log, initiator.Config{Portal: tg.Listen, Target: tg.IQN})
	sum, err := probe.Repeat(ctx, cfg, sc, o.repeats, func(r probe.Run) { emit(r) })
	emit(map[string]any{"summary": sum})
	sum.WriteHuman(os.Stderr)
	fmt.Fprintf(os.Stderr, "  gap - outage (%v) = restart + re-login + the probe's phase within its interval (p50 %.3f s)\n", o.down,
		time.Duration(sum.P50).Seconds()-o.down.Seconds())
	return sum.Failed == 0 && sum.LostWrites == 0, err
}

func runWatch(ctx context.Context, log *slog.Logger, o options) (bool, error) {
	if o.portal == "" || o.iqn == "" {
		return false, fmt.Errorf("-scenario watch needs -portal and -iqn")
	}
	if o.duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, o.duration)
		defer cancel()
	}
	p := probe.New(o.probeConfig(log, initiator.Config{Portal: o.portal, Target: o.iqn, LUN: o.lun, CHAPUser: o.chapUser, CHAPSecret: o.chapPass}))
	res, err := p.Run(ctx)
	emit(res)
	if err != nil {
		fmt.Fprintln(os.Stderr, "probe stopped:", err)
	}
	fmt.Fprintf(os.Stderr, "failover probe on %s %s: %d pairs, gap %.3f s, I/O errors %d, reconnects %d, failed logins %d, lost acknowledged writes %d\n",
		o.portal, o.iqn, res.Pairs, time.Duration(res.Gap).Seconds(), res.IOErrors, res.Reconnects, res.LoginFailures, res.LostWrites)
	for _, l := range res.Lost {
		fmt.Fprintln(os.Stderr, "  LOST:", l)
	}
	if res.Pairs == 0 {
		return false, fmt.Errorf("no verified I/O at all: %s", res.LastError)
	}
	return res.LostWrites == 0, nil
}

func freePort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}
