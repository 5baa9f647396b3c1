package initiator

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/target"
	"github.com/hasan-storage/hasan/target/filebackend"
	"github.com/hasan-storage/hasan/target/scsi"
)

const testIQN = "iqn.2026-11.io.hasan:probe-test"

// startTarget serves one 8 MiB file LUN on 127.0.0.1 with hasan's target.
func startTarget(t *testing.T, chap *target.CHAP) string {
	t.Helper()
	srv := target.NewServer(target.Config{Logger: slog.New(slog.DiscardHandler)})
	if err := srv.AddTarget(target.TargetConfig{Name: testIQN, CHAP: chap}); err != nil {
		t.Fatal(err)
	}
	be, err := filebackend.Open(filepath.Join(t.TempDir(), "lun.img"), filebackend.Options{Size: 8 << 20, Create: true})
	if err != nil {
		t.Fatal(err)
	}
	lu, err := scsi.New(scsi.Config{VolumeID: [16]byte{1, 2, 3}, BlockSize: 512, Backend: be})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.AddLUN(testIQN, 0, lu); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close(); be.Close() })
	return ln.Addr().String()
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestLoginWriteReadVerify(t *testing.T) {
	addr := startTarget(t, nil)
	s, err := Login(ctxT(t, time.Second), Config{Portal: addr, Target: testIQN})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if n, err := s.ClearUnitAttention(ctxT(t, time.Second)); err != nil || n == 0 {
		t.Fatalf("a new session should see POWER ON RESET: %d %v", n, err)
	}
	blocks, bs, err := s.ReadCapacity10(ctxT(t, time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if blocks != (8<<20)/512 || bs != 512 {
		t.Fatalf("capacity %d x %d", blocks, bs)
	}
	// One block (immediate data) and 192 KiB, beyond FirstBurstLength, so
	// R2T-solicited Data-Out runs too.
	for _, n := range []int{512, 192 << 10} {
		buf := make([]byte, n)
		for i := range buf {
			buf[i] = byte(i*7 + n)
		}
		if err := s.Write10(ctxT(t, time.Second), 100, buf, bs, true); err != nil {
			t.Fatalf("write %d: %v", n, err)
		}
		got, err := s.Read10(ctxT(t, time.Second), 100, uint16(n/512), bs)
		if err != nil {
			t.Fatalf("read %d: %v", n, err)
		}
		if !bytes.Equal(got, buf) {
			t.Fatalf("read back %d bytes differ", n)
		}
	}
	// Beyond the end: a CHECK CONDITION, and the session stays usable.
	_, err = s.Read10(ctxT(t, time.Second), uint32(blocks), 1, bs)
	var ce *CheckError
	if !errors.As(err, &ce) || ce.Key != 0x5 || ce.ASC != 0x21 {
		t.Fatalf("read past end: %v", err)
	}
	if err := s.TestUnitReady(ctxT(t, time.Second)); err != nil {
		t.Fatalf("session unusable after CHECK CONDITION: %v", err)
	}
	if err := s.Logout(ctxT(t, time.Second)); err != nil {
		t.Fatal(err)
	}
}

func TestLoginCHAPAndRefusals(t *testing.T) {
	addr := startTarget(t, &target.CHAP{User: "probe", Secret: "sixteen-char-sec"})
	s, err := Login(ctxT(t, time.Second), Config{Portal: addr, Target: testIQN, CHAPUser: "probe", CHAPSecret: "sixteen-char-sec"})
	if err != nil {
		t.Fatalf("CHAP login: %v", err)
	}
	s.Close()
	_, err = Login(ctxT(t, time.Second), Config{Portal: addr, Target: testIQN, CHAPUser: "probe", CHAPSecret: "wrong-secret-xxxx"})
	var le *LoginError
	if !errors.As(err, &le) || le.Class != 2 {
		t.Fatalf("wrong secret: %v", err)
	}
	_, err = Login(ctxT(t, time.Second), Config{Portal: addr, Target: "iqn.2026-11.io.hasan:nope", CHAPUser: "probe", CHAPSecret: "sixteen-char-sec"})
	if !errors.As(err, &le) || le.Class != 2 {
		t.Fatalf("unknown target: %v", err)
	}
}

func TestLoginDeadline(t *testing.T) {
	// A listener that accepts and never answers: the login must give up at
	// its deadline, not hang.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	start := time.Now()
	_, err = Login(ctxT(t, 300*time.Millisecond), Config{Portal: ln.Addr().String(), Target: testIQN})
	if err == nil {
		t.Fatal("login to a silent portal succeeded")
	}
	if d := time.Since(start); d < 250*time.Millisecond || d > time.Second {
		t.Fatalf("gave up after %v, deadline 300ms", d)
	}
}
