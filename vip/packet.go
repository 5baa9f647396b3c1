package vip

// Pure packet encoders and decoders: no I/O here, so the wire formats are
// unit-tested without privileges.

import (
	"encoding/binary"
	"net"
	"net/netip"
)

const (
	etherTypeIPv4 = 0x0800
	etherTypeARP  = 0x0806
	etherTypeIPv6 = 0x86DD

	arpRequest = 1
	arpReply   = 2
	arpLen     = 28

	protoTCP    = 6
	protoICMPv6 = 58

	icmpv6NS = 135
	icmpv6NA = 136

	// NA flags word: Router 0x80000000, Solicited 0x40000000, Override 0x20000000.
	naOverride  = 0x20000000
	naSolicited = 0x40000000

	ndOptSourceLL = 1
	ndOptTargetLL = 2

	tcpFlagRST = 0x04
	tcpFlagACK = 0x10
)

var (
	broadcastMAC = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	zeroMAC      = net.HardwareAddr{0, 0, 0, 0, 0, 0}
	allNodes     = netip.MustParseAddr("ff02::1")
)

// arpPacket is an Ethernet/IPv4 ARP message (RFC 826).
type arpPacket struct {
	Op       uint16
	SenderHW net.HardwareAddr
	SenderIP netip.Addr
	TargetHW net.HardwareAddr
	TargetIP netip.Addr
}

func (p arpPacket) marshal() []byte {
	b := make([]byte, arpLen)
	binary.BigEndian.PutUint16(b[0:], 1) // Ethernet
	binary.BigEndian.PutUint16(b[2:], etherTypeIPv4)
	b[4], b[5] = 6, 4
	binary.BigEndian.PutUint16(b[6:], p.Op)
	copy(b[8:14], p.SenderHW)
	s := p.SenderIP.As4()
	copy(b[14:18], s[:])
	copy(b[18:24], p.TargetHW)
	t := p.TargetIP.As4()
	copy(b[24:28], t[:])
	return b
}

func parseARP(b []byte) (arpPacket, bool) {
	if len(b) < arpLen || binary.BigEndian.Uint16(b[0:]) != 1 ||
		binary.BigEndian.Uint16(b[2:]) != etherTypeIPv4 || b[4] != 6 || b[5] != 4 {
		return arpPacket{}, false
	}
	return arpPacket{
		Op:       binary.BigEndian.Uint16(b[6:]),
		SenderHW: net.HardwareAddr(append([]byte(nil), b[8:14]...)),
		SenderIP: netip.AddrFrom4([4]byte(b[14:18])),
		TargetHW: net.HardwareAddr(append([]byte(nil), b[18:24]...)),
		TargetIP: netip.AddrFrom4([4]byte(b[24:28])),
	}, true
}

// arpProbe is RFC 5227's probe: "who has target?" from 0.0.0.0, so no
// listener's cache learns a binding for an address we may not get.
func arpProbe(mac net.HardwareAddr, target netip.Addr) []byte {
	return arpPacket{Op: arpRequest, SenderHW: mac, SenderIP: netip.IPv4Unspecified(), TargetHW: zeroMAC, TargetIP: target}.marshal()
}

// garp returns the two gratuitous forms: an ARP announcement (a request with
// sender = target = addr, RFC 5227) and a gratuitous reply whose target
// hardware address equals the sender's, which Linux's arp_is_garp requires
// before it treats a reply as gratuitous. Some switches and old stacks only
// honour one of the two, so both are sent.
func garp(mac net.HardwareAddr, addr netip.Addr) (request, reply []byte) {
	request = arpPacket{Op: arpRequest, SenderHW: mac, SenderIP: addr, TargetHW: zeroMAC, TargetIP: addr}.marshal()
	reply = arpPacket{Op: arpReply, SenderHW: mac, SenderIP: addr, TargetHW: mac, TargetIP: addr}.marshal()
	return request, reply
}

// checksum is the Internet checksum (RFC 1071) over a pseudo-header sum
// already folded into initial.
func checksum(initial uint32, b []byte) uint16 {
	sum := initial
	for len(b) >= 2 {
		sum += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// pseudoSum sums the IPv4 or IPv6 pseudo-header for an upper-layer checksum.
func pseudoSum(src, dst netip.Addr, proto uint8, length int) uint32 {
	var sum uint32
	add := func(b []byte) {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(b[i:]))
		}
	}
	add(src.AsSlice())
	add(dst.AsSlice())
	sum += uint32(proto) + uint32(length)&0xffff + uint32(length)>>16
	return sum
}

// ipv6Header returns a 40-byte IPv6 header.
func ipv6Header(src, dst netip.Addr, next uint8, hopLimit uint8, payloadLen int) []byte {
	h := make([]byte, 40)
	h[0] = 0x60
	binary.BigEndian.PutUint16(h[4:], uint16(payloadLen))
	h[6] = next
	h[7] = hopLimit
	s, d := src.As16(), dst.As16()
	copy(h[8:24], s[:])
	copy(h[24:40], d[:])
	return h
}

// solicitedNode returns ff02::1:ffXX:XXXX for a and its multicast MAC.
func solicitedNode(a netip.Addr) (netip.Addr, net.HardwareAddr) {
	b := a.As16()
	g := netip.AddrFrom16([16]byte{0xff, 0x02, 10: 0, 11: 0x01, 12: 0xff, 13: b[13], 14: b[14], 15: b[15]})
	return g, multicastMAC(g)
}

// multicastMAC maps an IPv6 multicast group to 33:33 + its low 32 bits.
func multicastMAC(g netip.Addr) net.HardwareAddr {
	b := g.As16()
	return net.HardwareAddr{0x33, 0x33, b[12], b[13], b[14], b[15]}
}

// nsProbe is RFC 4862's duplicate-address probe: a neighbour solicitation
// from :: to the target's solicited-node group, with no source link-layer
// option (which RFC 4861 forbids from ::). Returns the IPv6 packet.
func nsProbe(target netip.Addr) []byte {
	group, _ := solicitedNode(target)
	icmp := make([]byte, 24)
	icmp[0] = icmpv6NS
	t := target.As16()
	copy(icmp[8:24], t[:])
	src := netip.IPv6Unspecified()
	binary.BigEndian.PutUint16(icmp[2:], checksum(pseudoSum(src, group, protoICMPv6, len(icmp)), icmp))
	return append(ipv6Header(src, group, protoICMPv6, 255, len(icmp)), icmp...)
}

// unsolicitedNA announces addr at mac to all nodes with the override flag
// set and solicited clear, so receivers replace whatever link-layer address
// they had cached (RFC 4861 7.2.5).
func unsolicitedNA(mac net.HardwareAddr, addr netip.Addr) []byte {
	icmp := make([]byte, 32)
	icmp[0] = icmpv6NA
	binary.BigEndian.PutUint32(icmp[4:], naOverride)
	a := addr.As16()
	copy(icmp[8:24], a[:])
	icmp[24], icmp[25] = ndOptTargetLL, 1
	copy(icmp[26:32], mac)
	binary.BigEndian.PutUint16(icmp[2:], checksum(pseudoSum(addr, allNodes, protoICMPv6, len(icmp)), icmp))
	return append(ipv6Header(addr, allNodes, protoICMPv6, 255, len(icmp)), icmp...)
}

// ndMessage is the part of a received NS or NA a probe cares about.
type ndMessage struct {
	Type   uint8
	Src    netip.Addr
	Target netip.Addr
	Flags  uint32
}

// parseND decodes an IPv6 packet carrying an NS or NA directly after the
// fixed header. Neighbour discovery never uses extension headers and must
// arrive with hop limit 255 (RFC 4861 7.1.1), which proves it is on-link.
func parseND(b []byte) (ndMessage, bool) {
	if len(b) < 40+24 || b[0]>>4 != 6 || b[6] != protoICMPv6 || b[7] != 255 {
		return ndMessage{}, false
	}
	icmp := b[40:]
	if icmp[0] != icmpv6NS && icmp[0] != icmpv6NA || icmp[1] != 0 {
		return ndMessage{}, false
	}
	return ndMessage{
		Type:   icmp[0],
		Src:    netip.AddrFrom16([16]byte(b[8:24])),
		Target: netip.AddrFrom16([16]byte(icmp[8:24])),
		Flags:  binary.BigEndian.Uint32(icmp[4:]),
	}, true
}

// tcpSegment is a TCP header without options or payload.
type tcpSegment struct {
	Src, Dst netip.AddrPort
	Seq, Ack uint32
	Flags    uint8
	Window   uint16
}

func (s tcpSegment) marshalTCP() []byte {
	h := make([]byte, 20)
	binary.BigEndian.PutUint16(h[0:], s.Src.Port())
	binary.BigEndian.PutUint16(h[2:], s.Dst.Port())
	binary.BigEndian.PutUint32(h[4:], s.Seq)
	binary.BigEndian.PutUint32(h[8:], s.Ack)
	h[12] = 5 << 4
	h[13] = s.Flags
	binary.BigEndian.PutUint16(h[14:], s.Window)
	binary.BigEndian.PutUint16(h[16:], checksum(pseudoSum(s.Src.Addr(), s.Dst.Addr(), protoTCP, len(h)), h))
	return h
}

// marshalIP returns the segment inside a full IPv4 or IPv6 header, for a
// raw IPPROTO_RAW socket (header included), so the source can be the VIP
// without binding to it.
func (s tcpSegment) marshalIP() []byte {
	tcp := s.marshalTCP()
	if s.Src.Addr().Is6() {
		return append(ipv6Header(s.Src.Addr(), s.Dst.Addr(), protoTCP, 64, len(tcp)), tcp...)
	}
	h := make([]byte, 20)
	h[0] = 0x45
	binary.BigEndian.PutUint16(h[2:], uint16(20+len(tcp)))
	binary.BigEndian.PutUint16(h[6:], 0x4000) // DF; the kernel fills ID and checksum
	h[8] = 64
	h[9] = protoTCP
	src, dst := s.Src.Addr().As4(), s.Dst.Addr().As4()
	copy(h[12:16], src[:])
	copy(h[16:20], dst[:])
	binary.BigEndian.PutUint16(h[10:], checksum(0, h))
	return append(h, tcp...)
}

// parseTCP decodes the TCP header of an IPv4 or IPv6 packet (no IPv6
// extension headers). Used by tests to watch the tickle exchange.
func parseTCP(b []byte) (tcpSegment, bool) {
	var src, dst netip.Addr
	var l4 []byte
	switch {
	case len(b) >= 20 && b[0]>>4 == 4 && b[9] == protoTCP:
		ihl := int(b[0]&0x0f) * 4
		if len(b) < ihl+20 {
			return tcpSegment{}, false
		}
		src, dst = netip.AddrFrom4([4]byte(b[12:16])), netip.AddrFrom4([4]byte(b[16:20]))
		l4 = b[ihl:]
	case len(b) >= 60 && b[0]>>4 == 6 && b[6] == protoTCP:
		src, dst = netip.AddrFrom16([16]byte(b[8:24])), netip.AddrFrom16([16]byte(b[24:40]))
		l4 = b[40:]
	default:
		return tcpSegment{}, false
	}
	return tcpSegment{
		Src:    netip.AddrPortFrom(src, binary.BigEndian.Uint16(l4[0:])),
		Dst:    netip.AddrPortFrom(dst, binary.BigEndian.Uint16(l4[2:])),
		Seq:    binary.BigEndian.Uint32(l4[4:]),
		Ack:    binary.BigEndian.Uint32(l4[8:]),
		Flags:  l4[13],
		Window: binary.BigEndian.Uint16(l4[14:]),
	}, true
}
