package replication

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"reflect"
	"testing"
)

// FuzzDecodeMessage feeds arbitrary bytes to the wire decoder a replica
// server runs on every connection (invariant 8: bad input never crashes a
// node). Whatever decodes must re-encode to the same bytes and decode to
// the same message; anything else must be a clean error.
func FuzzDecodeMessage(f *testing.F) {
	for _, m := range []Message{
		{Type: MsgHello, Epoch: 3, Gen: 0x1234, Len: 8 << 20, Volume: "vol1", From: "n1"},
		{Type: MsgHelloAck, Epoch: 3, Gen: 0x1234, Len: 8 << 20, Regions: []uint64{1, 7, 300}},
		{Type: MsgWrite, Flags: FlagFUA, Epoch: 2, Seq: 9, Off: 4096, Data: []byte("hello world")},
		{Type: MsgWrite, Flags: FlagResync, Epoch: 2, Seq: 10, Off: 1 << 20, Data: make([]byte, 512)},
		{Type: MsgUnmap, Epoch: 2, Seq: 11, Off: 0, Len: 1 << 20},
		{Type: MsgAL, Epoch: 2, Seq: 12, Regions: []uint64{0, 1, 2}},
		{Type: MsgAck, Epoch: 2, Seq: 12, Err: "replication: write failed"},
		{Type: MsgReject, Epoch: 5, Seq: 4, Err: "epoch 4 < 5"},
		{Type: MsgChecksum, Epoch: 1, Seq: 2, Off: 0, Len: 4096},
	} {
		var buf bytes.Buffer
		w := bufio.NewWriter(&buf)
		if err := encodeMessage(w, &m); err != nil {
			f.Fatal(err)
		}
		w.Flush()
		f.Add(buf.Bytes())
	}
	f.Add([]byte("HREP"))
	f.Fuzz(func(t *testing.T, in []byte) {
		m, err := decodeMessage(bufio.NewReader(bytes.NewReader(in)))
		if err != nil {
			if !errors.Is(err, ErrProtocol) && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("unexpected error kind: %v", err)
			}
			return
		}
		var buf bytes.Buffer
		w := bufio.NewWriter(&buf)
		if err := encodeMessage(w, &m); err != nil {
			t.Fatalf("decoded message does not re-encode: %v", err)
		}
		w.Flush()
		if !bytes.Equal(buf.Bytes(), in[:buf.Len()]) {
			t.Fatalf("re-encoding differs:\n in %x\nout %x", in[:min(len(in), buf.Len())], buf.Bytes())
		}
		m2, err := decodeMessage(bufio.NewReader(&buf))
		if err != nil || !reflect.DeepEqual(m, m2) {
			t.Fatalf("round trip: %+v != %+v (%v)", m, m2, err)
		}
	})
}
