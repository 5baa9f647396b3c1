package scsi

import (
	"context"
	"testing"

	"github.com/hasan-storage/hasan/target/scsi/scsitest"
)

// FuzzExecuteCDB feeds random CDBs and Data-Out to a small LU: it must never
// panic, and every answer must be GOOD or CHECK CONDITION with sense data
// (RESERVATION CONFLICT only for the reservation commands themselves).
func FuzzExecuteCDB(f *testing.F) {
	seeds := [][]byte{
		{opTestUnitReady, 0, 0, 0, 0, 0},
		inq(true, 0x83, 255),
		read10(0, 1),
		write10(60, 4),
		cdb16(opRead16, 63, 1),
		cdb16(opWriteSame16, 0, 0),
		cawCDB(0, 1),
		unmapCDB(24),
		modeSense6(0, 0x3F, 255),
		{opModeSelect10, 0x10, 0, 0, 0, 0, 0, 0, 28, 0},
		rsoc(true, 0, 0, 0),
		{opMaintenanceIn, saReportTPGs, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0},
		{opPRIn, 0, 0, 0, 0, 0, 0, 0x10, 0, 0},
		{opPROut, 0, 0, 0, 0, 0, 0, 0, 24, 0},
		{opVerify16, 0x06, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0},
	}
	for _, s := range seeds {
		f.Add(s, make([]byte, 1024))
	}
	f.Fuzz(func(t *testing.T, cdb, data []byte) {
		be := scsitest.NewMemBackend(64 * 512)
		lu, err := New(Config{Backend: be, Thin: len(cdb) > 0 && cdb[len(cdb)-1]&0x80 == 0})
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		for i := 0; i < 2; i++ { // the first pass meets the power-on UA
			r := lu.Execute(ctx, &Command{Nexus: testNexus, CDB: cdb, DataOut: data, ExpectedLen: uint32(len(data))})
			switch r.Status {
			case StatusGood:
				if len(r.Data) > 8<<20 {
					t.Fatalf("cdb %x: %d bytes of data", cdb, len(r.Data))
				}
			case StatusCheckCondition:
				if len(r.Sense) < 8 {
					t.Fatalf("cdb %x: short sense %x", cdb, r.Sense)
				}
			case StatusReservationConflict:
				if op := cdb[0]; op != opPROut && op != opReserve6 && op != opReserve10 && op != opRelease6 && op != opRelease10 {
					t.Fatalf("cdb %x: reservation conflict on a fresh LU", cdb)
				}
			default:
				t.Fatalf("cdb %x: status %#x", cdb, r.Status)
			}
			if r.Release != nil {
				r.Release()
			}
		}
	})
}
