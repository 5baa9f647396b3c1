package iscsi

import (
	"fmt"
	"strconv"
	"strings"
)

// Login stages (CSG/NSG values, RFC 7143 11.12.3).
const (
	StageSecurity    uint8 = 0
	StageOperational uint8 = 1
	StageFullFeature uint8 = 3
)

// Protocol bounds (RFC 7143 13).
const (
	MinDataSegment    = 512
	MaxDataSegmentV   = 1<<24 - 1
	DefaultMRDSL      = 8192
	DefaultMaxBurst   = 262144
	DefaultFirstBurst = 65536
)

// Settings are the target's side of the negotiation: its preferences for
// boolean keys and the largest values it accepts for numeric keys. The zero
// value is replaced field by field with DefaultSettings.
type Settings struct {
	// MaxRecvDataSegmentLength is what the target declares it can receive
	// in one PDU (declarative: each side states its own).
	MaxRecvDataSegmentLength uint32
	// MaxBurstLength and FirstBurstLength cap what the initiator may
	// propose (result function: minimum).
	MaxBurstLength   uint32
	FirstBurstLength uint32
	// MaxOutstandingR2T caps the number of R2Ts in flight per task.
	MaxOutstandingR2T uint32
	// InitialR2T (result OR) and ImmediateData (result AND) preferences.
	// They are pointers-free bools; use DefaultSettings to get Yes/No.
	InitialR2T    bool
	ImmediateData bool
	// DisableDigests refuses CRC32C so that HeaderDigest and DataDigest
	// always settle on None.
	DisableDigests bool
}

// DefaultSettings is what hasan offers: ImmediateData=Yes, InitialR2T=No,
// 256 KiB PDUs, bursts up to 16 MiB, up to 16 R2Ts outstanding.
func DefaultSettings() Settings {
	return Settings{
		MaxRecvDataSegmentLength: 256 << 10,
		MaxBurstLength:           MaxDataSegmentV,
		FirstBurstLength:         MaxDataSegmentV,
		MaxOutstandingR2T:        16,
		InitialR2T:               false,
		ImmediateData:            true,
	}
}

// Validate checks s against the protocol bounds, naming the bad field.
func (s Settings) Validate() error {
	if s.MaxRecvDataSegmentLength < MinDataSegment || s.MaxRecvDataSegmentLength > MaxDataSegmentV {
		return fmt.Errorf("iscsi: MaxRecvDataSegmentLength %d outside [%d, %d]", s.MaxRecvDataSegmentLength, MinDataSegment, MaxDataSegmentV)
	}
	if s.MaxBurstLength < MinDataSegment || s.MaxBurstLength > MaxDataSegmentV {
		return fmt.Errorf("iscsi: MaxBurstLength %d outside [%d, %d]", s.MaxBurstLength, MinDataSegment, MaxDataSegmentV)
	}
	if s.FirstBurstLength < MinDataSegment || s.FirstBurstLength > MaxDataSegmentV {
		return fmt.Errorf("iscsi: FirstBurstLength %d outside [%d, %d]", s.FirstBurstLength, MinDataSegment, MaxDataSegmentV)
	}
	if s.MaxOutstandingR2T < 1 || s.MaxOutstandingR2T > 65535 {
		return fmt.Errorf("iscsi: MaxOutstandingR2T %d outside [1, 65535]", s.MaxOutstandingR2T)
	}
	return nil
}

// Params are the operational parameters in force for a session, starting
// from the RFC defaults and changed by negotiation.
type Params struct {
	HeaderDigest, DataDigest bool
	// MaxRecvDataSegmentLength is the target's declared limit (what it
	// accepts); MaxXmitDataSegmentLength is the initiator's (what the target
	// may send in one PDU).
	MaxRecvDataSegmentLength uint32
	MaxXmitDataSegmentLength uint32
	MaxBurstLength           uint32
	FirstBurstLength         uint32
	InitialR2T               bool
	ImmediateData            bool
	MaxOutstandingR2T        uint32
	MaxConnections           uint32
	DefaultTime2Wait         uint32
	DefaultTime2Retain       uint32
	ErrorRecoveryLevel       uint32
	DataPDUInOrder           bool
	DataSequenceInOrder      bool
}

// DefaultParams are the RFC 7143 defaults that hold for keys nobody
// negotiates.
func DefaultParams() Params {
	return Params{
		MaxRecvDataSegmentLength: DefaultMRDSL,
		MaxXmitDataSegmentLength: DefaultMRDSL,
		MaxBurstLength:           DefaultMaxBurst,
		FirstBurstLength:         DefaultFirstBurst,
		InitialR2T:               true,
		ImmediateData:            true,
		MaxOutstandingR2T:        1,
		MaxConnections:           1,
		DefaultTime2Wait:         2,
		DefaultTime2Retain:       20,
		DataPDUInOrder:           true,
		DataSequenceInOrder:      true,
	}
}

// Declarations the login layer consumes (identity and session type).
const (
	KeyInitiatorName  = "InitiatorName"
	KeyInitiatorAlias = "InitiatorAlias"
	KeyTargetName     = "TargetName"
	KeySessionType    = "SessionType"
	KeyAuthMethod     = "AuthMethod"
)

type keyKind uint8

const (
	kindMin keyKind = iota + 1 // numeric, result minimum
	kindMax                    // numeric, result maximum
	kindOr
	kindAnd
	kindList
	kindDeclInitiator // declared by the initiator, no answer
	kindTargetOnly    // only the target may send it
	kindIrrelevant    // obsolete or meaningless at our ERL: answer Irrelevant
	kindSecurity      // AuthMethod and CHAP_*, handled by the login layer
	kindSendTargets
)

type keyDef struct {
	kind      keyKind
	lo, hi    uint64
	loginOnly bool
	// irrelevantInDiscovery marks keys RFC 7143 lists as irrelevant for
	// discovery sessions.
	irrelevantInDiscovery bool
}

var keyTable = map[string]keyDef{
	"HeaderDigest":             {kind: kindList, loginOnly: true},
	"DataDigest":               {kind: kindList, loginOnly: true},
	"MaxConnections":           {kind: kindMin, lo: 1, hi: 65535, loginOnly: true, irrelevantInDiscovery: true},
	"SendTargets":              {kind: kindSendTargets},
	KeyTargetName:              {kind: kindDeclInitiator, loginOnly: true},
	KeyInitiatorName:           {kind: kindDeclInitiator, loginOnly: true},
	"TargetAlias":              {kind: kindTargetOnly},
	KeyInitiatorAlias:          {kind: kindDeclInitiator},
	"TargetAddress":            {kind: kindTargetOnly},
	"TargetPortalGroupTag":     {kind: kindTargetOnly},
	"InitialR2T":               {kind: kindOr, loginOnly: true, irrelevantInDiscovery: true},
	"ImmediateData":            {kind: kindAnd, loginOnly: true, irrelevantInDiscovery: true},
	"MaxRecvDataSegmentLength": {kind: kindDeclInitiator, lo: MinDataSegment, hi: MaxDataSegmentV},
	"MaxBurstLength":           {kind: kindMin, lo: MinDataSegment, hi: MaxDataSegmentV, loginOnly: true, irrelevantInDiscovery: true},
	"FirstBurstLength":         {kind: kindMin, lo: MinDataSegment, hi: MaxDataSegmentV, loginOnly: true, irrelevantInDiscovery: true},
	"DefaultTime2Wait":         {kind: kindMax, lo: 0, hi: 3600, loginOnly: true},
	"DefaultTime2Retain":       {kind: kindMin, lo: 0, hi: 3600, loginOnly: true},
	"MaxOutstandingR2T":        {kind: kindMin, lo: 1, hi: 65535, loginOnly: true, irrelevantInDiscovery: true},
	"DataPDUInOrder":           {kind: kindOr, loginOnly: true, irrelevantInDiscovery: true},
	"DataSequenceInOrder":      {kind: kindOr, loginOnly: true, irrelevantInDiscovery: true},
	"ErrorRecoveryLevel":       {kind: kindMin, lo: 0, hi: 2, loginOnly: true},
	KeySessionType:             {kind: kindDeclInitiator, loginOnly: true},
	KeyAuthMethod:              {kind: kindSecurity, loginOnly: true},
	"OFMarker":                 {kind: kindAnd, loginOnly: true},
	"IFMarker":                 {kind: kindAnd, loginOnly: true},
	"OFMarkInt":                {kind: kindIrrelevant, loginOnly: true},
	"IFMarkInt":                {kind: kindIrrelevant, loginOnly: true},
	"TaskReporting":            {kind: kindList, loginOnly: true},
	"iSCSIProtocolLevel":       {kind: kindMin, lo: 0, hi: 31, loginOnly: true},
}

// Negotiator runs the operational-key side of one login or text sequence.
// It is a pure value: Step consumes the initiator's keys and returns the
// answer. It is not safe for concurrent use.
type Negotiator struct {
	Settings Settings
	Params   Params
	// Declared holds the identity keys the initiator declared
	// (InitiatorName, TargetName, SessionType, InitiatorAlias).
	Declared map[string]string
	// FullFeature is set for text negotiation after login: login-only
	// keys are then rejected.
	FullFeature bool

	seen         map[string]bool
	declaredMRDS bool
}

// NewNegotiator starts a negotiation with the RFC defaults in force.
func NewNegotiator(s Settings) *Negotiator {
	return &Negotiator{
		Settings: s,
		Params:   DefaultParams(),
		Declared: map[string]string{},
		seen:     map[string]bool{},
	}
}

// Discovery reports whether the initiator declared SessionType=Discovery.
func (n *Negotiator) Discovery() bool { return n.Declared[KeySessionType] == "Discovery" }

// Step answers one request's keys. Security keys (AuthMethod, CHAP_*) are
// not answered but returned in security for the login layer, and
// SendTargets likewise comes back in sendTargets. A key offered twice, a
// conflicting redeclaration or a security key outside the security stage is
// an error (the login fails with "initiator error").
func (n *Negotiator) Step(kvs []KV, stage uint8) (resp, security []KV, sendTargets *KV, err error) {
	// SessionType decides relevance of the other keys, wherever it sits.
	for _, kv := range kvs {
		if kv.Key == KeySessionType && n.Declared[KeySessionType] == "" {
			if kv.Value != "Discovery" && kv.Value != "Normal" {
				return nil, nil, nil, fmt.Errorf("iscsi: SessionType=%q", kv.Value)
			}
			n.Declared[KeySessionType] = kv.Value
		}
	}
	for _, kv := range kvs {
		k, v := kv.Key, kv.Value
		def, known := keyTable[k]
		if !known && strings.HasPrefix(k, "CHAP_") {
			def, known = keyDef{kind: kindSecurity, loginOnly: true}, true
		}
		if !known {
			resp = append(resp, KV{k, ValueNotUnderstood})
			continue
		}
		if n.FullFeature && def.loginOnly {
			resp = append(resp, KV{k, ValueReject})
			continue
		}
		switch def.kind {
		case kindSecurity:
			if stage != StageSecurity {
				return nil, nil, nil, fmt.Errorf("iscsi: security key %s outside the security stage", k)
			}
			if k == KeyAuthMethod && n.seen[k] {
				return nil, nil, nil, fmt.Errorf("%w: %s", ErrKeyRepeated, k)
			}
			n.seen[k] = true
			security = append(security, kv)
			continue
		case kindSendTargets:
			kv := kv
			sendTargets = &kv
			continue
		case kindDeclInitiator:
			if old, ok := n.Declared[k]; ok && !(n.FullFeature && k == "MaxRecvDataSegmentLength") {
				// Some initiators repeat their identity in every login
				// PDU; only a different value is an error.
				if old != v {
					return nil, nil, nil, fmt.Errorf("%w: %s redeclared as %q", ErrKeyRepeated, k, v)
				}
				continue
			}
			if k == "MaxRecvDataSegmentLength" {
				x, ok := parseNumber(v)
				if !ok || x < def.lo {
					resp = append(resp, KV{k, ValueReject})
					continue
				}
				if x > def.hi {
					x = def.hi
				}
				n.Params.MaxXmitDataSegmentLength = uint32(x)
				if !n.declaredMRDS {
					resp = append(resp, n.declareMRDS())
				}
			}
			n.Declared[k] = v
			continue
		}
		if n.seen[k] {
			return nil, nil, nil, fmt.Errorf("%w: %s", ErrKeyRepeated, k)
		}
		n.seen[k] = true
		if n.Discovery() && def.irrelevantInDiscovery {
			resp = append(resp, KV{k, ValueIrrelevant})
			continue
		}
		resp = append(resp, KV{k, n.answer(k, v, def)})
	}
	if stage == StageOperational && !n.declaredMRDS {
		resp = append(resp, n.declareMRDS())
	}
	return resp, security, sendTargets, nil
}

func (n *Negotiator) declareMRDS() KV {
	n.declaredMRDS = true
	n.Params.MaxRecvDataSegmentLength = n.Settings.MaxRecvDataSegmentLength
	return KV{"MaxRecvDataSegmentLength", strconv.FormatUint(uint64(n.Settings.MaxRecvDataSegmentLength), 10)}
}

// Finish returns declarations still owed before entering full feature phase
// (our MaxRecvDataSegmentLength). FirstBurstLength is deliberately not
// clamped to MaxBurstLength: an initiator that left FirstBurstLength at its
// default sends that much unsolicited data, and refusing it would only break
// the session.
func (n *Negotiator) Finish() []KV {
	var out []KV
	if !n.declaredMRDS {
		out = append(out, n.declareMRDS())
	}
	return out
}

func (n *Negotiator) answer(k, v string, def keyDef) string {
	p := &n.Params
	s := n.Settings
	switch def.kind {
	case kindIrrelevant:
		return ValueIrrelevant
	case kindTargetOnly:
		return ValueReject
	case kindMin, kindMax:
		x, ok := parseNumber(v)
		if !ok || x < def.lo || x > def.hi {
			return ValueReject
		}
		var ours uint64
		switch k {
		case "MaxConnections":
			ours = 1
		case "MaxBurstLength":
			ours = uint64(s.MaxBurstLength)
		case "FirstBurstLength":
			ours = uint64(s.FirstBurstLength)
		case "DefaultTime2Wait":
			// Our sessions hold no state for a reconnect to wait for,
			// so the initiator's own offer stands (the larger wins):
			// one configured with 0 reconnects at once after a failover
			// (docs/decisions/0010).
			ours = 0
		case "DefaultTime2Retain":
			ours = 0 // ERL 0: nothing is kept after a connection dies
		case "MaxOutstandingR2T":
			ours = uint64(s.MaxOutstandingR2T)
		case "ErrorRecoveryLevel":
			ours = 0
		case "iSCSIProtocolLevel":
			ours = 1
		}
		r := min(x, ours)
		if def.kind == kindMax {
			r = max(x, ours)
		}
		switch k {
		case "MaxConnections":
			p.MaxConnections = uint32(r)
		case "MaxBurstLength":
			p.MaxBurstLength = uint32(r)
		case "FirstBurstLength":
			p.FirstBurstLength = uint32(r)
		case "DefaultTime2Wait":
			p.DefaultTime2Wait = uint32(r)
		case "DefaultTime2Retain":
			p.DefaultTime2Retain = uint32(r)
		case "MaxOutstandingR2T":
			p.MaxOutstandingR2T = uint32(r)
		case "ErrorRecoveryLevel":
			p.ErrorRecoveryLevel = uint32(r)
		}
		return strconv.FormatUint(r, 10)
	case kindOr, kindAnd:
		var x bool
		switch v {
		case "Yes":
			x = true
		case "No":
		default:
			return ValueReject
		}
		var ours bool
		switch k {
		case "InitialR2T":
			ours = s.InitialR2T
		case "ImmediateData":
			ours = s.ImmediateData
		case "DataPDUInOrder", "DataSequenceInOrder":
			// We need in-order data at ERL 0; OR with Yes forces it.
			ours = true
		case "OFMarker", "IFMarker":
			ours = false
		}
		r := x || ours
		if def.kind == kindAnd {
			r = x && ours
		}
		switch k {
		case "InitialR2T":
			p.InitialR2T = r
		case "ImmediateData":
			p.ImmediateData = r
		case "DataPDUInOrder":
			p.DataPDUInOrder = r
		case "DataSequenceInOrder":
			p.DataSequenceInOrder = r
		}
		return yesNo(r)
	case kindList:
		var supported []string
		switch k {
		case "HeaderDigest", "DataDigest":
			supported = []string{"None"}
			if !s.DisableDigests {
				supported = append(supported, "CRC32C")
			}
		case "TaskReporting":
			supported = []string{"RFC3720"}
		}
		for _, o := range strings.Split(v, ",") {
			for _, sup := range supported {
				if o == sup {
					switch k {
					case "HeaderDigest":
						p.HeaderDigest = o == "CRC32C"
					case "DataDigest":
						p.DataDigest = o == "CRC32C"
					}
					return o
				}
			}
		}
		return ValueReject
	}
	return ValueNotUnderstood
}

func yesNo(b bool) string {
	if b {
		return "Yes"
	}
	return "No"
}

// parseNumber accepts the RFC 7143 5.1 decimal and 0x-hex forms.
func parseNumber(v string) (uint64, bool) {
	if v == "" || len(v) > 20 {
		return 0, false
	}
	base := 10
	if strings.HasPrefix(v, "0x") || strings.HasPrefix(v, "0X") {
		v, base = v[2:], 16
	}
	if v == "" {
		return 0, false
	}
	for _, c := range v {
		if !(c >= '0' && c <= '9' || base == 16 && (c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F')) {
			return 0, false
		}
	}
	x, err := strconv.ParseUint(v, base, 64)
	return x, err == nil
}

// ResetForText prepares the negotiator for a new text exchange in full
// feature phase: keys may be negotiated again, login-only keys are refused.
func (n *Negotiator) ResetForText() {
	n.FullFeature = true
	n.seen = map[string]bool{}
}
