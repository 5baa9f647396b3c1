package scsi

import (
	"context"
	"encoding/hex"
	"fmt"
)

// Backend stores a logical unit's blocks. Offsets and lengths are in bytes and
// are always multiples of the LU's block size. Implementations must be safe for
// concurrent use; the LU guarantees that it never issues two overlapping writes
// at once.
//
// replication/ implements this interface for replicated volumes; it must not
// need to import this package to do so, which is why every method uses only
// standard types.
type Backend interface {
	// ReadAt fills p from offset off. Unmapped regions read as zeros.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// WriteAt stores p at off. When fua is set it returns only once the data
	// is durable.
	WriteAt(ctx context.Context, p []byte, off int64, fua bool) error
	// Flush makes every completed write durable.
	Flush(ctx context.Context) error
	// Unmap deallocates [off, off+length); later reads of it return zeros.
	Unmap(ctx context.Context, off, length int64) error
	// Size is the current capacity in bytes.
	Size() int64
	// Resize changes the capacity. Growing must preserve existing data.
	Resize(ctx context.Context, size int64) error
}

// MapStatusBackend is implemented by backends that can tell mapped from
// deallocated extents, which GET LBA STATUS reports.
type MapStatusBackend interface {
	// MapStatus reports whether the extent starting at off is mapped and how
	// many bytes (>0) from off share that state.
	MapStatus(ctx context.Context, off int64) (mapped bool, length int64, err error)
}

// ITNexus names an I_T nexus: one initiator port (iSCSI name plus ISID) talking
// to one target port (target name plus portal group tag). Reservations and unit
// attentions are kept per nexus.
type ITNexus struct {
	InitiatorName string
	ISID          [6]byte
	TargetName    string
	TPGT          uint16
	// RelativePortID is the relative target port identifier reported in VPD
	// 0x83 and REPORT TARGET PORT GROUPS.
	RelativePortID uint16
}

// InitiatorPortName is the SCSI initiator port name, "<iscsi-name>,i,0x<isid>".
func (n ITNexus) InitiatorPortName() string {
	return fmt.Sprintf("%s,i,0x%s", n.InitiatorName, hex.EncodeToString(n.ISID[:]))
}

// TargetPortName is the SCSI target port name, "<iscsi-name>,t,0x<tpgt>".
func (n ITNexus) TargetPortName() string {
	return fmt.Sprintf("%s,t,0x%04x", n.TargetName, n.TPGT)
}

// Key identifies the nexus in maps.
func (n ITNexus) Key() string { return n.InitiatorPortName() + "|" + n.TargetPortName() }

// TaskAttr is the SAM task attribute carried by the transport.
type TaskAttr uint8

const (
	TaskUntagged TaskAttr = iota
	TaskSimple
	TaskOrdered
	TaskHeadOfQueue
	TaskACA
)

// Command is one SCSI task handed to a LogicalUnit.
type Command struct {
	Nexus ITNexus
	LUN   uint64
	Tag   uint32
	Attr  TaskAttr
	CDB   []byte
	// Read and Write mirror the transport's direction flags.
	Read, Write bool
	// ExpectedLen is the transport's expected data transfer length in bytes.
	ExpectedLen uint32
	// DataOut holds everything the initiator sent for this task (at most
	// ExpectedLen bytes). The LU may keep it only until Execute returns.
	DataOut []byte
}

// Status is a SAM status code.
type Status uint8

const (
	StatusGood                Status = 0x00
	StatusCheckCondition      Status = 0x02
	StatusConditionMet        Status = 0x04
	StatusBusy                Status = 0x08
	StatusReservationConflict Status = 0x18
	StatusTaskSetFull         Status = 0x28
	StatusACAActive           Status = 0x30
	StatusTaskAborted         Status = 0x40
)

// Response is the outcome of a Command.
type Response struct {
	Status Status
	// Sense is complete sense data (fixed or descriptor format) when Status is
	// CHECK CONDITION.
	Sense []byte
	// Data is the Data-In payload, already cut to the CDB's allocation length
	// but NOT to the transport's ExpectedLen: the transport truncates and
	// reports the residual.
	Data []byte
	// Transferred is the number of bytes the CDB asked to move in its data
	// direction (Data-Out for writes, len(Data) for reads). The transport
	// compares it with ExpectedLen to set residual overflow/underflow.
	Transferred uint32
	// Release, if set, is called by the transport once Data has been sent so
	// that pooled buffers can be reused.
	Release func()
}

// ResetKind says which reset a task management function performed.
type ResetKind uint8

const (
	ResetLUN ResetKind = iota + 1
	ResetTargetWarm
	ResetTargetCold
)

// PRStore persists one LU's persistent-reservation state. The cluster stores it
// in Raft so reservations survive failover; target/scsi ships a file store for
// standalone use. Save must be durable before it returns: the initiator is told
// GOOD only afterwards.
type PRStore interface {
	LoadPR(ctx context.Context) (PRState, error)
	SavePR(ctx context.Context, st PRState) error
}

// PRState is the persistent-reservation state of one LU (SPC-4 5.13).
type PRState struct {
	Generation    uint32           `json:"generation"`
	APTPL         bool             `json:"aptpl"`
	Registrations []PRRegistration `json:"registrations"`
	// Holder is the index into Registrations of the reservation holder, or -1
	// when not reserved. For all-registrants types every registrant holds it.
	Holder int   `json:"holder"`
	Type   uint8 `json:"type"`
	Scope  uint8 `json:"scope"`
}

// PRRegistration is one registered I_T nexus and its key.
type PRRegistration struct {
	Key           uint64 `json:"key"`
	InitiatorPort string `json:"initiator_port"` // ITNexus.InitiatorPortName
	TargetPort    string `json:"target_port"`    // ITNexus.TargetPortName
	RelPortID     uint16 `json:"rel_port_id"`
	// AllTargetPorts records ALL_TG_PT at registration time.
	AllTargetPorts bool `json:"all_tg_pt,omitempty"`
}
