package replication

import (
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"slices"
)

// Meta is one node's persistent metadata for one volume replica. Everything
// but the activity log is in <volume>.meta, rewritten whole on every change
// (write temp, fsync, rename, fsync dir), so a crash leaves either the old or
// the new version, never a mix. The activity log changes far more often and
// lives in <volume>.al (ALFile: one write and one flush per change).
type Meta struct {
	Volume     string `json:"volume"`
	Size       int64  `json:"size"`
	RegionSize int64  `json:"region_size"`
	// Epoch is the highest epoch this node has accepted. A replica rejects
	// anything from a lower one.
	Epoch uint64 `json:"epoch"`
	// Gen identifies the data lineage: two replicas with the same Gen hold
	// the same data except for the regions in a bitmap or activity log.
	// Zero means unknown (a new replica): it gets a full sync.
	Gen uint64 `json:"gen"`
	// Fresh marks a replica that holds nothing but zeros: created together
	// with its volume at the volume's creation generation (LocalOptions.Gen)
	// and not written since. A primary clears it before its first write; a
	// replica on the first message from a primary that is not fresh itself
	// (messages of a fresh primary carry FlagFresh), and sets it when it
	// caught up with a fresh primary (FlagSynced). Two fresh replicas of the
	// same generation are identical without a sync; a fresh replica is never
	// taken as in sync with a primary that is no longer fresh, even at the
	// same generation (say, a disk replaced and recreated with the creation
	// generation by mistake): it gets a full sync. Conversely a fresh
	// primary that meets a written replica of its lineage refuses to serve
	// (ErrDiverged) rather than serve or sync its zeros.
	Fresh bool `json:"fresh,omitempty"`
	// AL is the activity log: regions that may have writes in flight. On a
	// primary it is its own; on a replica it is the copy the primary sent.
	// It is persisted in the ALFile, not in the metadata file.
	AL []uint64 `json:"-"`
	// Peers holds, on a primary, the dirty bitmap kept for each replica that
	// is or was out of sync, and the generation the bitmap is relative to.
	Peers map[string]*PeerMeta `json:"peers,omitempty"`
}

// PeerMeta is a primary's dirty tracking for one replica.
type PeerMeta struct {
	// Base is the generation the replica held when tracking began; a
	// replica reporting any other generation gets a full sync.
	Base  uint64  `json:"base"`
	Dirty *Bitmap `json:"dirty"`
}

// Clone deep-copies m so a Ready can carry a snapshot.
func (m *Meta) Clone() *Meta {
	c := *m
	c.AL = slices.Clone(m.AL)
	if m.Peers != nil {
		c.Peers = make(map[string]*PeerMeta, len(m.Peers))
		for k, p := range m.Peers {
			c.Peers[k] = &PeerMeta{Base: p.Base, Dirty: p.Dirty.Clone()}
		}
	}
	return &c
}

// Regions is the number of regions of a volume of this size.
func (m *Meta) Regions() uint64 { return regionCount(m.Size, m.RegionSize) }

func regionCount(size, rs int64) uint64 { return uint64((size + rs - 1) / rs) }

// ErrCorrupt marks metadata that fails its checksum or does not parse; the
// node must not serve the replica until an operator intervenes.
var ErrCorrupt = errors.New("replication: corrupt metadata")

type metaFile struct {
	CRC  uint32          `json:"crc32c"`
	Meta json.RawMessage `json:"meta"`
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// SaveMeta writes m to path crash-safely.
func SaveMeta(path string, m *Meta) error {
	body, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("replication: encode metadata: %w", err)
	}
	out, _ := json.Marshal(metaFile{CRC: crc32.Checksum(body, castagnoli), Meta: body})
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("replication: write metadata: %w", err)
	}
	if _, err := f.Write(out); err != nil {
		f.Close()
		return fmt.Errorf("replication: write metadata: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("replication: sync metadata: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("replication: close metadata: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("replication: rename metadata: %w", err)
	}
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return fmt.Errorf("replication: sync metadata dir: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("replication: sync metadata dir: %w", err)
	}
	return nil
}

// LoadMeta reads metadata written by SaveMeta. A missing file returns an
// error wrapping os.ErrNotExist.
func LoadMeta(path string) (*Meta, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("replication: read metadata: %w", err)
	}
	var mf metaFile
	if err := json.Unmarshal(raw, &mf); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, path, err)
	}
	if crc32.Checksum(mf.Meta, castagnoli) != mf.CRC {
		return nil, fmt.Errorf("%w: %s: checksum mismatch", ErrCorrupt, path)
	}
	var m Meta
	if err := json.Unmarshal(mf.Meta, &m); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, path, err)
	}
	if m.RegionSize <= 0 || m.Size <= 0 {
		return nil, fmt.Errorf("%w: %s: bad size or region size", ErrCorrupt, path)
	}
	return &m, nil
}
