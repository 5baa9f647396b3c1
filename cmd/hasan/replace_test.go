package main

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/webui"
)

// replicaStateService adds webui.ReplicaService to stateService: the
// volume-replicas command goes through the cluster's own Apply, and node
// replace is webui's own sequence over it.
type replicaStateService struct{ *stateService }

func (s replicaStateService) SetVolumeReplicas(ctx context.Context, uuid string, req webui.ReplicasRequest) (cluster.Volume, error) {
	if err := s.write(&cluster.Command{Kind: cluster.KindVolumeReplicas,
		VolumeReplicas: &cluster.VolumeReplicasCmd{UUID: uuid, Remove: req.Remove, Add: req.Add}}); err != nil {
		return cluster.Volume{}, err
	}
	return s.Volume(ctx, uuid)
}

func (s replicaStateService) ReplaceNode(ctx context.Context, node string, req webui.ReplaceNodeRequest) (webui.ReplaceNodeResult, error) {
	return webui.ReplaceNode(ctx, s, node, req)
}

func TestReplaceCLI(t *testing.T) {
	svc := newStateService()
	for _, id := range []string{"n3", "n4"} {
		if err := svc.write(&cluster.Command{Kind: cluster.KindNodeAdd, NodeAdd: &cluster.NodeAddCmd{Node: cluster.NodeInfo{
			ID: id, Role: cluster.RoleStorage, RaftAddr: "127.0.0.1:70" + id[1:] + "9"}}}); err != nil {
			t.Fatal(err)
		}
	}
	c := &cli{t: t, api: apiServer(t, replicaStateService{svc}).URL}
	c.ok("volume", "create", "--name", "db", "--size", "8M", "--replicas", "n1,n2")
	c.ok("volume", "create", "--name", "logs", "--size", "8M", "--replicas", "n2,n1")
	volume := func(name string) cluster.Volume {
		var v cluster.Volume
		if err := json.Unmarshal([]byte(c.ok("volume", "show", name, "--json")), &v); err != nil {
			t.Fatal(err)
		}
		return v
	}

	// Flag mistakes are caught before any request, with the fix.
	c.fails([]string{"volume", "replicas", "db"}, "--replace OLD --with NEW")
	c.fails([]string{"volume", "replicas", "db", "--replace", "n2"}, "go together")
	c.fails([]string{"volume", "replicas", "db", "--replace", "n2", "--with", "n3", "--add", "n4"}, "drop --add")
	c.fails([]string{"node", "replace", "n2"}, "--with")
	c.fails([]string{"node", "replace", "n2", "--with", "n2"}, "itself")

	out := c.ok("volume", "replicas", "db", "--replace", "n2", "--with", "n3")
	if !strings.Contains(out, "replicas n1,n3, isr n1") || !strings.Contains(out, "n3 is syncing") {
		t.Fatalf("volume replicas output: %s", out)
	}
	if v := volume("db"); !slices.Equal(v.Replicas, []string{"n1", "n3"}) || !slices.Equal(v.ISR, []string{"n1"}) {
		t.Fatalf("db after replace: %+v", v)
	}
	// The cluster's refusals come back naming the fix.
	c.fails([]string{"volume", "replicas", "db", "--replace", "n1", "--with", "n4"}, "primary", "n1")
	c.fails([]string{"volume", "replicas", "db", "--add", "w1"}, "witness")
	c.fails([]string{"volume", "replicas", "db", "--add", "n3"}, "already holds")
	c.ok("volume", "replicas", "db", "--add", "n4")
	c.ok("volume", "replicas", "db", "--remove", "n4")
	if v := volume("db"); !slices.Equal(v.Replicas, []string{"n1", "n3"}) {
		t.Fatalf("db after add and remove: %+v", v)
	}

	// n2 is the primary of logs: node replace changes nothing and names it.
	c.fails([]string{"node", "replace", "n2", "--with", "n4", "--remove"}, "logs", "primary", "group move", "nothing was changed")
	if v := volume("logs"); !slices.Equal(v.Replicas, []string{"n2", "n1"}) {
		t.Fatalf("refused node replace changed logs: %+v", v)
	}
	// n1 holds replicas of both but is db's primary too.
	c.fails([]string{"node", "replace", "n1", "--with", "n4"}, "db")
	// n3 (replica of db only) is replaced by n4 and removed.
	out = c.ok("node", "replace", "n3", "--with", "n4", "--remove")
	if !strings.Contains(out, "replica n3 replaced by n4") || !strings.Contains(out, "node n3 removed") {
		t.Fatalf("node replace output: %s", out)
	}
	if v := volume("db"); !slices.Equal(v.Replicas, []string{"n1", "n4"}) {
		t.Fatalf("db after node replace: %+v", v)
	}
	c.fails([]string{"node", "show", "n3"}, "n3")
}
