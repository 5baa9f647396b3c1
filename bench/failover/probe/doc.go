// Package probe measures the failover gap the way issue 5 defines it: an
// iSCSI client (package initiator) logs in with a 0.3 s deadline, then every
// 100 ms writes a block carrying a sequence number with FUA, reads it back
// and verifies it, each command under a 1 s deadline. On any error it logs
// in again and, after every re-login, reads back its whole ring of blocks:
// an acknowledged write that is missing is fatal (ErrLostWrite). The gap is
// the longest time between two verified write+read pairs.
//
//	p := probe.New(probe.Config{Initiator: initiator.Config{Portal: vip + ":3260", Target: iqn, Dial: l.Initiator().DialContext}})
//	go p.Run(ctx)
//	p.WaitPairs(ctx, 5)     // steady I/O
//	l.PowerOff("n1")        // the disruption
//	p.WaitPairs(ctx, 5)     // I/O resumed
//	res := p.Snapshot()     // res.Gap, res.IOErrors, res.LostWrites
//
// Repeat runs a Scenario (a disruption and its restore) n times with a fresh
// probe each time and returns p50/p99 of the gaps; Standalone runs `hasan
// target run` and kills/restarts it, the disruption available before the
// cluster exists. The command in bench/failover drives both.
package probe
