package webui

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// collector reads the Service at scrape time, so the gauges are never
// stale and nothing needs updating on state changes.
type collector struct {
	svc     Service
	timeout time.Duration

	raftState, nodes, volumes, targets, groups, maintenance, up *prometheus.Desc
}

func newCollector(svc Service, timeout time.Duration) *collector {
	return &collector{
		svc: svc, timeout: timeout,
		raftState:   prometheus.NewDesc("hasan_raft_state", "1 for the raft role this node is in, 0 for the others.", []string{"state"}, nil),
		nodes:       prometheus.NewDesc("hasan_nodes", "Cluster nodes by state.", []string{"state"}, nil),
		volumes:     prometheus.NewDesc("hasan_volumes", "Volumes in the cluster state.", nil, nil),
		targets:     prometheus.NewDesc("hasan_targets", "Targets in the cluster state.", nil, nil),
		groups:      prometheus.NewDesc("hasan_groups", "Target groups by owner node (\"\" while released).", []string{"owner"}, nil),
		maintenance: prometheus.NewDesc("hasan_maintenance", "1 while cluster-wide maintenance is on.", nil, nil),
		up:          prometheus.NewDesc("hasan_status_up", "1 if the cluster status could be read for this scrape.", nil, nil),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.raftState, c.nodes, c.volumes, c.targets, c.groups, c.maintenance, c.up} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	st, err := c.svc.Status(ctx)
	if err != nil {
		ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 0)
		return
	}
	ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 1)
	for _, s := range raftStates {
		v := 0.0
		if s == st.RaftState {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(c.raftState, prometheus.GaugeValue, v, s)
	}
	for state, n := range st.Nodes {
		ch <- prometheus.MustNewConstMetric(c.nodes, prometheus.GaugeValue, float64(n), state)
	}
	ch <- prometheus.MustNewConstMetric(c.volumes, prometheus.GaugeValue, float64(st.Volumes))
	ch <- prometheus.MustNewConstMetric(c.targets, prometheus.GaugeValue, float64(st.Targets))
	byOwner := map[string]int{}
	for _, g := range st.Groups {
		byOwner[g.Owner]++
	}
	for owner, n := range byOwner {
		ch <- prometheus.MustNewConstMetric(c.groups, prometheus.GaugeValue, float64(n), owner)
	}
	m := 0.0
	if st.Maintenance {
		m = 1
	}
	ch <- prometheus.MustNewConstMetric(c.maintenance, prometheus.GaugeValue, m)
}
