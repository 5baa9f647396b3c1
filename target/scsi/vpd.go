package scsi

import (
	"encoding/binary"
	"encoding/hex"
)

// vpdPage is one Vital Product Data page. build returns the whole page with
// room for the 4-byte header, which inquiry fills in.
type vpdPage struct {
	code    byte
	build   func(lu *LogicalUnit, n *ITNexus) []byte
	enabled func(lu *LogicalUnit) bool
}

func (p *vpdPage) on(lu *LogicalUnit) bool { return p.enabled == nil || p.enabled(lu) }

// vpdPages is sorted by page code: VPD 0x00 lists them in this order, and
// SPC-4 wants it ascending.
var vpdPages = []vpdPage{
	{code: 0x00}, // build set in init: it lists this table
	{code: 0x80, build: vpdSerial},
	{code: 0x83, build: vpdDeviceID},
	{code: 0xB0, build: vpdBlockLimits},
	{code: 0xB1, build: vpdBlockCharacteristics},
	{code: 0xB2, build: vpdProvisioning},
}

func init() { vpdPages[0].build = vpdSupportedPages }

func vpdPageFor(code byte) *vpdPage {
	for i := range vpdPages {
		if vpdPages[i].code == code {
			return &vpdPages[i]
		}
	}
	return nil
}

func vpdSupportedPages(lu *LogicalUnit, _ *ITNexus) []byte {
	d := make([]byte, 4, 4+len(vpdPages))
	for i := range vpdPages {
		if vpdPages[i].on(lu) {
			d = append(d, vpdPages[i].code)
		}
	}
	return d
}

// serialNumber is the unit serial number: the volume UUID in hex, so it is
// the same on every node and unique per volume.
func (lu *LogicalUnit) serialNumber() string { return hex.EncodeToString(lu.cfg.VolumeID[:]) }

func vpdSerial(lu *LogicalUnit, _ *ITNexus) []byte {
	return append(make([]byte, 4), lu.serialNumber()...)
}

// naaOUI is the company ID in our NAA designators. 0x1A has the X bit (bit 1
// of the first octet) set, which puts it in the IEEE CID space that is never
// handed out as an OUI, so it cannot collide with a registered vendor's NAA.
const naaOUI = 0x1A5A4E

// naaDesignator builds the NAA IEEE Registered Extended (type 6) designator
// from the volume UUID alone: 4 bits NAA, 24 bits company ID, then the first
// 100 bits of the UUID.
func naaDesignator(id [16]byte) [16]byte {
	var d [16]byte
	oui := uint32(naaOUI)
	d[0] = 0x60 | byte(oui>>20)
	d[1] = byte(oui >> 12)
	d[2] = byte(oui >> 4)
	d[3] = byte(oui<<4) | id[0]>>4
	for i := 4; i < 16; i++ {
		d[i] = id[i-4]<<4 | id[i-3]>>4
	}
	return d
}

// Designator header bytes (SPC-4 7.8.6.1).
const (
	codeSetBinary = 0x1
	codeSetASCII  = 0x2
	codeSetUTF8   = 0x3
	protoISCSI    = 0x5 << 4
	piv           = 0x80
	assocLU       = 0x00
	assocPort     = 0x10
	assocTarget   = 0x20
	desigT10      = 0x1
	desigNAA      = 0x3
	desigRelPort  = 0x4
	desigTPG      = 0x5
	desigName     = 0x8
)

func appendDesignator(d []byte, b0, b1 byte, id []byte) []byte {
	d = append(d, b0, b1, 0, byte(len(id)))
	return append(d, id...)
}

// scsiNameString pads an SCSI name string to a multiple of four bytes with at
// least one NUL (SPC-4 7.8.6.11).
func scsiNameString(s string) []byte {
	n := (len(s) + 4) &^ 3
	b := make([]byte, n)
	copy(b, s)
	return b
}

func vpdDeviceID(lu *LogicalUnit, n *ITNexus) []byte {
	d := make([]byte, 4, 128)
	naa := naaDesignator(lu.cfg.VolumeID)
	d = appendDesignator(d, codeSetBinary, assocLU|desigNAA, naa[:])
	t10 := make([]byte, 8, 8+32)
	padASCII(t10, lu.cfg.Vendor)
	t10 = append(t10, lu.serialNumber()...)
	d = appendDesignator(d, codeSetASCII, assocLU|desigT10, t10)
	var rel [4]byte
	binary.BigEndian.PutUint16(rel[2:], n.RelativePortID)
	d = appendDesignator(d, protoISCSI|codeSetBinary, piv|assocPort|desigRelPort, rel[:])
	var tpg [4]byte
	binary.BigEndian.PutUint16(tpg[2:], lu.portGroupFor(n).ID)
	d = appendDesignator(d, protoISCSI|codeSetBinary, piv|assocPort|desigTPG, tpg[:])
	if n.TargetName != "" {
		d = appendDesignator(d, protoISCSI|codeSetUTF8, piv|assocPort|desigName, scsiNameString(n.TargetPortName()))
		d = appendDesignator(d, protoISCSI|codeSetUTF8, piv|assocTarget|desigName, scsiNameString(n.TargetName))
	}
	return d
}

func vpdBlockLimits(lu *LogicalUnit, _ *ITNexus) []byte {
	d := make([]byte, 64)
	d[5] = maxCompareBlocks
	perPhys := uint16(4096 >> lu.bsShift)
	binary.BigEndian.PutUint16(d[6:8], perPhys) // optimal transfer length granularity
	binary.BigEndian.PutUint32(d[8:12], maxTransferBytes>>lu.bsShift)
	binary.BigEndian.PutUint32(d[12:16], optimalXferBytes>>lu.bsShift)
	if lu.cfg.Thin {
		binary.BigEndian.PutUint32(d[20:24], maxUnmapBlocks)
		binary.BigEndian.PutUint32(d[24:28], maxUnmapDescs)
		binary.BigEndian.PutUint32(d[28:32], uint32(perPhys))
	}
	binary.BigEndian.PutUint64(d[36:44], maxWriteSameBlocks)
	return d
}

func vpdBlockCharacteristics(lu *LogicalUnit, _ *ITNexus) []byte {
	d := make([]byte, 64)
	binary.BigEndian.PutUint16(d[4:6], 1) // non-rotating medium
	return d
}

func vpdProvisioning(lu *LogicalUnit, _ *ITNexus) []byte {
	d := make([]byte, 8)
	if lu.cfg.Thin {
		// LBPU, LBPWS, LBPWS10, LBPRZ=001b; no ANC_SUP; provisioning type thin.
		d[5] = 0x80 | 0x40 | 0x20 | 0x04
		d[6] = 0x02
	}
	return d
}
