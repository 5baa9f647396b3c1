package replication

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// TestWriteQueueMergesAndCompletes: writes submitted out of order, many of
// them contiguous (so they are merged into one pwritev), some FUA, all land
// where they belong and each done is called exactly once after its data is
// in the file; a submission after close fails instead of hanging.
func TestWriteQueueMergesAndCompletes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "data")
	st, err := OpenStore(path, 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	q := newWriteQueue(st)
	want := make([]byte, 4<<20)
	rng := rand.New(rand.NewPCG(1, 2))
	// 4 KiB blocks, every eighth left out, a quarter split in two halves.
	type w struct {
		off  int64
		data []byte
	}
	var ws []w
	for b := int64(0); b < 1024; b++ {
		if b%8 == 7 {
			continue // gaps: writes on either side must not be merged
		}
		data := make([]byte, 4096)
		for i := range data {
			data[i] = byte(rng.IntN(255) + 1)
		}
		copy(want[b*4096:], data)
		if b%4 == 0 {
			ws = append(ws, w{b * 4096, data[:1000]}, w{b*4096 + 1000, data[1000:]})
		} else {
			ws = append(ws, w{b * 4096, data})
		}
	}
	rng.Shuffle(len(ws), func(i, j int) { ws[i], ws[j] = ws[j], ws[i] })
	var wg sync.WaitGroup
	var mu sync.Mutex
	calls := map[int64]int{}
	for i, x := range ws {
		wg.Add(1)
		q.submit(x.off, x.data, i%9 == 0, func(err error) {
			defer wg.Done()
			if err != nil {
				t.Error(err)
			}
			got := make([]byte, len(x.data))
			if err := st.ReadAt(got, x.off); err != nil || !bytes.Equal(got, x.data) {
				t.Errorf("write at %d not in the file when reported done (%v)", x.off, err)
			}
			mu.Lock()
			calls[x.off]++
			mu.Unlock()
		})
	}
	wg.Wait()
	q.close()
	if len(calls) != len(ws) {
		t.Fatalf("%d writes completed, want %d", len(calls), len(ws))
	}
	for off, n := range calls {
		if n != 1 {
			t.Fatalf("write at %d completed %d times", off, n)
		}
	}
	got, _ := os.ReadFile(path)
	if !bytes.Equal(got, want) {
		t.Fatal("file differs from the writes")
	}
	var late error
	q.submit(0, want[:4096], false, func(err error) { late = err })
	if !errors.Is(late, ErrClosed) {
		t.Fatalf("submit after close: %v, want ErrClosed", late)
	}
}
