package webui

import (
	"context"
	"errors"
	"net/http"

	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/replication"
)

// LeaderHeader carries the leader's API address on a 503 caused by
// cluster.ErrNotLeader, when the leader is known.
const LeaderHeader = "X-Hasan-Leader"

// errorBody is the only error shape the API writes.
type errorBody struct {
	Error string `json:"error"`
	Field string `json:"field,omitempty"`
}

// errorRule maps one class of error to a status. expose says whether the
// error's text goes to the client: cluster and validation messages name
// ids and fields only (secrets are redacted types), anything unclassified
// may carry internals and is replaced by a fixed text.
type errorRule struct {
	target error
	status int
	expose bool
}

// errorTable is the one place errors become HTTP statuses, checked in
// order; the first errors.Is match wins. Validation and not-leader errors
// are typed and handled before it in statusOf.
var errorTable = [...]errorRule{
	{cluster.ErrNotLeader, http.StatusServiceUnavailable, true},
	{cluster.ErrInvalid, http.StatusBadRequest, true},
	{cluster.ErrToken, http.StatusForbidden, true},
	{cluster.ErrNotFound, http.StatusNotFound, true},
	{replication.ErrUnknownVolume, http.StatusNotFound, true},
	{cluster.ErrExists, http.StatusConflict, true},
	{cluster.ErrInUse, http.StatusConflict, true},
	{cluster.ErrGroupOwned, http.StatusConflict, true},
	{cluster.ErrOwnerDiffer, http.StatusConflict, true},
	{cluster.ErrNotOwner, http.StatusConflict, true},
	{cluster.ErrNodeState, http.StatusConflict, true},
	{cluster.ErrNotFenced, http.StatusConflict, true},
	{replication.ErrStaleEpoch, http.StatusConflict, true},
	{replication.ErrNotPrimary, http.StatusConflict, true},
	{replication.ErrNotInISR, http.StatusConflict, true},
	{replication.ErrNotCaughtUp, http.StatusConflict, true},
	{context.DeadlineExceeded, http.StatusGatewayTimeout, false},
	{context.Canceled, http.StatusServiceUnavailable, false},
}

// statusOf classifies err: the status, the message the client may see,
// the field (validation only) and the leader address (not-leader only).
func statusOf(err error) (status int, body errorBody, leader string) {
	var ve *ValidationError
	if errors.As(err, &ve) {
		return http.StatusBadRequest, errorBody{Error: ve.Msg, Field: ve.Field}, ""
	}
	var nl *NotLeaderError
	if errors.As(err, &nl) {
		leader = nl.LeaderAPI
	}
	var mb *http.MaxBytesError
	if errors.As(err, &mb) {
		return http.StatusRequestEntityTooLarge, errorBody{Error: "request body too large"}, ""
	}
	for _, r := range errorTable {
		if errors.Is(err, r.target) {
			msg := http.StatusText(r.status)
			if r.expose {
				msg = err.Error()
			}
			return r.status, errorBody{Error: msg}, leader
		}
	}
	return http.StatusInternalServerError, errorBody{Error: "internal error"}, ""
}
