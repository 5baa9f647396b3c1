// Package target is hasan's iSCSI target server (RFC 7143, ERL 0, one
// connection per session). It owns sockets, sessions and the task life
// cycle; the wire format, negotiation and CHAP live in target/iscsi, SCSI
// emulation in target/scsi.
//
// Usage, as `hasan target run` wires it:
//
//	srv := target.NewServer(target.Config{Logger: log})
//	srv.AddTarget(target.TargetConfig{Name: "iqn.2026-11.io.example:disk1", CHAP: &target.CHAP{User: "u", Secret: "s3cretpassw0rd"}})
//	lu, _ := scsi.New(scsi.Config{Backend: be, VolumeID: id})
//	srv.AddLUN("iqn.2026-11.io.example:disk1", 0, lu)
//	ln, _ := net.Listen("tcp", "0.0.0.0:3260")
//	go srv.Serve(ln)            // returns ErrServerClosed after Close/Shutdown
//	...
//	srv.Shutdown(ctx)           // Async Message "please log out", wait, then Close
//
// Each connection has one reader goroutine (login, then PDU dispatch in
// CmdSN order through iscsi.CmdWindow), one writer goroutine that owns
// StatSN and batches PDUs into writev calls (Data-In payloads are never
// copied), and one goroutine per SCSI task while it runs in the LU, so queue
// depth turns into concurrency. Every call into a LUN happens between
// lunRef.acquire and release, which is how RemoveLUN, RemoveTarget and Close
// know when no command can reach a LU any more.
package target
