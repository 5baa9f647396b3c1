package scsi

import "context"

// reservationHandler is the LU's view of SPC-2 (RESERVE/RELEASE) and SPC-4
// persistent reservations. The LU consults it before running any command and
// hands it the reservation opcodes; pr*.go implements it.
type reservationHandler interface {
	// conflicts reports whether cdb from n must end in RESERVATION CONFLICT
	// (SPC-4 table 66 and SPC-2 rules). It must be cheap: it runs on every
	// command.
	conflicts(n ITNexus, cdb []byte) bool
	// persistentReserveIn answers PERSISTENT RESERVE IN; the data is not yet
	// cut to the allocation length.
	persistentReserveIn(ctx context.Context, n ITNexus, cdb []byte) ([]byte, error)
	// persistentReserveOut runs PERSISTENT RESERVE OUT with its parameter list.
	// It returns GOOD, RESERVATION CONFLICT, or a *CheckError.
	persistentReserveOut(ctx context.Context, n ITNexus, cdb, param []byte) (Status, error)
	// reserve and release implement RESERVE(6/10) and RELEASE(6/10).
	reserve(n ITNexus, cdb []byte) (Status, error)
	release(n ITNexus, cdb []byte) (Status, error)
	// nexusLost drops what SPC ties to an I_T nexus (SPC-2 reservations).
	nexusLost(n ITNexus)
	// reset applies a LU or target reset (releases SPC-2 reservations; PRs stay).
	reset(kind ResetKind)
}

// uaSink lets reservation code queue unit attentions, keyed by ITNexus.Key()
// (PRRegistration InitiatorPort + "|" + TargetPort).
type uaSink interface {
	establishUA(nexusKey string, r Reason)
}
