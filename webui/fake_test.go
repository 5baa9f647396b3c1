package webui

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"sync"

	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/fencing"
)

// fakeService keeps a cluster state in memory with just enough rules to
// tell success from not-found and conflict; err, when set, is returned by
// every call so the error mapping can be tested per endpoint.
type fakeService struct {
	mu    sync.Mutex
	err   error
	st    *cluster.State
	calls []string
}

var _ Service = (*fakeService)(nil)

func newFake() *fakeService {
	st := cluster.NewState()
	st.Nodes["n1"] = &cluster.NodeInfo{ID: "n1", Role: cluster.RoleStorage, State: cluster.NodeOnline, APIAddr: "10.0.0.1:8080"}
	st.Nodes["w1"] = &cluster.NodeInfo{ID: "w1", Role: cluster.RoleWitness, State: cluster.NodeOnline}
	st.Volumes["v1"] = &cluster.Volume{UUID: "v1", Name: "vol1", Size: 1 << 20, BlockSize: 512, Replicas: []string{"n1"}, ISR: []string{"n1"}, Primary: "n1", Epoch: 1}
	st.Targets["iqn.2026-01.io.hasan:t1"] = &cluster.Target{IQN: "iqn.2026-01.io.hasan:t1", LUNs: map[uint64]string{0: "v1"},
		CHAP: &cluster.CHAP{User: "alice", Secret: "stored-secret-000"}}
	st.Groups["g1"] = &cluster.Group{Name: "g1", VIPs: []string{"192.0.2.10/24"}, Targets: []string{"iqn.2026-01.io.hasan:t1"}, Owner: "n1", Epoch: 2}
	st.FenceHistory = []fencing.Record{{Node: "n1", Device: "ipmi1", Action: "off", Outcome: "ok"}, {Node: "n2", Device: "ipmi2", Action: "off", Outcome: "ok"}}
	st.Events = []cluster.Event{{Seq: 1, Kind: "a", Message: "first"}, {Seq: 2, Kind: "b", Message: "second"}}
	f := &fakeService{st: st}
	f.addDevice("bmc1", `{"type":"ipmi","ipmi":{"host":"10.0.0.11","user":"fence","password":"`+fakeDeviceSecret+`"}}`)
	f.addDevice("spare", `{"type":"manual","manual":{"node":"n1"}}`)
	st.Nodes["n1"].Fence = fencing.NodeTopology{Levels: [][]string{{"bmc1"}}}
	return f
}

func (f *fakeService) begin(name string) error {
	f.calls = append(f.calls, name)
	return f.err
}

func (f *fakeService) Status(ctx context.Context) (Status, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin("Status"); err != nil {
		return Status{}, err
	}
	s := Status{NodeID: "n1", RaftState: "Leader", LeaderID: "n1", Nodes: map[string]int{}, Volumes: len(f.st.Volumes), Targets: len(f.st.Targets), Maintenance: f.st.Maintenance}
	for _, n := range f.st.Nodes {
		s.Nodes[string(n.State)]++
	}
	for _, name := range slices.Sorted(maps.Keys(f.st.Groups)) {
		g := f.st.Groups[name]
		s.Groups = append(s.Groups, GroupStatus{Name: name, Owner: g.Owner, Epoch: g.Epoch})
	}
	return s, nil
}

func list[T any](f *fakeService, name string, m map[string]*T) ([]T, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin(name); err != nil {
		return nil, err
	}
	var out []T
	for _, k := range slices.Sorted(maps.Keys(m)) {
		out = append(out, *m[k])
	}
	return out, nil
}

func get[T any](f *fakeService, name, id string, m map[string]*T) (T, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var zero T
	if err := f.begin(name); err != nil {
		return zero, err
	}
	v, ok := m[id]
	if !ok {
		return zero, fmt.Errorf("%w: %s", cluster.ErrNotFound, id)
	}
	return *v, nil
}

func (f *fakeService) edit(name string, fn func() error) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin(name); err != nil {
		return err
	}
	return fn()
}

func (f *fakeService) Nodes(ctx context.Context) ([]cluster.NodeInfo, error) {
	return list(f, "Nodes", f.st.Nodes)
}
func (f *fakeService) Node(ctx context.Context, id string) (cluster.NodeInfo, error) {
	return get(f, "Node", id, f.st.Nodes)
}
func (f *fakeService) SetNodeState(ctx context.Context, id string, s cluster.NodeState) error {
	return f.edit("SetNodeState", func() error {
		n, ok := f.st.Nodes[id]
		if !ok {
			return cluster.ErrNotFound
		}
		n.State = s
		return nil
	})
}
func (f *fakeService) RemoveNode(ctx context.Context, id string) error {
	return f.edit("RemoveNode", func() error {
		if _, ok := f.st.Nodes[id]; !ok {
			return fmt.Errorf("%w: node %s", cluster.ErrNotFound, id)
		}
		delete(f.st.Nodes, id)
		return nil
	})
}
func (f *fakeService) SetMaintenance(ctx context.Context, on bool) error {
	return f.edit("SetMaintenance", func() error { f.st.Maintenance = on; return nil })
}
func (f *fakeService) Volumes(ctx context.Context) ([]cluster.Volume, error) {
	return list(f, "Volumes", f.st.Volumes)
}
func (f *fakeService) Volume(ctx context.Context, id string) (cluster.Volume, error) {
	return get(f, "Volume", id, f.st.Volumes)
}
func (f *fakeService) CreateVolume(ctx context.Context, spec VolumeSpec) (cluster.Volume, error) {
	var v cluster.Volume
	err := f.edit("CreateVolume", func() error {
		if spec.UUID == "" {
			spec.UUID = "generated-" + spec.Name
		}
		if _, ok := f.st.Volumes[spec.UUID]; ok {
			return cluster.ErrExists
		}
		v = cluster.Volume{UUID: spec.UUID, Name: spec.Name, Size: spec.Size, BlockSize: 512, Replicas: spec.Replicas, ISR: spec.Replicas, Primary: spec.Replicas[0], Epoch: 1}
		f.st.Volumes[v.UUID] = &v
		return nil
	})
	return v, err
}
func (f *fakeService) DeleteVolume(ctx context.Context, id string) error {
	return f.edit("DeleteVolume", func() error {
		if _, ok := f.st.Volumes[id]; !ok {
			return cluster.ErrNotFound
		}
		if f.st.TargetOfVolume(id) != "" {
			return cluster.ErrInUse
		}
		delete(f.st.Volumes, id)
		return nil
	})
}
func (f *fakeService) Targets(ctx context.Context) ([]cluster.Target, error) {
	return list(f, "Targets", f.st.Targets)
}
func (f *fakeService) Target(ctx context.Context, iqn string) (cluster.Target, error) {
	return get(f, "Target", iqn, f.st.Targets)
}
func (f *fakeService) CreateTarget(ctx context.Context, t cluster.Target) error {
	return f.edit("CreateTarget", func() error {
		if _, ok := f.st.Targets[t.IQN]; ok {
			return cluster.ErrExists
		}
		f.st.Targets[t.IQN] = &t
		return nil
	})
}
func (f *fakeService) DeleteTarget(ctx context.Context, iqn string) error {
	return f.edit("DeleteTarget", func() error {
		if _, ok := f.st.Targets[iqn]; !ok {
			return cluster.ErrNotFound
		}
		if f.st.GroupOfTarget(iqn) != "" {
			return fmt.Errorf("%w: target %s is in a group", cluster.ErrInUse, iqn)
		}
		delete(f.st.Targets, iqn)
		return nil
	})
}
func (f *fakeService) target(iqn string) (*cluster.Target, error) {
	t, ok := f.st.Targets[iqn]
	if !ok {
		return nil, fmt.Errorf("%w: target %s", cluster.ErrNotFound, iqn)
	}
	return t, nil
}
func (f *fakeService) AddLUN(ctx context.Context, iqn string, lun uint64, vol string) error {
	return f.edit("AddLUN", func() error {
		t, err := f.target(iqn)
		if err != nil {
			return err
		}
		if t.LUNs == nil {
			t.LUNs = map[uint64]string{}
		}
		t.LUNs[lun] = vol
		return nil
	})
}
func (f *fakeService) RemoveLUN(ctx context.Context, iqn string, lun uint64) error {
	return f.edit("RemoveLUN", func() error {
		t, err := f.target(iqn)
		if err != nil {
			return err
		}
		delete(t.LUNs, lun)
		return nil
	})
}
func (f *fakeService) SetACL(ctx context.Context, iqn string, acl []string) error {
	return f.edit("SetACL", func() error {
		t, err := f.target(iqn)
		if err != nil {
			return err
		}
		t.ACL = acl
		return nil
	})
}
func (f *fakeService) SetCHAP(ctx context.Context, iqn string, chap, mutual *cluster.CHAP) error {
	return f.edit("SetCHAP", func() error {
		t, err := f.target(iqn)
		if err != nil {
			return err
		}
		t.CHAP, t.MutualCHAP = chap, mutual
		return nil
	})
}
func (f *fakeService) Groups(ctx context.Context) ([]cluster.Group, error) {
	return list(f, "Groups", f.st.Groups)
}
func (f *fakeService) Group(ctx context.Context, name string) (cluster.Group, error) {
	return get(f, "Group", name, f.st.Groups)
}
func (f *fakeService) CreateGroup(ctx context.Context, g cluster.Group) error {
	return f.edit("CreateGroup", func() error {
		if _, ok := f.st.Groups[g.Name]; ok {
			return cluster.ErrExists
		}
		f.st.Groups[g.Name] = &g
		return nil
	})
}
func (f *fakeService) MoveGroup(ctx context.Context, group, node string) error {
	return f.edit("MoveGroup", func() error {
		g, ok := f.st.Groups[group]
		if !ok {
			return cluster.ErrNotFound
		}
		g.MovingTo = node
		return nil
	})
}
func (f *fakeService) FenceHistory(ctx context.Context, node string, limit int) ([]fencing.Record, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin("FenceHistory"); err != nil {
		return nil, err
	}
	var out []fencing.Record
	for i := len(f.st.FenceHistory) - 1; i >= 0; i-- {
		if r := f.st.FenceHistory[i]; node == "" || r.Node == node {
			out = append(out, r)
		}
		if limit > 0 && len(out) == limit {
			break
		}
	}
	return out, nil
}
func (f *fakeService) Events(ctx context.Context, limit int) ([]cluster.Event, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.begin("Events"); err != nil {
		return nil, err
	}
	var out []cluster.Event
	for i := len(f.st.Events) - 1; i >= 0 && (limit <= 0 || len(out) < limit); i-- {
		out = append(out, f.st.Events[i])
	}
	return out, nil
}

// fakeDeviceSecret is the password of the fake's stored device; tests scan
// every response for it.
const fakeDeviceSecret = "stored-bmc-password-42"

func (f *fakeService) addDevice(name, config string) {
	var dc fencing.DeviceConfig
	if err := json.Unmarshal([]byte(config), &dc); err != nil {
		panic(err)
	}
	f.st.FenceDevices[name] = &cluster.FenceDevice{Name: name, Type: dc.Type, Config: []byte(config)}
}

func (f *fakeService) FenceDevices(ctx context.Context) ([]cluster.FenceDevice, error) {
	return list(f, "FenceDevices", f.st.FenceDevices)
}
func (f *fakeService) FenceDevice(ctx context.Context, name string) (cluster.FenceDevice, error) {
	return get(f, "FenceDevice", name, f.st.FenceDevices)
}
func (f *fakeService) PutFenceDevice(ctx context.Context, name string, config []byte) error {
	return f.edit("PutFenceDevice", func() error {
		var dc fencing.DeviceConfig
		if err := json.Unmarshal(config, &dc); err != nil {
			return fmt.Errorf("%w: %v", cluster.ErrInvalid, err)
		}
		f.st.FenceDevices[name] = &cluster.FenceDevice{Name: name, Type: dc.Type, Config: slices.Clone(config)}
		return nil
	})
}
func (f *fakeService) DeleteFenceDevice(ctx context.Context, name string) error {
	return f.edit("DeleteFenceDevice", func() error {
		if _, ok := f.st.FenceDevices[name]; !ok {
			return fmt.Errorf("%w: fence device %s", cluster.ErrNotFound, name)
		}
		for _, id := range slices.Sorted(maps.Keys(f.st.Nodes)) {
			for _, l := range f.st.Nodes[id].Fence.Levels {
				if slices.Contains(l, name) {
					return fmt.Errorf("%w: device %s is in node %s's topology", cluster.ErrInUse, name, id)
				}
			}
		}
		delete(f.st.FenceDevices, name)
		return nil
	})
}
func (f *fakeService) ConfirmFence(ctx context.Context, node, operator string) error {
	return f.edit("ConfirmFence", func() error {
		if _, ok := f.st.Nodes[node]; !ok {
			return fmt.Errorf("%w: node %s", cluster.ErrNotFound, node)
		}
		if f.st.FenceConfirms == nil {
			f.st.FenceConfirms = map[string]cluster.FenceConfirmation{}
		}
		f.st.FenceConfirms[node] = cluster.FenceConfirmation{Node: node, By: operator}
		return nil
	})
}
func (f *fakeService) SetNodeFence(ctx context.Context, id string, topo fencing.NodeTopology) error {
	return f.edit("SetNodeFence", func() error {
		n, ok := f.st.Nodes[id]
		if !ok {
			return fmt.Errorf("%w: node %s", cluster.ErrNotFound, id)
		}
		for _, l := range topo.Levels {
			for _, d := range l {
				if _, ok := f.st.FenceDevices[d]; !ok {
					return fmt.Errorf("%w: fence device %s", cluster.ErrNotFound, d)
				}
			}
		}
		n.Fence = topo
		return nil
	})
}
