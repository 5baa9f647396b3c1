package scsi

import (
	"fmt"
	"slices"
)

// opFlags are per-command properties the common checks use.
type opFlags uint8

const (
	// fWrite: the command modifies the medium, so a read-only LU refuses it.
	fWrite opFlags = 1 << iota
	// fStandbyOK: allowed through a port group in standby, unavailable or
	// transitioning state (SPC-4 5.15.2.4.4).
	fStandbyOK
	// fNoConflict: never a reservation conflict (the reservation handler
	// decides for everything else).
	fNoConflict
)

// opDesc describes one supported command (or one service action of it). The
// same table drives dispatch and REPORT SUPPORTED OPERATION CODES.
type opDesc struct {
	op     byte
	sa     uint8
	hasSA  bool
	cdbLen uint8
	name   string
	// usage is the CDB USAGE DATA bitmap (SPC-4 6.35.3): which bits of each
	// CDB byte this implementation looks at. usageFn, when set, overrides it
	// for commands whose supported bits depend on the LU (thin or thick).
	usage   []byte
	usageFn func(lu *LogicalUnit) []byte
	flags   opFlags
	// rw, when set, makes dispatch decode and range-check LBA and length
	// before the handler runs.
	rw      *rwLayout
	handler func(lu *LogicalUnit, t *task) *CheckError
	// enabled reports whether this LU supports the command; nil means always.
	enabled func(lu *LogicalUnit) bool
	// timeout is the nominal command timeout in seconds for RCTD.
	timeout uint32
}

func (d *opDesc) on(lu *LogicalUnit) bool { return d.enabled == nil || d.enabled(lu) }

func (d *opDesc) usageData(lu *LogicalUnit) []byte {
	if d.usageFn != nil {
		return d.usageFn(lu)
	}
	return d.usage
}

// opTable indexes descriptors by opcode; opcodes with service actions keep
// one descriptor per service action.
type opTable struct {
	byOp  [256][]*opDesc
	hasSA [256]bool
	all   []*opDesc // sorted by opcode then service action
}

// Service action lives in byte 1 bits 4-0 for every opcode we support that
// has service actions.
const saMask = 0x1F

func thin(lu *LogicalUnit) bool  { return lu.cfg.Thin }
func hasPR(lu *LogicalUnit) bool { return lu.pr != nil }

// Opcodes.
const (
	opTestUnitReady      = 0x00
	opRead6              = 0x08
	opWrite6             = 0x0A
	opModeSelect6        = 0x15
	opReserve6           = 0x16
	opRelease6           = 0x17
	opModeSense6         = 0x1A
	opStartStopUnit      = 0x1B
	opPreventAllow       = 0x1E
	opReadCapacity10     = 0x25
	opRead10             = 0x28
	opWrite10            = 0x2A
	opWriteVerify10      = 0x2E
	opVerify10           = 0x2F
	opPrefetch10         = 0x34
	opSyncCache10        = 0x35
	opReadDefect10       = 0x37
	opWriteSame10        = 0x41
	opUnmap              = 0x42
	opModeSelect10       = 0x55
	opReserve10          = 0x56
	opRelease10          = 0x57
	opModeSense10        = 0x5A
	opPRIn               = 0x5E
	opPROut              = 0x5F
	opRead16             = 0x88
	opCompareAndWrite    = 0x89
	opWrite16            = 0x8A
	opOrWrite            = 0x8B
	opWriteVerify16      = 0x8E
	opVerify16           = 0x8F
	opPrefetch16         = 0x90
	opSyncCache16        = 0x91
	opWriteSame16        = 0x93
	opServiceActionIn16  = 0x9E
	opMaintenanceIn      = 0xA3
	opRead12             = 0xA8
	opWrite12            = 0xAA
	opWriteVerify12      = 0xAE
	opVerify12           = 0xAF
	opReadDefect12       = 0xB7
	saReadCapacity16     = 0x10
	saGetLBAStatus       = 0x12
	saReportTPGs         = 0x0A
	saReportOpcodes      = 0x0C
	saReportTMFs         = 0x0D
	timeoutDefault       = 30
	timeoutLong          = 60
	usageLBA4            = 0xFF
	usageDPOFUA          = 0x1A // DPO, FUA, FUA_NV
	usageDPOBytchk       = 0x16 // DPO, BYTCHK
	usageDPOWriteVerify  = 0x12 // DPO, BYTCHK (one bit)
	usageCompareDPOFUA   = 0x18
	usageWriteSame10Thin = 0x08 // UNMAP
	usageWriteSame16Thin = 0x09 // UNMAP, NDOB
)

// rw layouts shared by the block commands.
var (
	rw6  = &rwLayout{six: true, lbaOff: 1, lbaSize: 3, lenOff: 4, lenSize: 1}
	rw10 = &rwLayout{lbaOff: 2, lbaSize: 4, lenOff: 7, lenSize: 2, protect: true, dpoFua: true}
	rw12 = &rwLayout{lbaOff: 2, lbaSize: 4, lenOff: 6, lenSize: 4, protect: true, dpoFua: true}
	rw16 = &rwLayout{lbaOff: 2, lbaSize: 8, lenOff: 10, lenSize: 4, protect: true, dpoFua: true}

	verify10 = &rwLayout{lbaOff: 2, lbaSize: 4, lenOff: 7, lenSize: 2, protect: true, dpoFua: true, noLimit: true}
	verify12 = &rwLayout{lbaOff: 2, lbaSize: 4, lenOff: 6, lenSize: 4, protect: true, dpoFua: true, noLimit: true}
	verify16 = &rwLayout{lbaOff: 2, lbaSize: 8, lenOff: 10, lenSize: 4, protect: true, dpoFua: true, noLimit: true}

	nolimit10 = &rwLayout{lbaOff: 2, lbaSize: 4, lenOff: 7, lenSize: 2, noLimit: true}
	nolimit16 = &rwLayout{lbaOff: 2, lbaSize: 8, lenOff: 10, lenSize: 4, noLimit: true}

	ws10 = &rwLayout{lbaOff: 2, lbaSize: 4, lenOff: 7, lenSize: 2, protect: true, noLimit: true, toEnd: true}
	ws16 = &rwLayout{lbaOff: 2, lbaSize: 8, lenOff: 10, lenSize: 4, protect: true, noLimit: true, toEnd: true}

	caw = &rwLayout{lbaOff: 2, lbaSize: 8, lenOff: 13, lenSize: 1, protect: true, dpoFua: true, noLimit: true}
)

func usage10(op, b1 byte) []byte {
	return []byte{op, b1, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0xFF, 0xFF, 0x00}
}
func usage12(op, b1 byte) []byte {
	return []byte{op, b1, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00}
}
func usage16(op, b1 byte) []byte {
	return []byte{op, b1, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00}
}

// commands is the table every LU shares. It is built once, in init (handlers
// such as REPORT SUPPORTED OPERATION CODES read it back), and never modified
// afterwards.
var commands *opTable

func init() { commands = mustBuildOpTable(baseDescs(), prDescs()) }

func baseDescs() []*opDesc {
	return []*opDesc{
		{op: opTestUnitReady, cdbLen: 6, name: "TEST UNIT READY", usage: []byte{0x00, 0, 0, 0, 0, 0}, handler: (*LogicalUnit).testUnitReady},
		{op: opRequestSense, cdbLen: 6, name: "REQUEST SENSE", usage: []byte{0x03, 0x01, 0, 0, 0xFF, 0}, flags: fStandbyOK | fNoConflict, handler: (*LogicalUnit).requestSense},
		{op: opRead6, cdbLen: 6, name: "READ(6)", usage: []byte{0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0}, rw: rw6, handler: (*LogicalUnit).read},
		{op: opWrite6, cdbLen: 6, name: "WRITE(6)", usage: []byte{0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0}, rw: rw6, flags: fWrite, handler: (*LogicalUnit).write},
		{op: opInquiry, cdbLen: 6, name: "INQUIRY", usage: []byte{0x12, 0x01, 0xFF, 0xFF, 0xFF, 0}, flags: fStandbyOK | fNoConflict, handler: (*LogicalUnit).inquiry},
		{op: opModeSelect6, cdbLen: 6, name: "MODE SELECT(6)", usage: []byte{0x15, 0x11, 0, 0, 0xFF, 0}, flags: fStandbyOK, handler: (*LogicalUnit).modeSelect},
		{op: opReserve6, cdbLen: 6, name: "RESERVE(6)", usage: []byte{0x16, 0, 0, 0, 0, 0}, enabled: hasPR, handler: (*LogicalUnit).reserve},
		{op: opRelease6, cdbLen: 6, name: "RELEASE(6)", usage: []byte{0x17, 0, 0, 0, 0, 0}, enabled: hasPR, handler: (*LogicalUnit).release},
		{op: opModeSense6, cdbLen: 6, name: "MODE SENSE(6)", usage: []byte{0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0}, flags: fStandbyOK, handler: (*LogicalUnit).modeSense},
		{op: opStartStopUnit, cdbLen: 6, name: "START STOP UNIT", usage: []byte{0x1B, 0x01, 0, 0x0F, 0xF7, 0}, handler: (*LogicalUnit).startStopUnit},
		{op: opPreventAllow, cdbLen: 6, name: "PREVENT ALLOW MEDIUM REMOVAL", usage: []byte{0x1E, 0, 0, 0, 0x03, 0}, handler: (*LogicalUnit).preventAllow},
		{op: opReadCapacity10, cdbLen: 10, name: "READ CAPACITY(10)", usage: []byte{0x25, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, 0}, flags: fStandbyOK, handler: (*LogicalUnit).readCapacity10},
		{op: opRead10, cdbLen: 10, name: "READ(10)", usage: usage10(opRead10, usageDPOFUA), rw: rw10, handler: (*LogicalUnit).read},
		{op: opWrite10, cdbLen: 10, name: "WRITE(10)", usage: usage10(opWrite10, usageDPOFUA), rw: rw10, flags: fWrite, handler: (*LogicalUnit).write},
		{op: opWriteVerify10, cdbLen: 10, name: "WRITE AND VERIFY(10)", usage: usage10(opWriteVerify10, usageDPOWriteVerify), rw: rw10, flags: fWrite, handler: (*LogicalUnit).writeVerify},
		{op: opVerify10, cdbLen: 10, name: "VERIFY(10)", usage: usage10(opVerify10, usageDPOBytchk), rw: verify10, handler: (*LogicalUnit).verify},
		{op: opPrefetch10, cdbLen: 10, name: "PRE-FETCH(10)", usage: usage10(opPrefetch10, 0x02), rw: nolimit10, handler: (*LogicalUnit).prefetch},
		{op: opSyncCache10, cdbLen: 10, name: "SYNCHRONIZE CACHE(10)", usage: usage10(opSyncCache10, 0x02), rw: nolimit10, handler: (*LogicalUnit).syncCache, timeout: timeoutLong},
		{op: opReadDefect10, cdbLen: 10, name: "READ DEFECT DATA(10)", usage: []byte{0x37, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0}, handler: (*LogicalUnit).readDefectData},
		{op: opWriteSame10, cdbLen: 10, name: "WRITE SAME(10)", usageFn: func(lu *LogicalUnit) []byte {
			return usage10(opWriteSame10, wsUsage(lu, usageWriteSame10Thin))
		}, rw: ws10, flags: fWrite, handler: (*LogicalUnit).writeSame, timeout: timeoutLong},
		{op: opUnmap, cdbLen: 10, name: "UNMAP", usage: []byte{0x42, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0}, flags: fWrite, enabled: thin, handler: (*LogicalUnit).unmap, timeout: timeoutLong},
		{op: opModeSelect10, cdbLen: 10, name: "MODE SELECT(10)", usage: []byte{0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0}, flags: fStandbyOK, handler: (*LogicalUnit).modeSelect},
		{op: opReserve10, cdbLen: 10, name: "RESERVE(10)", usage: []byte{0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0}, enabled: hasPR, handler: (*LogicalUnit).reserve},
		{op: opRelease10, cdbLen: 10, name: "RELEASE(10)", usage: []byte{0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0}, enabled: hasPR, handler: (*LogicalUnit).release},
		{op: opModeSense10, cdbLen: 10, name: "MODE SENSE(10)", usage: []byte{0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0}, flags: fStandbyOK, handler: (*LogicalUnit).modeSense},
		{op: opRead16, cdbLen: 16, name: "READ(16)", usage: usage16(opRead16, usageDPOFUA), rw: rw16, handler: (*LogicalUnit).read},
		{op: opCompareAndWrite, cdbLen: 16, name: "COMPARE AND WRITE", usage: []byte{0x89, usageCompareDPOFUA, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0, 0}, rw: caw, flags: fWrite, handler: (*LogicalUnit).compareAndWrite},
		{op: opWrite16, cdbLen: 16, name: "WRITE(16)", usage: usage16(opWrite16, usageDPOFUA), rw: rw16, flags: fWrite, handler: (*LogicalUnit).write},
		{op: opOrWrite, cdbLen: 16, name: "ORWRITE(16)", usage: usage16(opOrWrite, usageCompareDPOFUA), rw: rw16, flags: fWrite, handler: (*LogicalUnit).orWrite},
		{op: opWriteVerify16, cdbLen: 16, name: "WRITE AND VERIFY(16)", usage: usage16(opWriteVerify16, usageDPOWriteVerify), rw: rw16, flags: fWrite, handler: (*LogicalUnit).writeVerify},
		{op: opVerify16, cdbLen: 16, name: "VERIFY(16)", usage: usage16(opVerify16, usageDPOBytchk), rw: verify16, handler: (*LogicalUnit).verify},
		{op: opPrefetch16, cdbLen: 16, name: "PRE-FETCH(16)", usage: usage16(opPrefetch16, 0x02), rw: nolimit16, handler: (*LogicalUnit).prefetch},
		{op: opSyncCache16, cdbLen: 16, name: "SYNCHRONIZE CACHE(16)", usage: usage16(opSyncCache16, 0x02), rw: nolimit16, handler: (*LogicalUnit).syncCache, timeout: timeoutLong},
		{op: opWriteSame16, cdbLen: 16, name: "WRITE SAME(16)", usageFn: func(lu *LogicalUnit) []byte {
			return usage16(opWriteSame16, wsUsage(lu, usageWriteSame16Thin)|0x01)
		}, rw: ws16, flags: fWrite, handler: (*LogicalUnit).writeSame, timeout: timeoutLong},
		{op: opServiceActionIn16, sa: saReadCapacity16, hasSA: true, cdbLen: 16, name: "READ CAPACITY(16)", usage: []byte{0x9E, saReadCapacity16, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0}, flags: fStandbyOK, handler: (*LogicalUnit).readCapacity16},
		{op: opServiceActionIn16, sa: saGetLBAStatus, hasSA: true, cdbLen: 16, name: "GET LBA STATUS", usage: []byte{0x9E, saGetLBAStatus, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0}, enabled: thin, handler: (*LogicalUnit).getLBAStatus},
		{op: opReportLUNs, cdbLen: 12, name: "REPORT LUNS", usage: []byte{0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0}, flags: fStandbyOK | fNoConflict, handler: (*LogicalUnit).reportLUNs},
		{op: opMaintenanceIn, sa: saReportTPGs, hasSA: true, cdbLen: 12, name: "REPORT TARGET PORT GROUPS", usage: []byte{0xA3, 0xE0 | saReportTPGs, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0}, flags: fStandbyOK, handler: (*LogicalUnit).reportTargetPortGroups},
		{op: opMaintenanceIn, sa: saReportOpcodes, hasSA: true, cdbLen: 12, name: "REPORT SUPPORTED OPERATION CODES", usage: []byte{0xA3, saReportOpcodes, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0}, flags: fStandbyOK, handler: (*LogicalUnit).reportOpcodes},
		{op: opMaintenanceIn, sa: saReportTMFs, hasSA: true, cdbLen: 12, name: "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS", usage: []byte{0xA3, saReportTMFs, 0x80, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0}, flags: fStandbyOK, handler: (*LogicalUnit).reportTMFs},
		{op: opRead12, cdbLen: 12, name: "READ(12)", usage: usage12(opRead12, usageDPOFUA), rw: rw12, handler: (*LogicalUnit).read},
		{op: opWrite12, cdbLen: 12, name: "WRITE(12)", usage: usage12(opWrite12, usageDPOFUA), rw: rw12, flags: fWrite, handler: (*LogicalUnit).write},
		{op: opWriteVerify12, cdbLen: 12, name: "WRITE AND VERIFY(12)", usage: usage12(opWriteVerify12, usageDPOWriteVerify), rw: rw12, flags: fWrite, handler: (*LogicalUnit).writeVerify},
		{op: opVerify12, cdbLen: 12, name: "VERIFY(12)", usage: usage12(opVerify12, usageDPOBytchk), rw: verify12, handler: (*LogicalUnit).verify},
		{op: opReadDefect12, cdbLen: 12, name: "READ DEFECT DATA(12)", usage: []byte{0xB7, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0}, handler: (*LogicalUnit).readDefectData},
	}
}

// prDescs lists the persistent reservation service actions, which the
// reservation handler implements.
func prDescs() []*opDesc {
	var out []*opDesc
	inNames := []string{"READ KEYS", "READ RESERVATION", "REPORT CAPABILITIES", "READ FULL STATUS"}
	for sa, n := range inNames {
		out = append(out, &opDesc{op: opPRIn, sa: uint8(sa), hasSA: true, cdbLen: 10, name: "PERSISTENT RESERVE IN " + n,
			usage: []byte{opPRIn, uint8(sa), 0, 0, 0, 0, 0, 0xFF, 0xFF, 0}, flags: fStandbyOK, enabled: hasPR, handler: (*LogicalUnit).prIn})
	}
	outNames := []string{"REGISTER", "RESERVE", "RELEASE", "CLEAR", "PREEMPT", "PREEMPT AND ABORT", "REGISTER AND IGNORE EXISTING KEY", "REGISTER AND MOVE"}
	for sa, n := range outNames {
		out = append(out, &opDesc{op: opPROut, sa: uint8(sa), hasSA: true, cdbLen: 10, name: "PERSISTENT RESERVE OUT " + n,
			usage: []byte{opPROut, uint8(sa), 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0}, flags: fStandbyOK, enabled: hasPR, handler: (*LogicalUnit).prOut})
	}
	return out
}

func wsUsage(lu *LogicalUnit, thinBits byte) byte {
	if lu.cfg.Thin {
		return thinBits
	}
	return 0
}

// mustBuildOpTable indexes descs and panics on a duplicate or inconsistent
// entry: a table bug must stop the program at start-up, not misroute a CDB.
func mustBuildOpTable(lists ...[]*opDesc) *opTable {
	t := &opTable{}
	for _, list := range lists {
		for _, d := range list {
			if d.handler == nil || d.cdbLen == 0 {
				panic(fmt.Sprintf("scsi: opcode %#02x: missing handler or CDB length", d.op))
			}
			u := d.usage
			if d.usageFn == nil && (len(u) != int(d.cdbLen) || u[0] != d.op) {
				panic(fmt.Sprintf("scsi: opcode %#02x: usage data does not match the CDB", d.op))
			}
			if len(t.byOp[d.op]) > 0 && t.hasSA[d.op] != d.hasSA {
				panic(fmt.Sprintf("scsi: opcode %#02x: mixes service-action and plain entries", d.op))
			}
			for _, o := range t.byOp[d.op] {
				if !d.hasSA || o.sa == d.sa {
					panic(fmt.Sprintf("scsi: duplicate opcode %#02x service action %#02x", d.op, d.sa))
				}
			}
			t.hasSA[d.op] = d.hasSA
			t.byOp[d.op] = append(t.byOp[d.op], d)
			t.all = append(t.all, d)
		}
	}
	slices.SortFunc(t.all, func(a, b *opDesc) int {
		if a.op != b.op {
			return int(a.op) - int(b.op)
		}
		return int(a.sa) - int(b.sa)
	})
	return t
}

// find returns the descriptor for op/sa regardless of whether it is enabled.
func (t *opTable) find(op byte, sa uint8) *opDesc {
	for _, d := range t.byOp[op] {
		if !d.hasSA || d.sa == sa {
			return d
		}
	}
	return nil
}

// lookupOp finds the enabled descriptor for cdb. An unknown service action
// is INVALID FIELD IN CDB pointing at the service action field (SPC-4 says
// so, and initiators read that pointer as "not implemented").
func lookupOp(lu *LogicalUnit, cdb []byte) (*opDesc, *CheckError) {
	op := cdb[0]
	if !commands.hasSA[op] {
		for _, d := range commands.byOp[op] {
			if d.on(lu) {
				return d, nil
			}
		}
		return nil, Check(ReasonInvalidOpcode)
	}
	if len(cdb) < 2 {
		return nil, InvalidCDBField(1, 4)
	}
	d := commands.find(op, cdb[1]&saMask)
	if d == nil || !d.on(lu) {
		return nil, InvalidCDBField(1, 4)
	}
	return d, nil
}
