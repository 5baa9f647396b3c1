package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/hasan-storage/hasan/cluster"
)

// certSerials returns the serial of a PEM certificate as NodeInfo records
// it, or nil when the PEM does not parse (the node is then recorded
// without one, as before serials were kept).
func certSerials(certPEM []byte) []string {
	info, err := cluster.ParseCertInfo(certPEM)
	if err != nil {
		return nil
	}
	return []string{info.Serial}
}

// printIssuedSerial prints what an operator needs to revoke the
// certificate later (`hasan cluster cert revoke --serial`).
func printIssuedSerial(w io.Writer, certFile string) error {
	p, err := os.ReadFile(certFile)
	if err != nil {
		return fmt.Errorf("hasan: %w", err)
	}
	info, err := cluster.ParseCertInfo(p)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "serial %s (CN %s%s, valid until %s); revoke it with `hasan cluster cert revoke --serial %s`\n",
		info.Serial, info.CN, ouText(info.OU), info.NotAfter.UTC().Format(time.DateOnly), info.Serial)
	return nil
}

func ouText(ou string) string {
	if ou == "" {
		return ""
	}
	return ", OU " + ou
}

// certRevokeRequest is the admin socket's POST /cert/revoke.
type certRevokeRequest struct {
	Serial string `json:"serial"`
	CN     string `json:"cn,omitempty"`
	OU     string `json:"ou,omitempty"`
	Force  bool   `json:"force,omitempty"`
}

type certRevokeReply struct {
	Serial         string `json:"serial"`
	AlreadyRevoked bool   `json:"already_revoked"`
}

func newClusterCertRevokeCmd() *cobra.Command {
	var (
		config, serial, certFile string
		force, viaAPI            bool
	)
	c := &cobra.Command{
		Use:   "revoke",
		Short: "revoke a certificate of the cluster CA (a lost admin certificate, a node's stolen key)",
		Long: "revoke commits the certificate's serial to the cluster state (asks the running node through its admin " +
			"socket, or with --via-api through the REST API). From then on no node accepts it: cluster connections presenting it are refused at the TLS " +
			"handshake and open ones are closed, and the REST API answers 403 to every request made with it. " +
			"Removing a node revokes its recorded certificates by itself. A certificate recorded for a current " +
			"node is revoked only with --force: the node is then cut off without being removed.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			req, err := revokeRequestFor(serial, certFile)
			if err != nil {
				return err
			}
			req.Force = force
			var resp certRevokeReply
			if viaAPI {
				c, err := newAPIClient(cmd)
				if err != nil {
					return err
				}
				body := map[string]any{"serial": req.Serial, "cn": req.CN, "force": req.Force}
				if err := c.call(cmd.Context(), http.MethodPost, "/api/v1/certs/revoke", body, &resp); err != nil {
					return err
				}
			} else {
				cfg, err := loadServeConfig(config)
				if err != nil {
					return err
				}
				if err := adminCall(cmd.Context(), cfg.adminSocket(), http.MethodPost, "/cert/revoke", req, &resp); err != nil {
					return err
				}
			}
			if resp.AlreadyRevoked {
				fmt.Fprintf(cmd.OutOrStdout(), "certificate %s was already revoked\n", resp.Serial)
				return nil
			}
			fmt.Fprintf(cmd.OutOrStdout(), "certificate %s revoked\n", resp.Serial)
			return nil
		},
	}
	c.Flags().StringVar(&config, "config", "/etc/hasan/hasan.yaml", "YAML configuration file of this node")
	c.Flags().StringVar(&serial, "serial", "", "serial to revoke, hex as `hasan cluster cert` or `openssl x509 -serial` print it")
	c.Flags().StringVar(&certFile, "cert", "", "PEM certificate file to revoke (instead of --serial; also records its CN and OU)")
	c.Flags().BoolVar(&force, "force", false, "revoke even a certificate recorded for a current node (cuts it off)")
	c.Flags().BoolVar(&viaAPI, "via-api", false, "revoke through the REST API (--api, --cert-dir) instead of this node's admin socket, e.g. from a workstation")
	return c
}

// revokeRequestFor builds the request from --serial and/or --cert.
func revokeRequestFor(serial, certFile string) (certRevokeRequest, error) {
	var req certRevokeRequest
	if serial == "" && certFile == "" {
		return req, errors.New("hasan: pass --serial HEX or --cert FILE")
	}
	if certFile != "" {
		p, err := os.ReadFile(certFile)
		if err != nil {
			return req, fmt.Errorf("hasan: %w", err)
		}
		info, err := cluster.ParseCertInfo(p)
		if err != nil {
			return req, err
		}
		req = certRevokeRequest{Serial: info.Serial, CN: info.CN, OU: info.OU}
	}
	if serial != "" {
		s, err := cluster.ParseSerial(serial)
		if err != nil {
			return req, err
		}
		if req.Serial != "" && req.Serial != s {
			return req, fmt.Errorf("hasan: --serial %s is not the serial of %s (%s)", s, certFile, req.Serial)
		}
		req.Serial = s
	}
	return req, nil
}

// adminCertRevoke serves POST /cert/revoke on the admin socket.
func (s *server) adminCertRevoke(w http.ResponseWriter, r *http.Request) {
	var req certRevokeRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<16)).Decode(&req); err != nil {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
		return
	}
	serial, err := cluster.ParseSerial(req.Serial)
	if err != nil {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
		return
	}
	already := s.node.FSM().CertRevoked(serial)
	ctx, cancel := context.WithTimeout(r.Context(), 15*time.Second)
	defer cancel()
	_, err = s.node.Propose(ctx, &cluster.Command{Kind: cluster.KindCertRevoke, CertRevoke: &cluster.CertRevokeCmd{
		Serial: serial, CN: req.CN, OU: req.OU, Force: req.Force}})
	if err != nil {
		code := http.StatusServiceUnavailable
		switch {
		case errors.Is(err, cluster.ErrInvalid):
			code = http.StatusBadRequest
		case errors.Is(err, cluster.ErrInUse):
			code = http.StatusConflict
		}
		writeJSON(w, code, map[string]string{"error": err.Error()})
		return
	}
	s.log.Warn("hasan: certificate revoked through the admin socket", "serial", serial, "cn", req.CN, "force", req.Force)
	writeJSON(w, http.StatusOK, certRevokeReply{Serial: serial, AlreadyRevoked: already})
}

// certListing is one row of `hasan cluster cert list`.
type certListing struct {
	Serial  string    `json:"serial"`
	Subject string    `json:"subject"`
	Kind    string    `json:"kind"`   // node, admin or "" (unknown)
	Status  string    `json:"status"` // active or revoked
	Since   time.Time `json:"since"`  // joined or revoked at
	Reason  string    `json:"reason,omitempty"`
}

// certListings lists the certificates the state knows: those recorded
// for current nodes, then every revoked one. Admin certificates are
// issued offline (`hasan cluster cert --admin`), so the state knows them
// only once revoked.
func certListings(st *cluster.State) []certListing {
	var out []certListing
	for _, id := range sortedIDs(st.Nodes) {
		n := st.Nodes[id]
		for _, serial := range n.CertSerials {
			if st.CertRevoked(serial) {
				continue // listed with the revoked ones
			}
			out = append(out, certListing{Serial: serial, Subject: id, Kind: "node", Status: "active", Since: n.JoinedAt})
		}
	}
	revoked := sortedIDs(st.RevokedCerts)
	slices.SortStableFunc(revoked, func(a, b string) int {
		return st.RevokedCerts[a].At.Compare(st.RevokedCerts[b].At)
	})
	for _, serial := range revoked {
		rc := st.RevokedCerts[serial]
		kind := ""
		switch {
		case strings.Contains(rc.OU, cluster.AdminOU):
			kind = "admin"
		case rc.Reason == cluster.RevokeReasonNodeRemove:
			kind = "node"
		}
		out = append(out, certListing{Serial: serial, Subject: rc.CN, Kind: kind, Status: "revoked", Since: rc.At, Reason: rc.Reason})
	}
	return out
}

func newClusterCertListCmd() *cobra.Command {
	var (
		config string
		asJSON bool
	)
	c := &cobra.Command{
		Use:   "list",
		Short: "list the node certificates the cluster recorded and every revoked certificate",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := localStatus(cmd.Context(), config)
			if err != nil {
				return err
			}
			rows := certListings(st.State)
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(rows)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SERIAL\tSUBJECT\tKIND\tSTATUS\tSINCE\tREASON")
			for _, r := range rows {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", r.Serial, dash(r.Subject), dash(r.Kind), r.Status,
					r.Since.UTC().Format(time.RFC3339), dash(r.Reason))
			}
			return tw.Flush()
		},
	}
	c.Flags().StringVar(&config, "config", "/etc/hasan/hasan.yaml", "YAML configuration file of this node")
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
