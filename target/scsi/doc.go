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
// The usage loop:
//
//	lu, err := scsi.New(scsi.Config{VolumeID: id, Backend: be, Thin: true})
//	...
//	resp := lu.Execute(ctx, &scsi.Command{Nexus: n, CDB: cdb, DataOut: data})
//	send(resp.Status, resp.Sense, resp.Data)
//	if resp.Release != nil {
//		resp.Release() // Data came from a pool; do not touch it afterwards
//	}
//
// Task management calls Reset, session teardown calls NexusLost, and the
// cluster calls Resize, SetPortGroups and LUNsChanged; each queues the unit
// attentions SAM-5 asks for.
//
// Inside, every command is a row of one table (opcodes.go): opcode, service
// action, CDB length, REPORT SUPPORTED OPERATION CODES usage data, flags and
// handler. dispatch runs the common checks once, in SPC-4 order (unit
// attention, opcode, CDB length and control byte, ALUA state, reservation
// conflict, LBA range and transfer length), then the handler, which returns a
// *CheckError; Execute turns that into fixed or descriptor sense depending on
// D_SENSE. Writes hold a block range lock (rangelock.go) that makes COMPARE
// AND WRITE atomic and guarantees the Backend never sees overlapping writes;
// reads take no lock and use pooled buffers.
//
// Identity (serial, NAA designator) is derived only from the caller's volume
// UUID so that two nodes exporting the same volume present a byte-identical disk.
package scsi
