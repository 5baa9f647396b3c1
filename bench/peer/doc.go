// Package peer starts iSCSI targets on loopback for the benchmark and the
// conformance harness: hasan's own `hasan target run`, Debian's tgtd and,
// optionally, gotgt built from the Go module proxy into a throwaway directory.
//
// Every target gets a fresh backing file, a free 127.0.0.1 port and its own
// process group with a parent-death signal, so a harness that is killed does
// not leave daemons behind. A caller starts a target, runs clients through
// Target.Command (gotgt lives in its own network namespace, so its clients
// must too) and closes it:
//
//	t, err := peer.StartTgt(ctx, peer.Options{Dir: dir, IQN: iqn, Size: 1 << 30})
//	if err != nil { ... }
//	defer t.Close()
//	out, err := t.Command(ctx, "iscsi-perf", "-m", "32", t.URL(0)).Output()
//
// Nothing here talks to any address outside 127.0.0.0/8.
package peer
