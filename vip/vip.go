package vip

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"time"
)

// VIP is one floating address on one link.
type VIP struct {
	// Addr is the host address with the prefix length it is added with, for
	// example 192.0.2.10/24. A /32 (or /128) adds no prefix route and keeps
	// the address from becoming a primary that drags secondaries with it
	// when removed.
	Addr netip.Prefix
	// Link is the interface name, for example "eth0".
	Link string
	// Label is the IPv4 address label ("eth0:hasan"). A label that does not
	// start with Link is prefixed with "Link:". Empty means DefaultLabel.
	// IPv6 has no labels; the field is kept in List output but not sent.
	Label string
}

// DefaultLabel is the label suffix used when VIP.Label is empty.
const DefaultLabel = "hasan"

// String formats the VIP as "addr dev link".
func (v VIP) String() string { return v.Addr.String() + " dev " + v.Link }

// TCPConn is one TCP connection as the old owner saw it: Local is the VIP
// and port the portal listened on, Remote the initiator's address and port.
type TCPConn struct {
	Local  netip.AddrPort
	Remote netip.AddrPort
}

func (c TCPConn) String() string { return c.Local.String() + "<->" + c.Remote.String() }

// Defaults. Each is chosen for a failover budget of 2 s (0.3 s for a planned
// move); docs/vip.md explains them.
const (
	// Three ARP or NS probes 10 ms apart, then 30 ms of listening (50 ms
	// in all): a holder on the same LAN answers in well under a millisecond
	// (its kernel replies from softirq; a refusal took 0.6-1.9 ms in the
	// namespace tests), so 30 ms is a wide margin, and three probes survive
	// two lost frames. RFC 5227's 1-2 s spacing is
	// made for hosts joining a network, not for a fenced takeover that has
	// a 2 s budget (0.3 s for a planned move).
	DefaultProbeCount    = 3
	DefaultProbeInterval = 10 * time.Millisecond
	DefaultProbeWait     = 30 * time.Millisecond

	// Three announcements 100 ms apart: the first one does the work (every
	// Linux neighbour entry is overridden by a gratuitous ARP or an NA with
	// the override flag, and switches learn the MAC from it); two repeats
	// within 200 ms cover a lost frame without stretching the failover.
	DefaultAnnounceCount    = 3
	DefaultAnnounceInterval = 100 * time.Millisecond

	// Three tickles 300 ms apart. Linux answers an out-of-window ACK at
	// most once per net.ipv4.tcp_invalid_ratelimit (500 ms) per socket, so
	// the second tickle only helps if the first was lost on the way in, and
	// the third (600 ms) gets a fresh answer if the initiator's reply or
	// our kernel's reset was lost.
	DefaultTickleCount    = 3
	DefaultTickleInterval = 300 * time.Millisecond
)

// Config configures a Manager. The zero value is valid: it manages the
// caller's network namespace with the defaults above.
type Config struct {
	// NetNS is the path of a network namespace (e.g. /var/run/netns/x) to
	// manage instead of the caller's own.
	NetNS string

	// ProbeCount is how many duplicate-address probes to send before an
	// address is added. 0 means DefaultProbeCount; negative disables the
	// probe (only for callers that have another proof the address is free).
	ProbeCount int
	// ProbeInterval is the gap between probes (0: DefaultProbeInterval).
	ProbeInterval time.Duration
	// ProbeWait is how long to listen after the last probe (0: DefaultProbeWait).
	ProbeWait time.Duration

	// AnnounceCount is how many gratuitous ARP / unsolicited NA rounds to
	// send after adding an address (0: DefaultAnnounceCount). The first is
	// sent before Acquire returns, the rest in the background.
	AnnounceCount int
	// AnnounceInterval is the gap between rounds (0: DefaultAnnounceInterval).
	AnnounceInterval time.Duration

	// TickleCount is how many tickle ACKs to send per connection
	// (0: DefaultTickleCount). The first is sent before Tickle returns.
	TickleCount int
	// TickleInterval is the gap between tickles (0: DefaultTickleInterval).
	TickleInterval time.Duration

	// Logger receives structured events; nil means slog.Default().
	Logger *slog.Logger
}

// withDefaults fills zero fields and checks the rest, naming the bad field.
func (c Config) withDefaults() (Config, error) {
	if c.ProbeCount == 0 {
		c.ProbeCount = DefaultProbeCount
	}
	if c.ProbeInterval == 0 {
		c.ProbeInterval = DefaultProbeInterval
	}
	if c.ProbeWait == 0 {
		c.ProbeWait = DefaultProbeWait
	}
	if c.AnnounceCount == 0 {
		c.AnnounceCount = DefaultAnnounceCount
	}
	if c.AnnounceInterval == 0 {
		c.AnnounceInterval = DefaultAnnounceInterval
	}
	if c.TickleCount == 0 {
		c.TickleCount = DefaultTickleCount
	}
	if c.TickleInterval == 0 {
		c.TickleInterval = DefaultTickleInterval
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	switch {
	case c.ProbeInterval < 0:
		return c, fmt.Errorf("vip: config: ProbeInterval %v must not be negative", c.ProbeInterval)
	case c.ProbeWait < 0:
		return c, fmt.Errorf("vip: config: ProbeWait %v must not be negative", c.ProbeWait)
	case c.AnnounceCount < 0:
		return c, fmt.Errorf("vip: config: AnnounceCount %d must not be negative", c.AnnounceCount)
	case c.AnnounceInterval < 0:
		return c, fmt.Errorf("vip: config: AnnounceInterval %v must not be negative", c.AnnounceInterval)
	case c.TickleCount < 0:
		return c, fmt.Errorf("vip: config: TickleCount %d must not be negative", c.TickleCount)
	case c.TickleInterval < 0:
		return c, fmt.Errorf("vip: config: TickleInterval %v must not be negative", c.TickleInterval)
	}
	return c, nil
}

var (
	// ErrAddressInUse means a duplicate-address probe got an answer: some
	// other host holds (or is probing for) the address. The error is a
	// *ConflictError naming the MAC that answered.
	ErrAddressInUse = errors.New("vip: address in use")
	// ErrForeignAddress means the address is already configured in the
	// namespace but not by this Manager, so it is neither taken over nor
	// removed.
	ErrForeignAddress = errors.New("vip: address configured by someone else")
	// ErrNotHeld means a Tickle named a local address this Manager does
	// not hold; the initiator's answer would not reach us.
	ErrNotHeld = errors.New("vip: address not held")
	// ErrClosed is returned after Close.
	ErrClosed = errors.New("vip: manager closed")
)

// ConflictError reports who answered a duplicate-address probe.
type ConflictError struct {
	Addr netip.Addr
	MAC  net.HardwareAddr
}

func (e *ConflictError) Error() string {
	return fmt.Sprintf("vip: address %s in use by %s", e.Addr, e.MAC)
}

// Is makes errors.Is(err, ErrAddressInUse) true.
func (e *ConflictError) Is(target error) bool { return target == ErrAddressInUse }

// normalize checks v and fills in its label.
func (v VIP) normalize() (VIP, error) {
	if !v.Addr.IsValid() {
		return v, fmt.Errorf("vip: invalid address %v", v.Addr)
	}
	a := v.Addr.Addr()
	if a.Is4In6() || a.Zone() != "" || a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() || a.IsLinkLocalUnicast() {
		return v, fmt.Errorf("vip: %s cannot float (unspecified, loopback, multicast, link-local or mapped)", a)
	}
	if v.Link == "" || len(v.Link) > 15 {
		return v, fmt.Errorf("vip: %s: bad link name %q", a, v.Link)
	}
	if a.Is4() {
		switch {
		case v.Label == "":
			v.Label = v.Link + ":" + DefaultLabel
		case !strings.HasPrefix(v.Label, v.Link):
			v.Label = v.Link + ":" + v.Label
		}
		if len(v.Label) > 15 {
			return v, fmt.Errorf("vip: %s: label %q longer than 15 bytes", a, v.Label)
		}
	}
	return v, nil
}
