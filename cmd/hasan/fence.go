package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/hasan-storage/hasan/fencing"
)

// newFenceCmd groups the fencing subcommands. device, topology and history
// work on the cluster through the REST API; test and status drive the
// devices directly from a local JSON file (docs/fencing.md), because the
// API never hands out the secrets they need.
func newFenceCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "fence",
		Short: "configure the cluster's fence devices and topologies, test devices, read the fence history",
	}
	cmd.AddCommand(newFenceTestCmd(), newFenceStatusCmd(), newFenceDeviceCmd(), newFenceTopologyCmd(), newFenceHistoryCmd(),
		newFenceConfirmCmd())
	return cmd
}

func newFenceTestCmd() *cobra.Command {
	var (
		config, history string
		yes             bool
	)
	c := &cobra.Command{
		Use:   "test NODE",
		Short: "really fence NODE through its configured levels and report every attempt",
		Long: "fence test powers NODE off through its fence levels, exactly as a failover would, " +
			"and confirms it with a status read. The node LOSES POWER. Use --yes to skip the prompt.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			node := args[0]
			cfg, err := fencing.LoadConfig(config)
			if err != nil {
				return err
			}
			topo, ok := cfg.Nodes[node]
			if !ok {
				return fmt.Errorf("fence test: node %q is not in %s", node, config)
			}
			out := cmd.OutOrStdout()
			in := bufio.NewReader(cmd.InOrStdin())
			fmt.Fprintf(out, "node %s, action %s, levels:\n", node, orDefault(string(topo.Action), "off"))
			for i, l := range topo.Levels {
				fmt.Fprintf(out, "  %d: %s\n", i+1, strings.Join(l, " + "))
			}
			if !yes {
				fmt.Fprintf(out, "This powers %s OFF for real. Type the node name to continue: ", node)
				line, _ := in.ReadString('\n')
				if strings.TrimSpace(line) != node {
					return errors.New("fence test: not confirmed; nothing was done")
				}
			}
			var hs fencing.HistoryStore
			if history != "" {
				hs = fencing.NewFileHistory(history)
			}
			f, err := cfg.Fencer(hs, slog.Default())
			if err != nil {
				return err
			}
			// Agents may hold BMC sessions; a BMC with leaked sessions
			// eventually refuses the login a real failover needs.
			defer closeDevices(f.Devices)
			ctx, cancel := context.WithCancel(cmd.Context())
			defer cancel()
			go promptManual(ctx, f, node, in, out)
			res, err := f.Fence(ctx, node)
			fmt.Fprint(out, res.Summary())
			if err != nil {
				return err
			}
			return nil
		},
	}
	c.Flags().StringVar(&config, "config", "", "fencing topology (JSON)")
	c.Flags().StringVar(&history, "history", "", "append fence records to this JSON-lines file")
	c.Flags().BoolVar(&yes, "yes", false, "do not ask for confirmation")
	_ = c.MarkFlagRequired("config")
	return c
}

// promptManual asks the operator at the terminal when a manual device of
// node's topology waits for confirmation.
func promptManual(ctx context.Context, f *fencing.Fencer, node string, in *bufio.Reader, out io.Writer) {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for name, d := range f.Devices {
			m, ok := d.Agent.(fencing.WithConfirmer)
			if !ok || !m.Pending() {
				continue
			}
			fmt.Fprintf(out, "\n%s\nManual device %s: is %s powered off? Type your name to confirm (empty line refuses): ",
				fencing.ManualWarning, name, node)
			line, err := in.ReadString('\n')
			by := strings.TrimSpace(line)
			if err != nil || by == "" {
				fmt.Fprintln(out, "not confirmed; the fence will fail at its deadline")
				return
			}
			if _, err := m.ConfirmOff(by, "hasan fence test"); err != nil {
				fmt.Fprintln(out, "confirmation refused:", err)
			}
		}
	}
}

func newFenceStatusCmd() *cobra.Command {
	var config string
	c := &cobra.Command{
		Use:   "status",
		Short: "check every fence device (reachable, credentials accepted) without changing power",
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := fencing.LoadConfig(config)
			if err != nil {
				return err
			}
			devs, err := cfg.Build(slog.Default())
			if err != nil {
				return err
			}
			defer closeDevices(devs)
			m := &fencing.HealthMonitor{Devices: devs, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
			hs := m.CheckAll(cmd.Context())
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "DEVICE\tTYPE\tHEALTH\tLATENCY\tERROR")
			bad := 0
			for _, h := range hs {
				errText := h.Error
				if x, ok := devs[h.Device].Agent.(*fencing.ExternalAgent); ok && h.State == fencing.HealthOK {
					if err := x.CheckMetadata(cmd.Context()); err != nil {
						h.State, errText = fencing.HealthUnhealthy, err.Error()
					}
				}
				if h.State != fencing.HealthOK {
					bad++
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%v\t%s\n", h.Device, cfg.Devices[h.Device].Type, h.State, h.Latency.Round(time.Millisecond), errText)
			}
			w.Flush()
			if bad > 0 {
				return fmt.Errorf("fence status: %d of %d devices unhealthy", bad, len(hs))
			}
			return nil
		},
	}
	c.Flags().StringVar(&config, "config", "", "fencing topology (JSON)")
	_ = c.MarkFlagRequired("config")
	return c
}

func closeDevices(devs map[string]fencing.Device) {
	if err := fencing.CloseDevices(devs); err != nil {
		slog.Warn("fence: closing devices", "err", err)
	}
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}
