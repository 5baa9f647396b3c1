package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
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

const (
	apiEnv         = "HASAN_API"
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
	base string
	hc   *http.Client
}

// newAPIClient reads the root's --api flag.
func newAPIClient(cmd *cobra.Command) (*apiClient, error) {
	v, err := cmd.Flags().GetString("api")
	if err != nil {
		v = defaultAPI()
	}
	base, err := apiBase(v)
	if err != nil {
		return nil, err
	}
	return &apiClient{base: base, hc: &http.Client{Timeout: apiCallTimeout}}, nil
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
			return fmt.Errorf("hasan: cannot reach the REST API at %s: %w "+
				"(is `hasan serve` running there? point --api or %s at a node's api_listen)", base, err, apiEnv)
		}
		data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
		resp.Body.Close()
		if err != nil {
			return fmt.Errorf("hasan: reading the reply of %s %s: %w", method, path, err)
		}
		if resp.StatusCode == http.StatusServiceUnavailable {
			if leader := resp.Header.Get(webui.LeaderHeader); leader != "" && hop < maxLeaderHops {
				next, err := apiBase(leader)
				if err == nil && next != base {
					base = next
					continue
				}
			}
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
