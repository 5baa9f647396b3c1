package replication

// RequestKind names what an initiator-facing request does.
type RequestKind uint8

// Request kinds.
const (
	ReqWrite RequestKind = iota + 1
	ReqUnmap
	ReqFlush
	ReqResize
)

var reqNames = [...]string{"?", "write", "unmap", "flush", "resize"}

func (k RequestKind) String() string { return reqNames[k] }

// Request is one Backend call handed to the primary state machine. Len is
// the new size for ReqResize.
type Request struct {
	ID   uint64
	Kind RequestKind
	Off  int64
	Len  int64
	Data []byte
	FUA  bool
	// Hold, when set, counts the shell's references to Data, which the
	// caller owns; the state machine copies it into the messages and local
	// operations that carry Data. Contract: every message carrying Data is
	// in a Ready no later than the request's Ack (the caller reuses Data
	// once the shell's references are gone), and a message to a peer whose
	// ack the Ack does not wait for is marked Envelope.Copy.
	Hold *Hold
}

// LocalKind names an operation on the primary's own disk.
type LocalKind uint8

// Local operation kinds.
const (
	LocalWrite LocalKind = iota + 1
	LocalUnmap
	LocalFlush
	LocalResize
	// LocalRead reads a region to send to a resyncing replica. The shell
	// applies the resync rate limit before performing it.
	LocalRead
	// LocalSum computes the SHA-256 of a region for online verify.
	LocalSum
)

var localNames = [...]string{"?", "write", "unmap", "flush", "resize", "read", "sum"}

func (k LocalKind) String() string { return localNames[k] }

// LocalOp is I/O on the primary's own replica. The shell performs it and
// reports the outcome with Primary.LocalDone(Token, ...).
type LocalOp struct {
	Token uint64
	Kind  LocalKind
	Off   int64
	Len   int64
	Data  []byte
	FUA   bool
	Hold  *Hold // Request.Hold of a LocalWrite
}

// Envelope is a message for one peer. Messages to the same peer must be
// sent in the order they appear.
type Envelope struct {
	To  string
	Msg Message
	// Copy asks the shell to send a copy of Msg.Data instead of the
	// caller's buffer (Msg.Hold): the initiator's acknowledgement does not
	// wait for this peer (it is outside the ISR), so the caller's buffer
	// must not wait for it either.
	Copy bool
}

// ProposalKind names an ISR change.
type ProposalKind uint8

// Proposal kinds.
const (
	ProposeRemove ProposalKind = iota + 1
	ProposeAdd
)

func (k ProposalKind) String() string {
	if k == ProposeAdd {
		return "add"
	}
	return "remove"
}

// Proposal asks Membership to change the ISR. The shell calls Membership and
// feeds the outcome back with Primary.MembershipResult.
type Proposal struct {
	Kind  ProposalKind
	Peer  string
	Epoch uint64
	Proof CatchUp
}

// Ack completes a Request.
type Ack struct {
	ID  uint64
	Err error
}

// VerifyResult reports one verified region.
type VerifyResult struct {
	Token    uint64
	Region   uint64
	Mismatch []string // peers whose checksum differs from the primary's
	Skipped  []string // ISR peers that could not be compared (down)
	Err      error
}

// Ready is what the primary state machine asks its shell to do. The shell
// must handle one Ready completely, in this order, before asking for the
// next:
//
//  1. Persist, if set, is made durable first: with PersistAL its activity
//     log (ALFile.Save: one write and one flush), with PersistMeta the rest
//     of it (SaveMeta). It holds the activity log entries and dirty bits that
//     the rest of this Ready relies on: the activity log is on disk before a
//     write to its regions is issued, and dirty bits are on disk before a
//     write that a replica missed is acknowledged. Without PersistMeta only
//     Persist.AL is filled in.
//  2. Local and Send are issued (concurrently with each other; Send in order
//     per peer). Disconnect names peers whose connection must be dropped.
//     Once Send is handed to the connections the shell calls
//     Primary.Sent(rd): the ack timeout of those messages runs from then,
//     not from when they were made (a Ready may wait for its Persist), and
//     not at all for a message never reported sent.
//  3. Propose is handed to Membership.
//  4. Acks are returned to the initiator. A write is in Acks only once the
//     local disk and every member of the committed ISR have it (or a member
//     was removed from the ISR by a committed change); a FUA write or flush
//     only once all of them made it durable.
type Ready struct {
	Persist     *Meta
	PersistMeta bool
	PersistAL   bool
	Local       []LocalOp
	Send        []Envelope
	Disconnect  []string
	Propose     []Proposal
	Acks        []Ack
	Verified    []VerifyResult
	// Unhealthy is set when the primary's own disk failed: the node must be
	// reported unhealthy so the cluster moves the volume.
	Unhealthy error

	// stamps are the awaited acks of Send, for Primary.Sent.
	stamps []stamp
}

type stamp struct {
	o  *op
	id string
}

// Empty reports whether there is nothing to do.
func (rd *Ready) Empty() bool {
	return rd.Persist == nil && !rd.PersistMeta && !rd.PersistAL && len(rd.Local) == 0 && len(rd.Send) == 0 && len(rd.Disconnect) == 0 &&
		len(rd.Propose) == 0 && len(rd.Acks) == 0 && len(rd.Verified) == 0 && rd.Unhealthy == nil
}
