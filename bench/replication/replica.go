package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/hasan-storage/hasan/replication"
)

// runReplica serves replicas to the primary: a plaintext and a TLS Server,
// and a line-based control listener on which the primary creates and
// deletes volumes ("add VOL SIZE GEN plain|tls tmpfs|disk", "del VOL") and measures
// the round-trip time ("echo": the connection then echoes every byte).
func runReplica(ctx context.Context, log *slog.Logger, o options) error {
	dirs := map[string]string{"tmpfs": o.dir, "disk": o.diskDir}
	for b, d := range dirs {
		if d == "" {
			delete(dirs, b)
			continue
		}
		if err := os.MkdirAll(d, 0o700); err != nil {
			return fmt.Errorf("bench/replication: %w", err)
		}
	}
	tc, err := tlsConfig(o.certs, "replica", true)
	if err != nil {
		return err
	}
	plain, err := replication.NewServer(replication.ServerConfig{Plaintext: true, Logger: quiet("replica")})
	if err != nil {
		return err
	}
	secure, err := replication.NewServer(replication.ServerConfig{TLS: tc, Logger: quiet("replica")})
	if err != nil {
		return err
	}
	defer plain.Close()
	defer secure.Close()
	for _, s := range []struct {
		srv  *replication.Server
		addr string
	}{{plain, o.listen}, {secure, o.tlsAddr}} {
		ln, err := net.Listen("tcp", s.addr)
		if err != nil {
			return fmt.Errorf("bench/replication: %w", err)
		}
		go s.srv.Serve(ln)
	}
	ctl, err := net.Listen("tcp", o.ctlAddr)
	if err != nil {
		return fmt.Errorf("bench/replication: %w", err)
	}
	defer ctl.Close()
	servers := map[string]*replication.Server{"plain": plain, "tls": secure}
	go func() {
		for {
			c, err := ctl.Accept()
			if err != nil {
				return
			}
			go control(log, c, dirs, servers)
		}
	}()
	fmt.Println("@ready")
	// The coordinator closes stdin to stop us.
	eof := make(chan struct{})
	go func() { io.Copy(io.Discard, os.Stdin); close(eof) }()
	select {
	case <-eof:
	case <-ctx.Done():
	}
	return nil
}

func control(log *slog.Logger, c net.Conn, dirs map[string]string, servers map[string]*replication.Server) {
	defer c.Close()
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	br := bufio.NewReader(c)
	owner := map[string]*replication.Server{}
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return
		}
		f := strings.Fields(line)
		reply := "ok"
		switch {
		case len(f) == 1 && f[0] == "echo":
			fmt.Fprintln(c, "ok")
			io.Copy(c, br)
			return
		case len(f) == 6 && f[0] == "add":
			size, _ := strconv.ParseInt(f[2], 10, 64)
			gen, _ := strconv.ParseUint(f[3], 10, 64)
			srv := servers[f[4]]
			if srv == nil {
				reply = "err unknown server " + f[4]
				break
			}
			dir := dirs[f[5]]
			if dir == "" {
				reply = "err unknown backing " + f[5]
				break
			}
			l, err := replication.OpenLocal(replication.LocalOptions{Dir: dir, Volume: f[1], Size: size, Gen: gen})
			if err == nil {
				err = srv.AddVolume(l)
			}
			if err != nil {
				reply = "err " + err.Error()
				break
			}
			owner[f[1]] = srv
		case len(f) == 2 && f[0] == "del":
			srv := owner[f[1]]
			if srv == nil {
				reply = "err unknown volume"
				break
			}
			// The primary closed its volume just before: wait for the
			// server to see the connection go.
			deadline := time.Now().Add(10 * time.Second)
			for {
				err = srv.DeleteVolume(f[1])
				if !errors.Is(err, replication.ErrInUse) || time.Now().After(deadline) {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			if err != nil {
				reply = "err " + err.Error()
			}
			delete(owner, f[1])
		default:
			reply = "err bad command"
		}
		if reply != "ok" {
			log.Warn("control command failed", "cmd", strings.TrimSpace(line), "reply", reply)
		}
		fmt.Fprintln(c, reply)
	}
}
