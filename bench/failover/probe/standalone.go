package probe

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"syscall"
	"time"
)

// Standalone runs `hasan target run` serving one file LUN, and can kill -9
// and restart it: the simplest failover there is, usable without a
// cluster (the gap is then restart time plus the client's reconnect).
type Standalone struct {
	// Bin is the hasan binary.
	Bin string
	// Listen is the portal (127.0.0.1:PORT).
	Listen string
	IQN    string
	// File backs LUN 0; Size creates it when missing.
	File string
	Size int64
	// Log receives the target's output (appended across restarts).
	Log string

	cmd  *exec.Cmd
	done chan struct{}
}

// Start launches the target and returns once the portal accepts
// connections.
func (t *Standalone) Start(ctx context.Context) error {
	if t.cmd != nil && !t.exited() {
		return errors.New("probe: standalone target already running")
	}
	lun := fmt.Sprintf("0=%s,size=%d", t.File, t.Size)
	cmd := exec.Command(t.Bin, "target", "run", "--listen", t.Listen, "--iqn", t.IQN, "--lun", lun)
	if t.Log != "" {
		f, err := os.OpenFile(t.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return fmt.Errorf("probe: target log: %w", err)
		}
		defer f.Close() // the child has its own descriptor
		cmd.Stdout, cmd.Stderr = f, f
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("probe: start target: %w", err)
	}
	t.cmd, t.done = cmd, make(chan struct{})
	go func(done chan struct{}) { _ = cmd.Wait(); close(done) }(t.done)
	for {
		var d net.Dialer
		dctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		c, err := d.DialContext(dctx, "tcp", t.Listen)
		cancel()
		if err == nil {
			c.Close()
			return nil
		}
		if t.exited() {
			return fmt.Errorf("probe: target exited before listening (see %s)", t.Log)
		}
		select {
		case <-ctx.Done():
			t.Kill()
			return fmt.Errorf("probe: target not listening on %s: %w", t.Listen, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func (t *Standalone) exited() bool {
	select {
	case <-t.done:
		return true
	default:
		return false
	}
}

// Kill SIGKILLs the target (and anything in its process group) and waits
// until it is gone: a crash, with no chance to close sessions.
func (t *Standalone) Kill() {
	if t.cmd == nil || t.exited() {
		return
	}
	_ = syscall.Kill(-t.cmd.Process.Pid, syscall.SIGKILL)
	<-t.done
}

// KillRestart kills the target, waits down, and starts it again.
func (t *Standalone) KillRestart(ctx context.Context, down time.Duration) error {
	t.Kill()
	if !sleep(ctx, down) {
		return ctx.Err()
	}
	return t.Start(ctx)
}
