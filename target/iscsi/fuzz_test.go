package iscsi

import (
	"bytes"
	"testing"
)

// FuzzDecodePDU feeds arbitrary bytes to the reader: it must never panic,
// and whatever decodes must re-encode to the same bytes.
func FuzzDecodePDU(f *testing.F) {
	f.Add(AppendPDU(nil, samplePDU(0), false, false), false, false)
	f.Add(AppendPDU(nil, samplePDU(13), true, true), true, true)
	f.Add(AppendPDU(nil, samplePDU(512), false, true), false, true)
	ext := samplePDU(4)
	ext.AHS = []byte{0, 5, 1, 0, 1, 2, 3, 4}
	f.Add(AppendPDU(nil, ext, true, false), true, false)
	f.Add(bytes.Repeat([]byte{0xff}, 100), false, false)
	f.Fuzz(func(t *testing.T, in []byte, hd, dd bool) {
		r := Reader{R: bytes.NewReader(in), HeaderDigest: hd, DataDigest: dd, MaxDataSegment: 1 << 16}
		var p PDU
		for i := 0; i < 4; i++ {
			if err := r.ReadPDU(&p); err != nil {
				return
			}
			ahs := append([]byte(nil), p.AHS...)
			out := AppendPDU(nil, &PDU{BHS: p.BHS, AHS: ahs, Data: p.Data}, hd, dd)
			r2 := Reader{R: bytes.NewReader(out), HeaderDigest: hd, DataDigest: dd}
			var q PDU
			if err := r2.ReadPDU(&q); err != nil {
				t.Fatalf("re-encoded PDU does not decode: %v", err)
			}
			if q.BHS != p.BHS || !bytes.Equal(q.Data, p.Data) || !bytes.Equal(q.AHS, ahs) {
				t.Fatal("round trip changed the PDU")
			}
			if p.BHS.Opcode() == OpSCSICmd {
				_, _ = ExtendedCDB(&p.BHS, ahs)
			}
		}
	})
}

// FuzzTextKeys: parsing never panics, and parsed pairs re-encode and
// re-parse to the same pairs.
func FuzzTextKeys(f *testing.F) {
	f.Add([]byte("InitiatorName=iqn.2000-01.x:y\x00SessionType=Normal\x00"))
	f.Add([]byte("a=\x00\x00b=c"))
	f.Add([]byte("=\x00"))
	f.Fuzz(func(t *testing.T, in []byte) {
		kvs, err := ParseText(in)
		if err != nil {
			return
		}
		again, err := ParseText(AppendText(nil, kvs))
		if err != nil {
			t.Fatalf("re-encoded text does not parse: %v", err)
		}
		if len(again) != len(kvs) {
			t.Fatalf("round trip %d pairs -> %d", len(kvs), len(again))
		}
		for i := range kvs {
			if kvs[i] != again[i] {
				t.Fatalf("pair %d changed: %v -> %v", i, kvs[i], again[i])
			}
		}
	})
}

// FuzzNegotiate drives a negotiator with arbitrary text in every stage:
// no panics, answers only for keys that were offered (plus our own
// declaration), and the resulting parameters stay inside the protocol
// bounds and our settings.
func FuzzNegotiate(f *testing.F) {
	f.Add([]byte("MaxBurstLength=4096\x00FirstBurstLength=0x100000\x00InitialR2T=No\x00"), uint8(1), []byte("HeaderDigest=CRC32C,None\x00"))
	f.Add([]byte("SessionType=Discovery\x00MaxRecvDataSegmentLength=512\x00"), uint8(0), []byte("AuthMethod=None\x00"))
	f.Add([]byte("CHAP_A=5\x00"), uint8(3), []byte("SendTargets=All\x00"))
	f.Fuzz(func(t *testing.T, a []byte, stage uint8, b []byte) {
		s := DefaultSettings()
		n := NewNegotiator(s)
		stage %= 4
		for i, in := range [][]byte{a, b} {
			kvs, err := ParseText(in)
			if err != nil {
				continue
			}
			if i == 1 && stage == StageFullFeature {
				n.ResetForText()
			}
			resp, _, _, err := n.Step(kvs, stage)
			if err != nil {
				continue
			}
			offered := map[string]bool{"MaxRecvDataSegmentLength": true}
			for _, kv := range kvs {
				offered[kv.Key] = true
			}
			for _, kv := range resp {
				if !offered[kv.Key] {
					t.Fatalf("answered %s which was not offered", kv.Key)
				}
			}
		}
		n.Finish()
		p := n.Params
		if p.MaxBurstLength < MinDataSegment || p.MaxBurstLength > s.MaxBurstLength ||
			p.FirstBurstLength > s.FirstBurstLength || p.MaxXmitDataSegmentLength < MinDataSegment ||
			p.MaxXmitDataSegmentLength > MaxDataSegmentV || p.MaxOutstandingR2T < 1 ||
			p.MaxOutstandingR2T > s.MaxOutstandingR2T || p.ErrorRecoveryLevel != 0 || p.MaxConnections != 1 ||
			!p.DataPDUInOrder || !p.DataSequenceInOrder {
			t.Fatalf("params out of bounds: %+v", p)
		}
	})
}

// FuzzCHAP feeds arbitrary second-step keys to a CHAP exchange: it must
// never panic nor authenticate without the secret.
func FuzzCHAP(f *testing.F) {
	f.Add("alice", "0x00112233445566778899aabbccddeeff", "1", "0b AAAA")
	f.Add("alice", "0b"+"ABEiM0RVZneImaq7zN3u/w==", "", "")
	f.Fuzz(func(t *testing.T, name, r, i, c string) {
		a := &CHAPAuth{User: "alice", Secret: "0123456789ab", MutualUser: "t", MutualSecret: "ba9876543210",
			Rand: bytes.NewReader(bytes.Repeat([]byte{7}, 64))}
		if _, _, err := a.Step([]KV{{"CHAP_A", "5"}}); err != nil {
			t.Fatal(err)
		}
		kvs := []KV{{"CHAP_N", name}, {"CHAP_R", r}}
		if i != "" || c != "" {
			kvs = append(kvs, KV{"CHAP_I", i}, KV{"CHAP_C", c})
		}
		if _, done, err := a.Step(kvs); done && err == nil {
			want := CHAPResponse(7, "0123456789ab", bytes.Repeat([]byte{7}, challengeLen))
			got, _, _ := DecodeCHAPBinary(r)
			if !bytes.Equal(got, want) {
				t.Fatalf("authenticated with a wrong response %q", r)
			}
		}
	})
}
