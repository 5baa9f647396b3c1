package peer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// EnsurePackages installs the Debian packages that are missing, with apt-get
// (the harness machines run as root). apt-get update runs only when an install
// fails, since the package lists are usually fresh enough.
func EnsurePackages(ctx context.Context, log *slog.Logger, pkgs ...string) error {
	var missing []string
	for _, p := range pkgs {
		out, err := exec.CommandContext(ctx, "dpkg-query", "-W", "-f=${Status}", p).Output()
		if err != nil || !strings.Contains(string(out), "install ok installed") {
			missing = append(missing, p)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	log.Info("installing missing packages", "packages", missing)
	install := func() ([]byte, error) {
		cmd := exec.CommandContext(ctx, "apt-get", append([]string{"install", "-y", "--no-install-recommends"}, missing...)...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		return cmd.CombinedOutput()
	}
	if _, err := install(); err == nil {
		return nil
	}
	if out, err := exec.CommandContext(ctx, "apt-get", "update").CombinedOutput(); err != nil {
		return fmt.Errorf("peer: apt-get update: %v: %s", err, tail(out))
	}
	if out, err := install(); err != nil {
		return fmt.Errorf("peer: apt-get install %v: %v: %s", missing, err, tail(out))
	}
	return nil
}

func tail(b []byte) string {
	const n = 2000
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// ModuleRoot finds the directory holding hasan's go.mod, starting from the
// working directory (a package directory under `go test`, the repository
// root under `go run`).
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("peer: %w", err)
	}
	for {
		raw, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && strings.Contains(string(raw), "module github.com/hasan-storage/hasan\n") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("peer: hasan go.mod not found above the working directory")
		}
		dir = parent
	}
}

// BuildHasan builds ./cmd/hasan into dir and returns the binary's path.
func BuildHasan(ctx context.Context, dir string) (string, error) {
	root, err := ModuleRoot()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "hasan")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/hasan")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("peer: go build ./cmd/hasan: %v: %s", err, tail(out))
	}
	return bin, nil
}

// GotgtVersion is the only gotgt release the module proxy serves.
const GotgtVersion = "v0.2.2"

// BuildGotgt builds gotgt's daemon from the Go module proxy into cacheDir,
// outside the repository, and returns the binary's path; a previous build is
// reused. `go install pkg@version` does not work here because the proxy
// refuses gotgt's version list, so the module zip is downloaded with
// `go mod download` into a private module cache and built in place as its own
// main module.
func BuildGotgt(ctx context.Context, cacheDir string) (string, error) {
	bin := filepath.Join(cacheDir, "bin", "gotgt")
	if fi, err := os.Stat(bin); err == nil && fi.Mode().IsRegular() {
		return bin, nil
	}
	env := append(os.Environ(),
		"GOMODCACHE="+filepath.Join(cacheDir, "modcache"),
		"GOFLAGS=-modcacherw",
		"GOWORK=off",
		"GOTOOLCHAIN=local",
	)
	dl := exec.CommandContext(ctx, "go", "mod", "download", "-json", "github.com/gostor/gotgt@"+GotgtVersion)
	dl.Env = env
	dl.Dir = cacheDir
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return "", fmt.Errorf("peer: gotgt cache: %w", err)
	}
	out, err := dl.Output()
	if err != nil {
		return "", fmt.Errorf("peer: go mod download gotgt: %v: %s", err, tail(out))
	}
	var mod struct{ Dir string }
	if err := json.Unmarshal(out, &mod); err != nil || mod.Dir == "" {
		return "", fmt.Errorf("peer: go mod download gotgt: no module directory in %q", tail(out))
	}
	build := exec.CommandContext(ctx, "go", "build", "-o", bin, ".")
	build.Env = env
	build.Dir = mod.Dir
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("peer: build gotgt: %v: %s", err, tail(out))
	}
	return bin, nil
}
