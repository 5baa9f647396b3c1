// Package democluster builds the local cluster behind `hasan demo`: one
// network namespace per node on a private bridge, a real `hasan serve` in
// each (two storage nodes and a witness), a simulated Redfish BMC per
// storage node whose power-off really kills that node's process, and a
// 2-replica volume exported through a floating IP that moves between the
// namespaces. Everything it creates is named after Config.Prefix and is
// removed when Run returns.
package democluster

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hasan-storage/hasan/fencing"
)

// Config describes one demo cluster.
type Config struct {
	// Bin is the hasan binary run in every namespace.
	Bin string
	// Dir holds node data, logs and certificates; Start empties it first.
	// Keep it short: the admin socket path must fit in 108 bytes.
	Dir string
	// Prefix names the namespaces (<Prefix>-n1), the bridge (<Prefix>br)
	// and the host ends of the veth pairs. Default "hdemo". At most 9
	// characters, so that interface names fit in 15.
	Prefix string
	// Subnet is private to the demo: .1 is the host end of the bridge (and
	// the BMCs), .11 onwards the nodes, .200 the floating IP. Default
	// 10.254.77.0/24.
	Subnet netip.Prefix
	// VolumeSize in bytes; default 1 GiB (thin).
	VolumeSize int64
	// FailureTimeout of the controller; default 700ms.
	FailureTimeout time.Duration
	// PowerOnAfter is how long a fenced node stays off before its
	// simulated BMC powers it back on, as an operator would after a
	// repair; 0 leaves it off.
	PowerOnAfter time.Duration
	// Out receives the human-readable progress and the connection
	// instructions.
	Out    io.Writer
	Logger *slog.Logger
	// Ready, when set, is called once the floating IP serves the target.
	Ready func(*Cluster)
}

// IQN is the demo target's name.
const IQN = "iqn.2026-11.io.hasan:demo-cluster"

const (
	bmcUser     = "admin"
	groupName   = "g0"
	portalPort  = 3260
	clusterPort = 7400
	dataPort    = 7401
	apiPort     = 7402
	bmcPortBase = 8441
)

// Node is one demo node.
type Node struct {
	ID, Role string
	NS       string
	Addr     netip.Addr
	Dir      string
	Config   string
	Log      string
	// BMC is the storage node's simulated Redfish BMC (nil for the
	// witness). Its power is the node's hasan process.
	BMC         *fencing.RedfishDouble
	bmcAddr     string
	bmcPassword string
	bmcCA       string
	proc        *exec.Cmd // witness only
	procEnd     chan struct{}
}

// API is the node's REST base URL. The API listens on the namespace's
// address, not loopback, so it is HTTPS and admits the administrator
// certificate in Cluster.AdminCerts only.
func (n *Node) API() string {
	return fmt.Sprintf("https://%s", net.JoinHostPort(n.Addr.String(), fmt.Sprint(apiPort)))
}

func (n *Node) adminSocket() string { return filepath.Join(n.Dir, "admin.sock") }

// Cluster is a running demo cluster.
type Cluster struct {
	cfg    Config
	log    *slog.Logger
	Bridge string
	Host   netip.Addr
	VIP    netip.Prefix
	Nodes  []*Node
	Volume string // UUID
	// AdminCerts is the output of `hasan cluster cert --admin`: the
	// --cert-dir for the hasan commands (and restCall's certificate).
	AdminCerts string
	api        *http.Client

	mu       sync.Mutex
	cleanups []func() error
}

// Portal is the floating portal, VIP:3260.
func (c *Cluster) Portal() string {
	return net.JoinHostPort(c.VIP.Addr().String(), fmt.Sprint(portalPort))
}

// Node returns the node with id, or nil.
func (c *Cluster) Node(id string) *Node {
	for _, n := range c.Nodes {
		if n.ID == id {
			return n
		}
	}
	return nil
}

func (cfg *Config) setDefaults() error {
	if cfg.Prefix == "" {
		cfg.Prefix = "hdemo"
	}
	if len(cfg.Prefix) > 9 || strings.ContainsAny(cfg.Prefix, "/ \t") {
		return fmt.Errorf("democluster: prefix %q: at most 9 characters, no spaces or slashes", cfg.Prefix)
	}
	if !cfg.Subnet.IsValid() {
		cfg.Subnet = netip.MustParsePrefix("10.254.77.0/24")
	}
	if !cfg.Subnet.Addr().Is4() || cfg.Subnet.Bits() > 24 {
		return fmt.Errorf("democluster: subnet %s: want an IPv4 prefix of /24 or wider", cfg.Subnet)
	}
	cfg.Subnet = cfg.Subnet.Masked()
	if cfg.VolumeSize == 0 {
		cfg.VolumeSize = 1 << 30
	}
	if cfg.FailureTimeout == 0 {
		cfg.FailureTimeout = 700 * time.Millisecond
	}
	if cfg.Out == nil {
		cfg.Out = io.Discard
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Bin == "" || cfg.Dir == "" {
		return errors.New("democluster: Bin and Dir are required")
	}
	return nil
}

func hostN(p netip.Prefix, n int) netip.Addr {
	b := p.Addr().As4()
	return netip.AddrFrom4([4]byte{b[0], b[1], b[2], byte(n)})
}

// Preflight says why the cluster demo cannot run here, or nil.
func Preflight() error {
	if os.Geteuid() != 0 {
		return errors.New("the cluster demo needs root (it creates network namespaces)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return errors.New("the cluster demo needs iproute2's ip command (apt-get install iproute2)")
	}
	return nil
}

// Run builds the cluster, prints how to use it, and tears it down when ctx
// ends. It returns ctx's end as nil.
func Run(ctx context.Context, cfg Config) error {
	c, err := Start(ctx, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	if cfg.Ready != nil {
		cfg.Ready(c)
	}
	c.watch(ctx)
	return nil
}

// Start builds the cluster and returns once the floating IP serves the
// target. Close tears it down.
func Start(ctx context.Context, cfg Config) (_ *Cluster, err error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	if err := Preflight(); err != nil {
		return nil, fmt.Errorf("democluster: %w", err)
	}
	c := &Cluster{cfg: cfg, log: cfg.Logger, Bridge: cfg.Prefix + "br", Host: hostN(cfg.Subnet, 1),
		VIP: netip.PrefixFrom(hostN(cfg.Subnet, 200), cfg.Subnet.Bits())}
	for i, spec := range []struct{ id, role string }{{"n1", "storage"}, {"n2", "storage"}, {"w1", "witness"}} {
		n := &Node{ID: spec.id, Role: spec.role, NS: cfg.Prefix + "-" + spec.id, Addr: hostN(cfg.Subnet, 11+i),
			Dir: filepath.Join(cfg.Dir, spec.id)}
		n.Config, n.Log = filepath.Join(n.Dir, "hasan.yaml"), filepath.Join(cfg.Dir, spec.id+".log")
		c.Nodes = append(c.Nodes, n)
	}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	c.sweep(ctx)
	// A demo cluster starts from nothing: the previous run's CA, Raft log
	// and replicas would make `cluster init` refuse.
	if err := os.RemoveAll(cfg.Dir); err != nil {
		return nil, fmt.Errorf("democluster: %w", err)
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("democluster: %w", err)
	}
	c.say("building the network: bridge %s (%s), namespaces %s-{n1,n2,w1}", c.Bridge, netip.PrefixFrom(c.Host, cfg.Subnet.Bits()), cfg.Prefix)
	if err := c.buildNetwork(ctx); err != nil {
		return nil, err
	}
	c.say("starting simulated Redfish BMCs for n1 and n2 on %s", c.Host)
	if err := c.startBMCs(); err != nil {
		return nil, err
	}
	dctx, dcancel := context.WithCancel(context.Background())
	c.addCleanup(func() error { dcancel(); return nil })
	go c.darkenOnPowerLoss(dctx)
	c.say("creating the cluster: CA, node certificates, `hasan serve` in each namespace")
	if err := c.startNodes(ctx); err != nil {
		return nil, err
	}
	c.say("configuring fencing, a 2-replica volume, target %s and floating IP %s", IQN, c.VIP)
	if err := c.configure(ctx); err != nil {
		return nil, err
	}
	if err := c.waitServing(ctx, 60*time.Second); err != nil {
		return nil, err
	}
	return c, nil
}

func (c *Cluster) say(format string, args ...any) {
	fmt.Fprintf(c.cfg.Out, "demo: "+format+"\n", args...)
}

func (c *Cluster) ip(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("democluster: ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// sweep removes what a previous demo with the same prefix left behind (a
// SIGKILLed demo cannot clean up after itself).
func (c *Cluster) sweep(ctx context.Context) {
	for _, n := range c.Nodes {
		if out, err := exec.CommandContext(ctx, "ip", "netns", "pids", n.NS).Output(); err == nil {
			for _, f := range strings.Fields(string(out)) {
				_ = exec.CommandContext(ctx, "kill", "-9", f).Run()
			}
		}
		_ = exec.CommandContext(ctx, "ip", "netns", "del", n.NS).Run()
	}
	_ = exec.CommandContext(ctx, "ip", "link", "del", c.Bridge).Run()
}

func (c *Cluster) addCleanup(f func() error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cleanups = append(c.cleanups, f)
}

// Close stops every node and BMC and removes the namespaces and the bridge.
func (c *Cluster) Close() error {
	c.mu.Lock()
	fs := c.cleanups
	c.cleanups = nil
	c.mu.Unlock()
	var errs []error
	for i := len(fs) - 1; i >= 0; i-- {
		if err := fs[i](); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (c *Cluster) buildNetwork(ctx context.Context) error {
	bits := fmt.Sprint(c.cfg.Subnet.Bits())
	if err := c.ip(ctx, "link", "add", c.Bridge, "type", "bridge"); err != nil {
		return err
	}
	c.addCleanup(func() error { return c.ip(context.Background(), "link", "del", c.Bridge) })
	if err := c.ip(ctx, "addr", "add", c.Host.String()+"/"+bits, "dev", c.Bridge); err != nil {
		return err
	}
	if err := c.ip(ctx, "link", "set", c.Bridge, "up"); err != nil {
		return err
	}
	for _, n := range c.Nodes {
		if err := ctx.Err(); err != nil {
			return err
		}
		// Not ctx: an `ip netns add` killed half-way leaves /run/netns/NAME
		// behind before the cleanup below is registered (seen when a test
		// cancelled the demo while it built the network).
		if err := c.ip(context.Background(), "netns", "add", n.NS); err != nil {
			return err
		}
		ns := n.NS
		c.addCleanup(func() error { return c.ip(context.Background(), "netns", "del", ns) })
		host := c.hostLink(n)
		steps := [][]string{
			{"link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", n.NS},
			{"link", "set", host, "master", c.Bridge, "up"},
			{"-n", n.NS, "addr", "add", n.Addr.String() + "/" + bits, "dev", "eth0"},
			{"-n", n.NS, "link", "set", "eth0", "up"},
			{"-n", n.NS, "link", "set", "lo", "up"},
		}
		for _, s := range steps {
			if err := c.ip(ctx, s...); err != nil {
				return err
			}
		}
	}
	return nil
}

// startBMCs serves one Redfish double per storage node over TLS on the
// host end of the bridge, with a certificate made for that address; the
// fence devices trust exactly that certificate (no verification is
// switched off).
func (c *Cluster) startBMCs() error {
	cert, caFile, err := c.bmcCertificate()
	if err != nil {
		return err
	}
	for i, n := range c.Nodes {
		if n.Role != "storage" {
			continue
		}
		pw, err := randomHex(12)
		if err != nil {
			return err
		}
		// The node's "power" is its hasan process: sh execs ip, which
		// execs hasan in the namespace, so the BMC's SIGKILL hits hasan.
		cmd := []string{"sh", "-c", fmt.Sprintf("exec ip netns exec %s %s serve --config %s >>%s 2>&1",
			shellQuote(n.NS), shellQuote(c.cfg.Bin), shellQuote(n.Config), shellQuote(n.Log))}
		n.BMC = fencing.NewRedfishDouble(bmcUser, pw, cmd)
		n.bmcAddr = net.JoinHostPort(c.Host.String(), fmt.Sprint(bmcPortBase+i))
		ln, err := tls.Listen("tcp", n.bmcAddr, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
		if err != nil {
			return fmt.Errorf("democluster: BMC of %s: %w", n.ID, err)
		}
		srv := &http.Server{Handler: n.BMC, ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = srv.Serve(ln) }()
		bmc := n.BMC
		c.addCleanup(func() error { bmc.Close(); return srv.Close() })
		n.bmcPassword = pw
		n.bmcCA = caFile
	}
	return nil
}

func (c *Cluster) bmcCertificate() (tls.Certificate, string, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, "", err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: "hasan demo BMC"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(7 * 24 * time.Hour),
		IPAddresses:           []net.IP{c.Host.AsSlice()},
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, "", err
	}
	caFile := filepath.Join(c.cfg.Dir, "bmc-ca.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return tls.Certificate{}, "", fmt.Errorf("democluster: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, caFile, nil
}

func (c *Cluster) writeConfig(n *Node) error {
	if err := os.MkdirAll(n.Dir, 0o700); err != nil {
		return fmt.Errorf("democluster: %w", err)
	}
	a := n.Addr.String()
	y := fmt.Sprintf("node: %s\nrole: %s\ndata_dir: %s\ncluster_listen: %s:%d\napi_listen: %s:%d\nfailure_timeout: %s\nshutdown_timeout: 5s\n",
		n.ID, n.Role, n.Dir, a, clusterPort, a, apiPort, c.cfg.FailureTimeout)
	if n.Role == "storage" {
		y += fmt.Sprintf("replication_listen: %s:%d\nportal_listen: 0.0.0.0:%d\nvip_link: eth0\nvip_label: eth0:hasan\n", a, dataPort, portalPort)
	}
	if err := os.WriteFile(n.Config, []byte(y), 0o600); err != nil {
		return fmt.Errorf("democluster: %w", err)
	}
	return nil
}

// inNS runs a short hasan command in n's namespace.
func (c *Cluster) inNS(ctx context.Context, n *Node, args ...string) error {
	argv := append([]string{"netns", "exec", n.NS, c.cfg.Bin}, args...)
	out, err := exec.CommandContext(ctx, "ip", argv...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("democluster: hasan %s on %s: %w: %s", strings.Join(args, " "), n.ID, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// powerOn boots n. A storage node's power is its BMC's: the node
// "boots" with a clean network (the addresses a reboot would have
// cleared) and its link up.
func (c *Cluster) powerOn(n *Node) error {
	if n.BMC != nil {
		if err := c.resetLink(context.Background(), n); err != nil {
			return err
		}
		return n.BMC.PowerOn()
	}
	log, err := os.OpenFile(n.Log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("democluster: %w", err)
	}
	cmd := exec.Command("ip", "netns", "exec", n.NS, c.cfg.Bin, "serve", "--config", n.Config)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		log.Close()
		return fmt.Errorf("democluster: start %s: %w", n.ID, err)
	}
	log.Close()
	end := make(chan struct{})
	go func() { _ = cmd.Wait(); close(end) }()
	n.proc, n.procEnd = cmd, end
	c.addCleanup(func() error {
		_ = cmd.Process.Kill()
		<-end
		return nil
	})
	return nil
}

func (c *Cluster) hostLink(n *Node) string { return c.cfg.Prefix + "-" + n.ID }

// resetLink gives n's eth0 only its own address and brings its link up.
func (c *Cluster) resetLink(ctx context.Context, n *Node) error {
	bits := fmt.Sprint(c.cfg.Subnet.Bits())
	for _, s := range [][]string{
		{"-n", n.NS, "addr", "flush", "dev", "eth0"},
		{"-n", n.NS, "addr", "add", n.Addr.String() + "/" + bits, "dev", "eth0"},
		{"link", "set", c.hostLink(n), "up"},
	} {
		if err := c.ip(ctx, s...); err != nil {
			return err
		}
	}
	return nil
}

// darkenOnPowerLoss takes a storage node's link down as soon as its
// process dies, whether its BMC powered it off or it crashed: the
// namespace outlives the process, and without this its kernel would keep
// answering ARP for the floating IP the dead node held, so the survivor's
// duplicate-address probe would refuse the address. A dead machine's NIC
// goes dark with it.
func (c *Cluster) darkenOnPowerLoss(ctx context.Context) {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	dark := map[string]bool{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, n := range c.Nodes {
			if n.BMC == nil {
				continue
			}
			on := n.BMC.Powered()
			switch {
			case !on && !dark[n.ID]:
				if err := c.ip(ctx, "link", "set", c.hostLink(n), "down"); err != nil {
					c.log.Warn("democluster: link down", "node", n.ID, "err", err)
				}
				dark[n.ID] = true
			case on:
				dark[n.ID] = false
			}
		}
	}
}

func (c *Cluster) startNodes(ctx context.Context) error {
	for _, n := range c.Nodes {
		if err := c.writeConfig(n); err != nil {
			return err
		}
	}
	n1 := c.Nodes[0]
	if err := c.inNS(ctx, n1, "cluster", "init", "--config", n1.Config, "--name", "demo"); err != nil {
		return err
	}
	for _, n := range c.Nodes[1:] {
		if err := c.inNS(ctx, n1, "cluster", "cert", "--config", n1.Config, "--node", n.ID, "--out", filepath.Join(n.Dir, "tls")); err != nil {
			return err
		}
	}
	c.AdminCerts = filepath.Join(c.cfg.Dir, "admin")
	if err := c.inNS(ctx, n1, "cluster", "cert", "--config", n1.Config, "--admin", "--node", "demo-admin", "--out", c.AdminCerts); err != nil {
		return err
	}
	api, err := adminClient(c.AdminCerts)
	if err != nil {
		return err
	}
	c.api = api
	if err := c.powerOn(n1); err != nil {
		return err
	}
	if err := c.waitAdmin(ctx, n1, true); err != nil {
		return err
	}
	for _, n := range c.Nodes[1:] {
		if err := c.powerOn(n); err != nil {
			return err
		}
		if err := c.waitAdmin(ctx, n, false); err != nil {
			return err
		}
		var tok struct {
			Token string `json:"token"`
		}
		if err := adminCall(ctx, n1.adminSocket(), http.MethodPost, "/token?role="+n.Role+"&ttl=2m", nil, &tok); err != nil {
			return fmt.Errorf("democluster: token for %s: %w", n.ID, err)
		}
		info := map[string]any{"id": n.ID, "role": n.Role,
			"raft_addr": fmt.Sprintf("%s:%d", n.Addr, clusterPort), "api_addr": fmt.Sprintf("%s:%d", n.Addr, apiPort)}
		if n.Role == "storage" {
			info["data_addr"] = fmt.Sprintf("%s:%d", n.Addr, dataPort)
			info["portal_addr"] = fmt.Sprintf("%s:%d", n.Addr, portalPort)
		}
		if err := adminCall(ctx, n1.adminSocket(), http.MethodPost, "/join", map[string]any{"token": tok.Token, "node": info}, nil); err != nil {
			return fmt.Errorf("democluster: join %s: %w", n.ID, err)
		}
	}
	return nil
}

// waitAdmin waits for n's admin socket (and, with leader, for n to lead).
func (c *Cluster) waitAdmin(ctx context.Context, n *Node, leader bool) error {
	deadline := time.Now().Add(30 * time.Second)
	var last error
	for time.Now().Before(deadline) {
		var st struct {
			RaftState string `json:"raft_state"`
		}
		last = adminCall(ctx, n.adminSocket(), http.MethodGet, "/status", nil, &st)
		if last == nil && (!leader || st.RaftState == "Leader") {
			return nil
		}
		if last == nil {
			last = fmt.Errorf("raft state %s", st.RaftState)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return fmt.Errorf("democluster: %s did not come up within 30s (last: %v; log: %s)", n.ID, last, n.Log)
}

func (c *Cluster) configure(ctx context.Context) error {
	api := c.Nodes[0].API()
	for _, n := range c.Nodes {
		if n.BMC == nil {
			continue
		}
		host, port, _ := net.SplitHostPort(n.bmcAddr)
		var p int
		fmt.Sscan(port, &p)
		dev := map[string]any{"type": "redfish", "timeout": "10s", "redfish": map[string]any{
			"host": host, "port": p, "user": bmcUser, "password": n.bmcPassword, "ca_file": n.bmcCA, "system": "1"}}
		if err := c.restCall(ctx, http.MethodPut, api+"/api/v1/fence-devices/bmc-"+n.ID, dev, nil); err != nil {
			return err
		}
		if err := c.restCall(ctx, http.MethodPut, api+"/api/v1/nodes/"+n.ID+"/fence",
			map[string]any{"levels": [][]string{{"bmc-" + n.ID}}}, nil); err != nil {
			return err
		}
	}
	var vol struct {
		UUID string `json:"uuid"`
	}
	if err := c.restCall(ctx, http.MethodPost, api+"/api/v1/volumes", map[string]any{
		"name": "demo", "size": c.cfg.VolumeSize, "thin": true, "replicas": []string{"n1", "n2"}}, &vol); err != nil {
		return err
	}
	c.Volume = vol.UUID
	if err := c.restCall(ctx, http.MethodPost, api+"/api/v1/targets", map[string]any{
		"iqn": IQN, "luns": map[string]string{"0": vol.UUID}}, nil); err != nil {
		return err
	}
	return c.restCall(ctx, http.MethodPost, api+"/api/v1/groups", map[string]any{
		"name": groupName, "vips": []string{c.VIP.String()}, "targets": []string{IQN}, "preferred": []string{"n1", "n2"}}, nil)
}

// Owner is the node that owns the demo group according to the first API
// that answers, "" when none does or the group is released.
func (c *Cluster) Owner(ctx context.Context) string {
	for _, n := range c.Nodes {
		var g struct {
			Owner string `json:"owner"`
		}
		if err := c.restCall(ctx, http.MethodGet, n.API()+"/api/v1/groups/"+groupName, nil, &g); err == nil {
			return g.Owner
		}
	}
	return ""
}

// inSync reports whether every replica of the demo volume is in its ISR.
func (c *Cluster) inSync(ctx context.Context) bool {
	var v struct {
		Replicas []string `json:"replicas"`
		ISR      []string `json:"isr"`
	}
	for _, n := range c.Nodes {
		if err := c.restCall(ctx, http.MethodGet, n.API()+"/api/v1/volumes/"+c.Volume, nil, &v); err == nil {
			return len(v.Replicas) > 0 && len(v.ISR) == len(v.Replicas)
		}
	}
	return false
}

func (c *Cluster) waitServing(ctx context.Context, d time.Duration) error {
	deadline := time.Now().Add(d)
	var syncedSince time.Time
	for time.Now().Before(deadline) {
		// Serving is not enough: until the second replica is in sync, a
		// failover would (rightly) find no candidate. Right after the
		// grant the ISR still reads full while the new primary may be
		// about to drop a replica it could not reach, so the ISR must
		// stay full for a while after the portal answers.
		ok := false
		if c.Owner(ctx) != "" && c.inSync(ctx) {
			conn, err := (&net.Dialer{Timeout: 300 * time.Millisecond}).DialContext(ctx, "tcp", c.Portal())
			if err == nil {
				conn.Close()
				ok = true
			}
		}
		switch {
		case !ok:
			syncedSince = time.Time{}
		case syncedSince.IsZero():
			syncedSince = time.Now()
		case time.Since(syncedSince) >= 2*time.Second:
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	return fmt.Errorf("democluster: the floating portal %s did not come up with both replicas in sync within %v (logs in %s)", c.Portal(), d, c.cfg.Dir)
}

// watch prints the cluster's events as they happen and, when
// PowerOnAfter is set, powers fenced storage nodes back on, until ctx
// ends.
func (c *Cluster) watch(ctx context.Context) {
	var seen uint64
	off := map[string]time.Time{}
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, n := range c.Nodes {
			var evs []struct {
				Seq      uint64    `json:"seq"`
				Time     time.Time `json:"time"`
				Severity string    `json:"severity"`
				Kind     string    `json:"kind"`
				Message  string    `json:"message"`
			}
			if err := c.restCall(ctx, http.MethodGet, n.API()+"/api/v1/events?limit=20", nil, &evs); err != nil {
				continue
			}
			for i := len(evs) - 1; i >= 0; i-- {
				if e := evs[i]; e.Seq > seen {
					seen = e.Seq
					fmt.Fprintf(c.cfg.Out, "event %s %-5s %-14s %s\n", e.Time.Format("15:04:05.000"), e.Severity, e.Kind, e.Message)
				}
			}
			break
		}
		for _, n := range c.Nodes {
			if n.BMC == nil || c.cfg.PowerOnAfter <= 0 {
				continue
			}
			if n.BMC.Powered() {
				delete(off, n.ID)
				continue
			}
			if _, ok := off[n.ID]; !ok {
				off[n.ID] = time.Now()
				c.say("%s is powered off; its simulated BMC powers it back on in %v", n.ID, c.cfg.PowerOnAfter)
			} else if time.Since(off[n.ID]) >= c.cfg.PowerOnAfter {
				if err := c.powerOn(n); err != nil {
					c.say("power on %s: %v", n.ID, err)
				} else {
					c.say("%s powered back on; once it is up, return it to service: hasan node online %s --api %s --cert-dir %s", n.ID, n.ID, c.Nodes[0].API(), c.AdminCerts)
				}
				delete(off, n.ID)
			}
		}
	}
}

func adminCall(ctx context.Context, socket, method, path string, in, out any) error {
	cl := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}}
	defer cl.CloseIdleConnections()
	return doJSON(ctx, cl, method, "http://admin"+path, in, out)
}

func (c *Cluster) restCall(ctx context.Context, method, url string, in, out any) error {
	if c.api == nil {
		return errors.New("democluster: REST API called before the admin certificate exists")
	}
	defer c.api.CloseIdleConnections()
	return doJSON(ctx, c.api, method, url, in, out)
}

// adminClient is an HTTPS client presenting the administrator certificate
// in dir and trusting the cluster CA's node certificates (which name
// "hasan-cluster", not their address).
func adminClient(dir string) (*http.Client, error) {
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		return nil, fmt.Errorf("democluster: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("democluster: admin ca.crt holds no certificate")
	}
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, "node.crt"), filepath.Join(dir, "node.key"))
	if err != nil {
		return nil, fmt.Errorf("democluster: %w", err)
	}
	// A powered-off node's address does not answer at all: fail the dial
	// fast so that callers move on to the next node.
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: (&net.Dialer{Timeout: 500 * time.Millisecond}).DialContext,
		TLSClientConfig: &tls.Config{RootCAs: roots, Certificates: []tls.Certificate{pair},
			ServerName: "hasan-cluster", MinVersion: tls.VersionTLS12},
	}}, nil
}

func doJSON(ctx context.Context, cl *http.Client, method, url string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = strings.NewReader(string(b))
	}
	req, err := http.NewRequestWithContext(ctx, method, url, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := cl.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("democluster: %s %s: %s: %s", method, url, resp.Status, strings.TrimSpace(string(raw)))
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(raw, out); err != nil {
		return fmt.Errorf("democluster: %s %s: %w", method, url, err)
	}
	return nil
}

func randomHex(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return fmt.Sprintf("%x", b), nil
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }
