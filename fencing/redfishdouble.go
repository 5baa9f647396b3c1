package fencing

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// RedfishDouble is a Redfish BMC for tests: an http.Handler that speaks the
// subset of real Redfish JSON that gofish, redfishtool and fence-agents'
// fence_redfish use (service root, Systems collection, ComputerSystem with
// PowerState and the #ComputerSystem.Reset action, SessionService with
// X-Auth-Token sessions, HTTP basic auth). Serve it over TLS with
// httptest.NewTLSServer. It lives outside _test.go files so other packages'
// tests (cmd/hasan) can fence against it. `hasan demo` uses it as the
// simulated BMC of each demo node; nothing else in production does.
//
// The first system's power is a real process (NodeCommand): On starts it,
// ForceOff SIGKILLs it, and PowerState reads whether it still runs, so a
// test can prove that a confirmed fence really killed the "host".
type RedfishDouble struct {
	user, password string
	nodeCmd        []string

	mu       sync.Mutex
	faults   RedfishFaults
	systems  []*doubleSystem
	sessions map[string]string // token -> session id
	nextSess int
	resets   []string
	logins   int
	authFail int
	broken   bool // a reset arrived while BreakStatusAfterReset was set
	quit     chan struct{}
	closed   bool
}

// RedfishFaults are injected BMC misbehaviours.
type RedfishFaults struct {
	// Stuck acknowledges ForceOff (204) but leaves the system on.
	Stuck bool
	// LateOff delays the power-off after ForceOff is acknowledged.
	LateOff time.Duration
	// Status500 answers GET of a system with HTTP 500.
	Status500 bool
	// NoPowerState omits PowerState from the system resource.
	NoPowerState bool
	// BreakStatusAfterReset arms Status500/NoPowerState only once a reset
	// has been received, so the off really happens but cannot be confirmed.
	BreakStatusAfterReset bool
	// Hang makes every request block until the client gives up.
	Hang bool
	// ResetTypes replaces the advertised ResetType allowable values.
	ResetTypes []string
	// NoResetAction omits the #ComputerSystem.Reset action.
	NoResetAction bool
	// EchoPassword puts the rejected password into the 401 message, as
	// careless firmware does, to prove the agent scrubs its errors.
	EchoPassword bool
}

type doubleSystem struct {
	id      string
	powered bool      // systems without a node process
	cmd     *exec.Cmd // node process of the first system
	done    chan struct{}
}

// NewRedfishDouble returns a BMC accepting user/password, with one system
// per id (default "1"). nodeCmd (e.g. {"sleep", "86400"}) is the first
// system's host process; nil models power as a flag. Every system starts
// powered off; call PowerOn. Close kills the node.
func NewRedfishDouble(user, password string, nodeCmd []string, ids ...string) *RedfishDouble {
	if len(ids) == 0 {
		ids = []string{"1"}
	}
	d := &RedfishDouble{user: user, password: password, nodeCmd: nodeCmd,
		sessions: map[string]string{}, quit: make(chan struct{})}
	for _, id := range ids {
		d.systems = append(d.systems, &doubleSystem{id: id})
	}
	return d
}

// SetFaults replaces the injected faults.
func (d *RedfishDouble) SetFaults(f RedfishFaults) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.faults, d.broken = f, false
}

// PowerOn powers the first system on directly (test setup).
func (d *RedfishDouble) PowerOn() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.powerOnLocked(d.systems[0])
}

// NodePID is the first system's node process id, 0 if it was never started.
func (d *RedfishDouble) NodePID() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	if c := d.systems[0].cmd; c != nil && c.Process != nil {
		return c.Process.Pid
	}
	return 0
}

// Powered reports whether the first system is on (its node process runs).
func (d *RedfishDouble) Powered() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.systems[0].on()
}

// Sessions is the number of open sessions.
func (d *RedfishDouble) Sessions() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.sessions)
}

// Logins counts successful session logins; AuthFailures counts rejected
// credentials and tokens.
func (d *RedfishDouble) Logins() (logins, authFailures int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.logins, d.authFail
}

// Resets lists the ResetType of every accepted reset, oldest first.
func (d *RedfishDouble) Resets() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.resets...)
}

// DropSessions forgets every session, as a BMC reboot or timeout does.
func (d *RedfishDouble) DropSessions() {
	d.mu.Lock()
	defer d.mu.Unlock()
	clear(d.sessions)
}

// Close releases hung requests and kills the node process.
func (d *RedfishDouble) Close() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.closed {
		d.closed = true
		close(d.quit)
	}
	for _, s := range d.systems {
		d.killLocked(s)
	}
}

func (s *doubleSystem) on() bool {
	if s.cmd == nil {
		return s.powered
	}
	select {
	case <-s.done:
		return false
	default:
		return true
	}
}

func (d *RedfishDouble) powerOnLocked(s *doubleSystem) error {
	if s != d.systems[0] || len(d.nodeCmd) == 0 {
		s.powered = true
		return nil
	}
	if s.on() {
		return nil
	}
	c := exec.Command(d.nodeCmd[0], d.nodeCmd[1:]...)
	if err := c.Start(); err != nil {
		return fmt.Errorf("fencing: redfish double: start node: %w", err)
	}
	done := make(chan struct{})
	go func() { _ = c.Wait(); close(done) }() // reaps, so /proc shows it gone
	s.cmd, s.done = c, done
	return nil
}

func (d *RedfishDouble) killLocked(s *doubleSystem) {
	s.powered = false
	if s.cmd != nil && s.on() {
		_ = s.cmd.Process.Signal(syscall.SIGKILL)
		<-s.done
	}
}

const odataVersion = "4.0"

func (d *RedfishDouble) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	d.mu.Lock()
	hang := d.faults.Hang
	d.mu.Unlock()
	if hang {
		select {
		case <-r.Context().Done():
		case <-d.quit:
		}
		return
	}
	w.Header().Set("OData-Version", odataVersion)
	path := strings.TrimSuffix(r.URL.Path, "/")
	switch {
	case path == "/redfish" && r.Method == http.MethodGet:
		writeJSON(w, http.StatusOK, map[string]any{"v1": "/redfish/v1/"})
	case path == "/redfish/v1" && r.Method == http.MethodGet:
		d.serviceRoot(w) // unauthenticated, as the spec requires
	case path == "/redfish/v1/SessionService/Sessions" && r.Method == http.MethodPost:
		d.login(w, r)
	default:
		if !d.authorized(r) {
			w.Header().Set("WWW-Authenticate", `Basic realm="hasan redfish double"`)
			redfishError(w, http.StatusUnauthorized, "Base.1.8.NoValidSession", "There is no valid session established with the implementation.")
			return
		}
		d.route(w, r, path)
	}
}

func (d *RedfishDouble) route(w http.ResponseWriter, r *http.Request, path string) {
	const sessPrefix = "/redfish/v1/SessionService/Sessions/"
	const sysPrefix = "/redfish/v1/Systems/"
	switch {
	case path == "/redfish/v1/SessionService" && r.Method == http.MethodGet:
		writeJSON(w, http.StatusOK, map[string]any{
			"@odata.id": "/redfish/v1/SessionService", "@odata.type": "#SessionService.v1_1_8.SessionService",
			"Id": "SessionService", "Name": "Session Service", "ServiceEnabled": true, "SessionTimeout": 1800,
			"Sessions": map[string]string{"@odata.id": "/redfish/v1/SessionService/Sessions"},
		})
	case path == "/redfish/v1/SessionService/Sessions" && r.Method == http.MethodGet:
		d.mu.Lock()
		var members []map[string]string
		for _, id := range d.sessions {
			members = append(members, map[string]string{"@odata.id": sessPrefix + id})
		}
		d.mu.Unlock()
		writeCollection(w, "/redfish/v1/SessionService/Sessions", "#SessionCollection.SessionCollection", members)
	case strings.HasPrefix(path, sessPrefix):
		d.session(w, r, strings.TrimPrefix(path, sessPrefix))
	case path == "/redfish/v1/Systems" && r.Method == http.MethodGet:
		var members []map[string]string
		for _, s := range d.systems {
			members = append(members, map[string]string{"@odata.id": sysPrefix + s.id})
		}
		writeCollection(w, "/redfish/v1/Systems", "#ComputerSystemCollection.ComputerSystemCollection", members)
	case strings.HasPrefix(path, sysPrefix):
		rest := strings.TrimPrefix(path, sysPrefix)
		id, action, _ := strings.Cut(rest, "/")
		s := d.find(id)
		switch {
		case s == nil:
			redfishError(w, http.StatusNotFound, "Base.1.8.ResourceMissingAtURI", "The resource at the URI "+r.URL.Path+" was not found.")
		case action == "" && r.Method == http.MethodGet:
			d.system(w, s)
		case action == "Actions/ComputerSystem.Reset" && r.Method == http.MethodPost:
			d.reset(w, r, s)
		default:
			redfishError(w, http.StatusMethodNotAllowed, "Base.1.8.OperationNotAllowed", "The operation is not allowed on "+r.URL.Path+".")
		}
	default:
		redfishError(w, http.StatusNotFound, "Base.1.8.ResourceMissingAtURI", "The resource at the URI "+r.URL.Path+" was not found.")
	}
}

func (d *RedfishDouble) find(id string) *doubleSystem {
	for _, s := range d.systems {
		if s.id == id {
			return s
		}
	}
	return nil
}

func (d *RedfishDouble) serviceRoot(w http.ResponseWriter) {
	writeJSON(w, http.StatusOK, map[string]any{
		"@odata.id": "/redfish/v1/", "@odata.type": "#ServiceRoot.v1_5_0.ServiceRoot",
		"Id": "RootService", "Name": "Root Service", "RedfishVersion": "1.6.0",
		"UUID":           "8e3a8f2c-5c1d-4d2b-9a55-6a1b2c3d4e5f",
		"Systems":        map[string]string{"@odata.id": "/redfish/v1/Systems"},
		"SessionService": map[string]string{"@odata.id": "/redfish/v1/SessionService"},
		"Links":          map[string]any{"Sessions": map[string]string{"@odata.id": "/redfish/v1/SessionService/Sessions"}},
	})
}

func (d *RedfishDouble) credentialsOK(user, pass string) bool {
	u := subtle.ConstantTimeCompare([]byte(user), []byte(d.user))
	p := subtle.ConstantTimeCompare([]byte(pass), []byte(d.password))
	return u&p == 1
}

func (d *RedfishDouble) authorized(r *http.Request) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if tok := r.Header.Get("X-Auth-Token"); tok != "" {
		if _, ok := d.sessions[tok]; ok {
			return true
		}
	} else if u, p, ok := r.BasicAuth(); ok && d.credentialsOK(u, p) {
		return true
	}
	d.authFail++
	return false
}

func (d *RedfishDouble) login(w http.ResponseWriter, r *http.Request) {
	var body struct{ UserName, Password string }
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		redfishError(w, http.StatusBadRequest, "Base.1.8.MalformedJSON", "The request body submitted was malformed JSON.")
		return
	}
	d.mu.Lock()
	if !d.credentialsOK(body.UserName, body.Password) {
		d.authFail++
		msg := "Invalid username or password."
		if d.faults.EchoPassword {
			msg = fmt.Sprintf("Invalid password %q for user %q.", body.Password, body.UserName)
		}
		d.mu.Unlock()
		redfishError(w, http.StatusUnauthorized, "Base.1.8.InsufficientPrivilege", msg)
		return
	}
	var b [16]byte
	_, _ = rand.Read(b[:])
	tok := hex.EncodeToString(b[:])
	d.nextSess++
	id := strconv.Itoa(d.nextSess)
	d.sessions[tok] = id
	d.logins++
	d.mu.Unlock()
	loc := "/redfish/v1/SessionService/Sessions/" + id
	w.Header().Set("X-Auth-Token", tok)
	w.Header().Set("Location", loc)
	writeJSON(w, http.StatusCreated, map[string]any{
		"@odata.id": loc, "@odata.type": "#Session.v1_3_0.Session", "Id": id, "Name": "User Session", "UserName": body.UserName,
	})
}

func (d *RedfishDouble) session(w http.ResponseWriter, r *http.Request, id string) {
	d.mu.Lock()
	tok := ""
	for t, sid := range d.sessions {
		if sid == id {
			tok = t
		}
	}
	if tok == "" {
		d.mu.Unlock()
		redfishError(w, http.StatusNotFound, "Base.1.8.ResourceMissingAtURI", "No session "+id+".")
		return
	}
	switch r.Method {
	case http.MethodDelete:
		delete(d.sessions, tok)
		d.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	case http.MethodGet:
		d.mu.Unlock()
		writeJSON(w, http.StatusOK, map[string]any{
			"@odata.id": "/redfish/v1/SessionService/Sessions/" + id, "@odata.type": "#Session.v1_3_0.Session",
			"Id": id, "Name": "User Session", "UserName": d.user,
		})
	default:
		d.mu.Unlock()
		redfishError(w, http.StatusMethodNotAllowed, "Base.1.8.OperationNotAllowed", "Sessions can be read or deleted.")
	}
}

func (d *RedfishDouble) system(w http.ResponseWriter, s *doubleSystem) {
	d.mu.Lock()
	f, broken := d.faults, d.broken || !d.faults.BreakStatusAfterReset
	on := s.on()
	d.mu.Unlock()
	if f.Status500 && broken {
		redfishError(w, http.StatusInternalServerError, "Base.1.8.InternalError",
			"The request failed due to an internal service error.")
		return
	}
	uri := "/redfish/v1/Systems/" + s.id
	sys := map[string]any{
		"@odata.id": uri, "@odata.type": "#ComputerSystem.v1_13_0.ComputerSystem",
		"Id": s.id, "Name": "hasan test host " + s.id, "SystemType": "Physical",
		"Manufacturer": "hasan", "Model": "Redfish double",
		"Status": map[string]string{"State": "Enabled", "Health": "OK"},
	}
	allowed := []string{"On", "ForceOff", "GracefulShutdown", "ForceRestart"}
	if f.ResetTypes != nil {
		allowed = f.ResetTypes
	}
	if !f.NoResetAction {
		sys["Actions"] = map[string]any{"#ComputerSystem.Reset": map[string]any{
			"target":                            uri + "/Actions/ComputerSystem.Reset",
			"ResetType@Redfish.AllowableValues": allowed,
		}}
	}
	if !(f.NoPowerState && broken) {
		if on {
			sys["PowerState"] = "On"
		} else {
			sys["PowerState"] = "Off"
		}
	}
	writeJSON(w, http.StatusOK, sys)
}

func (d *RedfishDouble) reset(w http.ResponseWriter, r *http.Request, s *doubleSystem) {
	var body struct{ ResetType string }
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		redfishError(w, http.StatusBadRequest, "Base.1.8.MalformedJSON", "The request body submitted was malformed JSON.")
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	switch body.ResetType {
	case "On":
		if err := d.powerOnLocked(s); err != nil {
			redfishError(w, http.StatusInternalServerError, "Base.1.8.InternalError", err.Error())
			return
		}
	case "ForceOff":
		switch {
		case d.faults.Stuck:
		case d.faults.LateOff > 0:
			late := d.faults.LateOff
			go func() {
				select {
				case <-time.After(late):
				case <-d.quit:
				}
				d.mu.Lock()
				defer d.mu.Unlock()
				d.killLocked(s)
			}()
		default:
			d.killLocked(s)
		}
	case "GracefulShutdown", "ForceRestart":
		// Accepted but not modelled: fencing must never rely on them.
	default:
		redfishError(w, http.StatusBadRequest, "Base.1.8.ActionParameterValueNotInList",
			"The value "+body.ResetType+" for the parameter ResetType is not in the list of acceptable values.")
		return
	}
	d.resets = append(d.resets, body.ResetType)
	if d.faults.BreakStatusAfterReset {
		d.broken = true
	}
	w.WriteHeader(http.StatusNoContent)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func writeCollection(w http.ResponseWriter, id, typ string, members []map[string]string) {
	if members == nil {
		members = []map[string]string{}
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"@odata.id": id, "@odata.type": typ, "Name": "Collection",
		"Members": members, "Members@odata.count": len(members),
	})
}

func redfishError(w http.ResponseWriter, code int, msgID, msg string) {
	writeJSON(w, code, map[string]any{"error": map[string]any{
		"code": "Base.1.8.GeneralError", "message": "A general error has occurred. See ExtendedInfo for more information.",
		"@Message.ExtendedInfo": []map[string]any{{"MessageId": msgID, "Message": msg, "Severity": "Critical"}},
	}})
}
