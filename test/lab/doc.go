// Package lab builds a small data centre out of Linux network namespaces
// for integration tests and benchmarks of the cluster: N nodes and an
// initiator on a "cluster" bridge, a management bridge on which every
// storage node's simulated BMC (OpenIPMI ipmi_sim) listens, and fault
// controls: isolate a node, add latency, crash it, cut its power, or have
// its BMC power it off. It needs root.
//
//	l := lab.Start(t, lab.ThreeNodes()) // n1, n2 (with BMCs), w1; cleaned up by t.Cleanup
//	p, err := l.Node("n1").Start(lab.ProcSpec{Name: "hasan", Argv: []string{bin, "serve", "--config", cfg}})
//	bmc := l.BMC("n1")                  // bmc.Addr, bmc.User, bmc.Password, bmc.CipherSuite for fencing config
//	conn, err := l.Initiator().DialContext(ctx, "tcp", vip+":3260")
//	err = l.Isolate("n1")               // or l.Crash, l.PowerOff, bmc.SetFault(lab.FaultStuck, true)
//
// Every process started on a node joins the node's process group; a power
// off (by the BMC or PowerOff) or a Crash SIGKILLs that group and then
// whatever else runs in the node's namespace, so "the node is dead" means
// what it says. A power off first takes the node's links down, as a dead
// machine's NICs go dark. Power on boots the links with their configured
// addresses and starts nothing: the test restarts what it wants.
//
// Cleanup is guaranteed three ways: Close (Start registers it with
// t.Cleanup) kills everything in the lab's namespaces and deletes them; a
// signal handler does the same on SIGINT/SIGTERM/SIGHUP, when t.Cleanup
// would not run; and each lab holds a flock on /run/hasan-lab/ID.lock, so
// after a SIGKILL or a test timeout the next lab's Sweep finds the
// namespaces whose lock is free and deletes them. Names are
// "hlab-<random>-<role>" and nothing is created in the root namespace, so
// parallel labs never collide. See README.md.
package lab
