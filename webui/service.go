package webui

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/fencing"
)

// Service is everything the REST API needs from the control plane. Handlers
// only bind a request, call one method and render the result or the error,
// so tests can drive the whole HTTP surface with a fake.
//
// Errors: methods return the cluster sentinels (cluster.ErrNotFound,
// cluster.ErrInvalid, cluster.ErrNotLeader, ...) possibly wrapped, a
// *ValidationError naming the bad field, or a *NotLeaderError. The one
// error table in errors.go turns them into HTTP statuses.
//
// Reads may be served from the local replica of the state, which on a
// follower can lag the leader by a few milliseconds; writes are committed
// through Raft before they return.
type Service interface {
	Status(ctx context.Context) (Status, error)

	Nodes(ctx context.Context) ([]cluster.NodeInfo, error)
	Node(ctx context.Context, id string) (cluster.NodeInfo, error)
	// SetNodeState sets online, standby or maintenance (fenced is only set
	// by a takeover; online clears it).
	SetNodeState(ctx context.Context, id string, state cluster.NodeState) error
	SetMaintenance(ctx context.Context, on bool) error
	// RemoveNode takes a node out of the state and the Raft configuration.
	// The cluster refuses a node that owns a group, holds a replica or is
	// the target of a move (cluster.ErrInUse). It runs on the leader and
	// never removes the answering node itself.
	RemoveNode(ctx context.Context, id string) error

	Volumes(ctx context.Context) ([]cluster.Volume, error)
	Volume(ctx context.Context, uuid string) (cluster.Volume, error)
	CreateVolume(ctx context.Context, spec VolumeSpec) (cluster.Volume, error)
	DeleteVolume(ctx context.Context, uuid string) error

	Targets(ctx context.Context) ([]cluster.Target, error)
	Target(ctx context.Context, iqn string) (cluster.Target, error)
	// CreateTarget refuses an IQN that exists (cluster.ErrExists).
	CreateTarget(ctx context.Context, t cluster.Target) error
	DeleteTarget(ctx context.Context, iqn string) error
	AddLUN(ctx context.Context, iqn string, lun uint64, volume string) error
	RemoveLUN(ctx context.Context, iqn string, lun uint64) error
	SetACL(ctx context.Context, iqn string, initiators []string) error
	// SetCHAP replaces both accounts; nil clears one.
	SetCHAP(ctx context.Context, iqn string, chap, mutual *cluster.CHAP) error

	Groups(ctx context.Context) ([]cluster.Group, error)
	Group(ctx context.Context, name string) (cluster.Group, error)
	// CreateGroup refuses a name that exists (cluster.ErrExists).
	CreateGroup(ctx context.Context, g cluster.Group) error
	// MoveGroup starts a planned move; the owner drains and releases, then
	// the controller grants the group to node.
	MoveGroup(ctx context.Context, group, node string) error

	// FenceDevices lists the configured fence devices by name. Their
	// Config holds secrets in clear: handlers show them only through
	// fenceDeviceView, which redacts.
	FenceDevices(ctx context.Context) ([]cluster.FenceDevice, error)
	FenceDevice(ctx context.Context, name string) (cluster.FenceDevice, error)
	// PutFenceDevice creates or replaces a device. config is a
	// fencing.DeviceConfig as JSON, secrets in clear; handlers validate it
	// first, the cluster validates it again when it applies the entry.
	PutFenceDevice(ctx context.Context, name string, config []byte) error
	// DeleteFenceDevice refuses a device a node's topology uses
	// (cluster.ErrInUse).
	DeleteFenceDevice(ctx context.Context, name string) error
	// SetNodeFence replaces a node's fence topology. A level naming an
	// unknown device is a not-found error.
	SetNodeFence(ctx context.Context, id string, topo fencing.NodeTopology) error

	// ConfirmFence commits an operator's statement that node is powered
	// off (cluster's fence-confirm), which cluster's manual fence device
	// is meant to wait for.
	ConfirmFence(ctx context.Context, node, operator string) error

	// FenceHistory returns the newest records first; node "" means all,
	// limit <= 0 means no limit.
	FenceHistory(ctx context.Context, node string, limit int) ([]fencing.Record, error)
	// Events returns the newest events first; limit <= 0 means no limit.
	Events(ctx context.Context, limit int) ([]cluster.Event, error)
}

// Status is the cluster summary behind GET /api/v1/cluster and /metrics.
type Status struct {
	// NodeID is the node answering; RaftState its raft role (Leader,
	// Follower, Candidate, Shutdown).
	NodeID    string `json:"node_id"`
	RaftState string `json:"raft_state"`
	LeaderID  string `json:"leader_id,omitempty"`
	// LeaderAPI is the leader's REST address when the state records it.
	LeaderAPI   string         `json:"leader_api,omitempty"`
	Maintenance bool           `json:"maintenance"`
	Index       uint64         `json:"applied_index"`
	Nodes       map[string]int `json:"nodes_by_state"`
	Volumes     int            `json:"volumes"`
	Targets     int            `json:"targets"`
	Groups      []GroupStatus  `json:"groups"`
}

// GroupStatus is one group's ownership.
type GroupStatus struct {
	Name     string `json:"name"`
	Owner    string `json:"owner,omitempty"`
	Epoch    uint64 `json:"epoch"`
	MovingTo string `json:"moving_to,omitempty"`
}

// VolumeSpec is what an operator gives to create a volume. UUID is chosen
// by the service when empty; BlockSize defaults to 512; Primary defaults to
// the first replica.
type VolumeSpec struct {
	UUID      string   `json:"uuid,omitempty"`
	Name      string   `json:"name"`
	Size      int64    `json:"size"`
	BlockSize uint32   `json:"block_size,omitempty"`
	Thin      bool     `json:"thin,omitempty"`
	Replicas  []string `json:"replicas"`
	Primary   string   `json:"primary,omitempty"`
}

// ValidationError is a request the API refuses before it reaches the
// cluster; Field names the offending JSON field or path parameter.
type ValidationError struct {
	Field, Msg string
}

func (e *ValidationError) Error() string { return fmt.Sprintf("webui: %s: %s", e.Field, e.Msg) }

func invalid(field, format string, args ...any) error {
	return &ValidationError{Field: field, Msg: fmt.Sprintf(format, args...)}
}

// NotLeaderError is cluster.ErrNotLeader with the leader's API address when
// one is known, so the client can retry there.
type NotLeaderError struct {
	LeaderAPI string
	Err       error
}

func (e *NotLeaderError) Error() string {
	if e.Err != nil {
		return e.Err.Error()
	}
	return cluster.ErrNotLeader.Error()
}

// Unwrap keeps errors.Is(err, cluster.ErrNotLeader) true.
func (e *NotLeaderError) Unwrap() []error { return []error{cluster.ErrNotLeader, e.Err} }

// errNoSuch builds a not-found error the table maps to 404.
func errNoSuch(what, id string) error { return fmt.Errorf("%w: %s %s", cluster.ErrNotFound, what, id) }

// ReplicaService is the part of the control plane that changes volumes'
// replica sets. It is separate from Service so that a Service without it
// still builds; the API answers 501 for its routes then. NodeService
// implements it.
type ReplicaService interface {
	// SetVolumeReplicas commits one volume-replicas change: remove leaves
	// the replica set and the ISR, add joins the replica set and enters
	// the ISR only once the primary has synced it. Either may be empty,
	// not both. It returns the volume as committed.
	SetVolumeReplicas(ctx context.Context, uuid string, req ReplicasRequest) (cluster.Volume, error)
	// ReplaceNode replaces node on every volume holding a replica there by
	// req.With, then removes node from the cluster if req.Remove. It
	// changes nothing when node is the primary of any volume
	// (cluster.ErrInUse naming the volumes and their groups).
	ReplaceNode(ctx context.Context, node string, req ReplaceNodeRequest) (ReplaceNodeResult, error)
}

// ReplicasRequest is the body of POST /volumes/{uuid}/replicas.
type ReplicasRequest struct {
	Remove string `json:"remove,omitempty"`
	Add    string `json:"add,omitempty"`
}

// ReplaceNodeRequest is the body of POST /nodes/{id}/replace.
type ReplaceNodeRequest struct {
	With   string `json:"with"`
	Remove bool   `json:"remove,omitempty"`
}

// ReplaceNodeResult reports a node replacement: every volume changed, as
// committed (the new node syncing, outside the ISR until caught up), and
// whether the old node was removed from the cluster.
type ReplaceNodeResult struct {
	Node    string           `json:"node"`
	With    string           `json:"with"`
	Volumes []cluster.Volume `json:"volumes"`
	Removed bool             `json:"removed"`
}

// ReplaceNode is ReplicaService.ReplaceNode in terms of the other calls,
// for every implementation. The primaries are checked first, so a node
// still primary of any volume changes nothing; a group that moves between
// that check and the proposals is refused by the cluster volume by volume,
// and the error then says which volumes were done.
func ReplaceNode(ctx context.Context, svc interface {
	Service
	ReplicaService
}, node string, req ReplaceNodeRequest) (ReplaceNodeResult, error) {
	out := ReplaceNodeResult{Node: node, With: req.With, Volumes: []cluster.Volume{}}
	if _, err := svc.Node(ctx, node); err != nil {
		return out, err
	}
	vols, err := svc.Volumes(ctx)
	if err != nil {
		return out, err
	}
	targets, err := svc.Targets(ctx)
	if err != nil {
		return out, err
	}
	groups, err := svc.Groups(ctx)
	if err != nil {
		return out, err
	}
	groupOf := func(uuid string) string {
		for _, t := range targets {
			for _, u := range t.LUNs {
				if u != uuid {
					continue
				}
				for _, g := range groups {
					if slices.Contains(g.Targets, t.IQN) {
						return "group " + g.Name
					}
				}
			}
		}
		return "in no group"
	}
	var mine []cluster.Volume
	var primaries []string
	for _, v := range vols {
		if !slices.Contains(v.Replicas, node) {
			continue
		}
		mine = append(mine, v)
		if v.Primary == node {
			primaries = append(primaries, fmt.Sprintf("%s (%s, %s)", v.UUID, v.Name, groupOf(v.UUID)))
		}
	}
	if len(primaries) > 0 {
		return out, fmt.Errorf("%w: node %s is the primary of volumes %s: move those groups to another node first "+
			"(hasan group move GROUP --to NODE), then replace again; nothing was changed",
			cluster.ErrInUse, node, strings.Join(primaries, ", "))
	}
	var done []string
	for _, v := range mine {
		nv, err := svc.SetVolumeReplicas(ctx, v.UUID, ReplicasRequest{Remove: node, Add: req.With})
		if err != nil {
			if len(done) == 0 {
				return out, err
			}
			return out, fmt.Errorf("replaced %s on volumes %v, stopped at volume %s: %w", node, done, v.UUID, err)
		}
		done = append(done, v.UUID)
		out.Volumes = append(out.Volumes, nv)
	}
	if req.Remove {
		if err := svc.RemoveNode(ctx, node); err != nil {
			if len(done) == 0 {
				return out, err
			}
			return out, fmt.Errorf("replaced %s on volumes %v, then removing the node: %w", node, done, err)
		}
		out.Removed = true
	}
	return out, nil
}

// CertService revokes cluster certificates (implemented by NodeService);
// without it POST /certs/revoke answers 501.
type CertService interface {
	// RevokeCert commits a cert-revoke of req.Serial, given in any form
	// cluster.ParseSerial accepts. It reports whether the serial was
	// revoked already (then nothing changes). A serial recorded for a
	// current node is refused with cluster.ErrInUse unless req.Force.
	RevokeCert(ctx context.Context, req RevokeCertRequest) (RevokeCertResult, error)
}

// RevokeCertRequest is the body of POST /certs/revoke.
type RevokeCertRequest struct {
	Serial string `json:"serial"`
	// CN is shown in listings; optional.
	CN    string `json:"cn,omitempty"`
	Force bool   `json:"force,omitempty"`
}

// RevokeCertResult is the answer of POST /certs/revoke.
type RevokeCertResult struct {
	Serial         string `json:"serial"`
	AlreadyRevoked bool   `json:"already_revoked"`
}
