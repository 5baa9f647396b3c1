package cluster

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/gob"
	"errors"
	"fmt"
	"time"

	"github.com/hasan-storage/hasan/fencing"
	"github.com/hasan-storage/hasan/replication"
	"github.com/hasan-storage/hasan/target/scsi"
)

// Kind names a command.
type Kind uint8

// Command kinds. Values are part of the log format: append, never renumber.
const (
	KindInvalid Kind = iota
	KindNodeAdd
	KindNodeRemove
	KindNodeSetState
	KindNodeSetFence
	KindVolumeCreate
	KindVolumeResize
	KindVolumeDelete
	KindISRRemove
	KindISRAdd
	KindTargetPut
	KindTargetDelete
	KindGroupPut
	KindGroupDelete
	KindGroupGrant
	KindGroupMove
	KindGroupRelease
	KindTakeover
	KindPRSave
	KindFenceDevicePut
	KindFenceDeviceDelete
	KindFenceRecord
	KindEvent
	KindMaintenance
	KindTokenIssue
	KindJoin
	KindGroupConns
	KindGroupMoveCancel
	KindFenceConfirm
	KindVolumeReplicas
	KindCertRevoke
	kindEnd
)

var kindNames = [...]string{
	"invalid", "node-add", "node-remove", "node-set-state", "node-set-fence",
	"volume-create", "volume-resize", "volume-delete", "isr-remove", "isr-add",
	"target-put", "target-delete", "group-put", "group-delete", "group-grant",
	"group-move", "group-release", "takeover", "pr-save", "fence-device-put",
	"fence-device-delete", "fence-record", "event", "maintenance", "token-issue", "join",
	"group-conns", "group-move-cancel", "fence-confirm", "volume-replicas", "cert-revoke",
}

func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Command is one entry of the Raft log: a kind, the proposer's clock
// reading (Apply never reads a clock) and exactly one payload, the one the
// kind names.
type Command struct {
	Kind Kind
	// At is when the proposer created the command. Apply uses it for event
	// and history times and for token expiry, so every replica computes the
	// same result.
	At time.Time

	NodeAdd           *NodeAddCmd
	NodeRemove        *NodeRemoveCmd
	NodeSetState      *NodeSetStateCmd
	NodeSetFence      *NodeSetFenceCmd
	VolumeCreate      *VolumeCreateCmd
	VolumeResize      *VolumeResizeCmd
	VolumeDelete      *VolumeDeleteCmd
	ISRRemove         *ISRRemoveCmd
	ISRAdd            *ISRAddCmd
	TargetPut         *TargetPutCmd
	TargetDelete      *TargetDeleteCmd
	GroupPut          *GroupPutCmd
	GroupDelete       *GroupDeleteCmd
	GroupGrant        *GroupGrantCmd
	GroupMove         *GroupMoveCmd
	GroupRelease      *GroupReleaseCmd
	Takeover          *TakeoverCmd
	PRSave            *PRSaveCmd
	FenceDevicePut    *FenceDevicePutCmd
	FenceDeviceDelete *FenceDeviceDeleteCmd
	FenceRecord       *FenceRecordCmd
	Event             *EventCmd
	Maintenance       *MaintenanceCmd
	TokenIssue        *TokenIssueCmd
	Join              *JoinCmd
	GroupConns        *GroupConnsCmd
	GroupMoveCancel   *GroupMoveCancelCmd
	FenceConfirm      *FenceConfirmCmd
	VolumeReplicas    *VolumeReplicasCmd
	CertRevoke        *CertRevokeCmd
}

// stamp fills in what the proposer chooses so that every node applies the
// same command: the time, and a new volume's creation generation.
func (c *Command) stamp(now func() time.Time) {
	if c.At.IsZero() {
		c.At = now()
	}
	if c.Kind == KindVolumeCreate && c.VolumeCreate != nil && c.VolumeCreate.CreationGen == 0 {
		c.VolumeCreate.CreationGen = newCreationGen()
	}
}

// newCreationGen returns a random nonzero generation. 64 random bits make
// a collision with any other volume's (or any later generation a primary
// draws) negligible; apply still refuses one already in the state.
func newCreationGen() uint64 {
	var b [8]byte
	for {
		rand.Read(b[:]) // never fails (crypto/rand since Go 1.24)
		if g := binary.LittleEndian.Uint64(b[:]); g != 0 {
			return g
		}
	}
}

// NodeAddCmd registers a node (bootstrap or an operator; joins use JoinCmd).
type NodeAddCmd struct{ Node NodeInfo }

// NodeRemoveCmd removes a node that owns nothing and holds no replica.
type NodeRemoveCmd struct{ ID string }

// NodeSetStateCmd sets online, standby or maintenance. Fenced is set only by
// a takeover; online clears it (an operator repaired the node).
type NodeSetStateCmd struct {
	ID    string
	State NodeState
}

// NodeSetFenceCmd sets a node's fence topology.
type NodeSetFenceCmd struct {
	ID       string
	Topology fencing.NodeTopology
}

// VolumeCreateCmd creates a volume owned by Primary at epoch 1 with every
// replica in the ISR (a new volume is all zeros everywhere).
type VolumeCreateCmd struct {
	UUID, Name string
	Size       int64
	BlockSize  uint32
	Thin       bool
	Primary    string
	Replicas   []string // the primary included
	// CreationGen is the replication generation the replicas created
	// together with the volume start with (replication.LocalOptions.Gen):
	// they are all zeros, so they start in sync instead of the second one
	// copying the whole volume. Apply never draws random numbers, so the
	// proposer chooses it (Propose fills in a random nonzero value when it
	// is zero). Zero (a command logged before it existed) means none:
	// every new replica of the volume gets one full sync.
	CreationGen uint64
}

// VolumeResizeCmd grows a volume.
type VolumeResizeCmd struct {
	UUID string
	Size int64
}

// VolumeDeleteCmd deletes a volume no target exports.
type VolumeDeleteCmd struct{ UUID string }

// ISRRemoveCmd is replication.Membership.RemoveFromISR.
type ISRRemoveCmd struct {
	Volume           string
	Epoch            uint64
	Primary, Replica string
}

// ISRAddCmd is replication.Membership.AddToISR.
type ISRAddCmd struct {
	Volume           string
	Epoch            uint64
	Primary, Replica string
	Proof            replication.CatchUp
}

// TargetPutCmd creates or replaces a target.
type TargetPutCmd struct{ Target Target }

// TargetDeleteCmd deletes a target that is in no group.
type TargetDeleteCmd struct{ IQN string }

// GroupPutCmd creates a group or changes its VIPs, targets and placement
// preferences. Owner, Epoch and MovingTo are kept from the current state.
type GroupPutCmd struct{ Group Group }

// GroupDeleteCmd deletes a released group.
type GroupDeleteCmd struct{ Name string }

// GroupGrantCmd gives a released group to Node: epoch+1 for the group and
// each of its volumes, and Node becomes their primary.
type GroupGrantCmd struct {
	Group, Node string
}

// GroupMoveCmd starts a planned move to Node: the owner drains and releases,
// then the controller grants.
type GroupMoveCmd struct {
	Group, Node string
}

// GroupReleaseCmd is the owner giving a group up at a known epoch.
type GroupReleaseCmd struct {
	Group, Node string
	Epoch       uint64
}

// TakeoverCmd is the unplanned failover, in one entry: From is marked
// fenced, To becomes owner and primary, every volume's epoch goes up by one
// and From leaves every ISR. Apply refuses it unless the fence history holds
// a confirmed off for From at or after DetectedAt.
type TakeoverCmd struct {
	Group, From, To string
	DetectedAt      time.Time
}

// PRSaveCmd stores one LU's persistent reservations.
type PRSaveCmd struct {
	Volume string
	State  scsi.PRState
}

// FenceDevicePutCmd stores a fence device; Config is fencing.DeviceConfig
// as JSON with secrets in clear.
type FenceDevicePutCmd struct {
	Name   string
	Config []byte
}

// FenceDeviceDeleteCmd deletes a device no topology uses.
type FenceDeviceDeleteCmd struct{ Name string }

// FenceRecordCmd appends to the fence history.
type FenceRecordCmd struct{ Record fencing.Record }

// EventCmd appends to the event log; Seq and Time are filled by Apply.
type EventCmd struct{ Event Event }

// MaintenanceCmd switches cluster-wide maintenance (the controller stops
// acting).
type MaintenanceCmd struct{ On bool }

// TokenIssueCmd stores a join token's hash.
type TokenIssueCmd struct {
	Hash, ID string
	Role     Role
	Expires  time.Time
}

// JoinCmd consumes a token and adds the node.
type JoinCmd struct {
	Hash string
	Node NodeInfo
}

// GroupConnsCmd is the owner recording the initiator connections that
// reached the group's VIPs, so that the next owner can tickle them after a
// takeover. Only the owner at the current group epoch may send it, and it
// replaces the whole set (at most MaxGroupConns).
type GroupConnsCmd struct {
	Group, Node string
	Epoch       uint64
	Conns       []InitiatorConn
}

// GroupMoveCancelCmd withdraws a planned move to Node that the owner has
// not released yet (the controller sends it when the owner never does).
type GroupMoveCancelCmd struct {
	Group, Node string
}

// FenceConfirmCmd is an operator confirming that Node is off (the manual
// fence agent waits for it). Operator names who confirmed; the entry's At
// is when.
type FenceConfirmCmd struct {
	Node, Operator string
}

// VolumeReplicasCmd changes one volume's replica set: Remove (if set)
// leaves Replicas and the ISR, Add (if set) joins Replicas but not the ISR.
// Both together replace a node, one alone shrinks or grows the set. The
// primary and the epoch stay: the primary's agent reopens its replication
// session with the new set, which gives Add a full sync, and Add joins the
// ISR only through the primary's catch-up (isr-add), like any replica that
// fell behind. See replace.go for the rules.
type VolumeReplicasCmd struct {
	UUID        string
	Remove, Add string
}

// encodingVersion is the first byte of every encoded command and snapshot.
const encodingVersion byte = 1

// ErrDecode marks an entry this version cannot read.
var ErrDecode = errors.New("cluster: cannot decode")

// Encode serialises a command for the Raft log: a version byte, then gob.
// Gob (not JSON) because JSON output redacts secrets and the log must keep
// them.
func (c *Command) Encode() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte(encodingVersion)
	if err := gob.NewEncoder(&b).Encode(c); err != nil {
		return nil, fmt.Errorf("cluster: encode %s: %w", c.Kind, err)
	}
	return b.Bytes(), nil
}

// DecodeCommand reverses Encode.
func DecodeCommand(p []byte) (*Command, error) {
	if len(p) == 0 {
		return nil, fmt.Errorf("%w: empty entry", ErrDecode)
	}
	if p[0] != encodingVersion {
		return nil, fmt.Errorf("%w: version %d", ErrDecode, p[0])
	}
	var c Command
	if err := gob.NewDecoder(bytes.NewReader(p[1:])).Decode(&c); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrDecode, err)
	}
	return &c, nil
}
