package vip

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// socketIn opens a non-blocking socket in namespace ns (the caller's own
// namespace when ns is not open). A socket belongs to the namespace it was
// created in for its whole life, so only the creation has to run there.
func socketIn(ns netns.NsHandle, domain, typ, proto int) (int, error) {
	typ |= unix.SOCK_NONBLOCK | unix.SOCK_CLOEXEC
	if !ns.IsOpen() {
		fd, err := unix.Socket(domain, typ, proto)
		if err != nil {
			return -1, fmt.Errorf("vip: socket: %w", err)
		}
		return fd, nil
	}
	type result struct {
		fd  int
		err error
	}
	ch := make(chan result, 1)
	// A fresh goroutine that never unlocks its thread: when it returns, the
	// runtime throws the thread away, so a thread left in the foreign
	// namespace can never run other goroutines.
	go func() {
		runtime.LockOSThread()
		if err := netns.Set(ns); err != nil {
			ch <- result{-1, fmt.Errorf("vip: setns: %w", err)}
			return
		}
		fd, err := unix.Socket(domain, typ, proto)
		if err != nil {
			err = fmt.Errorf("vip: socket: %w", err)
		}
		ch <- result{fd, err}
	}()
	r := <-ch
	return r.fd, r.err
}

// rawConn wraps a non-blocking socket in an *os.File so reads park in the
// runtime poller and honour deadlines.
type rawConn struct {
	f  *os.File
	rc syscall.RawConn
}

func newRawConn(fd int, name string) (*rawConn, error) {
	f := os.NewFile(uintptr(fd), name)
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("vip: %s: %w", name, err)
	}
	return &rawConn{f: f, rc: rc}, nil
}

func (c *rawConn) Close() error { return c.f.Close() }

// recvUntil reads packets until deadline or ctx ends, handing each to fn;
// fn returns true to stop. A deadline or cancellation is not an error when
// it is the deadline's doing; ctx's own error is returned.
func (c *rawConn) recvUntil(ctx context.Context, deadline time.Time, buf []byte, fn func(b []byte, from unix.Sockaddr) bool) error {
	if err := c.f.SetReadDeadline(deadline); err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { c.f.SetReadDeadline(time.Now()) })
	defer stop()
	for {
		var (
			n    int
			from unix.Sockaddr
			rerr error
		)
		err := c.rc.Read(func(fd uintptr) bool {
			n, from, rerr = unix.Recvfrom(int(fd), buf, 0)
			return rerr != unix.EAGAIN
		})
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return nil
			}
			return err
		}
		if rerr != nil {
			return rerr
		}
		if fn(buf[:n], from) {
			return nil
		}
	}
}

func (c *rawConn) sendto(b []byte, to unix.Sockaddr) error {
	var serr error
	err := c.rc.Write(func(fd uintptr) bool {
		serr = unix.Sendto(int(fd), b, 0, to)
		return serr != unix.EAGAIN
	})
	if err != nil {
		return err
	}
	return serr
}

// htons converts a protocol number to the network byte order AF_PACKET wants.
func htons(v uint16) uint16 { return v<<8 | v>>8 }

// openPacket opens an AF_PACKET datagram socket bound to one interface and
// one ethertype (0: receive nothing, send only): the kernel adds and strips
// the Ethernet header.
func openPacket(ns netns.NsHandle, ifindex int, ethertype uint16) (*rawConn, error) {
	// Protocol 0 at creation: nothing is queued until bind narrows the
	// socket to our interface, so no foreign frames leak in first.
	fd, err := socketIn(ns, unix.AF_PACKET, unix.SOCK_DGRAM, 0)
	if err != nil {
		return nil, err
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(ethertype), Ifindex: ifindex}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("vip: bind packet socket: %w", err)
	}
	return newRawConn(fd, "packet")
}

// linkDest is where an AF_PACKET datagram goes.
func linkDest(ifindex int, ethertype uint16, mac []byte) *unix.SockaddrLinklayer {
	sa := &unix.SockaddrLinklayer{Protocol: htons(ethertype), Ifindex: ifindex, Halen: uint8(len(mac))}
	copy(sa.Addr[:], mac)
	return sa
}
