package fencing

import (
	"os"
	"testing"
)

// TestMain lets the test binary double as a peer helper: snmpd runs it as
// the pass_persist backend of the simulated APC PDU.
func TestMain(m *testing.M) {
	if os.Getenv("HASAN_FENCE_HELPER") == "apc-pass" {
		os.Exit(runAPCPassPersist(os.Stdin, os.Stdout, os.Getenv("HASAN_APC_DIR")))
	}
	os.Exit(m.Run())
}
