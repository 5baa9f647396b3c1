package iscsi

import (
	"reflect"
	"testing"
)

func TestCmdWindowInOrder(t *testing.T) {
	w := NewCmdWindow[int](10, 4)
	if w.ExpCmdSN() != 10 || w.MaxCmdSN() != 13 {
		t.Fatalf("window %d..%d", w.ExpCmdSN(), w.MaxCmdSN())
	}
	ready, ok := w.Submit(10, 10)
	if !ok || !reflect.DeepEqual(ready, []int{10}) || w.ExpCmdSN() != 11 {
		t.Fatalf("submit 10: %v %v", ready, ok)
	}
	// Early arrivals wait for the gap.
	if ready, ok := w.Submit(12, 12); !ok || ready != nil {
		t.Fatalf("submit 12: %v %v", ready, ok)
	}
	if ready, ok := w.Submit(12, 99); ok || ready != nil {
		t.Fatal("duplicate queued CmdSN accepted")
	}
	if ready, _ := w.Submit(11, 11); !reflect.DeepEqual(ready, []int{11, 12}) || w.ExpCmdSN() != 13 {
		t.Fatalf("gap fill: %v exp %d", ready, w.ExpCmdSN())
	}
}

func TestCmdWindowOutside(t *testing.T) {
	w := NewCmdWindow[int](100, 2)
	for _, sn := range []uint32{99, 102, 0, 1 << 31} {
		if _, ok := w.Submit(sn, 0); ok {
			t.Errorf("CmdSN %d outside [100,101] accepted", sn)
		}
	}
	w.Submit(100, 0)
	w.Submit(101, 0)
	if _, ok := w.Submit(102, 0); ok {
		t.Fatal("full window accepted a command")
	}
	w.Complete()
	if _, ok := w.Submit(102, 0); !ok {
		t.Fatal("slot not reopened by Complete")
	}
}

func TestCmdWindowWraps(t *testing.T) {
	w := NewCmdWindow[int](0xfffffffe, 8)
	for sn := uint32(0xfffffffe); sn != 3; sn++ {
		if r, ok := w.Submit(sn, 0); !ok || len(r) != 1 {
			t.Fatalf("CmdSN %#x rejected across wrap", sn)
		}
	}
	if !SNLess(0xffffffff, 1) || SNLess(1, 0xffffffff) {
		t.Fatal("serial arithmetic wrong")
	}
}
