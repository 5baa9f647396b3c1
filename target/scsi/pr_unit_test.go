package scsi

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

func newTestPRHandler(t testing.TB, store PRStore) *prHandler {
	t.Helper()
	h, err := newPRHandler(context.Background(), store, &recordingUA{}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func mustPROut(t testing.TB, h *prHandler, n ITNexus, sa uint8, args map[string]string) {
	t.Helper()
	cdb, param := buildPROut(t, sa, args)
	if st, err := h.persistentReserveOut(context.Background(), n, cdb, param); st != StatusGood || err != nil {
		t.Fatalf("PROUT sa %d %v: %v %v", sa, args, st, err)
	}
}

// conflicts() runs on every command; it must not allocate, reserved or not.
func TestPRConflictsDoesNotAllocate(t *testing.T) {
	h := newTestPRHandler(t, nil)
	n1, n2 := prTestNexuses["I1"], prTestNexuses["I2"]
	read := prTestCDBs["read10"]
	if a := testing.AllocsPerRun(100, func() { h.conflicts(n2, read) }); a != 0 {
		t.Fatalf("idle path allocates %v times", a)
	}
	mustPROut(t, h, n1, prOutRegisterIgnore, map[string]string{"sark": "1"})
	mustPROut(t, h, n1, prOutReserve, map[string]string{"key": "1", "type": "ea"})
	if !h.conflicts(n2, read) {
		t.Fatal("EA reservation does not stop another nexus reading")
	}
	if a := testing.AllocsPerRun(100, func() { h.conflicts(n2, read) }); a != 0 {
		t.Fatalf("reserved path allocates %v times", a)
	}
}

// Commands keep flowing through conflicts() while PROUT changes the state.
func TestPRConcurrentConflicts(t *testing.T) {
	h := newTestPRHandler(t, nil)
	n1, n2 := prTestNexuses["I1"], prTestNexuses["I2"]
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
					h.conflicts(n2, prTestCDBs["write10"])
					h.conflicts(n1, prTestCDBs["read10"])
				}
			}
		}()
	}
	for range 200 {
		mustPROut(t, h, n1, prOutRegisterIgnore, map[string]string{"sark": "1"})
		mustPROut(t, h, n1, prOutReserve, map[string]string{"key": "1", "type": "we"})
		if !h.conflicts(n2, prTestCDBs["write10"]) {
			t.Fatal("write from non-holder allowed under WE")
		}
		mustPROut(t, h, n1, prOutRegister, map[string]string{"key": "1", "sark": "0"})
		if h.conflicts(n2, prTestCDBs["write10"]) {
			t.Fatal("write conflicts after the holder unregistered")
		}
	}
	close(stop)
	wg.Wait()
}

func TestFilePRStore(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	path := filepath.Join(dir, "lu0.pr.json")
	s := NewFilePRStore(path)
	st, err := s.LoadPR(ctx)
	if err != nil || st.Holder != -1 || len(st.Registrations) != 0 {
		t.Fatalf("missing file: %+v %v", st, err)
	}
	want := PRState{Generation: 7, APTPL: true, Holder: 1, Type: prTypeExclusiveAccess, Registrations: []PRRegistration{
		nexusRegistration(prTestNexuses["I1"], 0x11, false),
		nexusRegistration(prTestNexuses["I2"], 0x22, true),
	}}
	if err := s.SavePR(ctx, want); err != nil {
		t.Fatal(err)
	}
	got, err := NewFilePRStore(path).LoadPR(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got.Generation != 7 || got.Holder != 1 || got.Type != want.Type || len(got.Registrations) != 2 ||
		got.Registrations[1] != want.Registrations[1] {
		t.Fatalf("round trip: got %+v want %+v", got, want)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Fatalf("temporary files left behind: %v", ents)
	}

	// Without APTPL a reload (a power cycle) starts empty.
	want.APTPL = false
	if err := s.SavePR(ctx, want); err != nil {
		t.Fatal(err)
	}
	if got, err := s.LoadPR(ctx); err != nil || len(got.Registrations) != 0 || got.Holder != -1 {
		t.Fatalf("non-APTPL state restored: %+v %v", got, err)
	}

	// Damage is reported, not papered over.
	if err := os.WriteFile(path, []byte(`{"aptpl":true,"holder":5,"registrations":[]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := newPRHandler(ctx, s, nil, nil); err == nil {
		t.Fatal("holder out of range accepted")
	}
	if err := os.WriteFile(path, []byte(`{"aptpl":tr`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := s.LoadPR(ctx); err == nil {
		t.Fatal("truncated file accepted")
	}
	if err := NewFilePRStore(filepath.Join(dir, "missing", "x.json")).SavePR(ctx, want); err == nil {
		t.Fatal("save into a missing directory succeeded")
	}
}

// The REPORT CAPABILITIES bits libiscsi checks.
func TestPRReportCapabilities(t *testing.T) {
	h := newTestPRHandler(t, nil)
	b, err := h.persistentReserveIn(context.Background(), prTestNexuses["I1"], []byte{prOpPRIn, prInReportCapabilities, 0, 0, 0, 0, 0, 0, 8, 0})
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != 8 || b[1] != 8 {
		t.Fatalf("length: % x", b)
	}
	if b[2] != 0x1d || b[3]&0x80 == 0 || (b[3]>>4)&7 > 5 || b[3]&1 != 0 {
		t.Fatalf("flags: % x", b)
	}
	if b[4] != 0xea || b[5] != 0x01 {
		t.Fatalf("type mask: % x", b)
	}
	mustPROut(t, h, prTestNexuses["I1"], prOutRegisterIgnore, map[string]string{"sark": "1", "aptpl": ""})
	b, _ = h.persistentReserveIn(context.Background(), prTestNexuses["I1"], []byte{prOpPRIn, prInReportCapabilities, 0, 0, 0, 0, 0, 0, 8, 0})
	if b[3]&1 != 1 {
		t.Fatalf("PTPL_A not set after APTPL registration: % x", b)
	}
}

func BenchmarkPRConflicts(b *testing.B) {
	h := newTestPRHandler(b, nil)
	n1, n2 := prTestNexuses["I1"], prTestNexuses["I2"]
	b.Run("idle", func(b *testing.B) {
		for b.Loop() {
			h.conflicts(n2, prTestCDBs["write10"])
		}
	})
	mustPROut(b, h, n1, prOutRegisterIgnore, map[string]string{"sark": "1"})
	mustPROut(b, h, n1, prOutReserve, map[string]string{"key": "1", "type": "we-ro"})
	b.Run("reserved", func(b *testing.B) {
		for b.Loop() {
			h.conflicts(n2, prTestCDBs["write10"])
		}
	})
}
