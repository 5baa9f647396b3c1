package fencing

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"time"
)

// Outcome of one device action.
type Outcome string

const (
	OutcomeSuccess Outcome = "success"
	OutcomeFailure Outcome = "failure"
)

// Record is one device action inside a fence: who was fenced, through which
// level and device, what happened and why. Error is already redacted.
type Record struct {
	Time     time.Time     `json:"time"`
	Node     string        `json:"node"`
	Level    int           `json:"level"` // 1-based position in the node's topology
	Device   string        `json:"device"`
	Action   string        `json:"action"` // "off" (includes confirmation) or "on"
	Outcome  Outcome       `json:"outcome"`
	Duration time.Duration `json:"duration_ns"`
	Error    string        `json:"error,omitempty"`
	// ConfirmedBy and ConfirmedAt are set when an operator confirmed the
	// power-off by hand (manual device).
	ConfirmedBy string    `json:"confirmed_by,omitempty"`
	ConfirmedAt time.Time `json:"confirmed_at,omitzero"`
	Note        string    `json:"note,omitempty"`
}

// HistoryStore keeps fence records. The cluster implements it on Raft; this
// package ships an in-memory and an append-only file implementation.
// Append must be durable when it returns nil.
type HistoryStore interface {
	Append(ctx context.Context, r Record) error
	// List returns the newest records first; node "" means every node and
	// limit <= 0 means no limit.
	List(ctx context.Context, node string, limit int) ([]Record, error)
}

// MemoryHistory is a HistoryStore for tests and for processes that export
// records elsewhere. The zero value is ready to use.
type MemoryHistory struct {
	mu   sync.Mutex
	recs []Record
}

var _ HistoryStore = (*MemoryHistory)(nil)

func (h *MemoryHistory) Append(_ context.Context, r Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.recs = append(h.recs, r)
	return nil
}

func (h *MemoryHistory) List(_ context.Context, node string, limit int) ([]Record, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return newestFirst(h.recs, node, limit), nil
}

func newestFirst(recs []Record, node string, limit int) []Record {
	var out []Record
	for i := len(recs) - 1; i >= 0; i-- {
		if node != "" && recs[i].Node != node {
			continue
		}
		out = append(out, recs[i])
		if limit > 0 && len(out) == limit {
			break
		}
	}
	return out
}

// FileHistory appends one JSON line per record to a file and fsyncs it, so
// a record survives a crash right after a fence.
type FileHistory struct {
	Path string
	mu   sync.Mutex
}

var _ HistoryStore = (*FileHistory)(nil)

// NewFileHistory returns a FileHistory writing to path (created on first
// Append).
func NewFileHistory(path string) *FileHistory { return &FileHistory{Path: path} }

func (h *FileHistory) Append(_ context.Context, r Record) error {
	b, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("fencing: history: %w", err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	f, err := os.OpenFile(h.Path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("fencing: history: %w", err)
	}
	if _, err := f.Write(append(b, '\n')); err != nil {
		f.Close()
		return fmt.Errorf("fencing: history: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("fencing: history: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("fencing: history: %w", err)
	}
	return nil
}

func (h *FileHistory) List(_ context.Context, node string, limit int) ([]Record, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	f, err := os.Open(h.Path)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("fencing: history: %w", err)
	}
	defer f.Close()
	var recs []Record
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for line := 1; sc.Scan(); line++ {
		var r Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			return nil, fmt.Errorf("fencing: history %s line %d: %w", h.Path, line, err)
		}
		recs = append(recs, r)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("fencing: history: %w", err)
	}
	return newestFirst(recs, node, limit), nil
}
