// Command hasan is the single hasan binary: `hasan serve` runs a cluster
// node, `hasan cluster` creates and joins clusters, the node, volume,
// target, group, fence and events commands administer a running cluster
// through its REST API (--api), `hasan target run` serves a standalone
// iSCSI target and `hasan demo` shows the product on embedded defaults.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/spf13/cobra"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := newRootCmd().ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "hasan:", err)
		os.Exit(1)
	}
}

func newRootCmd() *cobra.Command {
	var logLevel string
	root := &cobra.Command{
		Use:           "hasan",
		Short:         "hasan: a high-availability iSCSI SAN",
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       version(),
	}
	root.PersistentFlags().StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	root.PersistentFlags().String("api", defaultAPI(), "REST API of any cluster node for the administrator commands (env "+apiEnv+")")
	root.PersistentFlags().String("cert-dir", defaultCertDir(), "`DIR` written by hasan cluster cert --admin (ca.crt, node.crt, node.key); needed for an https --api (env "+apiCertsEnv+")")
	root.PersistentPreRunE = func(cmd *cobra.Command, _ []string) error {
		var lvl slog.Level
		if err := lvl.UnmarshalText([]byte(logLevel)); err != nil {
			return fmt.Errorf("--log-level %q: want debug, info, warn or error", logLevel)
		}
		slog.SetDefault(slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: lvl})))
		return nil
	}
	root.AddCommand(newTargetCmd(), newDemoCmd(), newFenceCmd(), newServeCmd(), newClusterCmd(),
		newNodeCmd(), newVolumeCmd(), newGroupCmd(), newEventsCmd())
	return root
}

func version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "dev"
	}
	v := bi.Main.Version
	if v == "" || v == "(devel)" {
		v = "dev"
	}
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			v += "+" + s.Value[:12]
		}
	}
	return v
}
