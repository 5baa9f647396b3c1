package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// NS is one named network namespace of the lab (/var/run/netns/NAME).
type NS struct {
	name string
	lab  *Lab
}

// Name is the namespace name, usable with `ip netns exec NAME` and
// `ip -n NAME`.
func (s *NS) Name() string { return s.name }

// Path is the namespace's bind mount, what vip.Config.NetNS and
// netns.GetFromPath take.
func (s *NS) Path() string { return "/var/run/netns/" + s.name }

// Run runs a short command inside the namespace and returns its combined
// output. It is not part of any node's process group: use Node.Start for
// anything that must die with the node.
func (s *NS) Run(ctx context.Context, argv ...string) (string, error) {
	if len(argv) == 0 {
		return "", errors.New("lab: Run: empty command")
	}
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", s.name}, argv...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var buf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &buf, &buf
	err := s.lab.spawn.start(cmd)
	if err == nil {
		err = cmd.Wait()
	}
	out := buf.Bytes()
	if err != nil {
		return string(out), fmt.Errorf("lab: %s: %s: %w: %s", s.name, strings.Join(argv, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// Do runs f on an OS thread that has entered the namespace, so sockets f
// creates belong to it. The thread goes back to its own namespace
// afterwards; if that fails it stays locked and the Go runtime discards it,
// so no goroutine ever runs in a foreign namespace by accident.
func (s *NS) Do(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- fmt.Errorf("lab: own netns: %w", err)
			return
		}
		defer unix.Close(orig)
		fd, err := unix.Open(s.Path(), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- fmt.Errorf("lab: open netns %s: %w", s.name, err)
			return
		}
		err = unix.Setns(fd, unix.CLONE_NEWNET)
		unix.Close(fd)
		if err != nil {
			errc <- fmt.Errorf("lab: setns %s: %w", s.name, err)
			return
		}
		err = f()
		if unix.Setns(orig, unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// spawner starts every child process of a lab from one locked OS thread
// that lives as long as the lab. A child's parent-death signal fires when
// the thread that forked it exits, not the process (golang/go#27505); Go
// discards threads (for example after a failed Do), so forking from
// arbitrary threads would kill children at random. Forking here ties them
// to the lab instead, and still kills them if the test binary dies.
type spawner struct {
	reqs chan spawnReq
	quit chan struct{}
}

type spawnReq struct {
	cmd *exec.Cmd
	res chan error
}

func newSpawner() *spawner {
	s := &spawner{reqs: make(chan spawnReq), quit: make(chan struct{})}
	go func() {
		runtime.LockOSThread()
		// Never unlocked: when the lab closes, this thread exits and any
		// child still alive gets its SIGKILL.
		for {
			select {
			case r := <-s.reqs:
				r.res <- r.cmd.Start()
			case <-s.quit:
				return
			}
		}
	}()
	return s
}

// start runs cmd.Start on the spawner thread.
func (s *spawner) start(cmd *exec.Cmd) error {
	r := spawnReq{cmd: cmd, res: make(chan error, 1)}
	select {
	case s.reqs <- r:
		return <-r.res
	case <-s.quit:
		return errors.New("lab: closed")
	}
}

func (s *spawner) stop() { close(s.quit) }

// DialContext dials from inside the namespace. Its signature fits
// net.Dialer.DialContext, so clients that take a dial function (the
// failover probe's initiator, HTTP transports) can run "from" this host.
func (s *NS) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := s.Do(func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// Listen opens a TCP or UDP listener inside the namespace.
func (s *NS) Listen(network, addr string) (net.Listener, error) {
	var ln net.Listener
	err := s.Do(func() error {
		var err error
		ln, err = net.Listen(network, addr)
		return err
	})
	return ln, err
}

// PIDs lists the processes whose network namespace is this one (what
// `ip netns pids` reports).
func (s *NS) PIDs() ([]int, error) {
	out, err := exec.Command("ip", "netns", "pids", s.name).Output()
	if err != nil {
		return nil, fmt.Errorf("lab: ip netns pids %s: %w", s.name, err)
	}
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		if p, err := strconv.Atoi(f); err == nil {
			pids = append(pids, p)
		}
	}
	return pids, nil
}

// killAll SIGKILLs every process in the namespace and returns once none is
// left (SIGKILL is asynchronous: a process killed on a busy machine may run
// for a moment more). Processes forked while we kill are caught by the next
// round.
func (s *NS) killAll() error {
	deadline := time.Now().Add(5 * time.Second)
	for round := 0; ; round++ {
		pids, err := s.PIDs()
		if err != nil {
			return err
		}
		if len(pids) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("lab: %s: pids %v survive SIGKILL", s.name, pids)
		}
		for _, p := range pids {
			_ = syscall.Kill(p, syscall.SIGKILL)
		}
		if round > 0 {
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// ProcAlive reports whether pid exists, is not a zombie and is not
// exiting: a SIGKILLed process nobody has reaped yet no longer runs, and
// one the kernel is still tearing down (PF_EXITING; it may sit in D state
// for a while on a busy disk, and has already left its namespaces) never
// returns to user space.
func ProcAlive(pid int) bool {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 >= len(s) {
		return false
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 7 || f[0] == "Z" || f[0] == "X" {
		return false
	}
	const pfExiting = 0x4
	flags, err := strconv.ParseUint(f[6], 10, 64)
	return err != nil || flags&pfExiting == 0
}
