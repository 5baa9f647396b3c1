package vip

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"
)

var testMAC = net.HardwareAddr{0x02, 0x00, 0x5e, 0x10, 0x00, 0x01}

// verify returns the checksum over pseudo-header and data with the
// checksum field in place: 0 (as ^0xffff) when the field is right.
func verify(src, dst netip.Addr, proto uint8, b []byte) uint16 {
	return checksum(pseudoSum(src, dst, proto, len(b)), b)
}

func TestChecksumRFC1071Example(t *testing.T) {
	// RFC 1071 section 3: the sum of 0001 f203 f4f5 f6f7 is ddf2, so the
	// checksum is its complement.
	if got := checksum(0, []byte{0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7}); got != ^uint16(0xddf2) {
		t.Fatalf("checksum = %#04x, want %#04x", got, ^uint16(0xddf2))
	}
	// An odd trailing byte is padded with zero on the right.
	if checksum(0, []byte{0xab}) != checksum(0, []byte{0xab, 0}) {
		t.Fatal("odd length not padded")
	}
}

func TestARPFormats(t *testing.T) {
	a := netip.MustParseAddr("192.0.2.7")
	p, ok := parseARP(arpProbe(testMAC, a))
	if !ok || p.Op != arpRequest || !p.SenderIP.IsUnspecified() || p.TargetIP != a ||
		!bytes.Equal(p.SenderHW, testMAC) || !bytes.Equal(p.TargetHW, zeroMAC) {
		t.Fatalf("probe = %+v", p)
	}
	req, rep := garp(testMAC, a)
	q, _ := parseARP(req)
	r, _ := parseARP(rep)
	if q.Op != arpRequest || q.SenderIP != a || q.TargetIP != a {
		t.Fatalf("announcement = %+v", q)
	}
	// Linux only treats a reply as gratuitous when tha == sha.
	if r.Op != arpReply || r.SenderIP != a || r.TargetIP != a || !bytes.Equal(r.TargetHW, testMAC) {
		t.Fatalf("gratuitous reply = %+v", r)
	}
	if _, ok := parseARP(req[:20]); ok {
		t.Fatal("short ARP accepted")
	}
	bad := append([]byte(nil), req...)
	bad[3] = 0xdd // protocol type 0x86dd
	if _, ok := parseARP(bad); ok {
		t.Fatal("non-IPv4 ARP accepted")
	}
}

func TestNDFormats(t *testing.T) {
	a := netip.MustParseAddr("2001:db8::1234:5678")
	group, mac := solicitedNode(a)
	if group != netip.MustParseAddr("ff02::1:ff34:5678") || mac.String() != "33:33:ff:34:56:78" {
		t.Fatalf("solicited node = %s %s", group, mac)
	}

	ns := nsProbe(a)
	if len(ns) != 64 || ns[7] != 255 || binary.BigEndian.Uint16(ns[4:]) != 24 {
		t.Fatalf("NS header: len %d hop %d plen %d", len(ns), ns[7], binary.BigEndian.Uint16(ns[4:]))
	}
	if v := verify(netip.IPv6Unspecified(), group, protoICMPv6, ns[40:]); v != 0 {
		t.Fatalf("NS checksum off by %#x", v)
	}
	m, ok := parseND(ns)
	if !ok || m.Type != icmpv6NS || !m.Src.IsUnspecified() || m.Target != a {
		t.Fatalf("NS = %+v", m)
	}

	na := unsolicitedNA(testMAC, a)
	if v := verify(a, allNodes, protoICMPv6, na[40:]); v != 0 {
		t.Fatalf("NA checksum off by %#x", v)
	}
	m, ok = parseND(na)
	if !ok || m.Type != icmpv6NA || m.Src != a || m.Target != a || m.Flags != naOverride {
		t.Fatalf("NA = %+v (override only: solicited must be clear for a multicast NA)", m)
	}
	if opt := na[40+24:]; opt[0] != ndOptTargetLL || opt[1] != 1 || !bytes.Equal(opt[2:8], testMAC) {
		t.Fatalf("target link-layer option = % x", opt)
	}
	low := append([]byte(nil), na...)
	low[7] = 64
	if _, ok := parseND(low); ok {
		t.Fatal("ND with hop limit 64 accepted (RFC 4861 requires 255)")
	}
}

func TestTickleSegment(t *testing.T) {
	for _, tc := range []struct{ src, dst string }{
		{"192.0.2.100:3260", "192.0.2.10:51234"},
		{"[2001:db8::100]:3260", "[2001:db8::10]:51234"},
	} {
		s := tcpSegment{Src: netip.MustParseAddrPort(tc.src), Dst: netip.MustParseAddrPort(tc.dst), Flags: tcpFlagACK, Window: tickleWindow}
		pkt := s.marshalIP()
		got, ok := parseTCP(pkt)
		if !ok || got != s {
			t.Fatalf("%s: round trip %+v != %+v", tc.src, got, s)
		}
		hl := 20
		if s.Src.Addr().Is6() {
			hl = 40
		} else if checksum(0, pkt[:20]) != 0 {
			t.Fatalf("IPv4 header checksum wrong")
		}
		if v := verify(s.Src.Addr(), s.Dst.Addr(), protoTCP, pkt[hl:]); v != 0 {
			t.Fatalf("%s: TCP checksum off by %#x", tc.src, v)
		}
		if len(pkt) != hl+20 {
			t.Fatalf("%s: tickle carries payload: %d bytes", tc.src, len(pkt))
		}
	}
}

func TestConfigDefaultsAndValidation(t *testing.T) {
	c, err := Config{}.withDefaults()
	if err != nil || c.ProbeCount != DefaultProbeCount || c.AnnounceInterval != DefaultAnnounceInterval ||
		c.TickleCount != DefaultTickleCount || c.Logger == nil {
		t.Fatalf("defaults: %+v %v", c, err)
	}
	if c, _ := (Config{ProbeCount: -1}).withDefaults(); c.ProbeCount != -1 {
		t.Fatal("negative ProbeCount (probe disabled) overwritten")
	}
	for _, bad := range []Config{{ProbeWait: -time.Second}, {AnnounceCount: -1}, {TickleInterval: -1}} {
		if _, err := bad.withDefaults(); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}

func TestVIPNormalize(t *testing.T) {
	p := netip.MustParsePrefix("192.0.2.1/24")
	for _, tc := range []struct {
		in    VIP
		label string
		ok    bool
	}{
		{VIP{Addr: p, Link: "eth0"}, "eth0:hasan", true},
		{VIP{Addr: p, Link: "eth0", Label: "vip"}, "eth0:vip", true},
		{VIP{Addr: p, Link: "eth0", Label: "eth0:x"}, "eth0:x", true},
		{VIP{Addr: p, Link: "enp0s31f6", Label: "longlabel"}, "", false},
		{VIP{Addr: p}, "", false},
		{VIP{Addr: netip.MustParsePrefix("fe80::1/64"), Link: "eth0"}, "", false},
		{VIP{Addr: netip.MustParsePrefix("127.0.0.2/8"), Link: "eth0"}, "", false},
		{VIP{Addr: netip.MustParsePrefix("2001:db8::1/64"), Link: "eth0"}, "", true},
	} {
		got, err := tc.in.normalize()
		if (err == nil) != tc.ok || (tc.ok && got.Label != tc.label) {
			t.Errorf("normalize(%+v) = %+v, %v", tc.in, got, err)
		}
	}
}
