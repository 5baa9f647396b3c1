package scsi

// reserve implements RESERVE(6) and RESERVE(10) (SPC-2 7.21/7.22): a whole-LU
// reservation for the sending I_T nexus. Third-party and extent reservations
// are not supported.
func (h *prHandler) reserve(n ITNexus, cdb []byte) (Status, error) {
	if e := checkSPC2CDB(cdb); e != nil {
		return StatusCheckCondition, e
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.st.Registrations) > 0 {
		// SPC-4 5.13.3 (CRH=1): registrations make RESERVE conflict.
		return StatusReservationConflict, nil
	}
	if h.spc2Held && h.spc2 != n {
		return StatusReservationConflict, nil
	}
	if !h.spc2Held {
		h.spc2, h.spc2Held = n, true
		h.publishLocked()
		h.log.Debug("scsi: spc-2 reserved", "initiator_port", n.InitiatorPortName())
	}
	return StatusGood, nil
}

// release implements RELEASE(6) and RELEASE(10). Releasing a reservation held
// by someone else, or none, is GOOD with no effect (SPC-2 7.17); with
// persistent reservations present it is GOOD with no effect as well (SPC-4
// 5.13.3, CRH=1).
func (h *prHandler) release(n ITNexus, cdb []byte) (Status, error) {
	if e := checkSPC2CDB(cdb); e != nil {
		return StatusCheckCondition, e
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.spc2Held && h.spc2 == n {
		h.spc2, h.spc2Held = ITNexus{}, false
		h.publishLocked()
		h.log.Debug("scsi: spc-2 released", "initiator_port", n.InitiatorPortName())
	}
	return StatusGood, nil
}

// checkSPC2CDB rejects the third-party (3RDPTY, LONGID) and extent forms.
func checkSPC2CDB(cdb []byte) *CheckError {
	if len(cdb) < 6 {
		return InvalidCDBField(0, -1)
	}
	switch cdb[0] {
	case prOpReserve6, prOpRelease6:
		// Byte 1: bit 4 3RDPTY, bits 3-1 third-party device ID, bit 0 EXTENT.
		if cdb[1]&0x10 != 0 {
			return InvalidCDBField(1, 4)
		}
		if cdb[1]&0x01 != 0 {
			return InvalidCDBField(1, 0)
		}
	case prOpReserve10, prOpRelease10:
		if len(cdb) < 10 {
			return InvalidCDBField(0, -1)
		}
		// Byte 1: bit 4 3RDPTY, bit 1 LONGID.
		if cdb[1]&0x10 != 0 {
			return InvalidCDBField(1, 4)
		}
		if cdb[1]&0x02 != 0 {
			return InvalidCDBField(1, 1)
		}
	}
	return nil
}
