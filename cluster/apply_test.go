package cluster

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/fencing"
	"github.com/hasan-storage/hasan/replication"
	"github.com/hasan-storage/hasan/target/scsi"
)

var t0 = time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)

const (
	u1   = "00000000-0000-4000-8000-000000000001"
	u2   = "00000000-0000-4000-8000-000000000002"
	u3   = "00000000-0000-4000-8000-000000000003"
	iqn1 = "iqn.2025-01.org.hasan:t1"
	iqn2 = "iqn.2025-01.org.hasan:t2"
)

// Command constructors keep the tables short.
func cNodeAdd(id string, role Role, addr string) *Command {
	return &Command{Kind: KindNodeAdd, NodeAdd: &NodeAddCmd{Node: NodeInfo{ID: id, Role: role, RaftAddr: addr}}}
}
func cSetState(id string, st NodeState) *Command {
	return &Command{Kind: KindNodeSetState, NodeSetState: &NodeSetStateCmd{ID: id, State: st}}
}
func cSetFence(id string, levels ...[]string) *Command {
	return &Command{Kind: KindNodeSetFence, NodeSetFence: &NodeSetFenceCmd{ID: id, Topology: fencing.NodeTopology{Levels: levels}}}
}
func cVol(uuid, primary string, replicas ...string) *Command {
	return &Command{Kind: KindVolumeCreate, VolumeCreate: &VolumeCreateCmd{UUID: uuid, Name: "v", Size: 1 << 20, Primary: primary, Replicas: replicas}}
}
func cVolGen(uuid string, gen uint64, primary string, replicas ...string) *Command {
	c := cVol(uuid, primary, replicas...)
	c.VolumeCreate.CreationGen = gen
	return c
}
func cISRRemove(vol string, epoch uint64, primary, replica string) *Command {
	return &Command{Kind: KindISRRemove, ISRRemove: &ISRRemoveCmd{Volume: vol, Epoch: epoch, Primary: primary, Replica: replica}}
}
func cISRAdd(vol string, epoch uint64, primary, replica string, p replication.CatchUp) *Command {
	return &Command{Kind: KindISRAdd, ISRAdd: &ISRAddCmd{Volume: vol, Epoch: epoch, Primary: primary, Replica: replica, Proof: p}}
}
func cTarget(t Target) *Command {
	return &Command{Kind: KindTargetPut, TargetPut: &TargetPutCmd{Target: t}}
}
func cGroup(g Group) *Command { return &Command{Kind: KindGroupPut, GroupPut: &GroupPutCmd{Group: g}} }
func cGrant(g, n string) *Command {
	return &Command{Kind: KindGroupGrant, GroupGrant: &GroupGrantCmd{Group: g, Node: n}}
}
func cMove(g, n string) *Command {
	return &Command{Kind: KindGroupMove, GroupMove: &GroupMoveCmd{Group: g, Node: n}}
}
func cRelease(g, n string, e uint64) *Command {
	return &Command{Kind: KindGroupRelease, GroupRelease: &GroupReleaseCmd{Group: g, Node: n, Epoch: e}}
}
func cTakeover(g, from, to string, detected time.Time) *Command {
	return &Command{Kind: KindTakeover, Takeover: &TakeoverCmd{Group: g, From: from, To: to, DetectedAt: detected}}
}
func cFenceRec(node string, at time.Time, ok bool) *Command {
	out := fencing.OutcomeSuccess
	if !ok {
		out = fencing.OutcomeFailure
	}
	return &Command{Kind: KindFenceRecord, FenceRecord: &FenceRecordCmd{Record: fencing.Record{Time: at, Node: node, Level: 1, Device: "bmc-" + node, Action: "off", Outcome: out}}}
}
func cConns(g, n string, e uint64, conns ...InitiatorConn) *Command {
	return &Command{Kind: KindGroupConns, GroupConns: &GroupConnsCmd{Group: g, Node: n, Epoch: e, Conns: conns}}
}
func cMoveCancel(g, n string) *Command {
	return &Command{Kind: KindGroupMoveCancel, GroupMoveCancel: &GroupMoveCancelCmd{Group: g, Node: n}}
}
func cFenceConfirm(n, by string) *Command {
	return &Command{Kind: KindFenceConfirm, FenceConfirm: &FenceConfirmCmd{Node: n, Operator: by}}
}
func ic(local, remote string) InitiatorConn { return InitiatorConn{Local: local, Remote: remote} }
func cDevice(name, cfg string) *Command {
	return &Command{Kind: KindFenceDevicePut, FenceDevicePut: &FenceDevicePutCmd{Name: name, Config: []byte(cfg)}}
}
func cToken(hash string, role Role, exp time.Time) *Command {
	return &Command{Kind: KindTokenIssue, TokenIssue: &TokenIssueCmd{Hash: hash, ID: hash[:6], Role: role, Expires: exp}}
}
func cJoin(hash, id string, role Role, addr string) *Command {
	return &Command{Kind: KindJoin, Join: &JoinCmd{Hash: hash, Node: NodeInfo{ID: id, Role: role, RaftAddr: addr}}}
}

func ipmiCfg(pw string) string {
	return `{"type":"ipmi","ipmi":{"host":"127.0.0.1","user":"admin","password":"` + pw + `"}}`
}

var (
	hashA = fmt.Sprintf("%064x", 0xa)
	hashB = fmt.Sprintf("%064x", 0xb)
)

// fixture: storage nodes a, b, c and witness w; fence devices; volumes u1
// (a,b) and u2 (a,b,c); target t1 exporting both; group g1 owned by a.
func fixtureCommands() []*Command {
	return []*Command{
		cDevice("bmc-a", ipmiCfg("pw-of-a")),
		cDevice("bmc-b", ipmiCfg("pw-of-b")),
		cNodeAdd("a", RoleStorage, "127.0.0.1:7001"),
		cNodeAdd("b", RoleStorage, "127.0.0.1:7002"),
		cNodeAdd("c", RoleStorage, "127.0.0.1:7003"),
		cNodeAdd("w", RoleWitness, "127.0.0.1:7004"),
		cSetFence("a", []string{"bmc-a"}),
		cSetFence("b", []string{"bmc-b"}),
		cVol(u1, "a", "a", "b"),
		cVolGen(u2, 0x5eed, "a", "a", "b", "c"), // snapshots keep the creation generation
		cTarget(Target{IQN: iqn1, LUNs: map[uint64]string{0: u1, 1: u2},
			CHAP: &CHAP{User: "alice", Secret: "s3cret-s3cret"}}),
		cGroup(Group{Name: "g1", VIPs: []string{"192.0.2.10/24"}, Targets: []string{iqn1}, Preferred: []string{"a", "b"}}),
		cGrant("g1", "a"),
	}
}

type applier struct {
	st *State
	at time.Time
}

func newApplier(t *testing.T, cmds ...*Command) *applier {
	t.Helper()
	a := &applier{st: NewState(), at: t0}
	for i, c := range cmds {
		if _, err := a.apply(c); err != nil {
			t.Fatalf("setup command %d (%s): %v", i, c.Kind, err)
		}
	}
	return a
}

// apply stamps the command like a proposer would and round-trips it
// through the log encoding first.
func (a *applier) apply(c *Command) (any, error) {
	a.at = a.at.Add(time.Second)
	cc := *c
	if cc.At.IsZero() {
		cc.At = a.at
	}
	b, err := cc.Encode()
	if err != nil {
		return nil, err
	}
	dc, err := DecodeCommand(b)
	if err != nil {
		return nil, err
	}
	return a.st.Apply(dc)
}

func TestApplyTable(t *testing.T) {
	goodProof := replication.CatchUp{PrimaryGen: 7, ReplicaGen: 7}
	type tc struct {
		name  string
		pre   []*Command
		cmd   *Command
		want  error // nil: success
		check func(t *testing.T, s *State)
	}
	tests := []tc{
		// nodes
		{name: "node add", cmd: cNodeAdd("d", RoleStorage, "127.0.0.1:7005"), check: func(t *testing.T, s *State) {
			if n := s.Nodes["d"]; n == nil || n.State != NodeOnline || n.JoinedAt.IsZero() {
				t.Fatalf("node d = %+v", n)
			}
		}},
		{name: "node add duplicate id", cmd: cNodeAdd("a", RoleStorage, "127.0.0.1:7009"), want: ErrExists},
		{name: "node add duplicate raft addr", cmd: cNodeAdd("d", RoleStorage, "127.0.0.1:7001"), want: ErrExists},
		{name: "node add bad role", cmd: cNodeAdd("d", "king", "127.0.0.1:7005"), want: ErrInvalid},
		{name: "node add bad addr", cmd: cNodeAdd("d", RoleStorage, "nowhere"), want: ErrInvalid},
		{name: "node add bad id", cmd: cNodeAdd("D!", RoleStorage, "127.0.0.1:7005"), want: ErrInvalid},
		{name: "node remove owner", cmd: &Command{Kind: KindNodeRemove, NodeRemove: &NodeRemoveCmd{ID: "a"}}, want: ErrInUse},
		{name: "node remove replica holder", cmd: &Command{Kind: KindNodeRemove, NodeRemove: &NodeRemoveCmd{ID: "c"}}, want: ErrInUse},
		{name: "node remove witness", cmd: &Command{Kind: KindNodeRemove, NodeRemove: &NodeRemoveCmd{ID: "w"}}, check: func(t *testing.T, s *State) {
			if _, ok := s.Nodes["w"]; ok {
				t.Fatal("w still there")
			}
		}},
		{name: "node remove unknown", cmd: &Command{Kind: KindNodeRemove, NodeRemove: &NodeRemoveCmd{ID: "zz"}}, want: ErrNotFound},
		{name: "node standby", cmd: cSetState("b", NodeStandby), check: func(t *testing.T, s *State) {
			if s.Nodes["b"].State != NodeStandby || s.Events[len(s.Events)-1].Kind != "node-state" {
				t.Fatalf("b=%s events=%v", s.Nodes["b"].State, s.Events)
			}
		}},
		{name: "node set fenced refused", cmd: cSetState("b", NodeFenced), want: ErrInvalid},
		{name: "node set bogus state", cmd: cSetState("b", "sleepy"), want: ErrInvalid},
		{name: "node fence unknown device", cmd: cSetFence("c", []string{"pdu-9"}), want: ErrInvalid},
		{name: "node fence two levels", cmd: cSetFence("c", []string{"bmc-a"}, []string{"bmc-b"}), check: func(t *testing.T, s *State) {
			if len(s.Nodes["c"].Fence.Levels) != 2 {
				t.Fatal(s.Nodes["c"].Fence)
			}
		}},
		// volumes
		{name: "volume create", cmd: cVol(u3, "b", "b", "c"), check: func(t *testing.T, s *State) {
			v := s.Volumes[u3]
			if v.Epoch != 1 || v.Primary != "b" || !slices.Equal(v.ISR, []string{"b", "c"}) || v.BlockSize != 512 || v.CreationGen != 0 {
				t.Fatalf("%+v", v)
			}
		}},
		{name: "volume create with creation gen", cmd: cVolGen(u3, 0xfeed, "b", "b", "c"), check: func(t *testing.T, s *State) {
			if v := s.Volumes[u3]; v.CreationGen != 0xfeed {
				t.Fatalf("%+v", v)
			}
		}},
		{name: "volume create creation gen reused", cmd: cVolGen(u3, 0x5eed, "b", "b", "c"), want: ErrExists},
		{name: "volume create duplicate", cmd: cVol(u1, "a", "a"), want: ErrExists},
		{name: "volume create bad uuid", cmd: cVol("nope", "a", "a"), want: ErrInvalid},
		{name: "volume create primary not replica", cmd: cVol(u3, "c", "a", "b"), want: ErrInvalid},
		{name: "volume create witness replica", cmd: cVol(u3, "a", "a", "w"), want: ErrInvalid},
		{name: "volume create unknown node", cmd: cVol(u3, "a", "a", "q"), want: ErrNotFound},
		{name: "volume create replica twice", cmd: cVol(u3, "a", "a", "a"), want: ErrInvalid},
		{name: "volume create bad size", cmd: &Command{Kind: KindVolumeCreate, VolumeCreate: &VolumeCreateCmd{UUID: u3, Size: 1000, Primary: "a", Replicas: []string{"a"}}}, want: ErrInvalid},
		{name: "volume grow", cmd: &Command{Kind: KindVolumeResize, VolumeResize: &VolumeResizeCmd{UUID: u1, Size: 2 << 20}}, check: func(t *testing.T, s *State) {
			if s.Volumes[u1].Size != 2<<20 {
				t.Fatal(s.Volumes[u1].Size)
			}
		}},
		{name: "volume shrink refused", cmd: &Command{Kind: KindVolumeResize, VolumeResize: &VolumeResizeCmd{UUID: u1, Size: 512}}, want: ErrInvalid},
		{name: "volume delete exported", cmd: &Command{Kind: KindVolumeDelete, VolumeDelete: &VolumeDeleteCmd{UUID: u1}}, want: ErrInUse},
		{name: "volume delete free", pre: []*Command{cVol(u3, "a", "a")}, cmd: &Command{Kind: KindVolumeDelete, VolumeDelete: &VolumeDeleteCmd{UUID: u3}}, check: func(t *testing.T, s *State) {
			if _, ok := s.Volumes[u3]; ok {
				t.Fatal("still there")
			}
		}},
		// ISR (replication's rules)
		{name: "isr remove by primary", cmd: cISRRemove(u1, 2, "a", "b"), check: func(t *testing.T, s *State) {
			if !slices.Equal(s.Volumes[u1].ISR, []string{"a"}) || s.Volumes[u1].Epoch != 2 {
				t.Fatalf("%+v", s.Volumes[u1])
			}
		}},
		{name: "isr remove stale epoch", cmd: cISRRemove(u1, 1, "a", "b"), want: replication.ErrStaleEpoch},
		{name: "isr remove future epoch", cmd: cISRRemove(u1, 3, "a", "b"), want: replication.ErrNotPrimary},
		{name: "isr remove by non-primary", cmd: cISRRemove(u1, 2, "b", "a"), want: replication.ErrNotPrimary},
		{name: "isr remove self", cmd: cISRRemove(u1, 2, "a", "a"), want: ErrInvalid},
		{name: "isr remove unknown volume", cmd: cISRRemove(u3, 2, "a", "b"), want: replication.ErrUnknownVolume},
		{name: "isr add caught up", pre: []*Command{cISRRemove(u1, 2, "a", "b")}, cmd: cISRAdd(u1, 2, "a", "b", goodProof), check: func(t *testing.T, s *State) {
			if !slices.Equal(s.Volumes[u1].ISR, []string{"a", "b"}) {
				t.Fatal(s.Volumes[u1].ISR)
			}
		}},
		{name: "isr add dirty", pre: []*Command{cISRRemove(u1, 2, "a", "b")}, cmd: cISRAdd(u1, 2, "a", "b", replication.CatchUp{PrimaryGen: 7, ReplicaGen: 7, DirtyBytes: 4096}), want: replication.ErrNotCaughtUp},
		{name: "isr add gen mismatch", pre: []*Command{cISRRemove(u1, 2, "a", "b")}, cmd: cISRAdd(u1, 2, "a", "b", replication.CatchUp{PrimaryGen: 7, ReplicaGen: 6}), want: replication.ErrNotCaughtUp},
		{name: "isr add non-replica", cmd: cISRAdd(u1, 2, "a", "c", goodProof), want: ErrInvalid},
		{name: "isr add stale", cmd: cISRAdd(u1, 1, "a", "b", goodProof), want: replication.ErrStaleEpoch},
		// targets
		{name: "target put bad iqn", cmd: cTarget(Target{IQN: "bogus"}), want: ErrInvalid},
		{name: "target put unknown volume", cmd: cTarget(Target{IQN: iqn2, LUNs: map[uint64]string{0: u3}}), want: ErrNotFound},
		{name: "target put volume of another target", cmd: cTarget(Target{IQN: iqn2, LUNs: map[uint64]string{0: u1}}), want: ErrInUse},
		{name: "target put volume twice", pre: []*Command{cVol(u3, "a", "a")}, cmd: cTarget(Target{IQN: iqn2, LUNs: map[uint64]string{0: u3, 1: u3}}), want: ErrInvalid},
		{name: "target put short chap", cmd: cTarget(Target{IQN: iqn2, CHAP: &CHAP{User: "u", Secret: "short"}}), want: ErrInvalid},
		{name: "target put mutual same secret", cmd: cTarget(Target{IQN: iqn2, CHAP: &CHAP{User: "u", Secret: "0123456789ab"}, MutualCHAP: &CHAP{User: "t", Secret: "0123456789ab"}}), want: ErrInvalid},
		{name: "target put bad acl", cmd: cTarget(Target{IQN: iqn2, ACL: []string{"x"}}), want: ErrInvalid},
		{name: "target put ok lower-cases", pre: []*Command{cVol(u3, "b", "b")}, cmd: cTarget(Target{IQN: "IQN.2025-01.org.hasan:T2", LUNs: map[uint64]string{0: u3}}), check: func(t *testing.T, s *State) {
			if s.Targets[iqn2] == nil {
				t.Fatal(s.Targets)
			}
		}},
		{name: "target put into owned group with foreign primary", pre: []*Command{cVol(u3, "b", "b")},
			cmd: cTarget(Target{IQN: iqn1, LUNs: map[uint64]string{0: u1, 1: u2, 2: u3}}), want: ErrOwnerDiffer},
		{name: "target delete grouped", cmd: &Command{Kind: KindTargetDelete, TargetDelete: &TargetDeleteCmd{IQN: iqn1}}, want: ErrInUse},
		{name: "target delete free", pre: []*Command{cTarget(Target{IQN: iqn2})}, cmd: &Command{Kind: KindTargetDelete, TargetDelete: &TargetDeleteCmd{IQN: iqn2}}},
		// groups
		{name: "group put no vip", cmd: cGroup(Group{Name: "g2"}), want: ErrInvalid},
		{name: "group put bad vip", cmd: cGroup(Group{Name: "g2", VIPs: []string{"192.0.2.300/24"}}), want: ErrInvalid},
		{name: "group put vip of another group", cmd: cGroup(Group{Name: "g2", VIPs: []string{"192.0.2.10/32"}}), want: ErrInUse},
		{name: "group put target of another group", cmd: cGroup(Group{Name: "g2", VIPs: []string{"192.0.2.11/24"}, Targets: []string{iqn1}}), want: ErrInUse},
		{name: "group put witness preferred", cmd: cGroup(Group{Name: "g2", VIPs: []string{"192.0.2.11/24"}, Preferred: []string{"w"}}), want: ErrInvalid},
		{name: "group put keeps owner and epoch", cmd: cGroup(Group{Name: "g1", VIPs: []string{"192.0.2.12/24"}, Targets: []string{iqn1}, Owner: "b", Epoch: 99}), check: func(t *testing.T, s *State) {
			g := s.Groups["g1"]
			if g.Owner != "a" || g.Epoch != 1 || g.VIPs[0] != "192.0.2.12/24" {
				t.Fatalf("%+v", g)
			}
		}},
		{name: "group delete owned", cmd: &Command{Kind: KindGroupDelete, GroupDelete: &GroupDeleteCmd{Name: "g1"}}, want: ErrGroupOwned},
		{name: "group delete released", pre: []*Command{cRelease("g1", "a", 1)}, cmd: &Command{Kind: KindGroupDelete, GroupDelete: &GroupDeleteCmd{Name: "g1"}}},
		// grant, move, release
		{name: "grant owned", cmd: cGrant("g1", "b"), want: ErrGroupOwned},
		{name: "grant after release bumps epochs", pre: []*Command{cRelease("g1", "a", 1)}, cmd: cGrant("g1", "b"), check: func(t *testing.T, s *State) {
			g := s.Groups["g1"]
			if g.Owner != "b" || g.Epoch != 2 {
				t.Fatalf("%+v", g)
			}
			for _, u := range []string{u1, u2} {
				if v := s.Volumes[u]; v.Primary != "b" || v.Epoch != 3 {
					t.Fatalf("%s: %+v", u, v)
				}
			}
		}},
		{name: "grant to node outside isr", pre: []*Command{cISRRemove(u1, 2, "a", "b"), cRelease("g1", "a", 1)}, cmd: cGrant("g1", "b"), want: replication.ErrNotInISR},
		{name: "grant to standby", pre: []*Command{cRelease("g1", "a", 1), cSetState("b", NodeStandby)}, cmd: cGrant("g1", "b"), want: ErrNodeState},
		{name: "grant to witness", pre: []*Command{cRelease("g1", "a", 1)}, cmd: cGrant("g1", "w"), want: ErrInvalid},
		{name: "move", cmd: cMove("g1", "b"), check: func(t *testing.T, s *State) {
			if s.Groups["g1"].MovingTo != "b" || s.Groups["g1"].Owner != "a" {
				t.Fatalf("%+v", s.Groups["g1"])
			}
		}},
		{name: "move to current owner", cmd: cMove("g1", "a"), want: ErrInvalid},
		{name: "move to node not in every isr", cmd: cMove("g1", "c"), want: replication.ErrNotInISR},
		{name: "grant other than move target", pre: []*Command{cMove("g1", "b"), cRelease("g1", "a", 1), cSetState("c", NodeOnline)},
			cmd: cGrant("g1", "c"), want: ErrInvalid},
		{name: "release wrong epoch", cmd: cRelease("g1", "a", 0), want: ErrNotOwner},
		{name: "release wrong node", cmd: cRelease("g1", "b", 1), want: ErrNotOwner},
		// takeover
		{name: "takeover without fence", cmd: cTakeover("g1", "a", "b", t0), want: ErrNotFenced},
		{name: "takeover with failed fence", pre: []*Command{cFenceRec("a", t0.Add(time.Hour), false)}, cmd: cTakeover("g1", "a", "b", t0), want: ErrNotFenced},
		{name: "takeover with stale fence", pre: []*Command{cFenceRec("a", t0, true)}, cmd: cTakeover("g1", "a", "b", t0.Add(time.Hour)), want: ErrNotFenced},
		{name: "takeover fence of other node", pre: []*Command{cFenceRec("b", t0.Add(time.Hour), true)}, cmd: cTakeover("g1", "a", "b", t0), want: ErrNotFenced},
		{name: "takeover from non-owner", pre: []*Command{cFenceRec("b", t0.Add(time.Hour), true)}, cmd: cTakeover("g1", "b", "a", t0), want: ErrNotOwner},
		{name: "takeover to node outside isr", pre: []*Command{cFenceRec("a", t0.Add(time.Hour), true)}, cmd: cTakeover("g1", "a", "c", t0), want: replication.ErrNotInISR},
		{name: "takeover confirmed", pre: []*Command{cFenceRec("a", t0.Add(time.Hour), true)}, cmd: cTakeover("g1", "a", "b", t0), check: func(t *testing.T, s *State) {
			g := s.Groups["g1"]
			if g.Owner != "b" || g.Epoch != 2 || s.Nodes["a"].State != NodeFenced {
				t.Fatalf("group %+v a=%s", g, s.Nodes["a"].State)
			}
			if v := s.Volumes[u1]; v.Primary != "b" || v.Epoch != 3 || !slices.Equal(v.ISR, []string{"b"}) {
				t.Fatalf("u1 %+v", v)
			}
			if v := s.Volumes[u2]; !slices.Equal(v.ISR, []string{"b", "c"}) || v.Epoch != 3 {
				t.Fatalf("u2 %+v", v)
			}
			if e := s.Events[len(s.Events)-1]; e.Kind != "takeover" || e.Severity != SeverityAlert {
				t.Fatalf("%+v", e)
			}
		}},
		{name: "fenced node cannot be granted", pre: []*Command{cFenceRec("a", t0.Add(time.Hour), true), cTakeover("g1", "a", "b", t0), cRelease("g1", "b", 2)},
			cmd: cGrant("g1", "a"), want: ErrNodeState},
		// persistent reservations
		{name: "pr save", cmd: &Command{Kind: KindPRSave, PRSave: &PRSaveCmd{Volume: u1, State: scsi.PRState{Generation: 3, Holder: 0,
			Registrations: []scsi.PRRegistration{{Key: 42, InitiatorPort: "i", TargetPort: "t"}}}}}, check: func(t *testing.T, s *State) {
			if p := s.PR[u1]; p.Generation != 3 || p.Registrations[0].Key != 42 {
				t.Fatalf("%+v", p)
			}
		}},
		{name: "pr save unknown volume", cmd: &Command{Kind: KindPRSave, PRSave: &PRSaveCmd{Volume: u3, State: scsi.PRState{Holder: -1}}}, want: ErrNotFound},
		{name: "pr save bad holder", cmd: &Command{Kind: KindPRSave, PRSave: &PRSaveCmd{Volume: u1, State: scsi.PRState{Holder: 2}}}, want: ErrInvalid},
		// fence devices
		{name: "fence device bad type", cmd: cDevice("x", `{"type":"lightning"}`), want: ErrInvalid},
		{name: "fence device bad json", cmd: cDevice("x", `{`), want: ErrInvalid},
		{name: "fence device delete in use", cmd: &Command{Kind: KindFenceDeviceDelete, FenceDeviceDelete: &FenceDeviceDeleteCmd{Name: "bmc-a"}}, want: ErrInUse},
		{name: "fence device delete free", pre: []*Command{cDevice("spare", ipmiCfg("x"))}, cmd: &Command{Kind: KindFenceDeviceDelete, FenceDeviceDelete: &FenceDeviceDeleteCmd{Name: "spare"}}},
		// cluster flags
		{name: "maintenance on", cmd: &Command{Kind: KindMaintenance, Maintenance: &MaintenanceCmd{On: true}}, check: func(t *testing.T, s *State) {
			if !s.Maintenance {
				t.Fatal("off")
			}
		}},
		// tokens
		{name: "join with token", pre: []*Command{cToken(hashA, RoleWitness, t0.Add(time.Hour))}, cmd: cJoin(hashA, "w2", "", "127.0.0.1:7010"), check: func(t *testing.T, s *State) {
			if n := s.Nodes["w2"]; n == nil || n.Role != RoleWitness {
				t.Fatalf("%+v", n)
			}
		}},
		{name: "join reuses token", pre: []*Command{cToken(hashA, RoleStorage, t0.Add(time.Hour)), cJoin(hashA, "d", RoleStorage, "127.0.0.1:7010")},
			cmd: cJoin(hashA, "e", RoleStorage, "127.0.0.1:7011"), want: ErrToken},
		{name: "join expired token", pre: []*Command{cToken(hashA, RoleStorage, t0.Add(time.Hour))},
			cmd: &Command{Kind: KindJoin, At: t0.Add(2 * time.Hour), Join: &JoinCmd{Hash: hashA, Node: NodeInfo{ID: "d", RaftAddr: "127.0.0.1:7010"}}}, want: ErrToken},
		{name: "join unknown token", cmd: cJoin(hashB, "d", RoleStorage, "127.0.0.1:7010"), want: ErrToken},
		{name: "join role mismatch", pre: []*Command{cToken(hashA, RoleWitness, t0.Add(time.Hour))}, cmd: cJoin(hashA, "d", RoleStorage, "127.0.0.1:7010"), want: ErrToken},
		{name: "token issue expired", cmd: cToken(hashA, RoleStorage, t0), want: ErrInvalid},
		// initiator connections
		{name: "conns recorded sorted", cmd: cConns("g1", "a", 1, ic("192.0.2.10:3260", "198.51.100.9:40000"), ic("192.0.2.10:3260", "198.51.100.7:40001")),
			check: func(t *testing.T, s *State) {
				want := []InitiatorConn{ic("192.0.2.10:3260", "198.51.100.7:40001"), ic("192.0.2.10:3260", "198.51.100.9:40000")}
				if got := s.Groups["g1"].Conns; !slices.Equal(got, want) {
					t.Fatalf("conns %v", got)
				}
			}},
		{name: "conns replaced by empty set", pre: []*Command{cConns("g1", "a", 1, ic("192.0.2.10:3260", "198.51.100.9:40000"))}, cmd: cConns("g1", "a", 1),
			check: func(t *testing.T, s *State) {
				if c := s.Groups["g1"].Conns; len(c) != 0 {
					t.Fatalf("conns %v", c)
				}
			}},
		{name: "conns from non-owner", cmd: cConns("g1", "b", 1, ic("192.0.2.10:3260", "198.51.100.9:40000")), want: ErrNotOwner},
		{name: "conns at stale epoch", pre: []*Command{cRelease("g1", "a", 1), cGrant("g1", "a")}, cmd: cConns("g1", "a", 1, ic("192.0.2.10:3260", "198.51.100.9:40000")), want: ErrNotOwner},
		{name: "conns of released group", pre: []*Command{cRelease("g1", "a", 1)}, cmd: cConns("g1", "a", 1), want: ErrNotOwner},
		{name: "conns unknown group", cmd: cConns("g9", "a", 1), want: ErrNotFound},
		{name: "conns local not a vip", cmd: cConns("g1", "a", 1, ic("192.0.2.11:3260", "198.51.100.9:40000")), want: ErrInvalid},
		{name: "conns bad address", cmd: cConns("g1", "a", 1, ic("192.0.2.10:3260", "nope")), want: ErrInvalid},
		{name: "conns mixed families", cmd: cConns("g1", "a", 1, ic("192.0.2.10:3260", "[2001:db8::1]:4000")), want: ErrInvalid},
		{name: "conns duplicate", cmd: cConns("g1", "a", 1, ic("192.0.2.10:3260", "198.51.100.9:40000"), ic("192.0.2.10:3260", "198.51.100.9:40000")), want: ErrInvalid},
		{name: "conns too many", cmd: func() *Command {
			var cs []InitiatorConn
			for i := range MaxGroupConns + 1 {
				cs = append(cs, ic("192.0.2.10:3260", fmt.Sprintf("198.51.100.9:%d", 1000+i)))
			}
			return cConns("g1", "a", 1, cs...)
		}(), want: ErrInvalid},
		{name: "conns survive takeover for the new owner", pre: []*Command{cConns("g1", "a", 1, ic("192.0.2.10:3260", "198.51.100.9:40000")), cFenceRec("a", t0.Add(time.Hour), true)},
			cmd: cTakeover("g1", "a", "b", t0), check: func(t *testing.T, s *State) {
				if g := s.Groups["g1"]; g.Owner != "b" || len(g.Conns) != 1 {
					t.Fatalf("%+v", g)
				}
			}},
		{name: "conns dropped with their vip", pre: []*Command{cConns("g1", "a", 1, ic("192.0.2.10:3260", "198.51.100.9:40000"))},
			cmd: cGroup(Group{Name: "g1", VIPs: []string{"192.0.2.12/24"}, Targets: []string{iqn1}}), check: func(t *testing.T, s *State) {
				if c := s.Groups["g1"].Conns; len(c) != 0 {
					t.Fatalf("conns %v", c)
				}
			}},
		// move cancel
		{name: "move cancel", pre: []*Command{cMove("g1", "b")}, cmd: cMoveCancel("g1", "b"), check: func(t *testing.T, s *State) {
			if g := s.Groups["g1"]; g.MovingTo != "" || g.Owner != "a" || s.Events[len(s.Events)-1].Kind != "move-cancelled" {
				t.Fatalf("%+v", g)
			}
		}},
		{name: "move cancel not moving", cmd: cMoveCancel("g1", "b"), want: ErrInvalid},
		{name: "move cancel other target", pre: []*Command{cMove("g1", "b")}, cmd: cMoveCancel("g1", "c"), want: ErrInvalid},
		{name: "move cancel after release", pre: []*Command{cMove("g1", "b"), cRelease("g1", "a", 1)}, cmd: cMoveCancel("g1", "b"), want: ErrInvalid},
		{name: "move cancel unknown group", cmd: cMoveCancel("g9", "b"), want: ErrNotFound},
		// manual fence confirmation
		{name: "fence confirm", cmd: cFenceConfirm("a", "alice"), check: func(t *testing.T, s *State) {
			if c := s.FenceConfirms["a"]; c.By != "alice" || c.At.IsZero() || s.Events[len(s.Events)-1].Kind != "fence-confirmed" {
				t.Fatalf("%+v", c)
			}
		}},
		{name: "fence confirm anonymous", cmd: cFenceConfirm("a", ""), want: ErrInvalid},
		{name: "fence confirm unknown node", cmd: cFenceConfirm("zz", "alice"), want: ErrNotFound},
		// replica set (the rules: replace_test.go)
		{name: "volume replicas", cmd: cReplicas(u2, "c", ""), check: func(t *testing.T, s *State) {
			if v := s.Volumes[u2]; !slices.Equal(v.Replicas, []string{"a", "b"}) || !slices.Equal(v.ISR, []string{"a", "b"}) {
				t.Fatalf("%+v", v)
			}
		}},
		{name: "volume replicas primary", cmd: cReplicas(u2, "a", ""), want: ErrInUse},
		// certificates (the rules: revoke_test.go)
		{name: "cert revoke", cmd: &Command{Kind: KindCertRevoke, CertRevoke: &CertRevokeCmd{Serial: "1a2b", CN: "alice", OU: AdminOU}}},
		// malformed
		{name: "unknown kind", cmd: &Command{Kind: kindEnd}, want: ErrInvalid},
		{name: "missing payload", cmd: &Command{Kind: KindTakeover}, want: ErrInvalid},
	}
	seen := map[Kind]bool{}
	for _, tt := range tests {
		seen[tt.cmd.Kind] = true
		t.Run(tt.name, func(t *testing.T) {
			a := newApplier(t, append(fixtureCommands(), tt.pre...)...)
			before := a.st.Clone()
			_, err := a.apply(tt.cmd)
			if tt.want == nil {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
			} else {
				if !errors.Is(err, tt.want) {
					t.Fatalf("error %v, want %v", err, tt.want)
				}
				if !reflect.DeepEqual(before, a.st) {
					t.Fatalf("refused command changed the state")
				}
			}
			if tt.check != nil {
				tt.check(t, a.st)
			}
		})
	}
	for k := KindNodeAdd; k < kindEnd; k++ {
		if k == KindFenceRecord || k == KindEvent {
			continue // covered by TestBoundedLogs
		}
		if !seen[k] {
			t.Errorf("no table case for %s", k)
		}
	}
}

func TestBoundedLogs(t *testing.T) {
	a := newApplier(t)
	for i := range MaxEvents + 10 {
		if _, err := a.apply(&Command{Kind: KindEvent, Event: &EventCmd{Event: Event{Kind: "x", Message: fmt.Sprint(i)}}}); err != nil {
			t.Fatal(err)
		}
	}
	if len(a.st.Events) != MaxEvents || a.st.Events[0].Seq != 11 || a.st.Events[MaxEvents-1].Seq != MaxEvents+10 {
		t.Fatalf("events: len %d first %d last %d", len(a.st.Events), a.st.Events[0].Seq, a.st.Events[len(a.st.Events)-1].Seq)
	}
	for i := range MaxFenceHistory + 3 {
		if _, err := a.apply(cFenceRec("a", t0.Add(time.Duration(i)), true)); err != nil {
			t.Fatal(err)
		}
	}
	if len(a.st.FenceHistory) != MaxFenceHistory || !a.st.FenceHistory[0].Time.Equal(t0.Add(3)) {
		t.Fatalf("history len %d first %v", len(a.st.FenceHistory), a.st.FenceHistory[0].Time)
	}
}

// TestMembershipMatchesReplication runs one script against replication's
// MemMembership and the cluster's Raft-backed Membership and expects the
// same answers: the cluster enforces replication's rules, not its own.
func TestMembershipMatchesReplication(t *testing.T) {
	ctx := context.Background()
	mem := replication.NewMemMembership()
	mem.Create(u1, "a", "b", "c")

	loc := NewLocal(nil)
	for _, c := range []*Command{
		cNodeAdd("a", RoleStorage, "127.0.0.1:1"), cNodeAdd("b", RoleStorage, "127.0.0.1:2"), cNodeAdd("c", RoleStorage, "127.0.0.1:3"),
		cVol(u1, "a", "a", "b", "c"),
	} {
		if _, err := loc.Propose(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	cm := &Membership{P: loc, FSM: loc.FSM}
	good := replication.CatchUp{PrimaryGen: 5, ReplicaGen: 5}
	steps := []func(m replication.Membership) (replication.MembershipState, error){
		func(m replication.Membership) (replication.MembershipState, error) { return m.State(ctx, u1) },
		func(m replication.Membership) (replication.MembershipState, error) {
			return m.RemoveFromISR(ctx, u1, 1, "a", "b")
		},
		func(m replication.Membership) (replication.MembershipState, error) {
			return m.RemoveFromISR(ctx, u1, 0, "a", "c")
		},
		func(m replication.Membership) (replication.MembershipState, error) {
			return m.RemoveFromISR(ctx, u1, 1, "b", "c")
		},
		func(m replication.Membership) (replication.MembershipState, error) {
			return m.AddToISR(ctx, u1, 1, "a", "b", replication.CatchUp{PrimaryGen: 5, ReplicaGen: 4})
		},
		func(m replication.Membership) (replication.MembershipState, error) {
			return m.AddToISR(ctx, u1, 1, "a", "b", good)
		},
		func(m replication.Membership) (replication.MembershipState, error) { return m.State(ctx, u3) },
	}
	sentinels := []error{replication.ErrStaleEpoch, replication.ErrNotPrimary, replication.ErrNotCaughtUp, replication.ErrUnknownVolume}
	for i, step := range steps {
		ws, werr := step(mem)
		gs, gerr := step(cm)
		if (werr == nil) != (gerr == nil) {
			t.Fatalf("step %d: mem err %v, cluster err %v", i, werr, gerr)
		}
		for _, s := range sentinels {
			if errors.Is(werr, s) != errors.Is(gerr, s) {
				t.Fatalf("step %d: mem err %v, cluster err %v", i, werr, gerr)
			}
		}
		if werr == nil && !reflect.DeepEqual(ws, gs) {
			t.Fatalf("step %d: mem %+v, cluster %+v", i, ws, gs)
		}
	}
}
