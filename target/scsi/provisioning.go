package scsi

import (
	"encoding/binary"
)

func allZero(p []byte) bool {
	for _, c := range p {
		if c != 0 {
			return false
		}
	}
	return true
}

// writeSame serves WRITE SAME(10/16). The block really is written to every
// LBA in the range, unless UNMAP is set on a thin LU: then the range is
// deallocated whatever the block holds (SBC-3 5.42; libiscsi checks that such
// blocks read back as zeros since we report LBPRZ=1).
func (lu *LogicalUnit) writeSame(t *task) *CheckError {
	cdb := t.cdb
	anchor := cdb[1]&0x10 != 0
	unmapBit := cdb[1]&0x08 != 0
	ndob := cdb[0] == opWriteSame16 && cdb[1]&0x01 != 0
	if anchor {
		// ANC_SUP=0: we never anchor, with or without UNMAP.
		return InvalidCDBField(1, 4)
	}
	if unmapBit && !lu.cfg.Thin {
		return InvalidCDBField(1, 3)
	}
	r := t.rw
	if r.blocks > maxWriteSameBlocks {
		return InvalidCDBField(uint16(t.desc.rw.lenOff), -1)
	}
	var block []byte
	if ndob {
		if len(t.cmd.DataOut) != 0 {
			return InvalidCDBField(1, 0)
		}
	} else {
		if len(t.cmd.DataOut) != int(lu.bs) {
			// One logical block of Data-Out, exactly.
			return InvalidCDBField(uint16(t.desc.rw.lenOff), -1)
		}
		block = t.cmd.DataOut
	}
	transferred := uint32(len(block))
	if r.blocks == 0 {
		t.resp = &Response{Status: StatusGood, Transferred: transferred}
		return nil
	}
	zero := ndob || allZero(block)
	h, err := lu.ranges.lock(t.ctx, r.lba, r.lba+r.blocks)
	if err != nil {
		return Check(ReasonNone)
	}
	defer lu.ranges.unlock(h)
	if unmapBit {
		if err := lu.be.Unmap(t.ctx, int64(r.lba<<lu.bsShift), int64(r.blocks<<lu.bsShift)); err != nil {
			return lu.ioError(t, err, ReasonWriteError)
		}
		t.resp = &Response{Status: StatusGood, Transferred: transferred}
		return nil
	}
	total := r.blocks << lu.bsShift
	chunk := min(total, writeSameChunk)
	buf := lu.bufs.get(int(chunk))
	defer buf.release()
	if zero {
		clear(buf.b)
	} else {
		for off := 0; off < len(buf.b); off += int(lu.bs) {
			copy(buf.b[off:], block)
		}
	}
	for done := uint64(0); done < total; {
		n := min(total-done, chunk)
		lba := r.lba + done>>lu.bsShift
		if cerr := lu.writeAt(t, lba, buf.b[:n], false); cerr != nil {
			return cerr
		}
		done += n
	}
	t.resp = &Response{Status: StatusGood, Transferred: transferred}
	return nil
}

// unmap serves UNMAP (SBC-3 5.28): the parameter list is checked in full
// before any extent is deallocated.
func (lu *LogicalUnit) unmap(t *task) *CheckError {
	cdb := t.cdb
	if cdb[1]&0x01 != 0 { // ANCHOR without ANC_SUP
		return InvalidCDBField(1, 0)
	}
	plen := int(binary.BigEndian.Uint16(cdb[7:9]))
	if plen == 0 {
		t.good(nil)
		return nil
	}
	if plen < 8 || len(t.cmd.DataOut) < plen {
		return Check(ReasonParamListLengthError)
	}
	p := t.cmd.DataOut[:plen]
	dataLen := int(binary.BigEndian.Uint16(p[0:2]))
	bdLen := int(binary.BigEndian.Uint16(p[2:4]))
	if dataLen != 0 && dataLen+2 > plen {
		return InvalidParamField(0, -1)
	}
	if bdLen%16 != 0 {
		return InvalidParamField(2, -1)
	}
	if bdLen > plen-8 {
		return Check(ReasonParamListLengthError)
	}
	if bdLen/16 > maxUnmapDescs {
		return InvalidParamField(2, -1)
	}
	n := lu.nblocks.Load()
	descs := p[8 : 8+bdLen]
	for i := 0; i < len(descs); i += 16 {
		lba := binary.BigEndian.Uint64(descs[i : i+8])
		cnt := uint64(binary.BigEndian.Uint32(descs[i+8 : i+12]))
		if lba > n || cnt > n-lba {
			return Check(ReasonLBAOutOfRange)
		}
		if cnt > maxUnmapBlocks {
			return InvalidParamField(uint16(8+i+8), -1)
		}
	}
	for i := 0; i < len(descs); i += 16 {
		lba := binary.BigEndian.Uint64(descs[i : i+8])
		cnt := uint64(binary.BigEndian.Uint32(descs[i+8 : i+12]))
		if cnt == 0 {
			continue
		}
		h, err := lu.ranges.lock(t.ctx, lba, lba+cnt)
		if err != nil {
			return Check(ReasonNone)
		}
		err = lu.be.Unmap(t.ctx, int64(lba<<lu.bsShift), int64(cnt<<lu.bsShift))
		lu.ranges.unlock(h)
		if err != nil {
			return lu.ioError(t, err, ReasonWriteError)
		}
	}
	t.resp = &Response{Status: StatusGood, Transferred: uint32(plen)}
	return nil
}

// Provisioning status values of LBA status descriptors (SBC-3 table 38).
const (
	lbaMapped      = 0
	lbaDeallocated = 1
	maxLBADescs    = 64
	// maxLBAProbes bounds backend calls per command: a backend reporting tiny
	// extents must not turn one CDB into millions of lookups.
	maxLBAProbes = 1024
)

// getLBAStatus reports mapped and deallocated extents from the starting LBA,
// asking the backend when it can tell; otherwise everything is mapped.
func (lu *LogicalUnit) getLBAStatus(t *task) *CheckError {
	cdb := t.cdb
	lba := binary.BigEndian.Uint64(cdb[2:10])
	alloc := int(binary.BigEndian.Uint32(cdb[10:14]))
	n := lu.nblocks.Load()
	if lba >= n {
		return Check(ReasonLBAOutOfRange)
	}
	maxDescs := min(maxLBADescs, max(1, (alloc-8)/16))
	d := make([]byte, 8, 8+16*maxDescs)
	for cur, probes := lba, 0; cur < n && (len(d)-8)/16 < maxDescs && probes < maxLBAProbes; probes++ {
		mapped, length := true, (n-cur)<<lu.bsShift
		if lu.mapStatus != nil {
			m, l, err := lu.mapStatus.MapStatus(t.ctx, int64(cur<<lu.bsShift))
			if err != nil {
				return lu.ioError(t, err, ReasonReadError)
			}
			if l <= 0 {
				l = int64(lu.bs)
			}
			mapped, length = m, uint64(l)
		}
		blocks := (length + uint64(lu.bs) - 1) >> lu.bsShift
		blocks = min(blocks, n-cur, 0xFFFFFFFF)
		var desc [16]byte
		binary.BigEndian.PutUint64(desc[0:8], cur)
		binary.BigEndian.PutUint32(desc[8:12], uint32(blocks))
		if !mapped {
			desc[12] = lbaDeallocated
		}
		// Merge with the previous descriptor when the backend split an
		// extent that has the same state.
		if k := len(d) - 16; k >= 8 && d[k+12] == desc[12] {
			prev := binary.BigEndian.Uint32(d[k+8 : k+12])
			if uint64(prev)+blocks <= 0xFFFFFFFF {
				binary.BigEndian.PutUint32(d[k+8:k+12], prev+uint32(blocks))
				cur += blocks
				continue
			}
		}
		d = append(d, desc[:]...)
		cur += blocks
	}
	binary.BigEndian.PutUint32(d[0:4], uint32(len(d)-4))
	t.dataIn(d, alloc)
	return nil
}
