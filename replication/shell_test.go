package replication

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// testPKI is a real CA with per-node certificates, as the caller of this
// package would supply.
type testPKI struct {
	pool   *x509.CertPool
	caCert *x509.Certificate
	caKey  *ecdsa.PrivateKey
}

func newPKI(t testing.TB) *testPKI {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "hasan test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return &testPKI{pool: pool, caCert: ca, caKey: key}
}

func (p *testPKI) cert(t testing.TB, node string) tls.Certificate {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: node}, DNSNames: []string{node},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.caCert, &key.PublicKey, p.caKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func (p *testPKI) server(t testing.TB, node string) *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{p.cert(t, node)}, ClientCAs: p.pool, ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS13}
}

func (p *testPKI) client(t testing.TB, node string) *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{p.cert(t, node)}, RootCAs: p.pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS13}
}

type testNode struct {
	name string
	dir  string
	srv  *Server
	addr string
	ln   net.Listener
	done chan error
}

type cluster struct {
	t      *testing.T
	pki    *testPKI
	mem    *MemMembership
	vol    string
	size   int64
	rs     int64
	nodes  map[string]*testNode
	prim   *Volume
	pname  string
	unhlth chan error
	rate   int64
	plain  bool // plaintext connections (the protocol-benchmark mode)
}

func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("REPL_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

func newCluster(t *testing.T, names ...string) *cluster {
	return newClusterSized(t, 8<<20, 256<<10, names...)
}

func newClusterSized(t *testing.T, size, rs int64, names ...string) *cluster {
	c := &cluster{t: t, pki: newPKI(t), mem: NewMemMembership(), vol: "vol1", size: size, rs: rs,
		nodes: map[string]*testNode{}, unhlth: make(chan error, 4)}
	base := t.TempDir()
	for _, n := range names {
		c.nodes[n] = &testNode{name: n, dir: filepath.Join(base, n)}
	}
	c.mem.Create(c.vol, names[0], names[1:]...)
	for _, n := range names[1:] {
		c.startReplica(n, "")
	}
	c.openPrimary(names[0])
	t.Cleanup(c.close)
	return c
}

func (c *cluster) startReplica(name, addr string) {
	n := c.nodes[name]
	l, err := OpenLocal(LocalOptions{Dir: n.dir, Volume: c.vol, Size: c.size, RegionSize: c.rs, Gen: 7})
	if err != nil {
		c.t.Fatal(err)
	}
	scfg := ServerConfig{TLS: c.pki.server(c.t, name), Logger: testLogger(c.t).With("node", name)}
	if c.plain {
		scfg = ServerConfig{Plaintext: true, Logger: scfg.Logger}
	}
	srv, err := NewServer(scfg)
	if err != nil {
		c.t.Fatal(err)
	}
	if err := srv.AddVolume(l); err != nil {
		c.t.Fatal(err)
	}
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	var ln net.Listener
	for i := 0; i < 50; i++ { // the old socket may linger briefly after a kill
		if ln, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		c.t.Fatal(err)
	}
	n.srv, n.ln, n.addr, n.done = srv, ln, ln.Addr().String(), make(chan error, 1)
	go func() { n.done <- srv.Serve(ln) }()
}

func (c *cluster) killReplica(name string) {
	n := c.nodes[name]
	n.srv.Close()
	<-n.done
	n.srv = nil
}

func (c *cluster) openPrimary(name string) {
	n := c.nodes[name]
	l, err := OpenLocal(LocalOptions{Dir: n.dir, Volume: c.vol, Size: c.size, RegionSize: c.rs, Gen: 7})
	if err != nil {
		c.t.Fatal(err)
	}
	peers := map[string]string{}
	for other, on := range c.nodes {
		if other != name {
			peers[other] = on.addr
		}
	}
	vc := VolumeConfig{Self: name, Peers: peers, Local: l, Membership: c.mem,
		TLS: c.pki.client(c.t, name), TickInterval: 20 * time.Millisecond, AckTimeoutTicks: 250, ResyncRate: c.rate,
		OnUnhealthy: func(err error) { c.unhlth <- err }, Logger: testLogger(c.t).With("node", name)}
	if c.plain {
		vc.TLS, vc.Plaintext = nil, true
	}
	v, err := OpenVolume(context.Background(), vc)
	if err != nil {
		c.t.Fatal(err)
	}
	c.prim, c.pname = v, name
}

func (c *cluster) close() {
	if c.prim != nil {
		c.prim.Close()
		c.prim = nil
	}
	for _, n := range c.nodes {
		if n.srv != nil {
			n.srv.Close()
			<-n.done
			n.srv = nil
		}
	}
}

// waitISR waits until membership's ISR has want members and every peer the
// primary sees is in sync.
func (c *cluster) waitISR(want int) {
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		st, _ := c.mem.State(context.Background(), c.vol)
		ps, _ := c.prim.Status(context.Background())
		ok := len(st.ISR) == want
		for _, p := range ps {
			if p.InISR && (p.Mode != "up" || p.DirtyBytes > 0) {
				ok = false
			}
		}
		if ok {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	st, _ := c.mem.State(context.Background(), c.vol)
	ps, _ := c.prim.Status(context.Background())
	c.t.Fatalf("ISR did not reach %d members: %+v %+v", want, st, ps)
}

func fileBytes(t testing.TB, path string) []byte {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (c *cluster) img(name string) []byte {
	return fileBytes(c.t, filepath.Join(c.nodes[name].dir, c.vol+".img"))
}

func pattern(seed, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(seed*31 + i*7 + i/512)
	}
	return b
}

func TestVolumeReplicatesOverTLS(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	c.waitISR(2)
	ctx := context.Background()
	// Many writes in flight at once, including overlapping ones whose
	// order must be kept.
	var wg sync.WaitGroup
	for i := 0; i < 64; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			if err := c.prim.WriteAt(ctx, pattern(i, 64<<10), int64(i%32)*(128<<10), i%5 == 0); err != nil {
				t.Error(err)
			}
		}(i)
	}
	wg.Wait()
	if err := c.prim.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.prim.Unmap(ctx, 0, 64<<10); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 64<<10)
	if err := c.prim.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, make([]byte, 64<<10)) {
		t.Fatalf("read after unmap: %v", err)
	}
	if !bytes.Equal(c.img("n1"), c.img("n2")) {
		t.Fatal("replicas differ after acknowledged writes")
	}
	rep, err := c.prim.Verify(ctx, false)
	if err != nil || len(rep.Mismatch) != 0 || len(rep.Skipped) != 0 || rep.Regions != uint64(c.size/c.rs) {
		t.Fatalf("verify: %+v %v", rep, err)
	}
}

// TestVolumePlaintextVectoredPath covers the plaintext connection, whose
// writer batches messages into one writev with large payloads referenced
// rather than copied, and whose reader takes large payloads straight from
// the socket into pooled buffers: writes of every size class (small ones
// copied into the batch, large ones referenced, some larger than the pool),
// many in flight, then a resync of every region in 1 MiB chunks, must leave the replicas byte-identical.
func TestVolumePlaintextVectoredPath(t *testing.T) {
	c := &cluster{t: t, pki: newPKI(t), mem: NewMemMembership(), vol: "vol1", size: 16 << 20, rs: 1 << 20,
		nodes: map[string]*testNode{}, unhlth: make(chan error, 4), plain: true}
	base := t.TempDir()
	for _, n := range []string{"n1", "n2"} {
		c.nodes[n] = &testNode{name: n, dir: filepath.Join(base, n)}
	}
	c.mem.Create(c.vol, "n1", "n2")
	c.startReplica("n2", "")
	c.openPrimary("n1")
	t.Cleanup(c.close)
	c.waitISR(2)
	ctx := context.Background()
	sizes := []int{512, 4096, 12 << 10, 16 << 10, 100 << 10, 128 << 10, 1 << 20, 5 << 20}
	var wg sync.WaitGroup
	for i := 0; i < 96; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			n := sizes[i%len(sizes)]
			off := (int64(i) * 777 << 10) % (c.size - int64(n)) &^ 511
			if err := c.prim.WriteAt(ctx, pattern(i, n), off, i%7 == 0); err != nil {
				t.Error(err)
			}
		}(i)
	}
	wg.Wait()
	if err := c.prim.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	// A framing error would drop the connection and resync would hide it:
	// the replica must have stayed up and in the ISR throughout.
	if ps, _ := c.prim.Status(ctx); ps[0].LastError != "" || !ps[0].InISR {
		t.Fatalf("replica left during plaintext writes: %+v", ps[0])
	}
	if !bytes.Equal(c.img("n1"), c.img("n2")) {
		t.Fatal("replicas differ after acknowledged plaintext writes")
	}
	// The replica misses a rewrite of every region: its resync copies
	// them all in 1 MiB chunks.
	c.killReplica("n2")
	for off := int64(0); off < c.size; off += 1 << 20 {
		if err := c.prim.WriteAt(ctx, pattern(int(off>>20)+500, 1<<20), off, false); err != nil {
			t.Fatal(err)
		}
	}
	c.startReplica("n2", c.nodes["n2"].addr)
	c.waitISR(2)
	if !bytes.Equal(c.img("n1"), c.img("n2")) {
		t.Fatal("replicas differ after a plaintext resync of every region")
	}
}

func TestVolumeRefusesUntrustedPeer(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	c.waitISR(2)
	// A client with a certificate from another CA is refused by the replica.
	other := newPKI(t)
	cfg := other.client(t, "mallory")
	cfg.RootCAs = c.pki.pool
	conn, err := tls.Dial("tcp", c.nodes["n2"].addr, cfg)
	if err == nil {
		conn.SetDeadline(time.Now().Add(2 * time.Second))
		_, err = conn.Read(make([]byte, 1))
		conn.Close()
	}
	if err == nil {
		t.Fatal("replica accepted a client certificate from an unknown CA")
	}
}

func TestReplicaOutResyncRejoinVerify(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	c.waitISR(2)
	ctx := context.Background()
	for i := 0; i < 8; i++ {
		if err := c.prim.WriteAt(ctx, pattern(i, 4096), int64(i)*(1<<20), false); err != nil {
			t.Fatal(err)
		}
	}
	// Kill the replica while writes are in flight: writes must wait for the
	// removal to commit, then succeed with n2 out of the ISR.
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for i := 0; i < 40; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			errs <- c.prim.WriteAt(ctx, pattern(100+i, 8192), int64(i)*(160<<10), false)
		}(i)
		if i == 10 {
			c.killReplica("n2")
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("write failed while replica was out: %v", err)
		}
	}
	st, _ := c.mem.State(ctx, c.vol)
	if st.InISR("n2") {
		t.Fatalf("n2 still in ISR after being killed: %+v", st)
	}
	ps, _ := c.prim.Status(ctx)
	if ps[0].DirtyBytes == 0 || ps[0].DirtyBytes >= c.size {
		t.Fatalf("expected partial dirty tracking, got %+v", ps[0])
	}
	// Bring it back on the same address: incremental resync, then rejoin.
	c.startReplica("n2", c.nodes["n2"].addr)
	c.waitISR(2)
	ps, _ = c.prim.Status(ctx)
	if ps[0].ResyncTotal >= c.size {
		t.Fatalf("resync was not incremental: %+v", ps[0])
	}
	if !bytes.Equal(c.img("n1"), c.img("n2")) {
		t.Fatal("replicas differ after resync")
	}
	rep, err := c.prim.Verify(ctx, false)
	if err != nil || len(rep.Mismatch) != 0 {
		t.Fatalf("verify after resync: %+v %v", rep, err)
	}
	// A deliberate divergence behind the protocol's back is found, then
	// repaired from the primary.
	f, _ := os.OpenFile(filepath.Join(c.nodes["n2"].dir, c.vol+".img"), os.O_RDWR, 0)
	f.WriteAt([]byte("divergence"), 3<<20+17)
	f.Close()
	rep, err = c.prim.Verify(ctx, true)
	if err != nil || len(rep.Mismatch) != 1 || rep.Mismatch[uint64((3<<20)/c.rs)] == nil {
		t.Fatalf("verify did not find the divergence: %+v %v", rep, err)
	}
	c.waitISR(2)
	rep, err = c.prim.Verify(ctx, false)
	if err != nil || len(rep.Mismatch) != 0 {
		t.Fatalf("verify after repair: %+v %v", rep, err)
	}
	if !bytes.Equal(c.img("n1"), c.img("n2")) {
		t.Fatal("replicas differ after repair")
	}
}

func TestFullSyncForUnknownReplicaThrottled(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	c.waitISR(2)
	ctx := context.Background()
	if err := c.prim.WriteAt(ctx, pattern(1, 1<<20), 2<<20, false); err != nil {
		t.Fatal(err)
	}
	// Reopen the primary with a resync limit of 8 MiB/s.
	c.prim.Close()
	c.rate = 8 << 20
	c.openPrimary("n1")
	c.waitISR(2)
	// Replace n2's disk with an empty one: unknown generation → full sync.
	c.killReplica("n2")
	os.RemoveAll(c.nodes["n2"].dir)
	n := c.nodes["n2"]
	l, err := OpenLocal(LocalOptions{Dir: n.dir, Volume: c.vol, Size: c.size, RegionSize: c.rs, Gen: 0})
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	c.startReplica("n2", n.addr)
	start := time.Now()
	var maxTotal int64
	var sawRate, sawETA bool
	for time.Since(start) < 20*time.Second {
		ps, _ := c.prim.Status(ctx)
		maxTotal = max(maxTotal, ps[0].ResyncTotal)
		sawRate = sawRate || ps[0].RateBytes > 0
		sawETA = sawETA || ps[0].ETA > 0
		if ps[0].InISR && ps[0].Mode == "up" && ps[0].DirtyBytes == 0 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	took := time.Since(start)
	c.waitISR(2)
	if maxTotal != c.size {
		t.Fatalf("expected a full sync of %d bytes, saw total %d", c.size, maxTotal)
	}
	if took < 700*time.Millisecond {
		t.Fatalf("8 MiB at 8 MiB/s took only %v: not throttled", took)
	}
	if !sawRate || !sawETA {
		t.Fatalf("progress lacked rate (%v) or ETA (%v)", sawRate, sawETA)
	}
	if !bytes.Equal(c.img("n1"), c.img("n2")) {
		t.Fatal("replicas differ after full sync")
	}
}

func writeFile(p string, b []byte) error { return os.WriteFile(p, b, 0o600) }

// TestWriteAtCancelledContextKeepsBuffer: a write whose context is already
// done is still posted to the primary, which issues it (and refers to the
// caller's buffer) later. WriteAt must not return, and let the caller
// reuse the buffer, before that: it once did, which corrupted the written
// data and panicked on a second release of the buffer's hold (libiscsi's
// conformance run against a replicated LUN, where aborted commands cancel
// their context).
func TestWriteAtCancelledContextKeepsBuffer(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	c.waitISR(2)
	done, cancel := context.WithCancel(context.Background())
	cancel()
	const n, bs = 64, 4096
	for i := 0; i < n; i++ {
		buf := bytes.Repeat([]byte{byte(i + 1)}, bs)
		err := c.prim.WriteAt(done, buf, int64(i)*bs, false)
		if !errors.Is(err, context.Canceled) && err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
		// The caller owns buf again: scribble over it.
		for j := range buf {
			buf[j] = 0xEE
		}
	}
	if err := c.prim.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, bs)
	for i := 0; i < n; i++ {
		if err := c.prim.ReadAt(context.Background(), got, int64(i)*bs); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, bytes.Repeat([]byte{byte(i + 1)}, bs)) {
			t.Fatalf("block %d holds %#x..., want %#x: the buffer was reused while the write still referred to it", i, got[0], i+1)
		}
	}
}
