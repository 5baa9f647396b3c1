package fencing

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/bougou/go-ipmi/pkg/client"
	"github.com/bougou/go-ipmi/pkg/command/chassis"
	"github.com/bougou/go-ipmi/pkg/types"
)

// IPMIConfig configures an IPMI 2.0 (lanplus) BMC.
type IPMIConfig struct {
	Host     string `json:"host"`
	Port     int    `json:"port,omitempty"` // default 623
	User     string `json:"user"`
	Password Secret `json:"password"`
	// Privilege is "operator" (enough for chassis control) or
	// "administrator" (the default, as ipmitool uses).
	Privilege string `json:"privilege,omitempty"`
	// CipherSuite is the RMCP+ suite. Real iDRAC/iLO/XCC prefer 17
	// (HMAC-SHA256, AES); OpenIPMI's ipmi_sim only does 3. Default 17.
	CipherSuite int `json:"cipher_suite,omitempty"`
	// RequestTimeout per UDP exchange (go-ipmi retries on timeout);
	// default 1s. The verb's context bounds the whole call.
	RequestTimeout Duration `json:"request_timeout,omitzero"`
	Retries        int      `json:"retries,omitempty"` // default 2
}

// Validate names the bad field.
func (c IPMIConfig) Validate() error {
	if c.Host == "" {
		return invalid("ipmi.host", "required")
	}
	if c.Port < 0 || c.Port > 65535 {
		return invalid("ipmi.port", "%d out of range 1-65535", c.Port)
	}
	if c.User == "" {
		return invalid("ipmi.user", "required")
	}
	if len(c.User) > 16 {
		return invalid("ipmi.user", "longer than 16 bytes (IPMI limit)")
	}
	if len(c.Password.Reveal()) > 20 {
		return invalid("ipmi.password", "longer than 20 bytes (IPMI 2.0 limit)")
	}
	if _, err := c.privilege(); err != nil {
		return err
	}
	switch c.CipherSuite {
	case 0, 1, 2, 3, 6, 7, 8, 11, 12, 15, 16, 17:
	default:
		return invalid("ipmi.cipher_suite", "%d: want one of 1,2,3,6,7,8,11,12,15,16,17", c.CipherSuite)
	}
	if c.Retries < 0 {
		return invalid("ipmi.retries", "negative")
	}
	return nil
}

func (c IPMIConfig) privilege() (types.PrivilegeLevel, error) {
	switch strings.ToLower(c.Privilege) {
	case "", "administrator", "admin":
		return types.PrivilegeLevelAdministrator, nil
	case "operator":
		return types.PrivilegeLevelOperator, nil
	case "user":
		// Chassis Control needs operator; user only suits monitoring.
		return types.PrivilegeLevelUser, nil
	default:
		return 0, invalid("ipmi.privilege", "%q: want operator, administrator or user", c.Privilege)
	}
}

// IPMIAgent fences through a BMC's Chassis Control command and confirms
// with Get Chassis Status. Each verb opens and closes its own session: a
// fence is rare, and a fresh session cannot be stale when it matters.
type IPMIAgent struct {
	cfg IPMIConfig
}

var _ Agent = (*IPMIAgent)(nil)

// NewIPMI validates cfg and returns the agent. No traffic is sent.
func NewIPMI(cfg IPMIConfig) (*IPMIAgent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Port == 0 {
		cfg.Port = 623
	}
	if cfg.CipherSuite == 0 {
		cfg.CipherSuite = 17
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = Duration(time.Second)
	}
	if cfg.Retries == 0 {
		cfg.Retries = 2
	}
	return &IPMIAgent{cfg: cfg}, nil
}

func (a *IPMIAgent) String() string {
	return fmt.Sprintf("ipmi %s@%s", a.cfg.User, net.JoinHostPort(a.cfg.Host, strconv.Itoa(a.cfg.Port)))
}

func (a *IPMIAgent) session(ctx context.Context, fn func(c *client.Client) error) error {
	priv, _ := a.cfg.privilege()
	c, err := client.NewClient(a.cfg.Host, a.cfg.Port, a.cfg.User, a.cfg.Password.Reveal())
	if err != nil {
		return a.wrap("client", err)
	}
	c.WithInterface(client.InterfaceLanplus).
		WithCipherSuiteID(types.CipherSuiteID(a.cfg.CipherSuite)).
		WithMaxPrivilegeLevel(priv).
		WithTimeout(time.Duration(a.cfg.RequestTimeout)).
		WithRetry(a.cfg.Retries)
	if err := c.Connect(ctx); err != nil {
		return a.wrap("session", classifyIPMI(ctx, err, true))
	}
	defer func() {
		// Close sends Close Session; bound it so a dying BMC cannot hold
		// the caller past its deadline.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer cancel()
		_ = c.Close(cctx)
	}()
	if err := fn(c); err != nil {
		return a.wrap("command", classifyIPMI(ctx, err, false))
	}
	return nil
}

func (a *IPMIAgent) wrap(what string, err error) error {
	return redactError(fmt.Errorf("fencing: ipmi %s: %s: %w", net.JoinHostPort(a.cfg.Host, strconv.Itoa(a.cfg.Port)), what, err), a.cfg.Password)
}

// classifyIPMI adds ErrUnreachable or ErrAuth markers. go-ipmi reports
// both as plain errors; a timeout with no reply is unreachable, a refused
// session handshake is an authentication failure.
func classifyIPMI(ctx context.Context, err error, handshake bool) error {
	var ne net.Error
	msg := strings.ToLower(err.Error())
	switch {
	case ctx.Err() != nil:
		return fmt.Errorf("%w: %w: %w", ErrUnreachable, err, ctx.Err())
	case errors.As(err, &ne) && ne.Timeout(), strings.Contains(msg, "timeout"), strings.Contains(msg, "connection refused"):
		return fmt.Errorf("%w: %w", ErrUnreachable, err)
	case handshake && (strings.Contains(msg, "rakp") || strings.Contains(msg, "unauthorized") ||
		strings.Contains(msg, "invalid") || strings.Contains(msg, "integrity") || strings.Contains(msg, "name")):
		return fmt.Errorf("%w: %w", ErrAuth, err)
	}
	return err
}

func (a *IPMIAgent) control(ctx context.Context, cc chassis.ChassisControl) error {
	return a.session(ctx, func(c *client.Client) error {
		_, err := c.ChassisControl(ctx, cc)
		return err
	})
}

// Off sends Chassis Control power down (a hard power-off, not ACPI soft).
func (a *IPMIAgent) Off(ctx context.Context) error {
	return a.control(ctx, chassis.ChassisControlPowerDown)
}

// On sends Chassis Control power up.
func (a *IPMIAgent) On(ctx context.Context) error {
	return a.control(ctx, chassis.ChassisControlPowerUp)
}

// Status reads Get Chassis Status.
func (a *IPMIAgent) Status(ctx context.Context) (PowerState, error) {
	st := PowerUnknown
	err := a.session(ctx, func(c *client.Client) error {
		r, err := c.GetChassisStatus(ctx)
		if err != nil {
			return fmt.Errorf("%w: %w", ErrStatusUnreadable, err)
		}
		if r.PowerIsOn {
			st = PowerOn
		} else {
			st = PowerOff
		}
		return nil
	})
	if err != nil {
		return PowerUnknown, err
	}
	return st, nil
}

// Monitor opens a session (credentials and privilege are checked) and reads
// chassis status, which is what a fence will need.
func (a *IPMIAgent) Monitor(ctx context.Context) error {
	_, err := a.Status(ctx)
	return err
}

// List returns the one system a BMC controls.
func (a *IPMIAgent) List(context.Context) ([]Plug, error) {
	return []Plug{{ID: a.cfg.Host}}, nil
}
