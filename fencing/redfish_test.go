package fencing

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

const rfUser, rfPass = "fence", "Rf-S3cret-pw"

// rfPeer is the Redfish double served over TLS on 127.0.0.1, with a real
// node process behind system 1.
type rfPeer struct {
	d      *RedfishDouble
	srv    *httptest.Server
	port   int
	caFile string
}

func startRedfishDouble(t testing.TB, ids ...string) *rfPeer {
	t.Helper()
	d := NewRedfishDouble(rfUser, rfPass, []string{"sleep", "86400"}, ids...)
	srv := httptest.NewUnstartedServer(d)
	// Handshakes refused on purpose (untrusted CA tests) are not news.
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.StartTLS()
	t.Cleanup(func() {
		d.Close() // releases hung handlers first, so srv.Close does not wait
		srv.Close()
	})
	_, p, _ := net.SplitHostPort(srv.Listener.Addr().String())
	port, _ := strconv.Atoi(p)
	ca := filepath.Join(t.TempDir(), "bmc-ca.pem")
	pemBytes := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	if err := os.WriteFile(ca, pemBytes, 0o600); err != nil {
		t.Fatal(err)
	}
	return &rfPeer{d: d, srv: srv, port: port, caFile: ca}
}

func (p *rfPeer) config(pass, auth string) RedfishConfig {
	return RedfishConfig{Host: "127.0.0.1", Port: p.port, User: rfUser, Password: NewSecret(pass),
		Auth: auth, CAFile: p.caFile, RequestTimeout: Duration(2 * time.Second)}
}

func (p *rfPeer) agent(t testing.TB, cfg RedfishConfig) *RedfishAgent {
	t.Helper()
	a, err := NewRedfish(cfg, quiet())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Close() })
	return a
}

func (p *rfPeer) powerOn(t testing.TB) int {
	t.Helper()
	if err := p.d.PowerOn(); err != nil {
		t.Fatal(err)
	}
	pid := p.d.NodePID()
	if pid == 0 || !procAlive(pid) {
		t.Fatalf("node %d not running after power on", pid)
	}
	return pid
}

// syncBuffer collects log output written from several goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestRedfishConfigValidate(t *testing.T) {
	good := RedfishConfig{Host: "bmc1", User: "fence", Password: NewSecret("pw")}
	if err := good.Validate(); err != nil {
		t.Fatalf("good config: %v", err)
	}
	for _, tc := range []struct {
		field string
		mod   func(*RedfishConfig)
	}{
		{"redfish.host", func(c *RedfishConfig) { c.Host = "" }},
		{"redfish.host", func(c *RedfishConfig) { c.Host = "https://bmc1/redfish/v1" }},
		{"redfish.port", func(c *RedfishConfig) { c.Port = 70000 }},
		{"redfish.user", func(c *RedfishConfig) { c.User = "" }},
		{"redfish.password", func(c *RedfishConfig) { c.Password = Secret{} }},
		{"redfish.auth", func(c *RedfishConfig) { c.Auth = "digest" }},
		{"redfish.insecure_skip_verify", func(c *RedfishConfig) { c.CAFile, c.InsecureSkipVerify = "/ca.pem", true }},
		{"redfish.system", func(c *RedfishConfig) { c.System = "/redfish/v1/Systems/1" }},
		{"redfish.request_timeout", func(c *RedfishConfig) { c.RequestTimeout = -1 }},
	} {
		c := good
		tc.mod(&c)
		err := c.Validate()
		if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), tc.field+":") {
			t.Errorf("%s: got %v", tc.field, err)
		}
	}
	// A CA file that does not parse is caught when the agent is built.
	bad := filepath.Join(t.TempDir(), "ca.pem")
	_ = os.WriteFile(bad, []byte("not a certificate"), 0o600)
	c := good
	c.CAFile = bad
	if _, err := NewRedfish(c, quiet()); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "redfish.ca_file") {
		t.Errorf("bad ca_file: %v", err)
	}
	// Through the JSON config: section missing, and a bad field named with
	// the device.
	cfg := Config{Devices: map[string]DeviceConfig{"bmc": {Type: "redfish"}}}
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "devices.bmc.redfish") {
		t.Errorf("missing section: %v", err)
	}
	var fromJSON Config
	js := `{"devices":{"bmc":{"type":"redfish","redfish":{"host":"10.0.0.5","user":"","password":"x"}}},
	        "nodes":{"n1":{"levels":[["bmc"]]}}}`
	if err := json.Unmarshal([]byte(js), &fromJSON); err != nil {
		t.Fatal(err)
	}
	if err := fromJSON.Validate(); err == nil || !strings.Contains(err.Error(), "devices.bmc: ") || !strings.Contains(err.Error(), "redfish.user") {
		t.Errorf("json config: %v", err)
	}
}

func TestRedfishFenceKillsNode(t *testing.T) {
	for _, tc := range []struct {
		name, auth string
		insecure   bool
	}{
		{"session auth, CA verified", "session", false},
		{"basic auth, CA verified", "basic", false},
		{"session auth, insecure", "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := startRedfishDouble(t)
			pid := p.powerOn(t)
			cfg := p.config(rfPass, tc.auth)
			var logs syncBuffer
			logger := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
			if tc.insecure {
				cfg.CAFile, cfg.InsecureSkipVerify = "", true
			}
			a, err := NewRedfish(cfg, logger)
			if err != nil {
				t.Fatal(err)
			}
			if tc.insecure && !strings.Contains(logs.String(), "verification is DISABLED") {
				t.Fatalf("insecure_skip_verify without a warning; log:\n%s", logs.String())
			}
			h := &MemoryHistory{}
			f := &Fencer{
				Devices: map[string]Device{"bmc": {Agent: a, Timeout: 5 * time.Second, PollInterval: 20 * time.Millisecond}},
				Nodes:   map[string]NodeTopology{"n1": {Levels: [][]string{{"bmc"}}}},
				History: h, Logger: logger,
			}
			res, err := f.Fence(context.Background(), "n1")
			if err != nil || !res.Fenced {
				t.Fatalf("fence: %v\n%s", err, res.Summary())
			}
			if procAlive(pid) {
				t.Fatalf("fence reported success but node %d still runs", pid)
			}
			if r := p.d.Resets(); len(r) != 1 || r[0] != "ForceOff" {
				t.Fatalf("resets sent: %v, want exactly [ForceOff]", r)
			}
			recs, _ := h.List(context.Background(), "n1", 0)
			if len(recs) != 1 || recs[0].Outcome != OutcomeSuccess || recs[0].Device != "bmc" {
				t.Fatalf("history: %+v", recs)
			}
			logins, _ := p.d.Logins()
			if tc.auth == "basic" && logins != 0 || tc.auth != "basic" && logins != 1 {
				t.Fatalf("%d session logins for auth %q (want one session reused by every status read)", logins, tc.auth)
			}
			if err := a.Close(); err != nil {
				t.Fatalf("close: %v", err)
			}
			if n := p.d.Sessions(); n != 0 {
				t.Fatalf("%d sessions left on the BMC after Close", n)
			}
			if strings.Contains(logs.String(), rfPass) {
				t.Fatalf("log leaks the password:\n%s", logs.String())
			}
			t.Logf("redfish off+confirm %v", res.Duration)
		})
	}
}

func TestRedfishRebootAndLateSwitch(t *testing.T) {
	p := startRedfishDouble(t)
	pid := p.powerOn(t)
	a := p.agent(t, p.config(rfPass, "session"))
	p.d.SetFaults(RedfishFaults{LateOff: 300 * time.Millisecond})
	f := &Fencer{
		Devices: map[string]Device{"bmc": {Agent: a, Timeout: 5 * time.Second, PollInterval: 20 * time.Millisecond}},
		Nodes:   map[string]NodeTopology{"n1": {Action: ActionReboot, Levels: [][]string{{"bmc"}}}},
		Logger:  quiet(),
	}
	res, err := f.Fence(context.Background(), "n1")
	if err != nil {
		t.Fatalf("reboot: %v\n%s", err, res.Summary())
	}
	if len(res.Attempts) != 2 || res.Attempts[0].Action != "off" || res.Attempts[1].Action != "on" {
		t.Fatalf("attempts:\n%s", res.Summary())
	}
	if d := res.Attempts[0].Duration; d < 250*time.Millisecond {
		t.Fatalf("off confirmed after %v, before the late (300ms) switch", d)
	}
	if procAlive(pid) {
		t.Fatalf("old node %d survived the reboot", pid)
	}
	if np := p.d.NodePID(); np == pid || !procAlive(np) {
		t.Fatalf("no new node after reboot (old %d new %d)", pid, np)
	}
	if r := p.d.Resets(); strings.Join(r, ",") != "ForceOff,On" {
		t.Fatalf("resets %v, want ForceOff then On", r)
	}
}

func TestRedfishNegative(t *testing.T) {
	for _, tc := range []struct {
		name   string
		auth   string
		pass   string
		faults RedfishFaults
		down   bool // nothing listens
		marker error
		// nodeDies: the BMC did switch off, but the fence must still fail
		// because status could not prove it.
		nodeDies bool
	}{
		{name: "wrong password session", auth: "session", pass: "wrong-pw-1", marker: ErrAuth},
		{name: "wrong password basic", auth: "basic", pass: "wrong-pw-2", marker: ErrAuth},
		{name: "wrong password echoed by BMC", auth: "session", pass: "wrong-pw-3", faults: RedfishFaults{EchoPassword: true}, marker: ErrAuth},
		{name: "unreachable", auth: "session", pass: rfPass, down: true, marker: ErrUnreachable},
		{name: "acks but never switches", auth: "session", pass: rfPass, faults: RedfishFaults{Stuck: true}, marker: ErrNotConfirmed},
		{name: "status HTTP 500", auth: "session", pass: rfPass, faults: RedfishFaults{Status500: true, BreakStatusAfterReset: true}, marker: ErrStatusUnreadable, nodeDies: true},
		{name: "PowerState missing", auth: "basic", pass: rfPass, faults: RedfishFaults{NoPowerState: true, BreakStatusAfterReset: true}, marker: ErrStatusUnreadable, nodeDies: true},
		{name: "switches later than the deadline", auth: "session", pass: rfPass, faults: RedfishFaults{LateOff: 5 * time.Second}, marker: ErrNotConfirmed},
		{name: "hangs", auth: "session", pass: rfPass, faults: RedfishFaults{Hang: true}, marker: ErrUnreachable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := startRedfishDouble(t)
			pid := p.powerOn(t)
			cfg := p.config(tc.pass, tc.auth)
			if tc.down {
				l, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				cfg.Port = l.Addr().(*net.TCPAddr).Port
				l.Close()
			}
			p.d.SetFaults(tc.faults)
			var logs syncBuffer
			logger := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
			a, err := NewRedfish(cfg, logger)
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			const deadline = 1500 * time.Millisecond
			h := &MemoryHistory{}
			f := &Fencer{
				Devices: map[string]Device{"bmc": {Agent: a, Timeout: deadline, PollInterval: 50 * time.Millisecond}},
				Nodes:   map[string]NodeTopology{"n1": {Levels: [][]string{{"bmc"}}}},
				History: h, Logger: logger,
			}
			start := time.Now()
			res, err := f.Fence(context.Background(), "n1")
			took := time.Since(start)
			if err == nil || res.Fenced {
				t.Fatalf("fence succeeded: %s", res.Summary())
			}
			if !errors.Is(err, ErrFenceFailed) || !errors.Is(err, tc.marker) {
				t.Fatalf("error %v: want ErrFenceFailed and %v", err, tc.marker)
			}
			if took > deadline+time.Second {
				t.Fatalf("failure took %v, deadline %v", took, deadline)
			}
			recs, _ := h.List(context.Background(), "", 0)
			hist, _ := json.Marshal(recs)
			for _, secret := range []string{rfPass, tc.pass} {
				for what, s := range map[string]string{"error": err.Error(), "log": logs.String(), "history": string(hist)} {
					if strings.Contains(s, secret) {
						t.Fatalf("%s leaks the password %q: %s", what, secret, s)
					}
				}
			}
			if tc.faults.EchoPassword && !strings.Contains(err.Error(), "[redacted]") {
				t.Fatalf("the BMC echoed the password but the error shows no redaction: %v", err)
			}
			if alive := procAlive(pid); alive == tc.nodeDies {
				t.Fatalf("node alive=%v after failed fence, want %v: the fault did not hold", alive, !tc.nodeDies)
			}
			t.Logf("failed in %v: %v", took.Round(time.Millisecond), err)
		})
	}
}

func TestRedfishStatusUnreadableFromStart(t *testing.T) {
	for _, f := range []RedfishFaults{{Status500: true}, {NoPowerState: true}} {
		p := startRedfishDouble(t)
		p.powerOn(t)
		p.d.SetFaults(f)
		a := p.agent(t, p.config(rfPass, "session"))
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		st, err := a.Status(ctx)
		if st != PowerUnknown || !errors.Is(err, ErrStatusUnreadable) {
			t.Errorf("%+v: status %v %v, want unknown + ErrStatusUnreadable", f, st, err)
		}
		if err := a.Monitor(ctx); err == nil {
			t.Errorf("%+v: monitor healthy although PowerState is unreadable", f)
		}
		cancel()
	}
}

func TestRedfishNoForceOff(t *testing.T) {
	for _, f := range []RedfishFaults{{ResetTypes: []string{"On", "GracefulShutdown"}}, {NoResetAction: true}} {
		p := startRedfishDouble(t)
		pid := p.powerOn(t)
		p.d.SetFaults(f)
		a := p.agent(t, p.config(rfPass, "session"))
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		err := OffAndConfirm(ctx, a, 10*time.Millisecond)
		cancel()
		if !errors.Is(err, ErrNotSupported) {
			t.Errorf("%+v: off: %v, want ErrNotSupported", f, err)
		}
		if r := p.d.Resets(); len(r) != 0 || !procAlive(pid) {
			t.Errorf("%+v: resets %v sent (a softer reset must never stand in for ForceOff)", f, r)
		}
	}
}

func TestRedfishMonitorListAndSystems(t *testing.T) {
	p := startRedfishDouble(t, "1", "2")
	p.powerOn(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// Two systems and none configured: the agent refuses to guess.
	a := p.agent(t, p.config(rfPass, "session"))
	if err := a.Off(ctx); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "redfish.system") {
		t.Fatalf("off with two systems and none chosen: %v", err)
	}
	if len(p.d.Resets()) != 0 {
		t.Fatal("a reset was sent although the system was ambiguous")
	}
	plugs, err := a.List(ctx)
	if err != nil || len(plugs) != 2 || plugs[0].ID != "1" || plugs[1].ID != "2" {
		t.Fatalf("list: %v %+v", err, plugs)
	}

	// System chosen by Id.
	c2 := p.config(rfPass, "session")
	c2.System = "2"
	a2 := p.agent(t, c2)
	if err := OnAndConfirm(ctx, a2, 10*time.Millisecond); err != nil {
		t.Fatalf("on system 2: %v", err)
	}
	if err := OffAndConfirm(ctx, a2, 10*time.Millisecond); err != nil {
		t.Fatalf("off system 2: %v", err)
	}
	if st, err := a.Status(ctx); err == nil {
		t.Fatalf("ambiguous agent read a status: %v", st)
	}
	c1 := p.config(rfPass, "session")
	c1.System = "1"
	a1 := p.agent(t, c1)
	if st, err := a1.Status(ctx); err != nil || st != PowerOn {
		t.Fatalf("system 1 was touched by system 2's fence: %v %v", st, err)
	}
	_ = a1.Close()
	c9 := p.config(rfPass, "session")
	c9.System = "9"
	if err := p.agent(t, c9).Monitor(ctx); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), `"9" not found`) {
		t.Fatalf("unknown system: %v", err)
	}

	// Monitor: fresh login, no leftover session, wrong password found.
	before, _ := p.d.Logins()
	if err := p.agent(t, c1).Monitor(ctx); err != nil {
		t.Fatalf("monitor: %v", err)
	}
	if after, _ := p.d.Logins(); after != before+1 {
		t.Fatalf("monitor did not log in afresh (%d -> %d)", before, after)
	}
	bad := c1
	bad.Password = NewSecret("nope-pw")
	if err := p.agent(t, bad).Monitor(ctx); !errors.Is(err, ErrAuth) || strings.Contains(err.Error(), "nope-pw") {
		t.Fatalf("monitor with a wrong password: %v", err)
	}
	badBasic := bad
	badBasic.Auth = "basic"
	if err := p.agent(t, badBasic).Monitor(ctx); !errors.Is(err, ErrAuth) {
		t.Fatalf("basic monitor with a wrong password: %v", err)
	}
	// The agents above were created by p.agent and are closed at cleanup;
	// Monitor itself must not leave sessions behind. a and a2 hold one each.
	if n := p.d.Sessions(); n != 2 {
		t.Fatalf("%d sessions open, want the 2 kept by a and a2", n)
	}
	_ = a.Close()
	_ = a2.Close()
	if n := p.d.Sessions(); n != 0 {
		t.Fatalf("%d sessions after Close", n)
	}
}

func TestRedfishSessionExpiryAndTLS(t *testing.T) {
	p := startRedfishDouble(t)
	p.powerOn(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a := p.agent(t, p.config(rfPass, "session"))
	if st, err := a.Status(ctx); err != nil || st != PowerOn {
		t.Fatalf("status: %v %v", st, err)
	}
	p.d.DropSessions() // BMC rebooted: the kept token is now invalid
	if st, err := a.Status(ctx); err != nil || st != PowerOn {
		t.Fatalf("status after the BMC dropped the session: %v %v", st, err)
	}
	if logins, _ := p.d.Logins(); logins != 2 {
		t.Fatalf("%d logins, want 2 (one re-login after expiry)", logins)
	}

	// Without the CA the certificate is not trusted: no fence through an
	// unverified BMC unless insecure_skip_verify says so.
	noCA := p.config(rfPass, "session")
	noCA.CAFile = ""
	err := p.agent(t, noCA).Monitor(ctx)
	if err == nil || !strings.Contains(err.Error(), "TLS verification") {
		t.Fatalf("unverified certificate accepted: %v", err)
	}
	// The httptest certificate names 127.0.0.1 and example.com; a wrong
	// tls_server_name must fail, the right one pass.
	wrongName := p.config(rfPass, "session")
	wrongName.TLSServerName = "bmc.invalid"
	if err := p.agent(t, wrongName).Monitor(ctx); err == nil || !strings.Contains(err.Error(), "TLS verification") {
		t.Fatalf("wrong server name accepted: %v", err)
	}
	rightName := p.config(rfPass, "session")
	rightName.TLSServerName = "example.com"
	if err := p.agent(t, rightName).Monitor(ctx); err != nil {
		t.Fatalf("tls_server_name example.com: %v", err)
	}
}

func TestRedfishSecretNotPrinted(t *testing.T) {
	cfg := RedfishConfig{Host: "bmc", User: "u", Password: NewSecret(rfPass)}
	js, _ := json.Marshal(cfg)
	for _, s := range []string{fmt.Sprintf("%v %+v %#v", cfg, cfg, cfg), string(js)} {
		if strings.Contains(s, rfPass) {
			t.Fatalf("config printing leaks the password: %s", s)
		}
	}
	a, err := NewRedfish(cfg, quiet())
	if err != nil {
		t.Fatal(err)
	}
	if s := fmt.Sprintf("%v %+v", a, a); strings.Contains(s, rfPass) {
		t.Fatalf("agent printing leaks the password: %s", s)
	}
}
