package main

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	yaml "go.yaml.in/yaml/v3"

	"github.com/hasan-storage/hasan/cluster"
)

// TestClusterCertRevoke runs a one-node cluster with serve's wiring and
// its API in TLS mode: `cluster cert --admin` prints the serial, `cluster
// cert revoke` commits it through the admin socket, the API then refuses
// that certificate while another admin's keeps working, and `cluster cert
// list` shows both the node's recorded certificate and the revoked one.
func TestClusterCertRevoke(t *testing.T) {
	dir, err := os.MkdirTemp("", "hs-revoke") // unix socket paths are short
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
	serialRE := regexp.MustCompile(`serial ([0-9a-f]+) \(CN ([a-z0-9]+)`)
	issue := func(name string) (string, string) {
		t.Helper()
		out := filepath.Join(dir, name)
		stdout, _, err := runHasan(t, "", "cluster", "cert", "--config", cfgPath, "--admin", "--node", name, "--out", out)
		if err != nil {
			t.Fatal(err)
		}
		m := serialRE.FindStringSubmatch(stdout)
		if m == nil || m[2] != name {
			t.Fatalf("cert --admin printed no serial for %s:\n%s", name, stdout)
		}
		p, err := os.ReadFile(filepath.Join(out, nodeCertFile))
		if err != nil {
			t.Fatal(err)
		}
		if info, err := cluster.ParseCertInfo(p); err != nil || info.Serial != m[1] {
			t.Fatalf("printed serial %s, certificate has %+v (%v)", m[1], info, err)
		}
		return out, m[1]
	}
	lostDir, lostSerial := issue("laptop")
	deskDir, _ := issue("desk")
	tabletDir, tabletSerial := issue("tablet")

	s, err := startServer(cfg, serveOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	api := "https://" + cfg.APIListen
	nodeList := func(certDir string) error {
		_, _, err := runHasan(t, "", "--api", api, "--cert-dir", certDir, "node", "list")
		return err
	}
	waitFor(t, 20*time.Second, "the API to answer an admin", func() bool { return nodeList(lostDir) == nil })

	// init recorded the node's own certificate, so removing n1 would
	// revoke it; revoking it directly is refused without --force.
	nodeCert, err := os.ReadFile(filepath.Join(cfg.tlsDir(), nodeCertFile))
	if err != nil {
		t.Fatal(err)
	}
	nodeSerial := certSerials(nodeCert)[0]
	waitFor(t, 20*time.Second, "the log to be applied", func() bool {
		var ok bool
		s.node.FSM().Read(func(st *cluster.State) { _, ok = st.Nodes["n1"] })
		return ok
	})
	if got := s.node.FSM().State().Nodes["n1"].CertSerials; len(got) != 1 || got[0] != nodeSerial {
		t.Fatalf("n1's recorded serials %v, want [%s]", got, nodeSerial)
	}
	if _, _, err := runHasan(t, "", "cluster", "cert", "revoke", "--config", cfgPath, "--serial", nodeSerial); err == nil ||
		!strings.Contains(err.Error(), "node n1's") {
		t.Fatalf("revoking the node's own certificate: %v", err)
	}

	// Revoke the lost laptop's certificate from its file (which records
	// its subject), then again by serial as openssl prints it.
	out, _, err := runHasan(t, "", "cluster", "cert", "revoke", "--config", cfgPath, "--cert", filepath.Join(lostDir, nodeCertFile))
	if err != nil || !strings.Contains(out, "certificate "+lostSerial+" revoked") {
		t.Fatalf("revoke: %v %s", err, out)
	}
	out, _, err = runHasan(t, "", "cluster", "cert", "revoke", "--config", cfgPath, "--serial", "0x"+strings.ToUpper(lostSerial))
	if err != nil || !strings.Contains(out, "already revoked") {
		t.Fatalf("revoke again: %v %s", err, out)
	}
	// serve's CertGuard refuses it at the handshake already (the
	// per-request check in webui answers 403 "was revoked" on a
	// connection opened before the revocation; webui tests cover it).
	if err := nodeList(lostDir); err == nil || !strings.Contains(err.Error(), "refused the client certificate") || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("revoked admin certificate at the API: %v", err)
	}
	if err := nodeList(deskDir); err != nil {
		t.Fatalf("another admin certificate: %v", err)
	}

	// From a workstation, through the REST API: a revoked certificate
	// cannot revoke anything; a valid admin revokes the tablet's.
	if _, _, err := runHasan(t, "", "--api", api, "--cert-dir", lostDir, "cluster", "cert", "revoke", "--via-api", "--serial", tabletSerial); err == nil {
		t.Fatal("a revoked certificate revoked another through the API")
	}
	if err := nodeList(tabletDir); err != nil {
		t.Fatalf("the tablet was cut off by a refused request: %v", err)
	}
	out, _, err = runHasan(t, "", "--api", api, "--cert-dir", deskDir, "cluster", "cert", "revoke", "--via-api", "--serial", tabletSerial)
	if err != nil || !strings.Contains(out, "certificate "+tabletSerial+" revoked") {
		t.Fatalf("revoke through the API: %v %s", err, out)
	}
	if err := nodeList(tabletDir); err == nil || !strings.Contains(err.Error(), "refused the client certificate") {
		t.Fatalf("the tablet's certificate after its revocation through the API: %v", err)
	}

	out, _, err = runHasan(t, "", "cluster", "cert", "list", "--config", cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	var nodeRow, lostRow string
	for _, l := range strings.Split(out, "\n") {
		switch f := strings.Fields(l); {
		case len(f) > 0 && f[0] == nodeSerial:
			nodeRow = l
		case len(f) > 0 && f[0] == lostSerial:
			lostRow = l
		}
	}
	if !regexp.MustCompile(`\bn1\s+node\s+active\b`).MatchString(nodeRow) ||
		!regexp.MustCompile(`\blaptop\s+admin\s+revoked\b.*\boperator\b`).MatchString(lostRow) {
		t.Fatalf("cert list:\n%s", out)
	}
}
