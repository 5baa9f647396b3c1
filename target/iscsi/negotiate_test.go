package iscsi

import (
	"errors"
	"testing"
)

func answers(kvs []KV) map[string]string {
	m := map[string]string{}
	for _, kv := range kvs {
		m[kv.Key] = kv.Value
	}
	return m
}

func TestNegotiateOperational(t *testing.T) {
	n := NewNegotiator(DefaultSettings())
	resp, _, _, err := n.Step([]KV{
		{"InitiatorName", "iqn.1994-05.com.redhat:x"}, {"SessionType", "Normal"}, {"TargetName", "iqn.2026-01.t:x"},
		{"HeaderDigest", "CRC32C,None"}, {"DataDigest", "None"},
		{"MaxConnections", "4"}, {"InitialR2T", "No"}, {"ImmediateData", "Yes"},
		{"MaxRecvDataSegmentLength", "131072"}, {"MaxBurstLength", "8388608"}, {"FirstBurstLength", "1048576"},
		{"DefaultTime2Wait", "0"}, {"DefaultTime2Retain", "60"}, {"MaxOutstandingR2T", "64"},
		{"DataPDUInOrder", "No"}, {"DataSequenceInOrder", "Yes"}, {"ErrorRecoveryLevel", "2"},
		{"IFMarker", "No"}, {"OFMarker", "Yes"}, {"OFMarkInt", "2048~8192"},
		{"X-com.example.thing", "1"}, {"Bogus", "1"}, {"iSCSIProtocolLevel", "2"},
	}, StageOperational)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"HeaderDigest": "CRC32C", "DataDigest": "None", "MaxConnections": "1", "InitialR2T": "No",
		"ImmediateData": "Yes", "MaxBurstLength": "8388608", "FirstBurstLength": "1048576",
		"DefaultTime2Wait": "0", "DefaultTime2Retain": "0", "MaxOutstandingR2T": "16",
		"DataPDUInOrder": "Yes", "DataSequenceInOrder": "Yes", "ErrorRecoveryLevel": "0",
		"IFMarker": "No", "OFMarker": "No", "OFMarkInt": "Irrelevant",
		"X-com.example.thing": "NotUnderstood", "Bogus": "NotUnderstood", "iSCSIProtocolLevel": "1",
		"MaxRecvDataSegmentLength": "262144",
	}
	got := answers(resp)
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %q, want %q", k, got[k], v)
		}
	}
	for _, k := range []string{"InitiatorName", "TargetName", "SessionType"} {
		if _, ok := got[k]; ok {
			t.Errorf("declarative %s answered", k)
		}
	}
	n.Finish()
	p := n.Params
	if !p.HeaderDigest || p.DataDigest || p.MaxXmitDataSegmentLength != 131072 || p.MaxRecvDataSegmentLength != 262144 ||
		p.MaxBurstLength != 8388608 || p.FirstBurstLength != 1048576 || p.InitialR2T || !p.ImmediateData ||
		p.MaxOutstandingR2T != 16 || p.ErrorRecoveryLevel != 0 || !p.DataPDUInOrder {
		t.Fatalf("params %+v", p)
	}
}

func TestNegotiateBoundsAndPreferences(t *testing.T) {
	s := DefaultSettings()
	s.InitialR2T, s.ImmediateData, s.DisableDigests = true, false, true
	s.FirstBurstLength = 65536
	n := NewNegotiator(s)
	resp, _, _, err := n.Step([]KV{
		{"MaxBurstLength", "100"}, {"FirstBurstLength", "0x20000"}, {"InitialR2T", "No"},
		{"ImmediateData", "Yes"}, {"HeaderDigest", "CRC32C"}, {"MaxOutstandingR2T", "zz"}, {"DataDigest", "None,CRC32C"},
		{"TargetAlias", "x"}, {"MaxRecvDataSegmentLength", "100"},
	}, StageOperational)
	if err != nil {
		t.Fatal(err)
	}
	got := answers(resp)
	want := map[string]string{"MaxBurstLength": "Reject", "FirstBurstLength": "65536", "InitialR2T": "Yes",
		"ImmediateData": "No", "HeaderDigest": "Reject", "MaxOutstandingR2T": "Reject", "DataDigest": "None",
		"TargetAlias": "Reject"}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %q, want %q", k, got[k], v)
		}
	}
	if n.Params.MaxBurstLength != DefaultMaxBurst || n.Params.MaxXmitDataSegmentLength != DefaultMRDSL {
		t.Fatalf("rejected values changed params: %+v", n.Params)
	}
}

func TestNegotiateRepeatedKey(t *testing.T) {
	n := NewNegotiator(DefaultSettings())
	if _, _, _, err := n.Step([]KV{{"MaxBurstLength", "4096"}}, StageOperational); err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := n.Step([]KV{{"MaxBurstLength", "8192"}}, StageOperational); !errors.Is(err, ErrKeyRepeated) {
		t.Fatalf("repeat: %v", err)
	}
	// Same-valued identity redeclaration is tolerated, a change is not.
	n = NewNegotiator(DefaultSettings())
	n.Step([]KV{{"InitiatorName", "iqn.2000-01.a:b"}}, StageSecurity)
	if _, _, _, err := n.Step([]KV{{"InitiatorName", "iqn.2000-01.a:b"}}, StageSecurity); err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := n.Step([]KV{{"InitiatorName", "iqn.2000-01.a:c"}}, StageSecurity); !errors.Is(err, ErrKeyRepeated) {
		t.Fatalf("redeclare: %v", err)
	}
}

func TestNegotiateDiscoveryIrrelevant(t *testing.T) {
	n := NewNegotiator(DefaultSettings())
	resp, _, _, err := n.Step([]KV{{"MaxBurstLength", "4096"}, {"SessionType", "Discovery"}, {"HeaderDigest", "None"}}, StageOperational)
	if err != nil {
		t.Fatal(err)
	}
	got := answers(resp)
	if got["MaxBurstLength"] != "Irrelevant" || got["HeaderDigest"] != "None" || !n.Discovery() {
		t.Fatalf("discovery answers %v", got)
	}
}

func TestNegotiateSecurityKeys(t *testing.T) {
	n := NewNegotiator(DefaultSettings())
	_, sec, _, err := n.Step([]KV{{"AuthMethod", "CHAP,None"}, {"CHAP_A", "5"}}, StageSecurity)
	if err != nil || len(sec) != 2 {
		t.Fatalf("sec %v err %v", sec, err)
	}
	if _, _, _, err := n.Step([]KV{{"CHAP_N", "x"}}, StageOperational); err == nil {
		t.Fatal("security key accepted in operational stage")
	}
}

func TestNegotiateFullFeatureText(t *testing.T) {
	n := NewNegotiator(DefaultSettings())
	n.Step([]KV{{"MaxRecvDataSegmentLength", "8192"}}, StageOperational)
	n.ResetForText()
	resp, _, st, err := n.Step([]KV{{"SendTargets", "All"}, {"MaxBurstLength", "512"}, {"MaxRecvDataSegmentLength", "65536"}}, StageFullFeature)
	if err != nil {
		t.Fatal(err)
	}
	if st == nil || st.Value != "All" {
		t.Fatalf("SendTargets not surfaced: %v", st)
	}
	if answers(resp)["MaxBurstLength"] != "Reject" || n.Params.MaxXmitDataSegmentLength != 65536 {
		t.Fatalf("resp %v params %+v", resp, n.Params)
	}
}

// TestNegotiateDefaultTime2WaitFollowsInitiator: the result function is
// Maximum and our own value is 0, so the initiator's offer stands: stock
// open-iscsi (2) keeps its 2 s, one configured with 0 reconnects at once.
func TestNegotiateDefaultTime2WaitFollowsInitiator(t *testing.T) {
	for _, offer := range []string{"0", "2", "5"} {
		n := NewNegotiator(DefaultSettings())
		resp, _, _, err := n.Step([]KV{
			{"InitiatorName", "iqn.1994-05.com.redhat:x"}, {"SessionType", "Normal"}, {"TargetName", "iqn.2026-01.t:x"},
			{"DefaultTime2Wait", offer},
		}, StageOperational)
		if err != nil {
			t.Fatal(err)
		}
		if got := answers(resp)["DefaultTime2Wait"]; got != offer {
			t.Errorf("offered %s, answered %q", offer, got)
		}
	}
}
