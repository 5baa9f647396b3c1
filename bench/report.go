package main

import (
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// record is one run in results.json / results.csv.
type record struct {
	Workload  string  `json:"workload"`
	Tool      string  `json:"tool"`
	BlockSize int     `json:"block_size"`
	Peer      string  `json:"peer"`
	Repeat    int     `json:"repeat"`
	Status    string  `json:"status"`
	IOPS      float64 `json:"iops"`
	MiBps     float64 `json:"mib_per_s"`
	Seconds   float64 `json:"seconds"`
	Requests  int     `json:"requests,omitempty"`
	Detail    string  `json:"detail,omitempty"`
	// PartialIOPS: see result.PartialIOPS.
	PartialIOPS float64 `json:"partial_iops,omitempty"`
}

type recorder struct {
	started   time.Time
	cfg       config
	skipped   []string
	loadStart string
	loadEnd   string
	wall      time.Duration
	records   []record
}

func (r *recorder) add(w workload, p *peerRun, rep int, res result) {
	r.records = append(r.records, record{
		Workload: w.Name, Tool: w.Tool, BlockSize: w.BlockSize, Peer: p.label, Repeat: rep + 1,
		Status: res.Status, IOPS: res.IOPS, MiBps: res.MiBps(w.BlockSize), Seconds: res.Seconds,
		Requests: res.Requests, Detail: res.Detail, PartialIOPS: res.PartialIOPS,
	})
}

func (r *recorder) write(dir string) error {
	doc := map[string]any{
		"started":         r.started.UTC().Format(time.RFC3339),
		"wall_seconds":    r.wall.Seconds(),
		"cpus":            runtime.NumCPU(),
		"loadavg_start":   r.loadStart,
		"loadavg_end":     r.loadEnd,
		"duration_s":      r.cfg.duration.Seconds(),
		"repeats":         r.cfg.repeats,
		"queue_depth":     queueDepth,
		"lun_bytes":       r.cfg.size,
		"baseline":        r.cfg.baseline,
		"skipped_peers":   r.skipped,
		"runs":            r.records,
		"note":            "noisy shared machine: compare peers only within one session (ratios), never absolute figures across sessions",
		"median_and_pair": "tables use the median of ok runs; ratios pair repeat i of each peer with repeat i of the baseline",
	}
	raw, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "results.json"), raw, 0o644); err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	f, err := os.Create(filepath.Join(dir, "results.csv"))
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	defer f.Close()
	cw := csv.NewWriter(f)
	_ = cw.Write([]string{"workload", "tool", "block_size", "peer", "repeat", "status", "iops", "mib_per_s", "seconds", "requests", "detail"})
	for _, x := range r.records {
		_ = cw.Write([]string{x.Workload, x.Tool, strconv.Itoa(x.BlockSize), x.Peer, strconv.Itoa(x.Repeat), x.Status,
			strconv.FormatFloat(x.IOPS, 'f', 0, 64), strconv.FormatFloat(x.MiBps, 'f', 1, 64),
			strconv.FormatFloat(x.Seconds, 'f', 2, 64), strconv.Itoa(x.Requests), x.Detail})
	}
	cw.Flush()
	if err := cw.Error(); err != nil {
		return fmt.Errorf("bench: results.csv: %w", err)
	}
	return nil
}

// usable is a run whose rate means something: finished, maybe short.
func usable(x record) bool { return x.Status == "ok" || x.Status == "short" }

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

func (r *recorder) print(w io.Writer, peers []*peerRun) {
	fmt.Fprintf(w, "\nhasan bench: %d CPUs, load average %s at start, %s at end; %d x %.0fs runs per peer, queue depth %d, %d MiB LUN\n",
		runtime.NumCPU(), r.loadStart, r.loadEnd, r.cfg.repeats, r.cfg.duration.Seconds(), queueDepth, r.cfg.size>>20)
	fmt.Fprintln(w, "NOTE: this machine is shared and noisy. Only the ratios between peers measured in this one session mean anything;")
	fmt.Fprintln(w, "      do not compare absolute IOPS with other sessions.")
	for _, s := range r.skipped {
		fmt.Fprintf(w, "skipped peer: %s\n", s)
	}
	var base *peerRun
	for _, p := range peers {
		if p.label == r.cfg.baseline {
			base = p
		}
	}
	for _, wl := range workloads {
		recs := r.of(wl.Name, "")
		if len(recs) == 0 {
			continue
		}
		fmt.Fprintf(w, "\n%s (%s, %d KiB, %s)\n", wl.Name, wl.Tool, wl.BlockSize>>10, map[bool]string{true: "random", false: "sequential"}[wl.Random])
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintf(tw, "peer\tmedian IOPS\tmedian MiB/s\truns ok\tIOPS per run\tvs %s: min\tmedian\t\n", r.cfg.baseline)
		for _, p := range peers {
			mine := r.of(wl.Name, p.label)
			var perRun []string
			var rates []float64
			for _, x := range mine {
				if usable(x) {
					rates = append(rates, x.IOPS)
					perRun = append(perRun, strconv.FormatFloat(x.IOPS, 'f', 0, 64))
				} else if x.PartialIOPS > 0 {
					perRun = append(perRun, fmt.Sprintf("%s(%.0f before)", x.Status, x.PartialIOPS))
				} else {
					perRun = append(perRun, x.Status)
				}
			}
			med := median(rates)
			medCol, mibCol := "-", "-"
			if len(rates) > 0 {
				medCol = strconv.FormatFloat(med, 'f', 0, 64)
				mibCol = strconv.FormatFloat(med*float64(wl.BlockSize)/(1<<20), 'f', 0, 64)
			}
			minR, medR := "-", "-"
			if base != nil && p != base {
				if ratios := r.ratios(wl.Name, p.label, base.label); len(ratios) > 0 {
					minR = fmt.Sprintf("%.2f", slices.Min(ratios))
					medR = fmt.Sprintf("%.2f", median(ratios))
				}
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d/%d\t%s\t%s\t%s\t\n", p.label, medCol, mibCol, len(rates), len(mine), strings.Join(perRun, " "), minR, medR)
		}
		tw.Flush()
	}
	fmt.Fprintln(w, "\nruns ok counts finished runs; \"stalled\" means no result before the deadline (gotgt: the peer's")
	fmt.Fprintln(w, "known ExpCmdSN stall), with the client's last progress average in brackets when it printed one.")
	fmt.Fprintf(w, "wall time %s; raw runs in results.json and results.csv\n", r.wall.Round(time.Second))
}

func (r *recorder) of(workload, peer string) []record {
	var out []record
	for _, x := range r.records {
		if x.Workload == workload && (peer == "" || x.Peer == peer) {
			out = append(out, x)
		}
	}
	return out
}

// ratios pairs repeat i of peer with repeat i of base: the two ran minutes
// apart at most, under the same background load.
func (r *recorder) ratios(workload, peer, base string) []float64 {
	b := map[int]float64{}
	for _, x := range r.of(workload, base) {
		if usable(x) {
			b[x.Repeat] = x.IOPS
		}
	}
	var out []float64
	for _, x := range r.of(workload, peer) {
		if v, ok := b[x.Repeat]; ok && usable(x) && v > 0 {
			out = append(out, x.IOPS/v)
		}
	}
	return out
}
