package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/hasan-storage/hasan/bench/peer"
)

// workload is one client program with fixed parameters.
type workload struct {
	Name string
	// Tool is "iscsi-perf" (reads) or "qemu-img" (writes).
	Tool      string
	BlockSize int
	Random    bool
	// guessIOPS sizes qemu-img's calibration run, which then sizes the
	// measured runs; qemu-img bench takes a request count, not a duration.
	guessIOPS int
}

var workloads = []workload{
	{Name: "randread-4k", Tool: "iscsi-perf", BlockSize: 4096, Random: true},
	{Name: "seqread-128k", Tool: "iscsi-perf", BlockSize: 128 << 10},
	{Name: "write-4k", Tool: "qemu-img", BlockSize: 4096, guessIOPS: 40000},
	{Name: "write-128k", Tool: "qemu-img", BlockSize: 128 << 10, guessIOPS: 5000},
}

// queueDepth is the number of commands in flight for every client.
const queueDepth = 32

// result is one client run.
type result struct {
	IOPS    float64
	Seconds float64
	// Requests is the number of completed requests (qemu-img) or 0.
	Requests int
	// Status is "ok", "stalled" (deadline passed), "short" (ran under the
	// minimum duration) or "error".
	Status string
	Detail string
	// PartialIOPS is the last progress average a stalled iscsi-perf printed
	// before it stopped moving: how fast the peer was until it stalled.
	PartialIOPS float64
}

func (r result) MiBps(bs int) float64 { return r.IOPS * float64(bs) / (1 << 20) }

var (
	perfAverage  = regexp.MustCompile(`iops average (\d+) \(`)
	perfTransfer = regexp.MustCompile(`fixed transfer size of (\d+) blocks \((\d+) byte\)`)
	qemuDone     = regexp.MustCompile(`Run completed in ([0-9.]+) seconds`)
)

// runPerf runs iscsi-perf for d (whole seconds) with transfers of w.BlockSize
// bytes; -b counts logical blocks, so it needs the LUN's block length.
func runPerf(ctx context.Context, t *peer.Target, w workload, lbs int, d, deadline time.Duration) result {
	if w.BlockSize%lbs != 0 {
		return result{Status: "error", Detail: fmt.Sprintf("block size %d is not a multiple of the LUN's %d", w.BlockSize, lbs)}
	}
	args := []string{"-m", strconv.Itoa(queueDepth), "-b", strconv.Itoa(w.BlockSize / lbs), "-t", strconv.Itoa(int(d.Seconds()))}
	if w.Random {
		args = append(args, "-r")
	}
	args = append(args, t.URL(0))
	out, elapsed, err := runDeadline(ctx, t, deadline, "iscsi-perf", args...)
	text := strings.ReplaceAll(string(out), "\r", "\n")
	if m := perfTransfer.FindStringSubmatch(text); m != nil && m[2] != strconv.Itoa(w.BlockSize) {
		return result{Status: "error", Detail: "iscsi-perf transfer size " + m[2] + " bytes"}
	}
	all := perfAverage.FindAllStringSubmatch(text, -1)
	if errors.Is(err, context.DeadlineExceeded) {
		r := result{Status: "stalled", Seconds: elapsed.Seconds(), Detail: fmt.Sprintf("no result within %s", deadline)}
		if len(all) > 0 {
			r.Detail += "; last progress average " + all[len(all)-1][1] + " IOPS"
			r.PartialIOPS, _ = strconv.ParseFloat(all[len(all)-1][1], 64)
		}
		return r
	}
	if err != nil || len(all) == 0 || !strings.Contains(text, "finished.") {
		return result{Status: "error", Detail: fmt.Sprintf("iscsi-perf: %v: %s", err, lastLine(text))}
	}
	// The final line is the run's average over its whole runtime.
	iops, _ := strconv.ParseFloat(all[len(all)-1][1], 64)
	return result{IOPS: iops, Seconds: d.Seconds(), Status: "ok"}
}

// runQemu writes count requests of w.BlockSize sequentially (wrapping at the
// end of the LUN) with qemu-img bench's iscsi driver.
func runQemu(ctx context.Context, t *peer.Target, w workload, count int, deadline time.Duration) result {
	args := []string{"bench", "-w", "-d", strconv.Itoa(queueDepth), "-s", strconv.Itoa(w.BlockSize),
		"-c", strconv.Itoa(count), "-f", "raw", t.URL(0)}
	out, elapsed, err := runDeadline(ctx, t, deadline, "qemu-img", args...)
	if errors.Is(err, context.DeadlineExceeded) {
		return result{Status: "stalled", Seconds: elapsed.Seconds(), Requests: count, Detail: fmt.Sprintf("%d writes not done within %s", count, deadline)}
	}
	m := qemuDone.FindSubmatch(out)
	if err != nil || m == nil {
		return result{Status: "error", Detail: fmt.Sprintf("qemu-img bench: %v: %s", err, lastLine(string(out)))}
	}
	secs, _ := strconv.ParseFloat(string(m[1]), 64)
	if secs <= 0 {
		return result{Status: "error", Detail: "qemu-img reported zero seconds"}
	}
	return result{IOPS: float64(count) / secs, Seconds: secs, Requests: count, Status: "ok"}
}

// runDeadline runs a client and kills it when deadline passes, which is how a
// stalled target shows up.
func runDeadline(ctx context.Context, t *peer.Target, deadline time.Duration, name string, args ...string) ([]byte, time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, deadline)
	defer cancel()
	cmd := t.Command(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = 2 * time.Second
	start := time.Now()
	err := cmd.Run()
	if ctx.Err() != nil {
		err = ctx.Err()
	}
	return out.Bytes(), time.Since(start), err
}

// blockLength asks the LUN for its logical block length.
func blockLength(ctx context.Context, t *peer.Target) (int, error) {
	out, _, err := runDeadline(ctx, t, 15*time.Second, "iscsi-readcapacity16", t.URL(0))
	if err != nil {
		return 0, fmt.Errorf("bench: iscsi-readcapacity16 %s: %w: %s", t.Name, err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(line, "LOGICAL BLOCK LENGTH IN BYTES:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil || n <= 0 {
				return 0, fmt.Errorf("bench: block length %q", v)
			}
			return n, nil
		}
	}
	return 0, fmt.Errorf("bench: no block length from %s: %s", t.Name, out)
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}
