package cluster

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	"slices"
	"strings"
	"sync/atomic"
	"time"
	"unicode"
)

// Certificate revocation. Every certificate the cluster CA signs stays
// valid for years, so the state keeps a list of serials no node accepts
// any more: an operator revokes one (cert-revoke, e.g. a lost laptop's
// admin certificate), and node-remove revokes the serials recorded for
// the removed node (NodeInfo.CertSerials, filled at init and join).
// Revoking by serial rather than by name lets a node that rejoins under
// the same id in with its new certificate.
//
// Enforcement reads the local replica of the state: the cluster listener
// refuses a revoked peer at the handshake and closes its open streams
// once the revocation is applied here (transport.go), and the REST API
// refuses it on every request (webui). A node that has not applied the
// entry yet (a follower catching up after a restart) still admits the
// certificate until it does.

// ErrCertRevoked: the peer presented a certificate the cluster revoked.
var ErrCertRevoked = errors.New("cluster: certificate revoked")

// RevokedCert is one entry of State.RevokedCerts. CN and OU are what the
// certificate said, kept for display only: the serial alone decides.
type RevokedCert struct {
	Serial string    `json:"serial"`
	CN     string    `json:"cn,omitempty"`
	OU     string    `json:"ou,omitempty"`
	At     time.Time `json:"revoked_at"`
	// Reason is "operator" (cert-revoke) or "node-remove".
	Reason string `json:"reason"`
}

// Reasons recorded in RevokedCert.
const (
	RevokeReasonOperator   = "operator"
	RevokeReasonNodeRemove = "node-remove"
)

// CertRevokeCmd revokes one certificate by serial (CertSerial form).
// Revoking a serial already revoked changes nothing. A serial recorded
// for a current node is refused (ErrInUse) unless Force: cutting a member
// off without removing it stops it from voting and replicating, which an
// operator should do on purpose only (a stolen node key).
type CertRevokeCmd struct {
	Serial string
	CN, OU string // display only
	Force  bool
}

// Bounds of a revocation entry: an X.509 serial has at most 20 octets
// (RFC 5280), and CN/OU are only shown.
const (
	maxSerialHex  = 40
	maxRevokeText = 64
	// maxNodeSerials bounds NodeInfo.CertSerials: a node has one
	// certificate at a time, a few if an operator re-issued it.
	maxNodeSerials = 8
)

// CertSerial returns a certificate's serial as the state keeps it:
// lower-case hex without leading zeros.
func CertSerial(c *x509.Certificate) string {
	if c == nil || c.SerialNumber == nil {
		return ""
	}
	return c.SerialNumber.Text(16)
}

// ParseSerial reads a serial as operators copy it: hex, with or without
// 0x, colons or leading zeros, any case (openssl prints "serial=0A3F...").
// It returns the CertSerial form.
func ParseSerial(s string) (string, error) {
	t := strings.ToLower(strings.TrimSpace(s))
	t = strings.TrimPrefix(strings.TrimPrefix(t, "serial="), "0x")
	t = strings.ReplaceAll(t, ":", "")
	if t == "" || len(t) > maxSerialHex+8 {
		return "", invalidf("certificate serial %q: want up to %d hex digits", s, maxSerialHex)
	}
	n, ok := new(big.Int).SetString(t, 16)
	if !ok || n.Sign() <= 0 {
		return "", invalidf("certificate serial %q: want a positive hexadecimal number", s)
	}
	out := n.Text(16)
	if len(out) > maxSerialHex {
		return "", invalidf("certificate serial %q: longer than %d hex digits", s, maxSerialHex)
	}
	return out, nil
}

// validSerial accepts only the CertSerial form, so that one certificate
// has one key in RevokedCerts.
func validSerial(s string) error {
	got, err := ParseSerial(s)
	if err != nil {
		return err
	}
	if got != s {
		return invalidf("certificate serial %q: want lower-case hex without leading zeros (%s)", s, got)
	}
	return nil
}

func validRevokeText(field, s string) error {
	if len(s) > maxRevokeText {
		return invalidf("%s: at most %d bytes", field, maxRevokeText)
	}
	for _, r := range s {
		if !unicode.IsPrint(r) {
			return invalidf("%s: unprintable character", field)
		}
	}
	return nil
}

// CertRevoked reports whether serial (CertSerial form) is revoked.
func (s *State) CertRevoked(serial string) bool {
	_, ok := s.RevokedCerts[serial]
	return ok
}

// nodeOfSerial returns the node whose recorded certificates include
// serial, or "".
func (s *State) nodeOfSerial(serial string) string {
	for _, id := range sortedKeys(s.Nodes) {
		if slices.Contains(s.Nodes[id].CertSerials, serial) {
			return id
		}
	}
	return ""
}

func (s *State) certRevoke(c *Command, cmd *CertRevokeCmd) error {
	if err := validSerial(cmd.Serial); err != nil {
		return err
	}
	if err := validRevokeText("cn", cmd.CN); err != nil {
		return err
	}
	if err := validRevokeText("ou", cmd.OU); err != nil {
		return err
	}
	if s.CertRevoked(cmd.Serial) {
		return nil // idempotent: the first record (time, reason) stays
	}
	cn := cmd.CN
	if node := s.nodeOfSerial(cmd.Serial); node != "" {
		if !cmd.Force {
			return fmt.Errorf("%w: certificate %s is node %s's: remove the node (that revokes it), "+
				"or force the revocation to cut a member off", ErrInUse, cmd.Serial, node)
		}
		if cn == "" {
			cn = node
		}
	}
	s.RevokedCerts[cmd.Serial] = RevokedCert{Serial: cmd.Serial, CN: cn, OU: cmd.OU, At: c.At, Reason: RevokeReasonOperator}
	s.event(c, SeverityWarn, "cert-revoked", "", "", fmt.Sprintf("certificate %s (%s) revoked", cmd.Serial, displayCN(cn)))
	return nil
}

// revokeNodeCerts revokes every serial recorded for n (node-remove).
func (s *State) revokeNodeCerts(c *Command, n *NodeInfo) {
	for _, serial := range n.CertSerials {
		if s.CertRevoked(serial) {
			continue
		}
		s.RevokedCerts[serial] = RevokedCert{Serial: serial, CN: n.ID, At: c.At, Reason: RevokeReasonNodeRemove}
		s.event(c, SeverityInfo, "cert-revoked", n.ID, "", fmt.Sprintf("certificate %s of removed node %s revoked", serial, n.ID))
	}
}

func displayCN(cn string) string {
	if cn == "" {
		return "subject unknown"
	}
	return cn
}

// CertRevoked reports whether serial is revoked in this replica's state.
func (f *FSM) CertRevoked(serial string) bool {
	var r bool
	f.Read(func(s *State) { r = s.CertRevoked(serial) })
	return r
}

// VerifyConnection refuses a TLS peer whose leaf certificate is revoked in
// this replica's state; a peer without a certificate passes (the caller's
// ClientAuth decides about those). It has the signature of
// tls.Config.VerifyConnection and runs after the chain was verified.
func (f *FSM) VerifyConnection(cs tls.ConnectionState) error {
	if len(cs.PeerCertificates) == 0 {
		return nil
	}
	leaf := cs.PeerCertificates[0]
	if serial := CertSerial(leaf); f.CertRevoked(serial) {
		return fmt.Errorf("%w: %q serial %s", ErrCertRevoked, leaf.Subject.CommonName, serial)
	}
	return nil
}

// CertGuard lets a tls.Config built before the node exists (the
// replication server's, the REST API's) consult the state's revocation
// list once the node's FSM is attached. Until Attach it admits every
// certificate the CA signed, as before revocation existed.
type CertGuard struct {
	fsm atomic.Pointer[FSM]
}

// Attach makes the guard consult f.
func (g *CertGuard) Attach(f *FSM) { g.fsm.Store(f) }

// VerifyConnection is FSM.VerifyConnection of the attached FSM.
func (g *CertGuard) VerifyConnection(cs tls.ConnectionState) error {
	if f := g.fsm.Load(); f != nil {
		return f.VerifyConnection(cs)
	}
	return nil
}

// Protect returns a clone of cfg whose VerifyConnection also runs the
// guard (after cfg's own, if any). nil stays nil.
func (g *CertGuard) Protect(cfg *tls.Config) *tls.Config {
	if cfg == nil {
		return nil
	}
	c := cfg.Clone()
	prev := c.VerifyConnection
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		if prev != nil {
			if err := prev(cs); err != nil {
				return err
			}
		}
		return g.VerifyConnection(cs)
	}
	return c
}

// CertInfo is what `hasan cluster cert` prints of a certificate it wrote.
type CertInfo struct {
	Serial   string
	CN       string
	OU       string
	NotAfter time.Time
}

// ParseCertInfo reads the first certificate of a PEM file.
func ParseCertInfo(certPEM []byte) (CertInfo, error) {
	c, err := parseCert(certPEM)
	if err != nil {
		return CertInfo{}, err
	}
	return CertInfo{Serial: CertSerial(c), CN: c.Subject.CommonName,
		OU: strings.Join(c.Subject.OrganizationalUnit, ","), NotAfter: c.NotAfter}, nil
}

// validateNodeCerts checks the serials a node-add or join records: the
// CertSerial form, no duplicates, none revoked (a node cannot come back
// with a certificate the cluster refused).
func (s *State) validateNodeCerts(n *NodeInfo) error {
	if len(n.CertSerials) == 0 {
		n.CertSerials = nil // as gob decodes it: snapshots compare equal
		return nil
	}
	if len(n.CertSerials) > maxNodeSerials {
		return invalidf("node %s: %d certificate serials: at most %d", n.ID, len(n.CertSerials), maxNodeSerials)
	}
	for i, serial := range n.CertSerials {
		if err := validSerial(serial); err != nil {
			return err
		}
		if slices.Contains(n.CertSerials[:i], serial) {
			return invalidf("node %s: certificate serial %s listed twice", n.ID, serial)
		}
		if s.CertRevoked(serial) {
			return fmt.Errorf("%w: node %s: certificate %s", ErrCertRevoked, n.ID, serial)
		}
		if other := s.nodeOfSerial(serial); other != "" && other != n.ID {
			return fmt.Errorf("%w: certificate %s is node %s's", ErrExists, serial, other)
		}
	}
	return nil
}
