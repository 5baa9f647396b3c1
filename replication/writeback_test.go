package replication

import (
	"cmp"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"
)

// recordedWriteback is a writeback whose start records the ranges it was
// given instead of calling sync_file_range.
type recordedWriteback struct {
	mu     sync.Mutex
	ranges [][2]int64
	wb     *writeback
}

func newRecordedWriteback(t *testing.T) *recordedWriteback {
	r := &recordedWriteback{}
	r.wb = newWriteback(func(off, n int64) error {
		r.mu.Lock()
		r.ranges = append(r.ranges, [2]int64{off, off + n})
		r.mu.Unlock()
		return nil
	})
	t.Cleanup(r.wb.close)
	return r
}

// covered is the sorted union of the recorded ranges, merged where they
// touch, once the goroutine went idle.
func (r *recordedWriteback) covered(t *testing.T) [][2]int64 {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		r.wb.mu.Lock()
		idle := len(r.wb.queue) == 0 && len(r.wb.wake) == 0
		r.wb.mu.Unlock()
		if idle || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond) // the last start call may still be running
	r.mu.Lock()
	defer r.mu.Unlock()
	var out [][2]int64
	rs := slices.Clone(r.ranges)
	slices.SortFunc(rs, func(a, b [2]int64) int { return cmp.Compare(a[0], b[0]) })
	for _, g := range rs {
		if n := len(out); n > 0 && g[0] <= out[n-1][1] {
			out[n-1][1] = max(out[n-1][1], g[1])
			continue
		}
		out = append(out, g)
	}
	return out
}

// TestWritebackFinishedWindows checks that a sequential writer gets the
// writeback of exactly the windows it finished started, and that a window
// still being written is left alone.
func TestWritebackFinishedWindows(t *testing.T) {
	r := newRecordedWriteback(t)
	const w = writebackWindow
	// 2.5 windows in 128 KiB writes.
	for off := int64(0); off < 2*w+w/2; off += 128 << 10 {
		r.wb.wrote(off, off+128<<10)
	}
	got := r.covered(t)
	if len(got) != 1 || got[0] != [2]int64{0, 2 * w} {
		t.Fatalf("writeback started for %v, want [[0 %d]]", got, 2*w)
	}
	// A large write that continues nothing, from the middle of a window:
	// only the windows it covers whole; continued, the one it finished.
	r2 := newRecordedWriteback(t)
	r2.wb.wrote(w/2, 3*w+4096)
	if got := r2.covered(t); len(got) != 1 || got[0] != [2]int64{w, 3 * w} {
		t.Fatalf("writeback started for %v, want [[%d %d]]", got, w, 3*w)
	}
	r2.wb.wrote(3*w+4096, 4*w)
	if got := r2.covered(t); len(got) != 1 || got[0] != [2]int64{w, 4 * w} {
		t.Fatalf("writeback started for %v, want [[%d %d]]", got, w, 4*w)
	}
	// Random writes start nothing, also those that end a window.
	r3 := newRecordedWriteback(t)
	for _, off := range []int64{4096, w + 4096, 5*w - 4096, 2*w - 4096, 9*w - 4096} {
		r3.wb.wrote(off, off+4096)
	}
	if got := r3.covered(t); len(got) != 0 {
		t.Fatalf("writeback started for %v, want none", got)
	}
	// Interleaved sequential writers are each followed.
	r4 := newRecordedWriteback(t)
	for off := int64(0); off < w; off += 64 << 10 {
		r4.wb.wrote(off, off+64<<10)
		r4.wb.wrote(10*w+off, 10*w+off+64<<10)
	}
	if got := r4.covered(t); len(got) != 2 || got[0] != [2]int64{0, w} || got[1] != [2]int64{10 * w, 11 * w} {
		t.Fatalf("writeback started for %v, want [[0 %d] [%d %d]]", got, w, 10*w, 11*w)
	}
}

// TestStoreStartsWriteback checks that the Store hands the windows its
// writes finished to the writeback, and that the real sync_file_range call
// works on a file.
func TestStoreStartsWriteback(t *testing.T) {
	st, err := OpenStore(filepath.Join(t.TempDir(), "d.img"), 8*writebackWindow)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	buf := make([]byte, writebackWindow)
	for i := range buf {
		buf[i] = byte(i)
	}
	// The real one first: sync_file_range must not fail on this file.
	if err := st.f.(osStoreFile).startWriteback(0, writebackWindow); err != nil {
		t.Fatalf("sync_file_range: %v", err)
	}
	st.wb.close()
	r := newRecordedWriteback(t)
	st.wb = r.wb
	if err := st.WriteAt(buf, 0, false); err != nil {
		t.Fatal(err)
	}
	// Half a window, then the rest of it FUA: the window is finished.
	if err := st.WriteAt(buf[:writebackWindow/2], 4*writebackWindow, false); err != nil {
		t.Fatal(err)
	}
	if err := st.WriteAt(buf[writebackWindow/2:], 4*writebackWindow+writebackWindow/2, true); err != nil {
		t.Fatal(err)
	}
	want := [][2]int64{{0, writebackWindow}, {4 * writebackWindow, 5 * writebackWindow}}
	if got := r.covered(t); !slices.Equal(got, want) {
		t.Fatalf("writeback started for %v, want %v", got, want)
	}
}
