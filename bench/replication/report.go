package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// run is one measured run.
type run struct {
	Row     string  `json:"row"`
	Config  string  `json:"config"`
	Repeat  int     `json:"repeat"`
	Value   float64 `json:"value"`
	P99     float64 `json:"p99,omitempty"`
	Unit    string  `json:"unit"`
	Seconds float64 `json:"seconds,omitempty"`
	Count   int     `json:"count,omitempty"`
	Err     string  `json:"err,omitempty"`
}

type recorder struct {
	o         options
	configs   []config
	backings  []string
	runs      []run
	loadStart string
	loadEnd   string
	wall      time.Duration
}

func newRecorder(o options, configs []config, backings []string) *recorder {
	return &recorder{o: o, configs: configs, backings: backings}
}

func (r *recorder) add(row, cfg string, rep int, x run) {
	x.Row, x.Config, x.Repeat = row, cfg, rep+1
	r.runs = append(r.runs, x)
}

// series returns the runs of one row and configuration in repeat order.
func (r *recorder) series(row, cfg string) []run {
	var out []run
	for _, x := range r.runs {
		if x.Row == row && x.Config == cfg {
			out = append(out, x)
		}
	}
	return out
}

func values(rs []run, f func(run) float64) []float64 {
	var v []float64
	for _, x := range rs {
		v = append(v, f(x))
	}
	return v
}

func val(x run) float64 { return x.Value }
func p99(x run) float64 { return x.P99 }

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// paired combines repeat i of a with repeat i of b.
func paired(a, b []float64, f func(x, y float64) float64) []float64 {
	var out []float64
	for i := range min(len(a), len(b)) {
		out = append(out, f(a[i], b[i]))
	}
	return out
}

func ratio(x, y float64) float64 { return x / y }
func diff(x, y float64) float64  { return x - y }

func minOf(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	return slices.Min(v)
}

func met(ok bool) string {
	if ok {
		return "met"
	}
	return "NOT met"
}

func (r *recorder) print(w io.Writer) {
	fmt.Fprintf(w, "\nReplicated volume, 1 vs 2 replicas (go run ./bench/replication)\n")
	fmt.Fprintf(w, "replica in its own network namespace, reached over a veth pair; \"2 replicas\" is plaintext TCP (protocol benchmark), \"TLS\" the same over TLS 1.3\n")
	fmt.Fprintf(w, "Volume API called directly (no iSCSI); %d repeats of %s per run, a fresh volume of %d MiB per run; throughput runs end with a Flush inside the timed span\n",
		r.o.repeats, r.o.duration, r.o.sizeMiB)
	fmt.Fprintf(w, "load average %s at start, %s at end; wall %s; %d CPUs\n", r.loadStart, r.loadEnd, r.wall.Round(time.Second), runtime.NumCPU())
	for _, b := range r.backings {
		fmt.Fprintln(w)
		switch b {
		case "tmpfs":
			fmt.Fprintln(w, "backing files on tmpfs, both nodes (flushes are free; the 1-replica write is a memcpy)")
		case "disk":
			fmt.Fprintf(w, "backing files on the real disk (%s), both nodes on the SAME virtual disk: 2 replicas write every byte to it twice\n", r.o.diskDir)
		}
		r.printTable(w, b)
	}
	for _, x := range r.runs {
		if x.Err != "" {
			fmt.Fprintf(w, "run error: %s %s #%d: %s\n", x.Row, x.Config, x.Repeat, x.Err)
		}
	}
}

func (r *recorder) printTable(w io.Writer, backing string) {
	one, two, tls := "1 replica", "2 replicas", "2 replicas TLS"
	hasTLS := len(r.configs) > 2
	rowIOPS, rowLat, rowSeq, rowResync := rowIOPS+"/"+backing, rowLat+"/"+backing, rowSeq+"/"+backing, rowResync+"/"+backing
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "row\t1 replica (median)\t2 replicas (median)\t2 vs 1: min / median\t2 replicas TLS (median)\tgoal")
	tlsCell := func(row string, f func(run) float64, unit string) string {
		if !hasTLS {
			return "-"
		}
		return fmtNum(median(values(r.series(row, tls), f)), unit)
	}
	all := func(row, cfg string, f func(run) float64) []float64 { return values(r.series(row, cfg), f) }

	// Rows not selected by -rows have no runs and are left out.
	has := func(row string) bool { return len(r.series(row, two)) > 0 }
	var a, b, rt []float64

	// IOPS.
	if has(rowIOPS) {
		a, b = all(rowIOPS, one, val), all(rowIOPS, two, val)
		rt = paired(b, a, ratio)
		fmt.Fprintf(tw, "4K random write, QD%d\t%s\t%s\t%.2f / %.2f\t%s\t(none; shown for scale)\n", r.o.qd,
			fmtNum(median(a), "IOPS"), fmtNum(median(b), "IOPS"), minOf(rt), median(rt), tlsCell(rowIOPS, val, "IOPS"))
	}

	// Latency at QD1, with the veth round trip measured in the same session.
	if has(rowLat) {
		rtt := r.series(strings.TrimSuffix(rowLat, "/"+backing), "veth RTT")
		rttP50 := median(values(rtt, val))
		for _, q := range []struct {
			name string
			f    func(run) float64
		}{{"p50", val}, {"p99", p99}} {
			a, b := all(rowLat, one, q.f), all(rowLat, two, q.f)
			added := paired(b, a, diff)
			goal := "(none)"
			if q.name == "p50" {
				limit := rttP50 + 100
				goal = fmt.Sprintf("added ≤ RTT %.0f µs + 100 µs = %.0f µs: %s", rttP50, limit, met(median(added) <= limit))
			}
			fmt.Fprintf(tw, "4K write latency QD1 %s\t%s\t%s\tadded %.0f / %.0f µs\t%s\t%s\n", q.name,
				fmtNum(median(a), "µs"), fmtNum(median(b), "µs"), minOf(added), median(added), tlsCell(rowLat, q.f, "µs"), goal)
		}
		fmt.Fprintf(tw, "veth TCP round trip, 64 B\tp50 %.0f µs, p99 %.0f µs (median of %d sets)\t\t\t\t\n",
			rttP50, median(values(rtt, p99)), len(rtt))
	}

	// Sequential throughput.
	a, b = all(rowSeq, one, val), all(rowSeq, two, val)
	if has(rowSeq) {
		rt = paired(b, a, ratio)
		fmt.Fprintf(tw, "128K sequential write, QD%d\t%s\t%s\t%.2f / %.2f\t%s\tratio ≥ 0.80: %s\n", r.o.qd,
			fmtNum(median(a), "MB/s"), fmtNum(median(b), "MB/s"), minOf(rt), median(rt), tlsCell(rowSeq, val, "MB/s"), met(median(rt) >= 0.8))
	}

	// Resync against the single-replica write rate (the 128K row).
	if !has(rowResync) {
		tw.Flush()
		return
	}
	single := median(a)
	rs := all(rowResync, two, val)
	rr := values(r.series(rowResync, two), func(x run) float64 { return x.Value / single })
	fmt.Fprintf(tw, "resync, %d MiB all dirty\t%s (1-replica write rate)\t%s\t%.2f / %.2f of the write rate\t%s\tresync ≥ 80%% of write rate: %s\n",
		r.o.sizeMiB, fmtNum(single, "MB/s"), fmtNum(median(rs), "MB/s"), minOf(rr), median(rr), tlsCell(rowResync, val, "MB/s"), met(median(rr) >= 0.8))
	tw.Flush()
}

func fmtNum(v float64, unit string) string {
	switch unit {
	case "IOPS":
		return fmt.Sprintf("%s IOPS", thousands(int64(v+0.5)))
	case "MB/s":
		return fmt.Sprintf("%.0f MB/s", v)
	}
	return fmt.Sprintf("%.0f %s", v, unit)
}

func thousands(n int64) string {
	s := fmt.Sprint(n)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

func (r *recorder) write(path string) error {
	if path == "" {
		return nil
	}
	doc := map[string]any{
		"loadavg_start": r.loadStart, "loadavg_end": r.loadEnd, "wall_seconds": r.wall.Seconds(),
		"repeats": r.o.repeats, "duration_s": r.o.duration.Seconds(), "size_mib": r.o.sizeMiB, "queue_depth": r.o.qd,
		"backing": r.backings, "disk_dir": r.o.diskDir, "transport": "TCP over veth between two network namespaces",
		"runs": r.runs,
	}
	raw, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return fmt.Errorf("bench/replication: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("bench/replication: %w", err)
	}
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		return fmt.Errorf("bench/replication: %w", err)
	}
	return nil
}
