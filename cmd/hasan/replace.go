package main

import (
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/spf13/cobra"

	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/webui"
)

// newNodeReplaceCmd is `hasan node replace OLD --with NEW [--remove]`.
func newNodeReplaceCmd() *cobra.Command {
	var (
		req    webui.ReplaceNodeRequest
		asJSON *bool
	)
	cmd := &cobra.Command{
		Use:   "replace OLD --with NEW [--remove]",
		Short: "replace node OLD by NEW on every volume holding a replica on OLD (a node lost for good)",
		Long: "replace gives every replica OLD holds to NEW: OLD leaves each volume's replica set and ISR, NEW " +
			"joins the replica set, the primary syncs it fully and adds it to the ISR once it has caught up " +
			"(watch the ISR with `hasan volume list`). NEW must be a storage node that has joined the cluster " +
			"and is online or standby. Nothing changes while OLD is the primary of any volume: the error names " +
			"the groups to move first (`hasan group move GROUP --to NODE`; for a dead OLD the controller's " +
			"takeover does it). With --remove, OLD is then removed from the cluster (as `hasan node remove`; " +
			"the API answering must be the leader's).",
		Example: "  hasan node replace n2 --with n4 --remove",
		Args:    cobra.ExactArgs(1),
		RunE: apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
			if strings.TrimSpace(req.With) == "" {
				return errors.New("--with: name the storage node taking over the replicas, e.g. --with n4")
			}
			if req.With == args[0] {
				return fmt.Errorf("--with %s: a node cannot replace itself", req.With)
			}
			var res webui.ReplaceNodeResult
			if err := c.call(cmd.Context(), http.MethodPost, "/api/v1/nodes/"+seg(args[0])+"/replace", req, &res); err != nil {
				return err
			}
			if *asJSON {
				return printJSON(cmd.OutOrStdout(), res)
			}
			w := cmd.OutOrStdout()
			if len(res.Volumes) == 0 {
				fmt.Fprintf(w, "node %s holds no replica: nothing to replace\n", args[0])
			}
			for _, v := range res.Volumes {
				fmt.Fprintf(w, "volume %s (%s): replica %s replaced by %s, syncing; replicas %s, isr %s\n",
					v.Name, v.UUID, args[0], req.With, strings.Join(v.Replicas, ","), strings.Join(v.ISR, ","))
			}
			if res.Removed {
				fmt.Fprintf(w, "node %s removed from the cluster state and the Raft configuration\n", args[0])
			}
			return nil
		}),
	}
	cmd.Flags().StringVar(&req.With, "with", "", "storage node taking OLD's replicas (required)")
	cmd.Flags().BoolVar(&req.Remove, "remove", false, "remove OLD from the cluster once its replicas are replaced")
	asJSON = outputFlags(cmd)
	return cmd
}

// newVolumeReplicasCmd is `hasan volume replicas VOLUME --replace OLD
// --with NEW`, `--add NODE` or `--remove NODE`.
func newVolumeReplicasCmd() *cobra.Command {
	var (
		replace, with, add, remove string
		asJSON                     *bool
	)
	cmd := &cobra.Command{
		Use:   "replicas VOLUME (--replace OLD --with NEW | --add NODE | --remove NODE)",
		Short: "change a volume's replica set: replace a node, add a replica or remove one",
		Long: "replicas changes which nodes hold VOLUME (by UUID or name). A removed node leaves the replica " +
			"set and the ISR at once; an added one is synced fully by the primary and joins the ISR once it has " +
			"caught up. The primary cannot be removed or replaced: move its group first.",
		Example: "  hasan volume replicas db --replace n2 --with n4\n  hasan volume replicas db --add n3",
		Args:    cobra.ExactArgs(1),
		RunE: apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
			var req webui.ReplicasRequest
			switch {
			case replace != "" || with != "":
				if replace == "" || with == "" {
					return errors.New("--replace OLD and --with NEW go together, e.g. --replace n2 --with n4")
				}
				if add != "" || remove != "" {
					return errors.New("--replace/--with already add and remove one node: drop --add and --remove")
				}
				req = webui.ReplicasRequest{Remove: replace, Add: with}
			case add != "" || remove != "":
				req = webui.ReplicasRequest{Remove: remove, Add: add}
			default:
				return errors.New("say what to change: --replace OLD --with NEW, --add NODE or --remove NODE")
			}
			v, err := resolveVolume(cmd, c, args[0])
			if err != nil {
				return err
			}
			var nv cluster.Volume
			if err := c.call(cmd.Context(), http.MethodPost, "/api/v1/volumes/"+seg(v.UUID)+"/replicas", req, &nv); err != nil {
				return err
			}
			if *asJSON {
				return printJSON(cmd.OutOrStdout(), nv)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "volume %s (%s): replicas %s, isr %s\n", nv.Name, nv.UUID,
				strings.Join(nv.Replicas, ","), strings.Join(nv.ISR, ","))
			if req.Add != "" {
				fmt.Fprintf(cmd.OutOrStdout(), "%s is syncing and joins the ISR once caught up (hasan volume show %s)\n", req.Add, nv.UUID)
			}
			return nil
		}),
	}
	f := cmd.Flags()
	f.StringVar(&replace, "replace", "", "node whose replica is replaced (with --with)")
	f.StringVar(&with, "with", "", "node taking the replaced replica (with --replace)")
	f.StringVar(&add, "add", "", "node to add a replica on")
	f.StringVar(&remove, "remove", "", "node whose replica is removed (not the primary)")
	asJSON = outputFlags(cmd)
	return cmd
}
