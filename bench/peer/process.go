package peer

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"time"
)

// process is one daemon in its own process group. The group lets Close reach
// helpers the daemon forks, and the parent-death signal kills the daemon if the
// harness itself is killed before it can clean up.
type process struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error // valid once done is closed
}

func startProcess(logPath string, env []string, name string, args ...string) (*process, error) {
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("peer: daemon log: %w", err)
	}
	cmd := exec.Command(name, args...)
	cmd.Stdout = logf
	cmd.Stderr = logf
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("peer: start %s: %w", name, err)
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	return p, nil
}

// exited reports whether the daemon has already stopped, which turns a
// readiness wait into an immediate, explained failure.
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM to the group, then SIGKILL after grace.
func (p *process) stop(grace time.Duration) {
	if p.exited() {
		return
	}
	pgid := p.cmd.Process.Pid
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-p.done:
		return
	case <-time.After(grace):
	}
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	<-p.done
}

// FreePort returns a TCP port on 127.0.0.1 that nothing listens on right now.
// Another process may take it before the caller binds it; daemons that then
// fail to start are reported as such rather than retried silently.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("peer: free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// waitTCP waits until addr accepts connections, the process exits, or the
// deadline passes. dial is swapped for gotgt, whose port is in another netns.
func waitTCP(ctx context.Context, p *process, timeout time.Duration, dial func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		if p.exited() {
			return fmt.Errorf("peer: daemon exited before listening: %v", p.err)
		}
		dctx, dcancel := context.WithTimeout(ctx, time.Second)
		err := dial(dctx)
		dcancel()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("peer: daemon not listening after %s: %w", timeout, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func dialLoopback(addr string) func(context.Context) error {
	return func(ctx context.Context) error {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return err
		}
		return c.Close()
	}
}

// PrepareFile creates a fresh backing file of size bytes. A thick file has
// every block allocated up front, as a preallocated production LUN would; a
// thin file is sparse.
func PrepareFile(path string, size int64, thin bool) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("peer: remove old backing file: %w", err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("peer: create backing file: %w", err)
	}
	defer f.Close()
	if thin {
		if err := f.Truncate(size); err != nil {
			return fmt.Errorf("peer: size backing file: %w", err)
		}
		return nil
	}
	if err := syscall.Fallocate(int(f.Fd()), 0, 0, size); err != nil {
		return fmt.Errorf("peer: preallocate backing file: %w", err)
	}
	return nil
}

// sizeArg renders size the way `hasan target run --lun 0=PATH,size=1G` takes it.
func sizeArg(size int64) string {
	switch {
	case size%(1<<30) == 0:
		return strconv.FormatInt(size>>30, 10) + "G"
	case size%(1<<20) == 0:
		return strconv.FormatInt(size>>20, 10) + "M"
	default:
		return strconv.FormatInt(size, 10)
	}
}
