package main

import (
	"bytes"
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/hasan-storage/hasan/cluster"
)

// The CA key lives on every storage node (decision 0013): a node admitted
// as storage receives it over the join channel. `cluster ca export` and
// `cluster ca import` copy it by hand, for clusters whose storage nodes
// joined before that, or that were built with `cluster cert`.

const caKeyWarning = `WARNING: %s holds the cluster CA key. Whoever reads it can issue certificates that every
node of this cluster accepts, admin certificates included. Copy it to a storage node of THIS
cluster over a channel you trust (scp), run "hasan cluster ca import %s" there, then delete
every copy of the file (shred -u). Never copy it to a witness.
`

// maxCABundle bounds what import reads: a certificate and a P-256 key.
const maxCABundle = 64 << 10

func newClusterCACmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "ca",
		Short: "copy the cluster CA key between storage nodes (any storage node holding it admits joins)",
	}
	var config, out string
	export := &cobra.Command{
		Use:   "export --out FILE",
		Short: "write this node's CA certificate and key to FILE (mode 0600, never overwritten)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadServeConfig(config)
			if err != nil {
				return err
			}
			if err := caExport(cfg, out, os.Geteuid()); err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), caKeyWarning, out, filepath.Base(out))
			fmt.Fprintf(cmd.OutOrStdout(), "CA certificate and key written to %s\n", out)
			return nil
		},
	}
	export.Flags().StringVar(&config, "config", "/etc/hasan/hasan.yaml", "YAML configuration file of this node (it must hold data_dir/tls/ca.key)")
	export.Flags().StringVar(&out, "out", "", "file to create (it must not exist)")
	_ = export.MarkFlagRequired("out")

	var importConfig string
	imp := &cobra.Command{
		Use:   "import FILE",
		Short: "install the CA key from FILE (made by `ca export` on a node of this cluster) on this storage node",
		Long: "import checks that FILE is readable by its owner only, that its key belongs to its certificate and " +
			"that the certificate is this node's cluster CA (data_dir/tls/ca.crt), then writes data_dir/tls/ca.key " +
			"(mode 0600). Restart `hasan serve` afterwards: the key is read at start. Witnesses refuse it.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := loadServeConfig(importConfig)
			if err != nil {
				return err
			}
			fresh, err := caImport(cfg, args[0], os.Geteuid())
			if err != nil {
				return err
			}
			if !fresh {
				fmt.Fprintf(cmd.OutOrStdout(), "%s already holds this CA key; nothing changed\n", cfg.tlsDir())
				return nil
			}
			fmt.Fprintf(cmd.OutOrStdout(), "CA key installed in %s; restart `hasan serve` on this node so that it admits joins\n",
				filepath.Join(cfg.tlsDir(), caKeyFile))
			fmt.Fprintf(cmd.ErrOrStderr(), "WARNING: %s still holds the CA key: delete it (shred -u %s)\n", args[0], args[0])
			return nil
		},
	}
	imp.Flags().StringVar(&importConfig, "config", "/etc/hasan/hasan.yaml", "YAML configuration file of this node")
	cmd.AddCommand(export, imp)
	return cmd
}

// checkCAAccess: the key is root's (or the service user's, who owns
// data_dir/tls and so could read ca.key anyway). Anyone else is refused
// before a file is opened, so the refusal says why.
func checkCAAccess(cfg *serveConfig, euid int) error {
	if euid == 0 {
		return nil
	}
	st, err := os.Stat(cfg.tlsDir())
	if err != nil {
		return fmt.Errorf("hasan: %w", err)
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && int(sys.Uid) == euid {
		return nil
	}
	return fmt.Errorf("hasan: the CA key is handled only by root or the owner of %s (run as root)", cfg.tlsDir())
}

// caExport writes the CA certificate and key, in that order, to a new
// file of mode 0600.
func caExport(cfg *serveConfig, out string, euid int) error {
	if err := checkCAAccess(cfg, euid); err != nil {
		return err
	}
	ca, err := loadLocalCA(cfg)
	if err != nil {
		return err
	}
	if ca == nil {
		return fmt.Errorf("hasan: this node does not hold the CA key (%s): export it on a storage node that does "+
			"(the node that ran `cluster init`, or one that joined as storage over the network)", filepath.Join(cfg.tlsDir(), caKeyFile))
	}
	f, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("hasan: ca export: %w", err)
	}
	_, err = f.Write(append(append([]byte{}, ca.CertPEM...), ca.KeyPEM...))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(out)
		return fmt.Errorf("hasan: ca export: %w", err)
	}
	return nil
}

// caImport installs the key of a bundle made by caExport. It reports
// false when this node already held that very key.
func caImport(cfg *serveConfig, file string, euid int) (bool, error) {
	if err := checkCAAccess(cfg, euid); err != nil {
		return false, err
	}
	if cfg.Role != string(cluster.RoleStorage) {
		return false, fmt.Errorf("hasan: node %s is a %s: only storage nodes hold the CA key (a witness may sit on a less trusted site)", cfg.Node, cfg.Role)
	}
	f, err := os.Open(file)
	if err != nil {
		return false, fmt.Errorf("hasan: ca import: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return false, fmt.Errorf("hasan: ca import: %w", err)
	}
	if !st.Mode().IsRegular() {
		return false, fmt.Errorf("hasan: ca import: %s is not a regular file", file)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return false, fmt.Errorf("hasan: ca import: %s has mode %#o: others may have read the CA key; "+
			"keep it readable by its owner only (chmod 600) and copy it over a trusted channel", file, st.Mode().Perm())
	}
	b, err := io.ReadAll(io.LimitReader(f, maxCABundle+1))
	if err != nil {
		return false, fmt.Errorf("hasan: ca import: %w", err)
	}
	if len(b) > maxCABundle {
		return false, fmt.Errorf("hasan: ca import: %s is larger than a CA bundle", file)
	}
	certPEM, keyPEM, err := splitCABundle(b)
	if err != nil {
		return false, fmt.Errorf("hasan: ca import: %s: %w", file, err)
	}
	ca, err := cluster.LoadCA(certPEM, keyPEM)
	if err != nil {
		return false, fmt.Errorf("hasan: ca import: %s: %w", file, err)
	}
	localPEM, err := os.ReadFile(filepath.Join(cfg.tlsDir(), caCertFile))
	if err != nil {
		return false, fmt.Errorf("hasan: ca import: this node has no cluster CA certificate (join it first): %w", err)
	}
	local, err := cluster.CAHash(localPEM)
	if err != nil {
		return false, err
	}
	if h, _ := cluster.CAHash(ca.CertPEM); h != local {
		return false, fmt.Errorf("hasan: ca import: %s is the CA of another cluster (its hash %.12s…, this node's %.12s…)", file, h, local)
	}
	keyPath := filepath.Join(cfg.tlsDir(), caKeyFile)
	if have, err := os.ReadFile(keyPath); err == nil {
		if old, err := cluster.LoadCA(localPEM, have); err == nil && bytes.Equal(old.KeyPEM, ca.KeyPEM) {
			return false, nil
		}
		return false, fmt.Errorf("hasan: ca import: %s exists and differs: move it away first if it is damaged", keyPath)
	} else if !errors.Is(err, os.ErrNotExist) {
		return false, fmt.Errorf("hasan: ca import: %w", err)
	}
	if err := writeSecretFile(keyPath, ca.KeyPEM); err != nil {
		return false, fmt.Errorf("hasan: ca import: %w", err)
	}
	return true, nil
}

// splitCABundle returns the one certificate and the one EC key of b.
func splitCABundle(b []byte) (certPEM, keyPEM []byte, err error) {
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		switch {
		case blk.Type == "CERTIFICATE" && certPEM == nil:
			certPEM = pem.EncodeToMemory(blk)
		case blk.Type == "EC PRIVATE KEY" && keyPEM == nil:
			keyPEM = pem.EncodeToMemory(blk)
		default:
			return nil, nil, fmt.Errorf("unexpected PEM block %q: want one CERTIFICATE and one EC PRIVATE KEY (from `hasan cluster ca export`)", blk.Type)
		}
	}
	if certPEM == nil || keyPEM == nil {
		return nil, nil, errors.New("want one CERTIFICATE and one EC PRIVATE KEY (from `hasan cluster ca export`)")
	}
	return certPEM, keyPEM, nil
}

// writeSecretFile writes through a fresh temporary file (never an old
// one with a wider mode), fsync, rename and a directory fsync: a crash
// leaves either no ca.key or a whole one, never a truncated key that
// LoadCA would refuse at the next start.
func writeSecretFile(path string, b []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // a no-op once renamed
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// tokenJoinAddr picks the member a token names: this node when it holds
// the CA key, else the first storage member (by id) that answers as a
// key holder. Members are asked with cluster.HoldsCAKey, which sends
// nothing secret. The address is chosen before the token is issued, so
// a failure here costs no token.
func tokenJoinAddr(ctx context.Context, cfg *serveConfig, caHash string, note io.Writer) (string, error) {
	ca, err := loadLocalCA(cfg)
	if err != nil {
		return "", err
	}
	if ca != nil {
		addr := cfg.clusterAdvertise()
		if host, _, err := net.SplitHostPort(addr); err != nil || host == "" || net.ParseIP(host) != nil && net.ParseIP(host).IsUnspecified() {
			return "", fmt.Errorf("hasan: cluster address %q cannot be dialled by a new node: set cluster_advertise or pass --join", addr)
		}
		return addr, nil
	}
	var st statusReply
	if err := adminCall(ctx, cfg.adminSocket(), http.MethodGet, "/status", nil, &st); err != nil {
		return "", err
	}
	if st.State == nil {
		return "", errors.New("hasan: the node returned no cluster state")
	}
	var ids []string
	for id, n := range st.State.Nodes {
		if id != cfg.Node && n.Role == cluster.RoleStorage && n.RaftAddr != "" {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids)
	var tried []string
	for _, id := range ids {
		addr := st.State.Nodes[id].RaftAddr
		pctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		err := cluster.HoldsCAKey(pctx, addr, caHash)
		cancel()
		if err == nil {
			fmt.Fprintf(note, "this node does not hold the CA key; the token names %s (%s), which does\n", id, addr)
			return addr, nil
		}
		tried = append(tried, fmt.Sprintf("%s at %s: %s", id, addr, probeReason(err)))
	}
	if len(tried) == 0 {
		tried = append(tried, "no other storage node")
	}
	return "", fmt.Errorf("hasan: no storage member that answers holds the CA key (%s): run `hasan cluster ca export` "+
		"on a storage node that has data_dir/tls/ca.key and `hasan cluster ca import` here, or pass --join",
		strings.Join(tried, "; "))
}

func probeReason(err error) string {
	switch {
	case errors.Is(err, cluster.ErrNoCAKey):
		return "no CA key"
	case errors.Is(err, cluster.ErrMemberUnreachable):
		return "unreachable"
	case errors.Is(err, cluster.ErrCAMismatch):
		return "another cluster's CA"
	}
	return err.Error()
}
