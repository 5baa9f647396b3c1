package webui

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptrace"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/cluster"
)

// testPKI is a cluster CA with the certificates the auth tests present.
type testPKI struct {
	ca           *cluster.CA
	server       [2][]byte // the node's own certificate, as serve uses it
	admin, node  tls.Certificate
	otherCAAdmin tls.Certificate // OU hasan-admin, but signed by a foreign CA
	roots        *x509.CertPool
	foreign      *cluster.CA
}

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	now := time.Now()
	ca, err := cluster.NewCA("auth-test", now)
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := cluster.NewCA("someone-else", now)
	if err != nil {
		t.Fatal(err)
	}
	p := &testPKI{ca: ca, foreign: foreign, roots: x509.NewCertPool()}
	p.roots.AppendCertsFromPEM(ca.CertPEM)
	pair := func(c, k []byte, err error) tls.Certificate {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		kp, err := tls.X509KeyPair(c, k)
		if err != nil {
			t.Fatal(err)
		}
		return kp
	}
	c, k, err := ca.Issue("n1", now, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	p.server = [2][]byte{c, k}
	p.admin = pair(ca.IssueAdmin("alice", now, time.Hour))
	p.node = pair(ca.Issue("n2", now, time.Hour))
	p.otherCAAdmin = pair(foreign.IssueAdmin("mallory", now, time.Hour))
	return p
}

// startTLSServer runs a Server in TLS mode on loopback. Loopback is all
// tests may use; the TLS mode is what a non-loopback api_listen forces.
func startTLSServer(t *testing.T, p *testPKI) (*Server, *fakeService, *lockedBuffer) {
	t.Helper()
	f := newFake()
	s, logs := startTLSServerWith(t, p, f)
	return s, f, logs
}

// startTLSServerWith is startTLSServer serving svc.
func startTLSServerWith(t *testing.T, p *testPKI, f Service) (*Server, *lockedBuffer) {
	t.Helper()
	tc, err := TLSConfig(p.ca.CertPEM, p.server[0], p.server[1])
	if err != nil {
		t.Fatal(err)
	}
	logs := &lockedBuffer{}
	s, err := New(Config{Addr: "127.0.0.1:0", TLS: tc, ShutdownTimeout: time.Second,
		Logger: slog.New(slog.NewTextHandler(io.MultiWriter(logs, tWriter{t}), nil))}, f)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-errc; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	deadline := time.Now().Add(5 * time.Second)
	for s.Addr() == nil {
		if time.Now().After(deadline) {
			t.Fatal("server did not listen")
		}
		time.Sleep(5 * time.Millisecond)
	}
	return s, logs
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// client trusts the cluster CA and presents cert (none when nil), as the
// CLI does: the node certificate names "hasan-cluster", not the address.
func (p *testPKI) client(cert *tls.Certificate) *http.Client {
	tc := &tls.Config{RootCAs: p.roots, ServerName: "hasan-cluster", MinVersion: tls.VersionTLS12}
	if cert != nil {
		tc.Certificates = []tls.Certificate{*cert}
	}
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: tc}}
}

func call(c *http.Client, method, url string) (int, string, error) {
	var body io.Reader
	if method == "PUT" {
		body = strings.NewReader(`{"on":true}`)
	}
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		return 0, "", err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

func TestTLSAdminAuth(t *testing.T) {
	p := newTestPKI(t)
	s, f, logs := startTLSServer(t, p)
	base := "https://" + s.Addr().String()

	// untouched: no refused request may reach the service at all.
	untouched := func() bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		return len(f.calls) == 0 && !f.st.Maintenance
	}
	const write = "/api/v1/cluster/maintenance"

	t.Run("no client certificate: 401 naming the remedy, nothing changes", func(t *testing.T) {
		c := p.client(nil)
		for _, r := range []struct{ method, path string }{
			{"GET", "/api/v1/nodes"}, {"PUT", write}, {"DELETE", "/api/v1/volumes/v1"}, {"GET", "/metrics"},
			{"GET", "/api/openapi.json"}, {"GET", "/no/such/route"},
		} {
			status, body, err := call(c, r.method, base+r.path)
			if err != nil {
				t.Fatalf("%s %s: %v", r.method, r.path, err)
			}
			var eb errorBody
			if status != http.StatusUnauthorized || json.Unmarshal([]byte(body), &eb) != nil ||
				!strings.Contains(eb.Error, "hasan cluster cert --admin") || !strings.Contains(eb.Error, "--cert-dir") {
				t.Errorf("%s %s without a certificate: %d %s", r.method, r.path, status, body)
			}
		}
		if !untouched() {
			t.Fatalf("unauthenticated requests reached the service: %v", f.calls)
		}
	})

	t.Run("certificate of another CA: refused", func(t *testing.T) {
		// Go's client sends only a certificate whose issuer the server
		// lists as acceptable, so by default it sends none: 401.
		status, body, err := call(p.client(&p.otherCAAdmin), "PUT", base+write)
		if err != nil || status != http.StatusUnauthorized {
			t.Errorf("foreign admin certificate, Go client: %d %s %v", status, body, err)
		}
		// Presented anyway (curl, the hasan CLI): the handshake fails.
		c := p.client(nil)
		c.Transport.(*http.Transport).TLSClientConfig.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return &p.otherCAAdmin, nil
		}
		status, body, err = call(c, "PUT", base+write)
		if err == nil {
			t.Fatalf("foreign admin certificate got an answer: %d %s", status, body)
		}
		if !strings.Contains(err.Error(), "tls: ") {
			t.Errorf("want a TLS error, got %v", err)
		}
		if !untouched() {
			t.Fatalf("a foreign certificate reached the service: %v", f.calls)
		}
	})

	t.Run("node certificate of the cluster: 403", func(t *testing.T) {
		status, body, err := call(p.client(&p.node), "PUT", base+write)
		if err != nil {
			t.Fatal(err)
		}
		if status != http.StatusForbidden || !strings.Contains(body, `\"n2\" is not an administrator`) ||
			!strings.Contains(body, "hasan cluster cert --admin") {
			t.Errorf("node certificate: %d %s", status, body)
		}
		if !untouched() {
			t.Fatalf("a node certificate reached the service: %v", f.calls)
		}
	})

	t.Run("admin certificate: served", func(t *testing.T) {
		c := p.client(&p.admin)
		status, body, err := call(c, "GET", base+"/api/v1/nodes")
		if err != nil || status != http.StatusOK || !strings.Contains(body, `"n1"`) {
			t.Fatalf("admin GET: %d %s %v", status, body, err)
		}
		status, body, err = call(c, "PUT", base+write)
		if err != nil || status != http.StatusNoContent {
			t.Fatalf("admin PUT: %d %s %v", status, body, err)
		}
		f.mu.Lock()
		on := f.st.Maintenance
		f.mu.Unlock()
		if !on {
			t.Fatal("admin PUT answered but maintenance is off")
		}
		// Writes name their administrator in the log; reads do not.
		var writes []string
		for _, l := range strings.Split(logs.String(), "\n") {
			if strings.Contains(l, "webui: admin request") {
				writes = append(writes, l)
			}
		}
		if len(writes) != 1 || !strings.Contains(writes[0], "admin=alice") || !strings.Contains(writes[0], "method=PUT") ||
			!strings.Contains(writes[0], "path="+write) {
			t.Fatalf("audit lines: %q", writes)
		}
	})

	t.Run("healthz needs no certificate", func(t *testing.T) {
		status, body, err := call(p.client(nil), "GET", base+"/healthz")
		if err != nil || status != http.StatusOK {
			t.Fatalf("healthz: %d %s %v", status, body, err)
		}
	})

	t.Run("plain HTTP to the TLS port fails", func(t *testing.T) {
		status, body, err := call(&http.Client{Timeout: 5 * time.Second}, "GET", "http://"+s.Addr().String()+"/api/v1/nodes")
		if err == nil && (status != http.StatusBadRequest || strings.Contains(body, `"n1"`)) {
			t.Fatalf("plain HTTP: %d %s", status, body)
		}
		// And raw bytes that are not a TLS ClientHello get no API data.
		conn, err := net.DialTimeout("tcp", s.Addr().String(), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(conn, "GET /api/v1/nodes HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			if resp.StatusCode == http.StatusOK || strings.Contains(string(b), `"n1"`) {
				t.Fatalf("raw plain HTTP got %d %s", resp.StatusCode, b)
			}
		}
	})

	t.Run("server certificate is checked by a client of another CA", func(t *testing.T) {
		other := x509.NewCertPool()
		other.AppendCertsFromPEM(p.foreign.CertPEM)
		c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
			RootCAs: other, ServerName: "hasan-cluster", Certificates: []tls.Certificate{p.admin}, MinVersion: tls.VersionTLS12}}}
		_, _, err := call(c, "GET", base+"/api/v1/nodes")
		var uae x509.UnknownAuthorityError
		if !errors.As(err, &uae) {
			t.Fatalf("want unknown authority, got %v", err)
		}
	})
}

func TestTLSConfigChecks(t *testing.T) {
	p := newTestPKI(t)
	// A server certificate from another CA: the CLI would refuse it, so
	// the server refuses to start with it.
	fc, fk, err := p.foreign.Issue("n1", time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := TLSConfig(p.ca.CertPEM, fc, fk); err == nil || !strings.Contains(err.Error(), "cluster CA") {
		t.Errorf("foreign server certificate: %v", err)
	}
	if _, err := TLSConfig([]byte("junk"), p.server[0], p.server[1]); err == nil {
		t.Error("CA without a certificate accepted")
	}
	if _, err := TLSConfig(p.ca.CertPEM, p.server[0], fk); err == nil {
		t.Error("mismatched key accepted")
	}

	good, err := TLSConfig(p.ca.CertPEM, p.server[0], p.server[1])
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		cfg  Config
		want string // "" = accepted
	}{
		{"loopback plain", Config{Addr: "127.0.0.1:0"}, ""},
		{"ipv6 loopback plain", Config{Addr: "[::1]:7402"}, ""},
		{"localhost plain", Config{Addr: "localhost:7402"}, ""},
		{"default plain", Config{}, ""},
		{"wildcard plain", Config{Addr: "0.0.0.0:7402"}, "not a loopback"},
		{"empty host plain", Config{Addr: ":7402"}, "not a loopback"},
		{"lan plain", Config{Addr: "10.0.0.1:7402"}, "not a loopback"},
		{"lan tls", Config{Addr: "10.0.0.1:7402", TLS: good}, ""},
		{"tls without client CAs", Config{Addr: "10.0.0.1:7402", TLS: &tls.Config{Certificates: good.Certificates,
			ClientAuth: tls.VerifyClientCertIfGiven}}, "ClientCAs"},
		{"tls not verifying clients", Config{Addr: "10.0.0.1:7402", TLS: &tls.Config{Certificates: good.Certificates,
			ClientCAs: good.ClientCAs, ClientAuth: tls.RequestClientCert}}, "ClientAuth"},
		{"tls without certificate", Config{Addr: "10.0.0.1:7402", TLS: &tls.Config{ClientCAs: good.ClientCAs,
			ClientAuth: tls.RequireAndVerifyClientCert}}, "no server certificate"},
	} {
		_, err := New(tc.cfg, newFake())
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%s: New = %v, want %q", tc.name, err, tc.want)
		}
	}
}

// revokingFake is the fake with the revocation capability NodeService
// has: it answers from its state's RevokedCerts.
type revokingFake struct{ *fakeService }

func (f revokingFake) CertRevoked(serial string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.st.CertRevoked(serial)
}

func (f revokingFake) revoke(c tls.Certificate) {
	leaf, err := x509.ParseCertificate(c.Certificate[0])
	if err != nil {
		panic(err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.st.RevokedCerts[cluster.CertSerial(leaf)] = cluster.RevokedCert{Serial: cluster.CertSerial(leaf), CN: leaf.Subject.CommonName}
}

// TestRevokedAdminRefused: once an admin certificate is revoked, every
// request made with it is refused with 403, including the next request on
// a keep-alive connection opened before the revocation, and nothing
// reaches the service; another admin certificate still works.
func TestRevokedAdminRefused(t *testing.T) {
	p := newTestPKI(t)
	f := revokingFake{newFake()}
	s, logs := startTLSServerWith(t, p, f)
	base := "https://" + s.Addr().String()
	const write = "/api/v1/cluster/maintenance"

	c := p.client(&p.admin)
	var reused []bool
	trace := &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) { reused = append(reused, i.Reused) }}
	do := func(method, path string) (int, string) {
		t.Helper()
		var body io.Reader
		if method == "PUT" {
			body = strings.NewReader(`{"on":true}`)
		}
		req, err := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), method, base+path, body)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if status, body := do("GET", "/api/v1/nodes"); status != http.StatusOK {
		t.Fatalf("before revocation: %d %s", status, body)
	}
	f.revoke(p.admin)
	f.mu.Lock()
	f.calls = nil
	f.mu.Unlock()

	status, body := do("PUT", write)
	if status != http.StatusForbidden || !strings.Contains(body, "revoked") || !strings.Contains(body, `\"alice\"`) {
		t.Fatalf("revoked admin PUT: %d %s", status, body)
	}
	if len(reused) != 2 || !reused[1] {
		t.Fatalf("the refused request did not reuse the connection opened before the revocation: %v", reused)
	}
	if status, body := do("GET", "/api/v1/nodes"); status != http.StatusForbidden {
		t.Fatalf("revoked admin GET: %d %s", status, body)
	}
	f.mu.Lock()
	calls, on := f.calls, f.st.Maintenance
	f.mu.Unlock()
	if len(calls) != 0 || on {
		t.Fatalf("a revoked certificate reached the service: %v (maintenance %v)", calls, on)
	}
	if !strings.Contains(logs.String(), "revoked certificate refused") {
		t.Fatal("refusal not logged")
	}

	oc, ok, err := p.ca.IssueAdmin("bob", time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	other, err := tls.X509KeyPair(oc, ok)
	if err != nil {
		t.Fatal(err)
	}
	if status, body, err := call(p.client(&other), "PUT", base+write); err != nil || status != http.StatusNoContent {
		t.Fatalf("another admin: %d %s %v", status, body, err)
	}
}

// TestCertGuardAtHandshake: with the server's tls.Config protected by a
// cluster.CertGuard (how `hasan serve` can wire it), a revoked admin
// certificate is refused in the TLS handshake itself, before any request.
func TestCertGuardAtHandshake(t *testing.T) {
	p := newTestPKI(t)
	tc, err := TLSConfig(p.ca.CertPEM, p.server[0], p.server[1])
	if err != nil {
		t.Fatal(err)
	}
	var guard cluster.CertGuard
	loc := cluster.NewLocal(nil)
	guard.Attach(loc.FSM)
	f := newFake()
	s, err := New(Config{Addr: "127.0.0.1:0", TLS: guard.Protect(tc), ShutdownTimeout: time.Second}, f)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-errc; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	for deadline := time.Now().Add(5 * time.Second); s.Addr() == nil; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("server did not listen")
		}
	}
	url := "https://" + s.Addr().String() + "/api/v1/nodes"
	if status, body, err := call(p.client(&p.admin), "GET", url); err != nil || status != http.StatusOK {
		t.Fatalf("before revocation: %d %s %v", status, body, err)
	}
	leaf, err := x509.ParseCertificate(p.admin.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := loc.Propose(ctx, &cluster.Command{Kind: cluster.KindCertRevoke,
		CertRevoke: &cluster.CertRevokeCmd{Serial: cluster.CertSerial(leaf)}}); err != nil {
		t.Fatal(err)
	}
	// A new connection: the handshake fails (TLS 1.3 reports it to the
	// client on its first read, so the request errors).
	status, body, err := call(p.client(&p.admin), "GET", url)
	if err == nil || !strings.Contains(err.Error(), "tls: ") {
		t.Fatalf("revoked admin at the handshake: %d %s %v", status, body, err)
	}
	if status, body, err := call(p.client(nil), "GET", "https://"+s.Addr().String()+"/healthz"); err != nil || status != http.StatusOK {
		t.Fatalf("healthz without a certificate: %d %s %v", status, body, err)
	}
}
