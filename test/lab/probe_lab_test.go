package lab

import (
	"context"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/bench/failover/initiator"
	"github.com/hasan-storage/hasan/bench/failover/probe"
)

// TestProbeThroughLabPowerCycle is the lab end to end, without a cluster:
// `hasan target run` on n1, the failover probe in the initiator namespace,
// n1 powered off through its BMC from n2, powered on, target restarted on
// the same disk file. The probe must see the outage, reconnect, find every
// acknowledged write, and measure a gap that matches the outage.
func TestProbeThroughLabPowerCycle(t *testing.T) {
	l := Start(t, Config{Nodes: []NodeSpec{{Name: "n1", BMC: true}, {Name: "n2", BMC: true}}})
	bin := BuildHasan(t)
	n1, n2 := l.Node("n1"), l.Node("n2")
	portal := net.JoinHostPort(n1.Addr.Addr().String(), "3260")
	const iqn = "iqn.2026-11.io.hasan:lab-probe"
	disk := filepath.Join(l.Dir, "n1-disk.img") // survives power cycles, like a disk
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	var target *Process
	startTarget := func() time.Time {
		t.Helper()
		var err error
		target, err = n1.Start(ProcSpec{Name: "target", Argv: []string{bin, "target", "run",
			"--listen", portal, "--iqn", iqn, "--lun", "0=" + disk + ",size=16M"}})
		if err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(10 * time.Second); ; {
			dctx, dcancel := context.WithTimeout(ctx, 200*time.Millisecond)
			c, err := l.Initiator().DialContext(dctx, "tcp", portal)
			dcancel()
			if err == nil {
				c.Close()
				return time.Now()
			}
			if target.Exited() || time.Now().After(deadline) {
				t.Fatalf("target on n1 not reachable from the initiator: %v", err)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	startTarget()

	p := probe.New(probe.Config{Initiator: initiator.Config{Portal: portal, Target: iqn, Dial: l.Initiator().DialContext}})
	pctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { _, err := p.Run(pctx); done <- err }()
	defer func() { stop(); <-done }()
	if err := p.WaitPairs(ctx, 5); err != nil {
		t.Fatalf("no I/O through the lab: %v (%+v)", err, p.Snapshot())
	}

	bmc := l.BMC("n1")
	offAt := time.Now()
	if out, err := bmc.IPMITool(ctx, n2.NS, "chassis", "power", "off"); err != nil {
		t.Fatalf("power off: %q %v", out, err)
	}
	if !target.Exited() && ProcAlive(target.Pid()) {
		t.Fatal("target survived the BMC power off")
	}
	time.Sleep(300 * time.Millisecond)
	if out, err := bmc.IPMITool(ctx, n2.NS, "chassis", "power", "on"); err != nil {
		t.Fatalf("power on: %q %v", out, err)
	}
	readyAt := startTarget()
	if err := p.WaitPairs(ctx, 5); err != nil {
		t.Fatalf("I/O did not resume: %v (%+v)", err, p.Snapshot())
	}
	stop()
	if err := <-done; err != nil {
		t.Fatalf("probe: %v", err)
	}
	done <- nil // for the deferred receive
	res := p.Snapshot()
	outage := readyAt.Sub(offAt)
	t.Logf("power off -> target ready %v; probe gap %v, io_errors %d, reconnects %d, failed logins %d, lost %d",
		outage.Round(time.Millisecond), res.Gap, res.IOErrors, res.Reconnects, res.LoginFailures, res.LostWrites)
	if res.LostWrites != 0 || res.IOErrors == 0 || res.Reconnects == 0 {
		t.Fatalf("result %+v", res)
	}
	// The last pair before the cut completed at most one interval (plus
	// I/O time) before offAt; the first after it needs a re-login.
	if g := time.Duration(res.Gap); g < outage-150*time.Millisecond || g > outage+600*time.Millisecond {
		t.Fatalf("gap %v does not match the outage %v", g, outage)
	}
}
