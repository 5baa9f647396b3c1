// Package conformance runs libiscsi's iscsi-test-cu against `hasan target run`
// and turns its output into summary tables and a pass/fail verdict.
//
// The suite runs three times: a thick (preallocated) 1 GiB LUN, a thin
// (sparse) one, and the thick one behind CHAP. Every run passes -d (dataloss
// tests) and both initiator names, and gives a second URL so the MultipathIO
// tests run. A run fails on any failed test, on an incomplete suite, and on
// any skipped test that skips.txt does not list with a reason, so an optional
// feature cannot disappear silently. docs/conformance.md explains the
// allowlist and records tgt's figures for comparison.
//
// The test is skipped unless HASAN_CONFORMANCE=1, which keeps `go test ./...`
// fast:
//
//	HASAN_CONFORMANCE=1 go test -v -count=1 -timeout 30m ./test/conformance/
//
// HASAN_CONFORMANCE_TARGET=tgt measures Debian's tgtd the same way (the
// allowlist is then reported, not enforced); HASAN_CONFORMANCE_RUNS selects
// runs (thick,thin,chap); HASAN_CONFORMANCE_OUT keeps the raw outputs and
// daemon logs (default: test/conformance/out).
//
// The parser (ParseVerbose) and the allowlist are plain code with their own
// unit tests on recorded iscsi-test-cu output, so they run in every `go test`.
package conformance
