package replication

import (
	"encoding/base64"
	"encoding/json"
	"math/bits"
)

// Bitmap has one bit per region of the volume. A set bit means the region
// may differ between the primary and the peer the bitmap belongs to.
type Bitmap struct {
	n     uint64
	words []uint64
}

// NewBitmap returns an all-clear bitmap of n bits.
func NewBitmap(n uint64) *Bitmap {
	return &Bitmap{n: n, words: make([]uint64, (n+63)/64)}
}

// Len is the number of bits.
func (b *Bitmap) Len() uint64 { return b.n }

// Set sets bit i and reports whether it was clear.
func (b *Bitmap) Set(i uint64) bool {
	if i >= b.n {
		return false
	}
	w, m := i/64, uint64(1)<<(i%64)
	was := b.words[w]&m != 0
	b.words[w] |= m
	return !was
}

// Clear clears bit i.
func (b *Bitmap) Clear(i uint64) {
	if i < b.n {
		b.words[i/64] &^= 1 << (i % 64)
	}
}

// Test reports bit i.
func (b *Bitmap) Test(i uint64) bool {
	return i < b.n && b.words[i/64]&(1<<(i%64)) != 0
}

// SetAll sets every bit.
func (b *Bitmap) SetAll() {
	for i := uint64(0); i < b.n; i++ {
		b.Set(i)
	}
}

// Count is the number of set bits.
func (b *Bitmap) Count() uint64 {
	var c int
	for _, w := range b.words {
		c += bits.OnesCount64(w)
	}
	return uint64(c)
}

// Next returns the first set bit at or after i, or false.
func (b *Bitmap) Next(i uint64) (uint64, bool) {
	for i < b.n {
		w := b.words[i/64] >> (i % 64)
		if w != 0 {
			j := i + uint64(bits.TrailingZeros64(w))
			return j, j < b.n
		}
		i = (i/64 + 1) * 64
	}
	return 0, false
}

// Grow extends the bitmap to n bits; new bits are clear.
func (b *Bitmap) Grow(n uint64) {
	if n <= b.n {
		return
	}
	nw := make([]uint64, (n+63)/64)
	copy(nw, b.words)
	b.words, b.n = nw, n
}

// Clone returns a deep copy.
func (b *Bitmap) Clone() *Bitmap {
	return &Bitmap{n: b.n, words: append([]uint64(nil), b.words...)}
}

// Bits lists the set bits (for scripts and reports).
func (b *Bitmap) Bits() []uint64 {
	var out []uint64
	for i, ok := b.Next(0); ok; i, ok = b.Next(i + 1) {
		out = append(out, i)
	}
	return out
}

type bitmapJSON struct {
	N    uint64 `json:"n"`
	Bits string `json:"bits"`
}

// MarshalJSON encodes the bitmap compactly (little-endian words, base64).
func (b *Bitmap) MarshalJSON() ([]byte, error) {
	raw := make([]byte, 8*len(b.words))
	for i, w := range b.words {
		for j := 0; j < 8; j++ {
			raw[8*i+j] = byte(w >> (8 * j))
		}
	}
	return json.Marshal(bitmapJSON{N: b.n, Bits: base64.StdEncoding.EncodeToString(raw)})
}

// UnmarshalJSON decodes MarshalJSON's output.
func (b *Bitmap) UnmarshalJSON(p []byte) error {
	var j bitmapJSON
	if err := json.Unmarshal(p, &j); err != nil {
		return err
	}
	raw, err := base64.StdEncoding.DecodeString(j.Bits)
	if err != nil {
		return err
	}
	*b = *NewBitmap(j.N)
	for i := range b.words {
		for k := 0; k < 8 && 8*i+k < len(raw); k++ {
			b.words[i] |= uint64(raw[8*i+k]) << (8 * k)
		}
	}
	return nil
}
