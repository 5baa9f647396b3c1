package scsi

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"sync"
	"testing"

	"github.com/hasan-storage/hasan/target/scsi/scsitest"
)

func inq(evpd bool, page byte, alloc uint16) []byte {
	c := []byte{opInquiry, 0, page, byte(alloc >> 8), byte(alloc), 0}
	if evpd {
		c[1] = 1
	}
	return c
}

func TestStandardInquiry(t *testing.T) {
	tl := newTestLU(t, nil)
	d := tl.mustGood(inq(false, 0, 255), nil)
	if len(d) != stdInquiryLen || int(d[4]) != len(d)-5 {
		t.Fatalf("length %d additional %d", len(d), d[4])
	}
	if d[0] != 0 || d[2] != 6 || d[3] != 0x12 || d[5]&0x30 != 0x10 || d[7]&0x02 == 0 {
		t.Fatalf("header %x", d[:8])
	}
	if string(d[8:16]) != "HASAN   " || string(d[16:32]) != "hasan volume    " {
		t.Fatalf("vendor/product %q %q", d[8:16], d[16:32])
	}
	found := false
	for i := 58; i < 74; i += 2 {
		found = found || binary.BigEndian.Uint16(d[i:]) == 0x04C0
	}
	if !found {
		t.Fatal("SBC-3 version descriptor missing")
	}
	if got := tl.mustGood(inq(false, 0, 5), nil); len(got) != 5 {
		t.Fatalf("allocation length 5 returned %d bytes", len(got))
	}
	checkSense(t, tl.do(inq(false, 0x83, 255), nil), cdbField(2, -1))
	checkSense(t, tl.do(inq(true, 0x42, 255), nil), cdbField(2, -1))
}

func TestVPDPages(t *testing.T) {
	tl := newTestLU(t, nil)
	sup := tl.mustGood(inq(true, 0, 255), nil)
	pages := sup[4:]
	if !bytes.Equal(pages, []byte{0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2}) {
		t.Fatalf("supported pages %x", pages)
	}
	for _, p := range pages {
		d := tl.mustGood(inq(true, p, 255), nil)
		if d[1] != p || int(binary.BigEndian.Uint16(d[2:4])) != len(d)-4 {
			t.Fatalf("page %#x header %x len %d", p, d[:4], len(d))
		}
	}
	sn := tl.mustGood(inq(true, 0x80, 255), nil)
	if string(sn[4:]) != hex.EncodeToString(tl.lu.cfg.VolumeID[:]) {
		t.Fatalf("serial %q", sn[4:])
	}
	id := tl.mustGood(inq(true, 0x83, 255), nil)
	if id[4] != 0x01 || id[5] != 0x03 || id[7] != 16 || id[8]>>4 != 6 {
		t.Fatalf("first designator is not NAA-6: %x", id[4:24])
	}
	if !bytes.Contains(id, []byte(testNexus.TargetPortName())) {
		t.Fatal("VPD 0x83 lacks the SCSI target port name")
	}
	bl := tl.mustGood(inq(true, 0xB0, 255), nil)
	if len(bl) != 64 || bl[5] == 0 || binary.BigEndian.Uint32(bl[20:24]) == 0 ||
		binary.BigEndian.Uint64(bl[36:44]) != maxWriteSameBlocks {
		t.Fatalf("block limits %x", bl)
	}
	lbp := tl.mustGood(inq(true, 0xB2, 255), nil)
	if lbp[5] != 0xE4 || lbp[6]&0x07 != 2 {
		t.Fatalf("thin provisioning page %x", lbp)
	}
	thick := newTestLU(t, func(c *Config) { c.Thin = false })
	bl = thick.mustGood(inq(true, 0xB0, 255), nil)
	if binary.BigEndian.Uint32(bl[20:24]) != 0 || binary.BigEndian.Uint32(bl[24:28]) != 0 {
		t.Fatal("thick LU advertises UNMAP limits")
	}
	lbp = thick.mustGood(inq(true, 0xB2, 255), nil)
	if lbp[5] != 0 {
		t.Fatalf("thick provisioning page %x", lbp)
	}
	rc := thick.mustGood([]byte{opServiceActionIn16, saReadCapacity16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0}, nil)
	if rc[14]&0xC0 != 0 {
		t.Fatal("thick LU sets LBPME/LBPRZ")
	}
}

// TestIdentityFollowsVolumeID is invariant 6 at the SCSI layer: the same
// volume on two nodes is the same disk, byte for byte.
func TestIdentityFollowsVolumeID(t *testing.T) {
	id := [16]byte{0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0x4d, 0xef, 0x81, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08}
	node := func(vol [16]byte, size int64) *testLU {
		return newTestLU(t, func(c *Config) {
			c.VolumeID = vol
			c.Backend = scsitest.NewMemBackend(size)
		})
	}
	a, b := node(id, 1<<20), node(id, 1<<20)
	other := id
	other[15] ^= 1
	c := node(other, 1<<20)
	for _, cdb := range [][]byte{inq(false, 0, 255), inq(true, 0x80, 255), inq(true, 0x83, 255)} {
		da, db, dc := a.mustGood(cdb, nil), b.mustGood(cdb, nil), c.mustGood(cdb, nil)
		if !bytes.Equal(da, db) {
			t.Fatalf("cdb %x differs between nodes:\n%x\n%x", cdb, da, db)
		}
		if cdb[1] == 1 && bytes.Equal(da, dc) {
			t.Fatalf("cdb %x is the same for different volumes", cdb)
		}
	}
	// The NAA designator changes when any UUID bit in its 100 bits changes.
	first := id
	first[0] ^= 0x80
	if naaDesignator(first) == naaDesignator(id) {
		t.Fatal("NAA ignores the first UUID bit")
	}
}

func modeSense6(pc, page byte, alloc byte) []byte {
	return []byte{opModeSense6, 0, pc<<6 | page, 0, alloc, 0}
}

func TestModeSense(t *testing.T) {
	tl := newTestLU(t, nil)
	all := tl.mustGood(modeSense6(0, 0x3F, 255), nil)
	if int(all[0]) != len(all)-1 || all[3] != 8 || all[2]&0x10 == 0 {
		t.Fatalf("mode sense header %x", all[:4])
	}
	if binary.BigEndian.Uint32(all[4:8]) != testBlocks || binary.BigEndian.Uint32(all[8:12])&0xFFFFFF != 512 {
		t.Fatalf("block descriptor %x", all[4:12])
	}
	pages := all[12:]
	var codes []byte
	for len(pages) >= 2 {
		codes = append(codes, pages[0])
		pages = pages[2+int(pages[1]):]
	}
	if !bytes.Equal(codes, []byte{0x08, 0x0A, 0x1C}) {
		t.Fatalf("pages %x", codes)
	}
	ctl := tl.mustGood(modeSense6(1, 0x0A, 255), nil)
	if ctl[4+8+2] != 0x04 {
		t.Fatalf("changeable control page %x", ctl)
	}
	if got := tl.mustGood(modeSense6(0, 0x3F, 4), nil); len(got) != 4 {
		t.Fatal("allocation length not honoured")
	}
	dbd := tl.mustGood([]byte{opModeSense6, 0x08, 0x08, 0, 255, 0}, nil)
	if dbd[3] != 0 || len(dbd) != 4+20 {
		t.Fatalf("DBD %x", dbd)
	}
	long := tl.mustGood([]byte{opModeSense10, 0x10, 0x08, 0, 0, 0, 0, 0, 255, 0}, nil)
	if long[4]&1 == 0 || binary.BigEndian.Uint16(long[6:8]) != 16 || binary.BigEndian.Uint64(long[8:16]) != testBlocks {
		t.Fatalf("LLBAA %x", long[:24])
	}
	checkSense(t, tl.do(modeSense6(3, 0x08, 255), nil), senseWant{SenseIllegalRequest, 0x39, 0, &FieldPointer{InCDB: true, Byte: 2, Bit: 7}})
	checkSense(t, tl.do(modeSense6(0, 0x19, 255), nil), cdbField(2, 5))
	checkSense(t, tl.do([]byte{opModeSense6, 0, 0x08, 1, 255, 0}, nil), cdbField(3, -1))
}

func TestModeSelect(t *testing.T) {
	tl := newTestLU(t, nil)
	tl.exec(otherNexus, []byte{0, 0, 0, 0, 0, 0}, nil) // power-on UA
	ctl := tl.mustGood([]byte{opModeSense6, 0x08, 0x0A, 0, 255, 0}, nil)
	param := append([]byte{0, 0, 0, 0}, ctl[4:]...)
	param[4+2] |= 0x04 // D_SENSE
	sel := []byte{opModeSelect6, 0x10, 0, 0, byte(len(param)), 0}
	tl.mustGood(sel, param)
	// Errors now come in descriptor format.
	r := tl.do(read10(testBlocks, 1), nil)
	if r.Sense[0] != 0x72 {
		t.Fatalf("D_SENSE set but sense is %x", r.Sense)
	}
	checkSense(t, r, senseLBAOOB)
	// The other nexus learns about it.
	checkSense(t, tl.exec(otherNexus, []byte{0, 0, 0, 0, 0, 0}, nil), senseWant{SenseUnitAttention, 0x2A, 0x01, nil})

	// Changing a bit that is not changeable points at it.
	bad := append([]byte(nil), param...)
	bad[4+3] ^= 0x02 // QERR
	checkSense(t, tl.do(sel, bad), paramField(7, 1))
	bad = append([]byte(nil), param...)
	bad[4+1] = 0x0B // page length
	checkSense(t, tl.do(sel, bad), paramField(5, -1))
	checkSense(t, tl.do([]byte{opModeSelect6, 0x11, 0, 0, byte(len(param)), 0}, param), cdbField(1, 0))
	checkSense(t, tl.do(sel, param[:10]), senseParamLenErr)

	// WCE=0 makes every write FUA.
	cache := tl.mustGood([]byte{opModeSense6, 0x08, 0x08, 0, 255, 0}, nil)
	param = append([]byte{0, 0, 0, 0}, cache[4:]...)
	param[4+2] &^= 0x04
	tl.mustGood([]byte{opModeSelect6, 0x10, 0, 0, byte(len(param)), 0}, param)
	before := tl.be.FUAWrites.Load()
	tl.mustGood(write10(0, 1), fill(512, 0))
	if tl.be.FUAWrites.Load() != before+1 {
		t.Fatal("WCE=0 write was not FUA")
	}
}

func rsoc(rctd bool, opt, op byte, sa uint16) []byte {
	c := []byte{opMaintenanceIn, saReportOpcodes, opt, op, byte(sa >> 8), byte(sa), 0, 0, 0xFF, 0xFF, 0, 0}
	if rctd {
		c[2] |= 0x80
	}
	return c
}

func TestReportSupportedOpcodes(t *testing.T) {
	tl := newTestLU(t, nil)
	d := tl.mustGood(rsoc(false, 0, 0, 0), nil)
	if int(binary.BigEndian.Uint32(d)) != len(d)-4 || (len(d)-4)%8 != 0 {
		t.Fatalf("RSOC all: length %d", len(d))
	}
	seen := map[[2]byte]bool{}
	for i := 4; i < len(d); i += 8 {
		seen[[2]byte{d[i], d[i+3]}] = true
		if d[i+5]&1 == 0 && d[i+3] != 0 {
			t.Fatalf("service action set without SERVACTV: %x", d[i:i+8])
		}
	}
	for _, want := range [][2]byte{{opRead10, 0}, {opServiceActionIn16, saReadCapacity16}, {opUnmap, 0}, {opPRIn, 0}} {
		if !seen[want] {
			t.Fatalf("RSOC all lacks %x", want)
		}
	}
	d = tl.mustGood(rsoc(true, 0, 0, 0), nil)
	if (len(d)-4)%20 != 0 || d[4+5]&0x02 == 0 || binary.BigEndian.Uint16(d[4+8:]) != 0x0A {
		t.Fatalf("RSOC RCTD descriptors %x", d[:32])
	}
	one := tl.mustGood(rsoc(false, 1, opRead10, 0), nil)
	if one[1]&0x07 != 3 || binary.BigEndian.Uint16(one[2:4]) != 10 || one[4] != opRead10 || one[5]&0x18 != 0x18 {
		t.Fatalf("RSOC READ(10) %x", one)
	}
	one = tl.mustGood(rsoc(true, 2, opServiceActionIn16, saReadCapacity16), nil)
	if one[1] != 0x83 || one[4] != opServiceActionIn16 || len(one) != 4+16+12 {
		t.Fatalf("RSOC READ CAPACITY(16) %x", one)
	}
	if one = tl.mustGood(rsoc(false, 1, 0xC5, 0), nil); one[1]&0x07 != 1 {
		t.Fatalf("unsupported opcode reported %x", one)
	}
	checkSense(t, tl.do(rsoc(false, 1, opServiceActionIn16, saReadCapacity16), nil), cdbField(2, 2))
	checkSense(t, tl.do(rsoc(false, 2, opRead10, 0), nil), cdbField(2, 2))
	checkSense(t, tl.do(rsoc(false, 5, 0, 0), nil), cdbField(2, 2))
	thick := newTestLU(t, func(c *Config) { c.Thin = false })
	if one = thick.mustGood(rsoc(false, 1, opUnmap, 0), nil); one[1]&0x07 != 1 {
		t.Fatal("thick LU reports UNMAP as supported")
	}
	tmf := tl.mustGood([]byte{opMaintenanceIn, saReportTMFs, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0}, nil)
	if len(tmf) != 4 || tmf[0]&0x08 == 0 {
		t.Fatalf("REPORT SUPPORTED TMFs %x", tmf)
	}
}

func TestALUA(t *testing.T) {
	tl := newTestLU(t, func(c *Config) {
		c.PortGroups = []PortGroup{
			{ID: 1, State: ALUAActiveOptimized, Preferred: true, RelativePortIDs: []uint16{1}},
			{ID: 2, State: ALUAStandby, RelativePortIDs: []uint16{2}},
		}
	})
	rtpg := []byte{opMaintenanceIn, saReportTPGs, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0}
	d := tl.mustGood(rtpg, nil)
	if binary.BigEndian.Uint32(d) != uint32(len(d)-4) || len(d) != 4+2*12 {
		t.Fatalf("RTPG %x", d)
	}
	if d[4] != 0x80 || binary.BigEndian.Uint16(d[6:8]) != 1 || d[11] != 1 || binary.BigEndian.Uint16(d[14:16]) != 1 {
		t.Fatalf("RTPG group 1 %x", d[4:16])
	}
	if d[16]&0x0F != byte(ALUAStandby) || binary.BigEndian.Uint16(d[26:28]) != 2 {
		t.Fatalf("RTPG group 2 %x", d[16:28])
	}
	rtpg[1] |= 0x20
	if d = tl.mustGood(rtpg, nil); d[4] != 0x10 || len(d) != 8+2*12 {
		t.Fatalf("RTPG extended %x", d[:8])
	}

	standby := testNexus
	standby.RelativePortID, standby.TPGT = 2, 2
	tl.exec(standby, []byte{0, 0, 0, 0, 0, 0}, nil) // power-on UA
	checkSense(t, tl.exec(standby, read10(0, 1), nil), senseWant{SenseNotReady, 0x04, 0x0B, nil})
	tl.mustGoodOn(standby, inq(false, 0, 36))
	tl.mustGoodOn(standby, rtpg)
	id := tl.mustGoodOn(standby, inq(true, 0x83, 255))
	if !bytes.Contains(id, []byte{0x51, 0x95, 0, 4, 0, 0, 0, 2}) {
		t.Fatalf("VPD 0x83 target port group for port 2: %x", id)
	}

	// Fail over: group 2 becomes active, everyone is told.
	if err := tl.lu.SetPortGroups([]PortGroup{
		{ID: 1, State: ALUAStandby, RelativePortIDs: []uint16{1}},
		{ID: 2, State: ALUAActiveOptimized, RelativePortIDs: []uint16{2}},
	}); err != nil {
		t.Fatal(err)
	}
	checkSense(t, tl.exec(standby, read10(0, 1), nil), senseWant{SenseUnitAttention, 0x2A, 0x06, nil})
	tl.mustGoodOn(standby, read10(0, 1))
	checkSense(t, tl.do(read10(0, 1), nil), senseWant{SenseUnitAttention, 0x2A, 0x06, nil})
	checkSense(t, tl.do(read10(0, 1), nil), senseWant{SenseNotReady, 0x04, 0x0B, nil})
}

func TestMiscCommands(t *testing.T) {
	tl := newTestLU(t, nil)
	rc := tl.mustGood([]byte{opReadCapacity10, 0, 0, 0, 0, 0, 0, 0, 0, 0}, nil)
	if binary.BigEndian.Uint32(rc) != testBlocks-1 || binary.BigEndian.Uint32(rc[4:]) != 512 {
		t.Fatalf("READ CAPACITY(10) %x", rc)
	}
	checkSense(t, tl.do([]byte{opReadCapacity10, 0, 0, 0, 0, 1, 0, 0, 0, 0}, nil), cdbField(2, -1))
	rc16 := []byte{opServiceActionIn16, saReadCapacity16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	for alloc := byte(0); alloc < 40; alloc++ {
		rc16[13] = alloc
		if d := tl.mustGood(rc16, nil); len(d) != int(min(alloc, 32)) {
			t.Fatalf("READ CAPACITY(16) alloc %d returned %d", alloc, len(d))
		}
	}
	flushes := tl.be.Flushes.Load()
	tl.mustGood([]byte{opSyncCache10, 0, 0, 0, 0, 0, 0, 0, 0, 0}, nil)
	if tl.be.Flushes.Load() != flushes+1 {
		t.Fatal("SYNCHRONIZE CACHE did not flush")
	}
	checkSense(t, tl.do(cdb16(opSyncCache16, testBlocks, 1), nil), senseLBAOOB)
	tl.mustGood([]byte{opPrefetch10, 0x02, 0, 0, 0, 0, 0, 0, 8, 0}, nil)
	checkSense(t, tl.do([]byte{opPrefetch10, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0}, nil), senseLBAOOB)
	tl.mustGood([]byte{opStartStopUnit, 0, 0, 0, 0x01, 0}, nil)
	tl.mustGood([]byte{opPreventAllow, 0, 0, 0, 0x01, 0}, nil)
	if d := tl.mustGood([]byte{opReadDefect10, 0, 0x1D, 0, 0, 0, 0, 0, 32, 0}, nil); len(d) != 4 || d[1] != 0x1D {
		t.Fatalf("READ DEFECT DATA(10) %x", d)
	}
	if d := tl.mustGood([]byte{opReportLUNs, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0}, nil); len(d) != 16 {
		t.Fatalf("REPORT LUNS %x", d)
	}
}

// TestCompareAndWriteAtomic runs COMPARE AND WRITE increments of a counter
// block from many goroutines while plain writers hammer the neighbouring
// blocks. Every successful CAW must count: a lost update means the compare
// and the write were not atomic.
func TestCompareAndWriteAtomic(t *testing.T) {
	tl := newTestLU(t, nil)
	const workers, perWorker = 8, 40
	ctx := context.Background()
	tl.mustGood(write10(0, 1), make([]byte, 512))
	var wg sync.WaitGroup
	var mu sync.Mutex
	successes := 0
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			nexus := testNexus
			nexus.ISID[5] = byte(10 + w)
			tl.lu.Execute(ctx, &Command{Nexus: nexus, CDB: []byte{0, 0, 0, 0, 0, 0}}) // power-on UA
			for done := 0; done < perWorker; {
				cur := tl.lu.Execute(ctx, &Command{Nexus: nexus, CDB: read10(0, 1)})
				if cur.Status != StatusGood {
					t.Errorf("read: %x", cur.Sense)
					return
				}
				old := append([]byte(nil), cur.Data...)
				cur.Release()
				next := append([]byte(nil), old...)
				binary.BigEndian.PutUint64(next, binary.BigEndian.Uint64(old)+1)
				r := tl.lu.Execute(ctx, &Command{Nexus: nexus, CDB: cawCDB(0, 1), DataOut: append(old, next...)})
				switch r.Status {
				case StatusGood:
					done++
					mu.Lock()
					successes++
					mu.Unlock()
				case StatusCheckCondition:
					if r.Sense[2]&0x0F != SenseMiscompare {
						t.Errorf("CAW: %x", r.Sense)
						return
					}
				}
				// A plain writer overlapping neighbouring blocks.
				wr := tl.lu.Execute(ctx, &Command{Nexus: nexus, CDB: write10(1, 2), DataOut: fill(1024, byte(w))})
				if wr.Status != StatusGood {
					t.Errorf("write: %x", wr.Sense)
					return
				}
			}
		}(w)
	}
	wg.Wait()
	got := binary.BigEndian.Uint64(tl.be.Bytes(0, 8))
	if got != uint64(successes) || successes != workers*perWorker {
		t.Fatalf("counter %d after %d successful CAWs (want %d)", got, successes, workers*perWorker)
	}
}

func TestRangeLockOverlap(t *testing.T) {
	var rl rangeLock
	ctx := context.Background()
	a, _ := rl.lock(ctx, 0, 10)
	b, _ := rl.lock(ctx, 10, 20) // disjoint: no wait
	got := make(chan struct{})
	go func() {
		h, _ := rl.lock(ctx, 5, 6)
		close(got)
		rl.unlock(h)
	}()
	select {
	case <-got:
		t.Fatal("overlapping lock acquired while held")
	default:
	}
	rl.unlock(a)
	<-got
	rl.unlock(b)
	cctx, cancel := context.WithCancel(ctx)
	h, _ := rl.lock(ctx, 0, 1)
	cancel()
	if _, err := rl.lock(cctx, 0, 1); err == nil {
		t.Fatal("lock ignored a cancelled context")
	}
	rl.unlock(h)
}

func BenchmarkRead4K(b *testing.B) {
	be := scsitest.NewMemBackend(64 << 20)
	lu, _ := New(Config{Backend: be})
	ctx := context.Background()
	cmd := &Command{Nexus: testNexus, CDB: read10(8, 8)}
	lu.Execute(ctx, &Command{Nexus: testNexus, CDB: []byte{0, 0, 0, 0, 0, 0}})
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			r := lu.Execute(ctx, cmd)
			r.Release()
		}
	})
}

func BenchmarkWrite4K(b *testing.B) {
	be := scsitest.NewMemBackend(64 << 20)
	lu, _ := New(Config{Backend: be})
	ctx := context.Background()
	lu.Execute(ctx, &Command{Nexus: testNexus, CDB: []byte{0, 0, 0, 0, 0, 0}})
	data := make([]byte, 4096)
	b.ReportAllocs()
	b.ResetTimer()
	var seq uint32
	var mu sync.Mutex
	b.RunParallel(func(pb *testing.PB) {
		mu.Lock()
		seq++
		lba := seq * 64
		mu.Unlock()
		cmd := &Command{Nexus: testNexus, CDB: write10(lba, 8), DataOut: data}
		for pb.Next() {
			lu.Execute(ctx, cmd)
		}
	})
}
