package probe

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/hasan-storage/hasan/bench/failover/initiator"
)

// ErrLostWrite: a write the target acknowledged is not on the LUN any more.
// It ends the probe: nothing measured after it means anything.
var ErrLostWrite = errors.New("probe: acknowledged write lost")

// Config is the probe's loop. The zero durations take the issue-5 values.
type Config struct {
	Initiator initiator.Config
	// Interval between the starts of two write+read pairs (100 ms).
	Interval time.Duration
	// LoginTimeout bounds one login attempt (300 ms).
	LoginTimeout time.Duration
	// IOTimeout bounds one command (1 s).
	IOTimeout time.Duration
	// RetryInterval is the pause after a failed login (50 ms), so a portal
	// that refuses connections is not spun on.
	RetryInterval time.Duration
	// StartLBA and Slots: the probe writes a ring of Slots blocks (16)
	// from StartLBA and, after every re-login, reads the whole ring back.
	StartLBA uint32
	Slots    int
	Logger   *slog.Logger
}

func (c *Config) defaults() {
	if c.Interval == 0 {
		c.Interval = 100 * time.Millisecond
	}
	if c.LoginTimeout == 0 {
		c.LoginTimeout = 300 * time.Millisecond
	}
	if c.IOTimeout == 0 {
		c.IOTimeout = time.Second
	}
	if c.RetryInterval == 0 {
		c.RetryInterval = 50 * time.Millisecond
	}
	if c.Slots == 0 {
		c.Slots = 16
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

// Result is what one probe run saw. Durations are in seconds in JSON.
type Result struct {
	Started time.Time `json:"started"`
	Ended   time.Time `json:"ended"`
	// Pairs counts verified write+read pairs.
	Pairs int `json:"pairs"`
	// Gap is the longest time between the completions of two consecutive
	// verified pairs; GapEnd is when the pair that closed it completed.
	Gap    Seconds   `json:"gap_s"`
	GapEnd time.Time `json:"gap_end"`
	// SinceLastPair is the time from the last verified pair to the end of
	// the run: large when the run ended in an outage that Gap misses.
	SinceLastPair Seconds `json:"since_last_pair_s"`
	// IOErrors counts commands that failed (transport error, timeout,
	// unexpected status, read-back mismatch) - what an application would
	// have seen as an I/O error without retries.
	IOErrors int `json:"io_errors"`
	// LoginFailures counts failed login attempts; Reconnects successful
	// logins after the first.
	LoginFailures int `json:"login_failures"`
	Reconnects    int `json:"reconnects"`
	// UnitAttentions consumed after logins and retried on commands.
	UnitAttentions int `json:"unit_attentions"`
	// LostWrites counts acknowledged writes found missing; Lost says which.
	LostWrites int      `json:"lost_writes"`
	Lost       []string `json:"lost,omitempty"`
	LastSeq    uint64   `json:"last_seq"`
	// LastError is the most recent error, for the human summary.
	LastError string `json:"last_error,omitempty"`
}

// Seconds is a duration that marshals as float seconds.
type Seconds time.Duration

func (s Seconds) MarshalJSON() ([]byte, error) {
	return fmt.Appendf(nil, "%.4f", time.Duration(s).Seconds()), nil
}

func (s Seconds) String() string { return fmt.Sprintf("%.3fs", time.Duration(s).Seconds()) }

// Probe writes and verifies a block every Interval, re-logging in on any
// error, and measures the longest pause in verified I/O.
type Probe struct {
	cfg   Config
	runID [8]byte

	mu       sync.Mutex
	res      Result
	lastPair time.Time
	pairCh   chan struct{} // closed and replaced at each verified pair
}

// New returns a probe; Run starts it.
func New(cfg Config) *Probe {
	cfg.defaults()
	p := &Probe{cfg: cfg, pairCh: make(chan struct{})}
	_, _ = rand.Read(p.runID[:])
	return p
}

// Snapshot returns the result so far; safe while Run runs.
func (p *Probe) Snapshot() Result {
	p.mu.Lock()
	defer p.mu.Unlock()
	r := p.res
	r.Lost = append([]string(nil), r.Lost...)
	if !p.lastPair.IsZero() {
		r.SinceLastPair = Seconds(time.Since(p.lastPair))
	}
	return r
}

// WaitPairs waits until n more pairs than now have been verified.
func (p *Probe) WaitPairs(ctx context.Context, n int) error {
	p.mu.Lock()
	target := p.res.Pairs + n
	p.mu.Unlock()
	for {
		p.mu.Lock()
		done, ch := p.res.Pairs >= target, p.pairCh
		p.mu.Unlock()
		if done {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("probe: waiting for %d pairs: %w", n, ctx.Err())
		}
	}
}

type ring struct {
	blockSize uint32
	// acked[i] is the sequence number last acknowledged in slot i (0: none).
	acked []uint64
	// pending is a write sent but not acknowledged: the slot may hold it.
	pendingSlot int
	pendingSeq  uint64
}

// Run probes until ctx ends or an acknowledged write is lost (then it
// returns an error wrapping ErrLostWrite). The Result is complete either way.
func (p *Probe) Run(ctx context.Context) (Result, error) {
	log := p.cfg.Logger
	p.mu.Lock()
	p.res.Started = time.Now()
	p.mu.Unlock()
	var (
		s      *initiator.Session
		rg     = ring{acked: make([]uint64, p.cfg.Slots), pendingSlot: -1}
		logins int
		seq    uint64
		next   time.Time
	)
	finish := func(err error) (Result, error) {
		if s != nil {
			s.Close()
		}
		p.mu.Lock()
		p.res.Ended = time.Now()
		p.res.LastSeq = seq
		if !p.lastPair.IsZero() {
			p.res.SinceLastPair = Seconds(p.res.Ended.Sub(p.lastPair))
		}
		r := p.res
		p.mu.Unlock()
		return r, err
	}
	fail := func(what string, err error) {
		p.mu.Lock()
		p.res.IOErrors++
		p.res.LastError = what + ": " + err.Error()
		p.mu.Unlock()
		log.Debug("probe: I/O error", "op", what, "err", err)
		// Retry as soon as a session is back, as an initiator's SCSI layer
		// retries the failed command after reconnecting, instead of adding
		// up to one interval of artificial gap.
		next = time.Time{}
		if s != nil {
			s.Close()
			s = nil
		}
	}
	for ctx.Err() == nil {
		if s == nil {
			var err error
			s, err = p.login(ctx, &rg, logins == 0)
			if err != nil {
				if ctx.Err() != nil {
					break
				}
				p.mu.Lock()
				p.res.LoginFailures++
				p.res.LastError = "login: " + err.Error()
				p.mu.Unlock()
				sleep(ctx, p.cfg.RetryInterval)
				continue
			}
			logins++
			if logins > 1 {
				p.mu.Lock()
				p.res.Reconnects++
				p.mu.Unlock()
				lost, err := p.verifyRing(ctx, s, &rg)
				if err != nil {
					fail("verify after re-login", err)
					continue
				}
				if len(lost) > 0 {
					p.mu.Lock()
					p.res.LostWrites += len(lost)
					p.res.Lost = append(p.res.Lost, lost...)
					p.mu.Unlock()
					return finish(fmt.Errorf("%w: %s", ErrLostWrite, lost[0]))
				}
			}
			log.Debug("probe: logged in", "logins", logins)
		}
		if wait := time.Until(next); wait > 0 {
			if !sleep(ctx, wait) {
				break
			}
		}
		next = time.Now().Add(p.cfg.Interval)

		seq++
		slot := int(seq % uint64(p.cfg.Slots))
		lba := p.cfg.StartLBA + uint32(slot)
		block := p.block(seq, slot, rg.blockSize)
		rg.pendingSlot, rg.pendingSeq = slot, seq
		if err := p.retryUA(ctx, func(ctx context.Context) error {
			return s.Write10(ctx, lba, block, rg.blockSize, true)
		}); err != nil {
			fail("write", err)
			continue
		}
		rg.acked[slot] = seq
		rg.pendingSlot = -1
		var got []byte
		err := p.retryUA(ctx, func(ctx context.Context) error {
			var err error
			got, err = s.Read10(ctx, lba, 1, rg.blockSize)
			return err
		})
		if err != nil {
			fail("read", err)
			continue
		}
		if !bytes.Equal(got, block) {
			lost := fmt.Sprintf("slot %d (LBA %d): wrote seq %d, read back %s in the same session", slot, lba, seq, p.describe(got))
			p.mu.Lock()
			p.res.IOErrors++
			p.res.LostWrites++
			p.res.Lost = append(p.res.Lost, lost)
			p.mu.Unlock()
			return finish(fmt.Errorf("%w: %s", ErrLostWrite, lost))
		}
		now := time.Now()
		p.mu.Lock()
		if !p.lastPair.IsZero() {
			if d := now.Sub(p.lastPair); d > time.Duration(p.res.Gap) {
				p.res.Gap = Seconds(d)
				p.res.GapEnd = now
			}
		}
		p.lastPair = now
		p.res.Pairs++
		close(p.pairCh)
		p.pairCh = make(chan struct{})
		p.mu.Unlock()
	}
	return finish(nil)
}

// retryUA runs op under the I/O deadline, once more after a UNIT
// ATTENTION (as a SCSI midlayer would), counting it.
func (p *Probe) retryUA(ctx context.Context, op func(context.Context) error) error {
	for try := 0; ; try++ {
		ioctx, cancel := context.WithTimeout(ctx, p.cfg.IOTimeout)
		err := op(ioctx)
		cancel()
		var ce *initiator.CheckError
		if try < 2 && errors.As(err, &ce) && ce.UnitAttention() {
			p.mu.Lock()
			p.res.UnitAttentions++
			p.mu.Unlock()
			continue
		}
		return err
	}
}

// login logs in under the login deadline, clears pending unit attentions
// and, the first time, learns the block size and checks the ring fits.
func (p *Probe) login(ctx context.Context, rg *ring, first bool) (*initiator.Session, error) {
	lctx, cancel := context.WithTimeout(ctx, p.cfg.LoginTimeout)
	defer cancel()
	s, err := initiator.Login(lctx, p.cfg.Initiator)
	if err != nil {
		return nil, err
	}
	ioctx, cancel2 := context.WithTimeout(ctx, p.cfg.IOTimeout)
	defer cancel2()
	n, err := s.ClearUnitAttention(ioctx)
	p.mu.Lock()
	p.res.UnitAttentions += n
	p.mu.Unlock()
	if err != nil {
		s.Close()
		return nil, err
	}
	if first {
		blocks, bs, err := s.ReadCapacity10(ioctx)
		if err != nil {
			s.Close()
			return nil, err
		}
		if bs < 64 || uint64(p.cfg.StartLBA)+uint64(p.cfg.Slots) > blocks {
			s.Close()
			return nil, fmt.Errorf("probe: LUN of %d x %d-byte blocks cannot hold %d slots from LBA %d", blocks, bs, p.cfg.Slots, p.cfg.StartLBA)
		}
		rg.blockSize = bs
	}
	return s, nil
}

// verifyRing reads every slot back and returns a description of each
// acknowledged write that is missing. The slot of a write that was sent but
// never acknowledged may hold either value; whichever it holds becomes the
// expectation from now on.
func (p *Probe) verifyRing(ctx context.Context, s *initiator.Session, rg *ring) ([]string, error) {
	var data []byte
	err := p.retryUA(ctx, func(ctx context.Context) error {
		var err error
		data, err = s.Read10(ctx, p.cfg.StartLBA, uint16(p.cfg.Slots), rg.blockSize)
		return err
	})
	if err != nil {
		return nil, err
	}
	var lost []string
	for slot := range p.cfg.Slots {
		got := data[slot*int(rg.blockSize) : (slot+1)*int(rg.blockSize)]
		want := rg.acked[slot]
		if slot == rg.pendingSlot && bytes.Equal(got, p.block(rg.pendingSeq, slot, rg.blockSize)) {
			rg.acked[slot] = rg.pendingSeq
			continue
		}
		if want == 0 || bytes.Equal(got, p.block(want, slot, rg.blockSize)) {
			continue
		}
		lost = append(lost, fmt.Sprintf("slot %d (LBA %d): acknowledged seq %d, found %s after re-login",
			slot, p.cfg.StartLBA+uint32(slot), want, p.describe(got)))
	}
	rg.pendingSlot = -1
	return lost, nil
}

const magic = "HFOPROBE"

// block is the content written for seq: magic, run id, seq, slot, then a
// pattern derived from seq, so a stale, foreign or torn block never
// matches.
func (p *Probe) block(seq uint64, slot int, size uint32) []byte {
	b := make([]byte, size)
	copy(b, magic)
	copy(b[8:], p.runID[:])
	binary.BigEndian.PutUint64(b[16:], seq)
	binary.BigEndian.PutUint32(b[24:], uint32(slot))
	for i := 28; i < len(b); i++ {
		b[i] = byte(seq*31 + uint64(i))
	}
	return b
}

func (p *Probe) describe(b []byte) string {
	switch {
	case len(b) < 28:
		return fmt.Sprintf("%d bytes", len(b))
	case string(b[:8]) != magic:
		if bytes.Count(b, []byte{0}) == len(b) {
			return "zeros"
		}
		return "foreign data " + hex.EncodeToString(b[:16])
	case !bytes.Equal(b[8:16], p.runID[:]):
		return "a block of another probe run"
	default:
		return fmt.Sprintf("seq %d", binary.BigEndian.Uint64(b[16:]))
	}
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
