package target

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/hasan-storage/hasan/target/iscsi"
)

// Login status (class<<8 | detail), RFC 7143 11.13.5.
const (
	loginInitiatorError  = 0x0200
	loginAuthFailure     = 0x0201
	loginAuthzFailure    = 0x0202
	loginNotFound        = 0x0203
	loginTargetRemoved   = 0x0204
	loginUnsupportedVer  = 0x0205
	loginMissingParam    = 0x0207
	loginSessionNotExist = 0x020a
	loginTargetError     = 0x0300
	loginServiceUnavail  = 0x0301
)

// loginError ends a login with a status code; msg is for the log only (the
// initiator sees the code).
type loginError struct {
	status uint16
	msg    string
}

func (e *loginError) Error() string { return fmt.Sprintf("login status %#04x: %s", e.status, e.msg) }

func loginFail(status uint16, format string, args ...any) *loginError {
	return &loginError{status: status, msg: fmt.Sprintf(format, args...)}
}

// loginState is the login phase of one connection (RFC 7143 6.3): a state
// machine fed login requests that returns the response to send. It touches
// the server only to look targets up and to register the session at the end.
type loginState struct {
	srv  *Server
	conn *conn

	started  bool
	isid     [6]byte
	tsih     uint16
	cid      uint16
	cmdSN    uint32
	statSN   uint32
	stage    uint8
	neg      *iscsi.Negotiator
	text     iscsi.TextBuffer
	identity bool // initiator name/target resolved

	initiator string
	discovery bool
	target    *target
	tcfg      *TargetConfig

	authRequired bool
	authChosen   string // "", "None", "CHAP"
	chap         *iscsi.CHAPAuth
	authDone     bool
}

func newLoginState(srv *Server, c *conn) *loginState {
	return &loginState{srv: srv, conn: c, neg: iscsi.NewNegotiator(srv.settings)}
}

// step handles one Login Request. It returns the response, and done=true
// when the response moves the connection into full feature phase. On a
// *loginError the response carries the failure status and the caller closes
// the connection after sending it.
func (l *loginState) step(ctx context.Context, req *iscsi.PDU) (resp *iscsi.PDU, done bool, err error) {
	h := &req.BHS
	resp = &iscsi.PDU{}
	r := &resp.BHS
	r.SetOpcode(iscsi.OpLoginResp, false)
	copy(r[8:14], h[8:14]) // ISID echoes
	r.SetITT(h.ITT())
	if !l.started {
		l.started = true
		l.isid, l.tsih, l.cid, l.cmdSN = h.ISID(), h.TSIH(), h.CID(), h.CmdSN()
		l.stage = h.CSG()
		l.statSN = l.conn.initialStatSN
	}
	fail := func(e *loginError) (*iscsi.PDU, bool, error) {
		r.SetLoginStages(false, false, l.stage, 0)
		r.SetLoginStatus(uint8(e.status>>8), uint8(e.status))
		r.SetTSIH(0)
		l.fillSN(r)
		return resp, false, e
	}
	if h.VersionMin() > 0 {
		return fail(loginFail(loginUnsupportedVer, "version min %d", h.VersionMin()))
	}
	if h.ISID() != l.isid || h.TSIH() != l.tsih {
		return fail(loginFail(loginInitiatorError, "ISID/TSIH changed during login"))
	}
	csg, nsg, transit := h.CSG(), h.NSG(), h.Transit()
	if csg != l.stage || csg == 2 || csg == iscsi.StageFullFeature {
		return fail(loginFail(loginInitiatorError, "CSG %d while in stage %d", csg, l.stage))
	}
	if transit && (nsg <= csg || nsg == 2) {
		return fail(loginFail(loginInitiatorError, "bad transition %d -> %d", csg, nsg))
	}
	if transit && h.Continue() {
		return fail(loginFail(loginInitiatorError, "T and C both set"))
	}
	if err := l.text.Add(req.Data); err != nil {
		return fail(loginFail(loginInitiatorError, "%v", err))
	}
	if h.Continue() {
		// More text follows: acknowledge with an empty response.
		r.SetLoginStages(false, false, csg, 0)
		l.fillSN(r)
		return resp, false, nil
	}
	kvs, perr := iscsi.ParseText(l.text.Take())
	if perr != nil {
		return fail(loginFail(loginInitiatorError, "%v", perr))
	}
	out, security, _, nerr := l.neg.Step(kvs, csg)
	if nerr != nil {
		return fail(loginFail(loginInitiatorError, "%v", nerr))
	}
	if !l.identity {
		var prefix []iscsi.KV
		if e := l.resolveIdentity(&prefix); e != nil {
			return fail(e)
		}
		out = append(prefix, out...)
	}
	if csg == iscsi.StageSecurity {
		authOut, e := l.authenticate(security)
		if e != nil {
			return fail(e)
		}
		out = append(out, authOut...)
	} else if l.authRequired && !l.authDone {
		return fail(loginFail(loginAuthFailure, "operational stage before authentication"))
	}
	if transit && csg == iscsi.StageSecurity && !l.authDone {
		if l.authChosen == "CHAP" && l.chap != nil {
			// The initiator may not leave before answering; wait for
			// CHAP_N/CHAP_R with T still set.
			transit = false
		} else {
			return fail(loginFail(loginAuthFailure, "security stage left without authentication"))
		}
	}
	if transit && nsg == iscsi.StageFullFeature {
		out = append(out, l.neg.Finish()...)
		sess := newSession(l)
		tsih, rerr := l.srv.registerSession(ctx, sess, l.tsih)
		switch {
		case errors.Is(rerr, errSessionNotFound):
			return fail(loginFail(loginSessionNotExist, "tsih %d", l.tsih))
		case errors.Is(rerr, errTargetRemoved):
			return fail(loginFail(loginTargetRemoved, "%v", rerr))
		case rerr != nil:
			return fail(loginFail(loginServiceUnavail, "%v", rerr))
		}
		r.SetTSIH(tsih)
		l.conn.sess = sess
		done = true
	}
	if transit {
		l.stage = nsg
		r.SetLoginStages(true, false, csg, nsg)
	} else {
		r.SetLoginStages(false, false, csg, 0)
	}
	resp.Data = iscsi.AppendText(nil, out)
	if len(resp.Data) > iscsi.MaxTextLen {
		return fail(loginFail(loginTargetError, "login response too long"))
	}
	l.fillSN(r)
	return resp, done, nil
}

func (l *loginState) fillSN(r *iscsi.BHS) {
	r[2], r[3] = 0, 0 // VersionMax, VersionActive
	r.SetStatSN(l.statSN)
	l.statSN++
	r.SetExpCmdSN(l.cmdSN)
	r.SetMaxCmdSN(l.cmdSN + l.srv.cfg.CmdWindow - 1)
}

// resolveIdentity checks InitiatorName, SessionType, TargetName and the
// ACL on the first complete request.
func (l *loginState) resolveIdentity(out *[]iscsi.KV) *loginError {
	d := l.neg.Declared
	l.initiator = d[iscsi.KeyInitiatorName]
	if l.initiator == "" {
		return loginFail(loginMissingParam, "InitiatorName missing")
	}
	if err := ValidateName(l.initiator); err != nil {
		return loginFail(loginInitiatorError, "InitiatorName: %v", err)
	}
	l.discovery = l.neg.Discovery()
	l.identity = true
	if l.discovery {
		if c := l.srv.cfg.DiscoveryCHAP; c != nil {
			l.authRequired = true
			l.chap = &iscsi.CHAPAuth{User: c.User, Secret: c.Secret}
		}
		return nil
	}
	name := d[iscsi.KeyTargetName]
	if name == "" {
		return loginFail(loginMissingParam, "TargetName missing in a normal session")
	}
	t := l.srv.lookupTarget(name)
	if t == nil {
		return loginFail(loginNotFound, "target %q not found", name)
	}
	tc := t.cfg.Load()
	if !allowed(tc, l.initiator) {
		return loginFail(loginAuthzFailure, "initiator %q not in the ACL of %s", l.initiator, tc.Name)
	}
	l.target, l.tcfg = t, tc
	if tc.CHAP != nil {
		l.authRequired = true
		l.chap = &iscsi.CHAPAuth{User: tc.CHAP.User, Secret: tc.CHAP.Secret}
		if tc.MutualCHAP != nil {
			l.chap.MutualUser, l.chap.MutualSecret = tc.MutualCHAP.User, tc.MutualCHAP.Secret
		}
	}
	*out = append(*out, iscsi.KV{Key: "TargetPortalGroupTag", Value: strconv.Itoa(int(tc.TPGT))})
	if tc.Alias != "" {
		*out = append(*out, iscsi.KV{Key: "TargetAlias", Value: tc.Alias})
	}
	return nil
}

func (l *loginState) authenticate(security []iscsi.KV) ([]iscsi.KV, *loginError) {
	var out []iscsi.KV
	var chapKeys []iscsi.KV
	for _, kv := range security {
		if kv.Key == iscsi.KeyAuthMethod {
			if l.authChosen != "" {
				return nil, loginFail(loginInitiatorError, "AuthMethod repeated")
			}
			offers := strings.Split(kv.Value, ",")
			switch {
			case l.authRequired && slices.Contains(offers, "CHAP"):
				l.authChosen = "CHAP"
			case l.authRequired:
				return nil, loginFail(loginAuthFailure, "CHAP required, initiator offered %q", kv.Value)
			case slices.Contains(offers, "None"):
				l.authChosen = "None"
				l.authDone = true
			default:
				return nil, loginFail(loginAuthFailure, "no CHAP account configured, initiator offered %q", kv.Value)
			}
			out = append(out, iscsi.KV{Key: iscsi.KeyAuthMethod, Value: l.authChosen})
			continue
		}
		chapKeys = append(chapKeys, kv)
	}
	if len(chapKeys) > 0 {
		if l.authChosen != "CHAP" || l.authDone {
			return nil, loginFail(loginInitiatorError, "CHAP keys without AuthMethod=CHAP")
		}
		resp, ok, err := l.chap.Step(chapKeys)
		if err != nil {
			return nil, loginFail(loginAuthFailure, "%v", err)
		}
		l.authDone = ok
		out = append(out, resp...)
	}
	if l.authChosen == "" && !l.authRequired {
		// No AuthMethod offered and none needed: RFC 7143 lets the
		// initiator skip straight on.
		l.authDone = true
	}
	return out, nil
}
