package main

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/fencing"
	"github.com/hasan-storage/hasan/webui"
)

// stateService is webui.Service over an in-memory cluster.State: writes
// are real cluster commands run through State.Apply, so the CLI tests meet
// the cluster's own validation without Raft. notLeader, when set, makes
// every write fail as a follower that cannot forward would, naming that
// API address as the leader's; noLeader as a node that knows no leader.
type stateService struct {
	mu        sync.Mutex
	st        *cluster.State
	notLeader string
	noLeader  bool
	// writes counts the commands the state accepted.
	writes int
}

var _ webui.Service = (*stateService)(nil)

func newStateService() *stateService {
	s := &stateService{st: cluster.NewState()}
	for i, n := range []cluster.NodeInfo{
		{ID: "n1", Role: cluster.RoleStorage, RaftAddr: "127.0.0.1:7001", APIAddr: "127.0.0.1:7402"},
		{ID: "n2", Role: cluster.RoleStorage, RaftAddr: "127.0.0.1:7002"},
		{ID: "w1", Role: cluster.RoleWitness, RaftAddr: "127.0.0.1:7003"},
	} {
		if _, err := s.apply(&cluster.Command{Kind: cluster.KindNodeAdd, NodeAdd: &cluster.NodeAddCmd{Node: n}}); err != nil {
			panic(fmt.Sprintf("node %d: %v", i, err))
		}
	}
	return s
}

func (s *stateService) apply(c *cluster.Command) (any, error) {
	c.At = time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)
	return s.st.Apply(c)
}

// write runs one command as the leader would, or refuses as a follower.
func (s *stateService) write(c *cluster.Command) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.notLeader != "" {
		return &webui.NotLeaderError{LeaderAPI: s.notLeader, Err: cluster.ErrNotLeader}
	}
	if s.noLeader {
		return cluster.ErrNotLeader
	}
	_, err := s.apply(c)
	if err == nil {
		s.writes++
	}
	return err
}

func (s *stateService) read(fn func(st *cluster.State)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fn(s.st)
}

func values[T any](m map[string]*T) []T {
	out := make([]T, 0, len(m))
	for _, k := range slices.Sorted(maps.Keys(m)) {
		out = append(out, *m[k])
	}
	return out
}

func lookup[T any](m map[string]*T, what, id string) (T, error) {
	v, ok := m[id]
	if !ok {
		var zero T
		return zero, fmt.Errorf("%w: %s %s", cluster.ErrNotFound, what, id)
	}
	return *v, nil
}

func (s *stateService) Status(ctx context.Context) (out webui.Status, err error) {
	s.read(func(st *cluster.State) {
		out = webui.Status{NodeID: "n1", RaftState: "Leader", LeaderID: "n1", Maintenance: st.Maintenance, Nodes: map[string]int{}}
	})
	return out, nil
}

func (s *stateService) Nodes(ctx context.Context) (out []cluster.NodeInfo, err error) {
	s.read(func(st *cluster.State) { out = values(st.Clone().Nodes) })
	return out, nil
}

func (s *stateService) Node(ctx context.Context, id string) (out cluster.NodeInfo, err error) {
	s.read(func(st *cluster.State) { out, err = lookup(st.Clone().Nodes, "node", id) })
	return out, err
}

func (s *stateService) SetNodeState(ctx context.Context, id string, state cluster.NodeState) error {
	return s.write(&cluster.Command{Kind: cluster.KindNodeSetState, NodeSetState: &cluster.NodeSetStateCmd{ID: id, State: state}})
}

func (s *stateService) RemoveNode(ctx context.Context, id string) error {
	return s.write(&cluster.Command{Kind: cluster.KindNodeRemove, NodeRemove: &cluster.NodeRemoveCmd{ID: id}})
}

func (s *stateService) SetMaintenance(ctx context.Context, on bool) error {
	return s.write(&cluster.Command{Kind: cluster.KindMaintenance, Maintenance: &cluster.MaintenanceCmd{On: on}})
}

func (s *stateService) Volumes(ctx context.Context) (out []cluster.Volume, err error) {
	s.read(func(st *cluster.State) { out = values(st.Clone().Volumes) })
	return out, nil
}

func (s *stateService) Volume(ctx context.Context, id string) (out cluster.Volume, err error) {
	s.read(func(st *cluster.State) { out, err = lookup(st.Clone().Volumes, "volume", id) })
	return out, err
}

func (s *stateService) CreateVolume(ctx context.Context, spec webui.VolumeSpec) (cluster.Volume, error) {
	if spec.UUID == "" {
		s.mu.Lock()
		spec.UUID = fmt.Sprintf("00000000-0000-4000-8000-%012d", len(s.st.Volumes)+1)
		s.mu.Unlock()
	}
	if spec.BlockSize == 0 {
		spec.BlockSize = 512
	}
	if spec.Primary == "" && len(spec.Replicas) > 0 {
		spec.Primary = spec.Replicas[0]
	}
	err := s.write(&cluster.Command{Kind: cluster.KindVolumeCreate, VolumeCreate: &cluster.VolumeCreateCmd{
		UUID: spec.UUID, Name: spec.Name, Size: spec.Size, BlockSize: spec.BlockSize, Thin: spec.Thin,
		Primary: spec.Primary, Replicas: spec.Replicas}})
	if err != nil {
		return cluster.Volume{}, err
	}
	return s.Volume(ctx, spec.UUID)
}

func (s *stateService) DeleteVolume(ctx context.Context, id string) error {
	return s.write(&cluster.Command{Kind: cluster.KindVolumeDelete, VolumeDelete: &cluster.VolumeDeleteCmd{UUID: id}})
}

func (s *stateService) Targets(ctx context.Context) (out []cluster.Target, err error) {
	s.read(func(st *cluster.State) { out = values(st.Clone().Targets) })
	return out, nil
}

func (s *stateService) Target(ctx context.Context, iqn string) (out cluster.Target, err error) {
	s.read(func(st *cluster.State) { out, err = lookup(st.Clone().Targets, "target", strings.ToLower(iqn)) })
	return out, err
}

func (s *stateService) CreateTarget(ctx context.Context, t cluster.Target) error {
	if _, err := s.Target(ctx, t.IQN); err == nil {
		return fmt.Errorf("%w: target %s", cluster.ErrExists, t.IQN)
	}
	if t.LUNs == nil {
		t.LUNs = map[uint64]string{}
	}
	return s.write(&cluster.Command{Kind: cluster.KindTargetPut, TargetPut: &cluster.TargetPutCmd{Target: t}})
}

func (s *stateService) DeleteTarget(ctx context.Context, iqn string) error {
	return s.write(&cluster.Command{Kind: cluster.KindTargetDelete, TargetDelete: &cluster.TargetDeleteCmd{IQN: iqn}})
}

func (s *stateService) editTarget(ctx context.Context, iqn string, edit func(t *cluster.Target) error) error {
	t, err := s.Target(ctx, iqn)
	if err != nil {
		return err
	}
	if err := edit(&t); err != nil {
		return err
	}
	return s.write(&cluster.Command{Kind: cluster.KindTargetPut, TargetPut: &cluster.TargetPutCmd{Target: t}})
}

func (s *stateService) AddLUN(ctx context.Context, iqn string, lun uint64, volume string) error {
	return s.editTarget(ctx, iqn, func(t *cluster.Target) error { t.LUNs[lun] = volume; return nil })
}

func (s *stateService) RemoveLUN(ctx context.Context, iqn string, lun uint64) error {
	return s.editTarget(ctx, iqn, func(t *cluster.Target) error {
		if _, ok := t.LUNs[lun]; !ok {
			return fmt.Errorf("%w: lun %d of %s", cluster.ErrNotFound, lun, iqn)
		}
		delete(t.LUNs, lun)
		return nil
	})
}

func (s *stateService) SetACL(ctx context.Context, iqn string, initiators []string) error {
	return s.editTarget(ctx, iqn, func(t *cluster.Target) error { t.ACL = initiators; return nil })
}

func (s *stateService) SetCHAP(ctx context.Context, iqn string, chap, mutual *cluster.CHAP) error {
	return s.editTarget(ctx, iqn, func(t *cluster.Target) error { t.CHAP, t.MutualCHAP = chap, mutual; return nil })
}

func (s *stateService) Groups(ctx context.Context) (out []cluster.Group, err error) {
	s.read(func(st *cluster.State) { out = values(st.Clone().Groups) })
	return out, nil
}

func (s *stateService) Group(ctx context.Context, name string) (out cluster.Group, err error) {
	s.read(func(st *cluster.State) { out, err = lookup(st.Clone().Groups, "group", name) })
	return out, err
}

func (s *stateService) CreateGroup(ctx context.Context, g cluster.Group) error {
	if _, err := s.Group(ctx, g.Name); err == nil {
		return fmt.Errorf("%w: group %s", cluster.ErrExists, g.Name)
	}
	return s.write(&cluster.Command{Kind: cluster.KindGroupPut, GroupPut: &cluster.GroupPutCmd{Group: g}})
}

func (s *stateService) MoveGroup(ctx context.Context, group, node string) error {
	return s.write(&cluster.Command{Kind: cluster.KindGroupMove, GroupMove: &cluster.GroupMoveCmd{Group: group, Node: node}})
}

func (s *stateService) FenceDevices(ctx context.Context) (out []cluster.FenceDevice, err error) {
	s.read(func(st *cluster.State) { out = values(st.Clone().FenceDevices) })
	return out, nil
}

func (s *stateService) FenceDevice(ctx context.Context, name string) (out cluster.FenceDevice, err error) {
	s.read(func(st *cluster.State) { out, err = lookup(st.Clone().FenceDevices, "fence device", name) })
	return out, err
}

func (s *stateService) PutFenceDevice(ctx context.Context, name string, config []byte) error {
	return s.write(&cluster.Command{Kind: cluster.KindFenceDevicePut, FenceDevicePut: &cluster.FenceDevicePutCmd{Name: name, Config: config}})
}

func (s *stateService) DeleteFenceDevice(ctx context.Context, name string) error {
	return s.write(&cluster.Command{Kind: cluster.KindFenceDeviceDelete, FenceDeviceDelete: &cluster.FenceDeviceDeleteCmd{Name: name}})
}

func (s *stateService) SetNodeFence(ctx context.Context, id string, topo fencing.NodeTopology) error {
	var missing string
	s.read(func(st *cluster.State) {
		for _, l := range topo.Levels {
			for _, d := range l {
				if _, ok := st.FenceDevices[d]; !ok && missing == "" {
					missing = d
				}
			}
		}
	})
	if missing != "" {
		return fmt.Errorf("%w: fence device %s", cluster.ErrNotFound, missing)
	}
	return s.write(&cluster.Command{Kind: cluster.KindNodeSetFence, NodeSetFence: &cluster.NodeSetFenceCmd{ID: id, Topology: topo}})
}

func (s *stateService) ConfirmFence(ctx context.Context, node, operator string) error {
	return s.write(&cluster.Command{Kind: cluster.KindFenceConfirm, FenceConfirm: &cluster.FenceConfirmCmd{Node: node, Operator: operator}})
}

func (s *stateService) FenceHistory(ctx context.Context, node string, limit int) (out []fencing.Record, err error) {
	s.read(func(st *cluster.State) {
		for i := len(st.FenceHistory) - 1; i >= 0 && (limit <= 0 || len(out) < limit); i-- {
			if r := st.FenceHistory[i]; node == "" || r.Node == node {
				out = append(out, r)
			}
		}
	})
	return out, nil
}

func (s *stateService) Events(ctx context.Context, limit int) (out []cluster.Event, err error) {
	s.read(func(st *cluster.State) {
		for i := len(st.Events) - 1; i >= 0 && (limit <= 0 || len(out) < limit); i-- {
			out = append(out, st.Events[i])
		}
	})
	return out, nil
}
