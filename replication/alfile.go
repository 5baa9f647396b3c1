package replication

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// The activity log lives in its own file, <volume>.al, so that bringing a
// region into it costs one small write and one device flush instead of a
// rewrite of the whole metadata file (temp file, fsync, rename, directory
// fsync).
//
// The file holds two slots of alSlotBytes each, written alternately: the
// transaction with sequence number n goes to slot n%2. A slot is
//
//	magic "HRAL" | version u16 | reserved u16 | seq u64 | count u32 | crc32c u32 | count x region u64
//
// all big-endian, the checksum covering the header (with the checksum field
// zero) and the regions. Only the used prefix of a slot, rounded up to 4 KiB,
// is written, with RWF_DSYNC (or pwrite + fdatasync). Transaction n+1 starts
// only after n is durable, and it overwrites slot (n+1)%2, which holds n-1,
// so the newest complete state is never overwritten: a crash during a write
// leaves at worst a torn slot, whose checksum fails, next to the intact
// previous state. The previous state is then the right answer, because the
// writes the torn transaction was protecting had not been issued yet.
// Recovery takes the valid slot with the higher sequence number; an all-zero
// slot is the empty log at sequence 0. The file's blocks are written once
// with zeros when it is created, so later writes overwrite allocated blocks
// and fdatasync has no file metadata to commit.
const (
	alSlotBytes   = 64 << 10
	alHeaderBytes = 24
	alVersion     = 1
	// MaxALSlots is the largest activity log a slot can hold.
	MaxALSlots = (alSlotBytes - alHeaderBytes) / 8
	// DefaultALSlots is the largest activity log whose transaction is a
	// single 4 KiB block (509 regions, 509 MiB at the default region size):
	// a bigger log costs nothing more per transaction up to this size, and
	// hot sets up to it pay no activity-log writes at all. The price is the
	// resync after a primary crash, which copies every region in the log to
	// every replica (at most 509 MiB).
	DefaultALSlots = (4096 - alHeaderBytes) / 8
)

var alMagic = [4]byte{'H', 'R', 'A', 'L'}

// ALFile is a node's persistent copy of one volume's activity log. It is not
// safe for concurrent use; the primary's loop and the replica's connection
// (under its volume lock) serialize calls.
type ALFile struct {
	f    *os.File
	path string
	seq  uint64
	buf  []byte
}

// OpenALFile opens or creates the activity-log file at path and returns it
// with the newest durable log. A file whose two slots both fail their
// checksum is ErrCorrupt.
func OpenALFile(path string) (*ALFile, []uint64, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		f, err = createALFile(path)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("replication: open activity log: %w", err)
	}
	raw := make([]byte, 2*alSlotBytes)
	n, err := f.ReadAt(raw, 0)
	if n < len(raw) {
		f.Close()
		return nil, nil, fmt.Errorf("%w: %s: short activity log (%d bytes): %v", ErrCorrupt, path, n, err)
	}
	seq, al, err := decodeALSlots(raw)
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, path, err)
	}
	return &ALFile{f: f, path: path, seq: seq, buf: make([]byte, alSlotBytes)}, al, nil
}

func createALFile(path string) (*os.File, error) {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	if _, err := f.WriteAt(make([]byte, 2*alSlotBytes), 0); err != nil {
		f.Close()
		return nil, err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return nil, err
	}
	if err := os.Rename(tmp, path); err != nil {
		f.Close()
		return nil, err
	}
	if err := syncDir(filepath.Dir(path)); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// decodeALSlots returns the newest valid state of a two-slot image.
func decodeALSlots(raw []byte) (uint64, []uint64, error) {
	var best []uint64
	var bestSeq uint64
	found := false
	var errs []error
	for i := 0; i < 2; i++ {
		seq, al, err := decodeALSlot(raw[i*alSlotBytes : (i+1)*alSlotBytes])
		if err != nil {
			errs = append(errs, fmt.Errorf("slot %d: %w", i, err))
			continue
		}
		if !found || seq > bestSeq {
			best, bestSeq, found = al, seq, true
		}
	}
	if !found {
		return 0, nil, errors.Join(errs...)
	}
	return bestSeq, best, nil
}

func decodeALSlot(s []byte) (uint64, []uint64, error) {
	if allZero(s[:alHeaderBytes]) {
		return 0, nil, nil
	}
	if [4]byte(s[:4]) != alMagic {
		return 0, nil, errors.New("bad magic")
	}
	if v := binary.BigEndian.Uint16(s[4:]); v != alVersion {
		return 0, nil, fmt.Errorf("version %d", v)
	}
	seq := binary.BigEndian.Uint64(s[8:])
	count := binary.BigEndian.Uint32(s[16:])
	if count > MaxALSlots {
		return 0, nil, fmt.Errorf("count %d", count)
	}
	end := alHeaderBytes + 8*int(count)
	want := binary.BigEndian.Uint32(s[20:])
	h := crc32.New(castagnoli)
	h.Write(s[:20])
	h.Write([]byte{0, 0, 0, 0})
	h.Write(s[alHeaderBytes:end])
	if h.Sum32() != want {
		return 0, nil, errors.New("checksum mismatch (torn write)")
	}
	al := make([]uint64, count)
	for i := range al {
		al[i] = binary.BigEndian.Uint64(s[alHeaderBytes+8*i:])
	}
	return seq, al, nil
}

// Save makes al the durable activity log: one write of the next slot and
// one device flush. It returns only once al is durable.
func (a *ALFile) Save(al []uint64) error {
	if len(al) > MaxALSlots {
		return fmt.Errorf("replication: activity log of %d regions exceeds %d", len(al), MaxALSlots)
	}
	seq := a.seq + 1
	end := alHeaderBytes + 8*len(al)
	n := (end + 4095) &^ 4095
	s := a.buf[:n]
	clear(s)
	copy(s, alMagic[:])
	binary.BigEndian.PutUint16(s[4:], alVersion)
	binary.BigEndian.PutUint64(s[8:], seq)
	binary.BigEndian.PutUint32(s[16:], uint32(len(al)))
	for i, r := range al {
		binary.BigEndian.PutUint64(s[alHeaderBytes+8*i:], r)
	}
	binary.BigEndian.PutUint32(s[20:], crc32.Checksum(s[:end], castagnoli))
	off := int64(seq%2) * alSlotBytes
	if err := pwriteDSync(a.f, s, off); err != nil {
		return fmt.Errorf("replication: write activity log %s: %w", a.path, err)
	}
	a.seq = seq
	return nil
}

// pwriteDSync writes p at off durably: RWF_DSYNC where the kernel and file
// system support it, else pwrite followed by fdatasync.
func pwriteDSync(f *os.File, p []byte, off int64) error {
	fd := int(f.Fd())
	flags := unix.RWF_DSYNC
	for len(p) > 0 {
		n, err := unix.Pwritev2(fd, [][]byte{p}, off, flags)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EOPNOTSUPP && flags != 0:
			flags = 0
			continue
		case err != nil:
			return err
		}
		p, off = p[n:], off+int64(n)
	}
	if flags == 0 {
		return unix.Fdatasync(fd)
	}
	return nil
}

// Close closes the file.
func (a *ALFile) Close() error {
	if a == nil {
		return nil
	}
	return a.f.Close()
}
