package cluster

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/hasan-storage/hasan/fencing"
	"github.com/hasan-storage/hasan/replication"
	"github.com/hasan-storage/hasan/target"
)

// Errors Apply returns. ISR commands also return replication's sentinels
// (ErrStaleEpoch, ErrNotPrimary, ErrNotInISR, ErrNotCaughtUp,
// ErrUnknownVolume) so the replication layer can branch on them.
var (
	ErrNotFound    = errors.New("cluster: not found")
	ErrExists      = errors.New("cluster: already exists")
	ErrInvalid     = errors.New("cluster: invalid command")
	ErrInUse       = errors.New("cluster: in use")
	ErrNotOwner    = errors.New("cluster: not the owner")
	ErrNotFenced   = errors.New("cluster: old owner not confirmed fenced")
	ErrToken       = errors.New("cluster: join token invalid, expired or used")
	ErrNodeState   = errors.New("cluster: node state does not allow this")
	ErrGroupOwned  = errors.New("cluster: group is owned")
	ErrOwnerDiffer = errors.New("cluster: volume primary differs from group owner")
)

func invalidf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// Apply validates c against the state and, only if every check passes,
// changes the state. A refused command leaves the state untouched. It reads
// no clock and does no I/O: the same log gives the same state everywhere.
func (s *State) Apply(c *Command) (any, error) {
	if c == nil {
		return nil, invalidf("nil command")
	}
	switch c.Kind {
	case KindNodeAdd:
		if c.NodeAdd == nil {
			break
		}
		return nil, s.nodeAdd(c, c.NodeAdd.Node)
	case KindNodeRemove:
		if c.NodeRemove == nil {
			break
		}
		return nil, s.nodeRemove(c, c.NodeRemove)
	case KindNodeSetState:
		if c.NodeSetState == nil {
			break
		}
		return nil, s.nodeSetState(c, c.NodeSetState)
	case KindNodeSetFence:
		if c.NodeSetFence == nil {
			break
		}
		return nil, s.nodeSetFence(c.NodeSetFence)
	case KindVolumeCreate:
		if c.VolumeCreate == nil {
			break
		}
		return nil, s.volumeCreate(c.VolumeCreate)
	case KindVolumeResize:
		if c.VolumeResize == nil {
			break
		}
		return nil, s.volumeResize(c.VolumeResize)
	case KindVolumeDelete:
		if c.VolumeDelete == nil {
			break
		}
		return nil, s.volumeDelete(c.VolumeDelete)
	case KindISRRemove:
		if c.ISRRemove == nil {
			break
		}
		return s.isrRemove(c.ISRRemove)
	case KindISRAdd:
		if c.ISRAdd == nil {
			break
		}
		return s.isrAdd(c.ISRAdd)
	case KindTargetPut:
		if c.TargetPut == nil {
			break
		}
		return nil, s.targetPut(c.TargetPut.Target)
	case KindTargetDelete:
		if c.TargetDelete == nil {
			break
		}
		return nil, s.targetDelete(c.TargetDelete.IQN)
	case KindGroupPut:
		if c.GroupPut == nil {
			break
		}
		return nil, s.groupPut(c.GroupPut.Group)
	case KindGroupDelete:
		if c.GroupDelete == nil {
			break
		}
		return nil, s.groupDelete(c.GroupDelete.Name)
	case KindGroupGrant:
		if c.GroupGrant == nil {
			break
		}
		return nil, s.groupGrant(c, c.GroupGrant)
	case KindGroupMove:
		if c.GroupMove == nil {
			break
		}
		return nil, s.groupMove(c, c.GroupMove)
	case KindGroupRelease:
		if c.GroupRelease == nil {
			break
		}
		return nil, s.groupRelease(c, c.GroupRelease)
	case KindTakeover:
		if c.Takeover == nil {
			break
		}
		return nil, s.takeover(c, c.Takeover)
	case KindPRSave:
		if c.PRSave == nil {
			break
		}
		return nil, s.prSave(c.PRSave)
	case KindFenceDevicePut:
		if c.FenceDevicePut == nil {
			break
		}
		return nil, s.fenceDevicePut(c.FenceDevicePut)
	case KindFenceDeviceDelete:
		if c.FenceDeviceDelete == nil {
			break
		}
		return nil, s.fenceDeviceDelete(c.FenceDeviceDelete.Name)
	case KindFenceRecord:
		if c.FenceRecord == nil {
			break
		}
		s.FenceHistory = appendBounded(s.FenceHistory, c.FenceRecord.Record, MaxFenceHistory)
		return nil, nil
	case KindEvent:
		if c.Event == nil {
			break
		}
		ev := c.Event.Event
		if ev.Severity == "" {
			ev.Severity = SeverityInfo
		}
		s.event(c, ev.Severity, ev.Kind, ev.Node, ev.Group, ev.Message)
		return nil, nil
	case KindMaintenance:
		if c.Maintenance == nil {
			break
		}
		if s.Maintenance != c.Maintenance.On {
			s.Maintenance = c.Maintenance.On
			s.event(c, SeverityWarn, "maintenance", "", "", fmt.Sprintf("cluster maintenance %v", c.Maintenance.On))
		}
		return nil, nil
	case KindTokenIssue:
		if c.TokenIssue == nil {
			break
		}
		return nil, s.tokenIssue(c, c.TokenIssue)
	case KindJoin:
		if c.Join == nil {
			break
		}
		return nil, s.join(c, c.Join)
	case KindGroupConns:
		if c.GroupConns == nil {
			break
		}
		return nil, s.groupConns(c.GroupConns)
	case KindGroupMoveCancel:
		if c.GroupMoveCancel == nil {
			break
		}
		return nil, s.groupMoveCancel(c, c.GroupMoveCancel)
	case KindFenceConfirm:
		if c.FenceConfirm == nil {
			break
		}
		return nil, s.fenceConfirm(c, c.FenceConfirm)
	case KindVolumeReplicas:
		if c.VolumeReplicas == nil {
			break
		}
		return s.volumeReplicas(c, c.VolumeReplicas)
	case KindCertRevoke:
		if c.CertRevoke == nil {
			break
		}
		return nil, s.certRevoke(c, c.CertRevoke)
	default:
		return nil, invalidf("unknown kind %s", c.Kind)
	}
	return nil, invalidf("%s without its payload", c.Kind)
}

func appendBounded[T any](list []T, v T, max int) []T {
	list = append(list, v)
	if len(list) > max {
		list = slices.Delete(list, 0, len(list)-max)
	}
	return list
}

func (s *State) event(c *Command, sev Severity, kind, node, group, msg string) {
	s.EventSeq++
	s.Events = appendBounded(s.Events, Event{
		Seq: s.EventSeq, Time: c.At, Severity: sev, Kind: kind, Node: node, Group: group, Message: msg,
	}, MaxEvents)
}

func validID(what, id string) error {
	if id == "" || len(id) > 64 {
		return invalidf("%s %q: 1 to 64 characters", what, id)
	}
	for _, r := range id {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return invalidf("%s %q: only a-z, 0-9, '-', '_' and '.'", what, id)
		}
	}
	return nil
}

func validAddr(field, addr string, required bool) error {
	if addr == "" {
		if required {
			return invalidf("%s is required", field)
		}
		return nil
	}
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return invalidf("%s %q: %v", field, addr, err)
	}
	return nil
}

func (s *State) validateNode(n *NodeInfo) error {
	if err := validID("node id", n.ID); err != nil {
		return err
	}
	if n.Role != RoleStorage && n.Role != RoleWitness {
		return invalidf("node %s: role %q: want storage or witness", n.ID, n.Role)
	}
	if err := validAddr("raft_addr", n.RaftAddr, true); err != nil {
		return err
	}
	for _, a := range [][2]string{{"api_addr", n.APIAddr}, {"data_addr", n.DataAddr}, {"portal_addr", n.PortalAddr}} {
		if err := validAddr(a[0], a[1], false); err != nil {
			return err
		}
	}
	for id, o := range s.Nodes {
		if id != n.ID && o.RaftAddr == n.RaftAddr {
			return fmt.Errorf("%w: raft_addr %s is node %s's", ErrExists, n.RaftAddr, id)
		}
	}
	if len(n.Fence.Levels) > 0 {
		if err := s.validateTopology(n.ID, n.Fence); err != nil {
			return err
		}
	}
	return s.validateNodeCerts(n)
}

func (s *State) validateTopology(node string, t fencing.NodeTopology) error {
	f := &fencing.Fencer{Devices: map[string]fencing.Device{}, Nodes: map[string]fencing.NodeTopology{node: t}}
	for name := range s.FenceDevices {
		f.Devices[name] = fencing.Device{}
	}
	if err := f.Validate(); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return nil
}

func (s *State) nodeAdd(c *Command, n NodeInfo) error {
	if _, ok := s.Nodes[n.ID]; ok {
		return fmt.Errorf("%w: node %s", ErrExists, n.ID)
	}
	n.State = NodeOnline
	n.JoinedAt = c.At
	if err := s.validateNode(&n); err != nil {
		return err
	}
	s.Nodes[n.ID] = n.clone()
	s.event(c, SeverityInfo, "node-added", n.ID, "", fmt.Sprintf("node %s added as %s", n.ID, n.Role))
	return nil
}

func (s *State) nodeRemove(c *Command, cmd *NodeRemoveCmd) error {
	n, ok := s.Nodes[cmd.ID]
	if !ok {
		return fmt.Errorf("%w: node %s", ErrNotFound, cmd.ID)
	}
	if g := s.OwnedGroups(cmd.ID); len(g) > 0 {
		return fmt.Errorf("%w: node %s owns groups %v", ErrInUse, cmd.ID, g)
	}
	for _, uuid := range sortedKeys(s.Volumes) {
		if slices.Contains(s.Volumes[uuid].Replicas, cmd.ID) {
			return fmt.Errorf("%w: node %s holds a replica of volume %s", ErrInUse, cmd.ID, uuid)
		}
	}
	for _, name := range sortedKeys(s.Groups) {
		if s.Groups[name].MovingTo == cmd.ID {
			return fmt.Errorf("%w: group %s is moving to node %s", ErrInUse, name, cmd.ID)
		}
	}
	// The removed node's certificates stop working everywhere; a node
	// that rejoins under this id gets a new certificate (revoke.go).
	s.revokeNodeCerts(c, n)
	delete(s.Nodes, cmd.ID)
	for _, g := range s.Groups {
		g.Preferred = slices.DeleteFunc(g.Preferred, func(n string) bool { return n == cmd.ID })
	}
	return nil
}

func (s *State) nodeSetState(c *Command, cmd *NodeSetStateCmd) error {
	n, ok := s.Nodes[cmd.ID]
	if !ok {
		return fmt.Errorf("%w: node %s", ErrNotFound, cmd.ID)
	}
	switch cmd.State {
	case NodeOnline, NodeStandby, NodeMaintenance:
	case NodeFenced:
		return invalidf("fenced is set only by a confirmed takeover")
	default:
		return invalidf("node state %q", cmd.State)
	}
	if n.State == cmd.State {
		return nil
	}
	from := n.State
	n.State = cmd.State
	if from == NodeFenced {
		// Repaired and back: a confirmation that it was off is history.
		delete(s.FenceConfirms, n.ID)
	}
	s.event(c, SeverityInfo, "node-state", n.ID, "", fmt.Sprintf("node %s %s -> %s", n.ID, from, cmd.State))
	return nil
}

func (s *State) nodeSetFence(cmd *NodeSetFenceCmd) error {
	n, ok := s.Nodes[cmd.ID]
	if !ok {
		return fmt.Errorf("%w: node %s", ErrNotFound, cmd.ID)
	}
	if err := s.validateTopology(cmd.ID, cmd.Topology); err != nil {
		return err
	}
	nn := *n
	nn.Fence = cmd.Topology
	s.Nodes[cmd.ID] = nn.clone()
	return nil
}

func validUUID(u string) error {
	if len(u) != 36 || u[8] != '-' || u[13] != '-' || u[18] != '-' || u[23] != '-' {
		return invalidf("volume uuid %q", u)
	}
	for i, r := range u {
		if i == 8 || i == 13 || i == 18 || i == 23 {
			continue
		}
		if !(r >= '0' && r <= '9' || r >= 'a' && r <= 'f') {
			return invalidf("volume uuid %q: lower-case hex only", u)
		}
	}
	return nil
}

func (s *State) volumeCreate(cmd *VolumeCreateCmd) error {
	if err := validUUID(cmd.UUID); err != nil {
		return err
	}
	if _, ok := s.Volumes[cmd.UUID]; ok {
		return fmt.Errorf("%w: volume %s", ErrExists, cmd.UUID)
	}
	bs := cmd.BlockSize
	if bs == 0 {
		bs = 512
	}
	if bs != 512 && bs != 4096 {
		return invalidf("block size %d: want 512 or 4096", bs)
	}
	if cmd.Size <= 0 || cmd.Size%int64(bs) != 0 {
		return invalidf("size %d: a positive multiple of %d", cmd.Size, bs)
	}
	if len(cmd.Replicas) == 0 || !slices.Contains(cmd.Replicas, cmd.Primary) {
		return invalidf("primary %q must be one of the replicas %v", cmd.Primary, cmd.Replicas)
	}
	for i, r := range cmd.Replicas {
		n, ok := s.Nodes[r]
		if !ok {
			return fmt.Errorf("%w: replica node %s", ErrNotFound, r)
		}
		if n.Role != RoleStorage {
			return invalidf("replica node %s is a %s", r, n.Role)
		}
		if slices.Contains(cmd.Replicas[:i], r) {
			return invalidf("replica node %s listed twice", r)
		}
	}
	if cmd.CreationGen != 0 {
		// A shared one would harm nothing (generations are compared
		// per volume), but replication asks for one never reused, and
		// 64 random bits repeat only through a proposer's bug.
		for _, v := range s.Volumes {
			if v.CreationGen == cmd.CreationGen {
				return fmt.Errorf("%w: creation generation %#x is volume %s's", ErrExists, cmd.CreationGen, v.UUID)
			}
		}
	}
	s.Volumes[cmd.UUID] = &Volume{
		UUID: cmd.UUID, Name: cmd.Name, Size: cmd.Size, BlockSize: bs, Thin: cmd.Thin,
		Replicas: slices.Clone(cmd.Replicas), ISR: slices.Clone(cmd.Replicas),
		Primary: cmd.Primary, Epoch: 1, CreationGen: cmd.CreationGen,
	}
	return nil
}

func (s *State) volumeResize(cmd *VolumeResizeCmd) error {
	v, ok := s.Volumes[cmd.UUID]
	if !ok {
		return fmt.Errorf("%w: volume %s", ErrNotFound, cmd.UUID)
	}
	if cmd.Size < v.Size || cmd.Size%int64(v.BlockSize) != 0 {
		return invalidf("size %d: must grow from %d in %d-byte blocks", cmd.Size, v.Size, v.BlockSize)
	}
	v.Size = cmd.Size
	return nil
}

func (s *State) volumeDelete(cmd *VolumeDeleteCmd) error {
	if _, ok := s.Volumes[cmd.UUID]; !ok {
		return fmt.Errorf("%w: volume %s", ErrNotFound, cmd.UUID)
	}
	if t := s.TargetOfVolume(cmd.UUID); t != "" {
		return fmt.Errorf("%w: volume %s is exported by %s", ErrInUse, cmd.UUID, t)
	}
	delete(s.Volumes, cmd.UUID)
	delete(s.PR, cmd.UUID)
	return nil
}

// checkPrimary applies replication's rule: only the current primary at the
// current epoch changes the ISR.
func (s *State) checkPrimary(volume string, epoch uint64, primary string) (*Volume, error) {
	v, ok := s.Volumes[volume]
	if !ok {
		return nil, fmt.Errorf("%w: %s", replication.ErrUnknownVolume, volume)
	}
	if epoch < v.Epoch {
		return nil, fmt.Errorf("%w: %d < %d", replication.ErrStaleEpoch, epoch, v.Epoch)
	}
	if epoch != v.Epoch || primary != v.Primary {
		return nil, fmt.Errorf("%w: %s at epoch %d", replication.ErrNotPrimary, primary, epoch)
	}
	return v, nil
}

func membershipOf(v *Volume) replication.MembershipState {
	return replication.MembershipState{Epoch: v.Epoch, Primary: v.Primary, ISR: slices.Clone(v.ISR)}
}

func (s *State) isrRemove(cmd *ISRRemoveCmd) (replication.MembershipState, error) {
	v, err := s.checkPrimary(cmd.Volume, cmd.Epoch, cmd.Primary)
	if err != nil {
		return replication.MembershipState{}, err
	}
	if cmd.Replica == cmd.Primary {
		return replication.MembershipState{}, invalidf("primary %s cannot remove itself", cmd.Primary)
	}
	v.ISR = slices.DeleteFunc(v.ISR, func(n string) bool { return n == cmd.Replica })
	return membershipOf(v), nil
}

func (s *State) isrAdd(cmd *ISRAddCmd) (replication.MembershipState, error) {
	v, err := s.checkPrimary(cmd.Volume, cmd.Epoch, cmd.Primary)
	if err != nil {
		return replication.MembershipState{}, err
	}
	p := cmd.Proof
	if p.DirtyBytes != 0 || p.PrimaryGen == 0 || p.PrimaryGen != p.ReplicaGen {
		return replication.MembershipState{}, fmt.Errorf("%w: %s %+v", replication.ErrNotCaughtUp, cmd.Replica, p)
	}
	if !slices.Contains(v.Replicas, cmd.Replica) {
		return replication.MembershipState{}, invalidf("node %s holds no replica of %s", cmd.Replica, cmd.Volume)
	}
	if !slices.Contains(v.ISR, cmd.Replica) {
		v.ISR = append(v.ISR, cmd.Replica)
	}
	return membershipOf(v), nil
}

func validCHAP(field string, c *CHAP) error {
	if c == nil {
		return nil
	}
	if c.User == "" {
		return invalidf("%s.user is empty", field)
	}
	if n := len(c.Secret); n < 12 || n > 255 {
		// 12 is what open-iscsi and Windows accept; a cluster refuses
		// what a standalone target only warns about.
		return invalidf("%s.secret: 12 to 255 bytes", field)
	}
	return nil
}

func (s *State) targetPut(t Target) error {
	if err := target.ValidateName(t.IQN); err != nil {
		return invalidf("target iqn: %v", err)
	}
	t.IQN = strings.ToLower(t.IQN)
	for i, a := range t.ACL {
		if err := target.ValidateName(a); err != nil {
			return invalidf("acl[%d]: %v", i, err)
		}
	}
	if err := validCHAP("chap", t.CHAP); err != nil {
		return err
	}
	if err := validCHAP("mutual_chap", t.MutualCHAP); err != nil {
		return err
	}
	if t.MutualCHAP != nil && (t.CHAP == nil || t.CHAP.Secret == t.MutualCHAP.Secret) {
		return invalidf("mutual_chap needs chap with a different secret")
	}
	group := s.GroupOfTarget(t.IQN)
	var owner string
	if group != "" {
		owner = s.Groups[group].Owner
	}
	for _, lun := range slices.Sorted(maps.Keys(t.LUNs)) {
		uuid := t.LUNs[lun]
		if lun > 16383 {
			return invalidf("lun %d: at most 16383", lun)
		}
		v, ok := s.Volumes[uuid]
		if !ok {
			return fmt.Errorf("%w: volume %s (lun %d)", ErrNotFound, uuid, lun)
		}
		if other := s.TargetOfVolume(uuid); other != "" && other != t.IQN {
			return fmt.Errorf("%w: volume %s is exported by %s", ErrInUse, uuid, other)
		}
		for l2, u2 := range t.LUNs {
			if l2 != lun && u2 == uuid {
				return invalidf("volume %s mapped twice", uuid)
			}
		}
		if owner != "" && v.Primary != owner {
			return fmt.Errorf("%w: volume %s primary %s, group %s owner %s", ErrOwnerDiffer, uuid, v.Primary, group, owner)
		}
	}
	s.Targets[t.IQN] = t.clone()
	return nil
}

func (s *State) targetDelete(iqn string) error {
	iqn = strings.ToLower(iqn)
	if _, ok := s.Targets[iqn]; !ok {
		return fmt.Errorf("%w: target %s", ErrNotFound, iqn)
	}
	if g := s.GroupOfTarget(iqn); g != "" {
		return fmt.Errorf("%w: target %s is in group %s", ErrInUse, iqn, g)
	}
	delete(s.Targets, iqn)
	return nil
}

func (s *State) groupPut(g Group) error {
	if err := validID("group name", g.Name); err != nil {
		return err
	}
	if len(g.VIPs) == 0 {
		return invalidf("group %s needs at least one VIP", g.Name)
	}
	for i, v := range g.VIPs {
		p, err := netip.ParsePrefix(v)
		if err != nil {
			return invalidf("vips[%d] %q: %v", i, v, err)
		}
		for _, name := range sortedKeys(s.Groups) {
			if name == g.Name {
				continue
			}
			for _, o := range s.Groups[name].VIPs {
				if op, _ := netip.ParsePrefix(o); op.Addr() == p.Addr() {
					return fmt.Errorf("%w: vip %s is group %s's", ErrInUse, v, name)
				}
			}
		}
	}
	cur := s.Groups[g.Name]
	owner := ""
	if cur != nil {
		owner = cur.Owner
	}
	for i, iqn := range g.Targets {
		if _, ok := s.Targets[iqn]; !ok {
			return fmt.Errorf("%w: target %s", ErrNotFound, iqn)
		}
		if o := s.GroupOfTarget(iqn); o != "" && o != g.Name {
			return fmt.Errorf("%w: target %s is in group %s", ErrInUse, iqn, o)
		}
		if slices.Contains(g.Targets[:i], iqn) {
			return invalidf("target %s listed twice", iqn)
		}
		if owner != "" {
			for _, uuid := range s.Targets[iqn].LUNs {
				if p := s.Volumes[uuid].Primary; p != owner {
					return fmt.Errorf("%w: volume %s primary %s, owner %s", ErrOwnerDiffer, uuid, p, owner)
				}
			}
		}
	}
	for _, n := range g.Preferred {
		node, ok := s.Nodes[n]
		if !ok {
			return fmt.Errorf("%w: preferred node %s", ErrNotFound, n)
		}
		if node.Role != RoleStorage {
			return invalidf("preferred node %s is a witness", n)
		}
	}
	ng := g.clone()
	ng.Owner, ng.Epoch, ng.MovingTo, ng.Conns = "", 0, "", nil
	if cur != nil {
		ng.Owner, ng.Epoch, ng.MovingTo = cur.Owner, cur.Epoch, cur.MovingTo
		// Recorded connections stay while their VIP stays in the group.
		for _, c := range cur.Conns {
			if ng.hasVIP(c.Local) {
				ng.Conns = append(ng.Conns, c)
			}
		}
	}
	s.Groups[g.Name] = ng
	return nil
}

func (s *State) groupDelete(name string) error {
	g, ok := s.Groups[name]
	if !ok {
		return fmt.Errorf("%w: group %s", ErrNotFound, name)
	}
	if g.Owner != "" {
		return fmt.Errorf("%w: group %s owned by %s; release it first", ErrGroupOwned, name, g.Owner)
	}
	delete(s.Groups, name)
	return nil
}

// canOwn checks that node may become the owner of group: an online storage
// node in the ISR of every volume of the group.
func (s *State) canOwn(group, node string) error {
	n, ok := s.Nodes[node]
	if !ok {
		return fmt.Errorf("%w: node %s", ErrNotFound, node)
	}
	if n.Role != RoleStorage {
		return invalidf("node %s is a witness", node)
	}
	if n.State != NodeOnline {
		return fmt.Errorf("%w: node %s is %s", ErrNodeState, node, n.State)
	}
	for _, uuid := range s.GroupVolumes(group) {
		if !slices.Contains(s.Volumes[uuid].ISR, node) {
			return fmt.Errorf("%w: %s for volume %s", replication.ErrNotInISR, node, uuid)
		}
	}
	return nil
}

// grantLocked makes node owner and primary with new epochs. Callers have
// validated everything.
func (s *State) grant(g *Group, node string) {
	g.Owner = node
	g.Epoch++
	g.MovingTo = ""
	for _, uuid := range s.GroupVolumes(g.Name) {
		v := s.Volumes[uuid]
		v.Primary = node
		v.Epoch++
	}
}

func (s *State) groupGrant(c *Command, cmd *GroupGrantCmd) error {
	g, ok := s.Groups[cmd.Group]
	if !ok {
		return fmt.Errorf("%w: group %s", ErrNotFound, cmd.Group)
	}
	if g.Owner != "" {
		return fmt.Errorf("%w: group %s owned by %s", ErrGroupOwned, cmd.Group, g.Owner)
	}
	if g.MovingTo != "" && g.MovingTo != cmd.Node {
		return invalidf("group %s is moving to %s, not %s", cmd.Group, g.MovingTo, cmd.Node)
	}
	if err := s.canOwn(cmd.Group, cmd.Node); err != nil {
		return err
	}
	s.grant(g, cmd.Node)
	s.event(c, SeverityInfo, "grant", cmd.Node, cmd.Group, fmt.Sprintf("group %s granted to %s at epoch %d", g.Name, cmd.Node, g.Epoch))
	return nil
}

func (s *State) groupMove(c *Command, cmd *GroupMoveCmd) error {
	g, ok := s.Groups[cmd.Group]
	if !ok {
		return fmt.Errorf("%w: group %s", ErrNotFound, cmd.Group)
	}
	if g.Owner == cmd.Node {
		return invalidf("group %s is already on %s", cmd.Group, cmd.Node)
	}
	if err := s.canOwn(cmd.Group, cmd.Node); err != nil {
		return err
	}
	g.MovingTo = cmd.Node
	s.event(c, SeverityInfo, "move", cmd.Node, cmd.Group, fmt.Sprintf("group %s moving %s -> %s", g.Name, g.Owner, cmd.Node))
	return nil
}

func (s *State) groupRelease(c *Command, cmd *GroupReleaseCmd) error {
	g, ok := s.Groups[cmd.Group]
	if !ok {
		return fmt.Errorf("%w: group %s", ErrNotFound, cmd.Group)
	}
	if g.Owner != cmd.Node || g.Epoch != cmd.Epoch {
		return fmt.Errorf("%w: %s at epoch %d (owner %s at %d)", ErrNotOwner, cmd.Node, cmd.Epoch, g.Owner, g.Epoch)
	}
	g.Owner = ""
	s.event(c, SeverityInfo, "release", cmd.Node, cmd.Group, fmt.Sprintf("group %s released by %s", g.Name, cmd.Node))
	return nil
}

// fenceConfirmed reports whether the history holds a successful off for
// node at or after since. The Fencer records a success only after a Status
// read said off, so this is the confirmation invariant 4 asks for.
func (s *State) fenceConfirmed(node string, since int64) bool {
	for i := len(s.FenceHistory) - 1; i >= 0; i-- {
		r := s.FenceHistory[i]
		if r.Node == node && r.Action == "off" && r.Outcome == fencing.OutcomeSuccess && r.Time.UnixNano() >= since {
			return true
		}
	}
	return false
}

func (s *State) takeover(c *Command, cmd *TakeoverCmd) error {
	g, ok := s.Groups[cmd.Group]
	if !ok {
		return fmt.Errorf("%w: group %s", ErrNotFound, cmd.Group)
	}
	if g.Owner == "" || g.Owner != cmd.From {
		return fmt.Errorf("%w: %s (owner is %q)", ErrNotOwner, cmd.From, g.Owner)
	}
	if cmd.To == cmd.From {
		return invalidf("takeover from %s to itself", cmd.From)
	}
	if cmd.DetectedAt.IsZero() || !s.fenceConfirmed(cmd.From, cmd.DetectedAt.UnixNano()) {
		return fmt.Errorf("%w: no confirmed off for %s since %s", ErrNotFenced, cmd.From, cmd.DetectedAt)
	}
	// The new owner must be in every ISR as it is now: it holds every
	// acknowledged write (invariant 2).
	if err := s.canOwn(cmd.Group, cmd.To); err != nil {
		return err
	}
	from := s.Nodes[cmd.From]
	if from != nil {
		from.State = NodeFenced
	}
	for _, uuid := range s.GroupVolumes(g.Name) {
		v := s.Volumes[uuid]
		v.ISR = slices.DeleteFunc(v.ISR, func(n string) bool { return n == cmd.From })
	}
	// An operator's confirmation serves one takeover only.
	delete(s.FenceConfirms, cmd.From)
	s.grant(g, cmd.To)
	s.event(c, SeverityAlert, "takeover", cmd.To, cmd.Group,
		fmt.Sprintf("group %s taken over from fenced %s by %s at epoch %d", g.Name, cmd.From, cmd.To, g.Epoch))
	return nil
}

func (s *State) prSave(cmd *PRSaveCmd) error {
	if _, ok := s.Volumes[cmd.Volume]; !ok {
		return fmt.Errorf("%w: volume %s", ErrNotFound, cmd.Volume)
	}
	st := cmd.State
	if st.Holder < -1 || st.Holder >= len(st.Registrations) {
		return invalidf("pr holder %d with %d registrations", st.Holder, len(st.Registrations))
	}
	s.PR[cmd.Volume] = clonePR(st)
	return nil
}

func (s *State) fenceDevicePut(cmd *FenceDevicePutCmd) error {
	if err := validID("fence device", cmd.Name); err != nil {
		return err
	}
	var dc fencing.DeviceConfig
	if err := json.Unmarshal(cmd.Config, &dc); err != nil {
		return invalidf("fence device %s: %v", cmd.Name, err)
	}
	if err := (fencing.Config{Devices: map[string]fencing.DeviceConfig{cmd.Name: dc}}).Validate(); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	s.FenceDevices[cmd.Name] = &FenceDevice{Name: cmd.Name, Type: dc.Type, Config: slices.Clone(cmd.Config)}
	return nil
}

func (s *State) fenceDeviceDelete(name string) error {
	if _, ok := s.FenceDevices[name]; !ok {
		return fmt.Errorf("%w: fence device %s", ErrNotFound, name)
	}
	for _, id := range sortedKeys(s.Nodes) {
		for _, l := range s.Nodes[id].Fence.Levels {
			if slices.Contains(l, name) {
				return fmt.Errorf("%w: device %s is in node %s's topology", ErrInUse, name, id)
			}
		}
	}
	delete(s.FenceDevices, name)
	return nil
}

func (s *State) pruneTokens(c *Command) {
	for h, t := range s.Tokens {
		if t.Used || !c.At.Before(t.Expires) {
			delete(s.Tokens, h)
		}
	}
}

func (s *State) tokenIssue(c *Command, cmd *TokenIssueCmd) error {
	if len(cmd.Hash) != 64 {
		return invalidf("token hash: want 64 hex characters")
	}
	if cmd.Role != RoleStorage && cmd.Role != RoleWitness {
		return invalidf("token role %q", cmd.Role)
	}
	if !c.At.Before(cmd.Expires) {
		return invalidf("token already expired")
	}
	s.pruneTokens(c)
	if _, ok := s.Tokens[cmd.Hash]; ok {
		return fmt.Errorf("%w: token", ErrExists)
	}
	s.Tokens[cmd.Hash] = &Token{Hash: cmd.Hash, ID: cmd.ID, Role: cmd.Role, Expires: cmd.Expires}
	return nil
}

func (s *State) join(c *Command, cmd *JoinCmd) error {
	t, ok := s.Tokens[cmd.Hash]
	if !ok || t.Used || !c.At.Before(t.Expires) {
		return ErrToken
	}
	n := cmd.Node
	if n.Role == "" {
		n.Role = t.Role
	}
	if n.Role != t.Role {
		return fmt.Errorf("%w: token is for a %s node", ErrToken, t.Role)
	}
	if _, ok := s.Nodes[n.ID]; ok {
		return fmt.Errorf("%w: node %s", ErrExists, n.ID)
	}
	n.State = NodeOnline
	n.JoinedAt = c.At
	if err := s.validateNode(&n); err != nil {
		return err
	}
	// Used before pruning: the token must never admit a second node, even
	// from a log replayed on a node whose clock reading differs.
	t.Used = true
	s.pruneTokens(c)
	s.Nodes[n.ID] = n.clone()
	s.event(c, SeverityInfo, "node-joined", n.ID, "", fmt.Sprintf("node %s joined as %s with token %s", n.ID, n.Role, t.ID))
	return nil
}

// MaxGroupConns bounds the initiator connections recorded per group: a
// tickle is one small packet each, and the entry must stay small.
const MaxGroupConns = 256

// hasVIP reports whether local ("addr:port") is on one of g's VIPs.
func (g *Group) hasVIP(local string) bool {
	ap, err := netip.ParseAddrPort(local)
	if err != nil {
		return false
	}
	for _, v := range g.VIPs {
		if p, err := netip.ParsePrefix(v); err == nil && p.Addr() == ap.Addr() {
			return true
		}
	}
	return false
}

// validConns checks a connection set for g and returns it sorted.
func validConns(g *Group, conns []InitiatorConn) ([]InitiatorConn, error) {
	if len(conns) > MaxGroupConns {
		return nil, invalidf("%d connections: at most %d", len(conns), MaxGroupConns)
	}
	out := make([]InitiatorConn, 0, len(conns))
	for i, c := range conns {
		l, err1 := netip.ParseAddrPort(c.Local)
		r, err2 := netip.ParseAddrPort(c.Remote)
		if err1 != nil || err2 != nil || l.Addr().Is4() != r.Addr().Is4() || l.Port() == 0 || r.Port() == 0 ||
			l.Addr().Zone() != "" || r.Addr().Zone() != "" {
			return nil, invalidf("conns[%d] %s: want IP:port pairs of one family", i, c)
		}
		if !g.hasVIP(c.Local) {
			return nil, invalidf("conns[%d] %s: local address is not a VIP of group %s", i, c, g.Name)
		}
		// Canonical text, so equal sets compare equal.
		out = append(out, InitiatorConn{Local: l.String(), Remote: r.String()})
	}
	slices.SortFunc(out, compareConns)
	for i := 1; i < len(out); i++ {
		if out[i] == out[i-1] {
			return nil, invalidf("connection %s listed twice", out[i])
		}
	}
	return out, nil
}

func compareConns(a, b InitiatorConn) int {
	if c := strings.Compare(a.Local, b.Local); c != 0 {
		return c
	}
	return strings.Compare(a.Remote, b.Remote)
}

func (s *State) groupConns(cmd *GroupConnsCmd) error {
	g, ok := s.Groups[cmd.Group]
	if !ok {
		return fmt.Errorf("%w: group %s", ErrNotFound, cmd.Group)
	}
	if g.Owner == "" || g.Owner != cmd.Node || g.Epoch != cmd.Epoch {
		return fmt.Errorf("%w: %s at epoch %d (owner %q at %d)", ErrNotOwner, cmd.Node, cmd.Epoch, g.Owner, g.Epoch)
	}
	conns, err := validConns(g, cmd.Conns)
	if err != nil {
		return err
	}
	if len(conns) == 0 {
		conns = nil
	}
	// No event: connections come and go with every login.
	g.Conns = conns
	return nil
}

func (s *State) groupMoveCancel(c *Command, cmd *GroupMoveCancelCmd) error {
	g, ok := s.Groups[cmd.Group]
	if !ok {
		return fmt.Errorf("%w: group %s", ErrNotFound, cmd.Group)
	}
	if g.MovingTo == "" || g.MovingTo != cmd.Node {
		return invalidf("group %s is not moving to %s", cmd.Group, cmd.Node)
	}
	if g.Owner == "" {
		// Released: the grant completes the move; cancelling now would
		// only leave the group unowned longer.
		return fmt.Errorf("%w: group %s is already released", ErrInvalid, cmd.Group)
	}
	g.MovingTo = ""
	s.event(c, SeverityAlert, "move-cancelled", g.Owner, g.Name,
		fmt.Sprintf("move of group %s to %s cancelled: owner %s did not release it in time", g.Name, cmd.Node, g.Owner))
	return nil
}

func (s *State) fenceConfirm(c *Command, cmd *FenceConfirmCmd) error {
	if _, ok := s.Nodes[cmd.Node]; !ok {
		return fmt.Errorf("%w: node %s", ErrNotFound, cmd.Node)
	}
	if cmd.Operator == "" || len(cmd.Operator) > 128 {
		// An anonymous confirmation is refused: it powers a takeover.
		return invalidf("the confirming operator must be named (1 to 128 bytes)")
	}
	if s.FenceConfirms == nil {
		s.FenceConfirms = map[string]FenceConfirmation{}
	}
	s.FenceConfirms[cmd.Node] = FenceConfirmation{Node: cmd.Node, By: cmd.Operator, At: c.At}
	s.event(c, SeverityAlert, "fence-confirmed", cmd.Node, "",
		fmt.Sprintf("operator %s confirmed node %s is powered off", cmd.Operator, cmd.Node))
	return nil
}
