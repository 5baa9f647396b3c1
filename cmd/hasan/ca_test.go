package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/cluster"
)

// TestClusterCAExportImport: the key of an init node is copied to a
// storage node that got its certificate from `cluster cert` (so has no
// key), with every refusal on the way.
func TestClusterCAExportImport(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c1, p1 := testNodeConfig(t, "n1", "storage")
	c2, p2 := testNodeConfig(t, "n2", "storage")
	cw, pw := testNodeConfig(t, "w1", "witness")
	_, p3 := testNodeConfig(t, "n3", "storage") // never given a certificate
	if _, err := runCLI(ctx, "init", "--config", p1); err != nil {
		t.Fatal(err)
	}
	for _, c := range []*serveConfig{c2, cw} {
		if _, err := runCLI(ctx, "cert", "--config", p1, "--node", c.Node, "--out", c.tlsDir()); err != nil {
			t.Fatal(err)
		}
	}
	key1, err := os.ReadFile(filepath.Join(c1.tlsDir(), caKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	key2Path := filepath.Join(c2.tlsDir(), caKeyFile)
	wantErr := func(name string, err error, substr string) {
		t.Helper()
		if err == nil || !strings.Contains(err.Error(), substr) {
			t.Fatalf("%s: got %v, want an error containing %q", name, err, substr)
		}
	}
	dir := t.TempDir()
	bundle := filepath.Join(dir, "ca.bundle")

	// Export: only from a key holder, only by root or the tls/ owner,
	// never over an existing file.
	_, err = runCLI(ctx, "ca", "export", "--config", p2, "--out", bundle)
	wantErr("export without the key", err, "does not hold the CA key")
	err = caExport(c1, bundle, 4242)
	wantErr("export by another user", err, "only by root or the owner")
	if _, err := os.Stat(bundle); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a refused export left %s: %v", bundle, err)
	}
	out, err := runCLI(ctx, "ca", "export", "--config", p1, "--out", bundle)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "WARNING") || !strings.Contains(out, "shred") {
		t.Fatalf("export printed no warning: %q", out)
	}
	if st, err := os.Stat(bundle); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("bundle mode: %v %v", st.Mode(), err)
	}
	b, err := os.ReadFile(bundle)
	if err != nil || !bytes.Contains(b, key1) {
		t.Fatalf("bundle lacks the CA key: %v", err)
	}
	_, err = runCLI(ctx, "ca", "export", "--config", p1, "--out", bundle)
	wantErr("export over a file", err, "exists")

	// Import refusals; none of them writes a key.
	_, err = runCLI(ctx, "ca", "import", "--config", pw, bundle)
	wantErr("import on a witness", err, "only storage nodes")
	_, err = runCLI(ctx, "ca", "import", "--config", p3, bundle)
	wantErr("import on a node without a cluster", err, "no cluster CA certificate")
	_, err = caImport(c2, bundle, 4242)
	wantErr("import by another user", err, "only by root or the owner")

	writeBundle := func(name string, mode os.FileMode, parts ...[]byte) string {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, bytes.Join(parts, nil), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil { // past the umask
			t.Fatal(err)
		}
		return p
	}
	cert1, err := os.ReadFile(filepath.Join(c1.tlsDir(), caCertFile))
	if err != nil {
		t.Fatal(err)
	}
	other, err := cluster.NewCA("other", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, file, want string
	}{
		{"world-readable", writeBundle("open", 0o644, cert1, key1), "mode 0644"},
		{"another cluster", writeBundle("other", 0o600, other.CertPEM, other.KeyPEM), "another cluster"},
		{"key of another CA", writeBundle("mixed", 0o600, cert1, other.KeyPEM), "does not belong"},
		{"no key", writeBundle("nokey", 0o600, cert1), "want one CERTIFICATE"},
		{"node key", writeBundle("nodekey", 0o600, cert1, key1, key1), "unexpected PEM block"},
		{"missing", filepath.Join(dir, "absent"), "no such file"},
	} {
		_, err := runCLI(ctx, "ca", "import", "--config", p2, tc.file)
		wantErr(tc.name, err, tc.want)
	}
	if _, err := os.Stat(key2Path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a refused import wrote %s: %v", key2Path, err)
	}

	// The good import, then a repeat that changes nothing.
	out, err = runCLI(ctx, "ca", "import", "--config", p2, bundle)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "restart `hasan serve`") || !strings.Contains(out, "shred -u "+bundle) {
		t.Fatalf("import output: %q", out)
	}
	key2, err := os.ReadFile(key2Path)
	if err != nil || !bytes.Equal(key2, key1) {
		t.Fatalf("imported key differs: %v", err)
	}
	if st, err := os.Stat(key2Path); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("imported ca.key mode: %v %v", st.Mode(), err)
	}
	if ca, err := loadLocalCA(c2); err != nil || ca == nil {
		t.Fatalf("n2 does not load the imported CA: %v", err)
	}
	out, err = runCLI(ctx, "ca", "import", "--config", p2, bundle)
	if err != nil || !strings.Contains(out, "already holds") {
		t.Fatalf("second import: %q, %v", out, err)
	}
	// A different key already in place is never overwritten.
	if err := os.WriteFile(key2Path, other.KeyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = runCLI(ctx, "ca", "import", "--config", p2, bundle)
	wantErr("import over another key", err, "exists and differs")
	// LoadCA refuses that key, so the node does not sign with it.
	if _, err := runCLI(ctx, "cert", "--config", p2, "--node", "n9", "--out", filepath.Join(dir, "n9")); err == nil {
		t.Fatal("cert with a mismatched ca.key succeeded")
	}
	if err := os.Remove(key2Path); err != nil {
		t.Fatal(err)
	}
	if _, err := runCLI(ctx, "ca", "import", "--config", p2, bundle); err != nil {
		t.Fatal(err)
	}
	// With the imported key n2 issues certificates itself.
	if _, err := runCLI(ctx, "cert", "--config", p2, "--node", "n9", "--out", filepath.Join(dir, "n9")); err != nil {
		t.Fatalf("cert with the imported key: %v", err)
	}
}
