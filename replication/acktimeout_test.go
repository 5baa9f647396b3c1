package replication

import (
	"context"
	"errors"
	"strings"
	"testing"
)

// ackDriver runs a Primary with one peer n2 whose replica answers every
// message of the current connection at once, completing local operations
// when asked; it ticks once per round.
type ackDriver struct {
	t   *testing.T
	p   *Primary
	mem *MemMembership
}

func newAckDriver(t *testing.T) *ackDriver {
	mem := NewMemMembership()
	mem.Create("vol", "n1", "n2")
	st, _ := mem.State(context.Background(), "vol")
	gen := uint64(0x100)
	p, err := NewPrimary(PrimaryConfig{Self: "n1", Peers: []string{"n2"}, NewGen: func() uint64 { gen++; return gen }, AckTimeoutTicks: 3},
		&Meta{Volume: "vol", Size: 32, RegionSize: 8, Gen: 0x100}, st)
	if err != nil {
		t.Fatal(err)
	}
	p.Ready()
	return &ackDriver{t: t, p: p, mem: mem}
}

// round hands out one Ready: proposals are committed, n2 answers what it
// was sent (a HelloAck with gen), local operations complete unless
// holdLocal; returns the LocalOps it held back.
func (d *ackDriver) round(gen uint64, holdLocal bool) []LocalOp {
	rd := d.p.Ready()
	d.p.Sent(rd)
	for _, pr := range rd.Propose {
		var st MembershipState
		var err error
		if pr.Kind == ProposeRemove {
			st, err = d.mem.RemoveFromISR(context.Background(), "vol", pr.Epoch, "n1", pr.Peer)
		} else {
			st, err = d.mem.AddToISR(context.Background(), "vol", pr.Epoch, "n1", pr.Peer, pr.Proof)
		}
		d.p.MembershipResult(pr, st, err)
	}
	for _, s := range rd.Send {
		switch s.Msg.Type {
		case MsgHello:
			d.p.Step("n2", Message{Type: MsgHelloAck, Epoch: s.Msg.Epoch, Gen: gen, Len: 32})
		case MsgAL:
		default:
			d.p.Step("n2", Message{Type: MsgAck, Epoch: s.Msg.Epoch, Seq: s.Msg.Seq})
		}
	}
	var held []LocalOp
	for _, l := range rd.Local {
		if holdLocal {
			held = append(held, l)
			continue
		}
		var data []byte
		if l.Kind == LocalRead {
			data = make([]byte, l.Len)
		}
		d.p.LocalDone(l.Token, nil, data)
	}
	d.p.Tick()
	return held
}

// TestAckTimeoutOnlyForTheCurrentConnection: a write sent to n2 on a
// connection that then died must not be awaited from n2's next connection.
// Here the write's local part is still running when n2 is back, so the op
// outlives the connection it was sent on; n2 answers everything it is sent
// afterwards at once, and must not be timed out for the message it never
// received on its new connection (it was, before PeerDown forgot it).
func TestAckTimeoutOnlyForTheCurrentConnection(t *testing.T) {
	d := newAckDriver(t)
	d.p.PeerConnected("n2")
	d.round(0x100, false)
	d.round(0x100, false)
	d.p.Propose(Request{ID: 1, Kind: ReqWrite, Off: 0, Data: []byte("abcd")})
	// The write goes out to n2 and locally; n2's connection dies before
	// it answers (round answers in the next Ready, so drop it now).
	rd := d.p.Ready()
	d.p.Sent(rd)
	var local []LocalOp
	local = append(local, rd.Local...)
	d.p.PeerDown("n2", errors.New("connection reset"))
	for i := 0; i < 3; i++ {
		local = append(local, d.round(0, true)...)
	}
	if st, _ := d.mem.State(context.Background(), "vol"); st.InISR("n2") {
		t.Fatalf("n2 not removed: %+v", st)
	}
	d.p.PeerConnected("n2")
	local = append(local, d.round(0x100, true)...) // incremental handshake
	for _, l := range local {
		d.p.LocalDone(l.Token, nil, nil)
	}
	for i := 0; i < 10; i++ {
		d.round(0, false)
	}
	for _, ps := range d.p.Status() {
		if ps.Mode != "up" || strings.Contains(ps.LastError, "ack timeout") {
			t.Fatalf("n2 after answering everything on its new connection: %+v", ps)
		}
		if !ps.InISR {
			t.Fatalf("n2 did not rejoin: %+v", ps)
		}
	}
}

// TestAckTimeoutRunsFromSend: a message made while the shell holds its Ready
// (waiting for a slow Persist) is timed from when the shell sent it
// (Primary.Sent), not from when the state machine made it.
func TestAckTimeoutRunsFromSend(t *testing.T) {
	d := newAckDriver(t)
	d.p.PeerConnected("n2")
	d.round(0x100, false)
	d.round(0x100, false)
	d.p.Propose(Request{ID: 1, Kind: ReqWrite, Off: 0, Data: []byte("abcd")})
	rd := d.p.Ready()
	for i := 0; i < 5; i++ { // the Persist takes 5 ticks
		d.p.Tick()
	}
	d.p.Sent(rd)
	for _, l := range rd.Local {
		d.p.LocalDone(l.Token, nil, nil)
	}
	d.p.Tick() // one tick after the send: well within 3
	for _, ps := range d.p.Status() {
		if ps.Mode != "up" {
			t.Fatalf("n2 timed out one tick after its message was sent: %+v", ps)
		}
	}
}
