package cluster

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"time"

	"github.com/hasan-storage/hasan/fencing"
	"github.com/hasan-storage/hasan/target/scsi"
)

// Role is what a node does in the cluster.
type Role string

const (
	// RoleStorage nodes hold replicas, serve targets and own groups.
	RoleStorage Role = "storage"
	// RoleWitness nodes vote in Raft and hold no data, so two storage nodes
	// plus a witness keep a majority when one storage node is lost.
	RoleWitness Role = "witness"
)

// NodeState is the administrative and fencing state of a node.
type NodeState string

const (
	// NodeOnline: eligible for placement and takeover.
	NodeOnline NodeState = "online"
	// NodeStandby: keeps its replicas and votes, but the controller moves
	// groups away (planned) and never places a group on it.
	NodeStandby NodeState = "standby"
	// NodeMaintenance: like standby, and the controller also ignores its
	// heartbeats (an operator is working on it).
	NodeMaintenance NodeState = "maintenance"
	// NodeFenced: a fence device confirmed it off and its groups moved. It
	// stays fenced until an operator sets it online again.
	NodeFenced NodeState = "fenced"
)

// NodeInfo is one cluster member as the state records it.
type NodeInfo struct {
	ID   string `json:"id"`
	Role Role   `json:"role"`
	// RaftAddr is the host:port of the Raft transport (mutual TLS).
	RaftAddr string `json:"raft_addr"`
	// APIAddr is the REST API address; DataAddr the replication server;
	// PortalAddr the node's own (non-floating) iSCSI portal. Optional.
	APIAddr    string    `json:"api_addr,omitempty"`
	DataAddr   string    `json:"data_addr,omitempty"`
	PortalAddr string    `json:"portal_addr,omitempty"`
	State      NodeState `json:"state"`
	// Fence is the node's fencing topology: levels of device names.
	Fence    fencing.NodeTopology `json:"fence"`
	JoinedAt time.Time            `json:"joined_at"`
	// CertSerials are the serials (CertSerial form) of the certificates
	// issued to this node that the cluster knows of: node-remove revokes
	// them (revoke.go). Empty for a node added before they were recorded.
	CertSerials []string `json:"cert_serials,omitempty"`
}

// Volume is one replicated volume and its ownership. Primary, ISR and Epoch
// follow replication/'s Membership rules.
type Volume struct {
	// UUID is the volume identity; it also yields the SCSI serial and NAA
	// designator, so it never changes (DESIGN.md invariant 6).
	UUID      string `json:"uuid"`
	Name      string `json:"name"`
	Size      int64  `json:"size"`
	BlockSize uint32 `json:"block_size"`
	Thin      bool   `json:"thin,omitempty"`
	// Replicas lists every node holding a copy, the primary included.
	Replicas []string `json:"replicas"`
	// ISR is the subset of Replicas holding every acknowledged write.
	ISR     []string `json:"isr"`
	Primary string   `json:"primary"`
	Epoch   uint64   `json:"epoch"`
	// CreationGen is the replication generation a node gives this
	// volume's replica when it creates its files (replication's creation
	// generation, from VolumeCreateCmd): replicas created with the volume
	// start in sync. One created later gets it too and is still fully
	// synced: replication takes such a fresh replica as in sync only from
	// a primary that has not written yet. Zero (volumes created before
	// it existed): every new replica gets a full sync.
	CreationGen uint64 `json:"creation_gen,omitempty"`
}

// Secret is a CHAP secret. Every way it is printed or written as JSON
// yields a placeholder; the Raft encoding (gob) keeps the value, which is
// why the log and snapshots must be protected like the secrets themselves.
type Secret string

const redactedText = "[redacted]"

func (s Secret) String() string {
	if s == "" {
		return ""
	}
	return redactedText
}

// GoString keeps %#v from printing the value.
func (s Secret) GoString() string { return `cluster.Secret("` + s.String() + `")` }

// LogValue keeps slog from printing the value.
func (s Secret) LogValue() slog.Value { return slog.StringValue(s.String()) }

// MarshalJSON writes the placeholder: API output never carries secrets.
func (s Secret) MarshalJSON() ([]byte, error) { return json.Marshal(s.String()) }

// Reveal returns the value for the target's CHAP code. Never log it.
func (s Secret) Reveal() string { return string(s) }

// CHAP is one CHAP account of a target.
type CHAP struct {
	User   string `json:"user"`
	Secret Secret `json:"secret"`
}

// Target is one exported iSCSI target.
type Target struct {
	IQN   string `json:"iqn"`
	Alias string `json:"alias,omitempty"`
	// LUNs maps LUN numbers to volume UUIDs.
	LUNs map[uint64]string `json:"luns"`
	// ACL lists the initiator names allowed in; empty allows everyone.
	ACL        []string `json:"acl,omitempty"`
	CHAP       *CHAP    `json:"chap,omitempty"`
	MutualCHAP *CHAP    `json:"mutual_chap,omitempty"`
}

// Group is a unit of failover: floating IPs plus the targets behind them.
// One node owns a group at a time, and that node is the primary of every
// volume the group's targets export.
type Group struct {
	Name    string   `json:"name"`
	VIPs    []string `json:"vips"` // CIDR prefixes, e.g. 192.0.2.10/24
	Targets []string `json:"targets"`
	// Preferred orders the nodes placement tries first. Without
	// Failback a group stays where it is (stickiness) even when a more
	// preferred node comes back.
	Preferred []string `json:"preferred,omitempty"`
	Failback  bool     `json:"failback,omitempty"`
	// Owner is the node serving the group; "" while released.
	Owner string `json:"owner,omitempty"`
	// Epoch increases with every grant of the group.
	Epoch uint64 `json:"epoch"`
	// MovingTo is set between the start of a planned move and the grant to
	// the new owner.
	MovingTo string `json:"moving_to,omitempty"`
	// Conns are the initiator connections the owner last reported on the
	// group's VIPs, sorted. They outlive a change of owner: the new owner
	// tickles them so initiators reconnect at once.
	Conns []InitiatorConn `json:"conns,omitempty"`
}

// InitiatorConn is one initiator TCP connection to a VIP, as "IP:port"
// texts (netip.AddrPort form).
type InitiatorConn struct {
	Local  string `json:"local"`  // VIP:port
	Remote string `json:"remote"` // initiator's IP:port
}

func (c InitiatorConn) String() string { return c.Remote + "->" + c.Local }

// FenceDevice is a fence device's configuration. Config is the device's
// fencing.DeviceConfig as JSON with its secrets in clear, so it is kept out
// of JSON output; Redacted shows it safely.
type FenceDevice struct {
	Name   string `json:"name"`
	Type   string `json:"type"`
	Config []byte `json:"-"`
}

// DeviceConfig decodes the stored configuration.
func (d FenceDevice) DeviceConfig() (fencing.DeviceConfig, error) {
	var dc fencing.DeviceConfig
	if err := json.Unmarshal(d.Config, &dc); err != nil {
		return dc, fmt.Errorf("cluster: fence device %s: %w", d.Name, err)
	}
	return dc, nil
}

// MarshalJSON shows the device with secrets replaced by fencing's
// placeholder.
func (d FenceDevice) MarshalJSON() ([]byte, error) {
	dc, err := d.DeviceConfig()
	if err != nil {
		return nil, err
	}
	return json.Marshal(struct {
		Name   string               `json:"name"`
		Type   string               `json:"type"`
		Config fencing.DeviceConfig `json:"config"`
	}{d.Name, d.Type, dc})
}

// Severity of an event.
type Severity string

const (
	SeverityInfo  Severity = "info"
	SeverityWarn  Severity = "warn"
	SeverityAlert Severity = "alert"
)

// Event is one entry of the bounded cluster event log.
type Event struct {
	Seq      uint64    `json:"seq"`
	Time     time.Time `json:"time"`
	Severity Severity  `json:"severity"`
	Kind     string    `json:"kind"`
	Node     string    `json:"node,omitempty"`
	Group    string    `json:"group,omitempty"`
	Message  string    `json:"message"`
}

// Token is a join token as the cluster keeps it: only the hash of its
// secret, so a snapshot does not hand out valid tokens.
type Token struct {
	Hash    string    `json:"-"`
	ID      string    `json:"id"` // short public prefix, for listing
	Role    Role      `json:"role"`
	Expires time.Time `json:"expires"`
	Used    bool      `json:"used"`
}

// FenceConfirmation is an operator's statement, committed in the log,
// that a node is powered off.
type FenceConfirmation struct {
	Node string    `json:"node"`
	By   string    `json:"by"`
	At   time.Time `json:"at"`
}

// Bounds of the logs kept in the state.
const (
	MaxEvents       = 512
	MaxFenceHistory = 1024
)

// State is the whole replicated cluster state. Only Apply (through raft)
// changes it; readers get copies.
type State struct {
	Nodes        map[string]*NodeInfo    `json:"nodes"`
	Volumes      map[string]*Volume      `json:"volumes"`
	Targets      map[string]*Target      `json:"targets"`
	Groups       map[string]*Group       `json:"groups"`
	PR           map[string]scsi.PRState `json:"persistent_reservations"` // by volume UUID
	FenceDevices map[string]*FenceDevice `json:"fence_devices"`
	FenceHistory []fencing.Record        `json:"fence_history"`
	Events       []Event                 `json:"events"`
	EventSeq     uint64                  `json:"event_seq"`
	Tokens       map[string]*Token       `json:"tokens"` // by hash
	Maintenance  bool                    `json:"maintenance"`
	// FenceConfirms holds, per node, the last operator confirmation that
	// it is off; the manual fence device waits for one made after its
	// request.
	FenceConfirms map[string]FenceConfirmation `json:"fence_confirmations,omitempty"`
	// RevokedCerts are the certificates no node accepts any more, by
	// serial (revoke.go).
	RevokedCerts map[string]RevokedCert `json:"revoked_certs,omitempty"`
	Index        uint64                 `json:"index"` // last applied raft index
}

// NewState returns an empty state.
func NewState() *State {
	return &State{
		Nodes:         map[string]*NodeInfo{},
		Volumes:       map[string]*Volume{},
		Targets:       map[string]*Target{},
		Groups:        map[string]*Group{},
		PR:            map[string]scsi.PRState{},
		FenceDevices:  map[string]*FenceDevice{},
		Tokens:        map[string]*Token{},
		FenceConfirms: map[string]FenceConfirmation{},
		RevokedCerts:  map[string]RevokedCert{},
	}
}

// normalize replaces nil maps after decoding (gob drops empty maps).
func (s *State) normalize() {
	if s.Nodes == nil {
		s.Nodes = map[string]*NodeInfo{}
	}
	if s.Volumes == nil {
		s.Volumes = map[string]*Volume{}
	}
	if s.Targets == nil {
		s.Targets = map[string]*Target{}
	}
	if s.Groups == nil {
		s.Groups = map[string]*Group{}
	}
	if s.PR == nil {
		s.PR = map[string]scsi.PRState{}
	}
	if s.FenceDevices == nil {
		s.FenceDevices = map[string]*FenceDevice{}
	}
	if s.Tokens == nil {
		s.Tokens = map[string]*Token{}
	}
	if s.FenceConfirms == nil {
		s.FenceConfirms = map[string]FenceConfirmation{}
	}
	if s.RevokedCerts == nil {
		s.RevokedCerts = map[string]RevokedCert{}
	}
}

// Clone returns a deep copy.
func (s *State) Clone() *State {
	c := &State{
		Nodes:         make(map[string]*NodeInfo, len(s.Nodes)),
		Volumes:       make(map[string]*Volume, len(s.Volumes)),
		Targets:       make(map[string]*Target, len(s.Targets)),
		Groups:        make(map[string]*Group, len(s.Groups)),
		PR:            make(map[string]scsi.PRState, len(s.PR)),
		FenceDevices:  make(map[string]*FenceDevice, len(s.FenceDevices)),
		Tokens:        make(map[string]*Token, len(s.Tokens)),
		FenceHistory:  slices.Clone(s.FenceHistory),
		FenceConfirms: maps.Clone(s.FenceConfirms),
		RevokedCerts:  maps.Clone(s.RevokedCerts),
		Events:        slices.Clone(s.Events),
		EventSeq:      s.EventSeq,
		Maintenance:   s.Maintenance,
		Index:         s.Index,
	}
	for k, n := range s.Nodes {
		c.Nodes[k] = n.clone()
	}
	for k, v := range s.Volumes {
		c.Volumes[k] = v.clone()
	}
	for k, t := range s.Targets {
		c.Targets[k] = t.clone()
	}
	for k, g := range s.Groups {
		c.Groups[k] = g.clone()
	}
	for k, p := range s.PR {
		c.PR[k] = clonePR(p)
	}
	for k, d := range s.FenceDevices {
		dd := *d
		dd.Config = slices.Clone(d.Config)
		c.FenceDevices[k] = &dd
	}
	for k, t := range s.Tokens {
		tt := *t
		c.Tokens[k] = &tt
	}
	return c
}

func (n *NodeInfo) clone() *NodeInfo {
	c := *n
	c.CertSerials = slices.Clone(n.CertSerials)
	c.Fence.Levels = make([][]string, len(n.Fence.Levels))
	for i, l := range n.Fence.Levels {
		c.Fence.Levels[i] = slices.Clone(l)
	}
	return &c
}

func (v *Volume) clone() *Volume {
	c := *v
	c.Replicas = slices.Clone(v.Replicas)
	c.ISR = slices.Clone(v.ISR)
	return &c
}

func (t *Target) clone() *Target {
	c := *t
	c.LUNs = maps.Clone(t.LUNs)
	c.ACL = slices.Clone(t.ACL)
	if t.CHAP != nil {
		x := *t.CHAP
		c.CHAP = &x
	}
	if t.MutualCHAP != nil {
		x := *t.MutualCHAP
		c.MutualCHAP = &x
	}
	return &c
}

func (g *Group) clone() *Group {
	c := *g
	c.VIPs = slices.Clone(g.VIPs)
	c.Targets = slices.Clone(g.Targets)
	c.Preferred = slices.Clone(g.Preferred)
	c.Conns = slices.Clone(g.Conns)
	return &c
}

func clonePR(p scsi.PRState) scsi.PRState {
	p.Registrations = slices.Clone(p.Registrations)
	return p
}

// GroupVolumes returns the UUIDs of every volume exported by the group's
// targets, sorted.
func (s *State) GroupVolumes(group string) []string {
	g, ok := s.Groups[group]
	if !ok {
		return nil
	}
	var out []string
	for _, iqn := range g.Targets {
		t, ok := s.Targets[iqn]
		if !ok {
			continue
		}
		for _, uuid := range t.LUNs {
			if !slices.Contains(out, uuid) {
				out = append(out, uuid)
			}
		}
	}
	slices.Sort(out)
	return out
}

// GroupOfTarget returns the group holding target iqn, or "".
func (s *State) GroupOfTarget(iqn string) string {
	for _, name := range sortedKeys(s.Groups) {
		if slices.Contains(s.Groups[name].Targets, iqn) {
			return name
		}
	}
	return ""
}

// TargetOfVolume returns the target exporting the volume, or "".
func (s *State) TargetOfVolume(uuid string) string {
	for _, iqn := range sortedKeys(s.Targets) {
		for _, u := range s.Targets[iqn].LUNs {
			if u == uuid {
				return iqn
			}
		}
	}
	return ""
}

// OwnedGroups returns the groups node owns, sorted.
func (s *State) OwnedGroups(node string) []string {
	var out []string
	for _, name := range sortedKeys(s.Groups) {
		if s.Groups[name].Owner == node {
			out = append(out, name)
		}
	}
	return out
}

func sortedKeys[V any](m map[string]V) []string {
	return slices.Sorted(maps.Keys(m))
}
