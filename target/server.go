package target

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hasan-storage/hasan/target/iscsi"
	"github.com/hasan-storage/hasan/target/scsi"
)

// Server is an iSCSI target: it accepts connections on any number of
// listeners (portals), authenticates logins and hands SCSI tasks to LUNs.
// Targets, LUNs, ACLs and CHAP may change while it runs.
type Server struct {
	cfg      Config
	log      *slog.Logger
	settings iscsi.Settings

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	targets   map[string]*target
	// sessions indexes logged-in normal sessions by initiator port and
	// target, for reinstatement; all holds every session (discovery too).
	sessions map[sessionKey]*session
	all      map[*session]struct{}
	nextTSIH uint16
	closed   bool
	shutdown bool
	connWG   sync.WaitGroup // one per conn goroutine
	bufs     bufPools
}

type sessionKey struct {
	initiator string
	isid      [6]byte
	target    string
}

// target is one exported target. cfg and luns are copy-on-write snapshots
// so the I/O path reads them without locks; writers hold Server.mu.
type target struct {
	cfg  atomic.Pointer[TargetConfig]
	luns atomic.Pointer[map[uint64]*lunRef]
}

func (t *target) lun(id uint64) *lunRef { return (*t.luns.Load())[id] }

func (t *target) lunIDs() []uint64 {
	return slices.Sorted(maps.Keys(*t.luns.Load()))
}

// lunRef guards one LUN so RemoveLUN/Close can wait until no task can
// reach it: every call into the LU happens between acquire and release,
// and retire stops new acquisitions before waiting.
type lunRef struct {
	id       uint64
	lu       LUN
	mu       sync.RWMutex
	gone     bool
	inflight sync.WaitGroup
}

func (l *lunRef) acquire() bool {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.gone {
		return false
	}
	l.inflight.Add(1)
	return true
}

func (l *lunRef) release() { l.inflight.Done() }

// retire stops new calls and waits for the running ones or ctx.
func (l *lunRef) retire(ctx context.Context) error {
	l.mu.Lock()
	l.gone = true
	l.mu.Unlock()
	done := make(chan struct{})
	go func() { l.inflight.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("target: waiting for LUN %d commands: %w", l.id, ctx.Err())
	}
}

// NewServer returns a server with cfg (zero fields take defaults). An
// invalid cfg is reported by the first Serve call.
func NewServer(cfg Config) *Server {
	c := cfg.withDefaults()
	return &Server{
		cfg:       c,
		log:       c.Logger,
		settings:  c.settings(),
		listeners: map[net.Listener]struct{}{},
		conns:     map[*conn]struct{}{},
		targets:   map[string]*target{},
		sessions:  map[sessionKey]*session{},
		all:       map[*session]struct{}{},
	}
}

// Serve accepts connections on ln until Close or Shutdown, then returns
// ErrServerClosed. Several Serve calls with different listeners may run at
// once; every listener serves every target.
func (s *Server) Serve(ln net.Listener) error {
	if err := s.cfg.Validate(); err != nil {
		ln.Close()
		return err
	}
	s.mu.Lock()
	if s.closed || s.shutdown {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.listeners[ln] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
	}()
	var tempDelay time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			s.mu.Lock()
			stopped := s.closed || s.shutdown
			s.mu.Unlock()
			if stopped {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) {
				tempDelay = min(max(2*tempDelay, 5*time.Millisecond), time.Second)
				s.log.Warn("target: accept error; retrying", "err", err, "delay", tempDelay)
				time.Sleep(tempDelay)
				continue
			}
			return fmt.Errorf("target: accept: %w", err)
		}
		tempDelay = 0
		c := newConn(s, nc)
		s.mu.Lock()
		if s.closed || s.shutdown {
			s.mu.Unlock()
			nc.Close()
			return ErrServerClosed
		}
		s.conns[c] = struct{}{}
		s.connWG.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.connWG.Done()
			c.serve()
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
		}()
	}
}

// AddTarget exports a new target with no LUNs.
func (s *Server) AddTarget(tc TargetConfig) error {
	tc, err := tc.validate(s.log)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrServerClosed
	}
	if _, ok := s.targets[tc.Name]; ok {
		return fmt.Errorf("%w: %s", ErrTargetExists, tc.Name)
	}
	t := &target{}
	t.cfg.Store(&tc)
	empty := map[uint64]*lunRef{}
	t.luns.Store(&empty)
	s.targets[tc.Name] = t
	s.log.Info("target: target added", "target", tc.Name, "tpgt", tc.TPGT, "chap", tc.CHAP != nil,
		"acl", len(tc.AllowedInitiators))
	return nil
}

// UpdateTarget replaces a target's alias, CHAP and ACL. New logins use the
// new settings; existing sessions continue.
func (s *Server) UpdateTarget(tc TargetConfig) error {
	tc, err := tc.validate(s.log)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.targets[tc.Name]
	if !ok {
		return fmt.Errorf("%w: %s", ErrTargetNotFound, tc.Name)
	}
	t.cfg.Store(&tc)
	return nil
}

// RemoveTarget stops exporting a target: new logins fail, its sessions are
// closed, and it returns once none of its LUNs can be reached any more.
func (s *Server) RemoveTarget(ctx context.Context, name string) error {
	name = strings.ToLower(name)
	s.mu.Lock()
	t, ok := s.targets[name]
	if !ok {
		s.mu.Unlock()
		return fmt.Errorf("%w: %s", ErrTargetNotFound, name)
	}
	delete(s.targets, name)
	var victims []*session
	for sess := range s.all {
		if sess.target == t {
			victims = append(victims, sess)
		}
	}
	s.mu.Unlock()
	for _, sess := range victims {
		sess.conn.close(errors.New("target removed"))
	}
	var errs []error
	for _, l := range *t.luns.Load() {
		errs = append(errs, l.retire(ctx))
	}
	for _, sess := range victims {
		if err := sess.waitClosed(ctx); err != nil {
			errs = append(errs, err)
			break
		}
	}
	return errors.Join(errs...)
}

// AddLUN exports lu as lun of target, then tells the target's other LUNs
// that the LUN inventory changed.
func (s *Server) AddLUN(targetName string, lun uint64, lu LUN) error {
	if lu == nil {
		return errors.New("target: AddLUN: nil LUN")
	}
	if lun > 0x3FFF {
		return fmt.Errorf("target: AddLUN: lun %d above 16383 (flat space addressing limit)", lun)
	}
	s.mu.Lock()
	t, ok := s.targets[strings.ToLower(targetName)]
	if !ok {
		s.mu.Unlock()
		return fmt.Errorf("%w: %s", ErrTargetNotFound, targetName)
	}
	old := *t.luns.Load()
	if _, dup := old[lun]; dup {
		s.mu.Unlock()
		return fmt.Errorf("%w: %s lun %d", ErrLUNExists, targetName, lun)
	}
	next := maps.Clone(old)
	next[lun] = &lunRef{id: lun, lu: lu}
	t.luns.Store(&next)
	s.mu.Unlock()
	for id, l := range old {
		_ = id
		if l.acquire() {
			l.lu.LUNsChanged()
			l.release()
		}
	}
	return nil
}

// RemoveLUN stops exporting a LUN and returns only when no command can
// still reach it (or ctx ends first).
func (s *Server) RemoveLUN(ctx context.Context, targetName string, lun uint64) error {
	s.mu.Lock()
	t, ok := s.targets[strings.ToLower(targetName)]
	if !ok {
		s.mu.Unlock()
		return fmt.Errorf("%w: %s", ErrTargetNotFound, targetName)
	}
	old := *t.luns.Load()
	l, ok := old[lun]
	if !ok {
		s.mu.Unlock()
		return fmt.Errorf("%w: %s lun %d", ErrLUNNotFound, targetName, lun)
	}
	next := maps.Clone(old)
	delete(next, lun)
	t.luns.Store(&next)
	s.mu.Unlock()
	if err := l.retire(ctx); err != nil {
		return err
	}
	for _, o := range next {
		if o.acquire() {
			o.lu.LUNsChanged()
			o.release()
		}
	}
	return nil
}

// SessionInfo describes one logged-in session.
type SessionInfo struct {
	TargetName    string
	InitiatorName string
	ISID          [6]byte
	TSIH          uint16
	Discovery     bool
	RemoteAddr    string
	LocalAddr     string
	HeaderDigest  bool
	DataDigest    bool
	LoggedInAt    time.Time
}

// Sessions lists the current sessions.
func (s *Server) Sessions() []SessionInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]SessionInfo, 0, len(s.all))
	for sess := range s.all {
		out = append(out, sess.info())
	}
	slices.SortFunc(out, func(a, b SessionInfo) int { return int(a.TSIH) - int(b.TSIH) })
	return out
}

// Shutdown stops accepting connections, asks every initiator to log out
// (Async Message, event 1), waits for the sessions to end, and then closes
// whatever is left when ctx ends. It returns ctx.Err() in that case.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.shutdown = true
	s.closeListenersLocked()
	var sess []*session
	for x := range s.all {
		sess = append(sess, x)
	}
	s.mu.Unlock()
	for _, x := range sess {
		x.requestLogout(s.cfg.ShutdownLogoutWait)
	}
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	var err error
wait:
	for {
		s.mu.Lock()
		n := len(s.conns)
		s.mu.Unlock()
		if n == 0 {
			break
		}
		select {
		case <-ctx.Done():
			err = ctx.Err()
			break wait
		case <-t.C:
		}
	}
	return errors.Join(err, s.Close())
}

// Close stops everything at once: listeners, connections and sessions. It
// returns only when no command can still reach any LUN.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	s.closeListenersLocked()
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	var refs []*lunRef
	for _, t := range s.targets {
		for _, l := range *t.luns.Load() {
			refs = append(refs, l)
		}
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.close(ErrServerClosed)
	}
	for _, l := range refs {
		_ = l.retire(context.Background())
	}
	s.connWG.Wait()
	return nil
}

// Stop is Close under the name the issue uses.
func (s *Server) Stop() error { return s.Close() }

func (s *Server) closeListenersLocked() {
	for ln := range s.listeners {
		ln.Close()
	}
}

// lookupTarget returns the target named name, or nil.
func (s *Server) lookupTarget(name string) *target {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.targets[strings.ToLower(name)]
}

// allowed reports whether initiator may see and use t.
func allowed(tc *TargetConfig, initiator string) bool {
	if len(tc.AllowedInitiators) == 0 {
		return true
	}
	initiator = strings.ToLower(initiator)
	return slices.Contains(tc.AllowedInitiators, initiator)
}

// visibleTargets lists the targets initiator may log into, sorted by name.
func (s *Server) visibleTargets(initiator string) []*TargetConfig {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*TargetConfig
	for _, t := range s.targets {
		if tc := t.cfg.Load(); allowed(tc, initiator) {
			out = append(out, tc)
		}
	}
	slices.SortFunc(out, func(a, b *TargetConfig) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// portalAddrs lists "ip:port" for every listener, the one local (the
// address the initiator reached) first; wildcard listeners report local's
// IP with their own port.
// portalString formats a portal for SendTargets. An IPv4 address that
// arrived on a dual-stack socket is held IPv4-mapped (::ffff:a.b.c.d);
// initiators must be sent the plain IPv4 form.
func portalString(ta *net.TCPAddr) string {
	ap := ta.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String()
}

func (s *Server) portalAddrs(local net.Addr) []string {
	first := ""
	if ta, ok := local.(*net.TCPAddr); ok {
		first = portalString(ta)
	}
	out := []string{}
	if first != "" {
		out = append(out, first)
	}
	s.mu.Lock()
	var addrs []net.Addr
	for ln := range s.listeners {
		addrs = append(addrs, ln.Addr())
	}
	s.mu.Unlock()
	for _, a := range addrs {
		ta, ok := a.(*net.TCPAddr)
		if !ok {
			continue
		}
		if ta.IP.IsUnspecified() {
			if la, ok := local.(*net.TCPAddr); ok {
				ta = &net.TCPAddr{IP: la.IP, Port: ta.Port, Zone: la.Zone}
			}
		}
		str := portalString(ta)
		if !slices.Contains(out, str) {
			out = append(out, str)
		}
	}
	return out
}

// registerSession installs sess after a successful login. A normal session
// with the same initiator port (name + ISID) and target replaces the old
// one, which is closed and drained first (session reinstatement). tsih is
// the TSIH the initiator sent: non-zero must name the session it replaces.
func (s *Server) registerSession(ctx context.Context, sess *session, tsih uint16) (uint16, error) {
	s.mu.Lock()
	if s.closed || s.shutdown {
		s.mu.Unlock()
		return 0, ErrServerClosed
	}
	if sess.target != nil && s.targets[sess.nexus.TargetName] != sess.target {
		s.mu.Unlock()
		return 0, errTargetRemoved
	}
	var old *session
	if !sess.discovery {
		key := sess.key()
		old = s.sessions[key]
		if tsih != 0 && (old == nil || old.tsih != tsih) {
			s.mu.Unlock()
			return 0, errSessionNotFound
		}
		if old != nil {
			delete(s.sessions, key)
		}
	}
	s.mu.Unlock()
	if old != nil {
		s.log.Info("target: reinstating session", "initiator", sess.nexus.InitiatorName, "tsih", old.tsih)
		old.conn.close(errors.New("session reinstated"))
		if err := old.waitClosed(ctx); err != nil {
			return 0, err
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.shutdown {
		return 0, ErrServerClosed
	}
	if old != nil && tsih != 0 {
		sess.tsih = tsih
	} else {
		for {
			s.nextTSIH++
			if s.nextTSIH == 0 {
				continue
			}
			if !s.tsihInUseLocked(s.nextTSIH) {
				break
			}
		}
		sess.tsih = s.nextTSIH
	}
	if !sess.discovery {
		if cur := s.sessions[sess.key()]; cur != nil {
			// Two logins raced for one ISID; the later one wins the slot
			// and the earlier is closed.
			go cur.conn.close(errors.New("session reinstated"))
		}
		s.sessions[sess.key()] = sess
	}
	s.all[sess] = struct{}{}
	return sess.tsih, nil
}

func (s *Server) tsihInUseLocked(t uint16) bool {
	for x := range s.all {
		if x.tsih == t {
			return true
		}
	}
	return false
}

func (s *Server) unregisterSession(sess *session) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.all, sess)
	if !sess.discovery && s.sessions[sess.key()] == sess {
		delete(s.sessions, sess.key())
	}
}

// sessionsOfTarget lists the sessions attached to t.
func (s *Server) sessionsOfTarget(t *target) []*session {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*session
	for x := range s.all {
		if x.target == t {
			out = append(out, x)
		}
	}
	return out
}

var (
	errSessionNotFound = errors.New("target: no session for the given TSIH")
	errTargetRemoved   = errors.New("target: target removed during login")
)

// nexusFor builds the I_T nexus for a session.
func nexusFor(initiator string, isid [6]byte, tc *TargetConfig) scsi.ITNexus {
	return scsi.ITNexus{
		InitiatorName:  strings.ToLower(initiator),
		ISID:           isid,
		TargetName:     tc.Name,
		TPGT:           tc.TPGT,
		RelativePortID: 1,
	}
}
