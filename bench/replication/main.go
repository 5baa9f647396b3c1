// Command replication is the replicated-volume part of `make bench`: it
// compares a 1-replica volume with a 2-replica volume replicated over TCP
// between two network namespaces joined by a veth pair.
//
//	go run ./bench/replication              # needs root (ip netns)
//	go run ./bench/replication -repeats 5 -duration 4s
//
// The coordinator (this process, in the root namespace) creates the
// namespaces hrb-p-<pid> and hrb-r-<pid>, a veth pair between them with
// link-local addresses that exist only there, and re-executes itself in
// each: "-role replica" runs a replica Server in one, "-role primary" runs
// the volumes and the workloads in the other and prints the table. The
// namespaces (and with them the veth pair) are deleted at the end, also on
// failure or Ctrl-C; the children die with the coordinator (parent-death
// signal, and they exit when their stdin closes).
//
// The workloads call the Volume (the target's Backend) directly, not
// through iSCSI: this measures the replication protocol and its disk path,
// not the target. Every row runs with backing files on tmpfs and again on
// the real disk (-disk-dir); see README.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"
	"time"
)

type options struct {
	role     string
	repeats  int
	duration time.Duration
	sizeMiB  int64
	qd       int
	dir      string // tmpfs backing files (children: this role's directory)
	diskDir  string // disk backing files; empty: no disk rows
	listen   string // replica: replication address (plaintext)
	tlsAddr  string // replica: replication address (TLS)
	ctlAddr  string // replica: control address
	replica  string // primary: replica host
	certs    string
	tls      bool
	out      string
	rows     string // comma-separated subset of rows to run (default: all)
	cpuprof  string // write CPU profiles of both children to PREFIX.{primary,replica}.pprof
}

func main() {
	var o options
	flag.StringVar(&o.role, "role", "", "internal: replica or primary (set by the coordinator)")
	flag.IntVar(&o.repeats, "repeats", 3, "measured runs per row and configuration")
	flag.DurationVar(&o.duration, "duration", 3*time.Second, "length of each throughput and latency run")
	flag.Int64Var(&o.sizeMiB, "size-mib", 1024, "volume size in MiB (also the resync size)")
	flag.IntVar(&o.qd, "qd", 32, "queue depth of the IOPS and MB/s rows")
	flag.StringVar(&o.dir, "dir", "", "directory for the tmpfs backing files (default: a new directory in /dev/shm)")
	flag.StringVar(&o.diskDir, "disk-dir", "/var/tmp", "directory on a real disk for the disk-backed rows (empty: tmpfs rows only)")
	flag.BoolVar(&o.tls, "tls", true, "also measure 2 replicas over TLS")
	flag.StringVar(&o.out, "out", "bench/out/replication.json", "where the runs are written as JSON (empty: nowhere)")
	flag.StringVar(&o.rows, "rows", "", "comma-separated rows to run: iops,lat,seq,resync (default all)")
	flag.StringVar(&o.cpuprof, "cpuprofile", "", "write CPU profiles of the primary and replica processes to PREFIX.primary.pprof and PREFIX.replica.pprof")
	flag.StringVar(&o.listen, "listen", "", "internal")
	flag.StringVar(&o.tlsAddr, "tls-listen", "", "internal")
	flag.StringVar(&o.ctlAddr, "ctl", "", "internal")
	flag.StringVar(&o.replica, "replica", "", "internal")
	flag.StringVar(&o.certs, "certs", "", "internal")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("role", roleName(o.role))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	stopProf := func() {}
	if o.cpuprof != "" && o.role != "" {
		var err error
		if stopProf, err = startProfile(o.cpuprof + "." + o.role + ".pprof"); err != nil {
			log.Error("bench/replication: cpu profile", "err", err)
			os.Exit(1)
		}
	}
	var err error
	switch o.role {
	case "":
		err = coordinate(ctx, log, o)
	case "replica":
		err = runReplica(ctx, log, o)
	case "primary":
		err = runPrimary(ctx, log, o)
	default:
		err = fmt.Errorf("bench/replication: unknown role %q", o.role)
	}
	stop()
	stopProf()
	if err != nil {
		log.Error("bench/replication failed", "err", err)
		os.Exit(1)
	}
}

func startProfile(path string) (func(), error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, err
	}
	return func() { pprof.StopCPUProfile(); f.Close() }, nil
}

func roleName(r string) string {
	if r == "" {
		return "coordinator"
	}
	return r
}
