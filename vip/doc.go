// Package vip will own floating IP addresses: adding and removing them with
// vishvananda/netlink, gratuitous ARP and unsolicited neighbour
// advertisements, and TCP tickle ACKs that make initiators reconnect at once
// after a move (issue 5).
//
// Nothing is implemented yet; the package exists so the layout matches the
// product card.
package vip
