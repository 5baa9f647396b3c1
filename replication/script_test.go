package replication

import (
	"bufio"
	"context"
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
)

var rewrite = flag.Bool("rewrite", false, "rewrite testdata/*.txt with the actual output")

// A script is a sequence of blocks:
//
//	command arg=value flag
//	----
//	expected output
//	(blank line)
type block struct {
	comment  string // the comment lines before the command, kept by -rewrite
	cmd      string
	expected string
	line     int
}

func parseScript(t *testing.T, path string) []block {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []block
	sc := bufio.NewScanner(f)
	ln := 0
	var cur *block
	inOut := false
	comment := ""
	for sc.Scan() {
		ln++
		l := sc.Text()
		switch {
		case cur == nil:
			if strings.HasPrefix(l, "#") {
				comment += l + "\n"
				continue
			}
			if strings.TrimSpace(l) == "" {
				continue
			}
			cur = &block{comment: comment, cmd: l, line: ln}
			comment = ""
		case !inOut:
			if l != "----" {
				t.Fatalf("%s:%d: want ---- after command", path, ln)
			}
			inOut = true
		default:
			if l == "" {
				out = append(out, *cur)
				cur, inOut = nil, false
				continue
			}
			cur.expected += l + "\n"
		}
	}
	if cur != nil {
		out = append(out, *cur)
	}
	return out
}

func TestScripts(t *testing.T) {
	files, _ := filepath.Glob("testdata/*.txt")
	if len(files) == 0 {
		t.Fatal("no scripts")
	}
	for _, path := range files {
		t.Run(filepath.Base(path), func(t *testing.T) {
			blocks := parseScript(t, path)
			e := newEnv()
			var rewritten strings.Builder
			for _, b := range blocks {
				got := e.run(b.cmd)
				if *rewrite {
					fmt.Fprintf(&rewritten, "%s%s\n----\n%s\n", b.comment, b.cmd, got)
					continue
				}
				if got != b.expected {
					t.Errorf("%s:%d: %s\n--- got\n%s--- want\n%s", path, b.line, b.cmd, got, b.expected)
				}
			}
			if *rewrite {
				if err := os.WriteFile(path, []byte(rewritten.String()), 0o644); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

type hnode struct {
	name string
	disk []byte
	// flushed is what of disk survives a power loss: disk as of the last
	// flush, plus FUA writes (the data file behind a volatile cache).
	flushed  []byte
	durable  *Meta
	prim     *Primary
	repl     *Replica
	crashed  bool
	diskFail bool
}

type held struct {
	node string
	pr   Proposal
}

type env struct {
	nodes   map[string]*hnode
	names   []string
	net     *Network
	mem     *MemMembership
	vol     string
	gen     uint64
	out     strings.Builder
	hold    bool
	pending []held
	acked   map[int64]byte // byte offset → value of acknowledged writes
	inflt   map[uint64]Request
	quiet   bool
}

func newEnv() *env {
	return &env{nodes: map[string]*hnode{}, net: NewNetwork(), mem: NewMemMembership(), vol: "vol", acked: map[int64]byte{}, inflt: map[uint64]Request{}}
}

func (e *env) printf(format string, a ...any) { fmt.Fprintf(&e.out, format+"\n", a...) }

func (e *env) newGen() uint64 { e.gen++; return 0x100 + e.gen }

func parseArgs(fields []string) map[string]string {
	m := map[string]string{}
	for i, f := range fields {
		if k, v, ok := strings.Cut(f, "="); ok {
			m[k] = v
		} else {
			m[f] = "true"
			m["$"+strconv.Itoa(i)] = f
		}
	}
	return m
}

func (a argMap) int(k string, def int64) int64 {
	if v, ok := a[k]; ok {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			panic(err)
		}
		return n
	}
	return def
}

type argMap map[string]string

func (e *env) primary(a argMap) *hnode {
	if n := a["node"]; n != "" {
		return e.nodes[n]
	}
	st, _ := e.mem.State(context.Background(), e.vol)
	return e.nodes[st.Primary]
}

func (e *env) peersOf(self string) []string {
	var out []string
	for _, n := range e.names {
		if n != self {
			out = append(out, n)
		}
	}
	return out
}

func (e *env) makePrimary(n *hnode) {
	st, _ := e.mem.State(context.Background(), e.vol)
	p, err := NewPrimary(PrimaryConfig{Self: n.name, Peers: e.peersOf(n.name), NewGen: e.newGen, ALSlots: 2, ResyncWindow: 2, AckTimeoutTicks: 3},
		n.durable.Clone(), st)
	if err != nil {
		e.printf("error: %v", err)
		return
	}
	n.prim, n.repl = p, nil
	for _, peer := range e.peersOf(n.name) {
		if e.nodes[peer].crashed {
			p.PeerDown(peer, errors.New("connection refused"))
		}
	}
}

func (e *env) run(line string) string {
	e.out.Reset()
	fields := strings.Fields(line)
	a := argMap(parseArgs(fields[1:]))
	switch fields[0] {
	case "init":
		e.names = strings.Split(a["nodes"], ",")
		size, rs := a.int("size", 32), a.int("region", 8)
		for _, name := range e.names {
			// "fresh": created together with the volume at its creation
			// generation (LocalOptions.Gen), as the cluster creates them.
			e.nodes[name] = &hnode{name: name, disk: make([]byte, size),
				durable: &Meta{Volume: e.vol, Size: size, RegionSize: rs, Gen: 0x100, Fresh: a["fresh"] != ""}}
		}
		e.mem.Create(e.vol, e.names[0], e.names[1:]...)
		e.makePrimary(e.nodes[e.names[0]])
		for _, name := range e.names[1:] {
			e.nodes[name].repl = NewReplica(e.nodes[name].durable.Clone())
		}
		e.status()
	case "connect":
		p := e.primary(a)
		for _, peer := range e.peersOf(p.name) {
			if a["to"] == "" || a["to"] == peer {
				p.prim.PeerConnected(peer)
			}
		}
		e.stabilize()
	case "write", "unmap", "flush", "resize":
		p := e.primary(a)
		id := uint64(a.int("id", 0))
		r := Request{ID: id, Off: a.int("off", 0), FUA: a["fua"] != ""}
		switch fields[0] {
		case "write":
			r.Kind, r.Data = ReqWrite, []byte(a["data"])
		case "unmap":
			r.Kind, r.Len = ReqUnmap, a.int("len", 0)
		case "flush":
			r.Kind = ReqFlush
		case "resize":
			r.Kind, r.Len = ReqResize, a.int("size", 0)
		}
		e.inflt[id] = r
		// Until it is acknowledged the range may hold old or new data.
		for i := r.Off; i < r.Off+int64(len(r.Data))+r.Len && r.Kind != ReqResize; i++ {
			delete(e.acked, i)
		}
		p.prim.Propose(r)
		if a["nostab"] == "" {
			e.stabilize()
		}
	case "process":
		// One round of Ready handling everywhere, without delivering.
		for _, n := range e.names {
			e.processPrimary(e.nodes[n])
		}
	case "deliver":
		n := a.int("n", 1<<30)
		for i := int64(0); i < n; i++ {
			m, ok := e.net.Pop(a["from"], a["to"])
			if !ok {
				break
			}
			e.deliver(a["from"], a["to"], m)
		}
	case "stabilize":
		e.stabilize()
	case "drop":
		e.printf("dropped %d", e.net.Drop(a["from"], a["to"]))
	case "partition":
		e.net.Partition(a["$0"], a["$1"])
	case "heal":
		e.net.Heal()
	case "tick":
		p := e.primary(a)
		for i := int64(0); i < a.int("n", 1); i++ {
			p.prim.Tick()
		}
		e.stabilize()
	case "down":
		e.primary(a).prim.PeerDown(a["peer"], errors.New("connection lost"))
		e.stabilize()
	case "crash":
		n := e.nodes[a["$0"]]
		n.prim, n.repl, n.crashed = nil, nil, true
		e.net.DropNode(n.name)
		for _, o := range e.names {
			if p := e.nodes[o].prim; p != nil {
				p.PeerDown(n.name, errors.New("connection reset"))
			}
		}
		e.stabilize()
	case "powerloss":
		// A crash that also loses the node's volatile cache: its disk
		// keeps only what was flushed (or written with FUA).
		n := e.nodes[a["$0"]]
		if n.flushed == nil {
			n.flushed = make([]byte, len(n.disk))
		}
		n.disk = slices.Clone(n.flushed)
		e.printf("%s: power lost: disk=%s al=%v", n.name, diskString(n.disk), n.durable.AL)
		n.prim, n.repl, n.crashed = nil, nil, true
		e.net.DropNode(n.name)
		for _, o := range e.names {
			if p := e.nodes[o].prim; p != nil {
				p.PeerDown(n.name, errors.New("connection reset"))
			}
		}
		e.stabilize()
	case "restart":
		n := e.nodes[a["$0"]]
		n.crashed = false
		if a["primary"] != "" {
			e.makePrimary(n)
		} else {
			n.repl, n.prim = NewReplica(n.durable.Clone()), nil
		}
		e.stabilize()
	case "promote":
		n := e.nodes[a["$0"]]
		st, err := e.mem.Promote(e.vol, n.name)
		if err != nil {
			e.printf("promote: %v", err)
			break
		}
		e.printf("membership epoch=%d primary=%s isr=%v", st.Epoch, st.Primary, st.ISR)
		e.makePrimary(n)
		e.stabilize()
	case "demote":
		n := e.nodes[a["$0"]]
		n.prim, n.repl = nil, NewReplica(n.durable.Clone())
		e.net.DropNode(n.name)
	case "membership":
		switch {
		case a["hold"] != "":
			e.hold = true
		case a["commit"] != "":
			e.hold = false
			pend := e.pending
			e.pending = nil
			for _, h := range pend {
				e.propose(e.nodes[h.node], h.pr)
			}
			e.stabilize()
		}
	case "replace":
		// A crashed node's disk replaced by a new, empty one: "gen=creation"
		// recreates it with the volume's creation generation, as if it
		// were created together with the volume (a mistake the protocol
		// must survive), otherwise it is a new replica of unknown contents.
		n := e.nodes[a["$0"]]
		if !n.crashed {
			e.printf("error: %s is not crashed", n.name)
			break
		}
		m := &Meta{Volume: e.vol, Size: n.durable.Size, RegionSize: n.durable.RegionSize}
		if a["gen"] == "creation" {
			m.Gen, m.Fresh = 0x100, true
		}
		n.disk, n.flushed, n.durable = make([]byte, len(n.disk)), nil, m
	case "diskfail":
		e.nodes[a["$0"]].diskFail = a["off"] == ""
	case "corrupt":
		n := e.nodes[a["$0"]]
		copy(n.disk[a.int("off", 0):], a["data"])
	case "verify":
		p := e.primary(a)
		for r := uint64(0); r < p.prim.Meta().Regions(); r++ {
			p.prim.Verify(r, a["repair"] != "")
		}
		e.stabilize()
	case "status":
		e.status()
	case "check":
		e.check()
	default:
		e.printf("unknown command %q", fields[0])
	}
	return e.out.String()
}

func (e *env) stabilize() {
	for i := 0; i < 1000; i++ {
		progressed := false
		for _, n := range e.names {
			if e.processPrimary(e.nodes[n]) {
				progressed = true
			}
		}
		for _, l := range e.net.Links() {
			m, ok := e.net.Pop(l[0], l[1])
			if ok {
				e.deliver(l[0], l[1], m)
				progressed = true
			}
		}
		if !progressed {
			return
		}
	}
	e.printf("did not stabilize")
}

func (e *env) processPrimary(n *hnode) bool {
	if n.prim == nil || !n.prim.HasReady() {
		return false
	}
	rd := n.prim.Ready()
	if rd.Persist != nil {
		n.durable = durableAfter(n.durable, rd.Persist, rd.PersistMeta, rd.PersistAL)
		e.printf("%s: persist %s", n.name, metaString(n.prim.Meta()))
	}
	type done struct {
		tok  uint64
		err  error
		data []byte
	}
	var dones []done
	for _, l := range rd.Local {
		var err error
		var data []byte
		if n.diskFail && l.Kind != LocalFlush {
			err = errors.New("EIO")
		} else {
			data = n.io(l.Kind, l.Off, l.Len, l.Data, l.FUA)
		}
		dones = append(dones, done{l.Token, err, data})
	}
	for _, s := range rd.Send {
		if e.net.Send(n.name, s.To, s.Msg) {
			e.printf("%s->%s %s", n.name, s.To, s.Msg)
		} else {
			e.printf("%s->%s %s (lost: partition)", n.name, s.To, s.Msg)
		}
	}
	n.prim.Sent(rd)
	for _, d := range rd.Disconnect {
		e.net.Drop(n.name, d)
		e.net.Drop(d, n.name)
		e.printf("%s: disconnect %s", n.name, d)
	}
	for _, pr := range rd.Propose {
		if e.hold {
			e.printf("%s: propose %s %s epoch=%d (held)", n.name, pr.Kind, pr.Peer, pr.Epoch)
			e.pending = append(e.pending, held{n.name, pr})
			continue
		}
		e.propose(n, pr)
	}
	for _, ack := range rd.Acks {
		res := "ok"
		if ack.Err != nil {
			res = ack.Err.Error()
		} else if r, ok := e.inflt[ack.ID]; ok && r.Kind == ReqWrite {
			for i, b := range r.Data {
				e.acked[r.Off+int64(i)] = b
			}
		}
		delete(e.inflt, ack.ID)
		e.printf("%s: ack id=%d %s", n.name, ack.ID, res)
	}
	for _, v := range rd.Verified {
		e.printf("%s: verify region=%d mismatch=%v skipped=%v", n.name, v.Region, v.Mismatch, v.Skipped)
	}
	if rd.Unhealthy != nil {
		e.printf("%s: UNHEALTHY %v", n.name, rd.Unhealthy)
	}
	for _, d := range dones {
		if n.prim != nil {
			n.prim.LocalDone(d.tok, d.err, d.data)
		}
	}
	return true
}

func (e *env) propose(n *hnode, pr Proposal) {
	var st MembershipState
	var err error
	ctx := context.Background()
	if pr.Kind == ProposeAdd {
		st, err = e.mem.AddToISR(ctx, e.vol, pr.Epoch, n.name, pr.Peer, pr.Proof)
	} else {
		st, err = e.mem.RemoveFromISR(ctx, e.vol, pr.Epoch, n.name, pr.Peer)
	}
	if err != nil {
		e.printf("%s: propose %s %s epoch=%d: %v", n.name, pr.Kind, pr.Peer, pr.Epoch, err)
	} else {
		e.printf("%s: commit %s %s epoch=%d isr=%v", n.name, pr.Kind, pr.Peer, pr.Epoch, st.ISR)
	}
	if n.prim != nil {
		n.prim.MembershipResult(pr, st, err)
	}
}

// io applies an operation to the node's disk and keeps its flushed image:
// a flush makes everything durable, a FUA write itself.
func (n *hnode) io(k LocalKind, off, ln int64, data []byte, fua bool) []byte {
	if n.flushed == nil {
		n.flushed = make([]byte, len(n.disk))
	}
	out := applyIO(&n.disk, k, off, ln, data)
	switch {
	case k == LocalFlush:
		n.flushed = slices.Clone(n.disk)
	case k == LocalWrite && fua, k == LocalResize:
		applyIO(&n.flushed, k, off, ln, data)
	}
	return out
}

func applyIO(disk *[]byte, k LocalKind, off, n int64, data []byte) []byte {
	d := *disk
	switch k {
	case LocalWrite:
		copy(d[off:], data)
	case LocalUnmap:
		clear(d[off : off+n])
	case LocalResize:
		if n > int64(len(d)) {
			*disk = append(d, make([]byte, n-int64(len(d)))...)
		}
	case LocalRead:
		return slices.Clone(d[off : off+n])
	case LocalSum:
		s := sha256.Sum256(d[off : off+n])
		return s[:]
	}
	return nil
}

var msgLocal = map[MsgType]LocalKind{MsgWrite: LocalWrite, MsgUnmap: LocalUnmap, MsgFlush: LocalFlush, MsgResize: LocalResize, MsgChecksum: LocalSum}

func (e *env) deliver(from, to string, m Message) {
	n := e.nodes[to]
	if m.Type == MsgAck || m.Type == MsgHelloAck || m.Type == MsgReject {
		if n.prim != nil {
			if !e.quiet && m.Type != MsgAck {
				e.printf("%s->%s %s", from, to, m)
			}
			n.prim.Step(from, m)
		}
		return
	}
	if n.repl == nil {
		// Nothing serves the volume there: the connection is refused.
		if p := e.nodes[from].prim; p != nil {
			e.printf("%s->%s refused", from, to)
			p.PeerDown(to, errors.New("connection refused"))
		}
		return
	}
	n.repl.Step(m)
	rd := n.repl.Ready()
	if rd.Persist != nil {
		n.durable = durableAfter(n.durable, rd.Persist, rd.PersistMeta, rd.PersistAL)
	}
	for _, s := range rd.Send {
		e.net.Send(to, from, s)
	}
	for _, io := range rd.IO {
		var err error
		var sum []byte
		if n.diskFail && io.Msg.Type != MsgFlush {
			err = errors.New("EIO")
		} else {
			sum = n.io(msgLocal[io.Msg.Type], io.Msg.Off, io.Msg.Len, io.Msg.Data, io.Msg.Flags&FlagFUA != 0)
		}
		if io.Msg.Type != MsgChecksum {
			sum = nil
		}
		e.net.Send(to, from, n.repl.Done(io.Msg, err, sum))
		if err != nil {
			e.printf("%s->%s Ack seq=%d err=%v", to, from, io.Msg.Seq, err)
		}
	}
}

// durableAfter is what a node's disk holds after a Ready's Persist: the
// activity-log file and the metadata file are saved independently.
func durableAfter(old, m *Meta, md, al bool) *Meta {
	d := old.Clone()
	if md {
		d = m.Clone()
		d.AL = old.AL
	}
	if al {
		d.AL = slices.Clone(m.AL)
	}
	return d
}

func metaString(m *Meta) string {
	s := fmt.Sprintf("epoch=%d gen=%x al=%v", m.Epoch, m.Gen, m.AL)
	if m.Fresh {
		s += " fresh"
	}
	var ids []string
	for id := range m.Peers {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		s += fmt.Sprintf(" %s{base=%x dirty=%v}", id, m.Peers[id].Base, m.Peers[id].Dirty.Bits())
	}
	return s
}

func diskString(d []byte) string {
	b := []byte(string(d))
	for i, c := range b {
		if c == 0 {
			b[i] = '.'
		}
	}
	return string(b)
}

func (e *env) status() {
	st, _ := e.mem.State(context.Background(), e.vol)
	e.printf("membership epoch=%d primary=%s isr=%v", st.Epoch, st.Primary, st.ISR)
	for _, name := range e.names {
		n := e.nodes[name]
		role := "replica"
		switch {
		case n.crashed:
			role = "crashed"
		case n.prim != nil:
			role = "primary"
			if n.prim.Fenced() != nil {
				role = "fenced-primary"
			}
		}
		e.printf("%s %s %s disk=%s", name, role, metaString(n.durable), diskString(n.disk))
		if n.prim != nil {
			for _, ps := range n.prim.Status() {
				e.printf("  peer %s mode=%s isr=%v dirty=%dB resync=%d/%d", ps.ID, ps.Mode, ps.InISR, ps.DirtyBytes, ps.ResyncDone, ps.ResyncTotal)
			}
		}
	}
}

// check is the safety checker: every acknowledged byte must be on every ISR
// member, and (with identical) ISR members must be byte-identical.
func (e *env) check() {
	st, _ := e.mem.State(context.Background(), e.vol)
	bad := 0
	offs := make([]int64, 0, len(e.acked))
	for o := range e.acked {
		offs = append(offs, o)
	}
	slices.Sort(offs)
	for _, name := range st.ISR {
		d := e.nodes[name].disk
		for _, o := range offs {
			if d[o] != e.acked[o] {
				bad++
				if bad < 5 {
					e.printf("LOST: %s offset %d has %q, acknowledged %q", name, o, d[o], e.acked[o])
				}
			}
		}
	}
	same := true
	for _, name := range st.ISR[1:] {
		if string(e.nodes[name].disk) != string(e.nodes[st.ISR[0]].disk) {
			same = false
		}
	}
	e.printf("check: %d acknowledged bytes, %d lost, isr=%v identical=%v", len(offs), bad, st.ISR, same)
}
