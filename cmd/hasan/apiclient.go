package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/hasan-storage/hasan/webui"
)

// The administrator commands (node, volume, target, group, fence device and
// topology, events, cluster maintenance) are clients of a node's REST API
// (docs/api.md). --api picks the node; any node will do: reads are served
// from its replica of the state and writes are forwarded to the Raft
// leader, and when the answering node cannot forward, the client follows
// the leader address it names.
//
// An API on loopback is plain HTTP. Anywhere else it is HTTPS and admits
// administrator certificates only (webui/auth.go): --cert-dir points at
// what `hasan cluster cert --admin --out DIR` wrote.

const (
	apiEnv         = "HASAN_API"
	apiCertsEnv    = "HASAN_API_CERTS"
	defaultAPIURL  = "http://127.0.0.1:7402"
	apiCallTimeout = 30 * time.Second
	// maxLeaderHops bounds how often one call follows X-Hasan-Leader; two
	// covers a leader change during the call without looping.
	maxLeaderHops = 2
)

// defaultAPI is the --api default: HASAN_API, else the serve default.
func defaultAPI() string {
	if v := strings.TrimSpace(os.Getenv(apiEnv)); v != "" {
		return v
	}
	return defaultAPIURL
}

// defaultCertDir is the --cert-dir default: HASAN_API_CERTS.
func defaultCertDir() string { return strings.TrimSpace(os.Getenv(apiCertsEnv)) }

// apiServerName is the DNS name every certificate of the cluster CA
// carries (cluster/tls.go, clusterServerName): node certificates do not
// name their API address, so the CLI accepts either that address or this
// name, from a certificate of the cluster CA only.
// TestServeAPIAdminTLS fails if the two drift apart.
const apiServerName = "hasan-cluster"

// apiBase normalises an --api value or a leader address (host:port, as the
// cluster records api_addr) into a base URL.
func apiBase(v string) (string, error) {
	v = strings.TrimSpace(v)
	if v == "" {
		return "", errors.New("--api is empty: give the REST address of a node, e.g. http://127.0.0.1:7402")
	}
	if !strings.Contains(v, "://") {
		v = "http://" + v
	}
	u, err := url.Parse(v)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return "", fmt.Errorf("--api %q: want http://HOST:PORT, e.g. http://127.0.0.1:7402", v)
	}
	return strings.TrimRight(u.Scheme+"://"+u.Host+u.Path, "/"), nil
}

// apiClient makes calls to one node's REST API.
type apiClient struct {
	base    string
	certDir string // "" when none was given
	hc      *http.Client
}

// newAPIClient reads the root's --api and --cert-dir flags.
func newAPIClient(cmd *cobra.Command) (*apiClient, error) {
	v, err := cmd.Flags().GetString("api")
	if err != nil {
		v = defaultAPI()
	}
	dir, err := cmd.Flags().GetString("cert-dir")
	if err != nil {
		dir = defaultCertDir()
	}
	return dialAPI(v, dir)
}

// dialAPI builds the client of the API at api; certDir is needed for
// https and ignored for http.
func dialAPI(api, certDir string) (*apiClient, error) {
	base, err := apiBase(api)
	if err != nil {
		return nil, err
	}
	c := &apiClient{base: base, certDir: strings.TrimSpace(certDir), hc: &http.Client{Timeout: apiCallTimeout}}
	if !strings.HasPrefix(base, "https://") {
		return c, nil
	}
	if c.certDir == "" {
		return nil, fmt.Errorf("hasan: the API at %s uses TLS and admits administrator certificates only: pass --cert-dir DIR "+
			"(or %s=DIR) with the files `hasan cluster cert --admin --node NAME --out DIR` wrote", base, apiCertsEnv)
	}
	tc, err := adminClientTLS(c.certDir)
	if err != nil {
		return nil, err
	}
	c.hc.Transport = &http.Transport{DialTLSContext: tc.dial}
	return c, nil
}

// adminTLS dials an HTTPS API with an administrator certificate.
type adminTLS struct {
	dir   string
	roots *x509.CertPool
	pair  tls.Certificate
}

// adminClientTLS loads the output of `hasan cluster cert --admin` (ca.crt,
// node.crt, node.key).
func adminClientTLS(dir string) (*adminTLS, error) {
	var pems [3][]byte
	for i, name := range []string{caCertFile, nodeCertFile, nodeKeyFile} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("hasan: --cert-dir %s: %w (want %s, %s and %s, as `hasan cluster cert --admin --out DIR` writes them)",
				dir, err, caCertFile, nodeCertFile, nodeKeyFile)
		}
		pems[i] = b
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pems[0]) {
		return nil, fmt.Errorf("hasan: --cert-dir %s: %s holds no certificate", dir, caCertFile)
	}
	pair, err := tls.X509KeyPair(pems[1], pems[2])
	if err != nil {
		return nil, fmt.Errorf("hasan: --cert-dir %s: %s/%s: %w", dir, nodeCertFile, nodeKeyFile, err)
	}
	return &adminTLS{dir: dir, roots: roots, pair: pair}, nil
}

// dial is the transport's DialTLSContext. The server must present a
// certificate of the cluster CA naming the host dialled or apiServerName.
// The host is taken here because a leader hop changes it and the client
// side of tls.ConnectionState leaves ServerName empty for an IP address.
func (a *adminTLS) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		// Go sends a certificate only when its issuer is among those the
		// server asks for, and silently none otherwise. Sending it always
		// makes a certificate of the wrong cluster fail the handshake,
		// which call() names, instead of passing for "no certificate".
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &a.pair, nil },
		// The standard check would want the dialled address in the
		// certificate, which node certificates do not carry; the chain
		// check is done in full by VerifyConnection instead.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			return verifyAPIServer(cs, a.roots, a.dir, host)
		},
	}
	if net.ParseIP(host) == nil {
		cfg.ServerName = host // SNI, for a proxy or a certificate chosen by name
	}
	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	raw, err := (&net.Dialer{}).DialContext(hctx, network, addr)
	if err != nil {
		return nil, err
	}
	conn := tls.Client(raw, cfg)
	if err := conn.HandshakeContext(hctx); err != nil {
		raw.Close()
		return nil, err
	}
	return conn, nil
}

// serverCertError is a server certificate the CLI refused.
type serverCertError struct {
	dir string
	err error
}

func (e *serverCertError) Error() string {
	return fmt.Sprintf("the server's certificate is not one of the cluster CA in %s/%s: %v "+
		"(is --cert-dir from this cluster, and --api a node of it?)", e.dir, caCertFile, e.err)
}

func (e *serverCertError) Unwrap() error { return e.err }

func verifyAPIServer(cs tls.ConnectionState, roots *x509.CertPool, dir, host string) error {
	if len(cs.PeerCertificates) == 0 {
		return &serverCertError{dir: dir, err: errors.New("no certificate presented")}
	}
	leaf := cs.PeerCertificates[0]
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		return &serverCertError{dir: dir, err: err}
	}
	if err := leaf.VerifyHostname(host); err != nil && leaf.VerifyHostname(apiServerName) != nil {
		return &serverCertError{dir: dir, err: err}
	}
	return nil
}

// apiError is an error the API answered with.
type apiError struct {
	Method, Path string
	Status       int
	Msg, Field   string
}

func (e *apiError) Error() string {
	var b strings.Builder
	if e.Field != "" {
		fmt.Fprintf(&b, "%s: ", e.Field)
	}
	b.WriteString(e.Msg)
	fmt.Fprintf(&b, " (%s %s: %d %s)", e.Method, e.Path, e.Status, http.StatusText(e.Status))
	return b.String()
}

// notFound reports whether err is the API's 404.
func notFound(err error) bool {
	var ae *apiError
	return errors.As(err, &ae) && ae.Status == http.StatusNotFound
}

// call sends in (JSON, or raw bytes when in is []byte) and decodes the
// reply into out when out is not nil.
func (c *apiClient) call(ctx context.Context, method, path string, in, out any) error {
	var body []byte
	switch v := in.(type) {
	case nil:
	case []byte:
		body = v
	default:
		b, err := json.Marshal(v)
		if err != nil {
			return fmt.Errorf("hasan: encode request: %w", err)
		}
		body = b
	}
	base := c.base
	for hop := 0; ; hop++ {
		var r io.Reader
		if body != nil {
			r = bytes.NewReader(body)
		}
		req, err := http.NewRequestWithContext(ctx, method, base+path, r)
		if err != nil {
			return fmt.Errorf("hasan: %w", err)
		}
		if body != nil {
			req.Header.Set("Content-Type", "application/json")
		}
		resp, err := c.hc.Do(req)
		if err != nil {
			return c.transportError(base, err)
		}
		data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
		resp.Body.Close()
		if err != nil {
			return fmt.Errorf("hasan: reading the reply of %s %s: %w", method, path, err)
		}
		if resp.StatusCode == http.StatusServiceUnavailable {
			if leader := resp.Header.Get(webui.LeaderHeader); leader != "" && hop < maxLeaderHops {
				next, err := leaderBase(base, leader)
				if err == nil && next != base {
					base = next
					continue
				}
			}
		}
		if resp.StatusCode == http.StatusBadRequest && strings.HasPrefix(base, "http://") &&
			bytes.Contains(data, []byte("HTTP request to an HTTPS server")) {
			return fmt.Errorf("hasan: the API at %s speaks HTTPS: use --api %s with --cert-dir DIR (or %s=DIR), "+
				"the output of `hasan cluster cert --admin`", base, "https://"+strings.TrimPrefix(base, "http://"), apiCertsEnv)
		}
		if resp.StatusCode >= 300 {
			return replyError(method, path, resp.StatusCode, data)
		}
		if out == nil || len(data) == 0 {
			return nil
		}
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("hasan: decoding the reply of %s %s: %w", method, path, err)
		}
		return nil
	}
}

// leaderBase turns the leader's API address (host:port, from the cluster
// state) into a base URL with the scheme of the node that named it: the
// nodes of one cluster serve their APIs alike, and a TLS client must not
// fall back to plain HTTP on a hop.
func leaderBase(cur, leader string) (string, error) {
	if !strings.HasPrefix(cur, "https://") {
		return apiBase(leader)
	}
	if !strings.Contains(leader, "://") {
		leader = "https://" + leader
	}
	next, err := apiBase(leader)
	if err == nil && !strings.HasPrefix(next, "https://") {
		return "", fmt.Errorf("hasan: not following the leader from %s to plain-HTTP %s", cur, next)
	}
	return next, err
}

// transportError says what to fix when no HTTP reply came back.
func (c *apiClient) transportError(base string, err error) error {
	var sce *serverCertError
	msg := err.Error()
	switch {
	case errors.As(err, &sce):
		return fmt.Errorf("hasan: the API at %s: %w", base, sce)
	case strings.Contains(msg, "remote error: tls:"):
		// The server's handshake refused our certificate: another CA,
		// expired, revoked, or not a client certificate.
		return fmt.Errorf("hasan: the API at %s refused the client certificate in --cert-dir %s (%w): it must be "+
			"signed by this cluster's CA, still valid and not revoked (`hasan cluster cert list` on a node shows revoked ones); "+
			"make one with `hasan cluster cert --admin --node NAME --out DIR`",
			base, c.certDir, err)
	case errors.Is(err, http.ErrSchemeMismatch):
		return fmt.Errorf("hasan: the API at %s serves plain HTTP (a loopback api_listen): use --api %s",
			base, "http://"+strings.TrimPrefix(base, "https://"))
	}
	return fmt.Errorf("hasan: cannot reach the REST API at %s: %w "+
		"(is `hasan serve` running there? point --api or %s at a node's api_listen)", base, err, apiEnv)
}

func replyError(method, path string, status int, data []byte) error {
	var eb struct {
		Error string `json:"error"`
		Field string `json:"field"`
	}
	if json.Unmarshal(data, &eb) != nil || eb.Error == "" {
		eb.Error = strings.TrimSpace(string(data))
		if len(eb.Error) > 200 {
			eb.Error = eb.Error[:200] + "…"
		}
	}
	if status == http.StatusServiceUnavailable {
		eb.Error += ": the node could not hand this to the Raft leader (an election is running, quorum is lost, " +
			"or the leader's API address is unknown or unreachable from here); retry, or use --api with the leader's API"
	}
	return &apiError{Method: method, Path: path, Status: status, Msg: eb.Error, Field: eb.Field}
}

// seg escapes one path segment (IQNs carry ':' and '.').
func seg(s string) string { return url.PathEscape(s) }

// outputFlags adds --json to a command that prints.
func outputFlags(c *cobra.Command) *bool {
	return c.Flags().Bool("json", false, "print JSON instead of a table")
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newTable(w io.Writer) *tabwriter.Writer { return tabwriter.NewWriter(w, 0, 4, 2, ' ', 0) }

// orDash shows an empty cell as "-" so columns stay readable.
func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// splitList splits comma-separated flag values, dropping blanks.
func splitList(vs []string) []string {
	var out []string
	for _, v := range vs {
		for _, p := range strings.Split(v, ",") {
			if p = strings.TrimSpace(p); p != "" {
				out = append(out, p)
			}
		}
	}
	return out
}

// listCommand is a `list` subcommand: GET path into a []T, then print it as
// JSON (--json) or as a table with header and one row per item.
func listCommand[T any](short, path, header string, row func(w io.Writer, item T)) *cobra.Command {
	list := &cobra.Command{Use: "list", Short: short, Args: cobra.NoArgs}
	asJSON := outputFlags(list)
	list.RunE = apiRun(func(cmd *cobra.Command, c *apiClient, _ []string) error {
		var items []T
		if err := c.call(cmd.Context(), http.MethodGet, path, nil, &items); err != nil {
			return err
		}
		if *asJSON {
			return printJSON(cmd.OutOrStdout(), items)
		}
		tw := newTable(cmd.OutOrStdout())
		fmt.Fprintln(tw, header)
		for _, it := range items {
			row(tw, it)
		}
		return tw.Flush()
	})
	return list
}
