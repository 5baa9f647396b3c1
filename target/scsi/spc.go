package scsi

import (
	"encoding/binary"
	"errors"
)

// Version descriptors claimed in standard INQUIRY data (SPC-4 table 144).
var versionDescriptors = []uint16{
	0x00C0, // SAM-5
	0x0960, // iSCSI
	0x0460, // SPC-4
	0x04C0, // SBC-3
}

const stdInquiryLen = 74

func (lu *LogicalUnit) inquiry(t *task) *CheckError {
	cdb := t.cdb
	alloc := int(binary.BigEndian.Uint16(cdb[3:5]))
	if cdb[1]&0x02 != 0 { // CMDDT (obsolete)
		return InvalidCDBField(1, 1)
	}
	if cdb[1]&0x01 == 0 {
		if cdb[2] != 0 {
			return InvalidCDBField(2, -1)
		}
		t.dataIn(lu.standardInquiry(), alloc)
		return nil
	}
	page := vpdPageFor(cdb[2])
	if page == nil || !page.on(lu) {
		return InvalidCDBField(2, -1)
	}
	data := page.build(lu, &t.cmd.Nexus)
	data[1] = page.code
	binary.BigEndian.PutUint16(data[2:4], uint16(len(data)-4))
	t.dataIn(data, alloc)
	return nil
}

func (lu *LogicalUnit) standardInquiry() []byte {
	d := make([]byte, stdInquiryLen)
	d[0] = 0x00 // connected, direct access block device
	d[2] = 0x06 // SPC-4
	d[3] = 0x10 | 0x02
	d[4] = stdInquiryLen - 5
	d[5] = 0x10 // TPGS=01: implicit ALUA only
	d[7] = 0x02 // CMDQUE
	padASCII(d[8:16], lu.cfg.Vendor)
	padASCII(d[16:32], lu.cfg.Product)
	padASCII(d[32:36], lu.cfg.Revision)
	for i, v := range versionDescriptors {
		binary.BigEndian.PutUint16(d[58+2*i:], v)
	}
	return d
}

// padASCII copies s into dst, replacing anything outside printable ASCII
// (SPC-4 4.3.1) and padding with spaces.
func padASCII(dst []byte, s string) {
	for i := range dst {
		c := byte(' ')
		if i < len(s) {
			c = s[i]
			if c < 0x20 || c > 0x7E {
				c = '_'
			}
		}
		dst[i] = c
	}
}

// requestSense returns (and clears) the oldest pending unit attention, or
// NO SENSE.
func (lu *LogicalUnit) requestSense(t *task) *CheckError {
	cdb := t.cdb
	desc := cdb[1]&0x01 != 0
	alloc := int(cdb[4])
	st := lu.nexus(&t.cmd.Nexus)
	r := ReasonNone
	if st.count.Load() > 0 {
		lu.mu.Lock()
		r = st.popLocked()
		lu.mu.Unlock()
	}
	t.dataIn(BuildSense(Check(r), desc), alloc)
	return nil
}

// reportLUNs answers REPORT LUNS when the transport passes it down: it only
// knows its own LUN.
func (lu *LogicalUnit) reportLUNs(t *task) *CheckError {
	t.resp = ReportLUNs(t.cmd, []uint64{t.cmd.LUN})
	return nil
}

// prResult turns the reservation handler's answer into a response.
func prResult(t *task, st Status, err error) *CheckError {
	if err != nil {
		var ce *CheckError
		if errors.As(err, &ce) {
			return ce
		}
		return Check(ReasonInternalTargetFailure)
	}
	if st == StatusCheckCondition {
		return Check(ReasonInternalTargetFailure)
	}
	t.resp = &Response{Status: st}
	return nil
}

func (lu *LogicalUnit) prIn(t *task) *CheckError {
	data, err := lu.pr.persistentReserveIn(t.ctx, t.cmd.Nexus, t.cdb)
	if err != nil {
		return prResult(t, StatusCheckCondition, err)
	}
	t.dataIn(data, int(binary.BigEndian.Uint16(t.cdb[7:9])))
	return nil
}

func (lu *LogicalUnit) prOut(t *task) *CheckError {
	plen := int(binary.BigEndian.Uint32(t.cdb[5:9]))
	param := t.cmd.DataOut
	if len(param) > plen {
		param = param[:plen]
	}
	if len(param) < plen {
		return Check(ReasonParamListLengthError)
	}
	st, err := lu.pr.persistentReserveOut(t.ctx, t.cmd.Nexus, t.cdb, param)
	if err := prResult(t, st, err); err != nil {
		return err
	}
	t.resp.Transferred = uint32(plen)
	return nil
}

func (lu *LogicalUnit) reserve(t *task) *CheckError {
	st, err := lu.pr.reserve(t.cmd.Nexus, t.cdb)
	return prResult(t, st, err)
}

func (lu *LogicalUnit) release(t *task) *CheckError {
	st, err := lu.pr.release(t.cmd.Nexus, t.cdb)
	return prResult(t, st, err)
}
