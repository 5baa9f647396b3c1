package main

import (
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
)

// targetOut is a target as the API shows it: CHAP accounts without their
// secrets.
type targetOut struct {
	IQN        string            `json:"iqn"`
	Alias      string            `json:"alias,omitempty"`
	LUNs       map[uint64]string `json:"luns"`
	ACL        []string          `json:"acl"`
	CHAP       *chapOut          `json:"chap,omitempty"`
	MutualCHAP *chapOut          `json:"mutual_chap,omitempty"`
}

type chapOut struct {
	User      string `json:"user"`
	SecretSet bool   `json:"secret_set"`
}

func (c *chapOut) String() string {
	if c == nil {
		return "-"
	}
	if !c.SecretSet {
		return c.User + " (no secret)"
	}
	return c.User
}

// addTargetAdminCmds adds the cluster target commands next to `target run`.
func addTargetAdminCmds(cmd *cobra.Command) {
	var alias string
	create := &cobra.Command{
		Use:   "create IQN",
		Short: "create an empty cluster target (add LUNs, ACL and CHAP next)",
		Args:  cobra.ExactArgs(1),
		RunE: apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
			req := map[string]any{"iqn": args[0]}
			if alias != "" {
				req["alias"] = alias
			}
			if err := c.call(cmd.Context(), http.MethodPost, "/api/v1/targets", req, nil); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "target %s created; map a volume with `hasan target lun add %s 0 VOLUME`\n", args[0], args[0])
			return nil
		}),
	}
	create.Flags().StringVar(&alias, "alias", "", "target alias shown to initiators")

	list := listCommand("list cluster targets", "/api/v1/targets", "IQN\tLUNS\tACL\tCHAP\tMUTUAL CHAP",
		func(w io.Writer, t targetOut) {
			acl := "any"
			if len(t.ACL) > 0 {
				acl = strconv.Itoa(len(t.ACL)) + " initiators"
			}
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", t.IQN, orDash(lunText(t.LUNs)), acl, t.CHAP, t.MutualCHAP)
		})

	show := &cobra.Command{Use: "show IQN", Short: "show a cluster target", Args: cobra.ExactArgs(1)}
	showJSON := outputFlags(show)
	show.RunE = apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
		var t targetOut
		if err := c.call(cmd.Context(), http.MethodGet, "/api/v1/targets/"+seg(args[0]), nil, &t); err != nil {
			return err
		}
		if *showJSON {
			return printJSON(cmd.OutOrStdout(), t)
		}
		w := cmd.OutOrStdout()
		fmt.Fprintf(w, "iqn:         %s\nalias:       %s\nchap:        %s\nmutual chap: %s\n", t.IQN, orDash(t.Alias), t.CHAP, t.MutualCHAP)
		if len(t.ACL) == 0 {
			fmt.Fprintln(w, "acl:         any initiator")
		} else {
			fmt.Fprintf(w, "acl:         %s\n", strings.Join(t.ACL, "\n             "))
		}
		tw := newTable(w)
		fmt.Fprintln(tw, "\nLUN\tVOLUME")
		for _, l := range slices.Sorted(maps.Keys(t.LUNs)) {
			fmt.Fprintf(tw, "%d\t%s\n", l, t.LUNs[l])
		}
		return tw.Flush()
	})

	del := &cobra.Command{
		Use:   "delete IQN",
		Short: "delete a cluster target that is in no group",
		Args:  cobra.ExactArgs(1),
		RunE: apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
			if err := c.call(cmd.Context(), http.MethodDelete, "/api/v1/targets/"+seg(args[0]), nil, nil); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "target %s deleted\n", args[0])
			return nil
		}),
	}

	cmd.AddCommand(create, list, show, del, newLUNCmd(), newACLCmd(), newCHAPCmd(),
		newMoveCmd("move", "move the group holding the targets"))
}

func lunText(luns map[uint64]string) string {
	var parts []string
	for _, l := range slices.Sorted(maps.Keys(luns)) {
		parts = append(parts, fmt.Sprintf("%d=%s", l, luns[l]))
	}
	return strings.Join(parts, " ")
}

func parseLUNArg(v string) (uint64, error) {
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil || n > 16383 {
		return 0, fmt.Errorf("LUN %q: use a number from 0 to 16383", v)
	}
	return n, nil
}

func newLUNCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "lun", Short: "map volumes to LUNs of a cluster target"}
	add := &cobra.Command{
		Use:   "add IQN LUN VOLUME",
		Short: "export VOLUME (UUID or name) as LUN of the target",
		Args:  cobra.ExactArgs(3),
		RunE: apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
			lun, err := parseLUNArg(args[1])
			if err != nil {
				return err
			}
			v, err := resolveVolume(cmd, c, args[2])
			if err != nil {
				return err
			}
			path := fmt.Sprintf("/api/v1/targets/%s/luns/%d", seg(args[0]), lun)
			if err := c.call(cmd.Context(), http.MethodPut, path, map[string]string{"volume": v.UUID}, nil); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "target %s: LUN %d is volume %s (%s)\n", args[0], lun, v.Name, v.UUID)
			return nil
		}),
	}
	rm := &cobra.Command{
		Use:   "rm IQN LUN",
		Short: "remove a LUN from the target (the volume is kept)",
		Args:  cobra.ExactArgs(2),
		RunE: apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
			lun, err := parseLUNArg(args[1])
			if err != nil {
				return err
			}
			path := fmt.Sprintf("/api/v1/targets/%s/luns/%d", seg(args[0]), lun)
			if err := c.call(cmd.Context(), http.MethodDelete, path, nil, nil); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "target %s: LUN %d removed\n", args[0], lun)
			return nil
		}),
	}
	cmd.AddCommand(add, rm)
	return cmd
}

func newACLCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "acl", Short: "choose which initiators may log in to a cluster target"}
	set := &cobra.Command{
		Use:   "set IQN INITIATOR...",
		Short: "allow only these initiator names (replaces the list)",
		Args:  cobra.MinimumNArgs(2),
		RunE: apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
			return putACL(cmd, c, args[0], args[1:])
		}),
	}
	clr := &cobra.Command{
		Use:   "clear IQN",
		Short: "allow every initiator (CHAP, if set, still applies)",
		Args:  cobra.ExactArgs(1),
		RunE: apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
			return putACL(cmd, c, args[0], []string{})
		}),
	}
	cmd.AddCommand(set, clr)
	return cmd
}

func putACL(cmd *cobra.Command, c *apiClient, iqn string, initiators []string) error {
	if err := c.call(cmd.Context(), http.MethodPut, "/api/v1/targets/"+seg(iqn)+"/acl", map[string][]string{"initiators": initiators}, nil); err != nil {
		return err
	}
	if len(initiators) == 0 {
		fmt.Fprintf(cmd.OutOrStdout(), "target %s: any initiator may log in\n", iqn)
	} else {
		fmt.Fprintf(cmd.OutOrStdout(), "target %s: %d initiators allowed\n", iqn, len(initiators))
	}
	return nil
}

// CHAP secret bounds the cluster enforces; checked here too so the error
// names the flag.
const minCHAPSecret, maxCHAPSecret = 12, 255

func newCHAPCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "chap", Short: "set CHAP on a cluster target (secrets from files or stdin, never arguments)"}
	var user, secretFile, mutualUser, mutualFile string
	set := &cobra.Command{
		Use:   "set IQN --user USER --secret-file FILE [--mutual-user USER --mutual-secret-file FILE]",
		Short: "require CHAP; the secret is read from FILE ('-' reads stdin) so it never shows in ps or shell history",
		Example: "  (umask 077; head -c 18 /dev/urandom | base64 > /root/db.chap)\n" +
			"  hasan target chap set iqn.2026-11.io.hasan:db --user alice --secret-file /root/db.chap",
		Args: cobra.ExactArgs(1),
		RunE: apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
			if user == "" {
				return errors.New("--user: give the CHAP user name the initiator presents")
			}
			if secretFile == "" {
				return errors.New("--secret-file: give a file holding the secret ('-' reads it from stdin)")
			}
			if (mutualUser == "") != (mutualFile == "") {
				return errors.New("--mutual-user and --mutual-secret-file go together")
			}
			if secretFile == "-" && mutualFile == "-" {
				return errors.New("--secret-file and --mutual-secret-file cannot both read stdin: put one in a file")
			}
			stdin := cmd.InOrStdin()
			secret, err := readSecret(cmd, "--secret-file", secretFile, stdin)
			if err != nil {
				return err
			}
			req := map[string]any{"chap": map[string]string{"user": user, "secret": secret}, "mutual_chap": nil}
			if mutualUser != "" {
				ms, err := readSecret(cmd, "--mutual-secret-file", mutualFile, stdin)
				if err != nil {
					return err
				}
				if ms == secret {
					return errors.New("--mutual-secret-file: use a different secret from --secret-file (RFC 7143 forbids reusing it)")
				}
				req["mutual_chap"] = map[string]string{"user": mutualUser, "secret": ms}
			}
			if err := c.call(cmd.Context(), http.MethodPut, "/api/v1/targets/"+seg(args[0])+"/chap", req, nil); err != nil {
				return err
			}
			what := "CHAP"
			if mutualUser != "" {
				what = "CHAP and mutual CHAP"
			}
			fmt.Fprintf(cmd.OutOrStdout(), "target %s: %s set for user %s\n", args[0], what, user)
			return nil
		}),
	}
	set.Flags().StringVar(&user, "user", "", "CHAP user name the initiator presents")
	set.Flags().StringVar(&secretFile, "secret-file", "", "file holding the secret, 12 to 255 bytes ('-': stdin)")
	set.Flags().StringVar(&mutualUser, "mutual-user", "", "user name the target presents back (mutual CHAP)")
	set.Flags().StringVar(&mutualFile, "mutual-secret-file", "", "file holding the mutual secret ('-': stdin)")

	clr := &cobra.Command{
		Use:   "clear IQN",
		Short: "remove CHAP (and mutual CHAP) from the target",
		Args:  cobra.ExactArgs(1),
		RunE: apiRun(func(cmd *cobra.Command, c *apiClient, args []string) error {
			req := map[string]any{"chap": nil, "mutual_chap": nil}
			if err := c.call(cmd.Context(), http.MethodPut, "/api/v1/targets/"+seg(args[0])+"/chap", req, nil); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "target %s: CHAP removed\n", args[0])
			return nil
		}),
	}
	cmd.AddCommand(set, clr)
	return cmd
}

// readSecret reads a secret from path ("-": stdin). One trailing newline
// is dropped, since `echo secret > file` adds one. The value is never
// echoed in an error.
func readSecret(cmd *cobra.Command, flag, path string, stdin io.Reader) (string, error) {
	var (
		b   []byte
		err error
	)
	if path == "-" {
		b, err = io.ReadAll(io.LimitReader(stdin, maxCHAPSecret+3))
	} else {
		var fi os.FileInfo
		if fi, err = os.Stat(path); err == nil && fi.Mode().Perm()&0o077 != 0 {
			fmt.Fprintf(cmd.ErrOrStderr(), "warning: %s %s is readable by other users (mode %v); chmod 600 it\n", flag, path, fi.Mode().Perm())
		}
		b, err = os.ReadFile(path)
	}
	if err != nil {
		return "", fmt.Errorf("%s %s: %w", flag, path, err)
	}
	s := strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), "\r")
	if n := len(s); n < minCHAPSecret || n > maxCHAPSecret {
		return "", fmt.Errorf("%s %s: the secret is %d bytes; CHAP secrets must be %d to %d bytes", flag, path, n, minCHAPSecret, maxCHAPSecret)
	}
	return s, nil
}
