package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/hasan-storage/hasan/cluster"
)

// Files under data_dir/tls. ca.key exists on the node that ran `cluster
// init`, on every node that joined as storage over the network, and
// wherever `cluster ca import` put it; never on a witness (decision 0013).
const (
	caCertFile   = "ca.crt"
	caKeyFile    = "ca.key"
	nodeCertFile = "node.crt"
	nodeKeyFile  = "node.key"
)

func loadNodeTLS(cfg *serveConfig) (*tls.Config, error) {
	dir := cfg.tlsDir()
	read := func(name string) ([]byte, error) {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("hasan: %w (run `hasan cluster init`, or install this node's certificate from `hasan cluster cert`)", err)
		}
		return b, nil
	}
	ca, err := read(caCertFile)
	if err != nil {
		return nil, err
	}
	cert, err := read(nodeCertFile)
	if err != nil {
		return nil, err
	}
	key, err := read(nodeKeyFile)
	if err != nil {
		return nil, err
	}
	return cluster.TLSConfig(ca, cert, key)
}

func writeFiles(dir string, files map[string][]byte) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			return err
		}
	}
	return nil
}

const nodeCertValidity = cluster.NodeCertValidity

func newClusterCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "cluster", Short: "create, join and inspect the cluster"}
	cmd.AddCommand(newClusterInitCmd(), newClusterCertCmd(), newClusterTokenCmd(), newClusterJoinCmd(), newClusterStatusCmd())
	cmd.AddCommand(newClusterMaintenanceCmd(), newClusterCACmd())
	return cmd
}

func newClusterInitCmd() *cobra.Command {
	var config, name string
	c := &cobra.Command{
		Use:   "init",
		Short: "create the cluster CA and this node's certificate, and bootstrap a one-node cluster",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadServeConfig(config)
			if err != nil {
				return err
			}
			if err := clusterInit(cmd.Context(), cfg, name); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "cluster %q created with node %s; start it with `hasan serve --config %s`\n", name, cfg.Node, config)
			return nil
		},
	}
	c.Flags().StringVar(&config, "config", "/etc/hasan/hasan.yaml", "YAML configuration file of this node")
	c.Flags().StringVar(&name, "name", "hasan", "cluster name (in the CA certificate)")
	return c
}

// clusterInit refuses to run twice: a second CA would split the cluster.
func clusterInit(ctx context.Context, cfg *serveConfig, name string) error {
	if cfg.Role != string(cluster.RoleStorage) {
		return errors.New("hasan: cluster init runs on a storage node")
	}
	for _, p := range []string{filepath.Join(cfg.tlsDir(), caCertFile), filepath.Join(cfg.raftDir(), "raft.db")} {
		if _, err := os.Stat(p); err == nil {
			return fmt.Errorf("hasan: %s exists: this node is already initialised", p)
		}
	}
	now := time.Now()
	ca, err := cluster.NewCA(name, now)
	if err != nil {
		return err
	}
	cert, key, err := ca.Issue(cfg.Node, now, nodeCertValidity)
	if err != nil {
		return err
	}
	if err := writeFiles(cfg.tlsDir(), map[string][]byte{caCertFile: ca.CertPEM, caKeyFile: ca.KeyPEM, nodeCertFile: cert, nodeKeyFile: key}); err != nil {
		return fmt.Errorf("hasan: %w", err)
	}
	tlsCfg, err := cluster.TLSConfig(ca.CertPEM, cert, key)
	if err != nil {
		return err
	}
	node, err := cluster.NewNode(cluster.NodeConfig{ID: cfg.Node, Role: cluster.Role(cfg.Role), DataDir: cfg.raftDir(),
		BindAddr: cfg.ClusterListen, AdvertiseAddr: cfg.ClusterAdvertise, TLS: tlsCfg})
	if err != nil {
		return err
	}
	defer node.Close()
	bctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	self := cfg.nodeInfo()
	// Recorded so that removing this node later revokes its certificate.
	self.CertSerials = certSerials(cert)
	return node.Bootstrap(bctx, self)
}

func newClusterCertCmd() *cobra.Command {
	var config, id, out string
	var admin bool
	c := &cobra.Command{
		Use:   "cert",
		Short: "issue a certificate for a new node from the CA kept by the init node (copy --out to the new node's data_dir/tls)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadServeConfig(config)
			if err != nil {
				return err
			}
			issue := issueNodeCert
			if admin {
				issue = issueAdminCert
			}
			if err := issue(cfg, id, out); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "certificate for %s written to %s\n", id, out)
			return printIssuedSerial(cmd.OutOrStdout(), filepath.Join(out, nodeCertFile))
		},
	}
	c.AddCommand(newClusterCertRevokeCmd(), newClusterCertListCmd())
	c.Flags().StringVar(&config, "config", "/etc/hasan/hasan.yaml", "configuration of the node holding the CA key")
	c.Flags().StringVar(&id, "node", "", "id of the new node")
	c.Flags().StringVar(&out, "out", "", "directory to write ca.crt, node.crt and node.key to")
	c.Flags().BoolVar(&admin, "admin", false, "issue an operator (admin) certificate: --node is its name; it may propose to the leader without being a node")
	_ = c.MarkFlagRequired("node")
	_ = c.MarkFlagRequired("out")
	return c
}

func issueNodeCert(cfg *serveConfig, id, out string) error {
	certPEM, err := os.ReadFile(filepath.Join(cfg.tlsDir(), caCertFile))
	if err != nil {
		return fmt.Errorf("hasan: %w", err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(cfg.tlsDir(), caKeyFile))
	if err != nil {
		return fmt.Errorf("hasan: this node does not hold the CA key (run this on a storage node that does): %w", err)
	}
	ca, err := cluster.LoadCA(certPEM, keyPEM)
	if err != nil {
		return err
	}
	cert, key, err := ca.Issue(id, time.Now(), nodeCertValidity)
	if err != nil {
		return err
	}
	return writeFiles(out, map[string][]byte{caCertFile: certPEM, nodeCertFile: cert, nodeKeyFile: key})
}

func newClusterTokenCmd() *cobra.Command {
	var (
		config, role, join string
		ttl                time.Duration
	)
	c := &cobra.Command{
		Use:   "token",
		Short: "print a short-lived, single-use join token (asks the running node through its admin socket)",
		Long: "token prints hsn1.<id>.<secret>.<sha256 of the cluster CA certificate>@<member address>. " +
			"The new node uses the hash to authenticate the cluster before it sends the secret, and dials the " +
			"address. The member it dials must hold the CA key (data_dir/tls/ca.key), since it signs the new " +
			"certificate: the address is this node's cluster_advertise when it holds the key, else that of the " +
			"first storage member that answers as a key holder, unless --join is given. Every node that joined " +
			"as storage holds the key; older clusters copy it with `hasan cluster ca export`/`import`.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadServeConfig(config)
			if err != nil {
				return err
			}
			caPEM, err := os.ReadFile(filepath.Join(cfg.tlsDir(), caCertFile))
			if err != nil {
				return fmt.Errorf("hasan: %w", err)
			}
			hash, err := cluster.CAHash(caPEM)
			if err != nil {
				return err
			}
			if join == "" {
				if join, err = tokenJoinAddr(cmd.Context(), cfg, hash, cmd.ErrOrStderr()); err != nil {
					return err
				}
			}
			var resp struct {
				Token string `json:"token"`
			}
			q := fmt.Sprintf("/token?role=%s&ttl=%s", role, ttl)
			if err := adminCall(cmd.Context(), cfg.adminSocket(), http.MethodPost, q, nil, &resp); err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), cluster.JoinTicket{Secret: resp.Token, CAHash: hash, Addr: join})
			return nil
		},
	}
	c.Flags().StringVar(&config, "config", "/etc/hasan/hasan.yaml", "YAML configuration file of this node")
	c.Flags().StringVar(&role, "role", "storage", "role of the joining node: storage or witness")
	c.Flags().DurationVar(&ttl, "ttl", 15*time.Minute, "token lifetime")
	c.Flags().StringVar(&join, "join", "", "cluster address (host:port) of a member holding the CA key, put in the token")
	return c
}

// loadLocalCA returns the CA when this node holds its key (it then signs
// network joins), nil otherwise.
func loadLocalCA(cfg *serveConfig) (*cluster.CA, error) {
	keyPEM, err := os.ReadFile(filepath.Join(cfg.tlsDir(), caKeyFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("hasan: %w", err)
	}
	certPEM, err := os.ReadFile(filepath.Join(cfg.tlsDir(), caCertFile))
	if err != nil {
		return nil, fmt.Errorf("hasan: %w", err)
	}
	return cluster.LoadCA(certPEM, keyPEM)
}

func newClusterJoinCmd() *cobra.Command {
	var config, token, via, join string
	c := &cobra.Command{
		Use:   "join",
		Short: "join this node to the cluster with a token from `hasan cluster token`",
		Long: "join, run on the NEW node before its first `hasan serve`, makes its key and a certificate request, " +
			"dials the member named in the token (or --join) on its cluster port, checks that member's CA against " +
			"the hash in the token, and only then sends the token and the request. The member (any storage node " +
			"holding the CA key) consumes the token through Raft, signs the certificate and adds the node (as a " +
			"non-voter, promoted to voter once it answers). The certificate is written to data_dir/tls; a storage " +
			"node also receives the CA key (ca.key, mode 0600), so it can admit later joins. Then start `hasan serve`.\n\n" +
			"If the member named in the token is gone, the token is still good: pass --join with the cluster " +
			"address of another storage member.\n\n" +
			"With --via (the leader's admin socket, on the leader's host) the node described by --config is admitted " +
			"locally instead; it must already have its certificate (`hasan cluster cert`) and run `hasan serve`.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadServeConfig(config)
			if err != nil {
				return err
			}
			if via != "" {
				req := joinRequest{Token: strings.TrimSpace(token), Node: cfg.nodeInfo()}
				// The certificate this node serves with (from `hasan cluster
				// cert`), recorded so that removing the node revokes it.
				if p, err := os.ReadFile(filepath.Join(cfg.tlsDir(), nodeCertFile)); err == nil {
					req.Node.CertSerials = certSerials(p)
				}
				if err := adminCall(cmd.Context(), via, http.MethodPost, "/join", req, nil); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "node %s joined\n", cfg.Node)
				return nil
			}
			if err := networkJoin(cmd.Context(), cfg, token, join); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "node %s joined; certificate written to %s; start it with `hasan serve --config %s`\n", cfg.Node, cfg.tlsDir(), config)
			if _, err := os.Stat(filepath.Join(cfg.tlsDir(), caKeyFile)); err == nil {
				fmt.Fprintf(cmd.OutOrStdout(), "this node received the cluster CA key (%s): it can admit joins\n", filepath.Join(cfg.tlsDir(), caKeyFile))
			}
			return nil
		},
	}
	c.Flags().StringVar(&config, "config", "/etc/hasan/hasan.yaml", "YAML configuration file of the joining node")
	c.Flags().StringVar(&token, "token", "", "join token from `hasan cluster token`")
	c.Flags().StringVar(&via, "via", "", "admin socket of the Raft leader (its data_dir/admin.sock): admit locally instead of over the network")
	c.Flags().StringVar(&join, "join", "", "cluster address (host:port) of a storage member holding the CA key (default: the token's)")
	_ = c.MarkFlagRequired("token")
	return c
}

// networkJoin refuses to overwrite an existing identity: a second key for
// the same node id, or a node that already has raft state, would split it.
func networkJoin(ctx context.Context, cfg *serveConfig, token, join string) error {
	for _, p := range []string{filepath.Join(cfg.tlsDir(), nodeCertFile), filepath.Join(cfg.tlsDir(), caCertFile), filepath.Join(cfg.raftDir(), "raft.db")} {
		if _, err := os.Stat(p); err == nil {
			return fmt.Errorf("hasan: %s exists: this node already has a cluster identity", p)
		}
	}
	t, err := cluster.ParseJoinTicket(token)
	if err != nil {
		return err
	}
	jctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	res, err := cluster.JoinNetwork(jctx, t, join, cfg.nodeInfo())
	if err != nil {
		return err
	}
	files := map[string][]byte{caCertFile: res.CACert, nodeCertFile: res.Cert, nodeKeyFile: res.Key}
	if res.CAKey != nil {
		files[caKeyFile] = res.CAKey
	}
	if err := writeFiles(cfg.tlsDir(), files); err != nil {
		return fmt.Errorf("hasan: %w", err)
	}
	return nil
}

type joinRequest struct {
	Token string           `json:"token"`
	Node  cluster.NodeInfo `json:"node"`
}

// statusReply is the admin socket's /status and `cluster status --json`.
type statusReply struct {
	Node      string         `json:"node"`
	RaftState string         `json:"raft_state"`
	Leader    string         `json:"leader"`
	State     *cluster.State `json:"state"`
}

// localStatus asks the node that config describes for its status over
// its admin socket (root on the node; no API certificate needed).
func localStatus(ctx context.Context, config string) (statusReply, error) {
	var st statusReply
	cfg, err := loadServeConfig(config)
	if err != nil {
		return st, err
	}
	err = adminCall(ctx, cfg.adminSocket(), http.MethodGet, "/status", nil, &st)
	return st, err
}

func newClusterStatusCmd() *cobra.Command {
	var (
		config string
		asJSON bool
	)
	c := &cobra.Command{
		Use:   "status",
		Short: "show nodes, groups and volumes as this node sees them",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := localStatus(cmd.Context(), config)
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			printStatus(cmd.OutOrStdout(), &st)
			return nil
		},
	}
	c.Flags().StringVar(&config, "config", "/etc/hasan/hasan.yaml", "YAML configuration file of this node")
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}

func printStatus(w io.Writer, st *statusReply) {
	fmt.Fprintf(w, "node %s: raft %s, leader %s, maintenance %v\n\n", st.Node, st.RaftState, st.Leader, st.State.Maintenance)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tROLE\tSTATE\tRAFT\tDATA\tPORTAL")
	for _, id := range sortedIDs(st.State.Nodes) {
		n := st.State.Nodes[id]
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", n.ID, n.Role, n.State, n.RaftAddr, n.DataAddr, n.PortalAddr)
	}
	fmt.Fprintln(tw, "\nGROUP\tOWNER\tEPOCH\tMOVING TO\tVIPS\tTARGETS")
	for _, name := range sortedIDs(st.State.Groups) {
		g := st.State.Groups[name]
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\n", g.Name, g.Owner, g.Epoch, g.MovingTo, strings.Join(g.VIPs, ","), strings.Join(g.Targets, ","))
	}
	fmt.Fprintln(tw, "\nVOLUME\tNAME\tSIZE\tPRIMARY\tEPOCH\tISR")
	for _, id := range sortedIDs(st.State.Volumes) {
		v := st.State.Volumes[id]
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%d\t%s\n", v.UUID, v.Name, v.Size, v.Primary, v.Epoch, strings.Join(v.ISR, ","))
	}
	tw.Flush()
}

func sortedIDs[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// startAdmin serves the local admin socket (mode 0600, so only root and
// the service user can ask for tokens).
func (s *server) startAdmin(ctx context.Context) error {
	path := s.cfg.adminSocket()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	_ = os.Remove(path) // a stale socket of a previous run
	ln, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("hasan: admin socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		_, leader := s.node.Raft().LeaderWithID()
		writeJSON(w, http.StatusOK, statusReply{Node: s.cfg.Node, RaftState: s.node.Raft().State().String(),
			Leader: string(leader), State: s.node.FSM().State()})
	})
	mux.HandleFunc("POST /token", func(w http.ResponseWriter, r *http.Request) {
		role := cluster.Role(r.URL.Query().Get("role"))
		ttl, err := time.ParseDuration(r.URL.Query().Get("ttl"))
		if err != nil || ttl <= 0 || ttl > 24*time.Hour {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": "ttl: want a duration up to 24h"})
			return
		}
		tok, err := issueToken(r.Context(), s.node, role, ttl)
		if err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"token": tok})
	})
	mux.HandleFunc("POST /join", func(w http.ResponseWriter, r *http.Request) {
		var req joinRequest
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<16)).Decode(&req); err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
			return
		}
		if !s.node.IsLeader() {
			writeJSON(w, http.StatusConflict, map[string]string{"error": "not the raft leader: run join on the leader's host"})
			return
		}
		if err := s.node.Join(r.Context(), req.Token, req.Node); err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"joined": req.Node.ID})
	})
	mux.HandleFunc("POST /cert/revoke", s.adminCertRevoke)
	s.admin = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second,
		BaseContext: func(net.Listener) context.Context { return ctx }}
	s.srvWG.Add(1)
	go func() { defer s.srvWG.Done(); _ = s.admin.Serve(ln) }()
	return nil
}

// issueToken commits a token's hash and returns the token.
func issueToken(ctx context.Context, p cluster.Proposer, role cluster.Role, ttl time.Duration) (string, error) {
	tok, cmd, err := cluster.NewJoinToken(role, time.Now(), ttl)
	if err != nil {
		return "", err
	}
	if _, err := p.Propose(ctx, cmd); err != nil {
		return "", err
	}
	return tok, nil
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// adminCall makes one request to a node's admin socket.
func adminCall(ctx context.Context, socket, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = strings.NewReader(string(b))
	}
	cl := &http.Client{Timeout: 15 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}}
	req, err := http.NewRequestWithContext(ctx, method, "http://admin"+path, body)
	if err != nil {
		return err
	}
	resp, err := cl.Do(req)
	if err != nil {
		return fmt.Errorf("hasan: is `hasan serve` running? %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error string `json:"error"`
		}
		_ = json.NewDecoder(resp.Body).Decode(&e)
		return fmt.Errorf("hasan: %s %s: %s", method, path, e.Error)
	}
	if out == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(out)
}
