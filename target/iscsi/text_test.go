package iscsi

import (
	"errors"
	"reflect"
	"testing"
)

func TestParseText(t *testing.T) {
	kvs, err := ParseText([]byte("InitiatorName=iqn.2000-01.x:y\x00MaxBurstLength=4096\x00Empty=\x00\x00\x00"))
	if err != nil {
		t.Fatal(err)
	}
	want := []KV{{"InitiatorName", "iqn.2000-01.x:y"}, {"MaxBurstLength", "4096"}, {"Empty", ""}}
	if !reflect.DeepEqual(kvs, want) {
		t.Fatalf("got %v", kvs)
	}
	if got, _ := ParseText(AppendText(nil, want)); !reflect.DeepEqual(got, want) {
		t.Fatalf("round trip: %v", got)
	}
	for _, bad := range []string{"novalue\x00", "=x\x00", "a b=c\x00"} {
		if _, err := ParseText([]byte(bad)); !errors.Is(err, ErrTextSyntax) {
			t.Errorf("%q: err %v", bad, err)
		}
	}
}

func TestTextBufferBound(t *testing.T) {
	var tb TextBuffer
	if err := tb.Add(make([]byte, MaxTextLen)); err != nil {
		t.Fatal(err)
	}
	if err := tb.Add([]byte{1}); !errors.Is(err, ErrTextTooLong) {
		t.Fatalf("got %v", err)
	}
}

func TestChunk(t *testing.T) {
	c := Chunk(make([]byte, 10), 4)
	if len(c) != 3 || len(c[2]) != 2 {
		t.Fatalf("chunks %v", c)
	}
}
