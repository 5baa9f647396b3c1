package iscsi

import (
	"crypto/md5"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// ErrAuthFailed means the initiator did not prove knowledge of the secret,
// or the exchange broke the CHAP rules. Logins end with status 0x0201.
var ErrAuthFailed = errors.New("iscsi: authentication failed")

// chapMD5 is the only CHAP algorithm RFC 7143 requires (CHAP_A=5).
const chapMD5 = "5"

// challengeLen is the size of our random challenge. RFC 7143 12.1.3 asks for
// unpredictable challenges; 16 bytes matches the MD5 block of the response.
const challengeLen = 16

// maxCHAPBinary bounds decoded CHAP_C/CHAP_R values from the peer.
const maxCHAPBinary = 1024

// CHAPAuth is the target side of one CHAP exchange (RFC 1994 with the
// iSCSI encoding of RFC 7143 12.1.3). It is a pure state machine apart from
// reading Rand for the challenge.
type CHAPAuth struct {
	// User and Secret are what the initiator must prove.
	User, Secret string
	// MutualUser and MutualSecret, when MutualSecret is set, let the
	// initiator authenticate the target.
	MutualUser, MutualSecret string
	// Rand supplies challenges; nil means crypto/rand.
	Rand io.Reader

	state     int
	id        byte
	challenge []byte
}

// Step consumes the CHAP keys of one login request and returns the keys to
// answer with. done is true once the initiator is authenticated (and, for
// mutual CHAP, our response has been produced).
func (c *CHAPAuth) Step(kvs []KV) (resp []KV, done bool, err error) {
	get := func(k string) (string, bool) {
		for _, kv := range kvs {
			if kv.Key == k {
				return kv.Value, true
			}
		}
		return "", false
	}
	switch c.state {
	case 0:
		algs, ok := get("CHAP_A")
		if !ok {
			return nil, false, fmt.Errorf("%w: CHAP_A missing", ErrAuthFailed)
		}
		found := false
		for _, a := range strings.Split(algs, ",") {
			if a == chapMD5 {
				found = true
			}
		}
		if !found {
			return []KV{{"CHAP_A", ValueReject}}, false, fmt.Errorf("%w: no supported CHAP_A in %q", ErrAuthFailed, algs)
		}
		r := c.Rand
		if r == nil {
			r = rand.Reader
		}
		buf := make([]byte, challengeLen+1)
		if _, err := io.ReadFull(r, buf); err != nil {
			return nil, false, fmt.Errorf("iscsi: CHAP challenge: %w", err)
		}
		c.id, c.challenge = buf[0], buf[1:]
		c.state = 1
		return []KV{
			{"CHAP_A", chapMD5},
			{"CHAP_I", strconv.Itoa(int(c.id))},
			{"CHAP_C", "0x" + hex.EncodeToString(c.challenge)},
		}, false, nil
	case 1:
		c.state = 2 // one attempt only
		name, okN := get("CHAP_N")
		rv, okR := get("CHAP_R")
		if !okN || !okR {
			return nil, false, fmt.Errorf("%w: CHAP_N or CHAP_R missing", ErrAuthFailed)
		}
		got, _, err := DecodeCHAPBinary(rv)
		if err != nil {
			return nil, false, fmt.Errorf("%w: CHAP_R: %v", ErrAuthFailed, err)
		}
		want := chapResponse(c.id, c.Secret, c.challenge)
		// Compare name and response without early exit on the response.
		okResp := subtle.ConstantTimeCompare(got, want[:]) == 1
		if name != c.User || !okResp {
			return nil, false, fmt.Errorf("%w: wrong CHAP_N or CHAP_R for user %q", ErrAuthFailed, name)
		}
		iv, okI := get("CHAP_I")
		cv, okC := get("CHAP_C")
		if !okI && !okC {
			return nil, true, nil
		}
		if !okI || !okC {
			return nil, false, fmt.Errorf("%w: mutual CHAP needs both CHAP_I and CHAP_C", ErrAuthFailed)
		}
		if c.MutualSecret == "" {
			return nil, false, fmt.Errorf("%w: initiator asked for mutual CHAP but none is configured", ErrAuthFailed)
		}
		id, err := strconv.ParseUint(iv, 0, 8)
		if err != nil {
			return nil, false, fmt.Errorf("%w: CHAP_I %q", ErrAuthFailed, iv)
		}
		ch, b64, err := DecodeCHAPBinary(cv)
		if err != nil || len(ch) == 0 {
			return nil, false, fmt.Errorf("%w: CHAP_C: %v", ErrAuthFailed, err)
		}
		if subtle.ConstantTimeCompare(ch, c.challenge) == 1 {
			// Reflection attack: the initiator wants us to answer our
			// own challenge so it can replay the answer.
			return nil, false, fmt.Errorf("%w: initiator reflected the target's challenge", ErrAuthFailed)
		}
		if c.MutualSecret == c.Secret {
			return nil, false, fmt.Errorf("%w: mutual CHAP secret equals the initiator secret", ErrAuthFailed)
		}
		r := chapResponse(byte(id), c.MutualSecret, ch)
		return []KV{
			{"CHAP_N", c.MutualUser},
			{"CHAP_R", EncodeCHAPBinary(r[:], b64)},
		}, true, nil
	}
	return nil, false, fmt.Errorf("%w: unexpected CHAP keys after the exchange", ErrAuthFailed)
}

func chapResponse(id byte, secret string, challenge []byte) [md5.Size]byte {
	h := md5.New()
	h.Write([]byte{id})
	h.Write([]byte(secret))
	h.Write(challenge)
	var out [md5.Size]byte
	h.Sum(out[:0])
	return out
}

// CHAPResponse computes the MD5 CHAP response; exported for initiators
// (tests) that need to answer a challenge.
func CHAPResponse(id byte, secret string, challenge []byte) []byte {
	r := chapResponse(id, secret, challenge)
	return r[:]
}

// DecodeCHAPBinary decodes a "0x" (hex) or "0b" (base64) CHAP value and
// reports whether it was base64.
func DecodeCHAPBinary(v string) (b []byte, base64Enc bool, err error) {
	if len(v) < 3 {
		return nil, false, fmt.Errorf("iscsi: CHAP value %q too short", v)
	}
	prefix, body := strings.ToLower(v[:2]), v[2:]
	switch prefix {
	case "0x":
		if len(body) > 2*maxCHAPBinary {
			return nil, false, fmt.Errorf("iscsi: CHAP value too long")
		}
		if len(body)%2 == 1 {
			body = "0" + body
		}
		b, err = hex.DecodeString(body)
	case "0b":
		if len(body) > 4*maxCHAPBinary/3+4 {
			return nil, false, fmt.Errorf("iscsi: CHAP value too long")
		}
		base64Enc = true
		b, err = base64.StdEncoding.DecodeString(body)
	default:
		return nil, false, fmt.Errorf("iscsi: CHAP value must start with 0x or 0b")
	}
	return b, base64Enc, err
}

// EncodeCHAPBinary encodes b as 0x-hex or 0b-base64.
func EncodeCHAPBinary(b []byte, base64Enc bool) string {
	if base64Enc {
		return "0b" + base64.StdEncoding.EncodeToString(b)
	}
	return "0x" + hex.EncodeToString(b)
}
