package webui

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/raft"

	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/fencing"
)

// NodeService implements Service on a running cluster.Node. Reads come from
// the node's local replica of the state; writes are proposals, forwarded to
// the leader by the node itself when it follows.
//
// The per-target edits (LUN, ACL, CHAP) read the target, change it and put
// it back whole, because cluster/ only has target-put. Two operators
// editing the same target at once can therefore lose one edit; the cluster
// still validates every put, so the result is never inconsistent.
type NodeService struct {
	n *cluster.Node
}

var _ Service = (*NodeService)(nil)

// NewNodeService wraps n.
func NewNodeService(n *cluster.Node) *NodeService { return &NodeService{n: n} }

func (s *NodeService) propose(ctx context.Context, c *cluster.Command) (any, error) {
	v, err := s.n.Propose(ctx, c)
	if err != nil && errors.Is(err, cluster.ErrNotLeader) {
		return nil, &NotLeaderError{LeaderAPI: s.leaderAPI(), Err: err}
	}
	return v, err
}

func (s *NodeService) leaderAPI() string {
	_, id := s.n.Raft().LeaderWithID()
	if id == "" {
		return ""
	}
	var api string
	s.n.FSM().Read(func(st *cluster.State) {
		if nd, ok := st.Nodes[string(id)]; ok {
			api = nd.APIAddr
		}
	})
	return api
}

// Status implements Service.
func (s *NodeService) Status(ctx context.Context) (Status, error) {
	_, leader := s.n.Raft().LeaderWithID()
	out := Status{
		NodeID:    s.n.ID(),
		RaftState: s.n.Raft().State().String(),
		LeaderID:  string(leader),
		Nodes:     map[string]int{},
	}
	s.n.FSM().Read(func(st *cluster.State) {
		if nd, ok := st.Nodes[string(leader)]; ok && leader != "" {
			out.LeaderAPI = nd.APIAddr
		}
		out.Maintenance = st.Maintenance
		out.Index = st.Index
		for _, nd := range st.Nodes {
			out.Nodes[string(nd.State)]++
		}
		out.Volumes = len(st.Volumes)
		out.Targets = len(st.Targets)
		for _, name := range slices.Sorted(maps.Keys(st.Groups)) {
			g := st.Groups[name]
			out.Groups = append(out.Groups, GroupStatus{Name: g.Name, Owner: g.Owner, Epoch: g.Epoch, MovingTo: g.MovingTo})
		}
	})
	return out, nil
}

// Nodes implements Service.
func (s *NodeService) Nodes(ctx context.Context) ([]cluster.NodeInfo, error) {
	st := s.n.FSM().State()
	out := make([]cluster.NodeInfo, 0, len(st.Nodes))
	for _, id := range slices.Sorted(maps.Keys(st.Nodes)) {
		out = append(out, *st.Nodes[id])
	}
	return out, nil
}

// Node implements Service.
func (s *NodeService) Node(ctx context.Context, id string) (cluster.NodeInfo, error) {
	st := s.n.FSM().State()
	nd, ok := st.Nodes[id]
	if !ok {
		return cluster.NodeInfo{}, errNoSuch("node", id)
	}
	return *nd, nil
}

// SetNodeState implements Service.
func (s *NodeService) SetNodeState(ctx context.Context, id string, state cluster.NodeState) error {
	_, err := s.propose(ctx, &cluster.Command{Kind: cluster.KindNodeSetState, NodeSetState: &cluster.NodeSetStateCmd{ID: id, State: state}})
	return err
}

// SetMaintenance implements Service.
func (s *NodeService) SetMaintenance(ctx context.Context, on bool) error {
	_, err := s.propose(ctx, &cluster.Command{Kind: cluster.KindMaintenance, Maintenance: &cluster.MaintenanceCmd{On: on}})
	return err
}

// RemoveNode implements Service. The state goes first: node-remove is
// where the cluster checks the node is empty, and a node that is out of
// the state but still a Raft member (the removal failed half way) is
// finished by calling again.
func (s *NodeService) RemoveNode(ctx context.Context, id string) error {
	if id == s.n.ID() {
		return invalid("id", "node %s is the one answering this request: remove it through another node's API", id)
	}
	if !s.n.IsLeader() {
		// Raft membership changes run on the leader only, and a follower
		// forwards proposals but not configuration changes.
		return &NotLeaderError{LeaderAPI: s.leaderAPI(),
			Err: fmt.Errorf("%w: removing a node runs on the leader", cluster.ErrNotLeader)}
	}
	var inState bool
	s.n.FSM().Read(func(st *cluster.State) { _, inState = st.Nodes[id] })
	inRaft, err := s.raftMember(id)
	if err != nil {
		return err
	}
	if !inState && !inRaft {
		return errNoSuch("node", id)
	}
	if inState {
		if _, err := s.propose(ctx, &cluster.Command{Kind: cluster.KindNodeRemove, NodeRemove: &cluster.NodeRemoveCmd{ID: id}}); err != nil {
			return err
		}
	}
	if inRaft {
		return s.n.RemoveServer(ctx, id)
	}
	return nil
}

func (s *NodeService) raftMember(id string) (bool, error) {
	f := s.n.Raft().GetConfiguration()
	if err := f.Error(); err != nil {
		return false, fmt.Errorf("webui: raft configuration: %w", err)
	}
	for _, srv := range f.Configuration().Servers {
		if string(srv.ID) == id {
			return true, nil
		}
	}
	return false, nil
}

// Volumes implements Service.
func (s *NodeService) Volumes(ctx context.Context) ([]cluster.Volume, error) {
	st := s.n.FSM().State()
	out := make([]cluster.Volume, 0, len(st.Volumes))
	for _, id := range slices.Sorted(maps.Keys(st.Volumes)) {
		out = append(out, *st.Volumes[id])
	}
	return out, nil
}

// Volume implements Service.
func (s *NodeService) Volume(ctx context.Context, id string) (cluster.Volume, error) {
	st := s.n.FSM().State()
	v, ok := st.Volumes[id]
	if !ok {
		return cluster.Volume{}, errNoSuch("volume", id)
	}
	return *v, nil
}

// CreateVolume implements Service.
func (s *NodeService) CreateVolume(ctx context.Context, spec VolumeSpec) (cluster.Volume, error) {
	if spec.UUID == "" {
		spec.UUID = uuid.NewString()
	}
	if spec.BlockSize == 0 {
		spec.BlockSize = 512
	}
	if spec.Primary == "" && len(spec.Replicas) > 0 {
		spec.Primary = spec.Replicas[0]
	}
	_, err := s.propose(ctx, &cluster.Command{Kind: cluster.KindVolumeCreate, VolumeCreate: &cluster.VolumeCreateCmd{
		UUID: spec.UUID, Name: spec.Name, Size: spec.Size, BlockSize: spec.BlockSize, Thin: spec.Thin,
		Primary: spec.Primary, Replicas: spec.Replicas,
	}})
	if err != nil {
		return cluster.Volume{}, err
	}
	return s.Volume(ctx, spec.UUID)
}

// DeleteVolume implements Service.
func (s *NodeService) DeleteVolume(ctx context.Context, id string) error {
	_, err := s.propose(ctx, &cluster.Command{Kind: cluster.KindVolumeDelete, VolumeDelete: &cluster.VolumeDeleteCmd{UUID: id}})
	return err
}

// Targets implements Service.
func (s *NodeService) Targets(ctx context.Context) ([]cluster.Target, error) {
	st := s.n.FSM().State()
	out := make([]cluster.Target, 0, len(st.Targets))
	for _, id := range slices.Sorted(maps.Keys(st.Targets)) {
		out = append(out, *st.Targets[id])
	}
	return out, nil
}

// Target implements Service.
func (s *NodeService) Target(ctx context.Context, iqn string) (cluster.Target, error) {
	st := s.n.FSM().State()
	// IQNs are case-insensitive; the state keys them in lower case.
	t, ok := st.Targets[strings.ToLower(iqn)]
	if !ok {
		return cluster.Target{}, errNoSuch("target", iqn)
	}
	return *t, nil
}

func (s *NodeService) putTarget(ctx context.Context, t cluster.Target) error {
	_, err := s.propose(ctx, &cluster.Command{Kind: cluster.KindTargetPut, TargetPut: &cluster.TargetPutCmd{Target: t}})
	return err
}

// CreateTarget implements Service. The existence check and the put are two
// steps (cluster/ has no create-only command), see NodeService.
func (s *NodeService) CreateTarget(ctx context.Context, t cluster.Target) error {
	if _, err := s.Target(ctx, t.IQN); err == nil {
		return fmt.Errorf("%w: target %s", cluster.ErrExists, t.IQN)
	}
	if t.LUNs == nil {
		t.LUNs = map[uint64]string{}
	}
	return s.putTarget(ctx, t)
}

// DeleteTarget implements Service.
func (s *NodeService) DeleteTarget(ctx context.Context, iqn string) error {
	_, err := s.propose(ctx, &cluster.Command{Kind: cluster.KindTargetDelete, TargetDelete: &cluster.TargetDeleteCmd{IQN: iqn}})
	return err
}

func (s *NodeService) editTarget(ctx context.Context, iqn string, edit func(*cluster.Target) error) error {
	t, err := s.Target(ctx, iqn)
	if err != nil {
		return err
	}
	if err := edit(&t); err != nil {
		return err
	}
	return s.putTarget(ctx, t)
}

// AddLUN implements Service.
func (s *NodeService) AddLUN(ctx context.Context, iqn string, lun uint64, volume string) error {
	return s.editTarget(ctx, iqn, func(t *cluster.Target) error {
		if cur, ok := t.LUNs[lun]; ok && cur != volume {
			return fmt.Errorf("%w: lun %d of %s maps volume %s", cluster.ErrExists, lun, iqn, cur)
		}
		if t.LUNs == nil {
			t.LUNs = map[uint64]string{}
		}
		t.LUNs[lun] = volume
		return nil
	})
}

// RemoveLUN implements Service.
func (s *NodeService) RemoveLUN(ctx context.Context, iqn string, lun uint64) error {
	return s.editTarget(ctx, iqn, func(t *cluster.Target) error {
		if _, ok := t.LUNs[lun]; !ok {
			return fmt.Errorf("%w: lun %d of %s", cluster.ErrNotFound, lun, iqn)
		}
		delete(t.LUNs, lun)
		return nil
	})
}

// SetACL implements Service.
func (s *NodeService) SetACL(ctx context.Context, iqn string, initiators []string) error {
	return s.editTarget(ctx, iqn, func(t *cluster.Target) error {
		t.ACL = slices.Clone(initiators)
		return nil
	})
}

// SetCHAP implements Service.
func (s *NodeService) SetCHAP(ctx context.Context, iqn string, chap, mutual *cluster.CHAP) error {
	return s.editTarget(ctx, iqn, func(t *cluster.Target) error {
		t.CHAP, t.MutualCHAP = chap, mutual
		return nil
	})
}

// Groups implements Service.
func (s *NodeService) Groups(ctx context.Context) ([]cluster.Group, error) {
	st := s.n.FSM().State()
	out := make([]cluster.Group, 0, len(st.Groups))
	for _, id := range slices.Sorted(maps.Keys(st.Groups)) {
		out = append(out, *st.Groups[id])
	}
	return out, nil
}

// Group implements Service.
func (s *NodeService) Group(ctx context.Context, name string) (cluster.Group, error) {
	st := s.n.FSM().State()
	g, ok := st.Groups[name]
	if !ok {
		return cluster.Group{}, errNoSuch("group", name)
	}
	return *g, nil
}

// CreateGroup implements Service (two steps, like CreateTarget).
func (s *NodeService) CreateGroup(ctx context.Context, g cluster.Group) error {
	if _, err := s.Group(ctx, g.Name); err == nil {
		return fmt.Errorf("%w: group %s", cluster.ErrExists, g.Name)
	}
	_, err := s.propose(ctx, &cluster.Command{Kind: cluster.KindGroupPut, GroupPut: &cluster.GroupPutCmd{Group: g}})
	return err
}

// MoveGroup implements Service.
func (s *NodeService) MoveGroup(ctx context.Context, group, node string) error {
	_, err := s.propose(ctx, &cluster.Command{Kind: cluster.KindGroupMove, GroupMove: &cluster.GroupMoveCmd{Group: group, Node: node}})
	return err
}

// FenceDevices implements Service.
func (s *NodeService) FenceDevices(ctx context.Context) ([]cluster.FenceDevice, error) {
	st := s.n.FSM().State()
	out := make([]cluster.FenceDevice, 0, len(st.FenceDevices))
	for _, name := range slices.Sorted(maps.Keys(st.FenceDevices)) {
		out = append(out, *st.FenceDevices[name])
	}
	return out, nil
}

// FenceDevice implements Service.
func (s *NodeService) FenceDevice(ctx context.Context, name string) (cluster.FenceDevice, error) {
	var (
		d  cluster.FenceDevice
		ok bool
	)
	s.n.FSM().Read(func(st *cluster.State) {
		var p *cluster.FenceDevice
		if p, ok = st.FenceDevices[name]; ok {
			d = *p
			d.Config = slices.Clone(p.Config)
		}
	})
	if !ok {
		return cluster.FenceDevice{}, errNoSuch("fence device", name)
	}
	return d, nil
}

// PutFenceDevice implements Service.
func (s *NodeService) PutFenceDevice(ctx context.Context, name string, config []byte) error {
	_, err := s.propose(ctx, &cluster.Command{Kind: cluster.KindFenceDevicePut,
		FenceDevicePut: &cluster.FenceDevicePutCmd{Name: name, Config: slices.Clone(config)}})
	return err
}

// DeleteFenceDevice implements Service.
func (s *NodeService) DeleteFenceDevice(ctx context.Context, name string) error {
	_, err := s.propose(ctx, &cluster.Command{Kind: cluster.KindFenceDeviceDelete,
		FenceDeviceDelete: &cluster.FenceDeviceDeleteCmd{Name: name}})
	return err
}

// SetNodeFence implements Service. The cluster refuses a level naming an
// unknown device as invalid; the check here, on the local replica, makes
// it a not-found naming the device for the operator. A device deleted
// between the check and the commit still gets the cluster's refusal.
func (s *NodeService) SetNodeFence(ctx context.Context, id string, topo fencing.NodeTopology) error {
	var missing string
	var nodeKnown bool
	s.n.FSM().Read(func(st *cluster.State) {
		_, nodeKnown = st.Nodes[id]
		for _, lvl := range topo.Levels {
			for _, d := range lvl {
				if _, ok := st.FenceDevices[d]; !ok && missing == "" {
					missing = d
				}
			}
		}
	})
	if !nodeKnown {
		return errNoSuch("node", id)
	}
	if missing != "" {
		return errNoSuch("fence device", missing)
	}
	_, err := s.propose(ctx, &cluster.Command{Kind: cluster.KindNodeSetFence,
		NodeSetFence: &cluster.NodeSetFenceCmd{ID: id, Topology: topo}})
	return err
}

// heardRecently is how recent a heartbeat makes ConfirmFence refuse: the
// node is evidently running. It only catches the obvious mistake early;
// the cluster's manual device ignores any confirmation older than the
// node's last heartbeat whatever this says.
const heardRecently = 2 * cluster.DefaultFailureTimeout

// ConfirmFence implements Service through cluster.Node.ConfirmFence. It
// refuses, before committing anything, a node that this node still hears
// heartbeats from, and this node itself.
func (s *NodeService) ConfirmFence(ctx context.Context, node, operator string) error {
	if node == s.n.ID() {
		return fmt.Errorf("%w: node %s is serving this request: it is running, not off; nothing recorded", cluster.ErrNodeState, node)
	}
	if at, ok := s.n.LastSeen()[node]; ok {
		if ago := time.Since(at); ago < heardRecently {
			return fmt.Errorf("%w: node %s sent a heartbeat %v ago: it is running, not off; nothing recorded",
				cluster.ErrNodeState, node, ago.Round(time.Millisecond))
		}
	}
	err := s.n.ConfirmFence(ctx, node, operator)
	if err != nil && errors.Is(err, cluster.ErrNotLeader) {
		return &NotLeaderError{LeaderAPI: s.leaderAPI(), Err: err}
	}
	return err
}

// FenceHistory implements Service.
func (s *NodeService) FenceHistory(ctx context.Context, node string, limit int) ([]fencing.Record, error) {
	var out []fencing.Record
	s.n.FSM().Read(func(st *cluster.State) {
		for i := len(st.FenceHistory) - 1; i >= 0; i-- {
			r := st.FenceHistory[i]
			if node != "" && r.Node != node {
				continue
			}
			out = append(out, r)
			if limit > 0 && len(out) == limit {
				return
			}
		}
	})
	return out, nil
}

// Events implements Service.
func (s *NodeService) Events(ctx context.Context, limit int) ([]cluster.Event, error) {
	var out []cluster.Event
	s.n.FSM().Read(func(st *cluster.State) {
		for i := len(st.Events) - 1; i >= 0; i-- {
			out = append(out, st.Events[i])
			if limit > 0 && len(out) == limit {
				return
			}
		}
	})
	return out, nil
}

// raftStates lists every raft role so /metrics exports a 0 for the others.
var raftStates = []string{raft.Follower.String(), raft.Candidate.String(), raft.Leader.String(), raft.Shutdown.String()}

var _ ReplicaService = (*NodeService)(nil)

// SetVolumeReplicas implements ReplicaService.
func (s *NodeService) SetVolumeReplicas(ctx context.Context, uuid string, req ReplicasRequest) (cluster.Volume, error) {
	res, err := s.propose(ctx, &cluster.Command{Kind: cluster.KindVolumeReplicas,
		VolumeReplicas: &cluster.VolumeReplicasCmd{UUID: uuid, Remove: req.Remove, Add: req.Add}})
	if err != nil {
		return cluster.Volume{}, err
	}
	if v, ok := res.(cluster.Volume); ok {
		return v, nil
	}
	// Forwarded from a follower, the result may not come back: read it.
	return s.Volume(ctx, uuid)
}

// ReplaceNode implements ReplicaService (see ReplaceNode).
func (s *NodeService) ReplaceNode(ctx context.Context, node string, req ReplaceNodeRequest) (ReplaceNodeResult, error) {
	return ReplaceNode(ctx, s, node, req)
}

var _ CertService = (*NodeService)(nil)

// RevokeCert implements CertService.
func (s *NodeService) RevokeCert(ctx context.Context, req RevokeCertRequest) (RevokeCertResult, error) {
	serial, err := cluster.ParseSerial(req.Serial)
	if err != nil {
		return RevokeCertResult{}, err
	}
	already := s.n.FSM().CertRevoked(serial)
	if _, err := s.propose(ctx, &cluster.Command{Kind: cluster.KindCertRevoke,
		CertRevoke: &cluster.CertRevokeCmd{Serial: serial, CN: req.CN, Force: req.Force}}); err != nil {
		return RevokeCertResult{}, err
	}
	return RevokeCertResult{Serial: serial, AlreadyRevoked: already}, nil
}
