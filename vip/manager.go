package vip

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Manager owns the floating addresses of one network namespace. It is safe
// for concurrent use; Acquire and Release are serialised.
type Manager struct {
	cfg Config
	log *slog.Logger
	ns  netns.NsHandle // not open: the caller's own namespace
	nl  *netlink.Handle

	// life bounds the background announcement and tickle rounds; Close
	// cancels it and waits for wg.
	life   context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	opMu sync.Mutex // serialises Acquire, Release and Close

	// live is held shared while Announce or Tickle use ns and nl outside
	// opMu; Close takes it exclusively before closing them, so a socket is
	// never opened through a closed handle (which would mean the caller's
	// own namespace).
	live sync.RWMutex

	mu     sync.Mutex
	held   map[netip.Addr]*holding // guarded by mu
	closed bool                    // guarded by mu
	sender *rawConn                // guarded by mu; see packetSender
}

// holding is one address this Manager added.
type holding struct {
	vip     VIP
	ifindex int
	mac     net.HardwareAddr
	// stop ends the background announcements; done closes when they have.
	stop context.CancelFunc
	done chan struct{}
}

// New returns a Manager for cfg.NetNS (or the caller's namespace). It needs
// CAP_NET_ADMIN for addresses and CAP_NET_RAW for probes, announcements and
// tickles.
func New(cfg Config) (*Manager, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	m := &Manager{cfg: cfg, log: cfg.Logger.With("component", "vip"), ns: netns.None(), held: map[netip.Addr]*holding{}}
	if cfg.NetNS != "" {
		m.ns, err = netns.GetFromPath(cfg.NetNS)
		if err != nil {
			return nil, fmt.Errorf("vip: open netns %s: %w", cfg.NetNS, err)
		}
		m.nl, err = netlink.NewHandleAt(m.ns, unix.NETLINK_ROUTE)
	} else {
		m.nl, err = netlink.NewHandle(unix.NETLINK_ROUTE)
	}
	if err != nil {
		m.ns.Close()
		return nil, fmt.Errorf("vip: netlink: %w", err)
	}
	m.life, m.cancel = context.WithCancel(context.Background())
	return m, nil
}

// Close stops background announcements and tickles and releases the
// Manager's handles. It leaves the addresses in place: whether a VIP stays
// is the node agent's decision (Release them first on demotion).
func (m *Manager) Close() error {
	m.opMu.Lock()
	defer m.opMu.Unlock()
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	m.mu.Unlock()
	m.cancel()
	m.wg.Wait()
	m.live.Lock()
	defer m.live.Unlock()
	if m.sender != nil {
		m.sender.Close()
	}
	m.nl.Close()
	return m.ns.Close()
}

// closeLater closes c in a tracked goroutine, or at once after Close.
func (m *Manager) closeLater(c io.Closer) {
	if !m.goFunc(func() { c.Close() }) {
		c.Close()
	}
}

// isClosed reports whether Close has begun.
func (m *Manager) isClosed() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.closed
}

// goFunc runs f in a goroutine that Close waits for. It refuses (false)
// once Close has begun; the Add happens under mu, so Close's Wait covers
// every goroutine started before closed was set.
func (m *Manager) goFunc(f func()) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return false
	}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		f()
	}()
	return true
}

// List returns the VIPs this Manager holds, ordered by address.
func (m *Manager) List() []VIP {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]VIP, 0, len(m.held))
	for _, h := range m.held {
		out = append(out, h.vip)
	}
	slices.SortFunc(out, func(a, b VIP) int { return cmp.Compare(a.Addr.Addr().String(), b.Addr.Addr().String()) })
	return out
}

// Acquire makes v live on this host: it probes for a duplicate (refusing
// with a *ConflictError that matches ErrAddressInUse), adds the address with
// its label, and announces it once before returning; further announcements
// follow in the background. Acquiring a VIP already held is a no-op. An
// address configured by someone else is refused with ErrForeignAddress,
// except an IPv4 address carrying v's label, which is adopted: that is
// this node's own VIP left behind by a restarted process.
func (m *Manager) Acquire(ctx context.Context, v VIP) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	v, err := v.normalize()
	if err != nil {
		return err
	}
	m.opMu.Lock()
	defer m.opMu.Unlock()
	if m.isClosed() {
		return ErrClosed
	}
	start := time.Now()
	addr := v.Addr.Addr()
	log := m.log.With("vip", v.Addr.String(), "link", v.Link)

	link, err := m.upLink(v)
	if err != nil {
		return err
	}
	attrs := link.Attrs()

	m.mu.Lock()
	h := m.held[addr]
	m.mu.Unlock()
	present, err := m.findAddr(addr)
	if err != nil {
		return err
	}
	if h != nil {
		if h.vip.Link != v.Link || h.vip.Addr != v.Addr {
			return fmt.Errorf("vip: %s already held as %s", addr, h.vip)
		}
		if present != nil {
			return nil
		}
		// Someone removed our address behind our back: forget it and
		// acquire afresh, probe included.
		log.Warn("held address vanished; acquiring again")
		m.forget(h)
	}

	adopt := false
	if present != nil {
		if present.LinkIndex != attrs.Index || !addr.Is4() || present.Label != v.Label {
			return fmt.Errorf("%w: %s on ifindex %d label %q", ErrForeignAddress, addr, present.LinkIndex, present.Label)
		}
		adopt = true
		log.Info("adopting address left by an earlier run")
	}

	var probeTime, addTime time.Duration
	lookupTime := time.Since(start)
	if !adopt {
		if m.cfg.ProbeCount > 0 {
			t := time.Now()
			if err := m.probe(ctx, attrs.Index, attrs.HardwareAddr, addr); err != nil {
				if errors.Is(err, ErrAddressInUse) {
					log.Warn("duplicate address probe answered; refusing", "err", err)
				}
				return err
			}
			probeTime = time.Since(t)
		}
		na := &netlink.Addr{IPNet: prefixToIPNet(v.Addr)}
		if addr.Is4() {
			na.Label = v.Label
		} else {
			// Our own NS probe replaced the kernel's DAD, which would keep
			// the address tentative (unusable) for 1-2 s.
			na.Flags = unix.IFA_F_NODAD
		}
		t := time.Now()
		if err := m.nl.AddrAdd(link, na); err != nil {
			if errors.Is(err, unix.EEXIST) {
				return fmt.Errorf("%w: %s appeared during the probe", ErrForeignAddress, addr)
			}
			return fmt.Errorf("vip: add %s: %w", v, err)
		}
		addTime = time.Since(t)
	}

	t := time.Now()
	h = m.hold(v, attrs, log)
	log.Info("acquired", "label", v.Label, "mac", h.mac.String(), "took", time.Since(start),
		"lookup", lookupTime, "probe", probeTime, "add", addTime, "announce", time.Since(t))
	return nil
}

// Adopt takes ownership of v when its address is already configured on
// v.Link, without probing, and announces it. It is for a node agent that
// restarts while the cluster state says this node owns v: an IPv6 address
// has no label by which Acquire could recognise it as ours. Release removes
// an adopted address. Adopting an absent address is an error.
func (m *Manager) Adopt(ctx context.Context, v VIP) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	v, err := v.normalize()
	if err != nil {
		return err
	}
	m.opMu.Lock()
	defer m.opMu.Unlock()
	if m.isClosed() {
		return ErrClosed
	}
	addr := v.Addr.Addr()
	m.mu.Lock()
	h := m.held[addr]
	m.mu.Unlock()
	if h != nil {
		if h.vip.Link != v.Link || h.vip.Addr != v.Addr {
			return fmt.Errorf("vip: %s already held as %s", addr, h.vip)
		}
		return nil
	}
	link, err := m.upLink(v)
	if err != nil {
		return err
	}
	present, err := m.findAddr(addr)
	if err != nil {
		return err
	}
	if present == nil || present.LinkIndex != link.Attrs().Index {
		return fmt.Errorf("vip: adopt %s: not configured on %s", addr, v.Link)
	}
	log := m.log.With("vip", v.Addr.String(), "link", v.Link)
	m.hold(v, link.Attrs(), log)
	log.Info("adopted")
	return nil
}

// upLink returns v's link, checking it is an Ethernet link that is up.
func (m *Manager) upLink(v VIP) (netlink.Link, error) {
	addr := v.Addr.Addr()
	link, err := m.nl.LinkByName(v.Link)
	if err != nil {
		return nil, fmt.Errorf("vip: %s: link %s: %w", addr, v.Link, err)
	}
	attrs := link.Attrs()
	if len(attrs.HardwareAddr) != 6 {
		return nil, fmt.Errorf("vip: %s: link %s has no Ethernet address", addr, v.Link)
	}
	if attrs.Flags&net.FlagUp == 0 {
		return nil, fmt.Errorf("vip: %s: link %s is down", addr, v.Link)
	}
	return link, nil
}

// hold records v as ours, announces it once and starts the background
// announcements. Callers hold opMu.
func (m *Manager) hold(v VIP, attrs *netlink.LinkAttrs, log *slog.Logger) *holding {
	hctx, stop := context.WithCancel(m.life)
	h := &holding{vip: v, ifindex: attrs.Index, mac: attrs.HardwareAddr, stop: stop, done: make(chan struct{})}
	m.mu.Lock()
	m.held[v.Addr.Addr()] = h
	m.mu.Unlock()

	if err := m.announce(h); err != nil {
		// The address is up and ours; a failed first announcement is
		// retried by the background rounds rather than undoing the add.
		log.Warn("announcement failed", "err", err)
	}
	if !m.goFunc(func() {
		defer close(h.done)
		m.repeat(hctx, m.cfg.AnnounceCount-1, m.cfg.AnnounceInterval, func() error { return m.announce(h) })
	}) {
		close(h.done)
	}
	return h
}

// Announce sends one more round of gratuitous ARP or unsolicited NA for a
// held VIP, for example after its link flapped.
func (m *Manager) Announce(ctx context.Context, v VIP) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	m.live.RLock()
	defer m.live.RUnlock()
	m.mu.Lock()
	h, closed := m.held[v.Addr.Addr()], m.closed
	m.mu.Unlock()
	if closed {
		return ErrClosed
	}
	if h == nil {
		return fmt.Errorf("%w: %s", ErrNotHeld, v.Addr.Addr())
	}
	return m.announce(h)
}

// Release removes v if this Manager added it. Releasing a VIP it does not
// hold is a no-op: an address someone else configured is never removed.
func (m *Manager) Release(ctx context.Context, v VIP) error {
	m.opMu.Lock()
	defer m.opMu.Unlock()
	addr := v.Addr.Addr()
	m.mu.Lock()
	h, closed := m.held[addr], m.closed
	m.mu.Unlock()
	if closed {
		return ErrClosed
	}
	if h == nil {
		m.log.Debug("release of an address not held; nothing to do", "vip", addr.String())
		return nil
	}
	// Stop announcing before deleting: a late gratuitous ARP after the new
	// owner's would pull initiators back to us.
	h.stop()
	select {
	case <-h.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	err := m.nl.AddrDel(nil, &netlink.Addr{IPNet: prefixToIPNet(h.vip.Addr), LinkIndex: h.ifindex})
	if err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("vip: remove %s: %w", h.vip, err)
	}
	m.forget(h)
	m.log.Info("released", "vip", h.vip.Addr.String(), "link", h.vip.Link)
	return nil
}

// forget drops h from the table.
func (m *Manager) forget(h *holding) {
	h.stop()
	m.mu.Lock()
	if m.held[h.vip.Addr.Addr()] == h {
		delete(m.held, h.vip.Addr.Addr())
	}
	m.mu.Unlock()
}

// findAddr returns the namespace's address equal to a, on any link.
func (m *Manager) findAddr(a netip.Addr) (*netlink.Addr, error) {
	family := netlink.FAMILY_V4
	if a.Is6() {
		family = netlink.FAMILY_V6
	}
	addrs, err := m.nl.AddrList(nil, family)
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		return nil, fmt.Errorf("vip: list addresses: %w", err)
	}
	for i := range addrs {
		if got, ok := netip.AddrFromSlice(addrs[i].IP); ok && got.Unmap() == a {
			return &addrs[i], nil
		}
	}
	return nil, nil
}

// repeat runs f n times, interval apart, until ctx ends; errors are logged.
func (m *Manager) repeat(ctx context.Context, n int, interval time.Duration, f func() error) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for i := 0; i < n; i++ {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := f(); err != nil {
			m.log.Warn("repeated send failed", "err", err)
		}
	}
}

func prefixToIPNet(p netip.Prefix) *net.IPNet {
	a := p.Addr()
	bits := 32
	if a.Is6() {
		bits = 128
	}
	return &net.IPNet{IP: net.IP(a.AsSlice()), Mask: net.CIDRMask(p.Bits(), bits)}
}
