package iscsi

import (
	"bytes"
	"errors"
	"strconv"
	"testing"
)

// initiatorAnswer plays the initiator: parse the target's challenge and
// answer it with secret.
func initiatorAnswer(t *testing.T, resp []KV, user, secret string, b64 bool) []KV {
	t.Helper()
	m := answers(resp)
	id, err := strconv.Atoi(m["CHAP_I"])
	if err != nil {
		t.Fatalf("CHAP_I %q", m["CHAP_I"])
	}
	ch, _, err := DecodeCHAPBinary(m["CHAP_C"])
	if err != nil || len(ch) != challengeLen {
		t.Fatalf("CHAP_C %q: %v", m["CHAP_C"], err)
	}
	return []KV{{"CHAP_N", user}, {"CHAP_R", EncodeCHAPBinary(CHAPResponse(byte(id), secret, ch), b64)}}
}

func TestCHAPOneWay(t *testing.T) {
	for _, b64 := range []bool{false, true} {
		c := &CHAPAuth{User: "alice", Secret: "0123456789ab"}
		resp, done, err := c.Step([]KV{{"CHAP_A", "7,5"}})
		if err != nil || done || answers(resp)["CHAP_A"] != "5" {
			t.Fatalf("step 1: %v %v %v", resp, done, err)
		}
		resp, done, err = c.Step(initiatorAnswer(t, resp, "alice", "0123456789ab", b64))
		if err != nil || !done || len(resp) != 0 {
			t.Fatalf("b64=%v step 2: %v %v %v", b64, resp, done, err)
		}
	}
}

func TestCHAPWrongSecretOrName(t *testing.T) {
	for _, tc := range []struct{ user, secret string }{{"alice", "wrongwrongwrong"}, {"bob", "0123456789ab"}} {
		c := &CHAPAuth{User: "alice", Secret: "0123456789ab"}
		resp, _, _ := c.Step([]KV{{"CHAP_A", "5"}})
		if _, _, err := c.Step(initiatorAnswer(t, resp, tc.user, tc.secret, false)); !errors.Is(err, ErrAuthFailed) {
			t.Fatalf("%v: err %v", tc, err)
		}
	}
}

func TestCHAPNoMD5(t *testing.T) {
	c := &CHAPAuth{User: "a", Secret: "0123456789ab"}
	if _, _, err := c.Step([]KV{{"CHAP_A", "6,7"}}); !errors.Is(err, ErrAuthFailed) {
		t.Fatalf("err %v", err)
	}
}

func TestCHAPMutual(t *testing.T) {
	c := &CHAPAuth{User: "alice", Secret: "0123456789ab", MutualUser: "tgt", MutualSecret: "ba9876543210"}
	resp, _, _ := c.Step([]KV{{"CHAP_A", "5"}})
	ans := initiatorAnswer(t, resp, "alice", "0123456789ab", false)
	myChallenge := []byte("initiator-challenge!")
	ans = append(ans, KV{"CHAP_I", "42"}, KV{"CHAP_C", EncodeCHAPBinary(myChallenge, true)})
	resp, done, err := c.Step(ans)
	if err != nil || !done {
		t.Fatalf("mutual: %v %v", done, err)
	}
	m := answers(resp)
	r, b64, err := DecodeCHAPBinary(m["CHAP_R"])
	if err != nil || !b64 || m["CHAP_N"] != "tgt" || !bytes.Equal(r, CHAPResponse(42, "ba9876543210", myChallenge)) {
		t.Fatalf("target answer %v (b64=%v err=%v)", m, b64, err)
	}
}

func TestCHAPReflectedChallenge(t *testing.T) {
	c := &CHAPAuth{User: "alice", Secret: "0123456789ab", MutualUser: "tgt", MutualSecret: "ba9876543210"}
	resp, _, _ := c.Step([]KV{{"CHAP_A", "5"}})
	ans := initiatorAnswer(t, resp, "alice", "0123456789ab", false)
	ans = append(ans, KV{"CHAP_I", answers(resp)["CHAP_I"]}, KV{"CHAP_C", answers(resp)["CHAP_C"]})
	if _, _, err := c.Step(ans); !errors.Is(err, ErrAuthFailed) {
		t.Fatalf("reflected challenge accepted: %v", err)
	}
}

func TestCHAPMutualNotConfigured(t *testing.T) {
	c := &CHAPAuth{User: "alice", Secret: "0123456789ab"}
	resp, _, _ := c.Step([]KV{{"CHAP_A", "5"}})
	ans := append(initiatorAnswer(t, resp, "alice", "0123456789ab", false), KV{"CHAP_I", "1"}, KV{"CHAP_C", "0x0102030405"})
	if _, _, err := c.Step(ans); !errors.Is(err, ErrAuthFailed) {
		t.Fatalf("err %v", err)
	}
}
