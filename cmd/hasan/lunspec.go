package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/google/uuid"
)

// lunSpec is one --lun flag: "N=PATH[,size=1G][,thin][,uuid=U][,block=512]".
type lunSpec struct {
	LUN       uint64
	Path      string
	Size      int64
	Thin      bool
	UUID      uuid.UUID
	BlockSize uint32
}

func parseLUNSpec(s string) (lunSpec, error) {
	sp := lunSpec{BlockSize: 512}
	num, rest, ok := strings.Cut(s, "=")
	if !ok || num == "" || rest == "" {
		return sp, fmt.Errorf("--lun %q: want N=PATH[,size=1G][,thin][,uuid=UUID][,block=512|4096]", s)
	}
	n, err := strconv.ParseUint(num, 10, 64)
	if err != nil || n > 16383 {
		return sp, fmt.Errorf("--lun %q: LUN number %q must be 0..16383", s, num)
	}
	sp.LUN = n
	parts := strings.Split(rest, ",")
	sp.Path = parts[0]
	if sp.Path == "" {
		return sp, fmt.Errorf("--lun %q: missing PATH", s)
	}
	for _, opt := range parts[1:] {
		k, v, _ := strings.Cut(opt, "=")
		switch k {
		case "size":
			sz, err := parseSize(v)
			if err != nil {
				return sp, fmt.Errorf("--lun %q: %w", s, err)
			}
			sp.Size = sz
		case "thin":
			sp.Thin = true
		case "thick":
			sp.Thin = false
		case "uuid":
			u, err := uuid.Parse(v)
			if err != nil {
				return sp, fmt.Errorf("--lun %q: uuid %q: %w", s, v, err)
			}
			sp.UUID = u
		case "block":
			switch v {
			case "512":
				sp.BlockSize = 512
			case "4096":
				sp.BlockSize = 4096
			default:
				return sp, fmt.Errorf("--lun %q: block=%q must be 512 or 4096", s, v)
			}
		default:
			return sp, fmt.Errorf("--lun %q: unknown option %q (want size=, thin, thick, uuid=, block=)", s, k)
		}
	}
	if sp.Size%int64(sp.BlockSize) != 0 {
		return sp, fmt.Errorf("--lun %q: size %d is not a multiple of the %d-byte block", s, sp.Size, sp.BlockSize)
	}
	return sp, nil
}

// parseSize accepts bytes or a K/M/G/T suffix (powers of 1024).
func parseSize(v string) (int64, error) {
	if v == "" {
		return 0, errors.New("size= needs a value such as 1G")
	}
	mult := int64(1)
	switch strings.ToUpper(v[len(v)-1:]) {
	case "K":
		mult = 1 << 10
	case "M":
		mult = 1 << 20
	case "G":
		mult = 1 << 30
	case "T":
		mult = 1 << 40
	}
	num := v
	if mult != 1 {
		num = v[:len(v)-1]
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n <= 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("size %q: want a positive number of bytes, optionally with K, M, G or T", v)
	}
	return n * mult, nil
}

// volumeMeta is the sidecar next to a standalone LUN's file. It pins the
// volume UUID, from which the disk's serial and NAA designator derive, so the
// initiator sees the same disk after a restart and two files never share one.
type volumeMeta struct {
	UUID uuid.UUID `json:"uuid"`
}

func metaPath(path string) string { return path + ".hasan.json" }

// resolveVolumeID returns the volume UUID for sp, creating the sidecar on
// first use. An explicit uuid= that contradicts the sidecar is an error:
// silently changing a disk's identity breaks multipath and clusters.
func resolveVolumeID(sp lunSpec) (uuid.UUID, error) {
	mp := metaPath(sp.Path)
	b, err := os.ReadFile(mp)
	switch {
	case err == nil:
		var m volumeMeta
		if err := json.Unmarshal(b, &m); err != nil || m.UUID == uuid.Nil {
			return uuid.Nil, fmt.Errorf("%s is corrupt (%v); fix or remove it to assign a new identity", mp, err)
		}
		if sp.UUID != uuid.Nil && sp.UUID != m.UUID {
			return uuid.Nil, fmt.Errorf("--lun %d: uuid=%s contradicts %s (uuid %s); remove the sidecar to change the disk's identity", sp.LUN, sp.UUID, mp, m.UUID)
		}
		return m.UUID, nil
	case !errors.Is(err, os.ErrNotExist):
		return uuid.Nil, fmt.Errorf("read %s: %w", mp, err)
	}
	id := sp.UUID
	if id == uuid.Nil {
		id = uuid.New()
	}
	out, _ := json.MarshalIndent(volumeMeta{UUID: id}, "", "  ")
	if err := writeFileAtomic(mp, append(out, '\n')); err != nil {
		return uuid.Nil, err
	}
	return id, nil
}

// writeFileAtomic writes via a temporary file, fsync and rename so a crash
// leaves either the old or the new content.
func writeFileAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("sync %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("rename %s: %w", path, err)
	}
	return nil
}
