package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"time"
)

// ProcSpec describes a process to start in a namespace.
type ProcSpec struct {
	// Name labels the process in logs; its output goes to NODE-NAME.log in
	// the lab directory.
	Name string
	// Argv is the program and its arguments.
	Argv []string
	// Env is added to the test's environment.
	Env []string
	// Dir is the working directory (default: the lab directory).
	Dir string
}

// Process is a process the lab started. Its output is captured to LogPath
// and printed by Start's cleanup when the test fails.
type Process struct {
	Name    string
	LogPath string

	cmd  *exec.Cmd
	done chan struct{}
	err  error // valid once done is closed
}

// startProcess runs spec inside ns through `ip netns exec` (which execs the
// program, so the pid is the program's). pgid 0 makes the process a group
// leader; otherwise it joins group pgid. The parent-death signal kills it
// if the test binary dies before any cleanup can run.
func startProcess(sp *spawner, ns, logPath, dir string, pgid int, spec ProcSpec) (*Process, error) {
	if len(spec.Argv) == 0 {
		return nil, errors.New("lab: start: empty Argv")
	}
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lab: process log: %w", err)
	}
	fmt.Fprintf(logf, "=== %s start %v\n", time.Now().Format(time.RFC3339Nano), spec.Argv)
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns}, spec.Argv...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = dir
	if spec.Dir != "" {
		cmd.Dir = spec.Dir
	}
	if spec.Env != nil {
		cmd.Env = append(os.Environ(), spec.Env...)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pgid: pgid, Pdeathsig: syscall.SIGKILL}
	if err := sp.start(cmd); err != nil {
		logf.Close()
		return nil, fmt.Errorf("lab: start %s in %s: %w", spec.Name, ns, err)
	}
	p := &Process{Name: spec.Name, LogPath: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		fmt.Fprintf(logf, "=== %s exit: %v\n", time.Now().Format(time.RFC3339Nano), p.err)
		logf.Close()
		close(p.done)
	}()
	return p, nil
}

// Pid is the process id.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Done is closed once the process has exited and been reaped.
func (p *Process) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited (and been reaped).
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Err is the process's exit error; it is valid once Done is closed.
func (p *Process) Err() error {
	<-p.done
	return p.err
}

// Wait waits for the process to exit or ctx to end.
func (p *Process) Wait(ctx context.Context) error {
	select {
	case <-p.done:
		return p.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Signal sends sig to the process (not its group).
func (p *Process) Signal(sig syscall.Signal) error {
	if p.Exited() {
		return nil
	}
	return syscall.Kill(p.Pid(), sig)
}

// Kill SIGKILLs the process and waits until it is reaped.
func (p *Process) Kill() {
	_ = p.Signal(syscall.SIGKILL)
	<-p.done
}

// Stop sends SIGTERM and waits up to grace, then SIGKILLs. It returns the
// exit error of a process that stopped by itself within grace.
func (p *Process) Stop(grace time.Duration) error {
	if p.Exited() {
		return p.err
	}
	_ = p.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return p.err
	case <-time.After(grace):
	}
	p.Kill()
	return fmt.Errorf("lab: %s did not stop within %v after SIGTERM", p.Name, grace)
}
