package fencing

import (
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
)

// Secret holds a password, community string or passphrase. Every way Go
// prints or serialises it (fmt verbs, slog, encoding/json) yields
// "[redacted]"; only Reveal returns the value, and only agents call it when
// they talk to the device. It can be read from JSON so a topology file can
// carry it.
type Secret struct{ v string }

// NewSecret wraps s.
func NewSecret(s string) Secret { return Secret{v: s} }

const redacted = "[redacted]"

// Reveal returns the secret for use on the wire. Never log the result.
func (s Secret) Reveal() string { return s.v }

// IsZero reports whether no secret was configured.
func (s Secret) IsZero() bool { return s.v == "" }

func (s Secret) String() string {
	if s.v == "" {
		return ""
	}
	return redacted
}

// GoString keeps %#v from printing the field.
func (s Secret) GoString() string { return `fencing.Secret("` + s.String() + `")` }

// LogValue keeps slog from printing the field.
func (s Secret) LogValue() slog.Value { return slog.StringValue(s.String()) }

// MarshalJSON writes the placeholder, never the value: API output and
// history records must not carry secrets.
func (s Secret) MarshalJSON() ([]byte, error) { return json.Marshal(s.String()) }

// UnmarshalJSON reads a plain JSON string. The placeholder itself is refused
// so a redacted config written back by mistake fails loudly instead of
// authenticating with "[redacted]".
func (s *Secret) UnmarshalJSON(b []byte) error {
	var v string
	if err := json.Unmarshal(b, &v); err != nil {
		return errors.New("fencing: secret must be a JSON string")
	}
	if v == redacted {
		return errors.New("fencing: secret is the redaction placeholder; put the real value in the config file")
	}
	s.v = v
	return nil
}

// redactError returns err with every secret replaced by the placeholder.
// Libraries and external programs sometimes echo credentials in their
// messages; this is the one choke point every agent error passes through.
// errors.Is still works for the sentinels and context errors that callers
// branch on, but the original (unredacted) chain is not reachable.
func redactError(err error, secrets ...Secret) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	changed := false
	for _, s := range secrets {
		if len(s.v) >= 1 && strings.Contains(msg, s.v) {
			msg = strings.ReplaceAll(msg, s.v, redacted)
			changed = true
		}
	}
	if !changed {
		return err
	}
	r := &redactedError{msg: msg}
	for _, target := range markerErrors {
		if errors.Is(err, target) {
			r.is = append(r.is, target)
		}
	}
	return r
}

type redactedError struct {
	msg string
	is  []error
}

func (e *redactedError) Error() string { return e.msg }

func (e *redactedError) Is(target error) bool {
	for _, t := range e.is {
		if t == target {
			return true
		}
	}
	return false
}
