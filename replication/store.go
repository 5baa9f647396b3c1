package replication

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Store is one replica's data: a sparse file (or block device) accessed
// with pread/pwrite. It is safe for concurrent use on disjoint ranges.
type Store struct {
	f    storeFile
	path string
	size atomic.Int64
	// wb starts the kernel's writeback of ranges a sequential writer has
	// finished (nil when the file cannot, as the tests' cache model).
	wb *writeback
}

// storeFile is what a Store does to its file, one system call each. In
// production it is the OS file (osStoreFile); the tests substitute a model
// of a volatile write cache (a crash loses whatever no fdatasync or DSYNC
// write made durable) to check what survives a power loss.
type storeFile interface {
	pread(p []byte, off int64) (int, error)
	// pwritev writes iov from off; with dsync (RWF_DSYNC) the data is
	// durable on return. EOPNOTSUPP for dsync means: write, then datasync.
	pwritev(iov [][]byte, off int64, dsync bool) (int, error)
	datasync() error
	punch(off, n int64) error
	truncate(size int64) error
	// seek is lseek with SEEK_DATA or SEEK_HOLE.
	seek(off int64, whence int) (int64, error)
	Close() error
}

type osStoreFile struct{ *os.File }

func (f osStoreFile) pread(p []byte, off int64) (int, error) { return unix.Pread(int(f.Fd()), p, off) }

func (f osStoreFile) pwritev(iov [][]byte, off int64, dsync bool) (int, error) {
	flags := 0
	if dsync {
		flags = unix.RWF_DSYNC
	}
	return unix.Pwritev2(int(f.Fd()), iov, off, flags)
}

func (f osStoreFile) datasync() error { return unix.Fdatasync(int(f.Fd())) }

func (f osStoreFile) punch(off, n int64) error {
	return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

func (f osStoreFile) truncate(size int64) error { return f.Truncate(size) }

func (f osStoreFile) seek(off int64, whence int) (int64, error) {
	return unix.Seek(int(f.Fd()), off, whence)
}

// startWriteback asks the kernel to start writing [off, off+n) to the disk
// without waiting for it and without any durability promise.
func (f osStoreFile) startWriteback(off, n int64) error {
	return unix.SyncFileRange(int(f.Fd()), off, n, unix.SYNC_FILE_RANGE_WRITE)
}

// writebackWindow is the granularity of early writeback: a window is
// handed to the kernel once a sequential writer has written past its end.
const writebackWindow = 1 << 20

// writebackStreams is how many sequential writers the writeback tells
// apart (the ends of that many recent writes are remembered).
const writebackStreams = 8

// writeback starts the kernel's writeback of windows that sequential writes
// have finished, from its own goroutine, so the write path never waits for
// it.
//
// Why: the primary flushes every node's data before regions may leave the
// activity log (Primary.evictable), and with gigabytes of dirty-page
// allowance the kernel itself starts writing late, so each such flush
// found hundreds of megabytes still in the page cache. Writing them then
// took 80–150 ms, and meanwhile the activity log's small synchronous
// writes waited behind the disk's cache flush, and the writes to new
// regions with them: a 128 KiB stream's p99 went from ≈ 20 to ≈ 85 ms.
// Started as the data is written, the writeback runs alongside the stream
// and a flush finds little left to do (0.1–8 ms; p99 ≈ 12 ms, see
// docs/replication.md). Only sequential writes (or one write covering
// whole windows) start it: a random writer's pages may well be written
// again soon, and writing them back early only added work (hot 4 KiB
// writes took 49 instead of 29 µs). It changes when data reaches the disk,
// never what is acknowledged: only a flush makes anything durable.
type writeback struct {
	start func(off, n int64) error
	mu    sync.Mutex
	queue [][2]int64              // ranges [lo, hi) not yet started
	ends  [writebackStreams]int64 // ends of recent writes, a ring
	next  int
	wake  chan struct{}
	quit  chan struct{}
	done  chan struct{}
	once  sync.Once
}

func newWriteback(start func(off, n int64) error) *writeback {
	w := &writeback{start: start, wake: make(chan struct{}, 1), quit: make(chan struct{}), done: make(chan struct{})}
	for i := range w.ends {
		w.ends[i] = -1
	}
	go w.run()
	return w
}

// wrote notes that [off, end) was written. If it continues an earlier write
// (a sequential writer), every window that ends within it is queued for
// writeback: the windows the writer has just finished; otherwise only the
// windows it covers whole. Ranges queued while the goroutine is busy merge
// with those they touch.
func (w *writeback) wrote(off, end int64) {
	if end <= off {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	i := slices.Index(w.ends[:], off)
	lo := (off + writebackWindow - 1) / writebackWindow * writebackWindow
	if i >= 0 {
		lo = off / writebackWindow * writebackWindow
	} else {
		i, w.next = w.next, (w.next+1)%len(w.ends)
	}
	w.ends[i] = end
	hi := end / writebackWindow * writebackWindow
	if hi <= lo {
		return
	}
	merged := false
	for j, q := range w.queue {
		if lo <= q[1] && q[0] <= hi {
			w.queue[j] = [2]int64{min(q[0], lo), max(q[1], hi)}
			merged = true
			break
		}
	}
	if !merged {
		if len(w.queue) >= writebackStreams {
			return // only a hint: the flush writes it anyway
		}
		w.queue = append(w.queue, [2]int64{lo, hi})
	}
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

func (w *writeback) run() {
	defer close(w.done)
	for {
		select {
		case <-w.wake:
		case <-w.quit:
			return
		}
		w.mu.Lock()
		queue := w.queue
		w.queue = nil
		w.mu.Unlock()
		for _, q := range queue {
			// Only a hint: a failure here shows up in the flush.
			_ = w.start(q[0], q[1]-q[0])
		}
	}
}

func (w *writeback) close() {
	w.once.Do(func() { close(w.quit) })
	<-w.done
}

// OpenStore opens or creates the data file at path with at least size bytes.
func OpenStore(path string, size int64) (*Store, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("replication: open %s: %w", path, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("replication: stat %s: %w", path, err)
	}
	s := &Store{f: osStoreFile{f}, path: path}
	s.wb = newWriteback(osStoreFile{f}.startWriteback)
	cur := st.Size()
	if st.Mode()&os.ModeDevice != 0 {
		if cur, err = f.Seek(0, io.SeekEnd); err != nil {
			s.Close()
			return nil, fmt.Errorf("replication: size of %s: %w", path, err)
		}
	}
	s.size.Store(cur)
	if cur < size {
		if err := s.Grow(size); err != nil {
			s.Close()
			return nil, err
		}
	}
	return s, nil
}

// Size is the current size in bytes.
func (s *Store) Size() int64 { return s.size.Load() }

// ReadAt fills p from off.
func (s *Store) ReadAt(p []byte, off int64) error {
	for len(p) > 0 {
		n, err := s.f.pread(p, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("replication: read %s at %d: %w", s.path, off, err)
		}
		if n == 0 {
			return fmt.Errorf("replication: read %s at %d: %w", s.path, off, io.ErrUnexpectedEOF)
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// WriteAt stores p at off; with fua it is durable on return (RWF_DSYNC, or
// write + fdatasync where the kernel lacks it).
func (s *Store) WriteAt(p []byte, off int64, fua bool) error {
	return s.WriteVec([][]byte{p}, off, fua)
}

// WriteVec stores the buffers of iov one after the other from off, in one
// pwritev where possible; with fua all of it is durable on return. iov's
// slices may be modified (a short write advances them).
func (s *Store) WriteVec(iov [][]byte, off int64, fua bool) error {
	if s.wb != nil {
		// FUA data is already clean; its end still tells where a
		// sequential writer is, and the window may hold earlier writes.
		start := off
		defer func() { s.wb.wrote(start, off) }()
	}
	for len(iov) > 0 {
		if len(iov[0]) == 0 {
			iov = iov[1:]
			continue
		}
		n, err := s.f.pwritev(iov, off, fua)
		if err == unix.EINTR {
			continue
		}
		if err == unix.EOPNOTSUPP && fua {
			if err := s.WriteVec(iov, off, false); err != nil {
				return err
			}
			return s.Sync()
		}
		if err != nil {
			return fmt.Errorf("replication: write %s at %d: %w", s.path, off, err)
		}
		if n == 0 {
			return fmt.Errorf("replication: write %s at %d: %w", s.path, off, io.ErrShortWrite)
		}
		off += int64(n)
		for n > 0 && len(iov) > 0 {
			c := min(n, len(iov[0]))
			iov[0] = iov[0][c:]
			n -= c
			if len(iov[0]) == 0 {
				iov = iov[1:]
			}
		}
	}
	return nil
}

// Sync makes completed writes durable (fdatasync).
func (s *Store) Sync() error {
	if err := s.f.datasync(); err != nil {
		return fmt.Errorf("replication: fdatasync %s: %w", s.path, err)
	}
	return nil
}

// Punch deallocates [off, off+n); the range reads as zeros afterwards.
func (s *Store) Punch(off, n int64) error {
	err := s.f.punch(off, n)
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EOPNOTSUPP) {
		return fmt.Errorf("replication: punch %s at %d: %w", s.path, off, err)
	}
	zero := make([]byte, min(n, 1<<20))
	for n > 0 {
		c := min(n, int64(len(zero)))
		if err := s.WriteAt(zero[:c], off, false); err != nil {
			return err
		}
		off, n = off+c, n-c
	}
	return nil
}

// Grow extends the file to size bytes (sparse).
func (s *Store) Grow(size int64) error {
	if size <= s.size.Load() {
		return nil
	}
	if err := s.f.truncate(size); err != nil {
		return fmt.Errorf("replication: grow %s to %d: %w", s.path, size, err)
	}
	s.size.Store(size)
	return nil
}

// Sum returns the SHA-256 of [off, off+n).
func (s *Store) Sum(off, n int64) ([]byte, error) {
	h := sha256.New()
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		c := min(n, int64(len(buf)))
		if err := s.ReadAt(buf[:c], off); err != nil {
			return nil, err
		}
		h.Write(buf[:c])
		off, n = off+c, n-c
	}
	return h.Sum(nil), nil
}

// MapStatus reports whether the extent at off is allocated and how many
// bytes from off share that state, from the file's hole map (SEEK_DATA and
// SEEK_HOLE). A block device, or a filesystem without hole reporting, is
// reported as fully mapped.
func (s *Store) MapStatus(off int64) (bool, int64, error) {
	size := s.size.Load()
	if off < 0 || off >= size {
		return false, 0, fmt.Errorf("replication: map status at %d beyond size %d", off, size)
	}
	data, err := s.f.seek(off, unix.SEEK_DATA)
	if err == unix.ENXIO {
		return false, size - off, nil
	}
	if err != nil {
		return true, size - off, nil
	}
	if data > off {
		return false, min(data, size) - off, nil
	}
	hole, err := s.f.seek(off, unix.SEEK_HOLE)
	if err != nil {
		return true, size - off, nil
	}
	return true, min(hole, size) - off, nil
}

// Close closes the file.
func (s *Store) Close() error {
	if s.wb != nil {
		s.wb.close()
	}
	return s.f.Close()
}

// Local is one node's replica of a volume: <dir>/<volume>.img holds the
// data, <dir>/<volume>.meta the metadata next to it and <dir>/<volume>.al
// the activity log.
type Local struct {
	Store    *Store
	MetaPath string
	Meta     *Meta
	AL       *ALFile
}

// Persist makes m durable: its activity log if al (one write and one flush
// of the activity-log file), everything else if md (SaveMeta).
func (l *Local) Persist(m *Meta, md, al bool) error {
	if al {
		if err := l.AL.Save(m.AL); err != nil {
			return err
		}
	}
	if md {
		return SaveMeta(l.MetaPath, m)
	}
	return nil
}

// Close closes the data and activity-log files.
func (l *Local) Close() error {
	return errors.Join(l.Store.Close(), l.AL.Close())
}

// LocalOptions describe a replica to open or create.
type LocalOptions struct {
	Dir    string
	Volume string
	// Size and RegionSize are used when the replica is created.
	Size       int64
	RegionSize int64
	// Gen is the generation a new replica starts with: the volume's
	// creation generation for a replica created together with the volume
	// (all zeros, Meta.Fresh), so replicas created together start in sync
	// without a full sync; 0 for any replica created later or of unknown
	// contents, which gets a full sync. A random value chosen once per
	// volume (the cluster's create command) and never reused. Ignored when
	// the replica exists.
	Gen uint64
}

// DefaultRegionSize is the dirty-tracking, resync and verify granularity.
// 1 MiB keeps the bitmap at 128 KiB per TiB, small enough to rewrite
// atomically, keeps the activity log's slots covering a hot set of that many
// MiB, and
// makes each resync chunk a single efficient network transfer; the cost is
// that a 4 KiB write dirties 1 MiB of resync work while a replica is out.
const DefaultRegionSize = 1 << 20

// OpenLocal opens the replica in o.Dir, creating it if it does not exist.
func OpenLocal(o LocalOptions) (*Local, error) { return openLocal(o, OpenStore) }

// openLocal is OpenLocal with the data file opened by openStore (the tests
// open a model of a volatile write cache; the metadata and activity-log
// files are always real files, written durably).
func openLocal(o LocalOptions, openStore func(path string, size int64) (*Store, error)) (*Local, error) {
	if o.RegionSize == 0 {
		o.RegionSize = DefaultRegionSize
	}
	if o.RegionSize < 4096 || o.RegionSize%4096 != 0 {
		return nil, fmt.Errorf("replication: RegionSize %d: must be a positive multiple of 4096", o.RegionSize)
	}
	if err := os.MkdirAll(o.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("replication: %w", err)
	}
	metaPath := filepath.Join(o.Dir, o.Volume+".meta")
	alPath := filepath.Join(o.Dir, o.Volume+".al")
	m, err := LoadMeta(metaPath)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if o.Size <= 0 {
			return nil, fmt.Errorf("replication: new replica %s needs a size", o.Volume)
		}
		// A fresh, empty activity log first (replacing any leftover of a
		// deleted volume), then the metadata that makes the replica exist:
		// an existing replica without its activity-log file is corrupt,
		// never silently given an empty log.
		if err := os.Remove(alPath); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("replication: %w", err)
		}
		m = &Meta{Volume: o.Volume, Size: o.Size, RegionSize: o.RegionSize, Gen: o.Gen, Fresh: o.Gen != 0}
		a, _, err := OpenALFile(alPath)
		if err != nil {
			return nil, err
		}
		a.Close()
		if err := SaveMeta(metaPath, m); err != nil {
			return nil, err
		}
	case err != nil:
		return nil, err
	}
	if _, err := os.Stat(alPath); err != nil {
		return nil, fmt.Errorf("%w: %s: activity log missing: %v", ErrCorrupt, alPath, err)
	}
	a, al, err := OpenALFile(alPath)
	if err != nil {
		return nil, err
	}
	m.AL = al
	st, err := openStore(filepath.Join(o.Dir, o.Volume+".img"), m.Size)
	if err != nil {
		a.Close()
		return nil, err
	}
	return &Local{Store: st, MetaPath: metaPath, Meta: m, AL: a}, nil
}

// LoadLocalMeta reads a replica's metadata and activity log without opening
// it for I/O (tools and tests inspecting a node's state).
func LoadLocalMeta(dir, volume string) (*Meta, error) {
	m, err := LoadMeta(filepath.Join(dir, volume+".meta"))
	if err != nil {
		return nil, err
	}
	raw, err := os.ReadFile(filepath.Join(dir, volume+".al"))
	if err != nil {
		return nil, fmt.Errorf("%w: activity log: %v", ErrCorrupt, err)
	}
	if len(raw) < 2*alSlotBytes {
		return nil, fmt.Errorf("%w: short activity log", ErrCorrupt)
	}
	_, al, err := decodeALSlots(raw)
	if err != nil {
		return nil, fmt.Errorf("%w: activity log: %v", ErrCorrupt, err)
	}
	m.AL = al
	return m, nil
}

// ErrInUse refuses to delete a volume that is still serving I/O.
var ErrInUse = errors.New("replication: volume in use")

// DeleteLocal removes a replica's data and metadata files from dir (a
// missing file is not an error), then syncs dir so the removal is durable.
// The caller makes sure nothing serves the replica any more (Volume.Delete
// and Server.DeleteVolume do).
func DeleteLocal(dir, volume string) error {
	var errs []error
	// Metadata first: a crash half-way leaves data without metadata, which
	// OpenLocal would treat as a new replica of unknown contents (full
	// sync), never as a valid replica.
	for _, name := range []string{volume + ".meta", volume + ".meta.tmp", volume + ".al", volume + ".al.tmp", volume + ".img"} {
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("replication: delete %s: %w", name, err))
		}
	}
	if d, err := os.Open(dir); err == nil {
		if err := d.Sync(); err != nil {
			errs = append(errs, fmt.Errorf("replication: sync %s: %w", dir, err))
		}
		d.Close()
	}
	return errors.Join(errs...)
}
