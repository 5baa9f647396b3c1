package vip

// A network lab for the tests: every test builds its own namespaces (a
// "switch" namespace holding a bridge, and one namespace per host joined to
// it by a veth pair), so nothing touches the root namespace, and t.Cleanup
// deletes them all. TestMain also removes namespaces left by an earlier run
// that was killed before its cleanups ran.

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

const labPrefix = "hvip-"

func TestMain(m *testing.M) {
	if os.Geteuid() == 0 {
		sweepStaleNamespaces()
	}
	os.Exit(m.Run())
}

// sweepStaleNamespaces deletes hvip-<pid>-... namespaces whose process is gone.
func sweepStaleNamespaces() {
	ents, _ := os.ReadDir("/var/run/netns")
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), labPrefix)
		if !ok {
			continue
		}
		pid, err := strconv.Atoi(strings.SplitN(rest, "-", 2)[0])
		if err != nil {
			continue
		}
		if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err == nil {
			continue
		}
		exec.Command("ip", "netns", "del", e.Name()).Run()
	}
}

type lab struct {
	t  *testing.T
	id string
	sw string // switch namespace with br0
}

type node struct {
	t    *testing.T
	name string // namespace name
	path string
	mac  net.HardwareAddr
	ns   netns.NsHandle
	nl   *netlink.Handle
}

var labSeq atomic.Int32

func newLab(t *testing.T) *lab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("vip: namespace tests need root (CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_ADMIN for setns); `make unit` runs them as root")
	}
	l := &lab{t: t, id: fmt.Sprintf("%s%d-%d", labPrefix, os.Getpid(), labSeq.Add(1))}
	l.sw = l.netns("sw")
	l.run("ip", "-n", l.sw, "link", "add", "br0", "type", "bridge")
	l.run("ip", "-n", l.sw, "link", "set", "br0", "up")
	return l
}

func (l *lab) run(args ...string) string {
	l.t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		l.t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func (l *lab) netns(role string) string {
	l.t.Helper()
	name := l.id + "-" + role
	l.run("ip", "netns", "add", name)
	l.t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			l.t.Errorf("cleanup: ip netns del %s: %v %s", name, err, out)
		}
	})
	return name
}

// node adds a host whose eth0 hangs off the bridge, with a fixed MAC
// 02:00:5e:10:00:<idx> and the given addresses (IPv6 ones without DAD so
// the lab is usable at once).
func (l *lab) node(role string, idx byte, addrs ...string) *node {
	l.t.Helper()
	name := l.netns(role)
	n := &node{t: l.t, name: name, path: "/var/run/netns/" + name, mac: net.HardwareAddr{0x02, 0x00, 0x5e, 0x10, 0x00, idx}}
	port := "v" + role
	l.run("ip", "-n", l.sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", name)
	l.run("ip", "-n", l.sw, "link", "set", port, "master", "br0", "up")
	l.run("ip", "-n", name, "link", "set", "eth0", "address", n.mac.String(), "up")
	l.run("ip", "-n", name, "link", "set", "lo", "up")
	for _, a := range addrs {
		n.addrAdd(a)
	}
	var err error
	if n.ns, err = netns.GetFromName(name); err != nil {
		l.t.Fatal(err)
	}
	if n.nl, err = netlink.NewHandleAt(n.ns, unix.NETLINK_ROUTE); err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { n.nl.Close(); n.ns.Close() })
	return n
}

func (n *node) ip(args ...string) string {
	n.t.Helper()
	out, err := exec.Command("ip", append([]string{"-n", n.name}, args...)...).CombinedOutput()
	if err != nil {
		n.t.Fatalf("ip -n %s %s: %v\n%s", n.name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func (n *node) addrAdd(a string, extra ...string) {
	n.t.Helper()
	args := []string{"addr", "add", a, "dev", "eth0"}
	if strings.Contains(a, ":") {
		args = append(args, "nodad")
	}
	n.ip(append(args, extra...)...)
}

func (n *node) sysctl(kv string) {
	n.t.Helper()
	if out, err := exec.Command("ip", "netns", "exec", n.name, "sysctl", "-qw", kv).CombinedOutput(); err != nil {
		n.t.Fatalf("sysctl %s in %s: %v %s", kv, n.name, err, out)
	}
}

// do runs f on a thread inside the node's namespace. Sockets f creates stay
// in that namespace. The thread is never unlocked, so the runtime discards
// it afterwards instead of reusing a thread in a foreign namespace.
func (n *node) do(f func()) {
	n.t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := netns.Set(n.ns); err != nil {
			errc <- err
			return
		}
		f()
		errc <- nil
	}()
	if err := <-errc; err != nil {
		n.t.Fatalf("setns %s: %v", n.name, err)
	}
}

func (n *node) listen(addr netip.AddrPort) net.Listener {
	n.t.Helper()
	var ln net.Listener
	var err error
	n.do(func() { ln, err = net.Listen("tcp", addr.String()) })
	if err != nil {
		n.t.Fatalf("listen in %s: %v", n.name, err)
	}
	n.t.Cleanup(func() { ln.Close() })
	return ln
}

func (n *node) dial(addr netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	var err error
	n.do(func() { c, err = net.DialTimeout("tcp", addr.String(), timeout) })
	if err == nil {
		n.t.Cleanup(func() { c.Close() })
	}
	return c, err
}

func (n *node) ifindex() int {
	n.t.Helper()
	l, err := n.nl.LinkByName("eth0")
	if err != nil {
		n.t.Fatal(err)
	}
	return l.Attrs().Index
}

// neigh returns the node's neighbour entry for a on eth0.
func (n *node) neigh(a netip.Addr) (netlink.Neigh, bool) {
	n.t.Helper()
	family := netlink.FAMILY_V4
	if a.Is6() {
		family = netlink.FAMILY_V6
	}
	ns, err := n.nl.NeighList(n.ifindex(), family)
	if err != nil {
		n.t.Fatal(err)
	}
	for _, e := range ns {
		if got, ok := netip.AddrFromSlice(e.IP); ok && got.Unmap() == a {
			return e, true
		}
	}
	return netlink.Neigh{}, false
}

// hasAddr reports whether a is configured on the node's eth0, and its label.
func (n *node) hasAddr(a netip.Addr) (bool, string) {
	n.t.Helper()
	l, err := n.nl.LinkByName("eth0")
	if err != nil {
		n.t.Fatal(err)
	}
	addrs, err := n.nl.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		n.t.Fatal(err)
	}
	for _, x := range addrs {
		if got, ok := netip.AddrFromSlice(x.IP); ok && got.Unmap() == a {
			return true, x.Label
		}
	}
	return false, ""
}

// watchNeigh subscribes to the node's neighbour updates and returns a func
// that waits until a resolves to mac, returning when that was observed.
func (n *node) watchNeigh(a netip.Addr) func(mac net.HardwareAddr, timeout time.Duration) (time.Time, bool) {
	n.t.Helper()
	ch := make(chan netlink.NeighUpdate, 1024)
	done := make(chan struct{})
	ns := n.ns
	if err := netlink.NeighSubscribeWithOptions(ch, done, netlink.NeighSubscribeOptions{Namespace: &ns}); err != nil {
		n.t.Fatal(err)
	}
	n.t.Cleanup(func() { close(done) })
	return func(mac net.HardwareAddr, timeout time.Duration) (time.Time, bool) {
		deadline := time.After(timeout)
		for {
			select {
			case u := <-ch:
				got, _ := netip.AddrFromSlice(u.IP)
				if u.Type == unix.RTM_NEWNEIGH && got.Unmap() == a && u.HardwareAddr.String() == mac.String() {
					return time.Now(), true
				}
			case <-deadline:
				return time.Time{}, false
			}
		}
	}
}

// manager returns a Manager for the node, closed at cleanup, logging to t.
func (n *node) manager(cfg Config) *Manager {
	n.t.Helper()
	cfg.NetNS = n.path
	cfg.Logger = slog.New(slog.NewTextHandler(testWriter{n.t}, &slog.HandlerOptions{Level: slog.LevelDebug})).With("node", n.name)
	m, err := New(cfg)
	if err != nil {
		n.t.Fatal(err)
	}
	n.t.Cleanup(func() {
		if err := m.Close(); err != nil {
			n.t.Errorf("close manager: %v", err)
		}
	})
	return m
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// capture records the frames of one ethertype seen on the node's eth0, in
// both directions, until stop is called.
func (n *node) capture(ethertype uint16) (stop func() []frame) {
	n.t.Helper()
	// Outgoing frames reach only ETH_P_ALL taps, so listen to everything
	// and filter on the frame's ethertype.
	c, err := openPacket(n.ns, n.ifindex(), unix.ETH_P_ALL)
	if err != nil {
		n.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	res := make(chan []frame, 1)
	go func() {
		var got []frame
		buf := make([]byte, 65536)
		c.recvUntil(ctx, time.Now().Add(time.Minute), buf, func(p []byte, sa unix.Sockaddr) bool {
			ll := sa.(*unix.SockaddrLinklayer)
			if ll.Protocol == htons(ethertype) {
				got = append(got, frame{at: time.Now(), out: ll.Pkttype == unix.PACKET_OUTGOING, data: append([]byte(nil), p...)})
			}
			return false
		})
		c.Close()
		res <- got
	}()
	return func() []frame { cancel(); return <-res }
}

type frame struct {
	at   time.Time
	out  bool // sent by the capturing node
	data []byte
}

// sniff records the TCP segments between a and b on the node's eth0.
func (n *node) sniff(a, b netip.AddrPort) (stop func() []sniffed) {
	n.t.Helper()
	ethertype := uint16(etherTypeIPv4)
	if a.Addr().Is6() {
		ethertype = etherTypeIPv6
	}
	stopCapture := n.capture(ethertype)
	return func() []sniffed {
		var got []sniffed
		for _, f := range stopCapture() {
			if s, ok := parseTCP(f.data); ok && (s.Src == a && s.Dst == b || s.Src == b && s.Dst == a) {
				got = append(got, sniffed{at: f.at, out: f.out, seg: s})
			}
		}
		return got
	}
}

type sniffed struct {
	at  time.Time
	out bool // sent by the sniffing node
	seg tcpSegment
}

func (s sniffed) String() string {
	dir := "in "
	if s.out {
		dir = "out"
	}
	var flags []string
	if s.seg.Flags&tcpFlagRST != 0 {
		flags = append(flags, "RST")
	}
	if s.seg.Flags&tcpFlagACK != 0 {
		flags = append(flags, "ACK")
	}
	return fmt.Sprintf("%s %s > %s [%s] seq=%d ack=%d", dir, s.seg.Src, s.seg.Dst, strings.Join(flags, ","), s.seg.Seq, s.seg.Ack)
}
