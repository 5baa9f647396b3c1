package iscsi

import (
	"bytes"
	"errors"
	"fmt"
)

// KV is one text key=value pair (RFC 7143 6.1).
type KV struct {
	Key, Value string
}

// Limits from RFC 7143 6.1 and 6.2.
const (
	MaxKeyLen = 63
	// MaxValueLen is generous: only CHAP values and TargetAddress lists get
	// long, and 8 KiB covers a 4 KiB binary challenge in hex.
	MaxValueLen = 8192 + 2
	// MaxTextLen bounds the accumulated text of one negotiation sequence
	// (all PDUs joined by the C bit); a hostile initiator must not make us
	// buffer without limit.
	MaxTextLen = 64 << 10
)

// Special values.
const (
	ValueNotUnderstood = "NotUnderstood"
	ValueIrrelevant    = "Irrelevant"
	ValueReject        = "Reject"
)

var (
	ErrTextSyntax  = errors.New("iscsi: malformed text key=value")
	ErrTextTooLong = errors.New("iscsi: text negotiation data too long")
	ErrKeyRepeated = errors.New("iscsi: key repeated in negotiation")
)

// ParseText splits a text data segment into pairs. Each pair ends with NUL;
// a missing final NUL is tolerated and trailing NUL padding is skipped.
func ParseText(b []byte) ([]KV, error) {
	var out []KV
	for len(b) > 0 {
		if b[0] == 0 { // padding or empty entry
			b = b[1:]
			continue
		}
		end := bytes.IndexByte(b, 0)
		var item []byte
		if end < 0 {
			item, b = b, nil
		} else {
			item, b = b[:end], b[end+1:]
		}
		eq := bytes.IndexByte(item, '=')
		if eq <= 0 {
			return nil, fmt.Errorf("%w: %q", ErrTextSyntax, truncateForLog(item))
		}
		k, v := item[:eq], item[eq+1:]
		if len(k) > MaxKeyLen {
			return nil, fmt.Errorf("%w: key of %d bytes", ErrTextSyntax, len(k))
		}
		if len(v) > MaxValueLen {
			return nil, fmt.Errorf("%w: value of %q has %d bytes", ErrTextSyntax, k, len(v))
		}
		for _, c := range k {
			if !keyChar(c) {
				return nil, fmt.Errorf("%w: bad character in key %q", ErrTextSyntax, truncateForLog(k))
			}
		}
		out = append(out, KV{string(k), string(v)})
	}
	return out, nil
}

// keyChar reports whether c may appear in a key name: RFC 7143 6.1 allows
// letters, digits, '.', '-', '+', '@', '_'.
func keyChar(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
		c == '.' || c == '-' || c == '+' || c == '@' || c == '_'
}

func truncateForLog(b []byte) []byte {
	if len(b) > 64 {
		return b[:64]
	}
	return b
}

// AppendText encodes pairs as key=value\0 ...
func AppendText(dst []byte, kvs []KV) []byte {
	for _, kv := range kvs {
		dst = append(dst, kv.Key...)
		dst = append(dst, '=')
		dst = append(dst, kv.Value...)
		dst = append(dst, 0)
	}
	return dst
}

// TextBuffer joins the data segments of a text or login request sequence
// split with the C bit, bounding the total size.
type TextBuffer struct {
	buf []byte
}

// Add appends one PDU's data. It returns ErrTextTooLong past MaxTextLen.
func (t *TextBuffer) Add(p []byte) error {
	if len(t.buf)+len(p) > MaxTextLen {
		return ErrTextTooLong
	}
	t.buf = append(t.buf, p...)
	return nil
}

// Take returns the joined data and resets the buffer.
func (t *TextBuffer) Take() []byte {
	b := t.buf
	t.buf = nil
	return b
}

// Len is the number of buffered bytes.
func (t *TextBuffer) Len() int { return len(t.buf) }

// Chunk splits data into pieces of at most max bytes for responses that
// need the C bit.
func Chunk(data []byte, max int) [][]byte {
	if max <= 0 {
		max = 8192
	}
	var out [][]byte
	for len(data) > max {
		out = append(out, data[:max])
		data = data[max:]
	}
	return append(out, data)
}
