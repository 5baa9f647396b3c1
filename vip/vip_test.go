package vip

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// The lab's addresses live only inside namespaces the tests create.
var (
	vip4 = netip.MustParsePrefix("198.51.100.100/24")
	vip6 = netip.MustParsePrefix("2001:db8:77::100/64")
)

type family struct {
	name   string
	vip    netip.Prefix
	hostOf func(idx byte) string
}

var families = []family{
	{"ipv4", vip4, func(i byte) string { return "198.51.100." + itoa(i) + "/24" }},
	{"ipv6", vip6, func(i byte) string { return "2001:db8:77::" + itoa(i) + "/64" }},
}

func itoa(i byte) string { return strconv.Itoa(int(i)) }

// hosts builds nodes a (1), b (2) and the initiator i (10) on one bridge.
func hosts(t *testing.T, f family) (a, b, i *node) {
	l := newLab(t)
	return l.node("a", 1, f.hostOf(1)), l.node("b", 2, f.hostOf(2)), l.node("i", 10, f.hostOf(10))
}

// TestAcquireAnnounces: after Acquire on A the initiator knows the VIP at
// A's MAC without having asked: the gratuitous ARP created the entry (Linux
// creates entries from gratuitous ARP only with arp_accept=1, set here; with
// the default it only updates existing ones, see TestMoveUpdatesNeighbour).
func TestAcquireAnnounces(t *testing.T) {
	a, _, i := hosts(t, families[0])
	i.sysctl("net.ipv4.conf.eth0.arp_accept=1")
	if _, ok := i.neigh(vip4.Addr()); ok {
		t.Fatal("initiator knows the VIP before it exists")
	}
	wait := i.watchNeigh(vip4.Addr())
	m := a.manager(Config{})
	v := VIP{Addr: vip4, Link: "eth0", Label: "hasan"}
	start := time.Now()
	if err := m.Acquire(context.Background(), v); err != nil {
		t.Fatal(err)
	}
	acq := time.Since(start)
	at, ok := wait(a.mac, 2*time.Second)
	if !ok {
		e, _ := i.neigh(vip4.Addr())
		t.Fatalf("initiator never learned %s at %s; entry now %v", vip4.Addr(), a.mac, e)
	}
	t.Logf("Acquire took %v; initiator's entry appeared %v after Acquire started", acq, at.Sub(start))
	if ok, label := a.hasAddr(vip4.Addr()); !ok || label != "eth0:hasan" {
		t.Fatalf("address on A: present=%v label=%q, want label eth0:hasan", ok, label)
	}
	want := []VIP{{Addr: vip4, Link: "eth0", Label: "eth0:hasan"}}
	if got := m.List(); !slices.Equal(got, want) {
		t.Fatalf("List = %v, want %v", got, want)
	}
}

// TestMoveUpdatesNeighbour moves the VIP from A to B while the initiator
// holds a REACHABLE entry pointing at A (default arp_accept=0, so only an
// update of an existing entry can work). The announcement alone must flip
// it to B's MAC: the initiator sends nothing to the VIP meanwhile.
func TestMoveUpdatesNeighbour(t *testing.T) {
	for _, f := range families {
		for _, nud := range []string{"reachable", "stale"} {
			t.Run(f.name+"/"+nud, func(t *testing.T) {
				a, b, i := hosts(t, f)
				v := VIP{Addr: f.vip, Link: "eth0"}
				ma, mb := a.manager(Config{}), b.manager(Config{})
				ctx := context.Background()
				if err := ma.Acquire(ctx, v); err != nil {
					t.Fatal(err)
				}
				i.ip("neigh", "replace", f.vip.Addr().String(), "lladdr", a.mac.String(), "dev", "eth0", "nud", nud)
				if e, ok := i.neigh(f.vip.Addr()); !ok || e.HardwareAddr.String() != a.mac.String() {
					t.Fatalf("pre-populated entry: %v", e)
				}
				wait := i.watchNeigh(f.vip.Addr())
				ethertype := uint16(etherTypeARP)
				if f.vip.Addr().Is6() {
					ethertype = etherTypeIPv6
				}
				stopCapture := i.capture(ethertype)

				if err := ma.Release(ctx, v); err != nil {
					t.Fatal(err)
				}
				if ok, _ := a.hasAddr(f.vip.Addr()); ok {
					t.Fatal("A still has the VIP after Release")
				}
				start := time.Now()
				if err := mb.Acquire(ctx, v); err != nil {
					t.Fatal(err)
				}
				acq := time.Since(start)
				at, ok := wait(b.mac, 2*time.Second)
				frames := stopCapture()
				e, _ := i.neigh(f.vip.Addr())
				if !ok || e.HardwareAddr.String() != b.mac.String() {
					t.Fatalf("initiator's entry did not move to B (%s): %v", b.mac, e)
				}
				// The initiator must have learnt it without asking: no ARP
				// request or neighbour solicitation for the VIP left it.
				for _, fr := range frames {
					if !fr.out {
						continue
					}
					if p, ok := parseARP(fr.data); ok && p.TargetIP == f.vip.Addr() {
						t.Fatalf("initiator sent ARP for the VIP during the move: %+v", p)
					}
					if m, ok := parseND(fr.data); ok && m.Type == icmpv6NS && m.Target == f.vip.Addr() {
						t.Fatalf("initiator solicited the VIP during the move: %+v", m)
					}
				}
				// Nothing pulls it back, not even briefly: A stopped
				// announcing when it released (its repeats would otherwise
				// land 100 and 200 ms after its Acquire).
				if _, back := wait(a.mac, DefaultAnnounceInterval*DefaultAnnounceCount); back {
					t.Fatal("initiator's entry went back to A after the move: A kept announcing after Release")
				}
				t.Logf("Acquire on B took %v (probe included); entry flipped %v after Acquire started (%v after it returned); the initiator did not ask; state now %#x",
					acq, at.Sub(start), at.Sub(start)-acq, e.State)
			})
		}
	}
}

// TestProbeRefusesDuplicate: C already holds the address, so A's probe
// must refuse and name C's MAC, and A must not have added it. Once C drops
// it, the same Acquire succeeds, so the probe is not simply always failing.
func TestProbeRefusesDuplicate(t *testing.T) {
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			l := newLab(t)
			a := l.node("a", 1, f.hostOf(1))
			c := l.node("c", 3, f.hostOf(3), f.vip.String())
			m := a.manager(Config{})
			v := VIP{Addr: f.vip, Link: "eth0"}
			start := time.Now()
			err := m.Acquire(context.Background(), v)
			var ce *ConflictError
			if !errors.Is(err, ErrAddressInUse) || !errors.As(err, &ce) || ce.MAC.String() != c.mac.String() {
				t.Fatalf("Acquire of a held address: %v; want ErrAddressInUse naming %s", err, c.mac)
			}
			t.Logf("refused after %v: %v", time.Since(start), err)
			if ok, _ := a.hasAddr(f.vip.Addr()); ok {
				t.Fatal("A added the address despite the conflict")
			}
			if len(m.List()) != 0 {
				t.Fatalf("List after refusal = %v", m.List())
			}

			c.ip("addr", "del", f.vip.String(), "dev", "eth0")
			start = time.Now()
			if err := m.Acquire(context.Background(), v); err != nil {
				t.Fatalf("Acquire once the address is free: %v", err)
			}
			t.Logf("free address acquired in %v", time.Since(start))
		})
	}
}

// TestReleaseOnlyOurs: Release and Acquire never touch addresses this
// Manager did not add; both are idempotent; List reports what is held; an
// IPv4 address carrying our label (left by an earlier run) is adopted.
func TestReleaseOnlyOurs(t *testing.T) {
	l := newLab(t)
	a := l.node("a", 1, "198.51.100.1/24", "2001:db8:77::1/64")
	m := a.manager(Config{})
	ctx := context.Background()

	foreign4 := netip.MustParsePrefix("198.51.100.200/24")
	foreign6 := netip.MustParsePrefix("2001:db8:77::200/64")
	a.addrAdd(foreign4.String())
	a.addrAdd(foreign6.String())
	for _, p := range []netip.Prefix{foreign4, foreign6} {
		v := VIP{Addr: p, Link: "eth0"}
		if err := m.Acquire(ctx, v); !errors.Is(err, ErrForeignAddress) {
			t.Fatalf("Acquire(%s) configured by someone else: %v, want ErrForeignAddress", p, err)
		}
		if err := m.Release(ctx, v); err != nil {
			t.Fatalf("Release(%s) not ours: %v", p, err)
		}
		if ok, _ := a.hasAddr(p.Addr()); !ok {
			t.Fatalf("Release removed %s, which it never added", p)
		}
	}

	ours := []VIP{{Addr: vip4, Link: "eth0"}, {Addr: vip6, Link: "eth0"}}
	for _, v := range ours {
		for range 2 {
			if err := m.Acquire(ctx, v); err != nil {
				t.Fatalf("Acquire(%s): %v", v, err)
			}
		}
	}
	want := []VIP{{Addr: vip4, Link: "eth0", Label: "eth0:hasan"}, {Addr: vip6, Link: "eth0"}}
	if got := m.List(); !slices.Equal(got, want) {
		t.Fatalf("List = %v, want %v", got, want)
	}
	if err := m.Acquire(ctx, VIP{Addr: netip.MustParsePrefix("198.51.100.100/32"), Link: "eth0"}); err == nil {
		t.Fatal("Acquire of a held address with another prefix succeeded")
	}
	for _, v := range ours {
		for range 2 {
			if err := m.Release(ctx, v); err != nil {
				t.Fatalf("Release(%s): %v", v, err)
			}
		}
		if ok, _ := a.hasAddr(v.Addr.Addr()); ok {
			t.Fatalf("%s still present after Release", v)
		}
	}
	if len(m.List()) != 0 {
		t.Fatalf("List after release = %v", m.List())
	}
	for _, p := range []netip.Prefix{foreign4, foreign6} {
		if ok, _ := a.hasAddr(p.Addr()); !ok {
			t.Fatalf("foreign %s vanished", p)
		}
	}

	// Tickling from an address we do not hold would send the initiator's
	// answer elsewhere, so it is refused.
	if err := m.Tickle(ctx, []TCPConn{{Local: netip.AddrPortFrom(vip4.Addr(), 3260), Remote: netip.MustParseAddrPort("198.51.100.10:40000")}}); !errors.Is(err, ErrNotHeld) {
		t.Fatalf("Tickle from a released VIP: %v, want ErrNotHeld", err)
	}
	// A context that ends mid-probe stops the probe at once and adds nothing.
	slow := a.manager(Config{ProbeWait: 10 * time.Second})
	cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	start := time.Now()
	err := slow.Acquire(cctx, ours[0])
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 2*time.Second {
		t.Fatalf("Acquire whose context expires mid-probe: %v after %v", err, time.Since(start))
	}
	if ok, _ := a.hasAddr(vip4.Addr()); ok {
		t.Fatal("cancelled Acquire added the address")
	}

	// A restarted process finds its own labelled address and adopts it.
	left := netip.MustParsePrefix("198.51.100.201/24")
	a.addrAdd(left.String(), "label", "eth0:hasan")
	v := VIP{Addr: left, Link: "eth0"}
	if err := m.Acquire(ctx, v); err != nil {
		t.Fatalf("adopting our labelled address: %v", err)
	}
	if err := m.Release(ctx, v); err != nil {
		t.Fatal(err)
	}
	if ok, _ := a.hasAddr(left.Addr()); ok {
		t.Fatal("adopted address not removed by Release")
	}
	// Adopt takes an existing address (here IPv6, which has no label) when
	// the agent knows it is ours, after which Release removes it.
	if err := m.Adopt(ctx, VIP{Addr: netip.MustParsePrefix("2001:db8:77::300/64"), Link: "eth0"}); err == nil {
		t.Fatal("Adopt of an absent address succeeded")
	}
	v6 := VIP{Addr: foreign6, Link: "eth0"}
	if err := m.Adopt(ctx, v6); err != nil {
		t.Fatal(err)
	}
	if got := m.List(); !slices.Equal(got, []VIP{v6}) {
		t.Fatalf("List after Adopt = %v", got)
	}
	if err := m.Release(ctx, v6); err != nil {
		t.Fatal(err)
	}
	if ok, _ := a.hasAddr(foreign6.Addr()); ok {
		t.Fatal("adopted IPv6 address not removed by Release")
	}

	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := m.Acquire(ctx, ours[0]); !errors.Is(err, ErrClosed) {
		t.Fatalf("Acquire after Close: %v", err)
	}
}

// TestTickle: the initiator holds an idle, established connection to a
// portal on the VIP at A. A dies silently (link down: no FIN, no RST). B
// takes the VIP and opens its own portal. Without a tickle the initiator's
// socket stays open; after Tickle its read fails with ECONNRESET within
// 500 ms, the packet trace shows tickle -> initiator's ACK -> B's RST, and
// a new connection reaches B at once.
func TestTickle(t *testing.T) {
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			a, b, i := hosts(t, f)
			v := VIP{Addr: f.vip, Link: "eth0"}
			portal := netip.AddrPortFrom(f.vip.Addr(), 3260)
			ctx := context.Background()
			ma, mb := a.manager(Config{}), b.manager(Config{})
			if err := ma.Acquire(ctx, v); err != nil {
				t.Fatal(err)
			}
			lnA := a.listen(portal)
			accepted := make(chan net.Conn, 1)
			go func() {
				c, err := lnA.Accept()
				if err == nil {
					t.Cleanup(func() { c.Close() })
					io.Copy(c, c) // echo; blocks on the dead link forever
				}
				accepted <- c
			}()
			conn, err := i.dial(portal, 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := conn.Write([]byte{1}); err != nil {
				t.Fatal(err)
			}
			conn.SetReadDeadline(time.Now().Add(2 * time.Second))
			if _, err := io.ReadFull(conn, make([]byte, 1)); err != nil {
				t.Fatalf("echo through A: %v", err)
			}
			initiator := netip.MustParseAddrPort(conn.LocalAddr().String())

			// A dies without a word.
			a.ip("link", "set", "eth0", "down")
			if err := mb.Acquire(ctx, v); err != nil {
				t.Fatal(err)
			}
			lnB := b.listen(portal)
			gotB := make(chan struct{})
			go func() {
				if c, err := lnB.Accept(); err == nil {
					c.Close()
					close(gotB)
				}
			}()

			// Without a tickle nothing tells the initiator.
			conn.SetReadDeadline(time.Now().Add(time.Second))
			if _, err := conn.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("untickled connection: read returned %v, want it still open (timeout)", err)
			}

			stop := i.sniff(initiator, portal)
			start := time.Now()
			if err := mb.Tickle(ctx, []TCPConn{{Local: portal, Remote: initiator}}); err != nil {
				t.Fatal(err)
			}
			conn.SetReadDeadline(time.Now().Add(2 * time.Second))
			_, err = conn.Read(make([]byte, 1))
			took := time.Since(start)
			time.Sleep(20 * time.Millisecond) // let the sniffer see the tail
			trace := stop()
			for _, s := range trace {
				t.Logf("  +%-10v %s", s.at.Sub(start).Round(time.Microsecond), s)
			}
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("tickled connection: read returned %v after %v, want ECONNRESET", err, took)
			}
			if took > 500*time.Millisecond {
				t.Fatalf("reset took %v, want < 500ms", took)
			}
			t.Logf("tickle to ECONNRESET: %v", took)
			checkTickleTrace(t, trace)

			start = time.Now()
			c2, err := i.dial(portal, time.Second)
			if err != nil {
				t.Fatalf("reconnect: %v", err)
			}
			c2.Close()
			select {
			case <-gotB:
				t.Logf("reconnected to B in %v", time.Since(start))
			case <-time.After(time.Second):
				t.Fatal("reconnection did not reach B")
			}
		})
	}
}

// checkTickleTrace asserts the exchange the tickle relies on: our ACK with
// seq 0 arrives, the initiator answers with an ACK carrying its real
// numbers, and a RST whose sequence equals that ACK's acknowledgement
// number (so it is exactly in window) comes back from the VIP.
func checkTickleTrace(t *testing.T, trace []sniffed) {
	t.Helper()
	step := 0
	var reply tcpSegment
	for _, s := range trace {
		switch {
		case step == 0 && !s.out && s.seg.Flags == tcpFlagACK && s.seg.Seq == 0 && s.seg.Ack == 0:
			step = 1
		case step == 1 && s.out && s.seg.Flags&tcpFlagACK != 0 && s.seg.Flags&tcpFlagRST == 0:
			reply, step = s.seg, 2
		case step == 2 && !s.out && s.seg.Flags&tcpFlagRST != 0 && s.seg.Seq == reply.Ack:
			return
		}
	}
	t.Fatalf("trace lacks tickle -> ACK -> RST (reached step %d)", step)
}
