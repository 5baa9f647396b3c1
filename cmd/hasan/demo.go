package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/spf13/cobra"
)

const demoIQN = "iqn.2026-11.io.hasan:demo"

func newDemoCmd() *cobra.Command {
	var dir string
	var port int
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run hasan on embedded defaults and print how to connect",
		Long: `demo serves a standalone iSCSI target on loopback with a 1 GiB thin LUN and
prints the iscsi-ls / iscsiadm commands that reach it. Ctrl-C stops it.
(The multi-node cluster demo with fencing arrives with the cluster issues.)`,
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
			return runStandalone(c.Context(), standaloneOpts{
				Listen: []string{addr},
				IQN:    demoIQN,
				LUNs:   []string{"0=" + img + ",size=1G,thin"},
				Ready:  func([]net.Addr) { printDemo(out, addr, img) },
			}, slog.Default(), out)
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "where the demo keeps its LUN file (default $TMPDIR/hasan-demo)")
	cmd.Flags().IntVar(&port, "port", 3260, "portal port on 127.0.0.1 (the next free one is used if taken)")
	return cmd
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

Ctrl-C stops the target. The cluster demo (nodes, fencing, console) comes with the cluster issues.
`, demoIQN, addr, img)
}
