// Package filebackend stores a logical unit's blocks in a local file or block
// device. It is the standalone target's backend and the local store under a
// replicated volume.
//
// Reads and writes are pread/pwrite; a FUA write uses pwritev2(RWF_DSYNC), so
// only that write waits for the disk instead of a whole-file fdatasync; Flush
// is fdatasync; Unmap punches holes (files) or discards (block devices), and
// MapStatus reads the file's hole map with SEEK_DATA/SEEK_HOLE, which is what
// GET LBA STATUS reports.
package filebackend
