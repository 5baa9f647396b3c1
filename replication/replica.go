package replication

import (
	"fmt"
	"slices"
)

// ReplicaIO is one operation the replica shell performs on its disk for
// Msg; when done it sends Replica.Done(Msg, err, sum) back on the
// connection Msg came from.
type ReplicaIO struct {
	Msg Message
}

// ReplicaReady is what the replica state machine asks its shell to do, in
// order: make Persist durable (its activity log with PersistAL, the rest
// with PersistMeta, as for Ready); if Barrier, wait for every ReplicaIO still
// running (so nothing from an older epoch lands after this point); then
// start IO (concurrently: the primary never has overlapping operations in
// flight) and send Send on the connection.
type ReplicaReady struct {
	Persist     *Meta
	PersistMeta bool
	PersistAL   bool
	Barrier     bool
	IO          []ReplicaIO
	Send        []Message
}

// Replica is a replica's protocol state machine: epoch fencing and the
// metadata messages. It performs no I/O and is not safe for concurrent use.
type Replica struct {
	meta    *Meta
	rd      ReplicaReady
	dirtyMD bool // metadata other than the AL changed
	dirtyAL bool
}

// NewReplica wraps this node's metadata for the volume.
func NewReplica(meta *Meta) *Replica { return &Replica{meta: meta} }

// Meta is the current metadata (read-only for callers).
func (r *Replica) Meta() *Meta { return r.meta }

// Ready returns and clears the outputs of the last Step calls.
func (r *Replica) Ready() ReplicaReady {
	rd := r.rd
	r.rd = ReplicaReady{}
	if r.dirtyMD || r.dirtyAL {
		rd.Persist = r.meta.Clone()
		rd.PersistMeta, rd.PersistAL = r.dirtyMD, r.dirtyAL
		r.dirtyMD, r.dirtyAL = false, false
	}
	return rd
}

// Step handles one message from a primary. Messages of one connection must
// be stepped in arrival order.
func (r *Replica) Step(m Message) {
	if m.Epoch < r.meta.Epoch {
		// A zombie: an old primary still writing after a newer one was
		// granted the volume. Nothing it sends changes this replica.
		r.rd.Send = append(r.rd.Send, Message{Type: MsgReject, Epoch: r.meta.Epoch, Seq: m.Seq,
			Err: fmt.Sprintf("epoch %d < %d", m.Epoch, r.meta.Epoch)})
		return
	}
	if m.Epoch > r.meta.Epoch {
		r.meta.Epoch = m.Epoch
		r.dirtyMD = true
		r.rd.Barrier = true
	}
	if m.Type != MsgHello && r.meta.Fresh && m.Flags&FlagFresh == 0 {
		// The first message from a primary that has written (its activity
		// log, ahead of any data) or that predates FlagFresh: from now on
		// this replica is only as good as its generation says, like any
		// other. Persisted before the data it precedes lands, so a
		// replica that holds written data never claims to be fresh.
		r.meta.Fresh = false
		r.dirtyMD = true
	}
	ack := Message{Type: MsgAck, Epoch: r.meta.Epoch, Seq: m.Seq}
	switch m.Type {
	case MsgHello:
		if m.Volume != r.meta.Volume {
			r.rd.Send = append(r.rd.Send, Message{Type: MsgReject, Epoch: r.meta.Epoch, Err: "unknown volume " + m.Volume})
			return
		}
		// Another node is primary now: dirty tracking this node kept while
		// it was primary is no longer relative to the current data.
		if len(r.meta.Peers) > 0 {
			r.meta.Peers = nil
			r.dirtyMD = true
		}
		r.rd.Barrier = true
		ha := Message{Type: MsgHelloAck, Epoch: r.meta.Epoch, Gen: r.meta.Gen, Len: r.meta.Size, Regions: slices.Clone(r.meta.AL)}
		if r.meta.Fresh {
			ha.Flags |= FlagFresh
		}
		r.rd.Send = append(r.rd.Send, ha)
	case MsgAL:
		r.meta.AL = slices.Clone(m.Regions)
		r.dirtyAL = true
		r.rd.Send = append(r.rd.Send, ack)
	case MsgGen:
		r.meta.Gen = m.Gen
		if m.Flags&FlagSynced != 0 && m.Flags&FlagFresh != 0 && !r.meta.Fresh {
			// Caught up with a primary that has never written: this
			// replica holds its zeros, whatever it held before.
			r.meta.Fresh = true
		}
		r.dirtyMD = true
		r.rd.Send = append(r.rd.Send, ack)
	case MsgResize:
		if m.Len > r.meta.Size {
			r.meta.Size = m.Len
			r.dirtyMD = true
		}
		r.rd.IO = append(r.rd.IO, ReplicaIO{Msg: m})
	case MsgWrite, MsgUnmap, MsgFlush, MsgChecksum:
		r.rd.IO = append(r.rd.IO, ReplicaIO{Msg: m})
	default:
		r.rd.Send = append(r.rd.Send, Message{Type: MsgReject, Epoch: r.meta.Epoch, Seq: m.Seq, Err: "unexpected " + m.Type.String()})
	}
}

// Done builds the acknowledgement of a finished ReplicaIO. sum is the
// checksum for MsgChecksum.
//
// It may be called concurrently with Step (the shell's I/O completes on
// other goroutines), so it reads nothing Step writes: the ack carries the
// epoch m was accepted at, which Step made the replica's epoch then.
func (r *Replica) Done(m Message, err error, sum []byte) Message {
	ack := Message{Type: MsgAck, Epoch: m.Epoch, Seq: m.Seq, Data: sum}
	if err != nil {
		ack.Err = err.Error()
	}
	return ack
}
