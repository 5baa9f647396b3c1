// Package vip owns the floating IP addresses of one host (or one network
// namespace): it probes for a duplicate before taking an address, adds and
// removes it with vishvananda/netlink (IPv4 with a label such as
// "eth0:hasan"), announces the move with gratuitous ARP or unsolicited
// neighbour advertisements, and sends TCP tickle ACKs so that initiators
// whose connections died with the old owner reset and reconnect at once.
//
// It is a leaf: it knows nothing of Raft, targets or fencing. The cluster
// node agent decides when a VIP may move and calls, in this order:
//
//	m, err := vip.New(vip.Config{Logger: log}) // once per node
//	defer m.Close()
//
//	// Only after the fence is confirmed and the ownership change is
//	// committed in Raft:
//	err = m.Acquire(ctx, vip.VIP{Addr: netip.MustParsePrefix("192.0.2.10/24"), Link: "eth0"})
//	if errors.Is(err, vip.ErrAddressInUse) { /* someone still answers: do not serve */ }
//	// ... open the iSCSI portal on the VIP, then:
//	err = m.Tickle(ctx, connsFromClusterState) // []vip.TCPConn{Local: VIP:3260, Remote: initiator}
//
//	// On a planned move, demotion or quorum loss:
//	err = m.Release(ctx, v) // removes only what this Manager added
//
// After a restart, while cluster state says this node owns v and the
// address is still configured, Adopt(ctx, v) takes it back without a probe.
//
// Acquire and Release are idempotent. Acquire returns after the first
// announcement and Tickle after the first tickle; the repeats run in the
// background, are stopped by Release (for that VIP) and Close, and Close
// waits for them. Every raw packet (ARP, NS/NA, TCP) is built here by hand
// and sent through AF_PACKET or IPPROTO_RAW sockets, so the package needs
// CAP_NET_ADMIN and CAP_NET_RAW. docs/vip.md explains the defaults and the
// measured timings.
package vip
