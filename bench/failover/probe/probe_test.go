package probe

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/bench/failover/initiator"
	"github.com/hasan-storage/hasan/target"
	"github.com/hasan-storage/hasan/target/filebackend"
	"github.com/hasan-storage/hasan/target/scsi"
)

// hasanBin is built once by TestMain.
var hasanBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "probe-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	hasanBin = filepath.Join(dir, "hasan")
	code := func() int {
		defer os.RemoveAll(dir)
		if err := build(hasanBin); err != nil {
			fmt.Fprintln(os.Stderr, "probe tests: build hasan:", err)
			return 1
		}
		return m.Run()
	}()
	os.Exit(code)
}

func build(out string) error {
	root, err := moduleRoot()
	if err != nil {
		return err
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = "/usr/local/go/bin/go"
	}
	cmd := exec.Command(goBin, "build", "-o", out, "./cmd/hasan")
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%w: %s", err, b)
	}
	return nil
}

func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("go.mod not found")
		}
		dir = parent
	}
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

const iqn = "iqn.2026-11.io.hasan:failover-test"

func standalone(t *testing.T) *Standalone {
	t.Helper()
	dir := t.TempDir()
	tg := &Standalone{Bin: hasanBin, Listen: freePort(t), IQN: iqn, File: filepath.Join(dir, "lun.img"),
		Size: 16 << 20, Log: filepath.Join(dir, "target.log")}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := tg.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		tg.Kill()
		if t.Failed() {
			b, _ := os.ReadFile(tg.Log)
			t.Logf("target log:\n%s", b)
		}
	})
	return tg
}

func probeConfig(tg *Standalone) Config {
	return Config{Initiator: initiator.Config{Portal: tg.Listen, Target: tg.IQN}}
}

func TestSteadyStateHasNoGap(t *testing.T) {
	tg := standalone(t)
	p := New(probeConfig(tg))
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	res, err := p.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%+v", res)
	if res.Pairs < 10 || res.IOErrors != 0 || res.Reconnects != 0 || res.LostWrites != 0 {
		t.Fatalf("steady state: %+v", res)
	}
	// The interval is 100 ms; on a busy 2-core machine allow scheduling
	// noise, but nothing like an outage.
	if g := time.Duration(res.Gap); g < 90*time.Millisecond || g > 400*time.Millisecond {
		t.Fatalf("steady-state gap %v", g)
	}
}

// TestKillRestartGap kills -9 the target and restarts it after down: the gap
// must cover the outage and exceed it only by restart plus reconnect time.
func TestKillRestartGap(t *testing.T) {
	tg := standalone(t)
	const down = 500 * time.Millisecond
	sc := Scenario{
		Name:    "kill -9 + restart after 500ms",
		Disrupt: func(ctx context.Context, _ int) error { return tg.KillRestart(ctx, down) },
	}
	sum, err := Repeat(context.Background(), probeConfig(tg), sc, 3, func(r Run) {
		t.Logf("run %d: gap %v pairs %d io_errors %d reconnects %d login_failures %d lost %d %s",
			r.Run, r.Gap, r.Pairs, r.IOErrors, r.Reconnects, r.LoginFailures, r.LostWrites, r.Error)
	})
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	sum.WriteHuman(&b)
	t.Log("\n" + b.String())
	if sum.Failed != 0 || sum.LostWrites != 0 {
		t.Fatalf("failed runs %d, lost writes %d", sum.Failed, sum.LostWrites)
	}
	for i, g := range sum.Gaps {
		// Lower bound: nothing can be served while the target is down.
		// Upper bound: restart (exec, open the file, listen) and the
		// client's retry (50 ms), login and next tick (100 ms) fit well in
		// 700 ms on this machine; a probe that slept through the outage or
		// failed to notice recovery would not.
		if d := time.Duration(g); d < down || d > down+700*time.Millisecond {
			t.Errorf("run %d: gap %v, want within [%v, %v]", i, d, down, down+700*time.Millisecond)
		}
	}
	if sum.IOErrors < 3 || sum.Reconnects < 3 {
		t.Fatalf("a kill must show as an I/O error and a reconnect per run: %+v", sum)
	}
}

// TestLostWriteDetected restarts the target on a fresh, empty file: every
// acknowledged block is gone and the probe must say so.
func TestLostWriteDetected(t *testing.T) {
	tg := standalone(t)
	p := New(probeConfig(tg))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	type out struct {
		r   Result
		err error
	}
	done := make(chan out, 1)
	go func() { r, err := p.Run(ctx); done <- out{r, err} }()
	if err := p.WaitPairs(ctx, 5); err != nil {
		t.Fatal(err)
	}
	tg.Kill()
	if err := os.Remove(tg.File); err != nil {
		t.Fatal(err)
	}
	if err := tg.Start(ctx); err != nil {
		t.Fatal(err)
	}
	o := <-done
	t.Logf("result %+v err %v", o.r, o.err)
	if !errors.Is(o.err, ErrLostWrite) || o.r.LostWrites == 0 {
		t.Fatalf("restart on an empty file: err %v, lost %d", o.err, o.r.LostWrites)
	}
	if !strings.Contains(o.r.Lost[0], "zeros") {
		t.Fatalf("lost write description: %q", o.r.Lost[0])
	}
}

// lyingBackend acknowledges writes without storing them once lie is set.
type lyingBackend struct {
	*filebackend.File
	lie atomic.Bool
}

func (b *lyingBackend) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if b.lie.Load() {
		return nil
	}
	return b.File.WriteAt(ctx, p, off, fua)
}

// TestDroppedWriteSameSession: a target that acknowledges a write but does
// not keep it must be caught by the read-back, without any reconnect.
func TestDroppedWriteSameSession(t *testing.T) {
	srv := target.NewServer(target.Config{Logger: slog.New(slog.DiscardHandler)})
	if err := srv.AddTarget(target.TargetConfig{Name: iqn}); err != nil {
		t.Fatal(err)
	}
	f, err := filebackend.Open(filepath.Join(t.TempDir(), "lun.img"), filebackend.Options{Size: 1 << 20, Create: true})
	if err != nil {
		t.Fatal(err)
	}
	be := &lyingBackend{File: f}
	lu, err := scsi.New(scsi.Config{VolumeID: [16]byte{9}, BlockSize: 512, Backend: be})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.AddLUN(iqn, 0, lu); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	defer func() { srv.Close(); f.Close() }()

	p := New(Config{Initiator: initiator.Config{Portal: ln.Addr().String(), Target: iqn}})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	done := make(chan error, 1)
	var res Result
	go func() { var err error; res, err = p.Run(ctx); done <- err }()
	if err := p.WaitPairs(ctx, 3); err != nil {
		t.Fatal(err)
	}
	be.lie.Store(true)
	err = <-done
	if !errors.Is(err, ErrLostWrite) || res.Reconnects != 0 || !strings.Contains(res.Lost[0], "same session") {
		t.Fatalf("dropped write: err %v result %+v", err, res)
	}
}

func TestPercentile(t *testing.T) {
	v := []Seconds{}
	for i := 1; i <= 10; i++ {
		v = append(v, Seconds(time.Duration(i)*time.Second))
	}
	if got := Percentile(v, 50); got != Seconds(5*time.Second) {
		t.Fatalf("p50 %v", got)
	}
	if got := Percentile(v, 99); got != Seconds(10*time.Second) {
		t.Fatalf("p99 of 10 %v", got)
	}
	if got := Percentile(v[:1], 99); got != Seconds(time.Second) {
		t.Fatalf("p99 of 1 %v", got)
	}
	if Percentile(nil, 50) != 0 {
		t.Fatal("empty")
	}
}
