package cluster

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/hasan-storage/hasan/fencing"
	"github.com/hasan-storage/hasan/replication"
	"github.com/hasan-storage/hasan/target/scsi"
	"github.com/hasan-storage/hasan/target/scsi/scsitest"
)

type memSink struct {
	bytes.Buffer
	cancelled bool
}

func (s *memSink) ID() string    { return "mem" }
func (s *memSink) Cancel() error { s.cancelled = true; return nil }
func (s *memSink) Close() error  { return nil }

func fsmWithFixture(t *testing.T) *FSM {
	t.Helper()
	f := NewFSM(nil)
	for i, c := range fixtureCommands() {
		c.At = t0.Add(time.Duration(i) * time.Second)
		b, err := c.Encode()
		if err != nil {
			t.Fatal(err)
		}
		r := f.Apply(&raft.Log{Index: uint64(i + 1), Type: raft.LogCommand, Data: b}).(Result)
		if r.Err != nil {
			t.Fatalf("fixture %d: %v", i, r.Err)
		}
	}
	return f
}

func TestSnapshotRestoreRoundTrip(t *testing.T) {
	f := fsmWithFixture(t)
	b, _ := (&Command{Kind: KindPRSave, At: t0, PRSave: &PRSaveCmd{Volume: u1, State: scsi.PRState{Generation: 9, Holder: 0, Type: 5,
		Registrations: []scsi.PRRegistration{{Key: 7, InitiatorPort: "iqn.x,i,0x1", TargetPort: iqn1 + ",t,0x0001"}}}}}).Encode()
	if r := f.Apply(&raft.Log{Index: 100, Type: raft.LogCommand, Data: b}).(Result); r.Err != nil {
		t.Fatal(r.Err)
	}
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	// The snapshot is a copy: later entries must not leak into it.
	b, _ = cSetState("b", NodeStandby).Encode()
	f.Apply(&raft.Log{Index: 101, Type: raft.LogCommand, Data: b})

	var sink memSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatal(err)
	}
	g := NewFSM(nil)
	if err := g.Restore(io.NopCloser(bytes.NewReader(sink.Bytes()))); err != nil {
		t.Fatal(err)
	}
	got := g.State()
	if got.Nodes["b"].State != NodeOnline || got.Index != 100 {
		t.Fatalf("snapshot not a point-in-time copy: b=%s index=%d", got.Nodes["b"].State, got.Index)
	}
	want := f.State()
	want.Nodes["b"].State = NodeOnline
	want.Index = 100
	want.Events = want.Events[:len(want.Events)-1]
	want.EventSeq--
	if !reflect.DeepEqual(normalizeForCompare(want), normalizeForCompare(got)) {
		t.Fatalf("restore differs:\nwant %+v\ngot  %+v", want, got)
	}
	// The fence device secret survives the snapshot (it must, to fence).
	dc, err := got.FenceDevices["bmc-a"].DeviceConfig()
	if err != nil || dc.IPMI.Password.Reveal() != "pw-of-a" {
		t.Fatalf("device config after restore: %v %v", dc, err)
	}
	if got.Targets[iqn1].CHAP.Secret.Reveal() != "s3cret-s3cret" {
		t.Fatal("chap secret lost in snapshot")
	}
	if err := g.Restore(io.NopCloser(bytes.NewReader([]byte{9, 1, 2}))); !errors.Is(err, ErrDecode) {
		t.Fatalf("bad version: %v", err)
	}
}

// normalizeForCompare maps empty slices/maps to nil: gob does not keep the
// difference and nothing depends on it.
func normalizeForCompare(s *State) string {
	b, _ := json.Marshal(s)
	return string(b)
}

func TestSecretsNeverInJSONOrLogs(t *testing.T) {
	f := fsmWithFixture(t)
	st := f.State()
	b, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	var logBuf bytes.Buffer
	lg := slog.New(slog.NewJSONHandler(&logBuf, nil))
	lg.Info("state", "chap", st.Targets[iqn1].CHAP, "secret", st.Targets[iqn1].CHAP.Secret, "dev", st.FenceDevices["bmc-a"])
	out := string(b) + logBuf.String() + fmt.Sprintf("%v %+v %#v", st.Targets[iqn1], *st.Targets[iqn1].CHAP, *st.Targets[iqn1].CHAP)
	for _, secret := range []string{"s3cret-s3cret", "pw-of-a", "pw-of-b", hashA} {
		if strings.Contains(out, secret) {
			t.Fatalf("secret %q leaked", secret)
		}
	}
	if !strings.Contains(string(b), `"[redacted]"`) {
		t.Fatalf("no placeholder in JSON: %s", b)
	}
	// The log encoding keeps them (the state needs them).
	enc, _ := cTarget(Target{IQN: iqn2, CHAP: &CHAP{User: "u", Secret: "keep-me-please"}}).Encode()
	dc, err := DecodeCommand(enc)
	if err != nil || dc.TargetPut.Target.CHAP.Secret.Reveal() != "keep-me-please" {
		t.Fatalf("log encoding lost the secret: %v", err)
	}
}

func TestDecodeRejectsGarbage(t *testing.T) {
	for _, p := range [][]byte{nil, {}, {2, 0}, {1, 0xff, 0xff}} {
		if _, err := DecodeCommand(p); !errors.Is(err, ErrDecode) {
			t.Fatalf("%x: %v", p, err)
		}
	}
	f := NewFSM(nil)
	r := f.Apply(&raft.Log{Index: 1, Type: raft.LogCommand, Data: []byte{1, 2, 3}}).(Result)
	if !errors.Is(r.Err, ErrDecode) || f.State().Index != 1 {
		t.Fatalf("%v", r.Err)
	}
}

// TestPRSurvivesFailover: state saved without APTPL is still there for the
// LU that opens on the new owner (the file store would drop it).
func TestPRSurvivesFailover(t *testing.T) {
	ctx := context.Background()
	loc := NewLocal(nil)
	for _, c := range fixtureCommands() {
		if _, err := loc.Propose(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	old := &PRStore{P: loc, FSM: loc.FSM, Volume: u1}
	st := scsi.PRState{Generation: 2, APTPL: false, Holder: 0, Type: 1,
		Registrations: []scsi.PRRegistration{{Key: 0xabc, InitiatorPort: "iqn.1993-08.org.debian:01:x,i,0x23d000000001", TargetPort: iqn1 + ",t,0x0001"}}}
	if err := old.SavePR(ctx, st); err != nil {
		t.Fatal(err)
	}
	// New owner: a replica of the state restored from a snapshot.
	snap, _ := loc.FSM.Snapshot()
	var sink memSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatal(err)
	}
	f2 := NewFSM(nil)
	if err := f2.Restore(io.NopCloser(&sink)); err != nil {
		t.Fatal(err)
	}
	got, err := (&PRStore{P: loc, FSM: f2, Volume: u1}).LoadPR(ctx)
	if err != nil || !reflect.DeepEqual(got, st) {
		t.Fatalf("got %+v, %v", got, err)
	}
	// A volume without saved state loads as "no reservation".
	empty, _ := (&PRStore{P: loc, FSM: f2, Volume: u2}).LoadPR(ctx)
	if empty.Holder != -1 || len(empty.Registrations) != 0 {
		t.Fatalf("%+v", empty)
	}
	// A real LU drives the store: REGISTER through the SCSI layer lands in
	// the cluster state.
	if err := (&PRStore{P: loc, FSM: loc.FSM, Volume: u3}).SavePR(ctx, scsi.PRState{Holder: -1}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown volume: %v", err)
	}
}

func TestFenceHistoryStore(t *testing.T) {
	ctx := context.Background()
	loc := NewLocal(nil)
	h := &FenceHistory{P: loc, FSM: loc.FSM}
	for i, n := range []string{"a", "b", "a"} {
		if err := h.Append(ctx, fencing.Record{Time: t0.Add(time.Duration(i)), Node: n, Action: "off", Outcome: fencing.OutcomeSuccess}); err != nil {
			t.Fatal(err)
		}
	}
	recs, _ := h.List(ctx, "a", 0)
	if len(recs) != 2 || !recs[0].Time.Equal(t0.Add(2)) {
		t.Fatalf("%+v", recs)
	}
	recs, _ = h.List(ctx, "", 1)
	if len(recs) != 1 || recs[0].Node != "a" {
		t.Fatalf("%+v", recs)
	}
}

// TestRandomCommandSequences replays random command sequences and checks
// the invariants after every entry: a refused command changes nothing,
// epochs never go down, every ownership change bumps them, primary ∈ ISR ⊆
// replicas, every owned group's volumes have the owner as primary (one
// writer), a volume belongs to at most one group, no fenced node owns
// anything, and every takeover had a confirmed fence.
func TestRandomCommandSequences(t *testing.T) {
	seeds := 30
	if testing.Short() {
		seeds = 10
	}
	ok := map[Kind]int{}
	defer func() {
		// The generator must reach the interesting transitions, or the
		// invariants are checked on nothing.
		for _, k := range []Kind{KindVolumeCreate, KindTakeover, KindGroupGrant, KindGroupRelease, KindISRRemove, KindISRAdd, KindGroupMove, KindGroupConns, KindGroupMoveCancel, KindVolumeReplicas} {
			if ok[k] == 0 && !t.Failed() {
				t.Errorf("no successful %s in any sequence", k)
			}
		}
		t.Logf("successful commands: %v", ok)
	}()
	for seed := range seeds {
		rng := rand.New(rand.NewPCG(uint64(seed), 99))
		// Replica-set changes come from their own stream, so the
		// sequences above keep the draws the seeds were tuned on.
		rng2 := rand.New(rand.NewPCG(uint64(seed), 7))
		a := newApplier(t, fixtureCommands()...)
		volEpoch := map[string]uint64{}
		grpEpoch := map[string]uint64{}
		for step := range 300 {
			c := randomCommand(rng, a)
			if rng2.IntN(12) == 0 {
				c = randomReplicasCommand(rng2, a)
			}
			before := a.st.Clone()
			_, err := a.apply(c)
			fail := func(format string, args ...any) {
				t.Helper()
				t.Fatalf("seed %d step %d (%s %+v, err %v): %s", seed, step, c.Kind, payload(c), err, fmt.Sprintf(format, args...))
			}
			if err == nil {
				ok[c.Kind]++
			}
			if err != nil && !reflect.DeepEqual(before, a.st) {
				fail("refused command changed the state")
			}
			s := a.st
			if err == nil && c.Kind == KindTakeover && !before.fenceConfirmed(c.Takeover.From, c.Takeover.DetectedAt.UnixNano()) {
				fail("takeover without confirmed fence")
			}
			for uuid, v := range s.Volumes {
				if e, ok := volEpoch[uuid]; ok && v.Epoch < e {
					fail("volume %s epoch went down %d -> %d", uuid, e, v.Epoch)
				}
				volEpoch[uuid] = v.Epoch
				if !slices.Contains(v.ISR, v.Primary) {
					fail("volume %s primary %s not in ISR %v", uuid, v.Primary, v.ISR)
				}
				for _, n := range v.ISR {
					if !slices.Contains(v.Replicas, n) {
						fail("volume %s ISR %v not within replicas %v", uuid, v.ISR, v.Replicas)
					}
				}
				if ov, ok := before.Volumes[uuid]; ok && ov.Primary != v.Primary && v.Epoch <= ov.Epoch {
					fail("volume %s primary changed without an epoch bump", uuid)
				}
				for i, n := range v.Replicas {
					if slices.Index(v.Replicas, n) != i {
						fail("volume %s lists replica %s twice: %v", uuid, n, v.Replicas)
					}
				}
				if ov, ok := before.Volumes[uuid]; ok && err == nil && c.Kind == KindVolumeReplicas {
					for _, n := range v.ISR {
						if !slices.Contains(ov.ISR, n) {
							fail("volume-replicas put %s into the ISR of %s without a catch-up", n, uuid)
						}
					}
					if v.Primary != ov.Primary || v.Epoch != ov.Epoch {
						fail("volume-replicas changed %s's primary or epoch", uuid)
					}
				}
				if ov, ok := before.Volumes[uuid]; ok && ov.CreationGen != v.CreationGen {
					fail("volume %s creation generation changed %#x -> %#x", uuid, ov.CreationGen, v.CreationGen)
				}
				for ou, ov := range s.Volumes {
					if ou != uuid && v.CreationGen != 0 && ov.CreationGen == v.CreationGen {
						fail("volumes %s and %s share creation generation %#x", uuid, ou, v.CreationGen)
					}
				}
			}
			for uuid := range volEpoch {
				if _, ok := s.Volumes[uuid]; !ok {
					delete(volEpoch, uuid)
				}
			}
			for name := range grpEpoch {
				if _, ok := s.Groups[name]; !ok {
					delete(grpEpoch, name)
				}
			}
			inGroup := map[string]string{}
			for name, g := range s.Groups {
				if e, ok := grpEpoch[name]; ok && g.Epoch < e {
					fail("group %s epoch went down", name)
				}
				grpEpoch[name] = g.Epoch
				if og, ok := before.Groups[name]; ok && g.Owner != "" && og.Owner != g.Owner && g.Epoch <= og.Epoch {
					fail("group %s changed owner without an epoch bump", name)
				}
				for _, uuid := range s.GroupVolumes(name) {
					if o, ok := inGroup[uuid]; ok {
						fail("volume %s in groups %s and %s", uuid, o, name)
					}
					inGroup[uuid] = name
					if g.Owner != "" && s.Volumes[uuid].Primary != g.Owner {
						fail("group %s owner %s but volume %s primary %s", name, g.Owner, uuid, s.Volumes[uuid].Primary)
					}
				}
				if len(g.Conns) > MaxGroupConns {
					fail("group %s records %d connections", name, len(g.Conns))
				}
				for _, c := range g.Conns {
					if !g.hasVIP(c.Local) {
						fail("group %s records %s, not on its VIPs %v", name, c, g.VIPs)
					}
				}
				if og, ok := before.Groups[name]; ok && c.Kind == KindGroupConns && err == nil && c.GroupConns.Group == name && (og.Owner != c.GroupConns.Node || og.Epoch != c.GroupConns.Epoch) {
					fail("group-conns accepted from %s at epoch %d (owner %s at %d)", c.GroupConns.Node, c.GroupConns.Epoch, og.Owner, og.Epoch)
				}
				if g.Owner != "" {
					n := s.Nodes[g.Owner]
					if n == nil || n.State == NodeFenced || n.Role != RoleStorage {
						fail("group %s owned by %+v", name, n)
					}
				}
			}
		}
	}
}

func payload(c *Command) any {
	v := reflect.ValueOf(c).Elem()
	for i := range v.NumField() {
		f := v.Field(i)
		if f.Kind() == reflect.Pointer && !f.IsNil() {
			return f.Elem().Interface()
		}
	}
	return nil
}

// randomReplicasCommand is a volume-replicas command, mostly on nodes the
// volume really has, so that some succeed.
func randomReplicasCommand(rng *rand.Rand, a *applier) *Command {
	nodes := []string{"a", "b", "c", "w", "x"}
	vols := []string{u1, u2, u3}
	pick := func(s []string) string { return s[rng.IntN(len(s))] }
	uuid := pick(vols)
	remove, add := pick(nodes), pick(nodes)
	if v, ok := a.st.Volumes[uuid]; ok && rng.IntN(3) > 0 {
		remove = pick(v.Replicas)
	}
	switch rng.IntN(4) {
	case 0:
		remove = ""
	case 1:
		add = ""
	}
	return cReplicas(uuid, remove, add)
}

func randomCommand(rng *rand.Rand, a *applier) *Command {
	nodes := []string{"a", "b", "c", "w", "x"}
	vols := []string{u1, u2, u3}
	groups := []string{"g1", "g2"}
	iqns := []string{iqn1, iqn2}
	pick := func(s []string) string { return s[rng.IntN(len(s))] }
	epoch := func(vol string) uint64 {
		if v, ok := a.st.Volumes[vol]; ok && rng.IntN(4) > 0 {
			return v.Epoch
		}
		return uint64(rng.IntN(5))
	}
	primary := func(vol string) string {
		if v, ok := a.st.Volumes[vol]; ok && rng.IntN(4) > 0 {
			return v.Primary
		}
		return pick(nodes)
	}
	k := rng.IntN(16)
	if rng.IntN(8) == 0 {
		k = 16 + rng.IntN(3)
	}
	switch k {
	case 0:
		return cSetState(pick(nodes), []NodeState{NodeOnline, NodeStandby, NodeMaintenance, NodeFenced}[rng.IntN(4)])
	case 1:
		v := pick(vols)
		return cISRRemove(v, epoch(v), primary(v), pick(nodes))
	case 2:
		v := pick(vols)
		g := uint64(rng.IntN(3))
		return cISRAdd(v, epoch(v), primary(v), pick(nodes), replication.CatchUp{PrimaryGen: g, ReplicaGen: uint64(rng.IntN(3)), DirtyBytes: int64(rng.IntN(2))})
	case 3:
		uuid, primary, r1, r2 := pick(vols), pick(nodes), pick(nodes), pick(nodes)
		// Few creation generations, among them the fixture's u2's, so
		// that reuse is tried; taken from a pick, not drawn, to keep the
		// sequences the seeds were tuned on.
		gen := []uint64{0, 1, 0x5eed}[slices.Index(nodes, r2)%3]
		return cVolGen(uuid, gen, primary, r1, r2)
	case 4:
		luns := map[uint64]string{}
		for i := range rng.IntN(3) {
			luns[uint64(i)] = pick(vols)
		}
		return cTarget(Target{IQN: pick(iqns), LUNs: luns})
	case 5:
		return cGroup(Group{Name: pick(groups), VIPs: []string{fmt.Sprintf("192.0.2.%d/24", 10+rng.IntN(3))}, Targets: []string{pick(iqns)}})
	case 6:
		return cGrant(pick(groups), pick(nodes))
	case 7:
		return cMove(pick(groups), pick(nodes))
	case 8:
		g := pick(groups)
		var e uint64
		owner := pick(nodes)
		if gg, ok := a.st.Groups[g]; ok && rng.IntN(3) > 0 {
			e, owner = gg.Epoch, gg.Owner
		}
		return cRelease(g, owner, e)
	case 9, 10:
		g := pick(groups)
		from := pick(nodes)
		if gg, ok := a.st.Groups[g]; ok && rng.IntN(3) > 0 {
			from = gg.Owner
		}
		to := pick(nodes)
		if vs := a.st.GroupVolumes(g); len(vs) > 0 && rng.IntN(2) > 0 {
			to = pick(a.st.Volumes[vs[0]].ISR)
		}
		return cTakeover(g, from, to, a.at.Add(-time.Duration(rng.IntN(20))*time.Second))
	case 11:
		n := pick(nodes)
		if gg, ok := a.st.Groups[pick(groups)]; ok && gg.Owner != "" && rng.IntN(2) > 0 {
			n = gg.Owner
		}
		return cFenceRec(n, a.at.Add(-time.Duration(rng.IntN(20))*time.Second), rng.IntN(3) > 0)
	case 12:
		return &Command{Kind: KindVolumeDelete, VolumeDelete: &VolumeDeleteCmd{UUID: pick(vols)}}
	case 13:
		return &Command{Kind: KindTargetDelete, TargetDelete: &TargetDeleteCmd{IQN: pick(iqns)}}
	case 14:
		return &Command{Kind: KindGroupDelete, GroupDelete: &GroupDeleteCmd{Name: pick(groups)}}
	case 16:
		g := pick(groups)
		owner, e := pick(nodes), uint64(rng.IntN(3))
		if gg, ok := a.st.Groups[g]; ok && rng.IntN(3) > 0 {
			owner, e = gg.Owner, gg.Epoch
		}
		var conns []InitiatorConn
		for range rng.IntN(4) {
			conns = append(conns, ic(fmt.Sprintf("192.0.2.%d:3260", 10+rng.IntN(3)), fmt.Sprintf("198.51.100.%d:%d", rng.IntN(3), 40000+rng.IntN(3))))
		}
		return cConns(g, owner, e, conns...)
	case 17:
		g := pick(groups)
		to := pick(nodes)
		if gg, ok := a.st.Groups[g]; ok && rng.IntN(2) > 0 {
			to = gg.MovingTo
		}
		return cMoveCancel(g, to)
	case 18:
		return cFenceConfirm(pick(nodes), []string{"", "alice"}[rng.IntN(2)])
	default:
		if rng.IntN(4) > 0 {
			return cSetState(pick(nodes), NodeOnline)
		}
		return &Command{Kind: KindNodeRemove, NodeRemove: &NodeRemoveCmd{ID: pick(nodes)}}
	}
}

// TestPRThroughLogicalUnit drives a real LU: REGISTER and RESERVE (APTPL
// clear) land in the cluster state, and an LU opened on another node's
// restored state reports the same key and reservation.
func TestPRThroughLogicalUnit(t *testing.T) {
	ctx := context.Background()
	loc := NewLocal(nil)
	for _, c := range fixtureCommands() {
		if _, err := loc.Propose(ctx, c); err != nil {
			t.Fatal(err)
		}
	}
	nexus := scsi.ITNexus{InitiatorName: "iqn.1993-08.org.debian:01:host", ISID: [6]byte{0x23, 0xd0, 0, 0, 0, 1}, TargetName: iqn1, TPGT: 1, RelativePortID: 1}
	newLU := func(f *FSM) *scsi.LogicalUnit {
		lu, err := scsi.New(scsi.Config{Backend: scsitest.NewMemBackend(1 << 20), PR: &PRStore{P: loc, FSM: f, Volume: u1}})
		if err != nil {
			t.Fatal(err)
		}
		// Consume the power-on unit attention.
		lu.Execute(ctx, &scsi.Command{Nexus: nexus, CDB: make([]byte, 6)})
		return lu
	}
	prout := func(lu *scsi.LogicalUnit, sa byte, typ byte, key, sakey uint64) {
		t.Helper()
		param := make([]byte, 24)
		binary.BigEndian.PutUint64(param[0:], key)
		binary.BigEndian.PutUint64(param[8:], sakey)
		cdb := []byte{0x5f, sa, typ, 0, 0, 0, 0, 0, 24, 0}
		r := lu.Execute(ctx, &scsi.Command{Nexus: nexus, CDB: cdb, Write: true, ExpectedLen: 24, DataOut: param})
		if r.Status != scsi.StatusGood {
			t.Fatalf("PROUT sa %d: status %#x sense %x", sa, r.Status, r.Sense)
		}
	}
	lu := newLU(loc.FSM)
	prout(lu, 0x00, 0, 0, 0xfeed) // REGISTER
	prout(lu, 0x01, 1, 0xfeed, 0) // RESERVE, write exclusive
	st := loc.FSM.State().PR[u1]
	if len(st.Registrations) != 1 || st.Registrations[0].Key != 0xfeed || st.Holder != 0 || st.APTPL {
		t.Fatalf("state %+v", st)
	}
	// Failover: another node's FSM restored from a snapshot.
	snap, _ := loc.FSM.Snapshot()
	var sink memSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatal(err)
	}
	f2 := NewFSM(nil)
	if err := f2.Restore(io.NopCloser(&sink)); err != nil {
		t.Fatal(err)
	}
	lu2 := newLU(f2)
	r := lu2.Execute(ctx, &scsi.Command{Nexus: nexus, CDB: []byte{0x5e, 0x01, 0, 0, 0, 0, 0, 0x01, 0, 0}, Read: true, ExpectedLen: 256})
	if r.Status != scsi.StatusGood || len(r.Data) < 24 {
		t.Fatalf("READ RESERVATION: %#x %x", r.Status, r.Sense)
	}
	if key := binary.BigEndian.Uint64(r.Data[8:]); key != 0xfeed || r.Data[21]&0x0f != 1 {
		t.Fatalf("reservation after failover: % x", r.Data[:24])
	}
}
