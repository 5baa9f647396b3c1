package cluster

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"slices"
	"strings"
	"time"
)

// clusterServerName is a DNS SAN every node certificate carries. Raft
// addresses are plain host:port, so peers verify "is this a node of my
// cluster CA" through this name; the node's identity is its CN.
const clusterServerName = "hasan-cluster"

// CA is the cluster certificate authority created by `hasan cluster init`.
// Its key is kept by every storage node (decision 0013), never by a
// witness.
type CA struct {
	CertPEM, KeyPEM []byte
	cert            *x509.Certificate
	key             *ecdsa.PrivateKey
}

// NewCA creates a cluster CA valid for ten years.
func NewCA(clusterName string, now time.Time) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("cluster: ca key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{CommonName: "hasan cluster CA " + clusterName, Organization: []string{"hasan"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("cluster: ca cert: %w", err)
	}
	return LoadCA(pemBlock("CERTIFICATE", der), mustKeyPEM(key))
}

// ErrCAKeyMismatch: a CA key that does not belong to the CA certificate.
var ErrCAKeyMismatch = errors.New("cluster: ca key does not belong to the CA certificate")

// LoadCA parses a CA from PEM and checks that the key is the
// certificate's: a key copied from another cluster (or a truncated file)
// is refused here rather than at the first signature a peer rejects.
func LoadCA(certPEM, keyPEM []byte) (*CA, error) {
	cert, err := parseCert(certPEM)
	if err != nil {
		return nil, err
	}
	kb, _ := pem.Decode(keyPEM)
	if kb == nil {
		return nil, errors.New("cluster: ca key: no PEM block")
	}
	key, err := x509.ParseECPrivateKey(kb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("cluster: ca key: %w", err)
	}
	if pub, ok := cert.PublicKey.(*ecdsa.PublicKey); !ok || !pub.Equal(&key.PublicKey) {
		return nil, ErrCAKeyMismatch
	}
	if !cert.IsCA {
		return nil, fmt.Errorf("%w: the certificate is not a CA", ErrCAKeyMismatch)
	}
	return &CA{CertPEM: certPEM, KeyPEM: keyPEM, cert: cert, key: key}, nil
}

// Issue signs a certificate for node id, usable as TLS server and client.
func (ca *CA) Issue(id string, now time.Time, validity time.Duration) (certPEM, keyPEM []byte, err error) {
	return ca.issue(id, nil, now, validity)
}

// AdminOU marks an operator's certificate (IssueAdmin). Only the CA can
// put it there, so a node cannot claim it.
const AdminOU = "hasan-admin"

// IssueAdmin signs an operator's certificate: name is its CN, which must
// not be a node id; the AdminOU lets it forward proposals to the leader
// without being a member of the cluster.
func (ca *CA) IssueAdmin(name string, now time.Time, validity time.Duration) (certPEM, keyPEM []byte, err error) {
	return ca.issue(name, []string{AdminOU}, now, validity)
}

func (ca *CA) issue(id string, ou []string, now time.Time, validity time.Duration) (certPEM, keyPEM []byte, err error) {
	if err := validID("node id", id); err != nil {
		return nil, nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("cluster: node key: %w", err)
	}
	der, err := x509.CreateCertificate(rand.Reader, nodeTemplate(id, ou, now, validity), ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return nil, nil, fmt.Errorf("cluster: node cert: %w", err)
	}
	return pemBlock("CERTIFICATE", der), mustKeyPEM(key), nil
}

func nodeTemplate(id string, ou []string, now time.Time, validity time.Duration) *x509.Certificate {
	return &x509.Certificate{
		SerialNumber: randomSerial(),
		Subject:      pkix.Name{CommonName: id, Organization: []string{"hasan"}, OrganizationalUnit: ou},
		DNSNames:     []string{clusterServerName, id},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(validity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
}

// TLSConfig returns the mutual-TLS configuration of a node: it presents
// its own certificate and accepts only peers signed by the cluster CA, in
// both directions.
func TLSConfig(caPEM, certPEM, keyPEM []byte) (*tls.Config, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("cluster: tls: no CA certificate")
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("cluster: tls: %w", err)
	}
	return &tls.Config{
		Certificates: []tls.Certificate{pair},
		RootCAs:      pool,
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ServerName:   clusterServerName,
		MinVersion:   tls.VersionTLS13,
	}, nil
}

// PeerID returns the node id (certificate CN) of a verified TLS peer.
func PeerID(c net.Conn) (string, error) {
	tc, ok := c.(interface{ ConnectionState() tls.ConnectionState })
	if !ok {
		return "", errors.New("cluster: not a TLS connection")
	}
	cs := tc.ConnectionState()
	if len(cs.VerifiedChains) == 0 || len(cs.PeerCertificates) == 0 {
		return "", errors.New("cluster: peer not verified")
	}
	return cs.PeerCertificates[0].Subject.CommonName, nil
}

// PeerIsAdmin reports whether a verified TLS peer presented an admin
// certificate (IssueAdmin).
func PeerIsAdmin(c net.Conn) bool {
	tc, ok := c.(interface{ ConnectionState() tls.ConnectionState })
	if !ok {
		return false
	}
	cs := tc.ConnectionState()
	if len(cs.VerifiedChains) == 0 || len(cs.PeerCertificates) == 0 {
		return false
	}
	return slices.Contains(cs.PeerCertificates[0].Subject.OrganizationalUnit, AdminOU)
}

func parseCert(p []byte) (*x509.Certificate, error) {
	b, _ := pem.Decode(p)
	if b == nil {
		return nil, errors.New("cluster: certificate: no PEM block")
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("cluster: certificate: %w", err)
	}
	return c, nil
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func mustKeyPEM(k *ecdsa.PrivateKey) []byte {
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		panic(err) // only fails for unsupported curves; P-256 is supported
	}
	return pemBlock("EC PRIVATE KEY", der)
}

func randomSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n
}

// Join tokens look like "hsn1.<id>.<secret>". The cluster stores only the
// SHA-256 of the whole token; the id is a public handle for listing.
const tokenPrefix = "hsn1"

// NewJoinToken returns a fresh token and the command that registers it.
// The token is single-use (JoinCmd marks it used) and expires after ttl.
func NewJoinToken(role Role, now time.Time, ttl time.Duration) (string, *Command, error) {
	var b [24]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", nil, fmt.Errorf("cluster: token: %w", err)
	}
	id := hex.EncodeToString(b[:4])
	tok := tokenPrefix + "." + id + "." + hex.EncodeToString(b[4:])
	return tok, &Command{Kind: KindTokenIssue, At: now, TokenIssue: &TokenIssueCmd{
		Hash: TokenHash(tok), ID: id, Role: role, Expires: now.Add(ttl),
	}}, nil
}

// TokenHash is what the state keeps of a token.
func TokenHash(tok string) string {
	s := sha256.Sum256([]byte(strings.TrimSpace(tok)))
	return hex.EncodeToString(s[:])
}
