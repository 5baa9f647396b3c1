package fencing

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"os/exec"
	"sort"
	"strings"
)

// ExternalConfig runs a fence-agents compatible program (fence_ipmilan,
// fence_apc_snmp, fence_redfish, ...). Parameters go to its stdin as
// key=value lines, the way Pacemaker passes them, so secrets never show in
// the process list.
type ExternalConfig struct {
	// Program is a path or a name found in $PATH (/usr/sbin holds Debian's).
	Program string `json:"program"`
	// Params are the agent's parameters, e.g. ip, ipport, username, lanplus,
	// plug. "action" is set by the verb and must not be given.
	Params map[string]string `json:"params"`
	// Secrets are parameters that must never be printed (password, community,
	// snmp_auth_pass, snmp_priv_passwd).
	Secrets map[string]Secret `json:"secrets,omitempty"`
}

// Validate names the bad field.
func (c ExternalConfig) Validate() error {
	if c.Program == "" {
		return invalid("external.program", "required")
	}
	for k, v := range c.Params {
		if err := checkParam(k, v); err != nil {
			return invalid("external.params."+k, "%v", err)
		}
		if _, dup := c.Secrets[k]; dup {
			return invalid("external.params."+k, "also given in secrets")
		}
	}
	for k, v := range c.Secrets {
		if err := checkParam(k, v.Reveal()); err != nil {
			return invalid("external.secrets."+k, "%v", err)
		}
	}
	return nil
}

func checkParam(k, v string) error {
	switch {
	case k == "" || strings.ContainsAny(k, "= \n\r\t"):
		return errors.New("invalid parameter name")
	case k == "action" || k == "option":
		return errors.New("set by the verb; remove it")
	case strings.ContainsAny(v, "\n\r"):
		return errors.New("value contains a newline")
	}
	return nil
}

// ExternalAgent runs the program once per verb.
type ExternalAgent struct {
	cfg  ExternalConfig
	path string
}

var _ Agent = (*ExternalAgent)(nil)

// NewExternal validates cfg and resolves the program.
func NewExternal(cfg ExternalConfig) (*ExternalAgent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	path, err := exec.LookPath(cfg.Program)
	if err != nil && !strings.Contains(cfg.Program, "/") {
		path, err = exec.LookPath("/usr/sbin/" + cfg.Program)
	}
	if err != nil {
		return nil, invalid("external.program", "%v", err)
	}
	return &ExternalAgent{cfg: cfg, path: path}, nil
}

func (a *ExternalAgent) secrets() []Secret {
	out := make([]Secret, 0, len(a.cfg.Secrets))
	for _, s := range a.cfg.Secrets {
		out = append(out, s)
	}
	return out
}

// run executes one action and returns the exit code. A process killed by
// the deadline is an error, not an exit code.
func (a *ExternalAgent) run(ctx context.Context, action string) (code int, stdout string, err error) {
	var in bytes.Buffer
	fmt.Fprintf(&in, "action=%s\n", action)
	keys := make([]string, 0, len(a.cfg.Params))
	for k := range a.cfg.Params {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(&in, "%s=%s\n", k, a.cfg.Params[k])
	}
	for k, v := range a.cfg.Secrets {
		fmt.Fprintf(&in, "%s=%s\n", k, v.Reveal())
	}
	cmd := exec.CommandContext(ctx, a.path)
	cmd.Stdin = &in
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.WaitDelay = 0
	err = cmd.Run()
	stdout = out.String()
	if ctx.Err() != nil {
		return -1, stdout, a.fail(action, fmt.Errorf("%w: %w", ErrUnreachable, ctx.Err()), errb.String())
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), stdout, a.fail(action, fmt.Errorf("exit %d", ee.ExitCode()), errb.String()+stdout)
	}
	if err != nil {
		return -1, stdout, a.fail(action, err, errb.String())
	}
	return 0, stdout, nil
}

func (a *ExternalAgent) fail(action string, err error, output string) error {
	msg := strings.TrimSpace(output)
	if i := strings.LastIndex(msg, "\n"); i >= 0 && len(msg) > 400 {
		msg = "..." + msg[i:]
	}
	if msg != "" {
		err = fmt.Errorf("%w: %s", err, msg)
	}
	return redactError(fmt.Errorf("fencing: external %s action=%s: %w", a.cfg.Program, action, err), a.secrets()...)
}

// Off runs action=off. fence-agents wait for off themselves, but only our
// Status polling counts as confirmation.
func (a *ExternalAgent) Off(ctx context.Context) error {
	_, _, err := a.run(ctx, "off")
	return err
}

// On runs action=on.
func (a *ExternalAgent) On(ctx context.Context) error {
	_, _, err := a.run(ctx, "on")
	return err
}

// Status runs action=status: exit 0 is on, 2 is off, anything else is an
// unreadable status.
func (a *ExternalAgent) Status(ctx context.Context) (PowerState, error) {
	code, _, err := a.run(ctx, "status")
	switch {
	case code == 0 && err == nil:
		return PowerOn, nil
	case code == 2:
		return PowerOff, nil
	}
	return PowerUnknown, fmt.Errorf("%w: %w", ErrStatusUnreadable, err)
}

// Monitor runs action=monitor (device reachable, login works).
func (a *ExternalAgent) Monitor(ctx context.Context) error {
	_, _, err := a.run(ctx, "monitor")
	return err
}

// List runs action=list and parses "plug,alias" lines.
func (a *ExternalAgent) List(ctx context.Context) ([]Plug, error) {
	_, out, err := a.run(ctx, "list")
	if err != nil {
		return nil, err
	}
	var plugs []Plug
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		id, alias, _ := strings.Cut(line, ",")
		plugs = append(plugs, Plug{ID: id, Alias: alias})
	}
	return plugs, nil
}

type agentMetadata struct {
	Name   string `xml:"name,attr"`
	Params []struct {
		Name       string `xml:"name,attr"`
		Required   string `xml:"required,attr"`
		Deprecated string `xml:"deprecated,attr"`
		Obsoletes  string `xml:"obsoletes,attr"`
	} `xml:"parameters>parameter"`
}

// CheckMetadata runs action=metadata and checks every configured parameter
// against the agent's own list, and that required ones are present, so a
// typo is found when the device is configured rather than when it is
// needed.
func (a *ExternalAgent) CheckMetadata(ctx context.Context) error {
	_, out, err := a.run(ctx, "metadata")
	if err != nil {
		return err
	}
	var md agentMetadata
	if err := xml.Unmarshal([]byte(out), &md); err != nil {
		return fmt.Errorf("fencing: external %s: metadata: %w", a.cfg.Program, err)
	}
	known := map[string]bool{}
	var required []string
	for _, p := range md.Params {
		known[p.Name] = true
		if p.Required == "1" && p.Deprecated != "1" && p.Name != "action" && p.Name != "plug" && p.Name != "port" {
			required = append(required, p.Name)
		}
	}
	has := func(k string) bool {
		_, ok := a.cfg.Params[k]
		_, ok2 := a.cfg.Secrets[k]
		return ok || ok2
	}
	for _, k := range sortedKeys(a.cfg.Params) {
		if !known[k] {
			return invalid("external.params."+k, "%s has no parameter %q", a.cfg.Program, k)
		}
	}
	for _, k := range sortedKeys(a.cfg.Secrets) {
		if !known[k] {
			return invalid("external.secrets."+k, "%s has no parameter %q", a.cfg.Program, k)
		}
	}
	for _, r := range required {
		if !has(r) {
			return invalid("external.params."+r, "required by %s", a.cfg.Program)
		}
	}
	return nil
}
