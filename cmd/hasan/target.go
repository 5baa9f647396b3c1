package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/hasan-storage/hasan/target"
	"github.com/hasan-storage/hasan/target/filebackend"
	"github.com/hasan-storage/hasan/target/scsi"
)

// standaloneOpts is everything `hasan target run` serves.
type standaloneOpts struct {
	Listen     []string
	IQN        string
	LUNs       []string
	CHAP       string
	MutualCHAP string
	Allow      []string
	// Ready, if set, is called once every listener is bound.
	Ready func(addrs []net.Addr)
}

func newTargetCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "target", Short: "iSCSI targets: cluster targets over the REST API, or `run` for a standalone one"}
	var o standaloneOpts
	run := &cobra.Command{
		Use:   "run",
		Short: "Serve an iSCSI target without a cluster, like tgtd",
		Example: `  hasan target run --listen 127.0.0.1:3260 --iqn iqn.2026-11.io.example:disk1 \
      --lun 0=/var/lib/hasan/disk1.img,size=10G --chap alice:s3cretpassw0rd --allow iqn.1993-08.org.debian:01:host1`,
		Args: cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			return runStandalone(c.Context(), o, slog.Default(), c.OutOrStdout())
		},
	}
	f := run.Flags()
	f.StringArrayVar(&o.Listen, "listen", []string{"0.0.0.0:3260"}, "portal address ip:port (repeat for several portals)")
	f.StringVar(&o.IQN, "iqn", "", "target name, e.g. iqn.2026-11.io.example:disk1 (required)")
	f.StringArrayVar(&o.LUNs, "lun", nil, "N=PATH[,size=1G][,thin][,uuid=UUID][,block=512|4096] (repeatable)")
	f.StringVar(&o.CHAP, "chap", "", "require CHAP: USER:SECRET the initiator must present")
	f.StringVar(&o.MutualCHAP, "mutual-chap", "", "mutual CHAP: USER:SECRET the target presents back")
	f.StringArrayVar(&o.Allow, "allow", nil, "initiator IQN allowed to log in (repeatable; default: any)")
	_ = run.MarkFlagRequired("iqn")
	cmd.AddCommand(run)
	addTargetAdminCmds(cmd)
	return cmd
}

func parseCHAP(flag, v string) (*target.CHAP, error) {
	if v == "" {
		return nil, nil
	}
	user, secret, ok := strings.Cut(v, ":")
	if !ok || user == "" || secret == "" {
		return nil, fmt.Errorf("--%s: want USER:SECRET", flag)
	}
	return &target.CHAP{User: user, Secret: secret}, nil
}

// runStandalone serves o until ctx ends, then stops the target so that no
// command can still reach a backend before the files are closed.
func runStandalone(ctx context.Context, o standaloneOpts, log *slog.Logger, out io.Writer) (err error) {
	if len(o.LUNs) == 0 {
		return errors.New("--lun: give at least one LUN, e.g. --lun 0=/var/lib/hasan/disk.img,size=1G")
	}
	chap, err := parseCHAP("chap", o.CHAP)
	if err != nil {
		return err
	}
	mutual, err := parseCHAP("mutual-chap", o.MutualCHAP)
	if err != nil {
		return err
	}
	if mutual != nil && chap == nil {
		return errors.New("--mutual-chap needs --chap: the initiator must authenticate first")
	}
	specs := make([]lunSpec, 0, len(o.LUNs))
	seen := map[uint64]bool{}
	for _, s := range o.LUNs {
		sp, err := parseLUNSpec(s)
		if err != nil {
			return err
		}
		if seen[sp.LUN] {
			return fmt.Errorf("--lun %q: LUN %d given twice", s, sp.LUN)
		}
		seen[sp.LUN] = true
		specs = append(specs, sp)
	}

	srv := target.NewServer(target.Config{Logger: log})
	if err := srv.AddTarget(target.TargetConfig{
		Name: o.IQN, CHAP: chap, MutualCHAP: mutual, AllowedInitiators: o.Allow,
	}); err != nil {
		return err
	}

	var closers []io.Closer
	defer func() {
		// The server must be closed before the files: Close returns only when
		// no command can reach a backend any more.
		if cerr := srv.Close(); cerr != nil && err == nil {
			err = cerr
		}
		for _, c := range closers {
			c.Close()
		}
	}()
	for _, sp := range specs {
		lu, be, err := openLUN(sp, log)
		if err != nil {
			return err
		}
		closers = append(closers, be)
		if err := srv.AddLUN(o.IQN, sp.LUN, lu); err != nil {
			return err
		}
		log.Info("lun ready", "lun", sp.LUN, "path", sp.Path, "size", be.Size(), "thin", sp.Thin)
	}

	var lns []net.Listener
	for _, addr := range o.Listen {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			if errors.Is(err, syscall.EADDRINUSE) {
				return fmt.Errorf("--listen %s: the port is already in use (is another target such as tgtd running?): %w", addr, err)
			}
			return fmt.Errorf("--listen %s: %w", addr, err)
		}
		lns = append(lns, ln)
	}
	errc := make(chan error, len(lns))
	addrs := make([]net.Addr, 0, len(lns))
	for _, ln := range lns {
		addrs = append(addrs, ln.Addr())
		log.Info("portal listening", "addr", ln.Addr().String(), "target", o.IQN)
		go func(ln net.Listener) { errc <- srv.Serve(ln) }(ln)
	}
	if o.Ready != nil {
		o.Ready(addrs)
	}
	select {
	case <-ctx.Done():
		log.Info("stopping target", "target", o.IQN)
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(sctx); err != nil {
			log.Warn("graceful shutdown incomplete; closing", "err", err)
		}
		return nil
	case err := <-errc:
		if errors.Is(err, target.ErrServerClosed) {
			return nil
		}
		return fmt.Errorf("serving: %w", err)
	}
}

// openLUN opens the backing file and builds the logical unit on it.
func openLUN(sp lunSpec, log *slog.Logger) (*scsi.LogicalUnit, *filebackend.File, error) {
	prov := filebackend.Thick
	if sp.Thin {
		prov = filebackend.Thin
	}
	be, err := filebackend.Open(sp.Path, filebackend.Options{Size: sp.Size, Provisioning: prov, Create: sp.Size > 0})
	if err != nil {
		return nil, nil, fmt.Errorf("--lun %d: %w", sp.LUN, err)
	}
	if be.Size()%int64(sp.BlockSize) != 0 {
		be.Close()
		return nil, nil, fmt.Errorf("--lun %d: %s is %d bytes, not a multiple of the %d-byte block", sp.LUN, sp.Path, be.Size(), sp.BlockSize)
	}
	id, err := resolveVolumeID(sp)
	if err != nil {
		be.Close()
		return nil, nil, fmt.Errorf("--lun %d: %w", sp.LUN, err)
	}
	lu, err := scsi.New(scsi.Config{
		VolumeID:  id,
		BlockSize: sp.BlockSize,
		Thin:      sp.Thin,
		Backend:   be,
		PR:        scsi.NewFilePRStore(filepath.Clean(sp.Path) + ".pr.json"),
		Logger:    log.With("lun", sp.LUN),
	})
	if err != nil {
		be.Close()
		return nil, nil, fmt.Errorf("--lun %d: %w", sp.LUN, err)
	}
	return lu, be, nil
}
