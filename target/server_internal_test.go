package target

import (
	"net"
	"testing"
)

// TestPortalAddrsUnmapsIPv4: a wildcard listener accepts IPv4 connections
// on a dual-stack socket, whose local address is IPv4-mapped; SendTargets
// must still advertise a.b.c.d:port (open-iscsi logged ::ffff:10.77.1.200
// as the portal of a floating IP).
func TestPortalAddrsUnmapsIPv4(t *testing.T) {
	s := NewServer(Config{})
	local := &net.TCPAddr{IP: net.ParseIP("10.77.1.200"), Port: 3260} // 16-byte form
	got := s.portalAddrs(local)
	if len(got) != 1 || got[0] != "10.77.1.200:3260" {
		t.Fatalf("portalAddrs = %q, want [10.77.1.200:3260]", got)
	}
	v6 := &net.TCPAddr{IP: net.ParseIP("fd00::1"), Port: 3260}
	if got := s.portalAddrs(v6); len(got) != 1 || got[0] != "[fd00::1]:3260" {
		t.Fatalf("portalAddrs = %q, want [[fd00::1]:3260]", got)
	}
}
