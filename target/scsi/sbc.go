package scsi

import (
	"bytes"
	"encoding/binary"
)

// rwLayout says where a block command keeps its LBA and length.
type rwLayout struct {
	lbaOff, lbaSize uint8
	lenOff, lenSize uint8
	// six: READ(6)/WRITE(6): 21-bit LBA, length 0 means 256 blocks.
	six bool
	// protect: byte 1 bits 7-5 are RDPROTECT/WRPROTECT/VRPROTECT, which must
	// be zero because we have no protection information.
	protect bool
	// dpoFua: byte 1 carries DPO (bit 4) and FUA (bit 3).
	dpoFua bool
	// noLimit: the length does not size a data transfer (or the handler
	// checks it), so MAXIMUM TRANSFER LENGTH does not apply here.
	noLimit bool
	// toEnd: a zero length means "up to the last LBA" (WRITE SAME).
	toEnd bool
}

// rwRequest is a decoded, range-checked block command.
type rwRequest struct {
	lba    uint64
	blocks uint64
	dpo    bool
	fua    bool
}

func getUint(b []byte) uint64 {
	var v uint64
	for _, c := range b {
		v = v<<8 | uint64(c)
	}
	return v
}

// decodeRW fills t.rw from the CDB and applies the checks every block
// command shares: protection fields, LBA range, transfer length limit.
func (lu *LogicalUnit) decodeRW(t *task, l *rwLayout) *CheckError {
	cdb := t.cdb
	var r rwRequest
	if l.six {
		r.lba = uint64(cdb[1]&0x1F)<<16 | uint64(cdb[2])<<8 | uint64(cdb[3])
		r.blocks = uint64(cdb[4])
		if r.blocks == 0 {
			r.blocks = 256
		}
	} else {
		r.lba = getUint(cdb[l.lbaOff : l.lbaOff+l.lbaSize])
		r.blocks = getUint(cdb[l.lenOff : l.lenOff+l.lenSize])
	}
	if l.protect && cdb[1]&0xE0 != 0 {
		return InvalidCDBField(1, 7)
	}
	if l.dpoFua {
		r.dpo = cdb[1]&0x10 != 0
		r.fua = cdb[1]&0x08 != 0
	}
	n := lu.nblocks.Load()
	if r.lba > n || r.blocks > n-r.lba {
		return Check(ReasonLBAOutOfRange)
	}
	if l.toEnd && r.blocks == 0 {
		r.blocks = n - r.lba
	}
	if !l.noLimit && r.blocks > uint64(maxTransferBytes>>lu.bsShift) {
		return InvalidCDBField(uint16(l.lenOff), -1)
	}
	t.rw = r
	return nil
}

func (lu *LogicalUnit) testUnitReady(t *task) *CheckError {
	t.good(nil)
	return nil
}

// read serves READ(6/10/12/16): one pooled buffer, no locks.
func (lu *LogicalUnit) read(t *task) *CheckError {
	n := int(t.rw.blocks << lu.bsShift)
	if n == 0 {
		t.good(nil)
		return nil
	}
	buf := lu.bufs.get(n)
	if err := lu.be.ReadAt(t.ctx, buf.b, int64(t.rw.lba<<lu.bsShift)); err != nil {
		buf.release()
		return lu.ioError(t, err, ReasonReadError)
	}
	t.resp = &Response{Status: StatusGood, Data: buf.b, Transferred: uint32(n), Release: buf.release}
	return nil
}

// dataOut returns the whole blocks of Data-Out the initiator sent for a
// command that expects want bytes. A short Data-Out (the initiator's expected
// length was smaller than the CDB's) writes only what arrived; the transport
// reports the residual.
func (lu *LogicalUnit) dataOut(t *task, want int) []byte {
	p := t.cmd.DataOut
	if len(p) > want {
		p = p[:want]
	}
	return p[:len(p)&^(int(lu.bs)-1)]
}

// write serves WRITE(6/10/12/16).
func (lu *LogicalUnit) write(t *task) *CheckError {
	want := int(t.rw.blocks << lu.bsShift)
	p := lu.dataOut(t, want)
	if err := lu.writeLocked(t, t.rw.lba, p, t.rw.fua); err != nil {
		return err
	}
	t.resp = &Response{Status: StatusGood, Transferred: uint32(want)}
	return nil
}

// writeLocked writes p at lba under the range lock. With the write cache
// disabled (WCE=0) every write is forced unit access.
func (lu *LogicalUnit) writeLocked(t *task, lba uint64, p []byte, fua bool) *CheckError {
	if len(p) == 0 {
		return nil
	}
	start, end := lba, lba+uint64(len(p))>>lu.bsShift
	h, err := lu.ranges.lock(t.ctx, start, end)
	if err != nil {
		return Check(ReasonNone)
	}
	defer lu.ranges.unlock(h)
	return lu.writeAt(t, lba, p, fua)
}

func (lu *LogicalUnit) writeAt(t *task, lba uint64, p []byte, fua bool) *CheckError {
	if err := lu.be.WriteAt(t.ctx, p, int64(lba<<lu.bsShift), fua || !lu.wce.Load()); err != nil {
		return lu.ioError(t, err, ReasonWriteError)
	}
	return nil
}

// writeVerify serves WRITE AND VERIFY: the data is written, then read back
// and compared when BYTCHK is set.
func (lu *LogicalUnit) writeVerify(t *task) *CheckError {
	bytchk := t.cdb[1] & 0x06
	if bytchk > 0x02 {
		return InvalidCDBField(1, 2)
	}
	want := int(t.rw.blocks << lu.bsShift)
	p := lu.dataOut(t, want)
	if len(p) > 0 {
		start := t.rw.lba
		h, err := lu.ranges.lock(t.ctx, start, start+uint64(len(p))>>lu.bsShift)
		if err != nil {
			return Check(ReasonNone)
		}
		defer lu.ranges.unlock(h)
		if cerr := lu.writeAt(t, start, p, true); cerr != nil {
			return cerr
		}
		if bytchk != 0 {
			buf := lu.bufs.get(len(p))
			defer buf.release()
			if err := lu.be.ReadAt(t.ctx, buf.b, int64(start<<lu.bsShift)); err != nil {
				return lu.ioError(t, err, ReasonReadError)
			}
			if i := firstDiff(buf.b, p); i >= 0 {
				return &CheckError{Reason: ReasonMiscompareDuringVerify, Info: uint64(i), InfoValid: true}
			}
		}
	}
	t.resp = &Response{Status: StatusGood, Transferred: uint32(want)}
	return nil
}

func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return len(a)
}

// verify serves VERIFY(10/12/16). BYTCHK 0 checks the medium only (a read);
// 1 compares the Data-Out with the blocks; 3 compares one block of Data-Out
// with every block in the range.
func (lu *LogicalUnit) verify(t *task) *CheckError {
	bytchk := (t.cdb[1] >> 1) & 0x03
	if bytchk == 2 {
		return InvalidCDBField(1, 2)
	}
	r := t.rw
	if r.blocks > uint64(maxTransferBytes>>lu.bsShift) {
		return InvalidCDBField(uint16(t.desc.rw.lenOff), -1)
	}
	n := int(r.blocks << lu.bsShift)
	var want int
	switch bytchk {
	case 1:
		want = n
	case 3:
		want = int(lu.bs)
	}
	if r.blocks == 0 {
		t.resp = &Response{Status: StatusGood}
		return nil
	}
	if len(t.cmd.DataOut) < want {
		return InvalidCDBField(1, 2)
	}
	buf := lu.bufs.get(n)
	defer buf.release()
	if err := lu.be.ReadAt(t.ctx, buf.b, int64(r.lba<<lu.bsShift)); err != nil {
		return lu.ioError(t, err, ReasonReadError)
	}
	switch bytchk {
	case 1:
		if i := firstDiff(buf.b, t.cmd.DataOut[:n]); i >= 0 {
			return &CheckError{Reason: ReasonMiscompareDuringVerify, Info: uint64(i), InfoValid: true}
		}
	case 3:
		blk := t.cmd.DataOut[:lu.bs]
		for off := 0; off < n; off += int(lu.bs) {
			if i := firstDiff(buf.b[off:off+int(lu.bs)], blk); i >= 0 {
				return &CheckError{Reason: ReasonMiscompareDuringVerify, Info: uint64(off + i), InfoValid: true}
			}
		}
	}
	t.resp = &Response{Status: StatusGood, Transferred: uint32(want)}
	return nil
}

// prefetch serves PRE-FETCH(10/16). We keep no cache of our own, so SBC-3
// says GOOD ("not all blocks fit in the cache"), never CONDITION MET.
func (lu *LogicalUnit) prefetch(t *task) *CheckError {
	t.good(nil)
	return nil
}

// syncCache serves SYNCHRONIZE CACHE(10/16) by flushing the whole backend;
// the range was already checked.
func (lu *LogicalUnit) syncCache(t *task) *CheckError {
	if err := lu.be.Flush(t.ctx); err != nil {
		return lu.ioError(t, err, ReasonWriteError)
	}
	t.good(nil)
	return nil
}

// compareAndWrite serves COMPARE AND WRITE atomically with respect to every
// other writer: the range lock is held from the read to the write.
func (lu *LogicalUnit) compareAndWrite(t *task) *CheckError {
	r := t.rw
	if r.blocks > maxCompareBlocks {
		return InvalidCDBField(13, -1)
	}
	n := int(r.blocks << lu.bsShift)
	if r.blocks == 0 {
		if len(t.cmd.DataOut) > 0 || t.cmd.ExpectedLen > 0 {
			// Data-Out without blocks to compare: the CDB and the transfer disagree.
			return InvalidCDBField(13, -1)
		}
		t.good(nil)
		return nil
	}
	if len(t.cmd.DataOut) != 2*n {
		return InvalidCDBField(13, -1)
	}
	verifyData, writeData := t.cmd.DataOut[:n], t.cmd.DataOut[n:2*n]
	h, err := lu.ranges.lock(t.ctx, r.lba, r.lba+r.blocks)
	if err != nil {
		return Check(ReasonNone)
	}
	defer lu.ranges.unlock(h)
	buf := lu.bufs.get(n)
	defer buf.release()
	if err := lu.be.ReadAt(t.ctx, buf.b, int64(r.lba<<lu.bsShift)); err != nil {
		return lu.ioError(t, err, ReasonReadError)
	}
	if i := firstDiff(buf.b, verifyData); i >= 0 {
		return &CheckError{Reason: ReasonMiscompareDuringVerify, Info: uint64(i), InfoValid: true}
	}
	if cerr := lu.writeAt(t, r.lba, writeData, r.fua); cerr != nil {
		return cerr
	}
	t.resp = &Response{Status: StatusGood, Transferred: uint32(2 * n)}
	return nil
}

// orWrite serves ORWRITE(16): read, OR with the Data-Out, write, all under
// the range lock.
func (lu *LogicalUnit) orWrite(t *task) *CheckError {
	r := t.rw
	want := int(r.blocks << lu.bsShift)
	p := lu.dataOut(t, want)
	if len(p) > 0 {
		end := r.lba + uint64(len(p))>>lu.bsShift
		h, err := lu.ranges.lock(t.ctx, r.lba, end)
		if err != nil {
			return Check(ReasonNone)
		}
		defer lu.ranges.unlock(h)
		buf := lu.bufs.get(len(p))
		defer buf.release()
		if err := lu.be.ReadAt(t.ctx, buf.b, int64(r.lba<<lu.bsShift)); err != nil {
			return lu.ioError(t, err, ReasonReadError)
		}
		for i := range buf.b {
			buf.b[i] |= p[i]
		}
		if cerr := lu.writeAt(t, r.lba, buf.b, r.fua); cerr != nil {
			return cerr
		}
	}
	t.resp = &Response{Status: StatusGood, Transferred: uint32(want)}
	return nil
}

func (lu *LogicalUnit) readCapacity10(t *task) *CheckError {
	cdb := t.cdb
	pmi := cdb[8]&0x01 != 0
	if !pmi && binary.BigEndian.Uint32(cdb[2:6]) != 0 {
		return InvalidCDBField(2, -1)
	}
	data := make([]byte, 8)
	last := lu.nblocks.Load() - 1
	if last > 0xFFFFFFFF {
		last = 0xFFFFFFFF
	}
	binary.BigEndian.PutUint32(data[0:4], uint32(last))
	binary.BigEndian.PutUint32(data[4:8], lu.bs)
	t.good(data)
	return nil
}

func (lu *LogicalUnit) readCapacity16(t *task) *CheckError {
	alloc := int(binary.BigEndian.Uint32(t.cdb[10:14]))
	data := make([]byte, 32)
	binary.BigEndian.PutUint64(data[0:8], lu.nblocks.Load()-1)
	binary.BigEndian.PutUint32(data[8:12], lu.bs)
	if lu.cfg.Thin {
		data[14] = 0x80 | 0x40 // LBPME, LBPRZ: unmapped blocks read as zeros
	}
	t.dataIn(data, alloc)
	return nil
}

// startStopUnit accepts every power condition: the medium is not removable
// and is always ready, so there is nothing to start or stop.
func (lu *LogicalUnit) startStopUnit(t *task) *CheckError {
	t.good(nil)
	return nil
}

// preventAllow: with RMB=0 there is no medium to lock.
func (lu *LogicalUnit) preventAllow(t *task) *CheckError {
	t.good(nil)
	return nil
}

// readDefectData reports an empty defect list in the format asked for.
func (lu *LogicalUnit) readDefectData(t *task) *CheckError {
	cdb := t.cdb
	if cdb[0] == opReadDefect10 {
		alloc := int(binary.BigEndian.Uint16(cdb[7:9]))
		t.dataIn([]byte{0, cdb[2] & 0x1F, 0, 0}, alloc)
		return nil
	}
	alloc := int(binary.BigEndian.Uint32(cdb[6:10]))
	t.dataIn([]byte{0, cdb[1] & 0x1F, 0, 0, 0, 0, 0, 0}, alloc)
	return nil
}
