package cluster

import (
	"fmt"
	"slices"
)

// volumeReplicas applies a VolumeReplicasCmd. The rules, in the order an
// operator meets them:
//   - Add is a storage node, online or standby (a node in maintenance or
//     fenced is being worked on or is dead: it would only be dialled in
//     vain), not already holding a replica;
//   - Remove holds a replica and is not the primary: the primary's
//     session is the one that syncs the others, so the operator moves the
//     group first;
//   - a group moving to Remove is not changed under the move.
//
// The primary and the epoch stay. Remove leaves the ISR here, without the
// primary's generation bump: that is safe because a replica outside the
// ISR with no dirty bitmap at the primary is always fully synced if it is
// ever added back, and isr-add refuses a node outside Replicas, so the
// primary's session, until its agent reopens it with the new set, cannot
// put Remove back. Add is left out of the ISR: a replica created now is
// fresh at the creation generation, which replication takes as in sync
// only from a primary that has never written; it gets a full sync
// otherwise and joins the ISR through isr-add once caught up.
func (s *State) volumeReplicas(c *Command, cmd *VolumeReplicasCmd) (Volume, error) {
	v, ok := s.Volumes[cmd.UUID]
	if !ok {
		return Volume{}, fmt.Errorf("%w: volume %s", ErrNotFound, cmd.UUID)
	}
	if cmd.Add == "" && cmd.Remove == "" {
		return Volume{}, invalidf("volume %s: name a replica to add, to remove, or both", cmd.UUID)
	}
	if cmd.Add == cmd.Remove {
		return Volume{}, invalidf("volume %s: node %s cannot replace itself", cmd.UUID, cmd.Add)
	}
	if !slices.Contains(v.ISR, v.Primary) {
		// Never happens through the other commands; refused so that a
		// replica change cannot leave a volume nobody can serve.
		return Volume{}, invalidf("volume %s: primary %s is not in the ISR %v", cmd.UUID, v.Primary, v.ISR)
	}
	if cmd.Add != "" {
		n, ok := s.Nodes[cmd.Add]
		if !ok {
			return Volume{}, fmt.Errorf("%w: node %s (join it to the cluster first)", ErrNotFound, cmd.Add)
		}
		if n.Role != RoleStorage {
			return Volume{}, invalidf("node %s is a %s node: only storage nodes hold replicas", cmd.Add, n.Role)
		}
		if n.State != NodeOnline && n.State != NodeStandby {
			return Volume{}, fmt.Errorf("%w: node %s is %s: set it online before it takes a replica", ErrNodeState, cmd.Add, n.State)
		}
		if slices.Contains(v.Replicas, cmd.Add) {
			return Volume{}, fmt.Errorf("%w: node %s already holds a replica of volume %s", ErrExists, cmd.Add, cmd.UUID)
		}
	}
	if cmd.Remove != "" {
		if !slices.Contains(v.Replicas, cmd.Remove) {
			return Volume{}, fmt.Errorf("%w: node %s holds no replica of volume %s (replicas %v)", ErrNotFound, cmd.Remove, cmd.UUID, v.Replicas)
		}
		if cmd.Remove == v.Primary {
			if g := s.groupOfVolume(cmd.UUID); g != "" {
				return Volume{}, fmt.Errorf("%w: node %s is the primary of volume %s: move group %s to another node first (hasan group move %s --to NODE)",
					ErrInUse, cmd.Remove, cmd.UUID, g, g)
			}
			return Volume{}, fmt.Errorf("%w: node %s is the primary of volume %s, which is in no group: the primary cannot be replaced",
				ErrInUse, cmd.Remove, cmd.UUID)
		}
		if g := s.groupOfVolume(cmd.UUID); g != "" && s.Groups[g].MovingTo == cmd.Remove {
			return Volume{}, fmt.Errorf("%w: group %s is moving to node %s: wait for the move to finish", ErrInUse, g, cmd.Remove)
		}
	}
	if cmd.Remove != "" {
		drop := func(n string) bool { return n == cmd.Remove }
		v.Replicas = slices.DeleteFunc(v.Replicas, drop)
		v.ISR = slices.DeleteFunc(v.ISR, drop)
	}
	if cmd.Add != "" {
		v.Replicas = append(v.Replicas, cmd.Add)
	}
	var msg string
	switch {
	case cmd.Add != "" && cmd.Remove != "":
		msg = fmt.Sprintf("volume %s: replica %s replaced by %s (syncing)", v.UUID, cmd.Remove, cmd.Add)
	case cmd.Add != "":
		msg = fmt.Sprintf("volume %s: replica added on %s (syncing)", v.UUID, cmd.Add)
	default:
		msg = fmt.Sprintf("volume %s: replica on %s removed", v.UUID, cmd.Remove)
	}
	s.event(c, SeverityInfo, "volume-replicas", cmd.Add, s.groupOfVolume(v.UUID), msg)
	return *v.clone(), nil
}

// groupOfVolume names the group whose targets export volume, or "".
func (s *State) groupOfVolume(uuid string) string {
	if t := s.TargetOfVolume(uuid); t != "" {
		return s.GroupOfTarget(t)
	}
	return ""
}

// VolumesOf lists, sorted, the volumes holding a replica on node.
func (s *State) VolumesOf(node string) []string {
	var out []string
	for _, uuid := range sortedKeys(s.Volumes) {
		if slices.Contains(s.Volumes[uuid].Replicas, node) {
			out = append(out, uuid)
		}
	}
	return out
}
