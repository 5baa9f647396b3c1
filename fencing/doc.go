// Package fencing powers failed nodes off and proves it. It owns the fence
// agents (IPMI lanplus through go-ipmi, APC switched PDUs through gosnmp,
// Redfish BMCs through gofish,
// fence-agents compatible programs, manual operator confirmation), the
// per-node fencing topology, fence history and device health monitoring.
//
// The rule the package exists for: a fence counts only when a Status read
// reports the node off before the deadline. A command that "succeeded" is
// not confirmation, and an unreadable status is a failure (DESIGN.md,
// invariant 4).
//
// Usage loop (cluster/ or cmd/ wire it; this package imports neither):
//
//	cfg, _ := fencing.LoadConfig("fence.json")           // or from Raft
//	f, _ := cfg.Fencer(history, logger)                  // history: a HistoryStore
//	res, err := f.Fence(ctx, "node-a")                   // levels in order
//	if err != nil { /* errors.Is(err, fencing.ErrFenceFailed): do not take over, retry, alert */ }
//
//	mon := &fencing.HealthMonitor{Devices: f.Devices, Interval: time.Minute, OnChange: alert}
//	go mon.Run(ctx)
//
// Agent is the five-verb interface every device implements; WithClose and
// WithConfirmer are optional extras. FakeAgent is a scripted double for
// controller tests. Secrets are Secret values, redacted in fmt, slog, JSON
// and errors.
package fencing
