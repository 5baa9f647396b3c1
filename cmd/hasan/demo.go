package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/hasan-storage/hasan/cmd/hasan/internal/democluster"

	"github.com/spf13/cobra"
)

const demoIQN = "iqn.2026-11.io.hasan:demo"

func newDemoCmd() *cobra.Command {
	var dir string
	var port int
	var standaloneOnly bool
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run hasan on embedded defaults and print how to connect",
		Long: `demo first serves a standalone iSCSI target on loopback with a 1 GiB thin LUN,
then (as root) builds a local cluster in network namespaces: two storage nodes and
a witness running real ` + "`hasan serve`" + `, a simulated Redfish BMC per storage node whose
power-off kills that node, and a 2-replica volume exported through a floating IP.
It prints the REST API address and the iscsiadm commands for both, and how to
try a failover. Ctrl-C stops everything and removes the namespaces.`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			if dir == "" {
				dir = filepath.Join(os.TempDir(), "hasan-demo")
			}
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return fmt.Errorf("--dir %s: %w", dir, err)
			}
			addr, err := pickDemoPort(port)
			if err != nil {
				return err
			}
			img := filepath.Join(dir, "lun0.img")
			out := c.OutOrStdout()
			ctx, cancel := context.WithCancel(c.Context())
			defer cancel()
			standaloneUp := make(chan struct{})
			standaloneErr := make(chan error, 1)
			go func() {
				standaloneErr <- runStandalone(ctx, standaloneOpts{
					Listen: []string{addr},
					IQN:    demoIQN,
					LUNs:   []string{"0=" + img + ",size=1G,thin"},
					Ready:  func([]net.Addr) { printDemo(out, addr, img); close(standaloneUp) },
				}, slog.Default(), out)
			}()
			select {
			case err := <-standaloneErr:
				return err
			case <-standaloneUp:
			}
			if !standaloneOnly {
				if err := runDemoCluster(ctx, dir, out); err != nil {
					cancel()
					<-standaloneErr
					return err
				}
			}
			err = <-standaloneErr
			return err
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "where the demo keeps its files (default $TMPDIR/hasan-demo)")
	cmd.Flags().IntVar(&port, "port", 3260, "standalone portal port on 127.0.0.1 (the next free one is used if taken)")
	cmd.Flags().BoolVar(&standaloneOnly, "standalone", false, "serve only the standalone target, no cluster")
	return cmd
}

// runDemoCluster runs the cluster stage until ctx ends. Without root it
// says why and returns nil: the standalone target keeps running.
func runDemoCluster(ctx context.Context, dir string, out io.Writer) error {
	if err := democluster.Preflight(); err != nil {
		fmt.Fprintf(out, "\nhasan demo: no cluster stage: %v. The standalone target keeps running.\n", err)
		return nil
	}
	bin, err := os.Executable()
	if err != nil {
		return fmt.Errorf("demo: cannot find the hasan binary to run the nodes: %w", err)
	}
	fmt.Fprintln(out, "\nhasan demo: building a local cluster (about 10 s)")
	err = democluster.Run(ctx, democluster.Config{
		Bin: bin, Dir: filepath.Join(dir, "cluster"), Out: out, Logger: slog.Default(),
		PowerOnAfter: 10 * time.Second,
		Ready:        func(c *democluster.Cluster) { printDemoCluster(ctx, out, c) },
	})
	if err != nil && ctx.Err() == nil {
		return fmt.Errorf("demo: %w", err)
	}
	return nil
}

func printDemoCluster(ctx context.Context, w io.Writer, c *democluster.Cluster) {
	owner := c.Owner(ctx)
	api := c.Nodes[0].API()
	fmt.Fprintf(w, "\nhasan demo: cluster is up\n")
	for _, n := range c.Nodes {
		role := "witness, no data"
		if n.BMC != nil {
			role = fmt.Sprintf("storage, hasan pid %d, simulated Redfish BMC", n.BMC.NodePID())
		}
		fmt.Fprintf(w, "  %-3s %-15s %s; REST API %s; log %s\n", n.ID, n.Addr, role, n.API(), n.Log)
	}
	fmt.Fprintf(w, `  target   %[1]s, LUN 0 = 2-replica volume on n1+n2
  portal   %[2]s (floating IP, owner now %[3]s)
  console  %[4]s/api/v1/cluster  (REST API, HTTPS with the admin certificate in %[6]s;
           the web console is not built yet)

Reach it through the floating IP:
  iscsiadm -m discovery -t sendtargets -p %[2]s
  iscsiadm -m node -T %[1]s -p %[2]s --login
  iscsi-inq iscsi://%[2]s/%[1]s/0

Try a failover:
  crash the owner      kill -9 <pid of %[3]s above>   (it is fenced through its BMC, then taken over)
  planned move         hasan target move g0 --to <other node> --api %[4]s --cert-dir %[6]s
  state                hasan cluster status --config %[5]s
  events               they are printed below as they happen

Ctrl-C stops both demos and removes the namespaces.
`, democluster.IQN, c.Portal(), owner, api, c.Nodes[0].Config, c.AdminCerts)
}

// pickDemoPort returns the first free loopback port from want upwards, so the
// demo still starts beside a running tgtd or iscsid-owned port.
func pickDemoPort(want int) (string, error) {
	for p := want; p < want+20; p++ {
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(p))
		ln, err := net.Listen("tcp", addr)
		if err == nil {
			ln.Close()
			return addr, nil
		}
		if !errors.Is(err, syscall.EADDRINUSE) {
			return "", fmt.Errorf("--port %d: %w", p, err)
		}
	}
	return "", fmt.Errorf("--port: 127.0.0.1:%d-%d are all in use; pick another with --port", want, want+19)
}

func printDemo(w io.Writer, addr, img string) {
	fmt.Fprintf(w, `
hasan demo: standalone iSCSI target is up
  target   %[1]s
  portal   %[2]s
  LUN 0    1 GiB, thin, backed by %[3]s

Reach it with libiscsi (Debian libiscsi-bin):
  iscsi-ls -s iscsi://%[2]s
  iscsi-inq iscsi://%[2]s/%[1]s/0
  iscsi-readcapacity16 iscsi://%[2]s/%[1]s/0

or with the Linux initiator (open-iscsi):
  iscsiadm -m discovery -t sendtargets -p %[2]s
  iscsiadm -m node -T %[1]s -p %[2]s --login
  iscsiadm -m node -T %[1]s -p %[2]s --logout

Ctrl-C stops the target.
`, demoIQN, addr, img)
}
