package main

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/webui"
)

// apiRun wraps a RunE that needs an API client.
func apiRun(fn func(cmd *cobra.Command, c *apiClient, args []string) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		c, err := newAPIClient(cmd)
		if err != nil {
			return err
		}
		return fn(cmd, c, args)
	}
}

// --- nodes ---

func newNodeCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "node", Short: "list nodes and set them online, standby or maintenance (REST API)"}
	list := listCommand("list the cluster's nodes", "/api/v1/nodes", "NODE\tROLE\tSTATE\tRAFT\tAPI\tPORTAL\tFENCE",
		func(w io.Writer, n cluster.NodeInfo) {
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", n.ID, n.Role, n.State, orDash(n.RaftAddr), orDash(n.APIAddr),
				orDash(n.PortalAddr), orDash(topologyText(n)))
		})

	show := &cobra.Command{Use: "show NODE", Short: "show one node", Args: cobra.ExactArgs(1)}
	showJSON := outputFlags(show)
	show.RunE = apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
		var n cluster.NodeInfo
		if err := c.call(cmd.Context(), http.MethodGet, "/api/v1/nodes/"+seg(args[0]), nil, &n); err != nil {
			return err
		}
		if *showJSON {
			return printJSON(cmd.OutOrStdout(), n)
		}
		tw := newTable(cmd.OutOrStdout())
		fmt.Fprintf(tw, "id:\t%s\nrole:\t%s\nstate:\t%s\nraft:\t%s\napi:\t%s\ndata:\t%s\nportal:\t%s\njoined:\t%s\nfence:\t%s\n",
			n.ID, n.Role, n.State, orDash(n.RaftAddr), orDash(n.APIAddr), orDash(n.DataAddr), orDash(n.PortalAddr),
			n.JoinedAt.Format(time.RFC3339), orDash(topologyText(n)))
		return tw.Flush()
	})

	remove := &cobra.Command{
		Use:   "remove NODE",
		Short: "remove an empty node (no group, no replica) from the cluster state and the Raft voters",
		Long: "remove takes NODE out of the cluster. The cluster refuses while NODE owns a group, holds a replica " +
			"or is a move's target. Stop `hasan serve` on NODE first. Removing a voter changes the majority: " +
			"with two storage nodes and a witness, removing the witness leaves two voters that must both be up.",
		Args: cobra.ExactArgs(1),
		RunE: apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
			if err := c.call(cmd.Context(), http.MethodDelete, "/api/v1/nodes/"+seg(args[0]), nil, nil); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "node %s removed from the cluster state and the Raft configuration\n", args[0])
			return nil
		}),
	}

	cmd.AddCommand(list, show, remove, newNodeReplaceCmd(),
		nodeStateCmd("online", "make NODE eligible for groups again (also clears fenced after a repair)"),
		nodeStateCmd("standby", "move NODE's groups away (planned, no fence) and place nothing on it"),
		nodeStateCmd("maintenance", "like standby, and the controller also ignores NODE's heartbeats"))
	return cmd
}

func nodeStateCmd(state, short string) *cobra.Command {
	return &cobra.Command{
		Use:   state + " NODE",
		Short: short,
		Args:  cobra.ExactArgs(1),
		RunE: apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
			body := map[string]string{"state": state}
			if err := c.call(cmd.Context(), http.MethodPut, "/api/v1/nodes/"+seg(args[0])+"/state", body, nil); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "node %s: %s\n", args[0], state)
			return nil
		}),
	}
}

// topologyText renders a node's fence levels: "bmc-a | pdu-1+pdu-2 (reboot)".
func topologyText(n cluster.NodeInfo) string {
	if len(n.Fence.Levels) == 0 {
		return ""
	}
	lv := make([]string, len(n.Fence.Levels))
	for i, l := range n.Fence.Levels {
		lv[i] = strings.Join(l, "+")
	}
	s := strings.Join(lv, " | ")
	if n.Fence.Action != "" {
		s += " (" + string(n.Fence.Action) + ")"
	}
	return s
}

// --- cluster maintenance ---

func newClusterMaintenanceCmd() *cobra.Command {
	return &cobra.Command{
		Use:       "maintenance on|off",
		Short:     "pause (on) or resume (off) the failover controller cluster-wide (REST API)",
		Long:      "While maintenance is on the controller takes no action: no failover, no placement, no move. Replication and serving go on.",
		Args:      cobra.ExactArgs(1),
		ValidArgs: []string{"on", "off"},
		RunE: apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
			var on bool
			switch args[0] {
			case "on":
				on = true
			case "off":
			default:
				return fmt.Errorf("cluster maintenance %q: say on or off", args[0])
			}
			if err := c.call(cmd.Context(), http.MethodPut, "/api/v1/cluster/maintenance", map[string]bool{"on": on}, nil); err != nil {
				return err
			}
			if on {
				fmt.Fprintln(cmd.OutOrStdout(), "cluster maintenance on: the controller takes no action (no failover) until `hasan cluster maintenance off`")
			} else {
				fmt.Fprintln(cmd.OutOrStdout(), "cluster maintenance off: the controller acts again")
			}
			return nil
		}),
	}
}

// --- volumes ---

func newVolumeCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "volume", Short: "create, list and delete replicated volumes (REST API)"}

	var (
		spec       webui.VolumeSpec
		size       string
		replicas   []string
		blockSize  uint32
		createJSON *bool
	)
	create := &cobra.Command{
		Use:     "create",
		Short:   "create a volume replicated on the given nodes (the first is the primary)",
		Example: "  hasan volume create --name db --size 10G --replicas n1,n2",
		Args:    cobra.NoArgs,
		RunE: apiRun(func(cmd *cobra.Command, c *apiClient, _ []string) error {
			if strings.TrimSpace(spec.Name) == "" {
				return fmt.Errorf("--name: give the volume a name, e.g. --name db")
			}
			n, err := parseSizeFlag("--size", size)
			if err != nil {
				return err
			}
			spec.Size = n
			spec.BlockSize = blockSize
			if bs := int64(max(blockSize, 512)); n%bs != 0 {
				return fmt.Errorf("--size %s: %d bytes is not a multiple of the %d-byte block", size, n, bs)
			}
			spec.Replicas = splitList(replicas)
			if len(spec.Replicas) == 0 {
				return errors.New("--replicas: name the storage nodes holding a copy, e.g. --replicas n1,n2")
			}
			if spec.Primary != "" && !slices.Contains(spec.Replicas, spec.Primary) {
				return fmt.Errorf("--primary %s: the primary must be one of --replicas %s", spec.Primary, strings.Join(spec.Replicas, ","))
			}
			var v cluster.Volume
			if err := c.call(cmd.Context(), http.MethodPost, "/api/v1/volumes", spec, &v); err != nil {
				return err
			}
			if *createJSON {
				return printJSON(cmd.OutOrStdout(), v)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "volume %s created: uuid %s, %s, primary %s, replicas %s\n",
				v.Name, v.UUID, humanSize(v.Size), v.Primary, strings.Join(v.Replicas, ","))
			return nil
		}),
	}
	f := create.Flags()
	f.StringVar(&spec.Name, "name", "", "volume name (required)")
	f.StringVar(&size, "size", "", "size with K, M, G or T (binary), e.g. 10G (required)")
	f.StringSliceVar(&replicas, "replicas", nil, "storage nodes holding a copy, comma-separated; the first is the primary unless --primary")
	f.BoolVar(&spec.Thin, "thin", false, "thin provisioning (space allocated on write)")
	f.Uint32Var(&blockSize, "block-size", 512, "logical block size: 512 or 4096")
	f.StringVar(&spec.Primary, "primary", "", "initial primary (default: the first replica)")
	f.StringVar(&spec.UUID, "uuid", "", "volume UUID (default: generated); it becomes the disk's SCSI identity")
	createJSON = outputFlags(create)

	list := listCommand("list volumes", "/api/v1/volumes", "NAME\tUUID\tSIZE\tPRIMARY\tEPOCH\tREPLICAS\tISR",
		func(w io.Writer, v cluster.Volume) {
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%d\t%s\t%s\n", v.Name, v.UUID, humanSize(v.Size), orDash(v.Primary), v.Epoch,
				strings.Join(v.Replicas, ","), strings.Join(v.ISR, ","))
		})

	show := &cobra.Command{Use: "show VOLUME", Short: "show a volume (by UUID or name)", Args: cobra.ExactArgs(1)}
	showJSON := outputFlags(show)
	show.RunE = apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
		v, err := resolveVolume(cmd, c, args[0])
		if err != nil {
			return err
		}
		if *showJSON {
			return printJSON(cmd.OutOrStdout(), v)
		}
		tw := newTable(cmd.OutOrStdout())
		thin := "no"
		if v.Thin {
			thin = "yes"
		}
		fmt.Fprintf(tw, "name:\t%s\nuuid:\t%s\nsize:\t%s (%d bytes)\nblock size:\t%d\nthin:\t%s\nprimary:\t%s\nepoch:\t%d\nreplicas:\t%s\nisr:\t%s\n",
			v.Name, v.UUID, humanSize(v.Size), v.Size, v.BlockSize, thin, orDash(v.Primary), v.Epoch,
			strings.Join(v.Replicas, ","), strings.Join(v.ISR, ","))
		return tw.Flush()
	})

	del := &cobra.Command{
		Use:   "delete VOLUME",
		Short: "delete a volume no target exports (by UUID or name)",
		Args:  cobra.ExactArgs(1),
		RunE: apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
			v, err := resolveVolume(cmd, c, args[0])
			if err != nil {
				return err
			}
			if err := c.call(cmd.Context(), http.MethodDelete, "/api/v1/volumes/"+seg(v.UUID), nil, nil); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "volume %s (%s) deleted\n", v.Name, v.UUID)
			return nil
		}),
	}
	cmd.AddCommand(create, list, show, del, newVolumeReplicasCmd())
	return cmd
}

// resolveVolume finds a volume by UUID, else by name (which must be
// unambiguous).
func resolveVolume(cmd *cobra.Command, c *apiClient, ref string) (cluster.Volume, error) {
	var v cluster.Volume
	err := c.call(cmd.Context(), http.MethodGet, "/api/v1/volumes/"+seg(ref), nil, &v)
	if err == nil || !notFound(err) {
		return v, err
	}
	var vs []cluster.Volume
	if err := c.call(cmd.Context(), http.MethodGet, "/api/v1/volumes", nil, &vs); err != nil {
		return v, err
	}
	var hits []cluster.Volume
	for _, x := range vs {
		if x.Name == ref {
			hits = append(hits, x)
		}
	}
	switch len(hits) {
	case 0:
		return v, fmt.Errorf("volume %q: no volume has this UUID or name (see `hasan volume list`)", ref)
	case 1:
		return hits[0], nil
	default:
		ids := make([]string, len(hits))
		for i, h := range hits {
			ids[i] = h.UUID
		}
		return v, fmt.Errorf("volume %q: the name matches %d volumes (%s): give the UUID", ref, len(hits), strings.Join(ids, ", "))
	}
}

// parseSizeFlag reads 10G-style sizes with an error that says how to fix
// them.
func parseSizeFlag(flag, v string) (int64, error) {
	if strings.TrimSpace(v) == "" {
		return 0, fmt.Errorf("%s: required, e.g. %s 10G", flag, flag)
	}
	n, err := parseSize(strings.TrimSuffix(strings.TrimSuffix(strings.TrimSpace(v), "B"), "i"))
	if err != nil {
		return 0, fmt.Errorf("%s %s: use a number with K, M, G or T, e.g. %s 10G", flag, v, flag)
	}
	return n, nil
}

func humanSize(n int64) string {
	const units = "KMGTPE"
	if n < 1024 {
		return strconv.FormatInt(n, 10) + "B"
	}
	f, i := float64(n)/1024, 0
	for f >= 1024 && i < len(units)-1 {
		f /= 1024
		i++
	}
	s := strconv.FormatFloat(f, 'f', 1, 64)
	return strings.TrimSuffix(s, ".0") + string(units[i])
}

// --- groups ---

func newGroupCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "group", Short: "create and inspect target groups (floating IPs plus targets) (REST API)"}

	var (
		vips, targets, prefer []string
		failback              bool
	)
	create := &cobra.Command{
		Use:   "create NAME",
		Short: "create a group: its VIPs and targets fail over together",
		Example: "  hasan group create g1 --vip 192.0.2.10/24 --target iqn.2026-11.io.hasan:db --prefer n1,n2\n\n" +
			"The interface is each storage node's vip_link in hasan.yaml, so --vip takes a CIDR only.",
		Args: cobra.ExactArgs(1),
		RunE: apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
			req := map[string]any{"name": args[0]}
			var vs []string
			for _, v := range splitList(vips) {
				p, err := parseVIPFlag(v)
				if err != nil {
					return err
				}
				vs = append(vs, p)
			}
			if len(vs) == 0 {
				return fmt.Errorf("--vip: give at least one floating address, e.g. --vip 192.0.2.10/24")
			}
			req["vips"] = vs
			req["targets"] = nonNil(splitList(targets))
			if p := splitList(prefer); len(p) > 0 {
				req["preferred"] = p
			}
			req["failback"] = failback
			var g cluster.Group
			if err := c.call(cmd.Context(), http.MethodPost, "/api/v1/groups", req, &g); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "group %s created: vips %s, targets %s; the controller places it on an eligible node\n",
				g.Name, strings.Join(g.VIPs, ","), orDash(strings.Join(g.Targets, ",")))
			return nil
		}),
	}
	create.Flags().StringArrayVar(&vips, "vip", nil, "floating address as CIDR, e.g. 192.0.2.10/24 (repeatable)")
	create.Flags().StringArrayVar(&targets, "target", nil, "IQN of a target that moves with the group (repeatable)")
	create.Flags().StringSliceVar(&prefer, "prefer", nil, "preferred owners in order, comma-separated")
	create.Flags().BoolVar(&failback, "failback", false, "move back to a more preferred node when it returns (default: stay)")

	list := listCommand("list groups and their owners", "/api/v1/groups", "GROUP\tOWNER\tEPOCH\tMOVING TO\tVIPS\tTARGETS\tPREFERRED",
		func(w io.Writer, g cluster.Group) {
			fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%s\t%s\t%s\n", g.Name, orDash(g.Owner), g.Epoch, orDash(g.MovingTo),
				strings.Join(g.VIPs, ","), orDash(strings.Join(g.Targets, ",")), orDash(strings.Join(g.Preferred, ",")))
		})

	show := &cobra.Command{Use: "show NAME", Short: "show one group", Args: cobra.ExactArgs(1)}
	showJSON := outputFlags(show)
	show.RunE = apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
		var g cluster.Group
		if err := c.call(cmd.Context(), http.MethodGet, "/api/v1/groups/"+seg(args[0]), nil, &g); err != nil {
			return err
		}
		if *showJSON {
			return printJSON(cmd.OutOrStdout(), g)
		}
		tw := newTable(cmd.OutOrStdout())
		fmt.Fprintf(tw, "name:\t%s\nowner:\t%s\nepoch:\t%d\nmoving to:\t%s\nvips:\t%s\ntargets:\t%s\npreferred:\t%s\nfailback:\t%v\n",
			g.Name, orDash(g.Owner), g.Epoch, orDash(g.MovingTo), strings.Join(g.VIPs, ","), orDash(strings.Join(g.Targets, ",")),
			orDash(strings.Join(g.Preferred, ",")), g.Failback)
		return tw.Flush()
	})

	cmd.AddCommand(create, list, show, newMoveCmd("move", "move a group"))
	return cmd
}

// newMoveCmd is `hasan target move GROUP --to NODE` and its alias
// `hasan group move`.
func newMoveCmd(use, short string) *cobra.Command {
	var to string
	c := &cobra.Command{
		Use:   use + " GROUP --to NODE",
		Short: short + " to NODE: planned, no fence; the owner drains and releases, then NODE acquires",
		Args:  cobra.ExactArgs(1),
		RunE: apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
			if strings.TrimSpace(to) == "" {
				return fmt.Errorf("--to: name the node to move group %s to", args[0])
			}
			if err := c.call(cmd.Context(), http.MethodPost, "/api/v1/groups/"+seg(args[0])+"/move", map[string]string{"to": to}, nil); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "group %s: move to %s started; `hasan group show %s` shows the new owner when it is done\n", args[0], to, args[0])
			return nil
		}),
	}
	c.Flags().StringVar(&to, "to", "", "node to move the group to (required)")
	return c
}

// parseVIPFlag accepts a CIDR. CIDR@LINK is refused with the reason: the
// cluster keeps no per-address interface, each node adds VIPs on its
// configured vip_link.
func parseVIPFlag(v string) (string, error) {
	addr, link, hasLink := strings.Cut(v, "@")
	if hasLink {
		return "", fmt.Errorf("--vip %s: per-address interfaces are not supported; each node adds VIPs on its vip_link "+
			"(hasan.yaml), so give --vip %s and set vip_link: %s on the storage nodes", v, addr, link)
	}
	if !strings.Contains(addr, "/") {
		return "", fmt.Errorf("--vip %s: give the prefix length too, e.g. --vip %s/24", v, addr)
	}
	return addr, nil
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// --- events ---

func newEventsCmd() *cobra.Command {
	var limit int
	c := &cobra.Command{Use: "events", Short: "show the cluster event log, newest first (REST API)", Args: cobra.NoArgs}
	asJSON := outputFlags(c)
	c.Flags().IntVar(&limit, "limit", 50, "at most this many events (0: all kept, up to 512)")
	c.RunE = apiRun(func(cmd *cobra.Command, cl *apiClient, _ []string) error {
		if limit < 0 {
			return fmt.Errorf("--limit %d: use 0 (all) or a positive number", limit)
		}
		var evs []cluster.Event
		if err := cl.call(cmd.Context(), http.MethodGet, "/api/v1/events?limit="+strconv.Itoa(limit), nil, &evs); err != nil {
			return err
		}
		if *asJSON {
			return printJSON(cmd.OutOrStdout(), evs)
		}
		tw := newTable(cmd.OutOrStdout())
		fmt.Fprintln(tw, "SEQ\tTIME\tSEVERITY\tKIND\tNODE\tGROUP\tMESSAGE")
		for _, e := range evs {
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\n", e.Seq, e.Time.Format(time.RFC3339), e.Severity, e.Kind,
				orDash(e.Node), orDash(e.Group), e.Message)
		}
		return tw.Flush()
	})
	return c
}
