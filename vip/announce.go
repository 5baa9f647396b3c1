package vip

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// probe asks the link whether anyone holds addr: ARP probes (RFC 5227) for
// IPv4, duplicate-address neighbour solicitations (RFC 4862) for IPv6. It
// returns a *ConflictError naming the first foreign MAC that claims addr,
// either by answering or by probing for the same address at the same time.
func (m *Manager) probe(ctx context.Context, ifindex int, mac net.HardwareAddr, addr netip.Addr) error {
	ethertype := uint16(etherTypeARP)
	var pkt []byte
	var dst *unix.SockaddrLinklayer
	var match func(b []byte, from net.HardwareAddr) net.HardwareAddr
	if addr.Is4() {
		pkt = arpProbe(mac, addr)
		dst = linkDest(ifindex, etherTypeARP, broadcastMAC)
		match = func(b []byte, _ net.HardwareAddr) net.HardwareAddr {
			p, ok := parseARP(b)
			if !ok || bytes.Equal(p.SenderHW, mac) {
				return nil
			}
			if p.SenderIP == addr || (p.Op == arpRequest && p.SenderIP.IsUnspecified() && p.TargetIP == addr) {
				return p.SenderHW
			}
			return nil
		}
	} else {
		ethertype = etherTypeIPv6
		pkt = nsProbe(addr)
		_, group := solicitedNode(addr)
		dst = linkDest(ifindex, etherTypeIPv6, group)
		match = func(b []byte, from net.HardwareAddr) net.HardwareAddr {
			nd, ok := parseND(b)
			if !ok || bytes.Equal(from, mac) {
				return nil
			}
			switch {
			case nd.Type == icmpv6NA && nd.Target == addr,
				nd.Type == icmpv6NS && nd.Target == addr && nd.Src.IsUnspecified(),
				nd.Src == addr:
				return from
			}
			return nil
		}
	}

	c, err := openPacket(m.ns, ifindex, ethertype)
	if err != nil {
		return err
	}
	// Closing a packet socket waits for an RCU grace period
	// (synchronize_net in packet_release), 10-20 ms on a busy host; the
	// takeover should not wait for it.
	defer m.closeLater(c)
	var found net.HardwareAddr
	onPacket := func(b []byte, sa unix.Sockaddr) bool {
		ll, ok := sa.(*unix.SockaddrLinklayer)
		if !ok || ll.Pkttype == unix.PACKET_OUTGOING {
			return false
		}
		from := net.HardwareAddr(append([]byte(nil), ll.Addr[:min(int(ll.Halen), len(ll.Addr))]...))
		found = match(b, from)
		return found != nil
	}
	buf := make([]byte, 2048)
	// Deadlines count from the first probe, so scheduling delays on a busy
	// host do not stretch the window probe by probe.
	start := time.Now()
	for i := 0; i < m.cfg.ProbeCount; i++ {
		if err := c.sendto(pkt, dst); err != nil {
			return fmt.Errorf("vip: probe %s: %w", addr, err)
		}
		until := start.Add(time.Duration(i+1) * m.cfg.ProbeInterval)
		if i == m.cfg.ProbeCount-1 {
			until = start.Add(time.Duration(i)*m.cfg.ProbeInterval + m.cfg.ProbeWait)
		}
		if err := c.recvUntil(ctx, until, buf, onPacket); err != nil {
			return fmt.Errorf("vip: probe %s: %w", addr, err)
		}
		if found != nil {
			return &ConflictError{Addr: addr, MAC: found}
		}
	}
	return nil
}

// announce sends one round: a gratuitous ARP request and reply for IPv4,
// an unsolicited override NA to all nodes for IPv6.
func (m *Manager) announce(h *holding) error {
	c, err := m.packetSender()
	if err != nil {
		return err
	}
	addr := h.vip.Addr.Addr()
	if addr.Is4() {
		req, rep := garp(h.mac, addr)
		dst := linkDest(h.ifindex, etherTypeARP, broadcastMAC)
		for _, p := range [][]byte{req, rep} {
			if err := c.sendto(p, dst); err != nil {
				return fmt.Errorf("vip: gratuitous ARP for %s: %w", addr, err)
			}
		}
		return nil
	}
	if err := c.sendto(unsolicitedNA(h.mac, addr), linkDest(h.ifindex, etherTypeIPv6, multicastMAC(allNodes))); err != nil {
		return fmt.Errorf("vip: neighbour advertisement for %s: %w", addr, err)
	}
	return nil
}

// packetSender returns the Manager's send-only packet socket, opened on
// first use and closed by Close. Created with protocol 0 and never bound,
// it receives nothing; each sendto names its interface. Keeping it open
// spares every announcement a socket setup and an RCU grace period on close.
func (m *Manager) packetSender() (*rawConn, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.sender != nil {
		return m.sender, nil
	}
	fd, err := socketIn(m.ns, unix.AF_PACKET, unix.SOCK_DGRAM, 0)
	if err != nil {
		return nil, err
	}
	m.sender, err = newRawConn(fd, "packet-send")
	return m.sender, err
}
