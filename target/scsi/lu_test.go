package scsi

import (
	"bytes"
	"context"
	"encoding/binary"
	"testing"

	"github.com/hasan-storage/hasan/target/scsi/scsitest"
)

var _ Backend = (*scsitest.MemBackend)(nil)
var _ MapStatusBackend = (*scsitest.MemBackend)(nil)

const testBlocks = 2048

var testNexus = ITNexus{InitiatorName: "iqn.2026-01.test:init", ISID: [6]byte{0x80, 0, 0, 0, 0, 1},
	TargetName: "iqn.2026-01.test:tgt", TPGT: 1, RelativePortID: 1}

var otherNexus = ITNexus{InitiatorName: "iqn.2026-01.test:other", ISID: [6]byte{0x80, 0, 0, 0, 0, 2},
	TargetName: "iqn.2026-01.test:tgt", TPGT: 1, RelativePortID: 1}

type testLU struct {
	t  *testing.T
	lu *LogicalUnit
	be *scsitest.MemBackend
}

func newTestLU(t *testing.T, mod func(*Config)) *testLU {
	t.Helper()
	be := scsitest.NewMemBackend(testBlocks * 512)
	cfg := Config{VolumeID: [16]byte{0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, Backend: be, Thin: true}
	if mod != nil {
		mod(&cfg)
	}
	lu, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	tl := &testLU{t: t, lu: lu, be: be}
	// Consume the power-on unit attention.
	if r := tl.exec(testNexus, []byte{0, 0, 0, 0, 0, 0}, nil); r.Status != StatusCheckCondition {
		t.Fatalf("first TUR: status %#x, want CHECK CONDITION (power on UA)", r.Status)
	}
	return tl
}

func (tl *testLU) exec(n ITNexus, cdb []byte, out []byte) *Response {
	tl.t.Helper()
	cmd := &Command{Nexus: n, CDB: cdb, DataOut: out, ExpectedLen: uint32(len(out))}
	if out != nil {
		cmd.Write = true
	}
	r := tl.lu.Execute(context.Background(), cmd)
	if r == nil {
		tl.t.Fatalf("nil response for %x", cdb)
	}
	return r
}

func (tl *testLU) do(cdb []byte, out []byte) *Response { return tl.exec(testNexus, cdb, out) }

// mustGood runs cdb and fails unless it is GOOD; it returns a copy of the data.
func (tl *testLU) mustGood(cdb []byte, out []byte) []byte {
	tl.t.Helper()
	r := tl.do(cdb, out)
	if r.Status != StatusGood {
		tl.t.Fatalf("cdb %x: status %#x sense %x", cdb, r.Status, r.Sense)
	}
	d := append([]byte(nil), r.Data...)
	if r.Release != nil {
		r.Release()
	}
	return d
}

// senseWant is an expected sense: key/asc/ascq plus optional SKS field pointer.
type senseWant struct {
	key, asc, ascq byte
	field          *FieldPointer
}

func checkSense(t *testing.T, r *Response, w senseWant) {
	t.Helper()
	if r.Status != StatusCheckCondition {
		t.Fatalf("status %#x, want CHECK CONDITION %x/%02x/%02x", r.Status, w.key, w.asc, w.ascq)
	}
	s := r.Sense
	var key, asc, ascq byte
	var sks []byte
	switch s[0] & 0x7F {
	case 0x70:
		key, asc, ascq = s[2]&0x0F, s[12], s[13]
		if s[15]&0x80 != 0 {
			sks = s[15:18]
		}
	case 0x72:
		key, asc, ascq = s[1]&0x0F, s[2], s[3]
		for d := s[8:]; len(d) >= 2; d = d[2+int(d[1]):] {
			if d[0] == 0x02 {
				sks = d[4:7]
			}
		}
	default:
		t.Fatalf("bad sense response code %#x", s[0])
	}
	if key != w.key || asc != w.asc || ascq != w.ascq {
		t.Fatalf("sense %x/%02x/%02x, want %x/%02x/%02x (%x)", key, asc, ascq, w.key, w.asc, w.ascq, s)
	}
	if w.field == nil {
		return
	}
	if sks == nil {
		t.Fatalf("no sense-key specific field pointer in %x", s)
	}
	want := byte(0x80)
	if w.field.InCDB {
		want |= 0x40
	}
	if w.field.Bit >= 0 {
		want |= 0x08 | byte(w.field.Bit)
	}
	if sks[0] != want || binary.BigEndian.Uint16(sks[1:3]) != w.field.Byte {
		t.Fatalf("field pointer %x, want %02x %04x", sks, want, w.field.Byte)
	}
}

func cdbField(b uint16, bit int8) senseWant {
	return senseWant{SenseIllegalRequest, 0x24, 0, &FieldPointer{InCDB: true, Byte: b, Bit: bit}}
}

func paramField(b uint16, bit int8) senseWant {
	return senseWant{SenseIllegalRequest, 0x26, 0, &FieldPointer{Byte: b, Bit: bit}}
}

var (
	senseLBAOOB      = senseWant{SenseIllegalRequest, 0x21, 0, nil}
	senseMiscompare  = senseWant{SenseMiscompare, 0x1D, 0, nil}
	senseBadOpcode   = senseWant{SenseIllegalRequest, 0x20, 0, nil}
	senseParamLenErr = senseWant{SenseIllegalRequest, 0x1A, 0, nil}
)

func read10(lba uint32, n uint16) []byte {
	c := make([]byte, 10)
	c[0] = opRead10
	binary.BigEndian.PutUint32(c[2:], lba)
	binary.BigEndian.PutUint16(c[7:], n)
	return c
}

func write10(lba uint32, n uint16) []byte {
	c := read10(lba, n)
	c[0] = opWrite10
	return c
}

func cdb16(op byte, lba uint64, n uint32) []byte {
	c := make([]byte, 16)
	c[0] = op
	binary.BigEndian.PutUint64(c[2:], lba)
	binary.BigEndian.PutUint32(c[10:], n)
	return c
}

func fill(n int, b byte) []byte { return bytes.Repeat([]byte{b}, n) }

func TestNewValidatesConfig(t *testing.T) {
	be := scsitest.NewMemBackend(4096)
	if _, err := New(Config{}); err == nil {
		t.Fatal("no backend: want error")
	}
	if _, err := New(Config{Backend: be, BlockSize: 1024}); err == nil {
		t.Fatal("block size 1024: want error")
	}
	if _, err := New(Config{Backend: be, PortGroups: []PortGroup{{ID: 1}, {ID: 1}}}); err == nil {
		t.Fatal("duplicate port group: want error")
	}
}

func TestOpTableRejectsDuplicates(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("duplicate opcode did not panic")
		}
	}()
	d := &opDesc{op: 0x00, cdbLen: 6, usage: []byte{0, 0, 0, 0, 0, 0}, handler: (*LogicalUnit).testUnitReady}
	mustBuildOpTable([]*opDesc{d, d})
}

func TestUnitAttentions(t *testing.T) {
	tl := newTestLU(t, nil)
	tur := []byte{0, 0, 0, 0, 0, 0}
	tl.mustGood(tur, nil)

	// A new nexus: INQUIRY and REPORT LUNS pass without clearing the UA.
	tl.mustGoodOn(otherNexus, []byte{opInquiry, 0, 0, 0, 36, 0})
	checkSense(t, tl.exec(otherNexus, tur, nil), senseWant{SenseUnitAttention, 0x29, 0x00, nil})
	if r := tl.exec(otherNexus, tur, nil); r.Status != StatusGood {
		t.Fatalf("UA not cleared: %x", r.Sense)
	}

	// REQUEST SENSE returns and clears a pending UA.
	tl.lu.LUNsChanged()
	r := tl.do([]byte{opRequestSense, 0, 0, 0, 252, 0}, nil)
	if r.Status != StatusGood || r.Data[2]&0x0F != SenseUnitAttention || r.Data[12] != 0x3F || r.Data[13] != 0x0E {
		t.Fatalf("REQUEST SENSE: status %#x data %x", r.Status, r.Data)
	}
	tl.mustGood(tur, nil)
	d := tl.mustGood([]byte{opRequestSense, 1, 0, 0, 252, 0}, nil)
	if d[0] != 0x72 || d[1] != SenseNoSense {
		t.Fatalf("REQUEST SENSE desc with nothing pending: %x", d)
	}

	// Resets and capacity changes reach every nexus.
	tl.lu.Reset(ResetLUN, testNexus)
	checkSense(t, tl.do(tur, nil), senseWant{SenseUnitAttention, 0x29, 0x03, nil})
	if err := tl.lu.Resize(context.Background(), 4096*512); err != nil {
		t.Fatal(err)
	}
	checkSense(t, tl.do(tur, nil), senseWant{SenseUnitAttention, 0x2A, 0x09, nil})
	// The reset outranks the older REPORTED LUNS DATA HAS CHANGED; the rest
	// come in the order they were established.
	checkSense(t, tl.exec(otherNexus, tur, nil), senseWant{SenseUnitAttention, 0x29, 0x03, nil})
	checkSense(t, tl.exec(otherNexus, tur, nil), senseWant{SenseUnitAttention, 0x3F, 0x0E, nil})
	checkSense(t, tl.exec(otherNexus, tur, nil), senseWant{SenseUnitAttention, 0x2A, 0x09, nil})
	rc := []byte{opServiceActionIn16, saReadCapacity16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0}
	d = tl.mustGood(rc, nil)
	if got := binary.BigEndian.Uint64(d); got != 4095 {
		t.Fatalf("last LBA after resize %d, want 4095", got)
	}

	// Nexus loss: the nexus comes back to I_T NEXUS LOSS OCCURRED.
	tl.lu.NexusLost(testNexus)
	checkSense(t, tl.do(tur, nil), senseWant{SenseUnitAttention, 0x29, 0x07, nil})

	// The reservation code's UAs arrive through establishUA.
	tl.lu.establishUA(testNexus.Key(), ReasonUARegistrationsPreempted)
	checkSense(t, tl.do(tur, nil), senseWant{SenseUnitAttention, 0x2A, 0x05, nil})
}

func (tl *testLU) mustGoodOn(n ITNexus, cdb []byte) []byte {
	tl.t.Helper()
	r := tl.exec(n, cdb, nil)
	if r.Status != StatusGood {
		tl.t.Fatalf("cdb %x: status %#x sense %x", cdb, r.Status, r.Sense)
	}
	return r.Data
}

func TestCommonChecks(t *testing.T) {
	tl := newTestLU(t, nil)
	checkSense(t, tl.do([]byte{0xC0, 0, 0, 0, 0, 0}, nil), senseBadOpcode)
	checkSense(t, tl.do([]byte{0, 0, 0, 0, 0, 0x04}, nil), cdbField(5, 2)) // NACA
	checkSense(t, tl.do([]byte{0, 0, 0, 0, 0, 0x01}, nil), cdbField(5, 0)) // LINK
	checkSense(t, tl.do([]byte{opRead10, 0, 0}, nil), cdbField(3, -1))     // short CDB
	// Unknown service action points at the service action field.
	checkSense(t, tl.do([]byte{opMaintenanceIn, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, nil), cdbField(1, 4))
	// A thick LU does not have UNMAP.
	thick := newTestLU(t, func(c *Config) { c.Thin = false })
	checkSense(t, thick.do([]byte{opUnmap, 0, 0, 0, 0, 0, 0, 0, 0, 0}, nil), senseBadOpcode)
}

func TestReadWrite(t *testing.T) {
	tl := newTestLU(t, nil)
	data := make([]byte, 4*512)
	for i := range data {
		data[i] = byte(i * 7)
	}
	tl.mustGood(write10(10, 4), data)
	if got := tl.mustGood(read10(10, 4), nil); !bytes.Equal(got, data) {
		t.Fatal("READ(10) does not return what WRITE(10) stored")
	}
	r16 := cdb16(opRead16, 10, 4)
	if got := tl.mustGood(r16, nil); !bytes.Equal(got, data) {
		t.Fatal("READ(16) mismatch")
	}
	r12 := []byte{opRead12, 0, 0, 0, 0, 10, 0, 0, 0, 4, 0, 0}
	if got := tl.mustGood(r12, nil); !bytes.Equal(got, data) {
		t.Fatal("READ(12) mismatch")
	}
	// READ(6) transfer length 0 means 256 blocks.
	if got := tl.mustGood([]byte{opRead6, 0, 0, 0, 0, 0}, nil); len(got) != 256*512 {
		t.Fatalf("READ(6) length 0 returned %d bytes, want %d", len(got), 256*512)
	}
	// Transfer length 0 is not an error.
	if got := tl.mustGood(read10(0, 0), nil); len(got) != 0 {
		t.Fatal("zero-length read returned data")
	}
	tl.mustGood(write10(0, 0), nil)

	// FUA reaches the backend; with WCE=0 every write is FUA.
	before := tl.be.FUAWrites.Load()
	w := write10(0, 1)
	w[1] = 0x08
	tl.mustGood(w, fill(512, 1))
	if tl.be.FUAWrites.Load() != before+1 {
		t.Fatal("FUA write not forwarded as fua")
	}

	tests := []struct {
		name string
		cdb  []byte
		out  []byte
		want senseWant
	}{
		{"read past end", read10(testBlocks-1, 2), nil, senseLBAOOB},
		{"read LBA beyond", read10(testBlocks+1, 0), nil, senseLBAOOB},
		{"read16 huge LBA", cdb16(opRead16, 1<<63, 1), nil, senseLBAOOB},
		{"read16 wrapping length", cdb16(opRead16, 1, 0xFFFFFFFF), nil, senseLBAOOB},
		{"write past end", write10(testBlocks, 1), fill(512, 0), senseLBAOOB},
		{"read6 past end", []byte{opRead6, 0, 0x07, 0xFF, 2, 0}, nil, senseLBAOOB},
		{"rdprotect", []byte{opRead10, 0x20, 0, 0, 0, 0, 0, 0, 1, 0}, nil, cdbField(1, 7)},
		{"wrprotect", []byte{opWrite10, 0xE0, 0, 0, 0, 0, 0, 0, 1, 0}, fill(512, 0), cdbField(1, 7)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { checkSense(t, tl.do(tc.cdb, tc.out), tc.want) })
	}
}

func TestShortDataOutWritesWholeBlocksOnly(t *testing.T) {
	tl := newTestLU(t, nil)
	tl.mustGood(write10(0, 2), fill(1024, 'a'))
	r := tl.do(write10(0, 2), fill(512, 'b'))
	if r.Status != StatusGood || r.Transferred != 1024 {
		t.Fatalf("short write: status %#x transferred %d", r.Status, r.Transferred)
	}
	got := tl.be.Bytes(0, 1024)
	if !bytes.Equal(got[:512], fill(512, 'b')) || !bytes.Equal(got[512:], fill(512, 'a')) {
		t.Fatal("short Data-Out: wrong blocks written")
	}
}

func TestBackendErrorsAreMediumErrors(t *testing.T) {
	tl := newTestLU(t, nil)
	tl.be.FailReads.Store(true)
	checkSense(t, tl.do(read10(0, 1), nil), senseWant{SenseMediumError, 0x11, 0, nil})
	tl.be.FailWrites.Store(true)
	checkSense(t, tl.do(write10(0, 1), fill(512, 0)), senseWant{SenseMediumError, 0x0C, 0, nil})
	tl.be.FailFlush.Store(true)
	checkSense(t, tl.do([]byte{opSyncCache10, 0, 0, 0, 0, 0, 0, 0, 0, 0}, nil), senseWant{SenseMediumError, 0x0C, 0, nil})
}

func TestReadOnly(t *testing.T) {
	tl := newTestLU(t, func(c *Config) { c.ReadOnly = true })
	checkSense(t, tl.do(write10(0, 1), fill(512, 0)), senseWant{SenseDataProtect, 0x27, 0, nil})
	tl.mustGood(read10(0, 1), nil)
	ms := tl.mustGood([]byte{opModeSense6, 0, 0x3F, 0, 255, 0}, nil)
	if ms[2]&0x80 == 0 {
		t.Fatal("MODE SENSE: WP not set on a read-only LU")
	}
}

func TestVerify(t *testing.T) {
	tl := newTestLU(t, nil)
	data := fill(2*512, 'v')
	tl.mustGood(write10(5, 2), data)
	v := []byte{opVerify10, 0x02, 0, 0, 0, 5, 0, 0, 2, 0}
	tl.mustGood(v, data)
	bad := append([]byte(nil), data...)
	bad[700] = 'x'
	r := tl.do(v, bad)
	checkSense(t, r, senseMiscompare)
	if r.Sense[0]&0x80 == 0 || binary.BigEndian.Uint32(r.Sense[3:7]) != 700 {
		t.Fatalf("miscompare INFORMATION: %x", r.Sense)
	}
	// BYTCHK=0: medium verification only, no data compared.
	tl.mustGood([]byte{opVerify10, 0, 0, 0, 0, 5, 0, 0, 2, 0}, nil)
	// BYTCHK=3: one block against every block.
	tl.mustGood([]byte{opVerify10, 0x06, 0, 0, 0, 5, 0, 0, 2, 0}, fill(512, 'v'))
	checkSense(t, tl.do([]byte{opVerify10, 0x04, 0, 0, 0, 5, 0, 0, 2, 0}, nil), cdbField(1, 2))
	checkSense(t, tl.do([]byte{opVerify10, 0x22, 0, 0, 0, 5, 0, 0, 2, 0}, data), cdbField(1, 7))
}

func TestWriteVerifyAndOrWrite(t *testing.T) {
	tl := newTestLU(t, nil)
	wv := []byte{opWriteVerify10, 0x02, 0, 0, 0, 3, 0, 0, 1, 0}
	tl.mustGood(wv, fill(512, 0x0F))
	tl.mustGood(cdb16(opOrWrite, 3, 1), fill(512, 0xF0))
	if got := tl.be.Bytes(3*512, 512); !bytes.Equal(got, fill(512, 0xFF)) {
		t.Fatalf("ORWRITE result %x...", got[:4])
	}
}

func cawCDB(lba uint64, n byte) []byte {
	c := make([]byte, 16)
	c[0] = opCompareAndWrite
	binary.BigEndian.PutUint64(c[2:], lba)
	c[13] = n
	return c
}

func TestCompareAndWrite(t *testing.T) {
	tl := newTestLU(t, nil)
	tl.mustGood(write10(7, 2), fill(1024, 'A'))
	tl.mustGood(cawCDB(7, 2), append(fill(1024, 'A'), fill(1024, 'B')...))
	if got := tl.be.Bytes(7*512, 1024); !bytes.Equal(got, fill(1024, 'B')) {
		t.Fatal("COMPARE AND WRITE did not write")
	}
	verify := fill(1024, 'B')
	verify[1000] = 'C'
	r := tl.do(cawCDB(7, 2), append(verify, fill(1024, 'D')...))
	checkSense(t, r, senseMiscompare)
	if binary.BigEndian.Uint32(r.Sense[3:7]) != 1000 || r.Sense[0]&0x80 == 0 {
		t.Fatalf("miscompare offset: %x", r.Sense)
	}
	if got := tl.be.Bytes(7*512, 1024); !bytes.Equal(got, fill(1024, 'B')) {
		t.Fatal("COMPARE AND WRITE wrote after a miscompare")
	}
	checkSense(t, tl.do(cawCDB(7, 2), fill(1024, 'B')), cdbField(13, -1)) // wrong Data-Out size
	checkSense(t, tl.do(cawCDB(testBlocks-1, 2), fill(2048, 0)), senseLBAOOB)
}

func TestWriteSame(t *testing.T) {
	tl := newTestLU(t, nil)
	ws10 := func(flags byte, lba uint32, n uint16) []byte {
		c := write10(lba, n)
		c[0], c[1] = opWriteSame10, flags
		return c
	}
	tl.mustGood(ws10(0, 100, 20), fill(512, 'w'))
	if got := tl.be.Bytes(100*512, 20*512); !bytes.Equal(got, fill(20*512, 'w')) {
		t.Fatal("WRITE SAME did not write every block")
	}
	// UNMAP with a zero block deallocates (thin, LBPRZ=1).
	tl.mustGood(ws10(0x08, 100, 16), fill(512, 0))
	if tl.be.Mapped(100*512) || !bytes.Equal(tl.be.Bytes(100*512, 16*512), make([]byte, 16*512)) {
		t.Fatal("WRITE SAME UNMAP did not deallocate")
	}
	// NDOB writes zeros without Data-Out.
	tl.mustGood(write10(200, 1), fill(512, 1))
	ws16 := cdb16(opWriteSame16, 200, 1)
	ws16[1] = 0x01
	tl.mustGood(ws16, nil)
	if !bytes.Equal(tl.be.Bytes(200*512, 512), make([]byte, 512)) {
		t.Fatal("NDOB did not zero")
	}
	// Zero blocks means "to the end", bounded by MAXIMUM WRITE SAME LENGTH.
	tl.mustGood(ws10(0, testBlocks-5, 0), fill(512, 'e'))
	if !bytes.Equal(tl.be.Bytes((testBlocks-5)*512, 5*512), fill(5*512, 'e')) {
		t.Fatal("WRITE SAME length 0 did not run to the end")
	}
	checkSense(t, tl.do(ws10(0x10, 0, 1), fill(512, 0)), cdbField(1, 4)) // ANCHOR without UNMAP
	checkSense(t, tl.do(ws10(0x18, 0, 1), fill(512, 0)), cdbField(1, 4)) // ANCHOR: no ANC_SUP
	checkSense(t, tl.do(ws10(0, 0, 1), fill(256, 0)), cdbField(7, -1))   // Data-Out not one block
	checkSense(t, tl.do(ws10(0, testBlocks+1, 0), fill(512, 0)), senseLBAOOB)
	checkSense(t, tl.do(ws10(0, testBlocks-1, 2), fill(512, 0)), senseLBAOOB)
	thick := newTestLU(t, func(c *Config) { c.Thin = false })
	checkSense(t, thick.do(ws10(0x08, 0, 1), fill(512, 0)), cdbField(1, 3))
}

func TestWriteSameMaxLength(t *testing.T) {
	be := scsitest.NewMemBackend((maxWriteSameBlocks + 16) * 512)
	lu, err := New(Config{Backend: be, Thin: true})
	if err != nil {
		t.Fatal(err)
	}
	tl := &testLU{t: t, lu: lu, be: be}
	tl.do([]byte{0, 0, 0, 0, 0, 0}, nil)
	ws := cdb16(opWriteSame16, 0, 0)
	checkSense(t, tl.do(ws, fill(512, 0)), cdbField(10, -1))
	ws = cdb16(opWriteSame16, 16, 0)
	tl.mustGood(ws, fill(512, 0))
}

func unmapParams(descs ...[2]uint64) []byte {
	p := make([]byte, 8+16*len(descs))
	binary.BigEndian.PutUint16(p[0:], uint16(len(p)-2))
	binary.BigEndian.PutUint16(p[2:], uint16(16*len(descs)))
	for i, d := range descs {
		binary.BigEndian.PutUint64(p[8+16*i:], d[0])
		binary.BigEndian.PutUint32(p[16+16*i:], uint32(d[1]))
	}
	return p
}

func unmapCDB(plen int) []byte {
	return []byte{opUnmap, 0, 0, 0, 0, 0, 0, byte(plen >> 8), byte(plen), 0}
}

func TestUnmap(t *testing.T) {
	tl := newTestLU(t, nil)
	tl.mustGood(write10(0, 8), fill(8*512, 'u'))
	p := unmapParams([2]uint64{2, 3}, [2]uint64{testBlocks, 0})
	tl.mustGood(unmapCDB(len(p)), p)
	if tl.be.Mapped(2*512) || !tl.be.Mapped(5*512) || !bytes.Equal(tl.be.Bytes(2*512, 3*512), make([]byte, 3*512)) {
		t.Fatal("UNMAP did not deallocate exactly the extent")
	}
	tl.mustGood(unmapCDB(0), nil)
	p = unmapParams([2]uint64{testBlocks - 1, 2})
	checkSense(t, tl.do(unmapCDB(len(p)), p), senseLBAOOB)
	checkSense(t, tl.do(unmapCDB(4), make([]byte, 4)), senseParamLenErr)
	p = unmapParams([2]uint64{0, 1})
	binary.BigEndian.PutUint16(p[2:], 15)
	checkSense(t, tl.do(unmapCDB(len(p)), p), paramField(2, -1))
	p = unmapParams([2]uint64{0, maxUnmapBlocks + 1})
	tl2 := newTestLU(t, func(c *Config) {
		c.Backend = scsitest.NewMemBackend((maxUnmapBlocks + 8) * 512)
	})
	checkSense(t, tl2.do(unmapCDB(len(p)), p), paramField(16, -1))
	checkSense(t, tl.do([]byte{opUnmap, 1, 0, 0, 0, 0, 0, 0, 24, 0}, unmapParams([2]uint64{0, 1})), cdbField(1, 0))
}

func TestGetLBAStatus(t *testing.T) {
	tl := newTestLU(t, nil)
	tl.mustGood(write10(0, 16), fill(16*512, 'g'))
	p := unmapParams([2]uint64{4, 4})
	tl.mustGood(unmapCDB(len(p)), p)
	c := cdb16(opServiceActionIn16, 2, 0)
	c[1] = saGetLBAStatus
	binary.BigEndian.PutUint32(c[10:], 8+16*3)
	d := tl.mustGood(c, nil)
	type ext struct {
		lba    uint64
		n      uint32
		status byte
	}
	var got []ext
	for i := 8; i+16 <= len(d); i += 16 {
		got = append(got, ext{binary.BigEndian.Uint64(d[i:]), binary.BigEndian.Uint32(d[i+8:]), d[i+12]})
	}
	if len(got) < 3 || got[0] != (ext{2, 2, 0}) || got[1] != (ext{4, 4, 1}) || got[2] != (ext{8, 8, 0}) {
		t.Fatalf("GET LBA STATUS extents %+v", got)
	}
	c = cdb16(opServiceActionIn16, testBlocks, 24)
	c[1] = saGetLBAStatus
	checkSense(t, tl.do(c, nil), senseLBAOOB)
}

func TestBuildSense(t *testing.T) {
	e := &CheckError{Reason: ReasonMiscompareDuringVerify, Info: 1000, InfoValid: true}
	fixed := BuildSense(e, false)
	if fixed[0] != 0xF0 || binary.BigEndian.Uint32(fixed[3:7]) != 1000 || fixed[2] != SenseMiscompare || fixed[12] != 0x1D {
		t.Fatalf("fixed %x", fixed)
	}
	desc := BuildSense(e, true)
	if desc[0] != 0x72 || desc[8] != 0 || desc[9] != 0x0A || desc[10] != 0x80 || binary.BigEndian.Uint64(desc[12:20]) != 1000 {
		t.Fatalf("descriptor %x", desc)
	}
	big := BuildSense(&CheckError{Reason: ReasonMiscompareDuringVerify, Info: 1 << 40, InfoValid: true}, false)
	if big[0]&0x80 != 0 {
		t.Fatal("fixed sense claims a VALID INFORMATION field that does not fit")
	}
	f := BuildSense(InvalidParamField(300, 3), true)
	if f[7] != 8 || f[8] != 0x02 || f[12] != 0x8B || binary.BigEndian.Uint16(f[13:15]) != 300 {
		t.Fatalf("descriptor field pointer %x", f)
	}
}
