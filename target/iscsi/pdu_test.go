package iscsi

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

func samplePDU(dataLen int) *PDU {
	p := &PDU{}
	p.BHS.SetOpcode(OpSCSICmd, true)
	p.BHS.SetFlags(FlagFinal | FlagWrite | 1)
	p.BHS.SetLUN([8]byte{0, 3})
	p.BHS.SetITT(0x11223344)
	p.BHS.SetExpectedDataTransferLength(4096)
	p.BHS.SetCmdSN(7)
	p.BHS.SetExpStatSN(9)
	copy(p.BHS.CDB(), []byte{0x2a, 0, 0, 0, 0, 1, 0, 0, 8, 0})
	for i := 0; i < dataLen; i++ {
		p.Data = append(p.Data, byte(i*7))
	}
	return p
}

func TestPDURoundTrip(t *testing.T) {
	for _, dl := range []int{0, 1, 3, 4, 5, 4096, 4097} {
		for _, hd := range []bool{false, true} {
			for _, dd := range []bool{false, true} {
				in := samplePDU(dl)
				wire := AppendPDU(nil, in, hd, dd)
				want := BHSLen + dl + int(pad4(uint32(dl)))
				if hd {
					want += 4
				}
				if dd && dl > 0 {
					want += 4
				}
				if len(wire) != want {
					t.Fatalf("dl=%d hd=%v dd=%v: wire len %d, want %d", dl, hd, dd, len(wire), want)
				}
				r := Reader{R: bytes.NewReader(wire), HeaderDigest: hd, DataDigest: dd}
				var out PDU
				if err := r.ReadPDU(&out); err != nil {
					t.Fatalf("dl=%d hd=%v dd=%v: %v", dl, hd, dd, err)
				}
				if out.BHS != in.BHS || !bytes.Equal(out.Data, in.Data) {
					t.Fatalf("dl=%d: round trip mismatch", dl)
				}
				if out.BHS.ITT() != 0x11223344 || out.BHS.CmdSN() != 7 || !out.BHS.Immediate() ||
					out.BHS.Opcode() != OpSCSICmd || out.BHS.TaskAttr() != 1 || out.BHS.DataSegmentLength() != uint32(dl) {
					t.Fatalf("accessors wrong: %+v", out.BHS)
				}
			}
		}
	}
}

func TestDigestErrors(t *testing.T) {
	wire := AppendPDU(nil, samplePDU(10), true, true)
	bad := append([]byte(nil), wire...)
	bad[20] ^= 1 // header corrupted
	r := Reader{R: bytes.NewReader(bad), HeaderDigest: true, DataDigest: true}
	var p PDU
	if err := r.ReadPDU(&p); !errors.Is(err, ErrHeaderDigest) {
		t.Fatalf("header corruption: got %v", err)
	}
	bad = append([]byte(nil), wire...)
	bad[BHSLen+4+2] ^= 1 // data corrupted
	two := append(bad, AppendPDU(nil, samplePDU(0), true, true)...)
	r = Reader{R: bytes.NewReader(two), HeaderDigest: true, DataDigest: true}
	if err := r.ReadPDU(&p); !errors.Is(err, ErrDataDigest) {
		t.Fatalf("data corruption: got %v", err)
	}
	// The stream stays in sync after a data digest error.
	if err := r.ReadPDU(&p); err != nil || p.BHS.ITT() != 0x11223344 {
		t.Fatalf("after data digest error: %v", err)
	}
}

func TestDataSegmentLimit(t *testing.T) {
	wire := AppendPDU(nil, samplePDU(1000), false, false)
	r := Reader{R: bytes.NewReader(wire), MaxDataSegment: 512}
	var p PDU
	if err := r.ReadPDU(&p); !errors.Is(err, ErrDataSegmentLimit) {
		t.Fatalf("got %v, want ErrDataSegmentLimit", err)
	}
}

func TestTruncatedStream(t *testing.T) {
	wire := AppendPDU(nil, samplePDU(100), true, true)
	for cut := 1; cut < len(wire); cut += 7 {
		r := Reader{R: bytes.NewReader(wire[:cut]), HeaderDigest: true, DataDigest: true}
		var p PDU
		if err := r.ReadPDU(&p); err == nil {
			t.Fatalf("cut at %d: no error", cut)
		} else if cut > 0 && errors.Is(err, io.EOF) && cut >= BHSLen {
			t.Fatalf("cut at %d: plain EOF mid-PDU", cut)
		}
	}
}

func TestHeaderTrailerSplitMatchesAppendPDU(t *testing.T) {
	p := samplePDU(5001)
	whole := AppendPDU(nil, p, true, true)
	split := AppendHeader(nil, &p.BHS, nil, uint32(len(p.Data)), true)
	split = append(split, p.Data...)
	split = AppendTrailer(split, p.Data, true)
	if !bytes.Equal(whole, split) {
		t.Fatal("AppendHeader+payload+AppendTrailer differs from AppendPDU")
	}
}

func TestExtendedCDB(t *testing.T) {
	var h BHS
	for i := range h.CDB() {
		h.CDB()[i] = byte(i)
	}
	ahs := []byte{0, 17, 1, 0}
	for i := 0; i < 16; i++ {
		ahs = append(ahs, byte(16+i))
	}
	cdb, err := ExtendedCDB(&h, ahs)
	if err != nil || len(cdb) != 32 || cdb[31] != 31 {
		t.Fatalf("cdb %v err %v", cdb, err)
	}
	if _, err := ExtendedCDB(&h, []byte{0, 200, 1, 0}); err == nil {
		t.Fatal("oversized AHS accepted")
	}
}

func TestLoginFields(t *testing.T) {
	var h BHS
	h.SetOpcode(OpLoginReq, true)
	h.SetLoginStages(true, false, StageOperational, StageFullFeature)
	h.SetISID([6]byte{0x80, 1, 2, 3, 4, 5})
	h.SetTSIH(0x1234)
	if !h.Transit() || h.Continue() || h.CSG() != 1 || h.NSG() != 3 || h.TSIH() != 0x1234 || h.ISID()[0] != 0x80 {
		t.Fatalf("login fields wrong: %x", h[:16])
	}
}
