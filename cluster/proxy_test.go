package cluster

import (
	"net"
	"sync"
	"testing"
)

// holeProxy forwards TCP connections to a backend until Blackhole: from
// then on the connections open at that moment silently swallow what either
// side sends (the sender's kernel still acknowledges it, as when the peer
// lost power and nothing answers, but no RST arrives either), while new
// connections are forwarded as before (the peer came back).
type holeProxy struct {
	ln      net.Listener
	backend string

	mu    sync.Mutex
	links []*holeLink
	down  bool // PowerOff: new connections swallow everything too
	wg    sync.WaitGroup
}

type holeLink struct {
	mu   sync.Mutex
	dead bool
	a, b net.Conn
}

func (l *holeLink) isDead() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.dead
}

func newHoleProxy(t *testing.T, backend string) *holeProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &holeProxy{ln: ln, backend: backend}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			a, err := ln.Accept()
			if err != nil {
				return
			}
			b, err := net.Dial("tcp", backend)
			if err != nil {
				a.Close()
				continue
			}
			l := &holeLink{a: a, b: b}
			p.mu.Lock()
			l.dead = p.down
			p.links = append(p.links, l)
			p.mu.Unlock()
			p.wg.Add(2)
			go func() { defer p.wg.Done(); l.pipe(b, a) }()
			go func() { defer p.wg.Done(); l.pipe(a, b) }()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		p.mu.Lock()
		for _, l := range p.links {
			l.a.Close()
			l.b.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

func (p *holeProxy) Addr() string { return p.ln.Addr().String() }

// Blackhole makes every connection open now swallow all traffic.
func (p *holeProxy) Blackhole() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, l := range p.links {
		l.mu.Lock()
		l.dead = true
		l.mu.Unlock()
	}
}

// PowerOff is Blackhole for the connections to come as well: the peer is
// gone (the proxy still accepts, as a host whose SYNs vanish never fails a
// dial quickly either).
func (p *holeProxy) PowerOff() {
	p.mu.Lock()
	p.down = true
	p.mu.Unlock()
	p.Blackhole()
}

func (l *holeLink) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		k, err := src.Read(buf)
		if k > 0 && !l.isDead() {
			if _, werr := dst.Write(buf[:k]); werr != nil {
				return
			}
		}
		if err != nil {
			if !l.isDead() {
				dst.Close()
			}
			return
		}
	}
}
