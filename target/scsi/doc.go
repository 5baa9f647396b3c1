// Package scsi owns SCSI logical-unit emulation (SPC-4, SBC-3): CDB decoding,
// the opcode table, sense data, unit attentions, mode and VPD pages,
// persistent reservations and the Backend interface that stores a LU's blocks.
//
// It knows nothing about iSCSI. A transport (package target) builds a Command
// per SCSI task, with its I_T nexus and any Data-Out already gathered, calls
// LogicalUnit.Execute from as many goroutines as it likes, and sends back the
// Response. The LU decides ordering and atomicity (COMPARE AND WRITE, overlapping
// writes) itself.
//
// Identity (serial, NAA designator) is derived only from the caller's volume
// UUID so that two nodes exporting the same volume present a byte-identical disk.
package scsi
