package fencing

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/gosnmp/gosnmp"
)

// APC PowerNet-MIB OIDs. Both families use 1 = on and 2 = off.
const (
	// sPDUOutletCtl: read gives the state, write 1 on / 2 off / 3 reboot.
	oidSPDUCtl  = ".1.3.6.1.4.1.318.1.1.4.4.2.1.3"
	oidSPDUName = ".1.3.6.1.4.1.318.1.1.4.4.2.1.4"
	// rPDUOutletControlOutletCommand (write) and
	// rPDUOutletStatusOutletState / Name (read).
	oidRPDUCmd    = ".1.3.6.1.4.1.318.1.1.12.3.3.1.1.4"
	oidRPDUState  = ".1.3.6.1.4.1.318.1.1.12.3.5.1.1.4"
	oidRPDUName   = ".1.3.6.1.4.1.318.1.1.12.3.5.1.1.2"
	oidSysObjID   = ".1.3.6.1.2.1.1.2.0"
	apcOutletOn   = 1
	apcOutletOff  = 2
	apcRPDUObjIDs = ".1.3.6.1.4.1.318.1.3.4.5 .1.3.6.1.4.1.318.1.3.4.6"
)

// APCConfig configures an APC switched PDU reached over SNMP.
type APCConfig struct {
	Host string `json:"host"`
	Port int    `json:"port,omitempty"` // default 161
	// Version is "1", "2c" or "3".
	Version string `json:"version"`
	// Community for v1/v2c (write community: fence_apc_snmp uses "private").
	Community Secret `json:"community,omitzero"`
	// v3 USM. SecurityLevel follows from which passphrases are set.
	User         string `json:"user,omitempty"`
	AuthProtocol string `json:"auth_protocol,omitempty"` // MD5, SHA (default), SHA256, SHA512
	AuthPass     Secret `json:"auth_pass,omitzero"`
	PrivProtocol string `json:"priv_protocol,omitempty"` // DES, AES (default)
	PrivPass     Secret `json:"priv_pass,omitzero"`
	// MIB is "rpdu" (rPDUOutletControl/Status), "spdu" (sPDUOutletCtl) or
	// "" to choose from sysObjectID as fence_apc_snmp does.
	MIB string `json:"mib,omitempty"`
	// Outlets feeding this server, by number ("3") or name ("db1-psu-a").
	// With several outlets, Off switches all of them and Status reads off
	// only when every one is off.
	Outlets        []string `json:"outlets"`
	RequestTimeout Duration `json:"request_timeout,omitzero"` // default 1s
	Retries        int      `json:"retries,omitempty"`        // default 1
}

// Validate names the bad field.
func (c APCConfig) Validate() error {
	if c.Host == "" {
		return invalid("apc_snmp.host", "required")
	}
	if c.Port < 0 || c.Port > 65535 {
		return invalid("apc_snmp.port", "%d out of range", c.Port)
	}
	switch c.Version {
	case "1", "2c":
		if c.Community.IsZero() {
			return invalid("apc_snmp.community", "required for SNMP v%s", c.Version)
		}
	case "3":
		if c.User == "" {
			return invalid("apc_snmp.user", "required for SNMP v3")
		}
		if _, err := c.authProto(); err != nil {
			return err
		}
		if _, err := c.privProto(); err != nil {
			return err
		}
		if !c.PrivPass.IsZero() && c.AuthPass.IsZero() {
			return invalid("apc_snmp.auth_pass", "privacy needs authentication")
		}
	default:
		return invalid("apc_snmp.version", "%q: want 1, 2c or 3", c.Version)
	}
	switch c.MIB {
	case "", "rpdu", "spdu":
	default:
		return invalid("apc_snmp.mib", "%q: want rpdu, spdu or empty for auto", c.MIB)
	}
	if len(c.Outlets) == 0 {
		return invalid("apc_snmp.outlets", "at least one outlet is required")
	}
	seen := map[string]bool{}
	for i, o := range c.Outlets {
		if strings.TrimSpace(o) == "" {
			return invalid(fmt.Sprintf("apc_snmp.outlets[%d]", i), "empty")
		}
		if seen[o] {
			return invalid(fmt.Sprintf("apc_snmp.outlets[%d]", i), "%q listed twice", o)
		}
		seen[o] = true
	}
	if c.Retries < 0 {
		return invalid("apc_snmp.retries", "negative")
	}
	return nil
}

func (c APCConfig) authProto() (gosnmp.SnmpV3AuthProtocol, error) {
	if c.AuthPass.IsZero() {
		return gosnmp.NoAuth, nil
	}
	switch strings.ToUpper(c.AuthProtocol) {
	case "", "SHA":
		return gosnmp.SHA, nil
	case "MD5":
		return gosnmp.MD5, nil
	case "SHA256":
		return gosnmp.SHA256, nil
	case "SHA512":
		return gosnmp.SHA512, nil
	}
	return 0, invalid("apc_snmp.auth_protocol", "%q: want MD5, SHA, SHA256 or SHA512", c.AuthProtocol)
}

func (c APCConfig) privProto() (gosnmp.SnmpV3PrivProtocol, error) {
	if c.PrivPass.IsZero() {
		return gosnmp.NoPriv, nil
	}
	switch strings.ToUpper(c.PrivProtocol) {
	case "", "AES":
		return gosnmp.AES, nil
	case "DES":
		return gosnmp.DES, nil
	}
	return 0, invalid("apc_snmp.priv_protocol", "%q: want AES or DES", c.PrivProtocol)
}

// APCAgent switches APC PDU outlets. Each verb uses its own UDP socket.
type APCAgent struct {
	cfg APCConfig
}

var _ Agent = (*APCAgent)(nil)

// NewAPCSNMP validates cfg and returns the agent. No traffic is sent.
func NewAPCSNMP(cfg APCConfig) (*APCAgent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Port == 0 {
		cfg.Port = 161
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = Duration(time.Second)
	}
	if cfg.Retries == 0 {
		cfg.Retries = 1
	}
	return &APCAgent{cfg: cfg}, nil
}

func (a *APCAgent) addr() string { return net.JoinHostPort(a.cfg.Host, strconv.Itoa(a.cfg.Port)) }

func (a *APCAgent) wrap(err error) error {
	if err == nil {
		return nil
	}
	return redactError(fmt.Errorf("fencing: apc-snmp %s: %w", a.addr(), err), a.cfg.Community, a.cfg.AuthPass, a.cfg.PrivPass)
}

// conn is one SNMP session with the resolved outlet numbers and MIB.
type apcConn struct {
	g       *gosnmp.GoSNMP
	rpdu    bool
	outlets []int
}

func (a *APCAgent) connect(ctx context.Context) (*apcConn, error) {
	g := &gosnmp.GoSNMP{
		Target:  a.cfg.Host,
		Port:    uint16(a.cfg.Port),
		Context: ctx,
		Timeout: time.Duration(a.cfg.RequestTimeout),
		Retries: a.cfg.Retries,
		MaxOids: gosnmp.MaxOids,
	}
	if dl, ok := ctx.Deadline(); ok {
		if left := time.Until(dl); left < g.Timeout {
			g.Timeout = left
		}
	}
	switch a.cfg.Version {
	case "1":
		g.Version, g.Community = gosnmp.Version1, a.cfg.Community.Reveal()
	case "2c":
		g.Version, g.Community = gosnmp.Version2c, a.cfg.Community.Reveal()
	case "3":
		ap, _ := a.cfg.authProto()
		pp, _ := a.cfg.privProto()
		g.Version, g.SecurityModel = gosnmp.Version3, gosnmp.UserSecurityModel
		g.MsgFlags = gosnmp.NoAuthNoPriv
		if ap != gosnmp.NoAuth {
			g.MsgFlags = gosnmp.AuthNoPriv
		}
		if pp != gosnmp.NoPriv {
			g.MsgFlags = gosnmp.AuthPriv
		}
		g.SecurityParameters = &gosnmp.UsmSecurityParameters{
			UserName:                 a.cfg.User,
			AuthenticationProtocol:   ap,
			AuthenticationPassphrase: a.cfg.AuthPass.Reveal(),
			PrivacyProtocol:          pp,
			PrivacyPassphrase:        a.cfg.PrivPass.Reveal(),
		}
	}
	if err := g.Connect(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUnreachable, err)
	}
	c := &apcConn{g: g}
	switch a.cfg.MIB {
	case "rpdu":
		c.rpdu = true
	case "spdu":
	default:
		r, err := g.Get([]string{oidSysObjID})
		if err != nil {
			g.Conn.Close()
			return nil, classifySNMP(ctx, err)
		}
		if len(r.Variables) == 1 {
			if s, ok := r.Variables[0].Value.(string); ok && strings.Contains(apcRPDUObjIDs, s) {
				c.rpdu = true
			}
		}
	}
	if err := a.resolveOutlets(c); err != nil {
		g.Conn.Close()
		return nil, classifySNMP(ctx, err)
	}
	return c, nil
}

func (a *APCAgent) resolveOutlets(c *apcConn) error {
	var names map[string]int
	for _, o := range a.cfg.Outlets {
		if n, err := strconv.Atoi(o); err == nil && n > 0 {
			c.outlets = append(c.outlets, n)
			continue
		}
		if names == nil {
			root := oidSPDUName
			if c.rpdu {
				root = oidRPDUName
			}
			pdus, err := c.g.WalkAll(root)
			if err != nil {
				return fmt.Errorf("walk outlet names: %w", err)
			}
			names = map[string]int{}
			for _, p := range pdus {
				idx, err := strconv.Atoi(p.Name[strings.LastIndexByte(p.Name, '.')+1:])
				if err != nil {
					continue
				}
				switch v := p.Value.(type) {
				case []byte:
					names[string(v)] = idx
				case string:
					names[v] = idx
				}
			}
		}
		n, ok := names[o]
		if !ok {
			return fmt.Errorf("outlet %q: no outlet with that name", o)
		}
		c.outlets = append(c.outlets, n)
	}
	return nil
}

func classifySNMP(ctx context.Context, err error) error {
	msg := strings.ToLower(err.Error())
	switch {
	case ctx.Err() != nil:
		return fmt.Errorf("%w: %w: %w", ErrUnreachable, err, ctx.Err())
	case strings.Contains(msg, "authentication") || strings.Contains(msg, "unknown user") ||
		strings.Contains(msg, "wrong digest") || strings.Contains(msg, "decrypt") ||
		strings.Contains(msg, "not authentic"):
		return fmt.Errorf("%w: %w", ErrAuth, err)
	case strings.Contains(msg, "timeout") || strings.Contains(msg, "connection refused"):
		// v1/v2c agents drop requests with a wrong community silently, so a
		// timeout may also be bad credentials.
		return fmt.Errorf("%w (or wrong community): %w", ErrUnreachable, err)
	}
	return err
}

func (a *APCAgent) with(ctx context.Context, fn func(c *apcConn) error) error {
	c, err := a.connect(ctx)
	if err != nil {
		return a.wrap(err)
	}
	defer c.g.Conn.Close()
	if err := fn(c); err != nil {
		return a.wrap(classifySNMP(ctx, err))
	}
	return nil
}

func (a *APCAgent) set(ctx context.Context, value int) error {
	return a.with(ctx, func(c *apcConn) error {
		root := oidSPDUCtl
		if c.rpdu {
			root = oidRPDUCmd
		}
		// One SET per outlet, back to back, as fence_apc_snmp does: several
		// PDUs (and net-snmp pass_persist agents) refuse multi-varbind
		// SETs. Off and confirm still cover every outlet before any On.
		for _, n := range c.outlets {
			r, err := c.g.Set([]gosnmp.SnmpPDU{{Name: fmt.Sprintf("%s.%d", root, n), Type: gosnmp.Integer, Value: value}})
			if err != nil {
				return fmt.Errorf("outlet %d: %w", n, err)
			}
			if r.Error != gosnmp.NoError {
				return fmt.Errorf("outlet %d: set refused: %v", n, r.Error)
			}
		}
		return nil
	})
}

// Off switches every configured outlet off.
func (a *APCAgent) Off(ctx context.Context) error { return a.set(ctx, apcOutletOff) }

// On switches every configured outlet on.
func (a *APCAgent) On(ctx context.Context) error { return a.set(ctx, apcOutletOn) }

// Status reads every outlet: off only when all are off, on when any is on,
// an error when any outlet's state is missing or not 1/2.
func (a *APCAgent) Status(ctx context.Context) (PowerState, error) {
	st := PowerUnknown
	err := a.with(ctx, func(c *apcConn) error {
		root := oidSPDUCtl
		if c.rpdu {
			root = oidRPDUState
		}
		oids := make([]string, 0, len(c.outlets))
		for _, n := range c.outlets {
			oids = append(oids, fmt.Sprintf("%s.%d", root, n))
		}
		r, err := c.g.Get(oids)
		if err != nil {
			return fmt.Errorf("%w: %w", ErrStatusUnreadable, err)
		}
		if r.Error != gosnmp.NoError || len(r.Variables) != len(oids) {
			return fmt.Errorf("%w: %v", ErrStatusUnreadable, r.Error)
		}
		anyOn := false
		for i, v := range r.Variables {
			if v.Type != gosnmp.Integer {
				return fmt.Errorf("%w: outlet %d: %v", ErrStatusUnreadable, c.outlets[i], v.Type)
			}
			switch gosnmp.ToBigInt(v.Value).Int64() {
			case apcOutletOn:
				anyOn = true
			case apcOutletOff:
			default:
				return fmt.Errorf("%w: outlet %d: state %v", ErrStatusUnreadable, c.outlets[i], v.Value)
			}
		}
		st = PowerOff
		if anyOn {
			st = PowerOn
		}
		return nil
	})
	if err != nil {
		return PowerUnknown, err
	}
	return st, nil
}

// Monitor reads the outlets' state: device up, credentials valid, outlets
// exist.
func (a *APCAgent) Monitor(ctx context.Context) error {
	_, err := a.Status(ctx)
	return err
}

// List walks the outlet name table.
func (a *APCAgent) List(ctx context.Context) ([]Plug, error) {
	var plugs []Plug
	err := a.with(ctx, func(c *apcConn) error {
		root := oidSPDUName
		if c.rpdu {
			root = oidRPDUName
		}
		pdus, err := c.g.WalkAll(root)
		if err != nil {
			return err
		}
		for _, p := range pdus {
			name := ""
			switch v := p.Value.(type) {
			case []byte:
				name = string(v)
			case string:
				name = v
			}
			plugs = append(plugs, Plug{ID: p.Name[strings.LastIndexByte(p.Name, '.')+1:], Alias: name})
		}
		return nil
	})
	return plugs, err
}
