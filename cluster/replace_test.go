package cluster

import (
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/hasan-storage/hasan/replication"
)

func cReplicas(uuid, remove, add string) *Command {
	return &Command{Kind: KindVolumeReplicas, VolumeReplicas: &VolumeReplicasCmd{UUID: uuid, Remove: remove, Add: add}}
}

// TestVolumeReplicasRules: the rules of volume-replicas at the apply
// level, on the fixture (u1 on a,b and u2 on a,b,c, both primary a, in
// group g1 owned by a) plus a spare storage node d. A refused command
// leaves the state untouched.
func TestVolumeReplicasRules(t *testing.T) {
	base := append(fixtureCommands(), cNodeAdd("d", RoleStorage, "127.0.0.1:7005"))
	type tc struct {
		name  string
		pre   []*Command
		cmd   *Command
		want  error
		msg   string // the refusal names what to fix
		check func(t *testing.T, v *Volume, s *State)
	}
	tests := []tc{
		{name: "replace", cmd: cReplicas(u1, "b", "d"), check: func(t *testing.T, v *Volume, s *State) {
			if !slices.Equal(v.Replicas, []string{"a", "d"}) || !slices.Equal(v.ISR, []string{"a"}) {
				t.Fatalf("replicas %v isr %v, want [a d] and [a]: d joins the ISR only by catching up", v.Replicas, v.ISR)
			}
			if v.Primary != "a" || v.Epoch != 2 {
				t.Fatalf("primary %s epoch %d changed", v.Primary, v.Epoch)
			}
			if e := s.Events[len(s.Events)-1]; e.Kind != "volume-replicas" || e.Group != "g1" || !strings.Contains(e.Message, "replaced by d") {
				t.Fatalf("event %+v", e)
			}
		}},
		{name: "replace a replica already out of the ISR", pre: []*Command{cISRRemove(u2, 2, "a", "c")}, cmd: cReplicas(u2, "c", "d"),
			check: func(t *testing.T, v *Volume, _ *State) {
				if !slices.Equal(v.Replicas, []string{"a", "b", "d"}) || !slices.Equal(v.ISR, []string{"a", "b"}) {
					t.Fatalf("replicas %v isr %v", v.Replicas, v.ISR)
				}
			}},
		{name: "replace with a standby node", pre: []*Command{cSetState("d", NodeStandby)}, cmd: cReplicas(u1, "b", "d")},
		{name: "add a third replica", cmd: cReplicas(u1, "", "c"), check: func(t *testing.T, v *Volume, _ *State) {
			if !slices.Equal(v.Replicas, []string{"a", "b", "c"}) || !slices.Equal(v.ISR, []string{"a", "b"}) {
				t.Fatalf("replicas %v isr %v", v.Replicas, v.ISR)
			}
		}},
		{name: "remove the third replica", cmd: cReplicas(u2, "c", ""), check: func(t *testing.T, v *Volume, _ *State) {
			if !slices.Equal(v.Replicas, []string{"a", "b"}) || !slices.Equal(v.ISR, []string{"a", "b"}) {
				t.Fatalf("replicas %v isr %v", v.Replicas, v.ISR)
			}
		}},
		{name: "old is the primary", cmd: cReplicas(u1, "a", "d"), want: ErrInUse, msg: "move group g1"},
		{name: "old is the primary of a volume in no group", pre: []*Command{cVol(u3, "b", "b", "c")}, cmd: cReplicas(u3, "b", "d"), want: ErrInUse, msg: "primary"},
		{name: "old holds no replica", cmd: cReplicas(u1, "c", "d"), want: ErrNotFound, msg: "holds no replica"},
		{name: "new already a replica", cmd: cReplicas(u2, "c", "b"), want: ErrExists, msg: "already holds"},
		{name: "new unknown", cmd: cReplicas(u1, "b", "zz"), want: ErrNotFound, msg: "join it"},
		{name: "new a witness", cmd: cReplicas(u1, "b", "w"), want: ErrInvalid, msg: "witness"},
		{name: "new in maintenance", pre: []*Command{cSetState("d", NodeMaintenance)}, cmd: cReplicas(u1, "b", "d"), want: ErrNodeState, msg: "set it online"},
		{name: "new replaces itself", cmd: cReplicas(u1, "b", "b"), want: ErrInvalid},
		{name: "nothing to do", cmd: cReplicas(u1, "", ""), want: ErrInvalid},
		{name: "unknown volume", cmd: cReplicas(u3, "b", "d"), want: ErrNotFound},
		{name: "group moving to old", pre: []*Command{cMove("g1", "b")}, cmd: cReplicas(u1, "b", "d"), want: ErrInUse, msg: "moving to node b"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newApplier(t, append(slices.Clone(base), tt.pre...)...)
			before := a.st.Clone()
			res, err := a.apply(tt.cmd)
			if tt.want != nil {
				if !errors.Is(err, tt.want) {
					t.Fatalf("error %v, want %v", err, tt.want)
				}
				if tt.msg != "" && !strings.Contains(err.Error(), tt.msg) {
					t.Fatalf("error %q does not say %q", err, tt.msg)
				}
				if !reflect.DeepEqual(before, a.st) {
					t.Fatal("refused command changed the state")
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			v := a.st.Volumes[tt.cmd.VolumeReplicas.UUID]
			if got, ok := res.(Volume); !ok || !reflect.DeepEqual(got, *v) {
				t.Fatalf("result %#v, want the new volume %+v", res, v)
			}
			if tt.check != nil {
				tt.check(t, v, a.st)
			}
		})
	}
}

// TestVolumeReplicasThenCatchUp: after a replacement, the old node can
// neither be added back to the ISR by the primary (whose session may not
// know the new set yet) nor take the group; the new node enters the ISR
// only with a catch-up proof, and can then own the group; the old node,
// holding no replica any more, can be removed from the cluster.
func TestVolumeReplicasThenCatchUp(t *testing.T) {
	a := newApplier(t, append(fixtureCommands(), cNodeAdd("d", RoleStorage, "127.0.0.1:7005"))...)
	must := func(c *Command) {
		t.Helper()
		if _, err := a.apply(c); err != nil {
			t.Fatalf("%s: %v", c.Kind, err)
		}
	}
	refused := func(c *Command, want error) {
		t.Helper()
		if _, err := a.apply(c); !errors.Is(err, want) {
			t.Fatalf("%s: error %v, want %v", c.Kind, err, want)
		}
	}
	good := replication.CatchUp{PrimaryGen: 9, ReplicaGen: 9}
	refused(&Command{Kind: KindNodeRemove, NodeRemove: &NodeRemoveCmd{ID: "b"}}, ErrInUse)
	must(cReplicas(u1, "b", "d"))
	must(cReplicas(u2, "b", "d"))
	refused(cISRAdd(u1, 2, "a", "b", good), ErrInvalid)
	refused(cMove("g1", "d"), replication.ErrNotInISR)
	refused(cMove("g1", "b"), replication.ErrNotInISR)
	refused(cISRAdd(u1, 2, "a", "d", replication.CatchUp{PrimaryGen: 9, ReplicaGen: 9, DirtyBytes: 4096}), replication.ErrNotCaughtUp)
	must(cISRAdd(u1, 2, "a", "d", good))
	must(cISRAdd(u2, 2, "a", "d", good))
	must(cMove("g1", "d"))
	must(&Command{Kind: KindNodeRemove, NodeRemove: &NodeRemoveCmd{ID: "b"}})
	if vs := a.st.VolumesOf("d"); !slices.Equal(vs, []string{u1, u2}) {
		t.Fatalf("VolumesOf(d) = %v", vs)
	}
}
