package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/fencing"
)

// fenceTypes are the device types fencing/ implements.
var fenceTypes = []string{"ipmi", "apc-snmp", "redfish", "external", "manual"}

// deviceOut is a fence device as the API shows it. Config stays generic:
// its secrets arrive as "[redacted]", which fencing.Secret refuses to
// decode on purpose.
type deviceOut struct {
	Name   string         `json:"name"`
	Type   string         `json:"type"`
	Config map[string]any `json:"config"`
	UsedBy []string       `json:"used_by"`
}

// address summarises where the device is: host[:port], the program or the
// node a manual device is for.
func (d deviceOut) address() string {
	sec, _ := d.Config[strings.ReplaceAll(d.Type, "-", "_")].(map[string]any)
	switch {
	case sec == nil:
		return ""
	case sec["host"] != nil:
		h := fmt.Sprint(sec["host"])
		if p, ok := sec["port"].(float64); ok && p > 0 {
			h += ":" + strconv.Itoa(int(p))
		}
		return h
	case sec["program"] != nil:
		return fmt.Sprint(sec["program"])
	case sec["node"] != nil:
		return "by hand, node " + fmt.Sprint(sec["node"])
	}
	return ""
}

func newFenceDeviceCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "device", Short: "the cluster's fence devices (REST API; secrets are write-only)"}

	var typ, config string
	add := &cobra.Command{
		Use:   "add NAME --type ipmi|apc-snmp|redfish|external|manual --config FILE.json",
		Short: "create or replace a fence device from a JSON file ('-' reads stdin)",
		Long: "FILE holds one device object as in docs/fencing.md, e.g.\n" +
			`  {"timeout": "20s", "ipmi": {"host": "10.0.0.11", "user": "fence", "password": "..."}}` + "\n" +
			"or a whole fencing config as `hasan fence test --config` reads it, from which devices.NAME is taken.\n" +
			"The secrets go to the cluster and are never shown again; keep the file mode 600.",
		Args: cobra.ExactArgs(1),
		RunE: apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
			name := args[0]
			if typ != "" && !slices.Contains(fenceTypes, typ) {
				return fmt.Errorf("--type %s: use one of %s", typ, strings.Join(fenceTypes, ", "))
			}
			if config == "" {
				return errors.New("--config: give the device's JSON file ('-' reads stdin)")
			}
			body, err := readDeviceConfig(cmd, config, name, typ)
			if err != nil {
				return err
			}
			var d deviceOut
			if err := c.call(cmd.Context(), http.MethodPut, "/api/v1/fence-devices/"+seg(name), body, &d); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "fence device %s (%s %s) stored; use it with `hasan fence topology set NODE --level %s`\n",
				d.Name, d.Type, orDash(d.address()), d.Name)
			return nil
		}),
	}
	add.Flags().StringVar(&typ, "type", "", "device type: "+strings.Join(fenceTypes, ", ")+" (required unless the file has \"type\")")
	add.Flags().StringVar(&config, "config", "", "JSON file with the device's settings and secrets ('-': stdin)")

	list := listCommand("list fence devices and the nodes using them", "/api/v1/fence-devices", "DEVICE\tTYPE\tADDRESS\tUSED BY",
		func(w io.Writer, d deviceOut) {
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", d.Name, d.Type, orDash(d.address()), orDash(strings.Join(d.UsedBy, ",")))
		})

	show := &cobra.Command{Use: "show NAME", Short: "show a fence device (secrets as [redacted])", Args: cobra.ExactArgs(1)}
	showJSON := outputFlags(show)
	show.RunE = apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
		var d deviceOut
		if err := c.call(cmd.Context(), http.MethodGet, "/api/v1/fence-devices/"+seg(args[0]), nil, &d); err != nil {
			return err
		}
		if *showJSON {
			return printJSON(cmd.OutOrStdout(), d)
		}
		w := cmd.OutOrStdout()
		fmt.Fprintf(w, "name:    %s\ntype:    %s\naddress: %s\nused by: %s\nconfig:\n", d.Name, d.Type, orDash(d.address()), orDash(strings.Join(d.UsedBy, ",")))
		b, err := json.MarshalIndent(d.Config, "  ", "  ")
		if err != nil {
			return err
		}
		fmt.Fprintf(w, "  %s\n", b)
		return nil
	})

	rm := &cobra.Command{
		Use:   "rm NAME",
		Short: "delete a fence device no node's topology uses",
		Args:  cobra.ExactArgs(1),
		RunE: apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
			err := c.call(cmd.Context(), http.MethodDelete, "/api/v1/fence-devices/"+seg(args[0]), nil, nil)
			var ae *apiError
			if errors.As(err, &ae) && ae.Status == http.StatusConflict {
				return fmt.Errorf("%w\nchange that node's topology first (`hasan fence topology set NODE --level ...`)", err)
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "fence device %s deleted\n", args[0])
			return nil
		}),
	}
	cmd.AddCommand(add, list, show, rm)
	return cmd
}

// readDeviceConfig reads FILE and returns the device JSON to PUT, with
// "type" set from --type. The content is never quoted in an error: it
// holds secrets.
func readDeviceConfig(cmd *cobra.Command, path, name, typ string) ([]byte, error) {
	var (
		b   []byte
		err error
	)
	if path == "-" {
		b, err = io.ReadAll(io.LimitReader(cmd.InOrStdin(), 1<<20))
	} else {
		if fi, serr := os.Stat(path); serr == nil && fi.Mode().Perm()&0o077 != 0 {
			fmt.Fprintf(cmd.ErrOrStderr(), "warning: --config %s is readable by other users (mode %v) and holds fence credentials; chmod 600 it\n", path, fi.Mode().Perm())
		}
		b, err = os.ReadFile(path)
	}
	if err != nil {
		return nil, fmt.Errorf("--config %s: %w", path, err)
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(b, &obj); err != nil {
		return nil, fmt.Errorf("--config %s: not a JSON object: %s", path, jsonErrText(err))
	}
	if raw, ok := obj["devices"]; ok {
		var devs map[string]json.RawMessage
		if err := json.Unmarshal(raw, &devs); err != nil {
			return nil, fmt.Errorf("--config %s: devices: %s", path, jsonErrText(err))
		}
		dev, ok := devs[name]
		if !ok {
			return nil, fmt.Errorf("--config %s: it is a fencing config without device %q (it has: %s)", path, name,
				strings.Join(slices.Sorted(maps.Keys(devs)), ", "))
		}
		obj = nil
		if err := json.Unmarshal(dev, &obj); err != nil {
			return nil, fmt.Errorf("--config %s: devices.%s: %s", path, name, jsonErrText(err))
		}
	}
	if obj == nil {
		return nil, fmt.Errorf("--config %s: want a JSON object with the device's settings", path)
	}
	if raw, ok := obj["type"]; ok {
		var fileType string
		if err := json.Unmarshal(raw, &fileType); err != nil {
			return nil, fmt.Errorf("--config %s: type: want a string", path)
		}
		if typ != "" && fileType != typ {
			return nil, fmt.Errorf("--type %s disagrees with \"type\": %q in %s", typ, fileType, path)
		}
		typ = fileType
	}
	if typ == "" {
		return nil, fmt.Errorf("--type: say which kind of device %s is: %s", name, strings.Join(fenceTypes, ", "))
	}
	tb, _ := json.Marshal(typ)
	obj["type"] = tb
	return json.Marshal(obj)
}

// jsonErrText describes a decoding error by position only.
func jsonErrText(err error) string {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Sprintf("invalid JSON at byte %d", se.Offset)
	}
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		return fmt.Sprintf("%s: want %s, got %s", orDefault(te.Field, "value"), te.Type, te.Value)
	}
	return "invalid JSON"
}

func newFenceTopologyCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "topology", Short: "which devices fence each node, in which order (REST API)"}
	var (
		levels []string
		action string
	)
	set := &cobra.Command{
		Use:   "set NODE --level DEV[,DEV...] [--level ...] [--action off|reboot]",
		Short: "replace NODE's fence levels: tried in order, every device of a level must confirm off",
		Example: "  hasan fence topology set n1 --level bmc-n1 --level pdu-a1,pdu-b1\n" +
			"  (first the BMC; if it fails, both PDU outlets of the node's two power supplies)",
		Args: cobra.ExactArgs(1),
		RunE: apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
			if action != "" && action != string(fencing.ActionOff) && action != string(fencing.ActionReboot) {
				return fmt.Errorf("--action %s: use off or reboot", action)
			}
			if len(levels) == 0 {
				return errors.New("--level: give at least one level, e.g. --level bmc-" + args[0])
			}
			topo := fencing.NodeTopology{Action: fencing.Action(action)}
			for i, l := range levels {
				devs := splitList([]string{l})
				if len(devs) == 0 {
					return fmt.Errorf("--level %d is empty: name one or more devices, comma-separated", i+1)
				}
				topo.Levels = append(topo.Levels, devs)
			}
			if err := c.call(cmd.Context(), http.MethodPut, "/api/v1/nodes/"+seg(args[0])+"/fence", topo, nil); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "node %s fenced by: %s\n", args[0], topologyText(cluster.NodeInfo{Fence: topo}))
			return nil
		}),
	}
	set.Flags().StringArrayVar(&levels, "level", nil, "devices of one level, comma-separated (repeat for the next level)")
	set.Flags().StringVar(&action, "action", "", "off (default) or reboot")

	list := &cobra.Command{Use: "list", Short: "show every node's fence levels", Args: cobra.NoArgs}
	listJSON := outputFlags(list)
	list.RunE = apiRun(func(cmd *cobra.Command, c *apiClient, _ []string) error {
		var ns []cluster.NodeInfo
		if err := c.call(cmd.Context(), http.MethodGet, "/api/v1/nodes", nil, &ns); err != nil {
			return err
		}
		if *listJSON {
			out := map[string]fencing.NodeTopology{}
			for _, n := range ns {
				out[n.ID] = n.Fence
			}
			return printJSON(cmd.OutOrStdout(), out)
		}
		tw := newTable(cmd.OutOrStdout())
		fmt.Fprintln(tw, "NODE\tROLE\tACTION\tLEVELS")
		for _, n := range ns {
			lv := "NONE: this node cannot be fenced, so it cannot fail over"
			if n.Role == cluster.RoleWitness {
				lv = "- (witness: holds no data)"
			}
			if len(n.Fence.Levels) > 0 {
				parts := make([]string, len(n.Fence.Levels))
				for i, l := range n.Fence.Levels {
					parts[i] = fmt.Sprintf("%d: %s", i+1, strings.Join(l, "+"))
				}
				lv = strings.Join(parts, "  ")
			}
			action := orDefault(string(n.Fence.Action), "off")
			if len(n.Fence.Levels) == 0 {
				action = "-"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", n.ID, n.Role, action, lv)
		}
		return tw.Flush()
	})
	cmd.AddCommand(set, list)
	return cmd
}

func newFenceHistoryCmd() *cobra.Command {
	var (
		node  string
		limit int
	)
	c := &cobra.Command{Use: "history", Short: "every fence action the cluster took, newest first (REST API)", Args: cobra.NoArgs}
	asJSON := outputFlags(c)
	c.Flags().StringVar(&node, "node", "", "only this node")
	c.Flags().IntVar(&limit, "limit", 50, "at most this many records (0: all kept, up to 1024)")
	c.RunE = apiRun(func(cmd *cobra.Command, cl *apiClient, _ []string) error {
		if limit < 0 {
			return fmt.Errorf("--limit %d: use 0 (all) or a positive number", limit)
		}
		q := url.Values{"limit": {strconv.Itoa(limit)}}
		if node != "" {
			q.Set("node", node)
		}
		var rs []fencing.Record
		if err := cl.call(cmd.Context(), http.MethodGet, "/api/v1/fence-history?"+q.Encode(), nil, &rs); err != nil {
			return err
		}
		if *asJSON {
			return printJSON(cmd.OutOrStdout(), rs)
		}
		tw := newTable(cmd.OutOrStdout())
		fmt.Fprintln(tw, "TIME\tNODE\tLEVEL\tDEVICE\tACTION\tOUTCOME\tDURATION\tDETAIL")
		for _, r := range rs {
			detail := r.Error
			if r.ConfirmedBy != "" {
				detail = strings.TrimSpace(fmt.Sprintf("confirmed by %s at %s %s", r.ConfirmedBy, r.ConfirmedAt.Format(time.RFC3339), detail))
			}
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%v\t%s\n", r.Time.Format(time.RFC3339), r.Node, r.Level, r.Device, r.Action,
				r.Outcome, r.Duration.Round(time.Millisecond), orDash(detail))
		}
		return tw.Flush()
	})
	return c
}

// confirmAckFlag is the scripted form of typing the node's name: long on
// purpose, so nobody passes it without reading what it says.
const confirmAckFlag = "yes-i-verified-it-is-off"

// newFenceConfirmCmd is the operator's side of a manual fence device. The
// confirmation lets a takeover proceed, so the stakes are printed and the
// node's name must be typed back unless --yes-i-verified-it-is-off.
func newFenceConfirmCmd() *cobra.Command {
	var (
		by  string
		ack bool
	)
	c := &cobra.Command{
		Use:   "confirm NODE --by NAME",
		Short: "state that NODE is powered off, so a takeover waiting on its manual fence device proceeds (REST API)",
		Long: fencing.ManualWarning + "\n\nA manual fence device of NODE reads off once this confirmation is committed, " +
			"provided it is newer than NODE's last heartbeat; the controller's waiting takeover then moves NODE's groups " +
			"to another node, which writes NODE's volumes from then on. The confirmation is recorded with your name and " +
			"the time (hasan events, and hasan fence history once the fence completes). The cluster refuses it while " +
			"NODE still sends heartbeats.\n\nScripts pass --" + confirmAckFlag + " instead of typing the node name.",
		Args: cobra.ExactArgs(1),
		RunE: apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
			node := args[0]
			if strings.TrimSpace(by) == "" {
				return errors.New("--by: give your name; it is recorded with the confirmation")
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "%s\n", fencing.ManualWarning)
			var groups []cluster.Group
			if err := c.call(cmd.Context(), http.MethodGet, "/api/v1/groups", nil, &groups); err == nil {
				var owned []string
				for _, g := range groups {
					if g.Owner == node {
						owned = append(owned, g.Name)
					}
				}
				if len(owned) > 0 {
					fmt.Fprintf(out, "At stake: %s owns group(s) %s; confirming lets another node take them over and write their volumes.\n",
						node, strings.Join(owned, ", "))
				}
			}
			if !ack {
				fmt.Fprintf(out, "Type the node name (%s) to confirm it is powered off: ", node)
				line, _ := bufio.NewReader(cmd.InOrStdin()).ReadString('\n')
				if strings.TrimSpace(line) != node {
					return errors.New("fence confirm: not confirmed; nothing was recorded")
				}
			}
			body := map[string]any{"operator": by, "verified_off": true}
			if err := c.call(cmd.Context(), http.MethodPost, "/api/v1/nodes/"+seg(node)+"/fence-confirm", body, nil); err != nil {
				return err
			}
			fmt.Fprintf(out, "recorded: %s confirmed that %s is powered off; a takeover waiting on its manual fence proceeds "+
				"(see `hasan events` and `hasan fence history --node %s`)\n", by, node, node)
			return nil
		}),
	}
	c.Flags().StringVar(&by, "by", "", "your name, recorded with the confirmation (required)")
	c.Flags().BoolVar(&ack, confirmAckFlag, false, "do not ask to type the node name: you checked NODE is powered off (for scripts)")
	return c
}
