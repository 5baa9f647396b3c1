#!/usr/bin/env bash
# Runs every Fuzz* target in the module for a short time ($1, default 10s).
# The committed corpus under testdata/fuzz is always replayed by `go test`;
# this adds fresh inputs on top.
set -euo pipefail
t=${1:-10s}
mapfile -t pkgs < <(go list ./...)
for pkg in "${pkgs[@]}"; do
  dir=$(go list -f '{{.Dir}}' "$pkg")
  for f in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/func //' | sort -u); do
    echo "== fuzz $pkg $f ($t)"
    go test -run '^$' -fuzz "^${f}\$" -fuzztime "$t" "$pkg"
  done
done
