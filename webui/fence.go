package webui

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"reflect"
	"slices"
	"strings"

	"github.com/gin-gonic/gin"

	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/fencing"
)

// fenceDeviceView is a fence device as the API shows it. Config is decoded
// into fencing.DeviceConfig, whose fencing.Secret fields marshal as
// "[redacted]"; the stored bytes (secrets in clear) are never written out.
type fenceDeviceView struct {
	Name   string               `json:"name"`
	Type   string               `json:"type"`
	Config fencing.DeviceConfig `json:"config"`
	// UsedBy lists the nodes whose topology names the device: while it is
	// not empty the device cannot be deleted.
	UsedBy []string `json:"used_by"`
}

func viewFenceDevice(d cluster.FenceDevice, nodes []cluster.NodeInfo) (fenceDeviceView, error) {
	dc, err := d.DeviceConfig()
	if err != nil {
		return fenceDeviceView{}, err
	}
	v := fenceDeviceView{Name: d.Name, Type: d.Type, Config: dc, UsedBy: []string{}}
	for _, n := range nodes {
		for _, lvl := range n.Fence.Levels {
			if slices.Contains(lvl, d.Name) {
				v.UsedBy = append(v.UsedBy, n.ID)
				break
			}
		}
	}
	return v, nil
}

func (s *Server) listFenceDevices(c *gin.Context) {
	reply(s, c, http.StatusOK, func(ctx context.Context) ([]fenceDeviceView, error) {
		ds, err := s.svc.FenceDevices(ctx)
		if err != nil {
			return nil, err
		}
		nodes, err := s.svc.Nodes(ctx)
		if err != nil {
			return nil, err
		}
		out := make([]fenceDeviceView, 0, len(ds))
		for _, d := range ds {
			v, err := viewFenceDevice(d, nodes)
			if err != nil {
				return nil, err
			}
			out = append(out, v)
		}
		return out, nil
	})
}

func (s *Server) getFenceDevice(c *gin.Context) {
	reply(s, c, http.StatusOK, func(ctx context.Context) (fenceDeviceView, error) {
		d, err := s.svc.FenceDevice(ctx, c.Param("name"))
		if err != nil {
			return fenceDeviceView{}, err
		}
		nodes, err := s.svc.Nodes(ctx)
		if err != nil {
			return fenceDeviceView{}, err
		}
		return viewFenceDevice(d, nodes)
	})
}

// validName repeats cluster's id rule so a bad path parameter is a 400
// naming the field rather than the cluster's generic refusal.
func validName(field, id string) error {
	if id == "" || len(id) > 64 {
		return invalid(field, "%q: 1 to 64 characters", id)
	}
	for _, r := range id {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return invalid(field, "%q: only a-z, 0-9, '-', '_' and '.'", id)
		}
	}
	return nil
}

// putFenceDevice takes the device's fencing.DeviceConfig as the body, the
// same JSON as one entry of the "devices" map in docs/fencing.md. Every
// error on this path is scrubbed of the request's secrets before it is
// rendered or logged.
func (s *Server) putFenceDevice(c *gin.Context) {
	name := c.Param("name")
	if err := validName("name", name); err != nil {
		s.fail(c, err)
		return
	}
	raw, err := io.ReadAll(c.Request.Body)
	if err != nil {
		s.fail(c, err) // *http.MaxBytesError → 413
		return
	}
	var dc fencing.DeviceConfig
	if err := decodeJSON(bytes.NewReader(raw), &dc); err != nil {
		s.fail(c, scrub(err, secretsIn(raw)))
		return
	}
	secrets := secretsOf(dc)
	if err := (fencing.Config{Devices: map[string]fencing.DeviceConfig{name: dc}}).Validate(); err != nil {
		s.fail(c, scrub(fenceConfigError(name, err), secrets))
		return
	}
	var compact bytes.Buffer
	if err := json.Compact(&compact, raw); err != nil {
		s.fail(c, invalid("body", "invalid JSON"))
		return
	}
	ctx, cancel := s.ctx(c)
	defer cancel()
	if err := s.svc.PutFenceDevice(ctx, name, compact.Bytes()); err != nil {
		s.fail(c, scrub(err, secrets))
		return
	}
	c.JSON(http.StatusOK, fenceDeviceView{Name: name, Type: dc.Type, Config: dc, UsedBy: s.usedBy(ctx, name)})
}

// usedBy is best effort: the put has succeeded, a failed read only leaves
// the list empty.
func (s *Server) usedBy(ctx context.Context, name string) []string {
	out := []string{}
	nodes, err := s.svc.Nodes(ctx)
	if err != nil {
		return out
	}
	for _, n := range nodes {
		for _, lvl := range n.Fence.Levels {
			if slices.Contains(lvl, name) {
				out = append(out, n.ID)
				break
			}
		}
	}
	return out
}

func (s *Server) deleteFenceDevice(c *gin.Context) {
	done(s, c, func(ctx context.Context) error { return s.svc.DeleteFenceDevice(ctx, c.Param("name")) })
}

// putNodeFence checks the topology's shape here so the error names the
// level; whether the devices exist is the service's (404) and the
// cluster's business.
func (s *Server) putNodeFence(c *gin.Context) {
	var t fencing.NodeTopology
	if err := bind(c, &t); err != nil {
		s.fail(c, err)
		return
	}
	if err := checkTopology(t); err != nil {
		s.fail(c, err)
		return
	}
	done(s, c, func(ctx context.Context) error { return s.svc.SetNodeFence(ctx, c.Param("id"), t) })
}

type confirmReq struct {
	Operator string `json:"operator"`
	// VerifiedOff is the operator's explicit acknowledgement that they
	// checked the node is powered off: the request is refused without it,
	// so no client can confirm by sending a name alone.
	VerifiedOff bool `json:"verified_off"`
}

// confirmFence is the API side of a manual fence: an operator states that
// the node is off. The cluster records it with the operator's name and
// time (an alert event), a manual fence device of the node then reads off,
// and the controller's waiting takeover goes on. A node that is not really
// off then writes the same volumes as its successor, so the body must
// carry verified_off: true, and the console or CLI must show
// fencing.ManualWarning before sending it.
func (s *Server) confirmFence(c *gin.Context) {
	var req confirmReq
	if err := bind(c, &req); err != nil {
		s.fail(c, err)
		return
	}
	op := strings.TrimSpace(req.Operator)
	if op == "" || len(op) > 128 {
		s.fail(c, invalid("operator", "name who confirms (1 to 128 bytes): a confirmation lets a takeover proceed"))
		return
	}
	if !req.VerifiedOff {
		s.fail(c, invalid("verified_off", "must be true: you state that you checked the node is powered off; "+
			"if it is still running, the takeover this allows lets two nodes write the same volumes and CORRUPTS DATA"))
		return
	}
	s.log.Warn("webui: operator confirms a node is off", "node", c.Param("id"), "operator", op)
	done(s, c, func(ctx context.Context) error { return s.svc.ConfirmFence(ctx, c.Param("id"), op) })
}

func checkTopology(t fencing.NodeTopology) error {
	if t.Action != "" && t.Action != fencing.ActionOff && t.Action != fencing.ActionReboot {
		return invalid("action", "want off or reboot, got %q", t.Action)
	}
	if len(t.Levels) == 0 {
		return invalid("levels", "at least one level is required")
	}
	for i, lvl := range t.Levels {
		if len(lvl) == 0 {
			return invalid(fmt.Sprintf("levels[%d]", i), "a level needs at least one device")
		}
		for j, d := range lvl {
			if strings.TrimSpace(d) == "" {
				return invalid(fmt.Sprintf("levels[%d][%d]", i, j), "required")
			}
			if slices.Contains(lvl[:j], d) {
				return invalid(fmt.Sprintf("levels[%d]", i), "device %q listed twice", d)
			}
		}
	}
	return nil
}

// fenceConfigError turns fencing's validation message, which names the
// field inside the device ("devices.bmc: fencing: invalid config:
// ipmi.host: required"), into a ValidationError on that field.
func fenceConfigError(name string, err error) error {
	if !errors.Is(err, fencing.ErrInvalidConfig) {
		return invalid("body", "%v", err)
	}
	msg := err.Error()
	msg = strings.TrimPrefix(msg, "devices."+name+": ")
	msg = strings.TrimPrefix(msg, fencing.ErrInvalidConfig.Error()+": ")
	msg = strings.TrimPrefix(msg, "devices."+name+".")
	field, rest, ok := strings.Cut(msg, ": ")
	if !ok || strings.ContainsAny(field, " \"") {
		return invalid("body", "%s", msg)
	}
	return invalid(field, "%s", rest)
}

// secretType is how secretsOf recognises a secret field, wherever the
// device's config keeps it.
var secretType = reflect.TypeFor[fencing.Secret]()

// secretsOf returns every non-empty secret in dc. It walks the value by
// reflection so a secret field added to a device type later is covered
// without a change here.
func secretsOf(dc fencing.DeviceConfig) []string {
	var out []string
	var walk func(v reflect.Value)
	walk = func(v reflect.Value) {
		if v.Type() == secretType {
			if s := v.Interface().(fencing.Secret).Reveal(); s != "" {
				out = append(out, s)
			}
			return
		}
		switch v.Kind() {
		case reflect.Pointer, reflect.Interface:
			if !v.IsNil() {
				walk(v.Elem())
			}
		case reflect.Struct:
			for i := range v.NumField() {
				if v.Type().Field(i).IsExported() {
					walk(v.Field(i))
				}
			}
		case reflect.Map:
			for it := v.MapRange(); it.Next(); {
				walk(it.Value())
			}
		case reflect.Slice, reflect.Array:
			for i := range v.Len() {
				walk(v.Index(i))
			}
		}
	}
	walk(reflect.ValueOf(dc))
	return out
}

// secretsIn is the fallback when the body does not decode as a device:
// every JSON string value of four bytes or more (object keys excepted) is
// treated as a possible secret. Shorter values are left alone so that a
// one-letter value does not blank out the whole message.
func secretsIn(raw []byte) []string {
	var (
		out   []string
		stack []jsonFrame
	)
	dec := json.NewDecoder(bytes.NewReader(raw))
	for {
		tok, err := dec.Token()
		if err != nil {
			return out
		}
		if d, ok := tok.(json.Delim); ok {
			switch d {
			case '{':
				stack = append(stack, jsonFrame{object: true, wantKey: true})
			case '[':
				stack = append(stack, jsonFrame{})
			default:
				// Token has checked the nesting; the guard only keeps a
				// decoder bug from becoming a panic.
				if len(stack) > 0 {
					stack = stack[:len(stack)-1]
				}
				valueDone(stack)
			}
			continue
		}
		if n := len(stack); n > 0 && stack[n-1].object && stack[n-1].wantKey {
			stack[n-1].wantKey = false
			continue
		}
		if v, ok := tok.(string); ok && len(v) >= 4 {
			out = append(out, v)
		}
		valueDone(stack)
	}
}

// jsonFrame is an open object or array while secretsIn walks tokens.
type jsonFrame struct{ object, wantKey bool }

// valueDone notes that a value ended: in an object, a key comes next.
func valueDone(stack []jsonFrame) {
	if n := len(stack); n > 0 && stack[n-1].object {
		stack[n-1].wantKey = true
	}
}

// scrubbedError is an error whose text had secrets removed. It answers
// errors.Is like the original so the error table still classifies it, but
// the original text is not reachable through it.
type scrubbedError struct {
	msg string
	err error
}

func (e *scrubbedError) Error() string        { return e.msg }
func (e *scrubbedError) Is(target error) bool { return errors.Is(e.err, target) }

const redactedText = "[redacted]"

// scrub returns err with every secret replaced by a placeholder; err
// itself when no secret occurs in it.
func scrub(err error, secrets []string) error {
	if err == nil || len(secrets) == 0 {
		return err
	}
	replace := func(s string) (string, bool) {
		changed := false
		for _, sec := range secrets {
			if strings.Contains(s, sec) {
				s = strings.ReplaceAll(s, sec, redactedText)
				changed = true
			}
		}
		return s, changed
	}
	var ve *ValidationError
	if errors.As(err, &ve) {
		f, fc := replace(ve.Field)
		m, mc := replace(ve.Msg)
		if fc || mc {
			return &ValidationError{Field: f, Msg: m}
		}
		return err
	}
	if msg, changed := replace(err.Error()); changed {
		return &scrubbedError{msg: msg, err: err}
	}
	return err
}
