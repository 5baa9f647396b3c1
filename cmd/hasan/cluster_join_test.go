package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	yaml "go.yaml.in/yaml/v3"

	"github.com/hasan-storage/hasan/cluster"
)

// runCLI runs the hasan cluster command with args and returns its stdout.
func runCLI(ctx context.Context, args ...string) (string, error) {
	cmd := newClusterCmd()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	err := cmd.ExecuteContext(ctx)
	return out.String(), err
}

// TestClusterNetworkJoin: `cluster token` on the init node and `cluster
// join --token` on a node with no certificate at all; the new node then
// serves as a voter of a cluster that had a single node (so it is added
// as a non-voter first: the one-node cluster keeps its quorum meanwhile).
func TestClusterNetworkJoin(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	mk := func(id string) (*serveConfig, string) {
		dir, err := os.MkdirTemp("", "hj-"+id)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		c := &serveConfig{Node: id, Role: "storage", DataDir: dir, ClusterListen: freeAddr(t), APIListen: "off",
			ReplicationListen: freeAddr(t), PortalListen: freeAddr(t), VIPLink: "lo-test", ShutdownTimeout: 5 * time.Second}
		c.setDefaults()
		if err := c.Validate(); err != nil {
			t.Fatal(err)
		}
		b, err := yaml.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, "hasan.yaml")
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return c, path
	}
	c1, p1 := mk("n1")
	c2, p2 := mk("n2")
	if _, err := runCLI(ctx, "init", "--config", p1); err != nil {
		t.Fatal(err)
	}
	s1, err := startServer(c1, serveOptions{VIPs: &fakeVIPs{}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s1.Close() })
	waitFor(t, 10*time.Second, "n1 to lead", s1.node.IsLeader)

	tok, err := runCLI(ctx, "token", "--config", p1, "--ttl", "1m")
	if err != nil {
		t.Fatal(err)
	}
	tok = strings.TrimSpace(tok)
	tk, err := cluster.ParseJoinTicket(tok)
	if err != nil || tk.CAHash == "" || tk.Addr != c1.clusterAdvertise() {
		t.Fatalf("ticket %+v: %v", tk, err)
	}
	out, err := runCLI(ctx, "join", "--config", p2, "--token", tok)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out, tk.Secret) {
		t.Fatal("join printed the secret")
	}
	for _, f := range []string{caCertFile, nodeCertFile, nodeKeyFile} {
		if _, err := os.Stat(filepath.Join(c2.tlsDir(), f)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat(filepath.Join(c2.tlsDir(), caKeyFile)); err == nil {
		t.Fatal("the CA key was handed to the new node")
	}
	// Running join again: the node already has an identity.
	if _, err := runCLI(ctx, "join", "--config", p2, "--token", tok); err == nil || !strings.Contains(err.Error(), "already has a cluster identity") {
		t.Fatalf("second join: %v", err)
	}
	// The raft leader keeps leading while n2 is not up yet.
	time.Sleep(time.Second)
	if !s1.node.IsLeader() {
		t.Fatal("n1 lost leadership before n2 started")
	}

	s2, err := startServer(c2, serveOptions{VIPs: &fakeVIPs{}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s2.Close() })
	waitFor(t, 15*time.Second, "n2 to be a voter that has the state", func() bool {
		cf := s1.node.Raft().GetConfiguration()
		if cf.Error() != nil {
			return false
		}
		voter := false
		for _, s := range cf.Configuration().Servers {
			voter = voter || s.ID == "n2" && s.Suffrage == raft.Voter
		}
		return voter && s2.node.FSM().State().Nodes["n2"] != nil && s2.node.FSM().State().Nodes["n1"] != nil
	})
	// n2's certificate makes it a member: its proposals are forwarded.
	if _, err := s2.node.Propose(ctx, &cluster.Command{Kind: cluster.KindEvent, Event: &cluster.EventCmd{Event: cluster.Event{Kind: "test", Node: "n2", Message: "hello"}}}); err != nil {
		t.Fatalf("propose through n2: %v", err)
	}
}
