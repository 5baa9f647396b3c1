package scsi

import (
	"context"
	"encoding/binary"
	"errors"
	"log/slog"
	"testing"
)

// FuzzPROut feeds arbitrary CDB bytes and parameter data to PERSISTENT
// RESERVE OUT on a handler that already has registrations and a reservation,
// then checks that the state is still one a valid PROUT sequence could reach.
func FuzzPROut(f *testing.F) {
	basic := func(sa, typ uint8, key, sark uint64, flags byte) []byte {
		b := make([]byte, 10+24)
		b[0], b[1], b[2] = prOpPROut, sa, typ
		binary.BigEndian.PutUint32(b[5:], 24)
		binary.BigEndian.PutUint64(b[10:], key)
		binary.BigEndian.PutUint64(b[18:], sark)
		b[30] = flags
		return b
	}
	f.Add(basic(prOutRegister, 0, 0, 0x99, 0), byte(2))
	f.Add(basic(prOutPreempt, prTypeExclusiveAccess, 0x2, 0x1, 0), byte(1))
	f.Add(basic(prOutRegisterAndMove, 0, 0x1, 0x5, 0), byte(0))
	f.Fuzz(func(t *testing.T, data []byte, who byte) {
		h, err := newPRHandler(context.Background(), nil, &recordingUA{}, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		n1, n2, n3 := prTestNexuses["I1"], prTestNexuses["I2"], prTestNexuses["I3"]
		for i, n := range []ITNexus{n1, n2} {
			cdb, param := buildPROut(t, prOutRegisterIgnore, map[string]string{"sark": string(rune('1' + i))})
			if st, err := h.persistentReserveOut(ctx, n, cdb, param); st != StatusGood || err != nil {
				t.Fatalf("setup register: %v %v", st, err)
			}
		}
		cdb, param := buildPROut(t, prOutReserve, map[string]string{"key": "1", "type": "we-ro"})
		if st, err := h.persistentReserveOut(ctx, n1, cdb, param); st != StatusGood || err != nil {
			t.Fatalf("setup reserve: %v %v", st, err)
		}

		n := []ITNexus{n1, n2, n3}[int(who)%3]
		cdb = make([]byte, 10)
		copy(cdb, data)
		cdb[0] = prOpPROut
		if len(data) > 10 {
			param = data[10:]
		} else {
			param = nil
		}
		h.conflicts(n, cdb)
		st, err := h.persistentReserveOut(ctx, n, cdb, param)
		switch st {
		case StatusGood, StatusReservationConflict:
			if err != nil {
				t.Fatalf("status %#x with error %v", st, err)
			}
		case StatusCheckCondition:
			var ce *CheckError
			if !errors.As(err, &ce) {
				t.Fatalf("CHECK CONDITION without CheckError: %v", err)
			}
		default:
			t.Fatalf("unexpected status %#x", st)
		}
		if err := validatePRState(&h.st); err != nil {
			t.Fatalf("invalid state after PROUT: %v", err)
		}
		for sa := uint8(0); sa < 4; sa++ {
			if _, err := h.persistentReserveIn(ctx, n, []byte{prOpPRIn, sa, 0, 0, 0, 0, 0, 0xff, 0xff, 0}); err != nil {
				t.Fatalf("PRIN %d: %v", sa, err)
			}
		}
		for _, c := range prTestCDBs {
			h.conflicts(n, c)
		}
	})
}
