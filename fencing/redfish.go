package fencing

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/stmcginnis/gofish"
	"github.com/stmcginnis/gofish/schemas"
)

// RedfishConfig configures a Redfish BMC (iDRAC, iLO, XCC, OpenBMC). The
// service is always reached over HTTPS.
type RedfishConfig struct {
	// Host is the BMC address (name or IP), without scheme or path.
	Host string `json:"host"`
	Port int    `json:"port,omitempty"` // default 443
	User string `json:"user"`
	// Password of User. Sent only inside TLS: in the session login body, or
	// in the Authorization header with auth "basic".
	Password Secret `json:"password"`
	// Auth is "session" (the default: one login through SessionService,
	// X-Auth-Token afterwards, session deleted on Close) or "basic" (HTTP
	// basic auth on every request, for BMCs without SessionService).
	Auth string `json:"auth,omitempty"`
	// System is the Id of the ComputerSystem to fence ("1",
	// "System.Embedded.1"). Empty selects the only system, and is an error
	// when the BMC has several.
	System string `json:"system,omitempty"`
	// CAFile is a PEM bundle that signs the BMC's certificate. Empty uses the
	// system roots.
	CAFile string `json:"ca_file,omitempty"`
	// TLSServerName is the name to verify in the certificate when Host is an
	// IP address the certificate does not list.
	TLSServerName string `json:"tls_server_name,omitempty"`
	// InsecureSkipVerify turns certificate verification off. Anyone on the
	// path can then impersonate the BMC and report a fake power-off, so the
	// agent logs a warning every time it is built.
	InsecureSkipVerify bool `json:"insecure_skip_verify,omitempty"`
	// RequestTimeout bounds each HTTP request; default 5s. The verb's
	// context bounds the whole call.
	RequestTimeout Duration `json:"request_timeout,omitzero"`
}

// Validate names the bad field.
func (c RedfishConfig) Validate() error {
	switch {
	case c.Host == "":
		return invalid("redfish.host", "required")
	case strings.Contains(c.Host, "/"):
		return invalid("redfish.host", "%q: give the address only (https is implied; use port for the port)", c.Host)
	case c.Port < 0 || c.Port > 65535:
		return invalid("redfish.port", "%d out of range 1-65535", c.Port)
	case c.User == "":
		return invalid("redfish.user", "required")
	case c.Password.IsZero():
		return invalid("redfish.password", "required")
	case c.CAFile != "" && c.InsecureSkipVerify:
		return invalid("redfish.insecure_skip_verify", "set together with ca_file; choose one")
	case c.RequestTimeout < 0:
		return invalid("redfish.request_timeout", "negative")
	}
	switch c.Auth {
	case "", "session", "basic":
	default:
		return invalid("redfish.auth", "%q: want session or basic", c.Auth)
	}
	if strings.ContainsAny(c.System, "/?#") {
		return invalid("redfish.system", "%q: give the system Id, not a path", c.System)
	}
	return nil
}

// RedfishAgent fences through ComputerSystem.Reset (ForceOff, On) and
// confirms with the system's PowerState. GracefulShutdown is never used: a
// fence must not depend on the victim's cooperation.
//
// With session auth the agent logs in once and keeps the session for later
// verbs (status is polled every 100ms during a fence; a login per read would
// exhaust the BMC's few session slots). A 401 on a kept session logs in
// again once. Close deletes the session.
type RedfishAgent struct {
	cfg      RedfishConfig
	endpoint string
	hc       *http.Client

	// lock is a one-slot semaphore rather than a mutex so a caller waiting
	// behind a hung request still honours its own deadline.
	lock   chan struct{}
	conn   *gofish.APIClient // nil until the first verb, guarded by lock
	sysURI string            // resolved system, guarded by lock
}

var (
	_ Agent     = (*RedfishAgent)(nil)
	_ WithClose = (*RedfishAgent)(nil)
)

// NewRedfish validates cfg, loads the CA file and returns the agent. No
// traffic is sent. logger (nil: slog.Default) receives the warning about
// disabled certificate verification.
func NewRedfish(cfg RedfishConfig, logger *slog.Logger) (*RedfishAgent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Port == 0 {
		cfg.Port = 443
	}
	if cfg.Auth == "" {
		cfg.Auth = "session"
	}
	if cfg.RequestTimeout == 0 {
		cfg.RequestTimeout = Duration(5 * time.Second)
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: cfg.TLSServerName}
	if cfg.CAFile != "" {
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, invalid("redfish.ca_file", "%v", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, invalid("redfish.ca_file", "%s holds no PEM certificate", cfg.CAFile)
		}
		tc.RootCAs = pool
	}
	endpoint := "https://" + net.JoinHostPort(cfg.Host, strconv.Itoa(cfg.Port))
	if cfg.InsecureSkipVerify {
		tc.InsecureSkipVerify = true
		if logger == nil {
			logger = slog.Default()
		}
		logger.Warn("fencing: redfish TLS certificate verification is DISABLED (insecure_skip_verify): "+
			"anyone on the network path can impersonate this BMC and fake a power-off; set ca_file instead",
			"endpoint", endpoint, "user", cfg.User)
	}
	tr := &http.Transport{
		Proxy:               nil, // a BMC is on the management network; never via a proxy
		DialContext:         (&net.Dialer{Timeout: time.Duration(cfg.RequestTimeout)}).DialContext,
		TLSClientConfig:     tc,
		TLSHandshakeTimeout: time.Duration(cfg.RequestTimeout),
		MaxIdleConnsPerHost: 2,
		IdleConnTimeout:     30 * time.Second,
	}
	return &RedfishAgent{
		cfg:      cfg,
		endpoint: endpoint,
		hc:       &http.Client{Transport: tr, Timeout: time.Duration(cfg.RequestTimeout)},
		lock:     make(chan struct{}, 1),
	}, nil
}

func (a *RedfishAgent) String() string {
	return fmt.Sprintf("redfish %s@%s", a.cfg.User, a.endpoint)
}

// login fetches the service root and authenticates. With basic auth nothing
// is checked until the first authenticated request.
func (a *RedfishAgent) login(ctx context.Context) (*gofish.APIClient, error) {
	c, err := gofish.ConnectContext(ctx, gofish.ClientConfig{
		Endpoint:          a.endpoint,
		Username:          a.cfg.User,
		Password:          a.cfg.Password.Reveal(),
		BasicAuth:         a.cfg.Auth == "basic",
		HTTPClient:        a.hc,
		NoModifyTransport: true, // keep our TLS settings
		ReuseConnections:  true, // status polling over one TLS connection
	})
	if err != nil {
		return nil, err
	}
	if a.cfg.Auth == "session" {
		if _, err := c.GetSession(); err != nil {
			return nil, errors.New("login answered without X-Auth-Token and Location; set auth to basic for this BMC")
		}
	}
	return c, nil
}

// logout deletes c's session (a no-op for basic auth). It gets its own short
// deadline: it runs after the verb's context may have ended, and a BMC with
// leaked sessions eventually refuses new logins.
func (a *RedfishAgent) logout(ctx context.Context, c *gofish.APIClient) error {
	defer a.hc.CloseIdleConnections()
	s, err := c.GetSession()
	if err != nil {
		return nil // basic auth: no session
	}
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	if err := c.WithContext(dctx).Service.DeleteSession(s.ID); err != nil {
		return a.wrap("logout", classifyRedfish(dctx, err))
	}
	return nil
}

func (a *RedfishAgent) acquire(ctx context.Context) error {
	select {
	case a.lock <- struct{}{}:
		return nil
	case <-ctx.Done():
		return a.wrap("waiting for a previous request", fmt.Errorf("%w: %w", ErrUnreachable, ctx.Err()))
	}
}

func (a *RedfishAgent) release() { <-a.lock }

// with runs fn on the kept connection, logging in first if needed, and once
// more if a kept session was rejected (expired or revoked on the BMC).
func (a *RedfishAgent) with(ctx context.Context, what string, fn func(c *gofish.APIClient) error) error {
	if err := a.acquire(ctx); err != nil {
		return err
	}
	defer a.release()
	for attempt := 0; ; attempt++ {
		fresh := false
		if a.conn == nil {
			c, err := a.login(ctx)
			if err != nil {
				return a.wrap("login", classifyRedfish(ctx, err))
			}
			a.conn, fresh = c, true
		}
		err := fn(a.conn.WithContext(ctx))
		if err == nil {
			return nil
		}
		if httpStatus(err) == http.StatusUnauthorized && !fresh && attempt == 0 && a.cfg.Auth == "session" {
			a.conn = nil
			continue
		}
		return a.wrap(what, classifyRedfish(ctx, err))
	}
}

// system returns the configured ComputerSystem, resolving its URI through
// the Systems collection the first time.
func (a *RedfishAgent) system(c *gofish.APIClient) (*schemas.ComputerSystem, error) {
	if a.sysURI != "" {
		sys, err := schemas.GetComputerSystem(c, a.sysURI)
		if httpStatus(err) == http.StatusNotFound {
			a.sysURI = "" // renumbered by a BMC reset: look it up again
		}
		return sys, err
	}
	sys, err := a.findSystem(c)
	if err != nil {
		return nil, err
	}
	a.sysURI = sys.ODataID
	return sys, nil
}

func (a *RedfishAgent) findSystem(c *gofish.APIClient) (*schemas.ComputerSystem, error) {
	systems, err := c.Service.Systems()
	if err != nil {
		return nil, fmt.Errorf("systems collection: %w", unwrapCollection(err))
	}
	ids := make([]string, 0, len(systems))
	for _, s := range systems {
		if a.cfg.System != "" && s.ID == a.cfg.System {
			return s, nil
		}
		ids = append(ids, s.ID)
	}
	switch {
	case a.cfg.System != "":
		return nil, invalid("redfish.system", "%q not found; the BMC has %s", a.cfg.System, listOrNone(ids))
	case len(systems) == 1:
		return systems[0], nil
	case len(systems) == 0:
		return nil, fmt.Errorf("%w: the BMC lists no systems", ErrNotSupported)
	default:
		return nil, invalid("redfish.system", "required: the BMC has several systems (%s)", strings.Join(ids, ", "))
	}
}

func listOrNone(ids []string) string {
	if len(ids) == 0 {
		return "none"
	}
	return strings.Join(ids, ", ")
}

func (a *RedfishAgent) reset(ctx context.Context, rt schemas.ResetType) error {
	return a.with(ctx, "reset "+string(rt), func(c *gofish.APIClient) error {
		sys, err := a.system(c)
		if err != nil {
			return err
		}
		var raw struct {
			Actions map[string]struct {
				Target string `json:"target"`
			}
		}
		if json.Unmarshal(sys.RawData, &raw) == nil && raw.Actions["#ComputerSystem.Reset"].Target == "" {
			return fmt.Errorf("%w: system %s has no #ComputerSystem.Reset action", ErrNotSupported, sys.ID)
		}
		allowed, err := sys.GetSupportedResetTypes()
		if err != nil {
			return fmt.Errorf("reset action info: %w", err)
		}
		if len(allowed) > 0 && !containsReset(allowed, rt) {
			return fmt.Errorf("%w: system %s allows ResetType %v, not %s", ErrNotSupported, sys.ID, allowed, rt)
		}
		_, err = sys.Reset(rt)
		return err
	})
}

func containsReset(list []schemas.ResetType, rt schemas.ResetType) bool {
	for _, v := range list {
		if v == rt {
			return true
		}
	}
	return false
}

// Off sends ComputerSystem.Reset ForceOff (immediate, no OS shutdown).
func (a *RedfishAgent) Off(ctx context.Context) error {
	return a.reset(ctx, schemas.ForceOffResetType)
}

// On sends ComputerSystem.Reset On.
func (a *RedfishAgent) On(ctx context.Context) error {
	return a.reset(ctx, schemas.OnResetType)
}

// Status reads the system's PowerState. Only "Off" is off; "PoweringOff"
// still has power. A missing or unknown value is unreadable, never a guess.
func (a *RedfishAgent) Status(ctx context.Context) (PowerState, error) {
	st := PowerUnknown
	err := a.with(ctx, "status", func(c *gofish.APIClient) error {
		sys, err := a.system(c)
		if err != nil {
			return fmt.Errorf("%w: %w", ErrStatusUnreadable, err)
		}
		st, err = redfishPower(sys.PowerState)
		return err
	})
	if err != nil {
		return PowerUnknown, err
	}
	return st, nil
}

func redfishPower(p schemas.PowerState) (PowerState, error) {
	switch p {
	case schemas.OffPowerState:
		return PowerOff, nil
	case schemas.OnPowerState, schemas.PoweringOnPowerState, schemas.PoweringOffPowerState, schemas.PausedPowerState:
		return PowerOn, nil
	case "":
		return PowerUnknown, fmt.Errorf("%w: system has no PowerState", ErrStatusUnreadable)
	default:
		return PowerUnknown, fmt.Errorf("%w: PowerState %q", ErrStatusUnreadable, string(p))
	}
}

// Monitor logs in afresh (a kept session would hide a password changed on
// the BMC), finds the system, reads a valid PowerState and logs out, without
// changing power.
func (a *RedfishAgent) Monitor(ctx context.Context) (err error) {
	c, err := a.login(ctx)
	if err != nil {
		return a.wrap("monitor login", classifyRedfish(ctx, err))
	}
	defer func() {
		if lerr := a.logout(ctx, c); err == nil {
			err = lerr
		}
	}()
	sys, err := a.findSystem(c.WithContext(ctx))
	if err != nil {
		return a.wrap("monitor", classifyRedfish(ctx, err))
	}
	if _, err := redfishPower(sys.PowerState); err != nil {
		return a.wrap("monitor", err)
	}
	return nil
}

// List returns the systems the BMC manages (Id, Name).
func (a *RedfishAgent) List(ctx context.Context) ([]Plug, error) {
	var plugs []Plug
	err := a.with(ctx, "list", func(c *gofish.APIClient) error {
		systems, err := c.Service.Systems()
		if err != nil {
			return fmt.Errorf("systems collection: %w", unwrapCollection(err))
		}
		for _, s := range systems {
			plugs = append(plugs, Plug{ID: s.ID, Alias: s.Name})
		}
		// gofish fetches members concurrently; keep the BMC's Ids in order.
		sort.Slice(plugs, func(i, j int) bool { return plugs[i].ID < plugs[j].ID })
		return nil
	})
	return plugs, err
}

// Close deletes the kept session, if any, and drops idle connections.
func (a *RedfishAgent) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := a.acquire(ctx); err != nil {
		return err
	}
	defer a.release()
	c := a.conn
	a.conn = nil
	if c == nil {
		a.hc.CloseIdleConnections()
		return nil
	}
	return a.logout(ctx, c)
}

func (a *RedfishAgent) wrap(what string, err error) error {
	return redactError(fmt.Errorf("fencing: redfish %s: %s: %w", a.endpoint, what, err), a.cfg.Password)
}

// unwrapCollection returns the first member failure of a gofish collection
// error so its HTTP status (401, 500) can be classified; the collection
// error itself only carries them as text.
func unwrapCollection(err error) error {
	var ce *schemas.CollectionError
	if !errors.As(err, &ce) || len(ce.Failures) == 0 {
		return err
	}
	links := sortedKeys(ce.Failures)
	return fmt.Errorf("%s: %w", links[0], ce.Failures[links[0]])
}

// httpStatus is the HTTP status of a Redfish error response, or 0.
func httpStatus(err error) int {
	var re *schemas.Error
	if errors.As(err, &re) {
		return re.HTTPReturnedStatusCode
	}
	return 0
}

// classifyRedfish adds ErrAuth / ErrUnreachable markers and shortens
// Redfish error bodies to their message.
func classifyRedfish(ctx context.Context, err error) error {
	var (
		re  *schemas.Error
		ne  net.Error
		cve *tls.CertificateVerificationError
		uae x509.UnknownAuthorityError
		hne x509.HostnameError
	)
	switch {
	case errors.As(err, &re) && re.HTTPReturnedStatusCode != 0:
		// ExtendedInfo carries the specific message; Message is often
		// the generic "see ExtendedInfo".
		msg := re.Message
		if len(re.ExtendedInfos) > 0 && re.ExtendedInfos[0].Message != "" {
			msg = re.ExtendedInfos[0].Message
		}
		compact := fmt.Sprintf("HTTP %d %s: %s", re.HTTPReturnedStatusCode, http.StatusText(re.HTTPReturnedStatusCode), truncate(msg, 200))
		var marker error
		switch re.HTTPReturnedStatusCode {
		case http.StatusUnauthorized, http.StatusForbidden:
			marker = ErrAuth
		case http.StatusNotImplemented, http.StatusMethodNotAllowed:
			marker = ErrNotSupported
		}
		return replaceInError(err, re.Error(), compact, marker)
	case errors.As(err, &cve), errors.As(err, &uae), errors.As(err, &hne):
		return fmt.Errorf("TLS verification of the BMC certificate failed (set redfish.ca_file or tls_server_name): %w", err)
	case ctx.Err() != nil:
		return fmt.Errorf("%w: %w: %w", ErrUnreachable, err, ctx.Err())
	case errors.As(err, &ne) && ne.Timeout(), errors.Is(err, syscall.ECONNREFUSED),
		errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return fmt.Errorf("%w: %w", ErrUnreachable, err)
	}
	return err
}

// replaceInError rewrites part of err's message (a raw JSON error body)
// while keeping every marker err carries, plus extra.
func replaceInError(err error, old, repl string, extra error) error {
	r := &redactedError{msg: strings.Replace(err.Error(), old, repl, 1)}
	for _, t := range markerErrors {
		if errors.Is(err, t) {
			r.is = append(r.is, t)
		}
	}
	if extra != nil && !errors.Is(err, extra) {
		r.is = append(r.is, extra)
		r.msg = extra.Error() + ": " + r.msg
	}
	return r
}

func truncate(s string, n int) string {
	s = strings.TrimSpace(s)
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}
