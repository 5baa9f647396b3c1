package scsi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
)

// filePRStore keeps one LU's persistent-reservation state in a JSON file. It
// models a standalone target's power cycle: state saved without APTPL is not
// restored by LoadPR (SPC-4 5.13.5), state saved with APTPL is.
type filePRStore struct {
	path string
	mu   sync.Mutex
}

// NewFilePRStore returns a PRStore that writes path crash-safely (temporary
// file, fsync, rename, fsync of the directory). The directory must exist.
func NewFilePRStore(path string) PRStore {
	return &filePRStore{path: path}
}

// LoadPR reads the file. A missing file, or state saved with APTPL clear,
// yields an empty state.
func (f *filePRStore) LoadPR(ctx context.Context) (PRState, error) {
	if err := ctx.Err(); err != nil {
		return PRState{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	b, err := os.ReadFile(f.path)
	if errors.Is(err, fs.ErrNotExist) {
		return emptyPRState(), nil
	}
	if err != nil {
		return PRState{}, fmt.Errorf("scsi: read pr state: %w", err)
	}
	var st PRState
	if err := json.Unmarshal(b, &st); err != nil {
		return PRState{}, fmt.Errorf("scsi: decode pr state %s: %w", f.path, err)
	}
	if !st.APTPL {
		return emptyPRState(), nil
	}
	if err := validatePRState(&st); err != nil {
		return PRState{}, fmt.Errorf("%w (file %s)", err, f.path)
	}
	return st, nil
}

// SavePR replaces the file atomically and returns once it is durable.
func (f *filePRStore) SavePR(ctx context.Context, st PRState) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if st.Registrations == nil {
		st.Registrations = []PRRegistration{}
	}
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("scsi: encode pr state: %w", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	dir := filepath.Dir(f.path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(f.path)+".tmp*")
	if err != nil {
		return fmt.Errorf("scsi: save pr state: %w", err)
	}
	tmpName := tmp.Name()
	committed := false
	defer func() {
		if !committed {
			_ = tmp.Close()
			_ = os.Remove(tmpName)
		}
	}()
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("scsi: save pr state: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("scsi: save pr state: fsync: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("scsi: save pr state: %w", err)
	}
	if err := os.Rename(tmpName, f.path); err != nil {
		return fmt.Errorf("scsi: save pr state: %w", err)
	}
	committed = true
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("scsi: save pr state: open dir: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("scsi: save pr state: fsync dir: %w", err)
	}
	return nil
}
