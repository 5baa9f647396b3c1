package cluster

import (
	"bufio"
	"encoding/gob"
	"fmt"
	"io"
	"log/slog"
	"sync"

	"github.com/hashicorp/raft"
)

// Result is what FSM.Apply returns for every entry, and what a proposer
// gets back once the entry is committed and applied.
type Result struct {
	Value any
	Err   error
}

// FSM is the raft.FSM over State. Apply decodes the entry and hands it to
// State.Apply under a lock; readers see consistent copies.
type FSM struct {
	log *slog.Logger

	mu      sync.RWMutex
	st      *State
	changed chan struct{} // closed and replaced after every applied entry
}

var _ raft.FSM = (*FSM)(nil)

// NewFSM returns an FSM over an empty state. logger may be nil.
func NewFSM(logger *slog.Logger) *FSM {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &FSM{log: logger, st: NewState(), changed: make(chan struct{})}
}

// Apply implements raft.FSM. It never fails the log: a refused command is
// a Result with Err set, applied identically on every node.
func (f *FSM) Apply(l *raft.Log) any {
	if l.Type != raft.LogCommand {
		return Result{}
	}
	c, err := DecodeCommand(l.Data)
	if err != nil {
		f.log.Error("cluster: undecodable log entry skipped", "index", l.Index, "err", err)
		f.mu.Lock()
		f.st.Index = l.Index
		f.notifyLocked()
		f.mu.Unlock()
		return Result{Err: err}
	}
	return f.applyCommand(l.Index, c)
}

func (f *FSM) applyCommand(index uint64, c *Command) Result {
	f.mu.Lock()
	defer f.mu.Unlock()
	v, err := f.st.Apply(c)
	f.st.Index = index
	f.notifyLocked()
	if err != nil {
		f.log.Debug("cluster: command refused", "index", index, "kind", c.Kind, "err", err)
	}
	return Result{Value: v, Err: err}
}

func (f *FSM) notifyLocked() {
	close(f.changed)
	f.changed = make(chan struct{})
}

// Changed returns a channel closed after the next applied entry or
// restore. Watchers read the state, then wait on a fresh Changed.
func (f *FSM) Changed() <-chan struct{} {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.changed
}

// State returns a deep copy of the current state.
func (f *FSM) State() *State {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.st.Clone()
}

// Read runs fn with the live state under the read lock; fn must not keep
// references or modify it. Cheaper than State for small lookups.
func (f *FSM) Read(fn func(*State)) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	fn(f.st)
}

// Snapshot implements raft.FSM: a copy now, the encoding in Persist.
func (f *FSM) Snapshot() (raft.FSMSnapshot, error) {
	return &fsmSnapshot{st: f.State()}, nil
}

// Restore implements raft.FSM.
func (f *FSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	st, err := ReadState(rc)
	if err != nil {
		return err
	}
	f.mu.Lock()
	f.st = st
	f.notifyLocked()
	f.mu.Unlock()
	return nil
}

type fsmSnapshot struct{ st *State }

func (s *fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	if err := WriteState(sink, s.st); err != nil {
		_ = sink.Cancel()
		return err
	}
	return sink.Close()
}

func (s *fsmSnapshot) Release() {}

// WriteState encodes a state as a snapshot: version byte, then gob.
func WriteState(w io.Writer, st *State) error {
	bw := bufio.NewWriter(w)
	if err := bw.WriteByte(encodingVersion); err != nil {
		return fmt.Errorf("cluster: snapshot: %w", err)
	}
	if err := gob.NewEncoder(bw).Encode(st); err != nil {
		return fmt.Errorf("cluster: snapshot: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("cluster: snapshot: %w", err)
	}
	return nil
}

// ReadState decodes what WriteState wrote.
func ReadState(r io.Reader) (*State, error) {
	br := bufio.NewReader(r)
	v, err := br.ReadByte()
	if err != nil {
		return nil, fmt.Errorf("%w: snapshot: %w", ErrDecode, err)
	}
	if v != encodingVersion {
		return nil, fmt.Errorf("%w: snapshot version %d", ErrDecode, v)
	}
	st := NewState()
	if err := gob.NewDecoder(br).Decode(st); err != nil {
		return nil, fmt.Errorf("%w: snapshot: %w", ErrDecode, err)
	}
	st.normalize()
	return st, nil
}
