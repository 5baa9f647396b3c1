package target

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/hasan-storage/hasan/target/iscsi"
	"github.com/hasan-storage/hasan/target/scsi"
)

// LUN is what the target needs from a logical unit. target/scsi's LU
// implements it; tests use fakes.
type LUN interface {
	// Execute runs one SCSI task. It may be called from many goroutines at
	// once; ctx is cancelled when the task is aborted.
	Execute(ctx context.Context, cmd *scsi.Command) *scsi.Response
	// Reset performs a LUN or target reset requested through nexus by.
	Reset(kind scsi.ResetKind, by scsi.ITNexus)
	// NexusLost tells the LU that the I_T nexus n is gone (session ended).
	NexusLost(n scsi.ITNexus)
	// LUNsChanged queues REPORTED LUNS DATA HAS CHANGED for every nexus.
	LUNsChanged()
}

// ErrServerClosed is returned by Serve after Close or Shutdown.
var ErrServerClosed = errors.New("target: server closed")

// Sentinel errors for the management API.
var (
	ErrTargetExists   = errors.New("target: target already exists")
	ErrTargetNotFound = errors.New("target: no such target")
	ErrLUNExists      = errors.New("target: LUN already exists")
	ErrLUNNotFound    = errors.New("target: no such LUN")
)

// CHAP is one CHAP account. Its Secret never appears in logs or %v output.
type CHAP struct {
	User, Secret string
}

// String redacts the secret.
func (c CHAP) String() string { return fmt.Sprintf("CHAP{User:%q Secret:<redacted>}", c.User) }

// GoString redacts the secret for %#v.
func (c CHAP) GoString() string { return c.String() }

// LogValue redacts the secret for slog.
func (c CHAP) LogValue() slog.Value {
	return slog.GroupValue(slog.String("user", c.User), slog.String("secret", "<redacted>"))
}

func (c *CHAP) validate(field string, log *slog.Logger) error {
	if c == nil {
		return nil
	}
	if c.User == "" {
		return fmt.Errorf("target: %s.User is empty", field)
	}
	if c.Secret == "" {
		return fmt.Errorf("target: %s.Secret is empty", field)
	}
	if len(c.Secret) > 255 {
		return fmt.Errorf("target: %s.Secret longer than 255 bytes", field)
	}
	if len(c.Secret) < 12 && log != nil {
		log.Warn("target: CHAP secret shorter than 12 bytes; many initiators (open-iscsi, Windows) refuse it",
			"field", field, "user", c.User)
	}
	return nil
}

// Config configures a Server. The zero value is usable.
type Config struct {
	// Logger receives connection and session events; nil discards.
	Logger *slog.Logger
	// NopInInterval is how often an idle full-feature connection is pinged
	// with NOP-In; 0 means 5 s, negative disables pings.
	NopInInterval time.Duration
	// NopInTimeout is how long a ping may go unanswered (no PDU at all
	// from the initiator) before the connection is dropped; 0 means 15 s.
	NopInTimeout time.Duration
	// LoginTimeout bounds the whole login phase of one connection; 0 means
	// 15 s.
	LoginTimeout time.Duration
	// MaxRecvDataSegmentLength is what the target declares; 0 means 256 KiB.
	MaxRecvDataSegmentLength uint32
	// MaxBurstLength and FirstBurstLength cap what initiators may
	// negotiate; 0 means 16 MiB - 1.
	MaxBurstLength, FirstBurstLength uint32
	// MaxOutstandingR2T caps R2Ts in flight per task; 0 means 16.
	MaxOutstandingR2T uint32
	// InitialR2T forces R2T for all write data (default No: unsolicited
	// data allowed). NoImmediateData refuses immediate data.
	InitialR2T      bool
	NoImmediateData bool
	// DisableDigests refuses CRC32C header and data digests.
	DisableDigests bool
	// CmdWindow is the number of commands an initiator may have
	// outstanding per session (MaxCmdSN - ExpCmdSN + 1); 0 means 128.
	CmdWindow uint32
	// DiscoveryCHAP, when set, is required for discovery sessions.
	DiscoveryCHAP *CHAP
	// ShutdownLogoutWait is the logout deadline (in seconds) announced to
	// initiators in the Async Message sent by Shutdown; 0 means 2.
	ShutdownLogoutWait uint16
}

func (c Config) withDefaults() Config {
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.NopInInterval == 0 {
		c.NopInInterval = 5 * time.Second
	}
	if c.NopInTimeout == 0 {
		c.NopInTimeout = 15 * time.Second
	}
	if c.LoginTimeout == 0 {
		c.LoginTimeout = 15 * time.Second
	}
	if c.MaxRecvDataSegmentLength == 0 {
		c.MaxRecvDataSegmentLength = 256 << 10
	}
	if c.MaxBurstLength == 0 {
		c.MaxBurstLength = iscsi.MaxDataSegmentV
	}
	if c.FirstBurstLength == 0 {
		c.FirstBurstLength = iscsi.MaxDataSegmentV
	}
	if c.MaxOutstandingR2T == 0 {
		c.MaxOutstandingR2T = 16
	}
	if c.CmdWindow == 0 {
		c.CmdWindow = 128
	}
	if c.ShutdownLogoutWait == 0 {
		c.ShutdownLogoutWait = 2
	}
	return c
}

func (c Config) settings() iscsi.Settings {
	return iscsi.Settings{
		MaxRecvDataSegmentLength: c.MaxRecvDataSegmentLength,
		MaxBurstLength:           c.MaxBurstLength,
		FirstBurstLength:         c.FirstBurstLength,
		MaxOutstandingR2T:        c.MaxOutstandingR2T,
		InitialR2T:               c.InitialR2T,
		ImmediateData:            !c.NoImmediateData,
		DisableDigests:           c.DisableDigests,
	}
}

// Validate checks c, naming the bad field.
func (c Config) Validate() error {
	d := c.withDefaults()
	if err := d.settings().Validate(); err != nil {
		return fmt.Errorf("target: Config: %w", err)
	}
	if d.CmdWindow > 1<<16 {
		return fmt.Errorf("target: Config.CmdWindow %d larger than 65536", d.CmdWindow)
	}
	if d.NopInInterval > 0 && d.NopInTimeout < 0 {
		return fmt.Errorf("target: Config.NopInTimeout must be positive")
	}
	return c.DiscoveryCHAP.validate("Config.DiscoveryCHAP", nil)
}

// TargetConfig describes one exported target.
type TargetConfig struct {
	// Name is the iSCSI name (iqn., eui. or naa. form).
	Name  string
	Alias string
	// CHAP, when set, is required for normal sessions; MutualCHAP lets
	// initiators authenticate the target too.
	CHAP       *CHAP
	MutualCHAP *CHAP
	// AllowedInitiators lists initiator names that may log in and see the
	// target in discovery; empty allows everyone.
	AllowedInitiators []string
	// TPGT is the target portal group tag; 0 means 1.
	TPGT uint16
}

func (tc TargetConfig) validate(log *slog.Logger) (TargetConfig, error) {
	if err := ValidateName(tc.Name); err != nil {
		return tc, fmt.Errorf("target: TargetConfig.Name: %w", err)
	}
	tc.Name = strings.ToLower(tc.Name)
	if tc.TPGT == 0 {
		tc.TPGT = 1
	}
	if err := tc.CHAP.validate("TargetConfig.CHAP", log); err != nil {
		return tc, err
	}
	if err := tc.MutualCHAP.validate("TargetConfig.MutualCHAP", log); err != nil {
		return tc, err
	}
	if tc.MutualCHAP != nil && tc.CHAP == nil {
		return tc, errors.New("target: TargetConfig.MutualCHAP needs TargetConfig.CHAP")
	}
	if tc.MutualCHAP != nil && tc.CHAP.Secret == tc.MutualCHAP.Secret {
		return tc, errors.New("target: TargetConfig.MutualCHAP.Secret must differ from CHAP.Secret (RFC 7143 12.1.3)")
	}
	acl := make([]string, 0, len(tc.AllowedInitiators))
	for i, n := range tc.AllowedInitiators {
		if err := ValidateName(n); err != nil {
			return tc, fmt.Errorf("target: TargetConfig.AllowedInitiators[%d]: %w", i, err)
		}
		acl = append(acl, strings.ToLower(n))
	}
	tc.AllowedInitiators = acl
	return tc, nil
}

// ValidateName checks iSCSI name syntax (RFC 7143 4.2.7): iqn.yyyy-mm.reversed.domain[:anything],
// eui.<16 hex>, or naa.<16 or 32 hex>.
func ValidateName(name string) error {
	if name == "" {
		return errors.New("empty iSCSI name")
	}
	if len(name) > 223 {
		return fmt.Errorf("iSCSI name longer than 223 bytes")
	}
	n := strings.ToLower(name)
	hexOnly := func(s string) bool {
		for _, c := range s {
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
				return false
			}
		}
		return true
	}
	switch {
	case strings.HasPrefix(n, "iqn."):
		rest := n[4:]
		if len(rest) < 9 || rest[4] != '-' || rest[7] != '.' {
			return fmt.Errorf("iqn name %q lacks the yyyy-mm. date and naming authority", name)
		}
		for i, c := range rest[:7] {
			if i == 4 {
				continue
			}
			if c < '0' || c > '9' {
				return fmt.Errorf("iqn name %q has a bad yyyy-mm date", name)
			}
		}
		for _, c := range rest {
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == ':') {
				return fmt.Errorf("iqn name %q has invalid character %q", name, c)
			}
		}
	case strings.HasPrefix(n, "eui."):
		if len(n) != 4+16 || !hexOnly(n[4:]) {
			return fmt.Errorf("eui name %q must be eui. plus 16 hex digits", name)
		}
	case strings.HasPrefix(n, "naa."):
		if l := len(n) - 4; (l != 16 && l != 32) || !hexOnly(n[4:]) {
			return fmt.Errorf("naa name %q must be naa. plus 16 or 32 hex digits", name)
		}
	default:
		return fmt.Errorf("iSCSI name %q must start with iqn, eui or naa", name)
	}
	return nil
}
