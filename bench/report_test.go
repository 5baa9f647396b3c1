package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{{nil, 0}, {[]float64{3}, 3}, {[]float64{5, 1, 3}, 3}, {[]float64{4, 1, 3, 2}, 2.5}} {
		if got := median(c.in); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}

// Ratios pair repeat i with repeat i and ignore runs that did not finish, so
// a stalled baseline run cannot produce a ratio.
func TestRatiosAndTable(t *testing.T) {
	w := workloads[0]
	a := &peerRun{label: "hasan"}
	b := &peerRun{label: "tgt"}
	r := &recorder{cfg: config{baseline: "tgt", repeats: 3}}
	r.add(w, a, 0, result{IOPS: 200, Status: "ok"})
	r.add(w, b, 0, result{IOPS: 100, Status: "ok"})
	r.add(w, a, 1, result{IOPS: 300, Status: "ok"})
	r.add(w, b, 1, result{IOPS: 200, Status: "ok"})
	r.add(w, a, 2, result{IOPS: 999, Status: "ok"})
	r.add(w, b, 2, result{Status: "stalled"})
	got := r.ratios(w.Name, "hasan", "tgt")
	if len(got) != 2 || got[0] != 2 || got[1] != 1.5 {
		t.Fatalf("ratios = %v, want [2 1.5]", got)
	}
	var out bytes.Buffer
	r.print(&out, []*peerRun{a, b})
	for _, want := range []string{"noisy", "1.50", "1.75", "stalled", "2/3"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, out.String())
		}
	}
}

func TestPerfParsing(t *testing.T) {
	out := "capacity is 2097152 blocks\nfixed transfer size of 8 blocks (4096 byte)\n" +
		"00:00:01 - lba 1, iops current 10 (0 MB/s), iops average 10 (0 MB/s)\r" +
		"iops average 43210 (168 MB/s)     \n\nfinished.\n"
	all := perfAverage.FindAllStringSubmatch(strings.ReplaceAll(out, "\r", "\n"), -1)
	if len(all) != 2 || all[1][1] != "43210" {
		t.Fatalf("matches = %v", all)
	}
	if m := perfTransfer.FindStringSubmatch(out); m == nil || m[2] != "4096" {
		t.Fatalf("transfer = %v", m)
	}
	if m := qemuDone.FindStringSubmatch("Sending 10 write requests\nRun completed in 12.345 seconds.\n"); m == nil || m[1] != "12.345" {
		t.Fatalf("qemu = %v", m)
	}
}
