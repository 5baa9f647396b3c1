package webui

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/fencing"
)

func TestFenceValidation(t *testing.T) {
	cases := []struct {
		method, path, body string
		status             int
		field              string
		msg                string
	}{
		{"PUT", "/api/v1/fence-devices/BMC", `{"type":"manual","manual":{"node":"n1"}}`, 400, "name", "a-z"},
		{"PUT", "/api/v1/fence-devices/bmc2", ``, 400, "body", "required"},
		{"PUT", "/api/v1/fence-devices/bmc2", `{"type":"ipmi","ipmi":{"user":"u","password":"pw-123456"}}`, 400, "ipmi.host", "required"},
		{"PUT", "/api/v1/fence-devices/bmc2", `{"type":"ipmi"}`, 400, "ipmi", "section required"},
		{"PUT", "/api/v1/fence-devices/bmc2", `{"type":"foo"}`, 400, "type", "want ipmi"},
		{"PUT", "/api/v1/fence-devices/bmc2", `{"type":"manual","timeout":"-1s","manual":{"node":"n1"}}`, 400, "timeout", "negative"},
		{"PUT", "/api/v1/fence-devices/bmc2", `{"type":"manual","manual":{"node":"n1"},"colour":1}`, 400, "colour", "unknown"},
		{"PUT", "/api/v1/fence-devices/bmc2", `{"type":"manual","manual":{"node":"n1","extra":1}}`, 400, "extra", "unknown"},
		{"PUT", "/api/v1/fence-devices/bmc2", `{"type":"manual","timeout":"soon","manual":{"node":"n1"}}`, 400, "body", ""},
		{"PUT", "/api/v1/fence-devices/bmc2", `{"type":"ipmi","ipmi":{"host":"h","user":"u","password":"[redacted]"}}`, 400, "body", "placeholder"},
		{"PUT", "/api/v1/fence-devices/bmc2", `{"type":"apc-snmp","apc_snmp":{"host":"h","version":"2c","outlets":["1"]}}`, 400, "apc_snmp.community", "required"},
		{"PUT", "/api/v1/nodes/n1/fence", `{"action":"halt","levels":[["bmc1"]]}`, 400, "action", "off or reboot"},
		{"PUT", "/api/v1/nodes/n1/fence", `{"levels":[]}`, 400, "levels", "at least one"},
		{"PUT", "/api/v1/nodes/n1/fence", `{"levels":[["bmc1"],[]]}`, 400, "levels[1]", "at least one device"},
		{"PUT", "/api/v1/nodes/n1/fence", `{"levels":[["bmc1",""]]}`, 400, "levels[0][1]", "required"},
		{"PUT", "/api/v1/nodes/n1/fence", `{"levels":[["bmc1","bmc1"]]}`, 400, "levels[0]", "twice"},
		{"PUT", "/api/v1/nodes/n1/fence", `{"levels":[["bmc1"]],"timeout":1}`, 400, "timeout", "unknown"},
		{"PUT", "/api/v1/nodes/n1/fence", `{"levels":[["bmc1"],["ghost"]]}`, 404, "", "fence device ghost"},
		{"PUT", "/api/v1/nodes/nobody/fence", `{"levels":[["bmc1"]]}`, 404, "", "node nobody"},
		{"POST", "/api/v1/nodes/n1/fence-confirm", `{}`, 400, "operator", "name who confirms"},
		{"POST", "/api/v1/nodes/n1/fence-confirm", `{"operator":"  "}`, 400, "operator", "1 to 128"},
		{"POST", "/api/v1/nodes/n1/fence-confirm", `{"operator":"alice"}`, 400, "verified_off", "CORRUPTS DATA"},
		{"POST", "/api/v1/nodes/n1/fence-confirm", `{"operator":"alice","verified_off":false}`, 400, "verified_off", "must be true"},
		{"POST", "/api/v1/nodes/n9/fence-confirm", `{"operator":"alice","verified_off":true}`, 404, "", "node n9"},
		{"GET", "/api/v1/fence-devices/ghost", ``, 404, "", "not found"},
		{"DELETE", "/api/v1/fence-devices/ghost", ``, 404, "", "fence device ghost"},
		{"DELETE", "/api/v1/fence-devices/bmc1", ``, 409, "", "node n1's topology"},
	}
	for _, c := range cases {
		t.Run(c.method+" "+c.path+" "+c.body, func(t *testing.T) {
			f := newFake()
			s := newTestServer(t, f, Config{})
			w := do(t, s.Handler(), c.method, c.path, c.body)
			if w.Code != c.status {
				t.Fatalf("status %d, want %d: %s", w.Code, c.status, w.Body)
			}
			eb := decodeErr(t, w)
			if eb.Field != c.field || !strings.Contains(eb.Error, c.msg) {
				t.Errorf("got %+v, want field %q and %q in the message", eb, c.field, c.msg)
			}
			if c.status == 400 && len(f.calls) != 0 {
				t.Errorf("invalid request reached the service: %v", f.calls)
			}
		})
	}
}

// syncBuffer collects log output written from handler goroutines.
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

// TestFenceSecretsNeverReturned puts devices of every type with secrets in
// every secret field, makes the put fail in every way (validation, cluster
// refusal quoting the secret, an internal error quoting it), reads every
// fence route back, and checks that no response and no log line carries a
// secret.
func TestFenceSecretsNeverReturned(t *testing.T) {
	f := newFake()
	var logs syncBuffer
	s, err := New(Config{Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))}, f)
	if err != nil {
		t.Fatal(err)
	}
	h := s.Handler()
	secrets := []string{fakeDeviceSecret, "ipmi-pass-aaaa", "community-bbbb", "authpass-cccc", "privpass-dddd",
		"redfish-pass-eeee", "external-pass-ffff", "bad-put-gggg", "refused-hhhh", "internal-iiii", "syntax-jjjj"}
	puts := []struct {
		name, body string
		status     int
	}{
		{"bmc2", `{"type":"ipmi","ipmi":{"host":"10.0.0.12","user":"fence","password":"ipmi-pass-aaaa"}}`, 200},
		{"pdu1", `{"type":"apc-snmp","apc_snmp":{"host":"10.0.0.21","version":"2c","community":"community-bbbb","outlets":["1"]}}`, 200},
		{"pdu2", `{"type":"apc-snmp","apc_snmp":{"host":"10.0.0.22","version":"3","user":"u","auth_pass":"authpass-cccc","priv_pass":"privpass-dddd","outlets":["2"]}}`, 200},
		{"rf1", `{"type":"redfish","redfish":{"host":"10.0.0.13","user":"fence","password":"redfish-pass-eeee"}}`, 200},
		{"ext1", `{"type":"external","external":{"program":"fence_x","params":{"ip":"10.0.0.14"},"secrets":{"password":"external-pass-ffff"}}}`, 200},
		// Invalid: the secret is in the rejected body.
		{"bad1", `{"type":"ipmi","ipmi":{"user":"u","password":"bad-put-gggg"}}`, 400},
		{"bad2", `{"type":"ipmi","ipmi":{"host":"h","user":"u","password":"syntax-jjjj"}`, 400},
		{"bad3", `{"type":"ipmi","ipmi":{"host":"h","user":"u","password":"syntax-jjjj","port":"x"}}`, 400},
	}
	var bodies []string
	for _, p := range puts {
		w := do(t, h, "PUT", "/api/v1/fence-devices/"+p.name, p.body)
		if w.Code != p.status {
			t.Fatalf("put %s: %d, want %d: %s", p.name, w.Code, p.status, w.Body)
		}
		bodies = append(bodies, w.Body.String())
	}
	// The cluster refuses and quotes the secret (it must not, but the API
	// must hold even if it does).
	f.err = fmt.Errorf("%w: password %q rejected", cluster.ErrInvalid, "refused-hhhh")
	w := do(t, h, "PUT", "/api/v1/fence-devices/rf2", `{"type":"redfish","redfish":{"host":"h","user":"u","password":"refused-hhhh"}}`)
	if w.Code != 400 || !strings.Contains(w.Body.String(), "[redacted]") {
		t.Fatalf("refused put: %d %s", w.Code, w.Body)
	}
	bodies = append(bodies, w.Body.String())
	f.err = errors.New("bolt: write failed for internal-iiii")
	w = do(t, h, "PUT", "/api/v1/fence-devices/rf3", `{"type":"redfish","redfish":{"host":"h","user":"u","password":"internal-iiii"}}`)
	if w.Code != 500 {
		t.Fatalf("internal error: %d %s", w.Code, w.Body)
	}
	bodies = append(bodies, w.Body.String())
	f.err = nil

	for _, path := range []string{"/api/v1/fence-devices", "/api/v1/fence-devices/bmc1", "/api/v1/fence-devices/bmc2",
		"/api/v1/fence-devices/pdu1", "/api/v1/fence-devices/pdu2", "/api/v1/fence-devices/rf1", "/api/v1/fence-devices/ext1",
		"/api/v1/nodes", "/api/v1/nodes/n1", "/api/v1/cluster", "/api/v1/fence-history", "/api/v1/events"} {
		w := do(t, h, "GET", path, "")
		if w.Code != 200 {
			t.Fatalf("GET %s: %d %s", path, w.Code, w.Body)
		}
		bodies = append(bodies, w.Body.String())
	}
	all := strings.Join(bodies, "\n") + "\n" + logs.String()
	for _, sec := range secrets {
		if strings.Contains(all, sec) {
			t.Errorf("secret %q appears in a response or log", sec)
		}
	}
	// Not vacuous: the secrets reached the store, the 500 was logged, and
	// the views show that secrets are set.
	dc, err := f.st.FenceDevices["ext1"].DeviceConfig()
	if err != nil || dc.External.Secrets["password"].Reveal() != "external-pass-ffff" {
		t.Fatalf("external secret not stored: %+v %v", dc.External, err)
	}
	if dc, _ := f.st.FenceDevices["pdu2"].DeviceConfig(); dc.APC.PrivPass.Reveal() != "privpass-dddd" {
		t.Fatal("priv_pass not stored")
	}
	if !strings.Contains(logs.String(), "bolt: write failed for [redacted]") {
		t.Fatalf("500 not logged:\n%s", logs.String())
	}
	if n := strings.Count(all, `"[redacted]"`); n < 6 {
		t.Errorf("only %d redacted placeholders in the responses", n)
	}
}

func TestSecretsOfFindsEveryField(t *testing.T) {
	dc := fencing.DeviceConfig{
		IPMI:     &fencing.IPMIConfig{Password: fencing.NewSecret("a")},
		APC:      &fencing.APCConfig{Community: fencing.NewSecret("b"), AuthPass: fencing.NewSecret("c"), PrivPass: fencing.NewSecret("d")},
		Redfish:  &fencing.RedfishConfig{Password: fencing.NewSecret("e")},
		External: &fencing.ExternalConfig{Secrets: map[string]fencing.Secret{"x": fencing.NewSecret("f"), "y": fencing.NewSecret("")}},
	}
	got := strings.Join(slices.Sorted(slices.Values(secretsOf(dc))), "")
	if got != "abcdef" {
		t.Errorf("secretsOf = %q, want abcdef", got)
	}
}

func TestScrubKeepsClass(t *testing.T) {
	err := scrub(fmt.Errorf("%w: pw s3cr3t-value", cluster.ErrInUse), []string{"s3cr3t-value"})
	if !errors.Is(err, cluster.ErrInUse) || strings.Contains(err.Error(), "s3cr3t") {
		t.Fatalf("scrubbed %v", err)
	}
	status, body, _ := statusOf(err)
	if status != 409 || !strings.Contains(body.Error, "[redacted]") {
		t.Fatalf("status %d %+v", status, body)
	}
	plain := fmt.Errorf("%w: x", cluster.ErrNotFound)
	if scrub(plain, []string{"nothere"}) != plain {
		t.Error("error without a secret was rewrapped")
	}
}

// deviceOut is fenceDeviceView as a client decodes it: fencing.Secret
// refuses the placeholder on input, so the config stays generic here.
type deviceOut struct {
	Name   string         `json:"name"`
	Type   string         `json:"type"`
	Config map[string]any `json:"config"`
	UsedBy []string       `json:"used_by"`
}

func (d deviceOut) section(name string) map[string]any {
	m, _ := d.Config[name].(map[string]any)
	return m
}

func TestSecretsIn(t *testing.T) {
	got := secretsIn([]byte(`{"type":"ipmi","ipmi":{"host":"h","user":"fence","password":"pw-long-1","list":["abcd","x"]},"n":5,"k":{"a":"bcde"}}`))
	want := []string{"ipmi", "fence", "pw-long-1", "abcd", "bcde"}
	if !slices.Equal(got, want) {
		t.Errorf("secretsIn = %q, want %q", got, want)
	}
	// A body cut short still yields what came before the cut.
	if got := secretsIn([]byte(`{"ipmi":{"password":"cut-secret-1"`)); !slices.Equal(got, []string{"cut-secret-1"}) {
		t.Errorf("truncated: %q", got)
	}
}

func FuzzSecretsIn(f *testing.F) {
	for _, s := range []string{`{"a":"bcde"}`, `[`, `]`, `{"a":[{"b":"cdef"}]}`, `"x"`, `{"a":}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, s := range secretsIn(b) {
			if len(s) < 4 {
				t.Fatalf("short value %q returned", s)
			}
		}
	})
}
