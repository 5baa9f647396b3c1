package replication

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/hasan-storage/hasan/target/scsi"
)

var _ scsi.Backend = (*Volume)(nil)

// TestLogicalUnitOverReplicatedVolume runs target/scsi's LU on a 2-replica
// volume: a WRITE(10) through SCSI lands on both replicas and READ(10)
// returns it; a grow raises the capacity through the LU.
func TestLogicalUnitOverReplicatedVolume(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	c.waitISR(2)
	lu, err := scsi.New(scsi.Config{VolumeID: [16]byte{1}, Backend: c.prim, Thin: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	data := pattern(9, 8*512)
	w := make([]byte, 10)
	w[0] = 0x2a
	binary.BigEndian.PutUint32(w[2:], 100)
	binary.BigEndian.PutUint16(w[7:], 8)
	resp := lu.Execute(ctx, &scsi.Command{CDB: w, Write: true, ExpectedLen: uint32(len(data)), DataOut: data})
	if resp.Status != scsi.StatusGood {
		// The first command may report a unit attention (power on).
		resp = lu.Execute(ctx, &scsi.Command{CDB: w, Write: true, ExpectedLen: uint32(len(data)), DataOut: data})
	}
	if resp.Status != scsi.StatusGood {
		t.Fatalf("WRITE(10): status %#x sense %x", resp.Status, resp.Sense)
	}
	r := make([]byte, 10)
	r[0] = 0x28
	binary.BigEndian.PutUint32(r[2:], 100)
	binary.BigEndian.PutUint16(r[7:], 8)
	resp = lu.Execute(ctx, &scsi.Command{CDB: r, Read: true, ExpectedLen: uint32(len(data))})
	if resp.Status != scsi.StatusGood || !bytes.Equal(resp.Data, data) {
		t.Fatalf("READ(10): status %#x", resp.Status)
	}
	if resp.Release != nil {
		resp.Release()
	}
	if !bytes.Equal(c.img("n2")[100*512:108*512], data) {
		t.Fatal("SCSI write did not reach the replica")
	}
	if err := lu.Resize(ctx, c.size*2); err != nil {
		t.Fatal(err)
	}
	if c.prim.Size() != c.size*2 || int64(len(c.img("n2"))) != c.size*2 {
		t.Fatalf("grow: primary %d, replica file %d", c.prim.Size(), len(c.img("n2")))
	}
	if err := c.prim.Resize(ctx, c.size); err == nil {
		t.Fatal("shrink accepted")
	}
}

func TestMemMembershipRules(t *testing.T) {
	ctx := context.Background()
	m := NewMemMembership()
	m.Create("v", "n1", "n2", "n3")
	if _, err := m.RemoveFromISR(ctx, "v", 1, "n2", "n3"); !errors.Is(err, ErrNotPrimary) {
		t.Fatalf("non-primary removal: %v", err)
	}
	if _, err := m.RemoveFromISR(ctx, "v", 1, "n1", "n3"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Promote("v", "n3"); !errors.Is(err, ErrNotInISR) {
		t.Fatalf("promotion outside the ISR: %v", err)
	}
	if _, err := m.Promote("v", "n2"); err != nil {
		t.Fatal(err)
	}
	// The old primary at the old epoch is a zombie now.
	if _, err := m.RemoveFromISR(ctx, "v", 1, "n1", "n2"); !errors.Is(err, ErrStaleEpoch) {
		t.Fatalf("zombie removal: %v", err)
	}
	if _, err := m.AddToISR(ctx, "v", 2, "n2", "n3", CatchUp{PrimaryGen: 5, ReplicaGen: 5, DirtyBytes: 4096}); !errors.Is(err, ErrNotCaughtUp) {
		t.Fatalf("add before catch-up: %v", err)
	}
	if _, err := m.AddToISR(ctx, "v", 2, "n2", "n3", CatchUp{PrimaryGen: 5, ReplicaGen: 4}); !errors.Is(err, ErrNotCaughtUp) {
		t.Fatalf("add with another generation: %v", err)
	}
	st, err := m.AddToISR(ctx, "v", 2, "n2", "n3", CatchUp{PrimaryGen: 5, ReplicaGen: 5})
	if err != nil || !st.InISR("n3") {
		t.Fatalf("add after catch-up: %+v %v", st, err)
	}
}

func TestMetaCrashSafe(t *testing.T) {
	dir := t.TempDir()
	p := dir + "/v.meta"
	m := &Meta{Volume: "v", Size: 1 << 20, RegionSize: 4096, Epoch: 3, Gen: 9, AL: []uint64{1, 2},
		Peers: map[string]*PeerMeta{"n2": {Base: 8, Dirty: NewBitmap(256)}}}
	m.Peers["n2"].Dirty.Set(200)
	if err := SaveMeta(p, m); err != nil {
		t.Fatal(err)
	}
	got, err := LoadMeta(p)
	if err != nil || got.Epoch != 3 || !got.Peers["n2"].Dirty.Test(200) || got.Peers["n2"].Dirty.Count() != 1 {
		t.Fatalf("round trip: %+v %v", got, err)
	}
	raw := fileBytes(t, p)
	raw[len(raw)/2] ^= 1
	if err := writeFile(p, raw); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadMeta(p); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("corruption not detected: %v", err)
	}
}
