package webui

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"

	"github.com/gin-gonic/gin"

	"github.com/hasan-storage/hasan/cluster"
)

// The API either listens on loopback in plain HTTP with no authentication
// (whoever can connect is root on the box, who also owns data_dir), or it
// serves HTTPS and admits only administrators: clients that present a
// certificate signed by the cluster CA carrying cluster.AdminOU, which
// only the holder of the CA key can hand out (`hasan cluster cert --admin`).
// Nothing in between: an API reachable from the network without TLS would
// let anyone on that network delete volumes or confirm fences.

// AdminCertHint is the remedy every refusal names.
const AdminCertHint = "make an administrator certificate with `hasan cluster cert --admin --node NAME --out DIR` " +
	"on the node holding the CA key and pass --cert-dir DIR (or HASAN_API_CERTS=DIR) to hasan"

// adminKey is the gin context key under which authenticate leaves the
// administrator's name (certificate CN).
const adminKey = "hasan.admin"

// TLSConfig returns the configuration of an API that serves HTTPS with
// certPEM/keyPEM and verifies client certificates against caPEM, the
// cluster CA. The server certificate must be signed by that CA too, since
// the CLI trusts nothing else. A client may connect without a certificate
// so that it gets a 401 explaining what to do instead of a bare TLS alert;
// one whose certificate does not verify is refused in the handshake.
func TLSConfig(caPEM, certPEM, keyPEM []byte) (*tls.Config, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("webui: tls: no CA certificate in the CA file")
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("webui: tls: server certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, fmt.Errorf("webui: tls: server certificate: %w", err)
	}
	inter := x509.NewCertPool()
	for _, der := range pair.Certificate[1:] {
		if c, err := x509.ParseCertificate(der); err == nil {
			inter.AddCert(c)
		}
	}
	// Checked here rather than left to each client's handshake failure:
	// the operator learns at startup, with the reason.
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		return nil, fmt.Errorf("webui: tls: server certificate %q does not verify against the cluster CA: %w",
			leaf.Subject.CommonName, err)
	}
	return &tls.Config{
		Certificates: []tls.Certificate{pair},
		ClientCAs:    pool,
		ClientAuth:   tls.VerifyClientCertIfGiven,
		MinVersion:   tls.VersionTLS12,
	}, nil
}

// checkTLSConfig refuses a configuration under which authenticate could
// never see a verified chain, or would see one nobody checked.
func checkTLSConfig(c *tls.Config) error {
	if c.ClientCAs == nil {
		return errors.New("webui: Config.TLS.ClientCAs is nil: client certificates cannot be verified")
	}
	if c.ClientAuth != tls.VerifyClientCertIfGiven && c.ClientAuth != tls.RequireAndVerifyClientCert {
		return fmt.Errorf("webui: Config.TLS.ClientAuth %v: want VerifyClientCertIfGiven or RequireAndVerifyClientCert", c.ClientAuth)
	}
	if len(c.Certificates) == 0 && c.GetCertificate == nil {
		return errors.New("webui: Config.TLS has no server certificate")
	}
	return nil
}

// IsLoopback reports whether a listen address (host:port) is reachable
// only from this host: a loopback IP or "localhost". A wildcard or empty
// host is not.
func IsLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// authenticate admits administrators when the server runs with TLS; on a
// plain loopback server it admits everyone. /healthz stays open: it says
// only "ok" and load balancers probe it without certificates.
func (s *Server) authenticate() gin.HandlerFunc {
	if s.cfg.TLS == nil {
		return func(c *gin.Context) { c.Next() }
	}
	return func(c *gin.Context) {
		if c.Request.URL.Path == "/healthz" {
			c.Next()
			return
		}
		st := c.Request.TLS
		if st == nil || len(st.VerifiedChains) == 0 || len(st.PeerCertificates) == 0 {
			c.AbortWithStatusJSON(http.StatusUnauthorized, errorBody{
				Error: "client certificate required: this API admits administrators by mutual TLS; " + AdminCertHint})
			return
		}
		leaf := st.PeerCertificates[0]
		if !slices.Contains(leaf.Subject.OrganizationalUnit, cluster.AdminOU) {
			c.AbortWithStatusJSON(http.StatusForbidden, errorBody{Error: fmt.Sprintf(
				"certificate %q is not an administrator's (no OU %s; a node's own certificate is not one): %s",
				leaf.Subject.CommonName, cluster.AdminOU, AdminCertHint)})
			return
		}
		// Checked on every request, not only at the handshake: a keep-alive
		// connection opened before the revocation must not outlive it.
		if rv, ok := s.svc.(certRevoker); ok {
			if serial := cluster.CertSerial(leaf); rv.CertRevoked(serial) {
				s.log.Warn("webui: revoked certificate refused", "admin", leaf.Subject.CommonName, "serial", serial,
					"method", c.Request.Method, "path", c.Request.URL.Path, "remote", c.Request.RemoteAddr)
				c.Header("Connection", "close")
				c.AbortWithStatusJSON(http.StatusForbidden, errorBody{Error: fmt.Sprintf(
					"certificate %q (serial %s) was revoked (`hasan cluster cert list`): %s",
					leaf.Subject.CommonName, serial, AdminCertHint)})
				return
			}
		}
		c.Set(adminKey, leaf.Subject.CommonName)
		if c.Request.Method != http.MethodGet && c.Request.Method != http.MethodHead {
			// Who changed what: the only audit trail until the API keeps one.
			s.log.Info("webui: admin request", "admin", leaf.Subject.CommonName,
				"method", c.Request.Method, "path", c.Request.URL.Path, "remote", c.Request.RemoteAddr)
		}
		c.Next()
	}
}

// certRevoker is the optional capability of a Service that authenticate
// asks about every client certificate: found by type assertion so that a
// Service without revocation (tests' fakes) still works.
type certRevoker interface {
	// CertRevoked reports whether the certificate with this serial
	// (cluster.CertSerial form) is revoked.
	CertRevoked(serial string) bool
}

var _ certRevoker = (*NodeService)(nil)

// CertRevoked reads the local replica of the cluster state's revocation
// list (cert-revoke, node-remove).
func (s *NodeService) CertRevoked(serial string) bool { return s.n.FSM().CertRevoked(serial) }
