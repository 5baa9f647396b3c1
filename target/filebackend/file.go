package filebackend

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Provisioning says how a new or grown file gets its space.
type Provisioning int

const (
	// Thick allocates every block up front (fallocate), so writes never fail
	// for lack of space and latency does not depend on allocation.
	Thick Provisioning = iota
	// Thin leaves the file sparse; unmapped blocks cost nothing.
	Thin
)

func (p Provisioning) String() string {
	if p == Thin {
		return "thin"
	}
	return "thick"
}

// ErrShrink is returned when asked to make a backend smaller: shrinking
// silently drops data, so it is never done implicitly.
var ErrShrink = errors.New("filebackend: refusing to shrink")

// File is a Backend over a regular file or a block device.
type File struct {
	f     *os.File
	path  string
	prov  Provisioning
	block bool
	size  atomic.Int64
}

// Options configure Open.
type Options struct {
	// Size creates or grows the file to this many bytes when > 0. An existing
	// larger file is left as it is only if Size is 0; a smaller Size is an
	// error (ErrShrink).
	Size int64
	// Provisioning applies when the file is created or grown.
	Provisioning Provisioning
	// Create allows creating a missing file (Size must then be > 0).
	Create bool
}

// Open opens (and if allowed creates) the backing store at path.
func Open(path string, o Options) (*File, error) {
	flags := os.O_RDWR
	if o.Create {
		flags |= os.O_CREATE
	}
	f, err := os.OpenFile(path, flags, 0o600)
	if err != nil {
		return nil, fmt.Errorf("filebackend: open %s: %w", path, err)
	}
	b := &File{f: f, path: path, prov: o.Provisioning}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("filebackend: stat %s: %w", path, err)
	}
	var cur int64
	switch {
	case st.Mode()&os.ModeDevice != 0:
		b.block = true
		cur, err = f.Seek(0, io.SeekEnd)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("filebackend: size of %s: %w", path, err)
		}
		if o.Size > 0 && o.Size != cur {
			f.Close()
			return nil, fmt.Errorf("filebackend: %s is a %d-byte block device; size=%d cannot change it", path, cur, o.Size)
		}
	case st.Mode().IsRegular():
		cur = st.Size()
	default:
		f.Close()
		return nil, fmt.Errorf("filebackend: %s is neither a regular file nor a block device", path)
	}
	b.size.Store(cur)
	if !b.block && o.Size > 0 && o.Size != cur {
		if err := b.Resize(context.Background(), o.Size); err != nil {
			f.Close()
			return nil, err
		}
	}
	if b.size.Load() == 0 {
		f.Close()
		return nil, fmt.Errorf("filebackend: %s is empty; give a size", path)
	}
	return b, nil
}

// Path is the backing file's path.
func (b *File) Path() string { return b.path }

// Size is the capacity in bytes.
func (b *File) Size() int64 { return b.size.Load() }

// ReadAt fills p from off.
func (b *File) ReadAt(_ context.Context, p []byte, off int64) error {
	for len(p) > 0 {
		n, err := unix.Pread(int(b.f.Fd()), p, off)
		if err != nil {
			if err == unix.EINTR {
				continue
			}
			return fmt.Errorf("filebackend: read %s at %d: %w", b.path, off, err)
		}
		if n == 0 {
			return fmt.Errorf("filebackend: read %s at %d: %w", b.path, off, io.ErrUnexpectedEOF)
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// WriteAt stores p at off; with fua the data is on stable storage on return.
func (b *File) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if !fua {
		return b.writePlain(p, off)
	}
	for len(p) > 0 {
		n, err := unix.Pwritev2(int(b.f.Fd()), [][]byte{p}, off, unix.RWF_DSYNC)
		switch {
		case err == unix.EOPNOTSUPP:
			// Kernels or filesystems without RWF_DSYNC: write, then sync.
			if err := b.writePlain(p, off); err != nil {
				return err
			}
			return b.Flush(ctx)
		case err == unix.EINTR:
			continue
		case err != nil:
			return fmt.Errorf("filebackend: write %s at %d: %w", b.path, off, err)
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

func (b *File) writePlain(p []byte, off int64) error {
	for len(p) > 0 {
		n, err := unix.Pwrite(int(b.f.Fd()), p, off)
		if err != nil {
			if err == unix.EINTR {
				continue
			}
			return fmt.Errorf("filebackend: write %s at %d: %w", b.path, off, err)
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// Flush makes every completed write durable.
func (b *File) Flush(context.Context) error {
	if err := unix.Fdatasync(int(b.f.Fd())); err != nil {
		return fmt.Errorf("filebackend: fdatasync %s: %w", b.path, err)
	}
	return nil
}

// Unmap deallocates [off, off+length). Later reads return zeros.
func (b *File) Unmap(ctx context.Context, off, length int64) error {
	if length == 0 {
		return nil
	}
	if b.block {
		// BLKZEROOUT keeps the read-zeros promise that plain discard may not.
		r := [2]uint64{uint64(off), uint64(length)}
		if err := ioctlRange(int(b.f.Fd()), unix.BLKZEROOUT, &r); err != nil {
			return fmt.Errorf("filebackend: zero-out %s [%d,+%d): %w", b.path, off, length, err)
		}
		return nil
	}
	err := unix.Fallocate(int(b.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EOPNOTSUPP) {
		return fmt.Errorf("filebackend: punch hole %s [%d,+%d): %w", b.path, off, length, err)
	}
	// No hole punching on this filesystem: writing zeros keeps the contract.
	zero := make([]byte, min(length, 1<<20))
	for length > 0 {
		n := min(length, int64(len(zero)))
		if err := b.writePlain(zero[:n], off); err != nil {
			return err
		}
		off, length = off+n, length-n
	}
	return nil
}

// MapStatus reports whether the extent at off is allocated and its length.
func (b *File) MapStatus(_ context.Context, off int64) (bool, int64, error) {
	size := b.size.Load()
	if off >= size {
		return false, 0, fmt.Errorf("filebackend: map status at %d beyond size %d", off, size)
	}
	if b.block || b.prov == Thick {
		// A thick LU is fully provisioned by definition, whatever the
		// filesystem says about unwritten extents.
		return true, size - off, nil
	}
	fd := int(b.f.Fd())
	data, err := unix.Seek(fd, off, unix.SEEK_DATA)
	if err == unix.ENXIO { // no data after off: a hole up to EOF
		return false, size - off, nil
	}
	if err != nil {
		return true, size - off, nil // filesystem without SEEK_DATA: report mapped
	}
	if data > off {
		return false, min(data, size) - off, nil
	}
	hole, err := unix.Seek(fd, off, unix.SEEK_HOLE)
	if err != nil {
		return true, size - off, nil
	}
	return true, min(hole, size) - off, nil
}

// Resize grows (or, for an explicit caller, never shrinks) the file.
func (b *File) Resize(_ context.Context, size int64) error {
	if b.block {
		return fmt.Errorf("filebackend: %s is a block device; resize it underneath and reopen", b.path)
	}
	cur := b.size.Load()
	if size < cur {
		return fmt.Errorf("%w %s from %d to %d bytes", ErrShrink, b.path, cur, size)
	}
	if size == cur {
		return nil
	}
	fd := int(b.f.Fd())
	if b.prov == Thick {
		if err := unix.Fallocate(fd, 0, cur, size-cur); err != nil && !errors.Is(err, unix.EOPNOTSUPP) {
			return fmt.Errorf("filebackend: allocate %s to %d bytes: %w", b.path, size, err)
		}
	}
	if err := unix.Ftruncate(fd, size); err != nil {
		return fmt.Errorf("filebackend: extend %s to %d bytes: %w", b.path, size, err)
	}
	b.size.Store(size)
	return nil
}

// Close releases the file.
func (b *File) Close() error {
	if err := b.f.Close(); err != nil {
		return fmt.Errorf("filebackend: close %s: %w", b.path, err)
	}
	return nil
}
