package scsi

import "fmt"

// Reason is why a command ends in CHECK CONDITION (or why a unit attention
// is pending). Handlers return reasons; one table translates them to sense
// key/ASC/ASCQ, so the wire form of every error is decided in one place.
type Reason uint16

const (
	ReasonNone Reason = iota
	// HARDWARE ERROR 08/00: the fallback when nothing better is known.
	ReasonLUCommunicationFailure
	ReasonInternalTargetFailure
	ReasonReadError
	ReasonWriteError
	ReasonInvalidOpcode
	ReasonLBAOutOfRange
	ReasonInvalidFieldInCDB
	ReasonLUNotSupported
	ReasonInvalidFieldInParamList
	ReasonParamValueInvalid
	ReasonInvalidReleaseOfPR
	ReasonParamListLengthError
	ReasonInsufficientRegistrationResources
	ReasonSavingParamsNotSupported
	ReasonMiscompareDuringVerify
	ReasonWriteProtected
	ReasonOverlappedCommands
	ReasonUnexpectedUnsolicitedData
	ReasonNotEnoughUnsolicitedData
	ReasonProtocolServiceCRCError
	ReasonLUNotAccessibleStandby
	ReasonLUNotAccessibleTransitioning
	ReasonLUNotAccessibleUnavailable
	// Unit attentions (sense key UNIT ATTENTION).
	ReasonUAPowerOnReset
	ReasonUAPowerOn
	ReasonUABusDeviceReset
	ReasonUAITNexusLoss
	ReasonUAModeParametersChanged
	ReasonUAReservationsPreempted
	ReasonUAReservationsReleased
	ReasonUARegistrationsPreempted
	ReasonUAAsymmetricAccessStateChanged
	ReasonUACapacityDataChanged
	ReasonUAReportedLUNsDataChanged
	ReasonUAInquiryDataChanged
	ReasonUACommandsClearedByAnotherInitiator
	reasonCount
)

// Sense keys (SPC-4 table 48).
const (
	SenseNoSense        = 0x0
	SenseRecoveredError = 0x1
	SenseNotReady       = 0x2
	SenseMediumError    = 0x3
	SenseHardwareError  = 0x4
	SenseIllegalRequest = 0x5
	SenseUnitAttention  = 0x6
	SenseDataProtect    = 0x7
	SenseAbortedCommand = 0xB
	SenseMiscompare     = 0xE
)

// SenseCode is the wire form of a Reason.
type SenseCode struct {
	Key, ASC, ASCQ uint8
	Text           string
}

var reasonTable = [reasonCount]SenseCode{
	ReasonNone:                              {SenseNoSense, 0x00, 0x00, "no additional sense information"},
	ReasonLUCommunicationFailure:            {SenseHardwareError, 0x08, 0x00, "logical unit communication failure"},
	ReasonInternalTargetFailure:             {SenseHardwareError, 0x44, 0x00, "internal target failure"},
	ReasonReadError:                         {SenseMediumError, 0x11, 0x00, "unrecovered read error"},
	ReasonWriteError:                        {SenseMediumError, 0x0C, 0x00, "write error"},
	ReasonInvalidOpcode:                     {SenseIllegalRequest, 0x20, 0x00, "invalid command operation code"},
	ReasonLBAOutOfRange:                     {SenseIllegalRequest, 0x21, 0x00, "logical block address out of range"},
	ReasonInvalidFieldInCDB:                 {SenseIllegalRequest, 0x24, 0x00, "invalid field in cdb"},
	ReasonLUNotSupported:                    {SenseIllegalRequest, 0x25, 0x00, "logical unit not supported"},
	ReasonInvalidFieldInParamList:           {SenseIllegalRequest, 0x26, 0x00, "invalid field in parameter list"},
	ReasonParamValueInvalid:                 {SenseIllegalRequest, 0x26, 0x02, "parameter value invalid"},
	ReasonInvalidReleaseOfPR:                {SenseIllegalRequest, 0x26, 0x04, "invalid release of persistent reservation"},
	ReasonParamListLengthError:              {SenseIllegalRequest, 0x1A, 0x00, "parameter list length error"},
	ReasonInsufficientRegistrationResources: {SenseIllegalRequest, 0x55, 0x04, "insufficient registration resources"},
	ReasonSavingParamsNotSupported:          {SenseIllegalRequest, 0x39, 0x00, "saving parameters not supported"},
	ReasonMiscompareDuringVerify:            {SenseMiscompare, 0x1D, 0x00, "miscompare during verify operation"},
	ReasonWriteProtected:                    {SenseDataProtect, 0x27, 0x00, "write protected"},
	ReasonOverlappedCommands:                {SenseAbortedCommand, 0x4E, 0x00, "overlapped commands attempted"},
	ReasonUnexpectedUnsolicitedData:         {SenseAbortedCommand, 0x0C, 0x0C, "unexpected unsolicited data"},
	ReasonNotEnoughUnsolicitedData:          {SenseAbortedCommand, 0x0C, 0x0D, "not enough unsolicited data"},
	ReasonProtocolServiceCRCError:           {SenseAbortedCommand, 0x47, 0x05, "protocol service crc error"},
	ReasonLUNotAccessibleStandby:            {SenseNotReady, 0x04, 0x0B, "logical unit not accessible, target port in standby state"},
	ReasonLUNotAccessibleTransitioning:      {SenseNotReady, 0x04, 0x0A, "logical unit not accessible, asymmetric access state transition"},
	ReasonLUNotAccessibleUnavailable:        {SenseNotReady, 0x04, 0x0C, "logical unit not accessible, target port in unavailable state"},
	ReasonUAPowerOnReset:                    {SenseUnitAttention, 0x29, 0x00, "power on, reset, or bus device reset occurred"},
	ReasonUAPowerOn:                         {SenseUnitAttention, 0x29, 0x01, "power on occurred"},
	ReasonUABusDeviceReset:                  {SenseUnitAttention, 0x29, 0x03, "bus device reset function occurred"},
	ReasonUAITNexusLoss:                     {SenseUnitAttention, 0x29, 0x07, "i_t nexus loss occurred"},
	ReasonUAModeParametersChanged:           {SenseUnitAttention, 0x2A, 0x01, "mode parameters changed"},
	ReasonUAReservationsPreempted:           {SenseUnitAttention, 0x2A, 0x03, "reservations preempted"},
	ReasonUAReservationsReleased:            {SenseUnitAttention, 0x2A, 0x04, "reservations released"},
	ReasonUARegistrationsPreempted:          {SenseUnitAttention, 0x2A, 0x05, "registrations preempted"},
	ReasonUAAsymmetricAccessStateChanged:    {SenseUnitAttention, 0x2A, 0x06, "asymmetric access state changed"},
	ReasonUACapacityDataChanged:             {SenseUnitAttention, 0x2A, 0x09, "capacity data has changed"},
	ReasonUAReportedLUNsDataChanged:         {SenseUnitAttention, 0x3F, 0x0E, "reported luns data has changed"},
	ReasonUAInquiryDataChanged:              {SenseUnitAttention, 0x3F, 0x03, "inquiry data has changed"},
	ReasonUACommandsClearedByAnotherInitiator: {SenseUnitAttention, 0x2F, 0x00,
		"commands cleared by another initiator"},
}

// Code returns the sense key, ASC and ASCQ for r.
func (r Reason) Code() SenseCode {
	if r >= reasonCount {
		return reasonTable[ReasonLUCommunicationFailure]
	}
	return reasonTable[r]
}

func (r Reason) String() string { return r.Code().Text }

// FieldPointer is the sense-key-specific field pointer (SPC-4 4.5.2.4.2) that
// tells the initiator which byte (and bit) of the CDB or parameter list was bad.
type FieldPointer struct {
	// InCDB is true for a CDB field (C/D bit set), false for parameter data.
	InCDB bool
	Byte  uint16
	// Bit is the bit number 0-7, or -1 when the whole byte is meant.
	Bit int8
}

// CheckError is a handler's request to end the command in CHECK CONDITION.
type CheckError struct {
	Reason Reason
	Field  *FieldPointer
	// Info, when InfoValid, goes into the INFORMATION field (for example the
	// offset of the first miscompare for COMPARE AND WRITE).
	Info      uint64
	InfoValid bool
}

func (e *CheckError) Error() string {
	c := e.Reason.Code()
	s := fmt.Sprintf("scsi: %s (key %#x asc %#02x ascq %#02x)", c.Text, c.Key, c.ASC, c.ASCQ)
	if e.Field != nil {
		where := "parameter list"
		if e.Field.InCDB {
			where = "cdb"
		}
		s += fmt.Sprintf(" at %s byte %d bit %d", where, e.Field.Byte, e.Field.Bit)
	}
	return s
}

// Check returns a CheckError for r with no field pointer.
func Check(r Reason) *CheckError { return &CheckError{Reason: r} }

// InvalidCDBField reports INVALID FIELD IN CDB pointing at byte/bit (bit -1: whole byte).
func InvalidCDBField(byteOff uint16, bit int8) *CheckError {
	return &CheckError{Reason: ReasonInvalidFieldInCDB, Field: &FieldPointer{InCDB: true, Byte: byteOff, Bit: bit}}
}

// InvalidParamField reports INVALID FIELD IN PARAMETER LIST pointing at byte/bit.
func InvalidParamField(byteOff uint16, bit int8) *CheckError {
	return &CheckError{Reason: ReasonInvalidFieldInParamList, Field: &FieldPointer{InCDB: false, Byte: byteOff, Bit: bit}}
}
