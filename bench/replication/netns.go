package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The veth pair's addresses: link-local, configured only inside the two
// namespaces this program creates, so no packet can reach another host.
const (
	primaryIP = "169.254.213.1"
	replicaIP = "169.254.213.2"
	replPort  = "7600"
	tlsPort   = "7602"
	ctlPort   = "7601"
	nsPrefix  = "hrb-"
)

type netns struct {
	log        *slog.Logger
	prim, repl string // namespace names
	vethP      string
}

func ipCmd(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// setupNetns creates both namespaces and the veth pair. On error it has
// already removed whatever it created.
func setupNetns(ctx context.Context, log *slog.Logger) (*netns, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("bench/replication: needs root for ip netns")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return nil, fmt.Errorf("bench/replication: iproute2 missing: %w", err)
	}
	removeStale(ctx, log)
	pid := strconv.Itoa(os.Getpid())
	n := &netns{log: log, prim: nsPrefix + "p-" + pid, repl: nsPrefix + "r-" + pid, vethP: "hrbp" + pid}
	vethR := "hrbr" + pid
	steps := [][]string{
		{"netns", "add", n.prim},
		{"netns", "add", n.repl},
		{"link", "add", n.vethP, "type", "veth", "peer", "name", vethR},
		{"link", "set", n.vethP, "netns", n.prim},
		{"link", "set", vethR, "netns", n.repl},
		{"-n", n.prim, "addr", "add", primaryIP + "/30", "dev", n.vethP},
		{"-n", n.repl, "addr", "add", replicaIP + "/30", "dev", vethR},
		{"-n", n.prim, "link", "set", "lo", "up"},
		{"-n", n.repl, "link", "set", "lo", "up"},
		{"-n", n.prim, "link", "set", n.vethP, "up"},
		{"-n", n.repl, "link", "set", vethR, "up"},
	}
	for _, s := range steps {
		if err := ipCmd(ctx, s...); err != nil {
			n.delete()
			return nil, fmt.Errorf("bench/replication: %w", err)
		}
	}
	return n, nil
}

// delete removes both namespaces; the veth pair goes with them. It does
// not use the caller's context: cleanup must run after Ctrl-C too.
func (n *netns) delete() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, ns := range []string{n.prim, n.repl} {
		if err := ipCmd(ctx, "netns", "del", ns); err != nil && !strings.Contains(err.Error(), "No such file") {
			n.log.Warn("deleting namespace", "ns", ns, "err", err)
		}
	}
	// If the pair never moved into a namespace it is still here.
	ipCmd(ctx, "link", "del", n.vethP)
}

// removeStale deletes namespaces left by an earlier run whose coordinator
// is gone (killed with SIGKILL, so it could not clean up).
func removeStale(ctx context.Context, log *slog.Logger) {
	out, err := exec.CommandContext(ctx, "ip", "netns", "list").Output()
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || !strings.HasPrefix(f[0], nsPrefix) {
			continue
		}
		name := f[0]
		pid, err := strconv.Atoi(name[strings.LastIndex(name, "-")+1:])
		if err != nil || syscall.Kill(pid, 0) == nil {
			continue
		}
		log.Info("removing a stale namespace from an earlier run", "ns", name)
		ipCmd(ctx, "netns", "del", name)
	}
}

// child is a re-executed copy of this program in a namespace.
type child struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan string
	done  chan error
}

func startChild(ns string, stdout io.Writer, args ...string) (*child, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("bench/replication: %w", err)
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns, exe}, args...)...)
	cmd.Stderr = os.Stderr
	// ip netns exec execs the program in place, so the parent-death signal
	// reaches it too.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	c := &child{cmd: cmd, stdin: stdin, lines: make(chan string, 16), done: make(chan error, 1)}
	pr, pw := io.Pipe()
	cmd.Stdout = pw
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("bench/replication: start child: %w", err)
	}
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			l := sc.Text()
			if strings.HasPrefix(l, "@") {
				c.lines <- l
				continue
			}
			fmt.Fprintln(stdout, l)
		}
	}()
	go func() { c.done <- cmd.Wait(); pw.Close() }()
	return c, nil
}

// waitLine waits for a control line ("@..."), the child's exit or timeout.
func (c *child) waitLine(ctx context.Context, d time.Duration) (string, error) {
	select {
	case l := <-c.lines:
		return l, nil
	case err := <-c.done:
		c.done <- err
		return "", fmt.Errorf("bench/replication: child exited: %v", err)
	case <-time.After(d):
		return "", errors.New("bench/replication: child did not report in time")
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

// stop closes the child's stdin (it exits on EOF), then kills its process
// group if it lingers.
func (c *child) stop() {
	c.stdin.Close()
	select {
	case err := <-c.done:
		c.done <- err
		return
	case <-time.After(3 * time.Second):
	}
	syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL)
	err := <-c.done
	c.done <- err
}

func coordinate(ctx context.Context, log *slog.Logger, o options) error {
	start := time.Now()
	ns, err := setupNetns(ctx, log)
	if err != nil {
		return err
	}
	defer ns.delete()
	dir := o.dir
	if dir == "" {
		dir = "/dev/shm"
	}
	data, err := os.MkdirTemp(dir, "hasan-bench-repl-")
	if err != nil {
		return fmt.Errorf("bench/replication: %w", err)
	}
	defer os.RemoveAll(data)
	certs := filepath.Join(data, "certs")
	if err := writeCerts(certs); err != nil {
		return err
	}
	disk := ""
	if o.diskDir != "" {
		if disk, err = os.MkdirTemp(o.diskDir, "hasan-bench-repl-"); err != nil {
			return fmt.Errorf("bench/replication: %w", err)
		}
		defer os.RemoveAll(disk)
	}
	sub := func(base, role string) string {
		if base == "" {
			return ""
		}
		return filepath.Join(base, role)
	}
	log.Info("namespaces ready", "primary", ns.prim, "replica", ns.repl, "data", data, "disk", disk)

	rargs := []string{"-role", "replica", "-dir", filepath.Join(data, "replica"), "-disk-dir", sub(disk, "replica"), "-certs", certs,
		"-listen", replicaIP + ":" + replPort, "-tls-listen", replicaIP + ":" + tlsPort, "-ctl", replicaIP + ":" + ctlPort}
	if o.cpuprof != "" {
		prof, err := filepath.Abs(o.cpuprof)
		if err != nil {
			return fmt.Errorf("bench/replication: %w", err)
		}
		rargs = append(rargs, "-cpuprofile", prof)
	}
	rep, err := startChild(ns.repl, os.Stdout, rargs...)
	if err != nil {
		return err
	}
	defer rep.stop()
	if l, err := rep.waitLine(ctx, 20*time.Second); err != nil || l != "@ready" {
		return fmt.Errorf("bench/replication: replica did not start: %q %v", l, err)
	}
	out := o.out
	if out != "" {
		if out, err = filepath.Abs(out); err != nil {
			return fmt.Errorf("bench/replication: %w", err)
		}
	}
	args := []string{"-role", "primary", "-dir", filepath.Join(data, "primary"), "-disk-dir", sub(disk, "primary"), "-certs", certs,
		"-replica", replicaIP, "-repeats", strconv.Itoa(o.repeats), "-duration", o.duration.String(),
		"-size-mib", strconv.FormatInt(o.sizeMiB, 10), "-qd", strconv.Itoa(o.qd), "-tls=" + strconv.FormatBool(o.tls),
		"-out", out, "-rows", o.rows}
	if o.cpuprof != "" {
		prof, err := filepath.Abs(o.cpuprof)
		if err != nil {
			return fmt.Errorf("bench/replication: %w", err)
		}
		args = append(args, "-cpuprofile", prof)
	}
	prim, err := startChild(ns.prim, os.Stdout, args...)
	if err != nil {
		return err
	}
	defer prim.stop()
	select {
	case err := <-prim.done:
		prim.done <- err
		if err != nil {
			return fmt.Errorf("bench/replication: primary: %w", err)
		}
	case <-ctx.Done():
		return ctx.Err()
	}
	log.Info("done", "wall", time.Since(start).Round(time.Second).String())
	return nil
}
