package vip

import (
	"context"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// tickleWindow is the window advertised in a tickle; any value works, the
// segment is rejected on its sequence number before the window is read.
const tickleWindow = 1024

// Tickle makes initiators notice at once that their connection's old owner
// is gone. For each connection it sends, from the VIP, a bare ACK with
// sequence and acknowledgement 0 (as CTDB does). The number is outside the
// initiator's receive window, so its kernel answers with an ACK carrying
// its real sequence numbers; that ACK now reaches this host, which has no
// socket for it and answers with a reset the initiator accepts. The
// initiator's read fails with ECONNRESET and it reconnects immediately
// instead of waiting for a NOP-Out or keepalive timeout.
//
// Every conn's Local address must be a VIP this Manager holds (otherwise
// ErrNotHeld, and nothing is sent). The first tickle is sent before Tickle
// returns; the rest (Config.TickleCount) follow in the background and stop
// for a VIP once it is released.
func (m *Manager) Tickle(ctx context.Context, conns []TCPConn) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	m.live.RLock()
	defer m.live.RUnlock()
	m.mu.Lock()
	closed := m.closed
	var bad []error
	for _, c := range conns {
		switch {
		case !c.Local.IsValid() || !c.Remote.IsValid() || c.Local.Addr().Is4() != c.Remote.Addr().Is4():
			bad = append(bad, fmt.Errorf("vip: tickle %s: bad address pair", c))
		case m.held[c.Local.Addr()] == nil:
			bad = append(bad, fmt.Errorf("%w: tickle %s", ErrNotHeld, c))
		}
	}
	m.mu.Unlock()
	if closed {
		return ErrClosed
	}
	if len(bad) > 0 {
		return errors.Join(bad...)
	}
	if len(conns) == 0 {
		return nil
	}
	conns = append([]TCPConn(nil), conns...)
	s, err := m.openTickle(conns)
	if err != nil {
		return err
	}
	sent, err := m.tickleRound(s, conns)
	m.log.Info("tickled", "connections", sent)
	if m.cfg.TickleCount <= 1 {
		s.Close()
		return err
	}
	if !m.goFunc(func() {
		defer s.Close()
		m.repeat(m.life, m.cfg.TickleCount-1, m.cfg.TickleInterval, func() error {
			_, err := m.tickleRound(s, conns)
			return err
		})
	}) {
		s.Close()
	}
	return err
}

// tickleSockets are raw IPPROTO_RAW sockets, one per family in use. The
// header is ours, so the source is the VIP without binding to it, and
// IPPROTO_RAW sockets receive nothing.
type tickleSockets struct{ v4, v6 *rawConn }

func (s *tickleSockets) Close() {
	if s.v4 != nil {
		s.v4.Close()
	}
	if s.v6 != nil {
		s.v6.Close()
	}
}

func (m *Manager) openTickle(conns []TCPConn) (*tickleSockets, error) {
	s := &tickleSockets{}
	for _, c := range conns {
		domain, slot := unix.AF_INET, &s.v4
		if c.Local.Addr().Is6() {
			domain, slot = unix.AF_INET6, &s.v6
		}
		if *slot != nil {
			continue
		}
		fd, err := socketIn(m.ns, domain, unix.SOCK_RAW, unix.IPPROTO_RAW)
		if err == nil {
			*slot, err = newRawConn(fd, "tickle")
		}
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("vip: tickle socket: %w", err)
		}
	}
	return s, nil
}

// tickleRound sends one tickle to every connection whose VIP is still held.
func (m *Manager) tickleRound(s *tickleSockets, conns []TCPConn) (int, error) {
	var errs []error
	sent := 0
	for _, c := range conns {
		m.mu.Lock()
		held := m.held[c.Local.Addr()] != nil
		m.mu.Unlock()
		if !held {
			continue
		}
		seg := tcpSegment{Src: c.Local, Dst: c.Remote, Seq: 0, Ack: 0, Flags: tcpFlagACK, Window: tickleWindow}
		var err error
		if c.Local.Addr().Is4() {
			err = s.v4.sendto(seg.marshalIP(), &unix.SockaddrInet4{Addr: c.Remote.Addr().As4()})
		} else {
			err = s.v6.sendto(seg.marshalIP(), &unix.SockaddrInet6{Addr: c.Remote.Addr().As16()})
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("vip: tickle %s: %w", c, err))
			continue
		}
		sent++
	}
	return sent, errors.Join(errs...)
}
