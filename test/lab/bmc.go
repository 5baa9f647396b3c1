package lab

import (
	"context"
	_ "embed"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

//go:embed testdata/bmc-hook.sh
var bmcHook []byte

// BMC is a node's simulated baseboard management controller: OpenIPMI's
// ipmi_sim in the lab's "bmc" namespace, listening on its own address of
// the management network, so every node (and the test, through any node's
// namespace) reaches it while the node itself is isolated, powered off or
// crashed, as with a real out-of-band BMC. Its chassis power off kills the
// node's processes (see testdata/bmc-hook.sh); power on only marks the node
// powered.
type BMC struct {
	// Addr is the IPMI-over-LAN endpoint (UDP).
	Addr netip.AddrPort
	// User and Password are an admin account.
	User, Password string
	// CipherSuite to pin: ipmi_sim never answers Get Channel Cipher
	// Suites, and suite 3 is the one it serves well (notes/fencing.md).
	CipherSuite int

	node *Node
	proc *Process
	dir  string
}

// BMCFault is a misbehaviour the BMC can be told to show.
type BMCFault string

const (
	// FaultStuck: power off is acknowledged but never happens.
	FaultStuck BMCFault = "stuck"
	// FaultStatus: chassis status reads fail.
	FaultStatus BMCFault = "status"
	// FaultLate: power off happens 0.5 s after the acknowledgement.
	FaultLate BMCFault = "late"
	// FaultUnreachable: the BMC stops answering at all (ipmi_sim is
	// SIGSTOPped), as when its network or firmware hangs.
	FaultUnreachable BMCFault = "unreachable"
)

func (n *Node) startBMC(ctx context.Context) error {
	l := n.lab
	i := 0
	for j, m := range l.cfg.Nodes {
		if m.Name == n.spec.Name {
			i = j
		}
	}
	b := &BMC{
		Addr:        netip.AddrPortFrom(hostAddr(MgmtNet, 111+i), bmcPort),
		User:        BMCUser,
		Password:    BMCPassword,
		CipherSuite: 3,
		node:        n,
		dir:         filepath.Join(l.Dir, "bmc", n.spec.Name),
	}
	if err := l.ip(ctx, "-n", l.bmcNS.name, "addr", "add", withBits(b.Addr.Addr(), MgmtNet.Bits()).String(), "dev", "b0"); err != nil {
		return err
	}
	state := filepath.Join(b.dir, "state") // fresh per lab: no stale users
	if err := os.MkdirAll(state, 0o700); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	hook := filepath.Join(l.Dir, "bmc-hook.sh")
	if err := os.WriteFile(hook, bmcHook, 0o755); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	conf := fmt.Sprintf(`name "%s"
set_working_mc 0x20
  startlan 1
    addr %s %d
    priv_limit admin
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid a123456789abcdefa123456789abcdef
  endlan
  chassis_control "%s %s %s"
user 2 true "%s" "%s" admin 10 none md2 md5 straight
`, n.spec.Name, b.Addr.Addr(), b.Addr.Port(), hook, n.dir, n.name, b.User, b.Password)
	emu := "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\nmc_enable 0x20\n"
	for name, body := range map[string]string{"lan.conf": conf, "sim.emu": emu} {
		if err := os.WriteFile(filepath.Join(b.dir, name), []byte(body), 0o600); err != nil {
			return fmt.Errorf("lab: %w", err)
		}
	}
	p, err := startProcess(l.spawn, l.bmcNS.name, filepath.Join(l.Dir, "bmc-"+n.spec.Name+".log"), b.dir, 0, ProcSpec{
		Name: "ipmi_sim/" + n.spec.Name,
		Argv: []string{"ipmi_sim", "-c", filepath.Join(b.dir, "lan.conf"), "-f", filepath.Join(b.dir, "sim.emu"), "-s", state, "-n"},
	})
	if err != nil {
		return err
	}
	l.track(p)
	b.proc = p
	n.bmc = b
	// Ready once a lanplus session opens and status reads.
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := b.IPMITool(ctx, l.bmcNS, "chassis", "power", "status")
		if err == nil {
			return nil
		}
		if p.Exited() || time.Now().After(deadline) {
			return fmt.Errorf("lab: BMC of %s on %v did not come up: %w", n.spec.Name, b.Addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// IPMIToolArgs are the ipmitool arguments that reach this BMC (lanplus,
// pinned cipher suite, short timeout), without the command.
func (b *BMC) IPMIToolArgs() []string {
	return []string{"ipmitool", "-I", "lanplus", "-C", fmt.Sprint(b.CipherSuite), "-H", b.Addr.Addr().String(),
		"-p", fmt.Sprint(b.Addr.Port()), "-U", b.User, "-P", b.Password, "-N", "1", "-R", "1"}
}

// IPMITool runs ipmitool against the BMC from namespace from (for example a
// peer node, to prove the management network carries the request) and
// returns its output.
func (b *BMC) IPMITool(ctx context.Context, from *NS, args ...string) (string, error) {
	return from.Run(ctx, append(b.IPMIToolArgs(), args...)...)
}

// SetFault turns a fault on or off.
func (b *BMC) SetFault(f BMCFault, on bool) error {
	switch f {
	case FaultUnreachable:
		sig := syscall.SIGCONT
		if on {
			sig = syscall.SIGSTOP
		}
		return b.proc.Signal(sig)
	case FaultStuck, FaultStatus, FaultLate:
		p := filepath.Join(b.node.dir, "fault-"+string(f))
		if on {
			return os.WriteFile(p, nil, 0o644)
		}
		if err := os.Remove(p); err != nil && !os.IsNotExist(err) {
			return err
		}
		return nil
	}
	return fmt.Errorf("lab: unknown BMC fault %q", f)
}

// HookLog returns the BMC hook's record of power commands ("<unix time>
// get|set power [0|1]" per line), which tests use to see what a fence agent
// really asked for.
func (b *BMC) HookLog() []string {
	data, err := os.ReadFile(filepath.Join(b.node.dir, "hook.log"))
	if err != nil {
		return nil
	}
	return strings.Split(strings.TrimRight(string(data), "\n"), "\n")
}
