package cluster

import (
	"context"
	"crypto/tls"
	"encoding/gob"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/test/lab"
)

// E2EEnv gates the scenarios: they build namespaces, run three daemons and
// two BMCs, and take tens of seconds each.
const E2EEnv = "HASAN_CLUSTER_E2E"

func requireE2E(t *testing.T) {
	t.Helper()
	if os.Getenv(E2EEnv) != "1" {
		t.Skip("cluster end-to-end scenarios in network namespaces: set " + E2EEnv + "=1 (root, ipmi_sim, ipmitool) to run them")
	}
}

// nodeConf is what the harness knows of one `hasan serve` node.
type nodeConf struct {
	ID, Role string
	Dir      string // data_dir
	Config   string // YAML path
	Raft     string // cluster address
	Data     string // replication address (storage)
}

func (c nodeConf) adminSocket() string { return filepath.Join(c.Dir, "admin.sock") }

func (c nodeConf) nodeInfo(portal string) cluster.NodeInfo {
	n := cluster.NodeInfo{ID: c.ID, Role: cluster.Role(c.Role), RaftAddr: c.Raft}
	if c.Role == string(cluster.RoleStorage) {
		n.DataAddr, n.PortalAddr = c.Data, portal
	}
	return n
}

// writeConfig writes node's YAML. The data directory is under /tmp, not
// t.TempDir, because the admin socket path must fit in 108 bytes.
func writeConfig(t *testing.T, root string, n *lab.Node, role string, failure time.Duration) nodeConf {
	t.Helper()
	id := n.NodeName()
	c := nodeConf{ID: id, Role: role, Dir: filepath.Join(root, id), Raft: n.Addr.Addr().String() + ":7400"}
	if err := os.MkdirAll(c.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	y := fmt.Sprintf("node: %s\nrole: %s\ndata_dir: %s\ncluster_listen: %s\napi_listen: \"off\"\nfailure_timeout: %s\nshutdown_timeout: 5s\n",
		id, role, c.Dir, c.Raft, failure)
	if role == string(cluster.RoleStorage) {
		c.Data = n.Addr.Addr().String() + ":7401"
		y += fmt.Sprintf("replication_listen: %s\nportal_listen: 0.0.0.0:3260\nvip_link: eth0\nvip_label: eth0:hasan\n", c.Data)
	}
	c.Config = filepath.Join(c.Dir, "hasan.yaml")
	if err := os.WriteFile(c.Config, []byte(y), 0o600); err != nil {
		t.Fatal(err)
	}
	return c
}

// adminCall is one request to a node's local admin socket (a unix socket:
// reachable from the test whatever the node's network namespace).
func adminCall(ctx context.Context, socket, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = strings.NewReader(string(b))
	}
	cl := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}}
	defer cl.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, method, "http://admin"+path, body)
	if err != nil {
		return err
	}
	resp, err := cl.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, strings.TrimSpace(string(raw)))
	}
	if out == nil {
		return nil
	}
	return json.Unmarshal(raw, out)
}

type status struct {
	Node      string         `json:"node"`
	RaftState string         `json:"raft_state"`
	Leader    string         `json:"leader"`
	State     *cluster.State `json:"state"`
}

func getStatus(ctx context.Context, c nodeConf) (*status, error) {
	var st status
	if err := adminCall(ctx, c.adminSocket(), http.MethodGet, "/status", nil, &st); err != nil {
		return nil, err
	}
	return &st, nil
}

// proposer sends commands to the Raft leader the way a follower forwards
// its proposals (tag 0xF0 on the mutual-TLS cluster port, gob request and
// reply), with a certificate of its own from the cluster CA. Neither the
// REST API nor the admin socket can configure fence devices or node fence
// topologies yet, so the harness goes through this path for every setup
// command.
type proposer struct {
	tls  *tls.Config
	dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

const tagForward = 0xF0

// The wire types of cluster's forwarding (fields matched by name by gob).
type forwardRequest struct{ Cmd []byte }

type forwardResponse struct {
	Value any
	Code  string
	Msg   string
}

func (p *proposer) propose(ctx context.Context, leaderAddr string, c *cluster.Command) error {
	if c.At.IsZero() {
		c.At = time.Now()
	}
	b, err := c.Encode()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	raw, err := p.dial(ctx, "tcp", leaderAddr)
	if err != nil {
		return fmt.Errorf("dial leader %s: %w", leaderAddr, err)
	}
	conn := tls.Client(raw, p.tls)
	defer conn.Close()
	dl, _ := ctx.Deadline()
	_ = conn.SetDeadline(dl)
	if err := conn.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("tls to %s: %w", leaderAddr, err)
	}
	if _, err := conn.Write([]byte{tagForward}); err != nil {
		return err
	}
	if err := gob.NewEncoder(conn).Encode(forwardRequest{Cmd: b}); err != nil {
		return err
	}
	var resp forwardResponse
	if err := gob.NewDecoder(conn).Decode(&resp); err != nil {
		return fmt.Errorf("forward reply: %w", err)
	}
	if resp.Code != "" || resp.Msg != "" {
		return fmt.Errorf("%s: %s (%s)", c.Kind, resp.Msg, resp.Code)
	}
	return nil
}

// harnessCert issues the harness's certificate from the cluster CA on the
// init node into dir: an operator (admin) certificate, which the leader
// accepts forwarded proposals from. A binary older than `cluster cert
// --admin` accepted any CA-signed certificate: then a plain one.
func harnessCert(ctx context.Context, on *lab.Node, bin, config, dir string) error {
	out, err := on.Run(ctx, bin, "cluster", "cert", "--config", config, "--node", "e2e-harness", "--admin", "--out", dir)
	if err != nil && strings.Contains(out, "unknown flag: --admin") {
		out, err = on.Run(ctx, bin, "cluster", "cert", "--config", config, "--node", "e2e-harness", "--out", dir)
	}
	if err != nil {
		return fmt.Errorf("cluster cert e2e-harness: %w\n%s", err, out)
	}
	return nil
}

func waitFor(t *testing.T, ctx context.Context, d time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(d)
	var last error
	for {
		ok, err := cond()
		if ok {
			return
		}
		if err != nil {
			last = err
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			t.Fatalf("timed out after %v waiting for %s (last error: %v)", d, what, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
