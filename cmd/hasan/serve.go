package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/spf13/cobra"
	yaml "go.yaml.in/yaml/v3"

	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/fencing"
	"github.com/hasan-storage/hasan/replication"
	"github.com/hasan-storage/hasan/target"
	"github.com/hasan-storage/hasan/vip"
	"github.com/hasan-storage/hasan/webui"
)

// serveConfig is the node's YAML configuration (JSON is YAML too).
type serveConfig struct {
	// Node is this node's id in the cluster (also its certificate CN).
	Node string `yaml:"node"`
	// Role is storage (holds replicas, serves targets) or witness (votes).
	Role string `yaml:"role"`
	// DataDir holds tls/, raft/, replicas/ and admin.sock.
	DataDir string `yaml:"data_dir"`
	// ClusterListen is the Raft mutual-TLS listener; ClusterAdvertise what
	// peers dial (required when the listener is a wildcard).
	ClusterListen    string `yaml:"cluster_listen"`
	ClusterAdvertise string `yaml:"cluster_advertise"`
	// ReplicationListen serves this node's replicas to primaries.
	ReplicationListen    string `yaml:"replication_listen"`
	ReplicationAdvertise string `yaml:"replication_advertise"`
	// PortalListen is the iSCSI portal. A wildcard address also accepts
	// connections to the floating IPs this node holds.
	PortalListen string `yaml:"portal_listen"`
	// VIPLink is the interface floating IPs are added to; empty leaves
	// VIPs unmanaged (acquisitions fail and are logged).
	VIPLink  string `yaml:"vip_link"`
	VIPLabel string `yaml:"vip_label"`
	// APIListen is the REST API (default 127.0.0.1:7402); "off" disables
	// it. On loopback it is plain HTTP without authentication: meant for
	// root on the node, but any local user can connect (api_tls: on
	// closes that). Anywhere else it is HTTPS and admits only
	// administrator certificates (webui/auth.go).
	APIListen string `yaml:"api_listen"`
	// APIAdvertise is the API address other nodes and the CLI are sent
	// to (the leader's API in the X-Hasan-Leader header). Default:
	// api_listen, or, when that is a wildcard, cluster_advertise's host
	// with api_listen's port.
	APIAdvertise string `yaml:"api_advertise"`
	// APITLS is "auto" (the default: TLS exactly when api_listen is not
	// loopback) or "on" (TLS on loopback too, e.g. behind an SSH tunnel
	// shared by several users). There is no "off": a network-reachable
	// API without TLS would let anyone on that network change the cluster.
	APITLS string `yaml:"api_tls"`
	// APITLSCert and APITLSKey are the API's server certificate and key
	// (PEM files), signed by the cluster CA; default this node's cluster
	// certificate in data_dir/tls, whose name "hasan-cluster" the hasan
	// CLI checks. Set them for a certificate naming the host or IP that
	// browsers and curl check.
	APITLSCert string `yaml:"api_tls_cert"`
	APITLSKey  string `yaml:"api_tls_key"`
	// FailureTimeout is the controller's failure detection; Lease the
	// self-demotion lease (must be shorter).
	FailureTimeout time.Duration `yaml:"failure_timeout"`
	Lease          time.Duration `yaml:"lease"`
	// LeaderPlacement (default true) lets the Raft leader hand leadership
	// to the node whose loss costs least (a witness first), so that an
	// owner's loss never waits for an election. Set false to leave
	// leadership where elections put it, e.g. when the witness runs on
	// hardware too slow to lead.
	LeaderPlacement *bool `yaml:"leader_placement"`
	// ReplicaAckTimeout is how long a primary waits for a replica that
	// leaves a write unanswered before it drops it from the ISR (the
	// write stall when a replica dies silently); default
	// cluster.DefaultReplicaAckTimeout.
	ReplicaAckTimeout time.Duration `yaml:"replica_ack_timeout"`
	// ShutdownTimeout bounds the stop on SIGTERM, the hand-over of owned
	// groups included.
	ShutdownTimeout time.Duration `yaml:"shutdown_timeout"`
	// ForwardFromAnyCertificate lets the leader accept proposals from any
	// certificate of the cluster CA. Off (the default), only nodes of the
	// cluster and admin certificates (`cluster cert --admin`) may propose.
	ForwardFromAnyCertificate bool `yaml:"forward_from_any_certificate"`
}

const (
	defaultDataDir           = "/var/lib/hasan"
	defaultClusterListen     = "0.0.0.0:7400"
	defaultReplicationListen = "0.0.0.0:7401"
	defaultPortalListen      = "0.0.0.0:3260"
	defaultAPIListen         = "127.0.0.1:7402"
	defaultShutdownTimeout   = 10 * time.Second
	// minReplicaAckTimeout: two replication ticks; less would drop a
	// healthy replica for a scheduling hiccup.
	minReplicaAckTimeout = 200 * time.Millisecond
)

func (c *serveConfig) setDefaults() {
	def := func(s *string, v string) {
		if *s == "" {
			*s = v
		}
	}
	def(&c.Role, string(cluster.RoleStorage))
	def(&c.DataDir, defaultDataDir)
	def(&c.ClusterListen, defaultClusterListen)
	def(&c.ReplicationListen, defaultReplicationListen)
	def(&c.PortalListen, defaultPortalListen)
	def(&c.APIListen, defaultAPIListen)
	def(&c.APITLS, apiTLSAuto)
	if c.FailureTimeout <= 0 {
		c.FailureTimeout = cluster.DefaultFailureTimeout
	}
	if c.Lease <= 0 {
		c.Lease = cluster.DefaultLeaseDuration
	}
	if c.ShutdownTimeout <= 0 {
		c.ShutdownTimeout = defaultShutdownTimeout
	}
	if c.ReplicaAckTimeout <= 0 {
		c.ReplicaAckTimeout = cluster.DefaultReplicaAckTimeout
	}
}

// Validate checks the configuration (after defaults), naming the field.
func (c *serveConfig) Validate() error {
	if c.Node == "" {
		return errors.New("config: node is required")
	}
	if c.Role != string(cluster.RoleStorage) && c.Role != string(cluster.RoleWitness) {
		return fmt.Errorf("config: role %q: want storage or witness", c.Role)
	}
	if !filepath.IsAbs(c.DataDir) {
		return fmt.Errorf("config: data_dir %q: must be an absolute path", c.DataDir)
	}
	addr := func(field, v string, optional bool) (netip.AddrPort, error) {
		if v == "" && optional {
			return netip.AddrPort{}, nil
		}
		host, port, err := net.SplitHostPort(v)
		if err != nil {
			return netip.AddrPort{}, fmt.Errorf("config: %s %q: %w", field, v, err)
		}
		ap, err := netip.ParseAddrPort(net.JoinHostPort(host, port))
		if err != nil {
			return netip.AddrPort{}, fmt.Errorf("config: %s %q: want IP:port: %w", field, v, err)
		}
		return ap, nil
	}
	needAdvertise := func(lf, lv, af, av string) error {
		l, err := addr(lf, lv, false)
		if err != nil {
			return err
		}
		a, err := addr(af, av, true)
		if err != nil {
			return err
		}
		if av == "" && (l.Addr().IsUnspecified() || l.Port() == 0) {
			return fmt.Errorf("config: %s is required when %s (%s) is a wildcard address", af, lf, lv)
		}
		if av != "" && (a.Addr().IsUnspecified() || a.Port() == 0) {
			return fmt.Errorf("config: %s %q: must be a dialable IP:port", af, av)
		}
		return nil
	}
	if err := needAdvertise("cluster_listen", c.ClusterListen, "cluster_advertise", c.ClusterAdvertise); err != nil {
		return err
	}
	if c.Role == string(cluster.RoleStorage) {
		if err := needAdvertise("replication_listen", c.ReplicationListen, "replication_advertise", c.ReplicationAdvertise); err != nil {
			return err
		}
		if _, err := addr("portal_listen", c.PortalListen, false); err != nil {
			return err
		}
	}
	if c.APIListen != "off" {
		if _, err := addr("api_listen", c.APIListen, false); err != nil {
			return err
		}
		if a, err := addr("api_advertise", c.APIAdvertise, true); err != nil {
			return err
		} else if c.APIAdvertise != "" && (a.Addr().IsUnspecified() || a.Port() == 0) {
			return fmt.Errorf("config: api_advertise %q: must be a dialable IP:port", c.APIAdvertise)
		}
	}
	if c.APITLS != apiTLSAuto && c.APITLS != apiTLSOn {
		return fmt.Errorf("config: api_tls %q: want auto or on", c.APITLS)
	}
	if (c.APITLSCert == "") != (c.APITLSKey == "") {
		return errors.New("config: api_tls_cert and api_tls_key go together: set both or neither")
	}
	for field, p := range map[string]string{"api_tls_cert": c.APITLSCert, "api_tls_key": c.APITLSKey} {
		if p != "" && !filepath.IsAbs(p) {
			return fmt.Errorf("config: %s %q: must be an absolute path", field, p)
		}
	}
	if err := cluster.CheckTimeouts(c.Lease, c.FailureTimeout); err != nil {
		return fmt.Errorf("config: lease/failure_timeout: %w", err)
	}
	if c.ReplicaAckTimeout < minReplicaAckTimeout {
		return fmt.Errorf("config: replica_ack_timeout %v: must be at least %v", c.ReplicaAckTimeout, minReplicaAckTimeout)
	}
	return nil
}

func (c *serveConfig) clusterAdvertise() string {
	if c.ClusterAdvertise != "" {
		return c.ClusterAdvertise
	}
	return c.ClusterListen
}

func (c *serveConfig) replicationAdvertise() string {
	if c.ReplicationAdvertise != "" {
		return c.ReplicationAdvertise
	}
	return c.ReplicationListen
}

// Values of api_tls.
const (
	apiTLSAuto = "auto"
	apiTLSOn   = "on"
)

// apiUsesTLS: the API serves HTTPS with administrator certificates.
func (c *serveConfig) apiUsesTLS() bool {
	return c.APIListen != "off" && (c.APITLS == apiTLSOn || !webui.IsLoopback(c.APIListen))
}

// apiTLSConfig loads the API's TLS material: the cluster CA (which signs
// the administrator certificates it admits) and the server certificate.
// It runs before anything else starts, so that a node told to expose its
// API without the means to protect it does not start at all.
func (c *serveConfig) apiTLSConfig() (*tls.Config, error) {
	certFile, keyFile := c.APITLSCert, c.APITLSKey
	if certFile == "" {
		certFile, keyFile = filepath.Join(c.tlsDir(), nodeCertFile), filepath.Join(c.tlsDir(), nodeKeyFile)
	}
	var pems [3][]byte
	for i, f := range []string{filepath.Join(c.tlsDir(), caCertFile), certFile, keyFile} {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, c.apiTLSError(err)
		}
		pems[i] = b
	}
	tc, err := webui.TLSConfig(pems[0], pems[1], pems[2])
	if err != nil {
		return nil, c.apiTLSError(err)
	}
	return tc, nil
}

func (c *serveConfig) apiTLSError(cause error) error {
	why := "api_tls is on"
	if c.APITLS != apiTLSOn {
		why = fmt.Sprintf("api_listen %s is not a loopback address", c.APIListen)
	}
	return fmt.Errorf("config: %s, so the REST API must serve HTTPS and admit administrator certificates, "+
		"but it has no usable TLS material: %w. Fix: install this node's certificate in %s (`hasan cluster init`, "+
		"`hasan cluster cert` or `hasan cluster join`), or set api_tls_cert and api_tls_key to a certificate "+
		"signed by the cluster CA, or set api_listen to %s", why, cause, c.tlsDir(), defaultAPIListen)
}

func (c *serveConfig) tlsDir() string      { return filepath.Join(c.DataDir, "tls") }
func (c *serveConfig) raftDir() string     { return filepath.Join(c.DataDir, "raft") }
func (c *serveConfig) replicaDir() string  { return filepath.Join(c.DataDir, "replicas") }
func (c *serveConfig) adminSocket() string { return filepath.Join(c.DataDir, "admin.sock") }

// controllerConfig is the controller's part of the config.
func (c *serveConfig) controllerConfig() cluster.ControllerConfig {
	return cluster.ControllerConfig{Self: c.Node, FailureTimeout: c.FailureTimeout,
		NoLeaderPlacement: c.LeaderPlacement != nil && !*c.LeaderPlacement}
}

// apiAdvertise is the API address recorded in the state: a wildcard
// api_listen is no address anyone can dial.
func (c *serveConfig) apiAdvertise() string {
	if c.APIAdvertise != "" {
		return c.APIAdvertise
	}
	host, port, err := net.SplitHostPort(c.APIListen)
	if err != nil {
		return c.APIListen
	}
	if ip, err := netip.ParseAddr(host); err == nil && ip.IsUnspecified() {
		if ch, _, err := net.SplitHostPort(c.clusterAdvertise()); err == nil {
			return net.JoinHostPort(ch, port)
		}
	}
	return c.APIListen
}

// nodeInfo is how this node registers itself in the state.
func (c *serveConfig) nodeInfo() cluster.NodeInfo {
	n := cluster.NodeInfo{ID: c.Node, Role: cluster.Role(c.Role), RaftAddr: c.clusterAdvertise()}
	if c.APIListen != "off" {
		n.APIAddr = c.apiAdvertise()
	}
	if n.Role == cluster.RoleStorage {
		n.DataAddr = c.replicationAdvertise()
		n.PortalAddr = c.PortalListen
	}
	return n
}

func loadServeConfig(path string) (*serveConfig, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	var c serveConfig
	if err := yaml.Unmarshal(raw, &c); err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	c.setDefaults()
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &c, nil
}

func newServeCmd() *cobra.Command {
	var config string
	c := &cobra.Command{
		Use:   "serve",
		Short: "run this node: Raft member, controller, quorum lease, node agent, target and replica server",
		Long: `serve runs one cluster node until SIGTERM. Example configuration (YAML; defaults shown in comments):

  node: n1                          # required; the certificate CN
  role: storage                     # storage | witness
  data_dir: /var/lib/hasan          # tls/, raft/, replicas/, admin.sock
  cluster_listen: 0.0.0.0:7400      # Raft, mutual TLS
  cluster_advertise: 192.0.2.1:7400 # required with a wildcard listener
  replication_listen: 0.0.0.0:7401
  replication_advertise: 192.0.2.1:7401
  portal_listen: 0.0.0.0:3260       # iSCSI; a wildcard also answers on held VIPs
  vip_link: eth0                    # empty: VIPs are not managed
  api_listen: 127.0.0.1:7402        # REST API; "off" disables it. Loopback: plain HTTP, no
                                    # authentication. Otherwise HTTPS admitting only
                                    # certificates from 'hasan cluster cert --admin'
  api_advertise: ""                 # address the CLI is sent to; default api_listen, or
                                    # cluster_advertise's host when api_listen is a wildcard
  api_tls: auto                     # auto | on (TLS on loopback too)
  api_tls_cert: ""                  # server certificate (cluster CA); default data_dir/tls/node.crt
  api_tls_key: ""                   # its key; default data_dir/tls/node.key
  failure_timeout: 700ms
  lease: 500ms                      # must be shorter than failure_timeout
  leader_placement: true            # the Raft leader moves to the witness, so an owner's loss needs no election
  replica_ack_timeout: 1s           # a silent replica stalls writes this long, then leaves the ISR

Create the cluster with 'hasan cluster init' on the first storage node.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadServeConfig(config)
			if err != nil {
				return err
			}
			return runServe(cmd.Context(), cfg, serveOptions{Logger: slog.Default()})
		},
	}
	c.Flags().StringVar(&config, "config", "/etc/hasan/hasan.yaml", "YAML configuration file")
	return c
}

// serveOptions inject what tests replace.
type serveOptions struct {
	Logger *slog.Logger
	// VIPs replaces vip.Manager (tests without CAP_NET_ADMIN).
	VIPs cluster.VIPManager
}

// runServe starts the node and stops it when ctx ends.
func runServe(ctx context.Context, cfg *serveConfig, o serveOptions) error {
	s, err := startServer(cfg, o)
	if err != nil {
		return err
	}
	<-ctx.Done()
	s.log.Info("hasan: stopping", "timeout", cfg.ShutdownTimeout)
	return s.Stop()
}

// Stop is the graceful stop (SIGTERM): the groups this node owns are
// handed to a live peer by planned moves, and only once they are released
// does the node stop serving. A clean stop is thus not a failure, and
// nobody fences this node. The hand-over takes at most half of
// shutdown_timeout; the stop itself gets the rest.
func (s *server) Stop() error {
	start := time.Now()
	if s.agent != nil {
		ctx, cancel := context.WithTimeout(context.Background(), s.cfg.ShutdownTimeout/2)
		err := s.agent.HandOver(ctx, s.alive)
		cancel()
		if err != nil {
			s.log.Warn("hasan: hand-over before stop incomplete; the cluster fails the rest over", "err", err)
		} else {
			s.log.Info("hasan: groups handed over", "took", time.Since(start))
		}
	}
	// A leader that goes away on purpose hands leadership over too: the
	// peers then need no election timeout to go on committing.
	ctx, cancel := context.WithTimeout(context.Background(), max(s.cfg.ShutdownTimeout/4, time.Second))
	if err := s.node.TransferLeadership(ctx); err != nil {
		s.log.Warn("hasan: leadership transfer before stop", "err", err)
	}
	cancel()
	return s.closeWithin(s.cfg.ShutdownTimeout - time.Since(start))
}

// alive: a peer heard from within the failure timeout (every node beats to
// every voter, so this node's view is first-hand).
func (s *server) alive(id string) bool {
	at, ok := s.node.LastSeen()[id]
	return ok && time.Since(at) <= s.cfg.FailureTimeout
}

// server is one running node.
type server struct {
	cfg  *serveConfig
	log  *slog.Logger
	node *cluster.Node

	tsrv   *target.Server
	rsrv   *replication.Server
	reps   *cluster.ReplicaAdapter
	agent  *cluster.Agent
	vipm   *vip.Manager
	api    *webui.Server
	admin  *http.Server
	portal net.Addr

	cancel  context.CancelFunc
	wg      sync.WaitGroup // loops that end with ctx
	agentWG sync.WaitGroup // the agent's loop
	srvWG   sync.WaitGroup // Serve calls that end with Close
}

func (s *server) run(ctx context.Context, name string, f func(ctx context.Context) error) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := f(ctx); err != nil && ctx.Err() == nil {
			s.log.Error("hasan: "+name+" stopped", "err", err)
		}
	}()
}

func startServer(cfg *serveConfig, o serveOptions) (_ *server, err error) {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("node", cfg.Node)
	var apiTLS *tls.Config
	if cfg.apiUsesTLS() {
		if apiTLS, err = cfg.apiTLSConfig(); err != nil {
			return nil, err
		}
	}
	tlsCfg, err := loadNodeTLS(cfg)
	if err != nil {
		return nil, err
	}
	// The replication server and the REST API check the state's revoked
	// certificates at the handshake once the node's FSM exists (the
	// cluster port does so itself).
	guard := &cluster.CertGuard{}
	dataTLS := guard.Protect(tlsCfg)
	apiTLS = guard.Protect(apiTLS)
	ca, err := loadLocalCA(cfg)
	if err != nil {
		return nil, err
	}
	_, statErr := os.Stat(filepath.Join(cfg.raftDir(), "raft.db"))
	member := statErr == nil
	node, err := cluster.NewNode(cluster.NodeConfig{
		ID: cfg.Node, Role: cluster.Role(cfg.Role), DataDir: cfg.raftDir(),
		BindAddr: cfg.ClusterListen, AdvertiseAddr: cfg.ClusterAdvertise, TLS: tlsCfg, Logger: log,
		ForwardFromAnyCert: cfg.ForwardFromAnyCertificate, CA: ca,
	})
	if err != nil {
		return nil, err
	}
	guard.Attach(node.FSM())
	ctx, cancel := context.WithCancel(context.Background())
	s := &server{cfg: cfg, log: log, node: node, cancel: cancel}
	defer func() {
		if err != nil {
			_ = s.Close()
		}
	}()
	if !member {
		log.Warn("hasan: not a cluster member yet; waiting to be added as a voter (no raft state in data_dir)")
	}
	s.run(ctx, "heartbeats", node.Run)
	s.run(ctx, "controller", func(ctx context.Context) error {
		return node.RunController(ctx, func() *cluster.Controller {
			return &cluster.Controller{
				Config: cfg.controllerConfig(),
				FSM:    node.FSM(), P: node, Logger: log,
				VerifyLeader: node.VerifyLeader,
				Fencer: func(st *cluster.State) (cluster.Fencer, error) {
					hist := &cluster.FenceHistory{P: node, FSM: node.FSM()}
					// Manual devices wait for an operator's ConfirmFence.
					return cluster.BuildClusterFencer(st, node.FSM(), hist, log, time.Now,
						func(id string) time.Time { return node.LastSeen()[id] })
				},
			}
		})
	})

	if cfg.Role == string(cluster.RoleStorage) {
		if err := s.startStorage(ctx, dataTLS, o); err != nil {
			return nil, err
		}
	}
	if err := s.startAdmin(ctx); err != nil {
		return nil, err
	}
	if cfg.APIListen != "off" {
		api, err := webui.New(webui.Config{Addr: cfg.APIListen, TLS: apiTLS, Logger: log}, webui.NewNodeService(node))
		if err != nil {
			return nil, fmt.Errorf("hasan: api: %w", err)
		}
		s.api = api
		s.run(ctx, "api", api.Run)
	}
	log.Info("hasan: node started", "role", cfg.Role, "cluster", node.Addr(), "member", member)
	return s, nil
}

var _ fencing.HistoryStore = (*cluster.FenceHistory)(nil)

// issueAdminCert writes an operator's certificate (CA.IssueAdmin) to out,
// like issueNodeCert does for a node.
func issueAdminCert(cfg *serveConfig, name, out string) error {
	certPEM, err := os.ReadFile(filepath.Join(cfg.tlsDir(), caCertFile))
	if err != nil {
		return fmt.Errorf("hasan: %w", err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(cfg.tlsDir(), caKeyFile))
	if err != nil {
		return fmt.Errorf("hasan: the CA key is only on the node that ran `cluster init`: %w", err)
	}
	ca, err := cluster.LoadCA(certPEM, keyPEM)
	if err != nil {
		return err
	}
	cert, key, err := ca.IssueAdmin(name, time.Now(), nodeCertValidity)
	if err != nil {
		return err
	}
	return writeFiles(out, map[string][]byte{caCertFile: certPEM, nodeCertFile: cert, nodeKeyFile: key})
}

func (s *server) startStorage(ctx context.Context, tlsCfg *tls.Config, o serveOptions) error {
	cfg, log, node := s.cfg, s.log, s.node
	s.tsrv = target.NewServer(target.Config{Logger: log})
	pl, err := net.Listen("tcp", cfg.PortalListen)
	if err != nil {
		return fmt.Errorf("hasan: portal: %w", err)
	}
	s.portal = pl.Addr()
	s.srvWG.Add(1)
	go func() { defer s.srvWG.Done(); _ = s.tsrv.Serve(pl) }()
	s.rsrv, err = replication.NewServer(replication.ServerConfig{TLS: tlsCfg, Logger: log})
	if err != nil {
		return err
	}
	rl, err := net.Listen("tcp", cfg.ReplicationListen)
	if err != nil {
		return fmt.Errorf("hasan: replication listener: %w", err)
	}
	s.srvWG.Add(1)
	go func() { defer s.srvWG.Done(); _ = s.rsrv.Serve(rl) }()
	s.reps = &cluster.ReplicaAdapter{Self: cfg.Node, Dir: cfg.replicaDir(), Server: s.rsrv, TLS: tlsCfg,
		FSM: node.FSM(), P: node, AckTimeout: cfg.ReplicaAckTimeout, Logger: log,
		Silent: func(id string) bool {
			at, ok := node.LastSeen()[id]
			return ok && time.Since(at) > cfg.FailureTimeout
		}}
	var vips cluster.LocalVIPs
	switch {
	case o.VIPs != nil:
		vips = &cluster.VIPAdapter{Manager: o.VIPs, Link: cfg.VIPLink, Label: cfg.VIPLabel, Logger: log}
	case cfg.VIPLink != "":
		m, err := vip.New(vip.Config{Logger: log})
		if err != nil {
			return fmt.Errorf("hasan: vip manager: %w", err)
		}
		s.vipm = m
		vips = &cluster.VIPAdapter{Manager: m, Link: cfg.VIPLink, Label: cfg.VIPLabel, Logger: log}
	default:
		log.Warn("hasan: no vip_link configured: floating IPs are not managed on this node")
		vips = noVIPs{}
	}
	lease := &cluster.SelfDemotion{Raft: node.Raft(), Lease: cluster.NewLease(cfg.Lease, nil), Logger: log, Contact: node.QuorumContact}
	targets := &cluster.TargetAdapter{Server: s.tsrv, Replicas: s.reps, FSM: node.FSM(), P: node, Logger: log}
	s.agent = &cluster.Agent{
		Self: cfg.Node, FSM: node.FSM(), P: node,
		VIPs:     vips,
		Targets:  targets,
		Replicas: s.reps,
		Serving:  lease.Serving,
		// The owner records its initiators' connections so that the next
		// owner can tickle them (vip/ tickle ACKs).
		Sessions: targets,
		Logger:   log,
	}
	lease.Demoter = s.agent
	s.run(ctx, "lease", lease.Run)
	s.agentWG.Add(1)
	go func() {
		defer s.agentWG.Done()
		if err := s.agent.Run(ctx); err != nil && ctx.Err() == nil {
			log.Error("hasan: agent stopped", "err", err)
		}
	}()
	return nil
}

// Close stops everything within cfg.ShutdownTimeout, without handing
// groups over (Stop does that first): the agent first (so
// nothing re-acquires), then the node stops serving (VIPs, targets,
// replicas), then Raft, whose shutdown also resolves a lease check that
// may still be waiting on a quorum, then the remaining loops.
func (s *server) Close() error { return s.closeWithin(s.cfg.ShutdownTimeout) }

func (s *server) closeWithin(timeout time.Duration) error {
	s.cancel()
	ctx, cancel := context.WithTimeout(context.Background(), max(timeout, time.Second))
	defer cancel()
	done := make(chan error, 1)
	go func() {
		var errs []error
		s.agentWG.Wait()
		if s.agent != nil {
			errs = append(errs, s.agent.Demote(ctx, "shutdown"))
		}
		if s.tsrv != nil {
			errs = append(errs, s.tsrv.Close())
		}
		// The replica server first: it ends its primaries' connections
		// and waits for their writes before it closes the secondaries, which
		// removing them one by one while writes still arrive does not.
		if s.rsrv != nil {
			errs = append(errs, s.rsrv.Close())
		}
		if s.reps != nil {
			errs = append(errs, s.reps.CloseAll(ctx))
		}
		if s.vipm != nil {
			errs = append(errs, s.vipm.Close())
		}
		if s.admin != nil {
			errs = append(errs, s.admin.Close())
		}
		errs = append(errs, s.node.Close())
		s.wg.Wait()
		s.srvWG.Wait()
		done <- errors.Join(errs...)
	}()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("hasan: shutdown did not finish within %v", max(timeout, time.Second))
	}
}

// noVIPs is LocalVIPs on a node without vip_link: nothing is held and
// every acquisition fails, so the agent logs it on each pass.
type noVIPs struct{}

func (noVIPs) Acquire(_ context.Context, p netip.Prefix) error {
	return fmt.Errorf("hasan: vip %s not added: no vip_link configured", p)
}
func (noVIPs) Release(context.Context, netip.Prefix) error { return nil }
func (noVIPs) Held() []netip.Prefix                        { return nil }
