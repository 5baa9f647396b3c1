package scsi

import (
	"encoding/binary"
	"math/bits"
)

// Mode page codes and page control values (SPC-4 7.5).
const (
	modePageCaching  = 0x08
	modePageControl  = 0x0A
	modePageIEC      = 0x1C
	modePageAll      = 0x3F
	pcCurrent        = 0
	pcChangeable     = 1
	pcDefault        = 2
	pcSaved          = 3
	dspWriteProtect  = 0x80
	dspDPOFUA        = 0x10
	modeHeader6Len   = 4
	modeHeader10Len  = 8
	shortBlockDescLn = 8
	longBlockDescLn  = 16
)

// modePageCodes is the order MODE SENSE returns pages in for 0x3F.
var modePageCodes = []byte{modePageCaching, modePageControl, modePageIEC}

// modePage returns page code in the requested page control form, or nil if
// we do not have that page. Only WCE (caching) and D_SENSE (control) can be
// changed; every page is shared by all I_T nexuses.
func (lu *LogicalUnit) modePage(code byte, pc int) []byte {
	switch code {
	case modePageCaching:
		p := make([]byte, 20)
		p[0], p[1] = modePageCaching, 0x12
		switch pc {
		case pcChangeable:
			p[2] = 0x04
		case pcDefault:
			p[2] = 0x04
		default:
			if lu.wce.Load() {
				p[2] = 0x04
			}
		}
		return p
	case modePageControl:
		p := make([]byte, 12)
		p[0], p[1] = modePageControl, 0x0A
		switch pc {
		case pcChangeable:
			p[2] = 0x04
			return p
		case pcCurrent:
			if lu.dsense.Load() {
				p[2] |= 0x04
			}
		}
		p[2] |= 0x02                                // GLTSD: we keep no log parameters to save
		p[3] = 0x10                                 // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
		binary.BigEndian.PutUint16(p[8:10], 0xFFFF) // BUSY TIMEOUT PERIOD: unlimited
		return p
	case modePageIEC:
		p := make([]byte, 12)
		p[0], p[1] = modePageIEC, 0x0A
		if pc != pcChangeable {
			p[2] = 0x08 // DEXCPT: no informational exception reporting
		}
		return p
	}
	return nil
}

func (lu *LogicalUnit) modeSense(t *task) *CheckError {
	cdb := t.cdb
	ten := cdb[0] == opModeSense10
	dbd := cdb[1]&0x08 != 0
	llbaa := ten && cdb[1]&0x10 != 0
	pc := int(cdb[2] >> 6)
	code := cdb[2] & 0x3F
	sub := cdb[3]
	var alloc int
	if ten {
		alloc = int(binary.BigEndian.Uint16(cdb[7:9]))
	} else {
		alloc = int(cdb[4])
	}
	if pc == pcSaved {
		return &CheckError{Reason: ReasonSavingParamsNotSupported, Field: &FieldPointer{InCDB: true, Byte: 2, Bit: 7}}
	}
	if sub != 0 && !(code == modePageAll && sub == 0xFF) {
		return InvalidCDBField(3, -1)
	}
	var pages []byte
	if code == modePageAll {
		for _, c := range modePageCodes {
			pages = append(pages, lu.modePage(c, pc)...)
		}
	} else if p := lu.modePage(code, pc); p != nil {
		pages = p
	} else {
		return InvalidCDBField(2, 5)
	}
	var bd []byte
	if !dbd {
		nb := lu.nblocks.Load()
		if llbaa {
			bd = make([]byte, longBlockDescLn)
			binary.BigEndian.PutUint64(bd[0:8], nb)
			binary.BigEndian.PutUint32(bd[12:16], lu.bs)
		} else {
			bd = make([]byte, shortBlockDescLn)
			if nb > 0xFFFFFFFF {
				nb = 0xFFFFFFFF
			}
			binary.BigEndian.PutUint32(bd[0:4], uint32(nb))
			binary.BigEndian.PutUint32(bd[4:8], lu.bs) // density code 0 in byte 4
		}
	}
	dsp := byte(dspDPOFUA)
	if lu.cfg.ReadOnly {
		dsp |= dspWriteProtect
	}
	var d []byte
	if ten {
		d = make([]byte, modeHeader10Len, modeHeader10Len+len(bd)+len(pages))
		d[3] = dsp
		if llbaa && len(bd) > 0 {
			d[4] = 0x01 // LONGLBA
		}
		binary.BigEndian.PutUint16(d[6:8], uint16(len(bd)))
		d = append(append(d, bd...), pages...)
		binary.BigEndian.PutUint16(d[0:2], uint16(len(d)-2))
	} else {
		d = make([]byte, modeHeader6Len, modeHeader6Len+len(bd)+len(pages))
		d[2] = dsp
		d[3] = byte(len(bd))
		d = append(append(d, bd...), pages...)
		d[0] = byte(len(d) - 1)
	}
	t.dataIn(d, alloc)
	return nil
}

// modeSelect validates the whole parameter list before changing anything,
// so a bad page leaves every setting as it was.
func (lu *LogicalUnit) modeSelect(t *task) *CheckError {
	cdb := t.cdb
	ten := cdb[0] == opModeSelect10
	if cdb[1]&0x01 != 0 { // SP: we cannot save pages
		return InvalidCDBField(1, 0)
	}
	var plen, hdr int
	if ten {
		plen, hdr = int(binary.BigEndian.Uint16(cdb[7:9])), modeHeader10Len
	} else {
		plen, hdr = int(cdb[4]), modeHeader6Len
	}
	if plen == 0 {
		t.good(nil)
		return nil
	}
	p := t.cmd.DataOut
	if len(p) < plen || plen < hdr {
		return Check(ReasonParamListLengthError)
	}
	p = p[:plen]
	var bdl int
	long := false
	if ten {
		bdl = int(binary.BigEndian.Uint16(p[6:8]))
		long = p[4]&0x01 != 0
	} else {
		bdl = int(p[3])
	}
	descLen := shortBlockDescLn
	if long {
		descLen = longBlockDescLn
	}
	bdlOff := uint16(3)
	if ten {
		bdlOff = 6
	}
	if bdl%descLen != 0 {
		return InvalidParamField(bdlOff, -1)
	}
	if hdr+bdl > plen {
		return Check(ReasonParamListLengthError)
	}
	for off := hdr; off < hdr+bdl; off += descLen {
		lenOff := off + 5
		if long {
			lenOff = off + 12
		}
		if getUint(p[lenOff:off+descLen]) != uint64(lu.bs) {
			return InvalidParamField(uint16(lenOff), -1)
		}
	}
	wce, dsense := lu.wce.Load(), lu.dsense.Load()
	for off := hdr + bdl; off < plen; {
		if off+2 > plen {
			return Check(ReasonParamListLengthError)
		}
		if p[off]&0x40 != 0 { // SPF: we have no subpages
			return InvalidParamField(uint16(off), 6)
		}
		cur := lu.modePage(p[off]&0x3F, pcCurrent)
		if cur == nil {
			return InvalidParamField(uint16(off), 5)
		}
		if p[off+1] != cur[1] {
			return InvalidParamField(uint16(off+1), -1)
		}
		end := off + len(cur)
		if end > plen {
			return Check(ReasonParamListLengthError)
		}
		mask := lu.modePage(cur[0], pcChangeable)
		for i := 2; i < len(cur); i++ {
			if diff := (p[off+i] ^ cur[i]) &^ mask[i]; diff != 0 {
				return InvalidParamField(uint16(off+i), int8(bits.Len8(diff)-1))
			}
		}
		switch cur[0] {
		case modePageCaching:
			wce = p[off+2]&0x04 != 0
		case modePageControl:
			dsense = p[off+2]&0x04 != 0
		}
		off = end
	}
	changed := wce != lu.wce.Load() || dsense != lu.dsense.Load()
	lu.wce.Store(wce)
	lu.dsense.Store(dsense)
	if changed {
		lu.establishUAAll(ReasonUAModeParametersChanged, &t.cmd.Nexus)
	}
	t.resp = &Response{Status: StatusGood, Transferred: uint32(plen)}
	return nil
}
