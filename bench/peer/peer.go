package peer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// CHAP is a one-way CHAP account the initiator logs in with.
type CHAP struct {
	User   string
	Secret string
}

// Options describe the one LUN every peer serves.
type Options struct {
	// Dir holds the backing file. It must exist.
	Dir string
	// LogDir holds the daemon log, <peer>.log; empty means Dir.
	LogDir string
	// IQN is the target name.
	IQN string
	// Size of the LUN in bytes.
	Size int64
	// Thin makes the backing file sparse and, where the peer supports it,
	// announces thin provisioning (UNMAP, GET LBA STATUS).
	Thin bool
	// CHAP, when set, is required at login.
	CHAP *CHAP
	// Portals is how many listen addresses to open (0 means 1). Only hasan
	// honours more than one; the others report a single portal.
	Portals int
}

func (o Options) backingFile(peer string) string { return filepath.Join(o.Dir, peer+"-lun.img") }

// LogPath is where the daemon's output goes.
func (o Options) LogPath(peer string) string {
	if o.LogDir != "" {
		return filepath.Join(o.LogDir, peer+".log")
	}
	return filepath.Join(o.Dir, peer+".log")
}

// Target is a running peer serving one LUN.
type Target struct {
	// Name is the peer's short name: hasan, tgt or gotgt.
	Name string
	IQN  string
	// Portals are host:port addresses, all on 127.0.0.1.
	Portals []string
	// LUN is the number of the data LUN (tgt reserves LUN 0 for its
	// controller).
	LUN  int
	CHAP *CHAP
	// Log is the daemon's output file.
	Log string

	proc    *process
	netns   string // gotgt runs in its own network namespace
	backing string
}

// URL is the libiscsi URL of the data LUN through portal i (clamped to the
// portals the target has).
func (t *Target) URL(i int) string {
	if i >= len(t.Portals) {
		i = len(t.Portals) - 1
	}
	auth := ""
	if t.CHAP != nil {
		auth = url.PathEscape(t.CHAP.User) + "%" + url.PathEscape(t.CHAP.Secret) + "@"
	}
	return fmt.Sprintf("iscsi://%s%s/%s/%d", auth, t.Portals[i], t.IQN, t.LUN)
}

// Command builds a client command that can reach the target: inside the
// target's network namespace when it has one.
func (t *Target) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	if t.netns != "" {
		return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", t.netns, name}, args...)...)
	}
	return exec.CommandContext(ctx, name, args...)
}

// Alive reports whether the daemon is still running.
func (t *Target) Alive() bool { return t.proc != nil && !t.proc.exited() }

// Close stops the daemon, removes its namespace and deletes the backing file.
func (t *Target) Close() error {
	var errs []error
	if t.proc != nil {
		t.proc.stop(3 * time.Second)
	}
	if t.netns != "" {
		if out, err := exec.Command("ip", "netns", "del", t.netns).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("peer: ip netns del %s: %v: %s", t.netns, err, out))
		}
	}
	if t.backing != "" {
		if err := os.Remove(t.backing); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("peer: remove backing file: %w", err))
		}
	}
	return errors.Join(errs...)
}

// StartHasan runs `bin target run` with one LUN 0.
func StartHasan(ctx context.Context, bin string, o Options) (*Target, error) {
	n := max(o.Portals, 1)
	t := &Target{Name: "hasan", IQN: o.IQN, LUN: 0, CHAP: o.CHAP, Log: o.LogPath("hasan"), backing: o.backingFile("hasan")}
	if err := PrepareFile(t.backing, o.Size, o.Thin); err != nil {
		return nil, err
	}
	args := []string{"target", "run", "--iqn", o.IQN}
	for range n {
		port, err := FreePort()
		if err != nil {
			return nil, err
		}
		addr := "127.0.0.1:" + strconv.Itoa(port)
		t.Portals = append(t.Portals, addr)
		args = append(args, "--listen", addr)
	}
	lun := "0=" + t.backing + ",size=" + sizeArg(o.Size)
	if o.Thin {
		lun += ",thin"
	}
	args = append(args, "--lun", lun)
	if o.CHAP != nil {
		args = append(args, "--chap", o.CHAP.User+":"+o.CHAP.Secret)
	}
	p, err := startProcess(t.Log, nil, bin, args...)
	if err != nil {
		t.Close()
		return nil, err
	}
	t.proc = p
	for _, addr := range t.Portals {
		if err := waitTCP(ctx, p, 15*time.Second, dialLoopback(addr)); err != nil {
			t.Close()
			return nil, fmt.Errorf("peer: hasan on %s: %w (log %s)", addr, err, t.Log)
		}
	}
	return t, nil
}

// StartTgt runs Debian's tgtd in the foreground with a private control port
// (so it cannot collide with another tgtd on the machine) and configures one
// target with the file as LUN 1.
func StartTgt(ctx context.Context, o Options) (*Target, error) {
	t := &Target{Name: "tgt", IQN: o.IQN, LUN: 1, CHAP: o.CHAP, Log: o.LogPath("tgt"), backing: o.backingFile("tgt")}
	if err := PrepareFile(t.backing, o.Size, o.Thin); err != nil {
		return nil, err
	}
	// tgtd's control port only names a unix socket (/var/run/tgtd/socket.N,
	// N <= 32767); other tgtd instances on the machine may hold one, so a
	// start that fails is retried with fresh numbers.
	var ctl string
	var lastErr error
	for attempt := 0; attempt < 4 && t.proc == nil; attempt++ {
		port, err := FreePort()
		if err != nil {
			return nil, err
		}
		addr := "127.0.0.1:" + strconv.Itoa(port)
		ctl = strconv.Itoa(10000 + rand.IntN(22000))
		p, err := startProcess(t.Log, nil, "tgtd", "-f", "-C", ctl, "--iscsi", "portal="+addr)
		if err != nil {
			t.Close()
			return nil, err
		}
		if err := waitTCP(ctx, p, 15*time.Second, dialLoopback(addr)); err != nil {
			p.stop(time.Second)
			lastErr = fmt.Errorf("peer: tgtd: %w (log %s)", err, t.Log)
			continue
		}
		t.proc, t.Portals = p, []string{addr}
	}
	if t.proc == nil {
		t.Close()
		return nil, lastErr
	}
	adm := func(args ...string) error {
		full := append([]string{"-C", ctl, "--lld", "iscsi"}, args...)
		out, err := exec.CommandContext(ctx, "tgtadm", full...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("peer: tgtadm %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	steps := [][]string{
		{"--op", "new", "--mode", "target", "--tid", "1", "-T", o.IQN},
		{"--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", t.backing},
	}
	if o.Thin {
		steps = append(steps, []string{"--op", "update", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "--params", "thin_provisioning=1"})
	}
	if o.CHAP != nil {
		steps = append(steps,
			[]string{"--op", "new", "--mode", "account", "--user", o.CHAP.User, "--password", o.CHAP.Secret},
			[]string{"--op", "bind", "--mode", "account", "--tid", "1", "--user", o.CHAP.User})
	}
	steps = append(steps, []string{"--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"})
	for _, s := range steps {
		if err := adm(s...); err != nil {
			t.Close()
			return nil, err
		}
	}
	return t, nil
}

// StartGotgt runs gotgt's daemon inside a fresh network namespace. gotgt binds
// its iSCSI port on every interface and has no option to narrow that, so the
// namespace (which holds only a loopback device) keeps it off the host's
// networks; clients reach it through Target.Command. CHAP is not supported by
// gotgt and is refused here.
func StartGotgt(ctx context.Context, bin string, o Options) (*Target, error) {
	if o.CHAP != nil {
		return nil, errors.New("peer: gotgt has no CHAP")
	}
	const port = 3260 // private to the namespace
	addr := "127.0.0.1:" + strconv.Itoa(port)
	t := &Target{Name: "gotgt", IQN: o.IQN, LUN: 0, Portals: []string{addr}, Log: o.LogPath("gotgt"), backing: o.backingFile("gotgt")}
	t.netns = fmt.Sprintf("hasan-bench-%d-%d", os.Getpid(), time.Now().UnixNano()%1e6)
	if out, err := exec.CommandContext(ctx, "ip", "netns", "add", t.netns).CombinedOutput(); err != nil {
		t.netns = ""
		return nil, fmt.Errorf("peer: ip netns add: %v: %s", err, out)
	}
	if out, err := exec.CommandContext(ctx, "ip", "netns", "exec", t.netns, "ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Close()
		return nil, fmt.Errorf("peer: netns loopback up: %v: %s", err, out)
	}
	if err := PrepareFile(t.backing, o.Size, o.Thin); err != nil {
		t.Close()
		return nil, err
	}
	cfgDir := filepath.Join(o.Dir, "gotgt-config")
	if err := os.MkdirAll(cfgDir, 0o700); err != nil {
		t.Close()
		return nil, fmt.Errorf("peer: gotgt config dir: %w", err)
	}
	cfg := map[string]any{
		"storages": []map[string]any{{
			"deviceID": 1000, "path": "file:" + t.backing, "online": true,
			"thinProvisioning": o.Thin, "blockShift": 9,
		}},
		"iscsiportals": []map[string]any{{"id": 0, "portal": addr}},
		"iscsitargets": map[string]any{o.IQN: map[string]any{
			"tpgts": map[string][]int{"1": {0}},
			"luns":  map[string]int{"0": 1000},
		}},
	}
	raw, err := json.Marshal(cfg)
	if err != nil {
		t.Close()
		return nil, fmt.Errorf("peer: gotgt config: %w", err)
	}
	if err := os.WriteFile(filepath.Join(cfgDir, "config.json"), raw, 0o600); err != nil {
		t.Close()
		return nil, fmt.Errorf("peer: gotgt config: %w", err)
	}
	p, err := startProcess(t.Log, []string{"GOSTOR_CONFIG=" + cfgDir},
		"ip", "netns", "exec", t.netns, bin, "daemon", "--log", "error", "--port", strconv.Itoa(port))
	if err != nil {
		t.Close()
		return nil, err
	}
	t.proc = p
	probe := func(ctx context.Context) error {
		// bash's /dev/tcp opens a connection from inside the namespace.
		return t.Command(ctx, "bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/"+strconv.Itoa(port)).Run()
	}
	if err := waitTCP(ctx, p, 15*time.Second, probe); err != nil {
		t.Close()
		return nil, fmt.Errorf("peer: gotgt: %w (log %s)", err, t.Log)
	}
	return t, nil
}
