package replication

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"time"
)

// ErrServerClosed is returned by Serve after Close.
var ErrServerClosed = errors.New("replication: server closed")

// ServerConfig configures a replica server.
type ServerConfig struct {
	// TLS secures every connection; it must request and verify client
	// certificates (tls.RequireAndVerifyClientCert) in production. It is
	// required unless Plaintext is set.
	TLS *tls.Config
	// Plaintext allows unencrypted connections. It exists only to benchmark
	// the protocol itself.
	Plaintext bool
	Logger    *slog.Logger
}

// Server serves the replicas of one node to their primaries.
type Server struct {
	cfg ServerConfig
	log *slog.Logger

	mu     sync.Mutex
	vols   map[string]*replicaVol
	lns    map[net.Listener]struct{}
	conns  map[net.Conn]string // conn → volume
	closed bool
	wg     sync.WaitGroup
	// bufs recycles write payloads: a replica receives one buffer per
	// write, and allocating (and zeroing) each showed up in profiles.
	bufs bufPool
}

type replicaVol struct {
	mu    sync.Mutex // serializes Step, Persist and the epoch barrier
	core  *Replica
	local *Local
	io    sync.WaitGroup // replica I/O in flight
	wq    *writeQueue    // the data writes
	// removed is set (under mu) when the server stops serving the volume:
	// a connection that already read its next message must not apply it
	// to a Local that has been handed back or deleted.
	removed bool
	// current is the connection whose Hello was accepted last. Messages
	// still arriving on an older connection (data a primary queued before
	// it dropped that connection, perhaps held up in the network) are
	// discarded: applied after the new connection's handshake and resync
	// they would overwrite newer data with stale writes.
	current net.Conn
}

// NewServer validates cfg and returns a server with no volumes.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.TLS == nil && !cfg.Plaintext {
		return nil, errors.New("replication: ServerConfig.TLS is required (Plaintext only for benchmarks)")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Server{cfg: cfg, log: cfg.Logger, vols: map[string]*replicaVol{}, lns: map[net.Listener]struct{}{}, conns: map[net.Conn]string{}}, nil
}

// AddVolume starts serving a local replica. The server owns l afterwards.
func (s *Server) AddVolume(l *Local) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.vols[l.Meta.Volume]; ok {
		return fmt.Errorf("replication: volume %s already served", l.Meta.Volume)
	}
	s.vols[l.Meta.Volume] = &replicaVol{core: NewReplica(l.Meta), local: l, wq: newWriteQueue(l.Store)}
	return nil
}

// RemoveVolume stops serving a replica (for instance because this node is
// being promoted), closes its connections, waits for its I/O and returns
// the Local with its current metadata.
func (s *Server) RemoveVolume(volume string) (*Local, error) {
	s.mu.Lock()
	v, ok := s.vols[volume]
	delete(s.vols, volume)
	for c, vol := range s.conns {
		if vol == volume {
			c.Close()
		}
	}
	s.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrUnknownVolume, volume)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	v.removed = true
	v.io.Wait()
	v.wq.close()
	v.local.Meta = v.core.Meta()
	return v.local, nil
}

// DeleteVolume removes a replica from this node online: it refuses with
// ErrInUse while a primary is connected for the volume (delete it on the
// primary first), otherwise it stops serving it, waits for its I/O and
// removes its data and metadata files.
func (s *Server) DeleteVolume(volume string) error {
	s.mu.Lock()
	v, ok := s.vols[volume]
	if !ok {
		s.mu.Unlock()
		return fmt.Errorf("%w: %s", ErrUnknownVolume, volume)
	}
	for _, vol := range s.conns {
		if vol == volume {
			s.mu.Unlock()
			return fmt.Errorf("%w: a primary is connected to %s", ErrInUse, volume)
		}
	}
	delete(s.vols, volume)
	s.mu.Unlock()
	v.mu.Lock()
	v.removed = true
	v.io.Wait()
	v.wq.close()
	v.mu.Unlock()
	err := v.local.Close()
	return errors.Join(err, DeleteLocal(filepath.Dir(v.local.MetaPath), volume))
}

// Serve accepts primaries on l until Close. A benchmark or test may pass
// any listener (e.g. in another network namespace).
func (s *Server) Serve(l net.Listener) error {
	if s.cfg.TLS != nil {
		l = tls.NewListener(l, s.cfg.TLS)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.lns[l] = struct{}{}
	s.mu.Unlock()
	var delay time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				time.Sleep(delay)
				continue
			}
			return fmt.Errorf("replication: accept: %w", err)
		}
		delay = 0
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			return ErrServerClosed
		}
		s.conns[c] = ""
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			s.serveConn(c)
		}()
	}
}

// Close stops listeners and connections and waits for them.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	for l := range s.lns {
		l.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	vols := s.vols
	s.vols = map[string]*replicaVol{}
	s.mu.Unlock()
	s.wg.Wait()
	var errs []error
	for _, v := range vols {
		v.mu.Lock()
		v.removed = true
		v.mu.Unlock()
		v.io.Wait()
		v.wq.close()
		errs = append(errs, v.local.Close())
	}
	return errors.Join(errs...)
}

func (s *Server) serveConn(c net.Conn) {
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("replication: connection panic", "remote", c.RemoteAddr().String(), "panic", r)
		}
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		c.Close()
	}()
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	br := bufio.NewReaderSize(c, 256<<10)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	hello, err := decodeMessage(br)
	if err != nil || hello.Type != MsgHello {
		s.log.Warn("replication: bad hello", "remote", c.RemoteAddr().String(), "err", err)
		return
	}
	c.SetReadDeadline(time.Time{})
	s.mu.Lock()
	v := s.vols[hello.Volume]
	if v != nil {
		s.conns[c] = hello.Volume
	}
	s.mu.Unlock()
	out := make(chan Message, 1024)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wdone sync.WaitGroup
	wdone.Add(1)
	wdead := make(chan struct{})
	go func() {
		defer wdone.Done()
		defer close(wdead)
		writeLoop(ctx, c, out)
	}()
	defer wdone.Wait()
	defer cancel()
	// An ack for a dead connection is dropped: blocking on its full queue
	// would hold up the volume's write queue and every later epoch barrier.
	send := func(m Message) {
		select {
		case out <- m:
		case <-ctx.Done():
		case <-wdead:
		}
	}
	if v == nil {
		send(Message{Type: MsgReject, Err: "unknown volume " + hello.Volume})
		return
	}
	log := s.log.With("volume", hello.Volume, "primary", hello.From)
	m := hello
	var pending sync.WaitGroup // this connection's I/O, so acks are not sent after return
	defer pending.Wait()
	for {
		v.mu.Lock()
		if v.removed {
			v.mu.Unlock()
			return
		}
		if m.Type != MsgHello && v.current != c {
			v.mu.Unlock()
			log.Debug("replication: connection superseded by a newer one")
			return
		}
		v.core.Step(m)
		if m.Type == MsgHello && m.Epoch >= v.core.Meta().Epoch {
			// Accepted (a lower epoch was rejected): this is now the
			// primary's connection. The Hello's barrier below waits for
			// the I/O the old one started; the rest of it is dropped.
			if v.current != nil && v.current != c {
				v.current.Close()
			}
			v.current = c
		}
		rd := v.core.Ready()
		if rd.Persist != nil {
			if err := v.local.Persist(rd.Persist, rd.PersistMeta, rd.PersistAL); err != nil {
				v.mu.Unlock()
				log.Error("replication: persist metadata", "err", err)
				return
			}
		}
		if rd.Barrier {
			// A newer epoch: nothing an older primary started may land
			// after this point.
			v.io.Wait()
		}
		for _, io := range rd.IO {
			v.io.Add(1)
			pending.Add(1)
			if m := io.Msg; isQueuedWrite(m, v.local.Store) {
				v.wq.submit(m.Off, m.Data, m.Flags&FlagFUA != 0, func(err error) {
					if err != nil {
						log.Error("replication: replica I/O failed", "op", m.Type.String(), "off", m.Off, "err", err)
					}
					ack := v.core.Done(m, err, nil)
					s.bufs.put(m.Data)
					send(ack)
					v.io.Done()
					pending.Done()
				})
				continue
			}
			go func(m Message) {
				defer v.io.Done()
				defer pending.Done()
				sum, err := applyReplicaIO(v.local.Store, m)
				if err != nil {
					log.Error("replication: replica I/O failed", "op", m.Type.String(), "off", m.Off, "err", err)
				}
				ack := v.core.Done(m, err, sum)
				if m.Type == MsgWrite {
					// Nothing holds the payload after the write.
					s.bufs.put(m.Data)
				}
				send(ack)
			}(io.Msg)
		}
		v.mu.Unlock()
		for _, r := range rd.Send {
			send(r)
		}
		m, err = decodeMessageFrom(br, c, s.bufs.get)
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				log.Debug("replication: connection ended", "err", err)
			}
			return
		}
	}
}

// isQueuedWrite reports whether m is a plain data write, which goes through
// the volume's write queue; everything else (and a write the queue would
// refuse) takes applyReplicaIO.
func isQueuedWrite(m Message, st *Store) bool {
	if m.Type != MsgWrite || m.Off < 0 || m.Off+int64(len(m.Data)) > st.Size() {
		return false
	}
	return m.Flags&FlagResync == 0 || !allZero(m.Data)
}

func applyReplicaIO(st *Store, m Message) ([]byte, error) {
	switch m.Type {
	case MsgWrite:
		if m.Off < 0 || m.Off+int64(len(m.Data)) > st.Size() {
			return nil, fmt.Errorf("replication: write beyond end (%d+%d > %d)", m.Off, len(m.Data), st.Size())
		}
		if m.Flags&FlagResync != 0 && allZero(m.Data) {
			// A resync copies deallocated ranges as zeros; punching keeps
			// the replica's hole map (GET LBA STATUS after a failover) and
			// its space use the same as the primary's.
			return nil, st.Punch(m.Off, int64(len(m.Data)))
		}
		return nil, st.WriteAt(m.Data, m.Off, m.Flags&FlagFUA != 0)
	case MsgUnmap:
		if m.Off < 0 || m.Len < 0 || m.Off+m.Len > st.Size() {
			return nil, fmt.Errorf("replication: unmap beyond end")
		}
		return nil, st.Punch(m.Off, m.Len)
	case MsgFlush:
		return nil, st.Sync()
	case MsgResize:
		return nil, st.Grow(m.Len)
	case MsgChecksum:
		if m.Off < 0 || m.Len < 0 || m.Off+m.Len > st.Size() {
			return nil, fmt.Errorf("replication: checksum beyond end")
		}
		return st.Sum(m.Off, m.Len)
	}
	return nil, fmt.Errorf("replication: unexpected %s", m.Type)
}

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
