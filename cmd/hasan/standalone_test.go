package main

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func quietLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

// syncBuffer lets the test read what the command writes from another goroutine.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestTargetRunRefusesTakenPort(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	err = runStandalone(context.Background(), standaloneOpts{
		Listen: []string{ln.Addr().String()},
		IQN:    "iqn.2026-11.io.hasan:porttaken",
		LUNs:   []string{"0=" + filepath.Join(t.TempDir(), "l0") + ",size=1M"},
	}, quietLogger(), &bytes.Buffer{})
	if err == nil || !strings.Contains(err.Error(), "already in use") {
		t.Fatalf("err = %v, want a clear 'already in use' error", err)
	}
}

func TestTargetRunRejectsBadFlags(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		o    standaloneOpts
		want string
	}{
		{standaloneOpts{IQN: "iqn.2026-11.io.hasan:x"}, "at least one LUN"},
		{standaloneOpts{IQN: "iqn.2026-11.io.hasan:x", LUNs: []string{"0=" + dir + "/a,size=1M", "0=" + dir + "/b,size=1M"}}, "given twice"},
		{standaloneOpts{IQN: "iqn.2026-11.io.hasan:x", LUNs: []string{"0=" + dir + "/a,size=1M"}, CHAP: "nouser"}, "USER:SECRET"},
		{standaloneOpts{IQN: "iqn.2026-11.io.hasan:x", LUNs: []string{"0=" + dir + "/a,size=1M"}, MutualCHAP: "t:secretsecret12"}, "needs --chap"},
		{standaloneOpts{IQN: "iqn.2026-11.io.hasan:x", LUNs: []string{"0=" + dir + "/missing"}}, "missing"},
		{standaloneOpts{IQN: "not an iqn", LUNs: []string{"0=" + dir + "/a,size=1M"}, Listen: []string{"127.0.0.1:0"}}, "not an iqn"},
	} {
		err := runStandalone(context.Background(), tc.o, quietLogger(), &bytes.Buffer{})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: err = %v, want it to mention %q", tc.o, err, tc.want)
		}
	}
}

// TestStandaloneServesRealInitiatorAndStops logs in with libiscsi's iscsi-inq
// (installed by `make test`) and then checks the target stops on cancel.
func TestStandaloneServesRealInitiatorAndStops(t *testing.T) {
	inq, err := exec.LookPath("iscsi-inq")
	if err != nil {
		t.Skip("iscsi-inq (libiscsi-bin) not installed; `make test` installs it")
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ready := make(chan string, 1)
	done := make(chan error, 1)
	iqn := "iqn.2026-11.io.hasan:cmdtest"
	go func() {
		done <- runStandalone(ctx, standaloneOpts{
			Listen: []string{"127.0.0.1:0"},
			IQN:    iqn,
			LUNs:   []string{"0=" + filepath.Join(t.TempDir(), "l0") + ",size=8M,thin"},
			CHAP:   "alice:secretsecret12",
			Ready:  func(a []net.Addr) { ready <- a[0].String() },
		}, quietLogger(), &bytes.Buffer{})
	}()
	var addr string
	select {
	case addr = <-ready:
	case err := <-done:
		t.Fatalf("target did not start: %v", err)
	}
	out, err := exec.Command(inq, "-e", "1", "-c", "128", "iscsi://alice%secretsecret12@"+addr+"/"+iqn+"/0").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Unit Serial Number") {
		t.Fatalf("iscsi-inq with the right CHAP secret: %v\n%s", err, out)
	}
	out, err = exec.Command(inq, "iscsi://alice%wrongsecret1@"+addr+"/"+iqn+"/0").CombinedOutput()
	if err == nil {
		t.Fatalf("login with a wrong CHAP secret succeeded:\n%s", out)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("stop: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("target did not stop within 10 s of cancel")
	}
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Fatal("portal still accepts connections after stop")
	}
}

func TestDemoPrintsHowToConnect(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var out syncBuffer
	cmd := newRootCmd()
	cmd.SetOut(&out)
	cmd.SetErr(&bytes.Buffer{})
	cmd.SetArgs([]string{"demo", "--dir", t.TempDir(), "--port", "39260", "--log-level", "error"})
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(out.String(), "Ctrl-C") {
		if time.Now().After(deadline) {
			t.Fatalf("demo printed no instructions; got:\n%s", out.String())
		}
		select {
		case err := <-done:
			t.Fatalf("demo exited early: %v\n%s", err, out.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
	text := out.String()
	for _, want := range []string{demoIQN, "iscsiadm -m discovery -t sendtargets -p 127.0.0.1:", "iscsi-ls -s iscsi://127.0.0.1:"} {
		if !strings.Contains(text, want) {
			t.Errorf("demo output lacks %q:\n%s", want, text)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("demo stop: %v", err)
	}
}
