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

// lastLine is a command's last output line (runCLI mixes in stderr).
func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// testNodeConfig writes a node's configuration to a fresh data dir.
func testNodeConfig(t *testing.T, id, role string) (*serveConfig, string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "hj-"+id)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	c := &serveConfig{Node: id, Role: role, DataDir: dir, ClusterListen: freeAddr(t), APIListen: "off",
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

// TestClusterNetworkJoin: `cluster token` on the init node and `cluster
// join --token` on a node with no certificate at all; the new node then
// serves as a voter of a cluster that had a single node (so it is added
// as a non-voter first: the one-node cluster keeps its quorum meanwhile).
// Joined as storage, it holds the CA key and its own tokens name itself;
// without the key, its tokens name a member that has it.
func TestClusterNetworkJoin(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c1, p1 := testNodeConfig(t, "n1", "storage")
	c2, p2 := testNodeConfig(t, "n2", "storage")
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
	tok = lastLine(tok)
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
	// A storage node receives the CA key, readable by its owner only.
	key1, err := os.ReadFile(filepath.Join(c1.tlsDir(), caKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	key2Path := filepath.Join(c2.tlsDir(), caKeyFile)
	key2, err := os.ReadFile(key2Path)
	if err != nil || !bytes.Equal(key1, key2) {
		t.Fatalf("n2 did not receive the CA key: %v", err)
	}
	if st, err := os.Stat(key2Path); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("n2's ca.key: %v %v", st.Mode(), err)
	}
	if !strings.Contains(out, "it can admit joins") {
		t.Fatalf("join output does not say the node holds the CA key: %q", out)
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

	// n2 holds the key: its tokens name itself.
	tok2, err := runCLI(ctx, "token", "--config", p2, "--ttl", "1m")
	if err != nil {
		t.Fatal(err)
	}
	if tk2, err := cluster.ParseJoinTicket(lastLine(tok2)); err != nil || tk2.Addr != c2.clusterAdvertise() {
		t.Fatalf("n2's ticket %+v (%v): want n2's address %s", tk2, err, c2.clusterAdvertise())
	}
	// Without the file (as on a node of an older cluster) n2 names n1,
	// the storage member that answers as a key holder.
	if err := os.Remove(key2Path); err != nil {
		t.Fatal(err)
	}
	tok3, err := runCLI(ctx, "token", "--config", p2, "--ttl", "1m")
	if err != nil {
		t.Fatal(err)
	}
	if tk3, err := cluster.ParseJoinTicket(lastLine(tok3)); err != nil || tk3.Addr != c1.clusterAdvertise() {
		t.Fatalf("n2's ticket without the key %+v (%v): want n1's address %s", tk3, err, c1.clusterAdvertise())
	}
	if !strings.Contains(tok3, "names n1") {
		t.Fatalf("token does not say which member it names: %q", tok3)
	}
	// With n1 gone nobody holds it: the error says what to do, and no
	// token is printed.
	s1.Close()
	out, err = runCLI(ctx, "token", "--config", p2, "--ttl", "1m")
	if err == nil || !strings.Contains(err.Error(), "n1 at "+c1.clusterAdvertise()+": unreachable") ||
		!strings.Contains(err.Error(), "cluster ca import") || strings.Contains(out, "hsn1.") {
		t.Fatalf("token with no key holder: %q, %v", out, err)
	}
}
