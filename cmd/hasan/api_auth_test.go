package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	yaml "go.yaml.in/yaml/v3"

	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/webui"
)

func TestAPITLSConfigRules(t *testing.T) {
	base := "node: n1\ndata_dir: /var/lib/hasan\ncluster_advertise: 192.0.2.1:7400\nreplication_advertise: 192.0.2.1:7401\n"
	for _, tc := range []struct {
		yaml    string
		tls     bool
		wantErr string
	}{
		{"", false, ""}, // default 127.0.0.1:7402
		{"api_listen: '[::1]:7402'\n", false, ""},
		{"api_listen: 127.0.0.1:7402\napi_tls: on\n", true, ""},
		{"api_listen: 0.0.0.0:7402\n", true, ""},
		{"api_listen: 10.0.0.1:7402\n", true, ""},
		{"api_listen: 'off'\napi_tls: on\n", false, ""},
		{"api_tls: 'off'\n", false, "api_tls"},
		{"api_tls: yes\n", false, "api_tls"},
		{"api_tls_cert: /etc/hasan/api.crt\n", false, "api_tls_cert and api_tls_key"},
		{"api_tls_cert: api.crt\napi_tls_key: /etc/hasan/api.key\n", false, "api_tls_cert \"api.crt\": must be an absolute path"},
	} {
		var c serveConfig
		if err := yaml.Unmarshal([]byte(base+tc.yaml), &c); err != nil {
			t.Fatal(err)
		}
		c.setDefaults()
		err := c.Validate()
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%q: Validate = %v, want %q", tc.yaml, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", tc.yaml, err)
			continue
		}
		if c.apiUsesTLS() != tc.tls {
			t.Errorf("%q: apiUsesTLS = %v, want %v", tc.yaml, c.apiUsesTLS(), tc.tls)
		}
	}
}

// TestServeAPIRefusesToStartWithoutTLS: a node told to expose its API
// with no certificate to protect it does not start, and says which
// setting to change. Nothing listens: the check runs before any listener.
func TestServeAPIRefusesToStartWithoutTLS(t *testing.T) {
	for _, tc := range []struct {
		listen, tls string
		want        []string
	}{
		{"192.0.2.1:7402", apiTLSAuto, []string{"config: api_listen 192.0.2.1:7402 is not a loopback address",
			"must serve HTTPS", "ca.crt", "api_tls_cert and api_tls_key", "set api_listen to 127.0.0.1:7402"}},
		{"0.0.0.0:7402", apiTLSAuto, []string{"api_listen 0.0.0.0:7402 is not a loopback address"}},
		{freeAddr(t), apiTLSOn, []string{"config: api_tls is on", "api_tls_cert"}},
	} {
		dir := t.TempDir()
		cfg := &serveConfig{Node: "n1", DataDir: dir, ClusterListen: "127.0.0.1:0", ClusterAdvertise: "127.0.0.1:1",
			ReplicationListen: "127.0.0.1:0", ReplicationAdvertise: "127.0.0.1:1", PortalListen: "127.0.0.1:0",
			APIListen: tc.listen, APITLS: tc.tls}
		cfg.setDefaults()
		if err := cfg.Validate(); err != nil {
			t.Fatal(err)
		}
		s, err := startServer(cfg, serveOptions{})
		if err == nil {
			_ = s.Close()
			t.Fatalf("%s: started without TLS material", tc.listen)
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %q lacks %q", tc.listen, err, w)
			}
		}
	}
}

// TestServeAPIAdminTLS runs a one-node cluster with serve's wiring and its
// API in TLS mode (api_tls: on, since tests may only listen on loopback),
// and drives it with the hasan CLI and raw clients.
func TestServeAPIAdminTLS(t *testing.T) {
	// Unix socket paths are limited to 108 bytes; t.TempDir can be long.
	dir, err := os.MkdirTemp("", "hs-apitls")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg := &serveConfig{Node: "n1", DataDir: filepath.Join(dir, "n1"), ClusterListen: freeAddr(t),
		ReplicationListen: freeAddr(t), PortalListen: freeAddr(t), APIListen: freeAddr(t), APITLS: apiTLSOn,
		ShutdownTimeout: 5 * time.Second}
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := clusterInit(ctx, cfg, "test"); err != nil {
		t.Fatal(err)
	}
	raw, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "n1.yaml")
	if err := os.WriteFile(cfgPath, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	adminDir, nodeDir := filepath.Join(dir, "admin"), filepath.Join(dir, "n2")
	if _, _, err := runHasan(t, "", "cluster", "cert", "--config", cfgPath, "--admin", "--node", "ops", "--out", adminDir); err != nil {
		t.Fatal(err)
	}
	if _, _, err := runHasan(t, "", "cluster", "cert", "--config", cfgPath, "--node", "n2", "--out", nodeDir); err != nil {
		t.Fatal(err)
	}
	// Another cluster's admin certificate: alone (its own CA too), and
	// mixed with this cluster's CA so that only the client side is wrong.
	foreign, err := cluster.NewCA("other", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	fc, fk, err := foreign.IssueAdmin("mallory", time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ourCA, err := os.ReadFile(filepath.Join(cfg.tlsDir(), caCertFile))
	if err != nil {
		t.Fatal(err)
	}
	foreignDir, mixedDir := filepath.Join(dir, "foreign"), filepath.Join(dir, "mixed")
	if err := writeFiles(foreignDir, map[string][]byte{caCertFile: foreign.CertPEM, nodeCertFile: fc, nodeKeyFile: fk}); err != nil {
		t.Fatal(err)
	}
	if err := writeFiles(mixedDir, map[string][]byte{caCertFile: ourCA, nodeCertFile: fc, nodeKeyFile: fk}); err != nil {
		t.Fatal(err)
	}

	// A server certificate of another CA is refused at startup.
	bad := *cfg
	bad.APITLSCert, bad.APITLSKey = filepath.Join(foreignDir, nodeCertFile), filepath.Join(foreignDir, nodeKeyFile)
	if s, err := startServer(&bad, serveOptions{}); err == nil {
		_ = s.Close()
		t.Fatal("started with an API certificate of another CA")
	} else if !strings.Contains(err.Error(), "api_tls is on") || !strings.Contains(err.Error(), "does not verify against the cluster CA") {
		t.Fatalf("foreign API certificate: %v", err)
	}

	log := slog.New(slog.DiscardHandler)
	if os.Getenv("HASAN_TEST_LOG") != "" {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	s, err := startServer(cfg, serveOptions{Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	api := "https://" + cfg.APIListen
	maintenance := func() bool {
		t.Helper()
		c, err := dialAPI(api, adminDir)
		if err != nil {
			t.Fatal(err)
		}
		var st webui.Status
		if err := c.call(ctx, http.MethodGet, "/api/v1/cluster", nil, &st); err != nil {
			t.Fatal(err)
		}
		return st.Maintenance
	}
	waitFor(t, 20*time.Second, "the API to answer an admin", func() bool {
		out, _, err := runHasan(t, "", "--api", api, "--cert-dir", adminDir, "node", "list")
		return err == nil && strings.Contains(out, "n1")
	})

	refused := func(what string, args []string, want ...string) {
		t.Helper()
		_, _, err := runHasan(t, "", args...)
		if err == nil {
			t.Fatalf("%s: accepted", what)
		}
		for _, w := range want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %q lacks %q", what, err, w)
			}
		}
	}
	write := []string{"cluster", "maintenance", "on"}
	with := func(dir string) []string { return append([]string{"--api", api, "--cert-dir", dir}, write...) }
	refused("no --cert-dir", append([]string{"--api", api}, write...),
		"uses TLS", "pass --cert-dir", "HASAN_API_CERTS", "hasan cluster cert --admin")
	refused("node certificate", with(nodeDir),
		`"n2" is not an administrator`, "hasan cluster cert --admin", "403 Forbidden")
	refused("client certificate of another CA", with(mixedDir),
		"refused the client certificate", mixedDir, "hasan cluster cert --admin")
	refused("another cluster's CA", with(foreignDir),
		"server's certificate is not one of the cluster CA", filepath.Join(foreignDir, caCertFile))
	refused("plain HTTP", append([]string{"--api", "http://" + cfg.APIListen, "--cert-dir", adminDir}, write...),
		"speaks HTTPS", "use --api https://"+cfg.APIListen)
	refused("missing files", with(filepath.Join(dir, "nothing")), "--cert-dir", "ca.crt, node.crt and node.key")
	if maintenance() {
		t.Fatal("a refused client turned maintenance on")
	}

	// Raw clients: plain HTTP gets a 400, never the API.
	resp, err := http.Get("http://" + cfg.APIListen + "/api/v1/nodes")
	if err == nil {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || strings.Contains(string(b), "n1") {
			t.Fatalf("plain HTTP: %d %s", resp.StatusCode, b)
		}
	}

	// The administrator, by flag and by HASAN_API_CERTS.
	if out, _, err := runHasan(t, "", with(adminDir)...); err != nil {
		t.Fatalf("admin write: %v %s", err, out)
	}
	if !maintenance() {
		t.Fatal("admin `cluster maintenance on` answered but maintenance is off")
	}
	t.Setenv(apiCertsEnv, adminDir)
	if _, _, err := runHasan(t, "", "--api", api, "cluster", "maintenance", "off"); err != nil {
		t.Fatalf("admin by %s: %v", apiCertsEnv, err)
	}
	if maintenance() {
		t.Fatal("maintenance still on")
	}
}

func TestLeaderBaseKeepsScheme(t *testing.T) {
	for _, tc := range []struct{ cur, leader, want string }{
		{"https://10.0.0.1:7402", "10.0.0.2:7402", "https://10.0.0.2:7402"},
		{"http://127.0.0.1:7402", "127.0.0.2:7402", "http://127.0.0.2:7402"},
		{"http://127.0.0.1:7402", "https://127.0.0.2:7402", "https://127.0.0.2:7402"},
	} {
		if got, err := leaderBase(tc.cur, tc.leader); err != nil || got != tc.want {
			t.Errorf("leaderBase(%q, %q) = %q, %v; want %q", tc.cur, tc.leader, got, err, tc.want)
		}
	}
	// No downgrade: the request may carry CHAP secrets.
	if got, err := leaderBase("https://10.0.0.1:7402", "http://10.0.0.2:7402"); err == nil {
		t.Errorf("followed https to %q", got)
	}
}

// TestAPIClientServerNames: the CLI accepts a server certificate of the
// cluster CA that names the dialled address (an api_tls_cert made for
// browsers) or hasan-cluster (a node's own), and refuses one of the same
// CA that names neither.
func TestAPIClientServerNames(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	ca, err := cluster.NewCA("names", now)
	if err != nil {
		t.Fatal(err)
	}
	caCert, err := x509.ParseCertificate(mustPEM(t, ca.CertPEM))
	if err != nil {
		t.Fatal(err)
	}
	caKey, err := x509.ParseECPrivateKey(mustPEM(t, ca.KeyPEM))
	if err != nil {
		t.Fatal(err)
	}
	serverCert := func(dns []string, ips []net.IP) (certPEM, keyPEM []byte) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
			SerialNumber: big.NewInt(now.UnixNano()), Subject: pkix.Name{CommonName: "api"},
			DNSNames: dns, IPAddresses: ips, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		}, caCert, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kder, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
			pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
	}
	ac, ak, err := ca.IssueAdmin("ops", now, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := writeFiles(dir, map[string][]byte{caCertFile: ca.CertPEM, nodeCertFile: ac, nodeKeyFile: ak}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		dns  []string
		ips  []net.IP
		ok   bool
	}{
		{"address only", nil, []net.IP{net.IPv4(127, 0, 0, 1)}, true},
		{"hasan-cluster only", []string{apiServerName}, nil, true},
		{"neither", []string{"other.example"}, []net.IP{net.IPv4(127, 0, 0, 2)}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cp, kp := serverCert(tc.dns, tc.ips)
			tc2, err := webui.TLSConfig(ca.CertPEM, cp, kp)
			if err != nil {
				t.Fatal(err)
			}
			srv, err := webui.New(webui.Config{Addr: "127.0.0.1:0", TLS: tc2}, newStateService())
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			errc := make(chan error, 1)
			go func() { errc <- srv.Run(ctx) }()
			defer func() { cancel(); <-errc }()
			waitFor(t, 5*time.Second, "listen", func() bool { return srv.Addr() != nil })
			c, err := dialAPI("https://"+srv.Addr().String(), dir)
			if err != nil {
				t.Fatal(err)
			}
			var nodes []cluster.NodeInfo
			err = c.call(ctx, http.MethodGet, "/api/v1/nodes", nil, &nodes)
			if tc.ok && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if !tc.ok && (err == nil || !strings.Contains(err.Error(), "server's certificate is not one of the cluster CA")) {
				t.Fatalf("want a refusal naming the server certificate, got %v", err)
			}
		})
	}
}

// TestAPIClientHTTPSToPlain: https:// pointed at a plain-HTTP (loopback)
// API says so, instead of a bare TLS error.
func TestAPIClientHTTPSToPlain(t *testing.T) {
	dir := t.TempDir()
	ca, err := cluster.NewCA("plain", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	ac, ak, err := ca.IssueAdmin("ops", time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := writeFiles(dir, map[string][]byte{caCertFile: ca.CertPEM, nodeCertFile: ac, nodeKeyFile: ak}); err != nil {
		t.Fatal(err)
	}
	plain := apiServer(t, newStateService())
	addr := strings.TrimPrefix(plain.URL, "http://")
	_, _, err = runHasan(t, "", "--api", "https://"+addr, "--cert-dir", dir, "node", "list")
	if err == nil || !strings.Contains(err.Error(), "serves plain HTTP") || !strings.Contains(err.Error(), "use --api http://"+addr) {
		t.Fatalf("https to a plain API: %v", err)
	}
}

func mustPEM(t *testing.T, p []byte) []byte {
	t.Helper()
	b, _ := pem.Decode(p)
	if b == nil {
		t.Fatal("no PEM block")
	}
	return b.Bytes
}
