package scsi

import "encoding/binary"

// Reporting options of REPORT SUPPORTED OPERATION CODES (SPC-4 6.35).
const (
	rsocAll       = 0
	rsocOpcode    = 1
	rsocOpcodeSA  = 2
	rsocOpcodeAny = 3
)

// timeoutsDescriptor is the 12-byte command timeouts descriptor (SPC-4 6.35.4).
func timeoutsDescriptor(d *opDesc) []byte {
	b := make([]byte, 12)
	binary.BigEndian.PutUint16(b[0:2], 0x0A)
	to := d.timeout
	if to == 0 {
		to = timeoutDefault
	}
	binary.BigEndian.PutUint32(b[4:8], to)
	binary.BigEndian.PutUint32(b[8:12], to)
	return b
}

func (lu *LogicalUnit) reportOpcodes(t *task) *CheckError {
	cdb := t.cdb
	rctd := cdb[2]&0x80 != 0
	opt := cdb[2] & 0x07
	reqOp := cdb[3]
	reqSA := binary.BigEndian.Uint16(cdb[4:6])
	alloc := int(binary.BigEndian.Uint32(cdb[6:10]))
	switch opt {
	case rsocAll:
		d := make([]byte, 4, 4+20*len(commands.all))
		for _, o := range commands.all {
			if !o.on(lu) {
				continue
			}
			var flags byte
			if o.hasSA {
				flags |= 0x01 // SERVACTV
			}
			if rctd {
				flags |= 0x02 // CTDP
			}
			d = append(d, o.op, 0, 0, o.sa, 0, flags, 0, o.cdbLen)
			if rctd {
				d = append(d, timeoutsDescriptor(o)...)
			}
		}
		binary.BigEndian.PutUint32(d[0:4], uint32(len(d)-4))
		t.dataIn(d, alloc)
		return nil
	case rsocOpcode, rsocOpcodeSA, rsocOpcodeAny:
	default:
		return InvalidCDBField(2, 2)
	}
	var o *opDesc
	switch {
	case opt == rsocOpcode && commands.hasSA[reqOp]:
		return InvalidCDBField(2, 2)
	case opt == rsocOpcodeSA && !commands.hasSA[reqOp]:
		return InvalidCDBField(2, 2)
	case commands.hasSA[reqOp]:
		if reqSA <= saMask {
			o = commands.find(reqOp, uint8(reqSA))
		}
	case opt == rsocOpcodeAny && reqSA != 0:
		// No service actions here, so none can be supported.
	default:
		o = commands.find(reqOp, 0)
	}
	if o != nil && !o.on(lu) {
		o = nil
	}
	d := make([]byte, 4, 4+16+12)
	if o == nil {
		d[1] = 0x01 // SUPPORT 001b: not supported
		t.dataIn(d, alloc)
		return nil
	}
	d[1] = 0x03 // SUPPORT 011b: supported as the standard says
	if rctd {
		d[1] |= 0x80
	}
	u := o.usageData(lu)
	binary.BigEndian.PutUint16(d[2:4], uint16(len(u)))
	d = append(d, u...)
	if rctd {
		d = append(d, timeoutsDescriptor(o)...)
	}
	t.dataIn(d, alloc)
	return nil
}

// Task management functions the iSCSI transport implements (SPC-4 6.36):
// ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET, TARGET RESET.
const (
	tmfSupported0 = 0x80 | 0x40 | 0x10 | 0x08 | 0x02
	tmfSupported1 = 0x00
)

func (lu *LogicalUnit) reportTMFs(t *task) *CheckError {
	cdb := t.cdb
	repd := cdb[2]&0x80 != 0
	alloc := int(binary.BigEndian.Uint32(cdb[6:10]))
	d := []byte{tmfSupported0, tmfSupported1, 0, 0}
	if repd {
		d = make([]byte, 16)
		d[0], d[1] = tmfSupported0, tmfSupported1
		d[3] = 0x0C // additional data length
	}
	t.dataIn(d, alloc)
	return nil
}

// Supported asymmetric access states: transitioning, unavailable, standby,
// active/non-optimized, active/optimized.
const tpgSupportedStates = 0x80 | 0x08 | 0x04 | 0x02 | 0x01

func (lu *LogicalUnit) reportTargetPortGroups(t *task) *CheckError {
	cdb := t.cdb
	format := cdb[1] >> 5
	alloc := int(binary.BigEndian.Uint32(cdb[6:10]))
	var hdr int
	switch format {
	case 0:
		hdr = 4
	case 1:
		hdr = 8
	default:
		return InvalidCDBField(1, 7)
	}
	pgs := *lu.pgs.Load()
	d := make([]byte, hdr, 64)
	if format == 1 {
		d[4] = 0x10 // FORMAT TYPE 001b
		d[5] = 0    // implicit transition time: immediate
	}
	for _, g := range pgs {
		var b [8]byte
		b[0] = byte(g.State) & 0x0F
		if g.Preferred {
			b[0] |= 0x80
		}
		b[1] = tpgSupportedStates
		binary.BigEndian.PutUint16(b[2:4], g.ID)
		b[7] = byte(len(g.RelativePortIDs))
		d = append(d, b[:]...)
		for _, p := range g.RelativePortIDs {
			d = append(d, 0, 0, byte(p>>8), byte(p))
		}
	}
	binary.BigEndian.PutUint32(d[0:4], uint32(len(d)-4))
	t.dataIn(d, alloc)
	return nil
}
