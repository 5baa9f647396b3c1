package replication

// Fault-injection kit: a TCP proxy that can pause (partition) and delay
// traffic, a Membership served over HTTP so a primary in another process
// asks the test's MemMembership like it would ask Raft, a child-process
// mode of the test binary (primary or replica role), and a versioned block
// workload whose every acknowledgement is logged so a checker can prove
// where each acknowledged write must be.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// ---------------------------------------------------------------- proxy

// faultProxy forwards TCP connections to a target. Paused, it stops
// forwarding in both directions without closing anything, exactly like a
// network partition: bytes (and closes) wait in buffers and arrive, in
// order, when it resumes. Latency delays every chunk by a fixed one-way
// time.
type faultProxy struct {
	ln     net.Listener
	target string

	mu      sync.Mutex
	cond    *sync.Cond
	paused  bool
	latency time.Duration
	closed  bool
	conns   map[net.Conn]struct{}
	wg      sync.WaitGroup
}

func newFaultProxy(t testing.TB, target string) *faultProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &faultProxy{ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	p.cond = sync.NewCond(&p.mu)
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.Close)
	return p
}

func (p *faultProxy) Addr() string { return p.ln.Addr().String() }

// Pause partitions the link; Resume heals it.
func (p *faultProxy) Pause() { p.mu.Lock(); p.paused = true; p.mu.Unlock() }
func (p *faultProxy) Resume() {
	p.mu.Lock()
	p.paused = false
	p.cond.Broadcast()
	p.mu.Unlock()
}

// SetLatency sets the one-way delay added to every chunk.
func (p *faultProxy) SetLatency(d time.Duration) { p.mu.Lock(); p.latency = d; p.mu.Unlock() }

func (p *faultProxy) Close() {
	p.mu.Lock()
	p.closed, p.paused = true, false
	p.cond.Broadcast()
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.ln.Close()
	p.wg.Wait()
}

// gate waits while the link is partitioned and returns the latency.
func (p *faultProxy) gate() (time.Duration, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.paused && !p.closed {
		p.cond.Wait()
	}
	return p.latency, !p.closed
}

func (p *faultProxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		c.Close()
		return false
	}
	p.conns[c] = struct{}{}
	return true
}

func (p *faultProxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		if !p.track(c) {
			return
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			// A connection made during a partition is not forwarded
			// until it heals: the client's handshake just hangs.
			if _, ok := p.gate(); !ok {
				return
			}
			up, err := net.Dial("tcp", p.target)
			if err != nil {
				c.Close()
				return
			}
			if !p.track(up) {
				c.Close()
				return
			}
			p.wg.Add(2)
			go p.pump(c, up)
			go p.pump(up, c)
		}()
	}
}

type chunk struct {
	at   time.Time
	data []byte // nil: the source closed
}

func (p *faultProxy) pump(src, dst net.Conn) {
	defer p.wg.Done()
	q := make(chan chunk, 256)
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for ch := range q {
			lat, ok := p.gate()
			if !ok {
				dst.Close()
				continue
			}
			if d := time.Until(ch.at.Add(lat)); d > 0 {
				time.Sleep(d)
			}
			if ch.data == nil {
				dst.Close()
				src.Close()
				continue
			}
			if _, err := dst.Write(ch.data); err != nil {
				src.Close()
			}
		}
	}()
	defer close(q)
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			q <- chunk{at: time.Now(), data: bytes.Clone(buf[:n])}
		}
		if err != nil {
			q <- chunk{at: time.Now()}
			return
		}
	}
}

// ------------------------------------------------------ remote membership

// membershipServer serves a MemMembership over HTTP, as Raft would serve
// the cluster's state to a primary in another process.
type membershipServer struct {
	mem *MemMembership
	srv *http.Server
	url string
}

type memReq struct {
	Op      string  `json:"op"`
	Volume  string  `json:"volume"`
	Epoch   uint64  `json:"epoch"`
	Primary string  `json:"primary"`
	Replica string  `json:"replica"`
	Proof   CatchUp `json:"proof"`
}

type memResp struct {
	State MembershipState `json:"state"`
	Err   string          `json:"err,omitempty"`
	Kind  string          `json:"kind,omitempty"`
}

var memSentinels = map[string]error{"stale": ErrStaleEpoch, "notprimary": ErrNotPrimary,
	"notcaughtup": ErrNotCaughtUp, "notinisr": ErrNotInISR, "unknown": ErrUnknownVolume}

func serveMembership(t testing.TB, mem *MemMembership) *membershipServer {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ms := &membershipServer{mem: mem, url: "http://" + ln.Addr().String() + "/m"}
	ms.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var q memReq
		var err error // per request: handlers run concurrently
		if err = json.NewDecoder(r.Body).Decode(&q); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		var st MembershipState
		switch q.Op {
		case "state":
			st, err = mem.State(r.Context(), q.Volume)
		case "remove":
			st, err = mem.RemoveFromISR(r.Context(), q.Volume, q.Epoch, q.Primary, q.Replica)
		case "add":
			st, err = mem.AddToISR(r.Context(), q.Volume, q.Epoch, q.Primary, q.Replica, q.Proof)
		default:
			err = fmt.Errorf("bad op %q", q.Op)
		}
		resp := memResp{State: st}
		if err != nil {
			resp.Err = err.Error()
			for k, s := range memSentinels {
				if errors.Is(err, s) {
					resp.Kind = k
				}
			}
		}
		json.NewEncoder(w).Encode(resp)
	})}
	go ms.srv.Serve(ln)
	t.Cleanup(func() { ms.srv.Close() })
	return ms
}

// httpMembership is the client side of membershipServer.
type httpMembership struct{ url string }

func (h httpMembership) call(ctx context.Context, q memReq) (MembershipState, error) {
	body, _ := json.Marshal(q)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.url, bytes.NewReader(body))
	if err != nil {
		return MembershipState{}, err
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return MembershipState{}, fmt.Errorf("membership: %w", err)
	}
	defer res.Body.Close()
	var r memResp
	if err := json.NewDecoder(res.Body).Decode(&r); err != nil {
		return MembershipState{}, fmt.Errorf("membership: %w", err)
	}
	if r.Err != "" {
		if s := memSentinels[r.Kind]; s != nil {
			return r.State, fmt.Errorf("%w (remote: %s)", s, r.Err)
		}
		return r.State, errors.New(r.Err)
	}
	return r.State, nil
}

func (h httpMembership) State(ctx context.Context, v string) (MembershipState, error) {
	return h.call(ctx, memReq{Op: "state", Volume: v})
}

func (h httpMembership) RemoveFromISR(ctx context.Context, v string, e uint64, p, r string) (MembershipState, error) {
	return h.call(ctx, memReq{Op: "remove", Volume: v, Epoch: e, Primary: p, Replica: r})
}

func (h httpMembership) AddToISR(ctx context.Context, v string, e uint64, p, r string, proof CatchUp) (MembershipState, error) {
	return h.call(ctx, memReq{Op: "add", Volume: v, Epoch: e, Primary: p, Replica: r, Proof: proof})
}

// ------------------------------------------------------------- workload

// blockSize is the unit of the fault workload. Every block carries a header
// (magic, block number, version, origin) and a body derived from them, so
// the checker can tell exactly which write a replica holds, and a torn or
// foreign block is detected.
const blockSize = 4096

var blockMagic = [8]byte{'H', 'A', 'S', 'A', 'N', 'B', 'L', 'K'}

func makeBlock(blk int, ver, origin uint64) []byte {
	b := make([]byte, blockSize)
	copy(b, blockMagic[:])
	binary.BigEndian.PutUint64(b[8:], uint64(blk))
	binary.BigEndian.PutUint64(b[16:], ver)
	binary.BigEndian.PutUint64(b[24:], origin)
	seed := sha256.Sum256(b[:32])
	for i := 32; i < blockSize; i += 32 {
		copy(b[i:], seed[:])
		seed[0]++
	}
	return b
}

// decodeBlock returns the version a block holds (0 for never written) or an
// error for anything that is not exactly a block the workload wrote.
func decodeBlock(b []byte, blk int) (ver, origin uint64, err error) {
	if allZero(b) {
		return 0, 0, nil
	}
	ver, origin = binary.BigEndian.Uint64(b[16:]), binary.BigEndian.Uint64(b[24:])
	if !bytes.Equal(b, makeBlock(blk, ver, origin)) {
		return 0, 0, fmt.Errorf("block %d is not a workload block (torn or foreign data)", blk)
	}
	return ver, origin, nil
}

// workload writes versioned blocks. Writer w owns the blocks b with
// b%writers == w and has one write outstanding, so each block's versions are
// written strictly in order; all writers together keep many writes in
// flight. Blocks are spread over the volume (stride bytes apart).
type workload struct {
	vol interface {
		WriteAt(context.Context, []byte, int64, bool) error
	}
	blocks int
	// limit, if set, confines writes to blocks [0, limit).
	limit  int
	stride int64
	origin uint64
	// emit, if set, is called before a write is issued ('I') and after it
	// completes ('A' or 'E'); the child process prints these.
	emit func(kind byte, blk int, ver uint64, err error)

	mu     sync.Mutex
	issued []uint64 // highest version issued per block
	acked  []uint64 // highest version acknowledged per block
	errs   []error
	acks   atomic.Int64
	maxLat atomic.Int64
	lats   []time.Duration
}

func newWorkload(vol interface {
	WriteAt(context.Context, []byte, int64, bool) error
}, blocks int, stride int64, origin uint64) *workload {
	return &workload{vol: vol, blocks: blocks, stride: stride, origin: origin,
		issued: make([]uint64, blocks), acked: make([]uint64, blocks)}
}

// run starts writers until ctx ends (or, with stopOnErr, a write fails);
// the returned function waits for them.
func (w *workload) run(ctx context.Context, writers int, seed uint64, stopOnErr bool) (wait func()) {
	var wg sync.WaitGroup
	for i := 0; i < writers; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(i)))
			limit := w.blocks
			if w.limit > 0 {
				limit = w.limit
			}
			own := (limit - i + writers - 1) / writers
			for ctx.Err() == nil {
				blk := i + writers*rng.IntN(own)
				w.mu.Lock()
				w.issued[blk]++
				ver := w.issued[blk]
				w.mu.Unlock()
				if w.emit != nil {
					w.emit('I', blk, ver, nil)
				}
				start := time.Now()
				err := w.vol.WriteAt(context.Background(), makeBlock(blk, ver, w.origin), int64(blk)*w.stride, rng.IntN(8) == 0)
				lat := time.Since(start)
				if w.emit != nil {
					w.emit(map[bool]byte{true: 'E', false: 'A'}[err != nil], blk, ver, err)
				}
				w.mu.Lock()
				if err != nil {
					w.errs = append(w.errs, fmt.Errorf("block %d v%d: %w", blk, ver, err))
				} else {
					w.acked[blk] = ver
					w.lats = append(w.lats, lat)
				}
				w.mu.Unlock()
				if err != nil {
					if stopOnErr {
						return
					}
					continue
				}
				w.acks.Add(1)
				if int64(lat) > w.maxLat.Load() {
					w.maxLat.Store(int64(lat))
				}
			}
		}(i)
	}
	return wg.Wait
}

func (w *workload) snapshot() (issued, acked []uint64, errs []error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]uint64(nil), w.issued...), append([]uint64(nil), w.acked...), append([]error(nil), w.errs...)
}

// waitAcks waits until at least n more writes were acknowledged.
func (w *workload) waitAcks(t testing.TB, n int64, within time.Duration) {
	t.Helper()
	target := w.acks.Load() + n
	deadline := time.Now().Add(within)
	for w.acks.Load() < target {
		if time.Now().After(deadline) {
			_, _, errs := w.snapshot()
			t.Fatalf("only %d of %d acknowledgements within %s (errors: %v)", w.acks.Load(), target, within, errs)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// checkBlocks is the checker: every block of img must hold a version in
// [lo, hi]. lo is the last acknowledged version (an acknowledged write is
// never lost); hi is the last version that may legitimately have landed (a
// write issued but not acknowledged may or may not be there; anything
// newer, e.g. a zombie's write, must not).
func checkBlocks(t testing.TB, who string, img []byte, stride int64, lo, hi []uint64) {
	t.Helper()
	bad := 0
	for blk := range lo {
		off := int64(blk) * stride
		if off+blockSize > int64(len(img)) {
			t.Fatalf("%s: image too short (%d bytes) for block %d", who, len(img), blk)
		}
		ver, _, err := decodeBlock(img[off:off+blockSize], blk)
		switch {
		case err != nil:
			t.Errorf("%s: %v", who, err)
		case ver < lo[blk]:
			t.Errorf("%s: block %d holds v%d but v%d was acknowledged: acknowledged write lost", who, blk, ver, lo[blk])
		case ver > hi[blk]:
			t.Errorf("%s: block %d holds v%d, newer than any write allowed to land (max v%d)", who, blk, ver, hi[blk])
		default:
			continue
		}
		if bad++; bad > 10 {
			t.Fatalf("%s: too many bad blocks", who)
		}
	}
}

func readImage(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// ------------------------------------------------------- PKI on disk

func writePEM(t testing.TB, dir string, pki *testPKI, nodes ...string) {
	t.Helper()
	os.MkdirAll(dir, 0o700)
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: pki.caCert.Raw})
	if err := os.WriteFile(filepath.Join(dir, "ca.pem"), ca, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		c := pki.cert(t, n)
		crt := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Certificate[0]})
		der, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
		if err != nil {
			t.Fatal(err)
		}
		key := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
		os.WriteFile(filepath.Join(dir, n+".pem"), crt, 0o600)
		os.WriteFile(filepath.Join(dir, n+".key"), key, 0o600)
	}
}

func loadTLS(dir, node string, server bool) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, node+".pem"), filepath.Join(dir, node+".key"))
	if err != nil {
		return nil, err
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca.pem"))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	if server {
		return &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS13}, nil
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS13}, nil
}

// ------------------------------------------------------- child process

const childEnv = "HASAN_REPL_FAULT_CHILD"

// childConfig tells a re-executed test binary which role to play.
type childConfig struct {
	Role       string            `json:"role"` // primary or replica
	Self       string            `json:"self"`
	Dir        string            `json:"dir"`
	Volume     string            `json:"volume"`
	Size       int64             `json:"size"`
	RegionSize int64             `json:"region_size"`
	Gen        uint64            `json:"gen"`
	CertDir    string            `json:"cert_dir"`
	Listen     string            `json:"listen"`
	Peers      map[string]string `json:"peers"`
	Membership string            `json:"membership"`
	Writers    int               `json:"writers"`
	Blocks     int               `json:"blocks"`
	Stride     int64             `json:"stride"`
	ALSlots    int               `json:"al_slots"`
	AckTicks   int               `json:"ack_ticks"`
}

func TestMain(m *testing.M) {
	if cfg := os.Getenv(childEnv); cfg != "" {
		if err := runChild(cfg); err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			os.Exit(2)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runChild plays one node in its own process, so the test can SIGKILL or
// SIGSTOP it like a real node.
func runChild(raw string) error {
	var cfg childConfig
	if err := json.Unmarshal([]byte(raw), &cfg); err != nil {
		return err
	}
	l, err := OpenLocal(LocalOptions{Dir: cfg.Dir, Volume: cfg.Volume, Size: cfg.Size, RegionSize: cfg.RegionSize, Gen: cfg.Gen})
	if err != nil {
		return err
	}
	var outMu sync.Mutex
	say := func(format string, a ...any) {
		outMu.Lock()
		defer outMu.Unlock()
		// One write per line: the parent sees each line as soon as it is
		// printed, so nothing acknowledged is lost in a buffer on SIGKILL.
		os.Stdout.WriteString(fmt.Sprintf(format, a...) + "\n")
	}
	switch cfg.Role {
	case "replica":
		tc, err := loadTLS(cfg.CertDir, cfg.Self, true)
		if err != nil {
			return err
		}
		srv, err := NewServer(ServerConfig{TLS: tc})
		if err != nil {
			return err
		}
		if err := srv.AddVolume(l); err != nil {
			return err
		}
		ln, err := listenRetry(cfg.Listen)
		if err != nil {
			return err
		}
		say("READY %s", ln.Addr())
		return srv.Serve(ln)
	case "primary":
		tc, err := loadTLS(cfg.CertDir, cfg.Self, false)
		if err != nil {
			return err
		}
		vol, err := OpenVolume(context.Background(), VolumeConfig{Self: cfg.Self, Peers: cfg.Peers, Local: l,
			Membership: httpMembership{url: cfg.Membership}, TLS: tc, TickInterval: 20 * time.Millisecond,
			AckTimeoutTicks: cfg.AckTicks, ALSlots: cfg.ALSlots})
		if err != nil {
			return err
		}
		// Wait until every peer is connected and in sync before writing.
		for {
			ps, err := vol.Status(context.Background())
			if err != nil {
				return err
			}
			ok := true
			for _, p := range ps {
				ok = ok && p.Mode == "up" && p.InISR && p.DirtyBytes == 0
			}
			if ok {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		w := newWorkload(vol, cfg.Blocks, cfg.Stride, 1)
		w.emit = func(kind byte, blk int, ver uint64, err error) {
			if err != nil {
				say("%c %d %d %s", kind, blk, ver, strings.ReplaceAll(err.Error(), "\n", " "))
			} else {
				say("%c %d %d", kind, blk, ver)
			}
		}
		say("READY")
		w.run(context.Background(), cfg.Writers, 1, true)()
		say("DONE")
		select {} // stay alive (a zombie) until the test kills this process
	}
	return fmt.Errorf("unknown role %q", cfg.Role)
}

// child is a running child process and what it printed.
type child struct {
	t     testing.TB
	cmd   *exec.Cmd
	lines chan string
	exit  chan error
	mu    sync.Mutex
	all   []string
}

func startChild(t testing.TB, cfg childConfig) *child {
	t.Helper()
	raw, _ := json.Marshal(cfg)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+string(raw))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &child{t: t, cmd: cmd, lines: make(chan string, 1<<20), exit: make(chan error, 1)}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
		close(c.lines)
		c.exit <- cmd.Wait()
	}()
	t.Cleanup(func() { c.signal(syscall.SIGKILL); c.signal(syscall.SIGCONT) })
	return c
}

func (c *child) signal(s syscall.Signal) { c.cmd.Process.Signal(s) }

// next returns the next line, waiting up to d; ok is false on timeout or
// when the child's output ended.
func (c *child) next(d time.Duration) (string, bool) {
	select {
	case l, ok := <-c.lines:
		if ok {
			c.mu.Lock()
			c.all = append(c.all, l)
			c.mu.Unlock()
		}
		return l, ok
	case <-time.After(d):
		return "", false
	}
}

func (c *child) waitFor(prefix string, d time.Duration) string {
	c.t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if l, ok := c.next(time.Until(deadline)); ok && strings.HasPrefix(l, prefix) {
			return l
		} else if !ok && time.Now().Before(deadline) {
			break
		}
	}
	c.t.Fatalf("child did not print %q within %s", prefix, d)
	return ""
}

// kill SIGKILLs the child and waits for it to exit.
func (c *child) kill() {
	c.signal(syscall.SIGKILL)
	for {
		if _, ok := c.next(10 * time.Second); !ok {
			break
		}
	}
	select {
	case <-c.exit:
	case <-time.After(10 * time.Second):
		c.t.Fatal("child did not exit after SIGKILL")
	}
}

// ackLog replays a primary child's I/A/E lines.
type ackLog struct {
	issued, acked []uint64
	acks, errs    int
	errLines      []string
}

func newAckLog(blocks int) *ackLog {
	return &ackLog{issued: make([]uint64, blocks), acked: make([]uint64, blocks)}
}

func (a *ackLog) apply(t testing.TB, line string) {
	var kind byte
	var blk int
	var ver uint64
	if n, _ := fmt.Sscanf(line, "%c %d %d", &kind, &blk, &ver); n != 3 {
		return
	}
	switch kind {
	case 'I':
		if ver != a.issued[blk]+1 {
			t.Fatalf("child log out of order: %q after v%d", line, a.issued[blk])
		}
		a.issued[blk] = ver
	case 'A':
		a.acked[blk] = max(a.acked[blk], ver)
		a.acks++
	case 'E':
		a.errs++
		a.errLines = append(a.errLines, line)
	}
}

func listenRetry(addr string) (net.Listener, error) {
	var err error
	for i := 0; i < 100; i++ { // a killed process's socket may linger briefly
		var ln net.Listener
		if ln, err = net.Listen("tcp", addr); err == nil {
			return ln, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil, err
}

func freeAddr(t testing.TB) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}
