package initiator

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
)

// Command is one SCSI command.
type Command struct {
	CDB []byte // up to 16 bytes
	// Out is the data to write (nil for none).
	Out []byte
	// InLen is the expected Data-In length (0 for none).
	InLen int
}

// Do runs cmd within ctx (give it the I/O deadline) and returns the data
// read. A status other than GOOD is a *CheckError. Any other error leaves the
// session unusable: close it and log in again.
func (s *Session) Do(ctx context.Context, cmd Command) ([]byte, error) {
	var data []byte
	err := s.withDeadline(ctx, func() error {
		var err error
		data, err = s.do(cmd)
		return err
	})
	return data, err
}

func (s *Session) do(cmd Command) ([]byte, error) {
	if len(cmd.CDB) > 16 {
		return nil, errors.New("initiator: CDB longer than 16 bytes")
	}
	s.itt++
	if s.itt == reservedTag {
		s.itt = 1
	}
	itt := s.itt
	p := &pdu{}
	h := &p.h
	h[0] = opSCSICmd
	h[1] = 0x80 | 1 // Final, SIMPLE task attribute
	if cmd.InLen > 0 {
		h[1] |= 0x40
	}
	if cmd.Out != nil {
		h[1] |= 0x20
	}
	lun := encodeLUN(s.cfg.LUN)
	copy(h[8:16], lun[:])
	h.put32(16, itt)
	h.put32(20, uint32(max(cmd.InLen, len(cmd.Out))))
	h.put32(24, s.cmdSN)
	h.put32(28, s.expStatSN)
	copy(h[32:48], cmd.CDB)
	s.cmdSN++

	// Immediate data, then unsolicited Data-Out up to FirstBurstLength;
	// the rest waits for R2Ts.
	sent := 0
	unsolicited := 0
	if cmd.Out != nil && !s.initialR2T {
		unsolicited = min(s.firstBurst, len(cmd.Out))
	}
	if cmd.Out != nil && s.immediateData {
		sent = min(s.maxSendData, s.firstBurst, len(cmd.Out))
		p.data = cmd.Out[:sent]
	}
	if sent < unsolicited {
		h[1] &^= 0x80
	}
	if err := writePDU(s.conn, p); err != nil {
		return nil, fmt.Errorf("initiator: send command: %w", err)
	}
	if sent < unsolicited {
		if err := s.sendData(cmd.Out, itt, reservedTag, sent, unsolicited-sent); err != nil {
			return nil, err
		}
	}

	var in []byte
	if cmd.InLen > 0 {
		in = make([]byte, 0, cmd.InLen)
	}
	for {
		r, err := readPDU(s.r, ourMaxRecv)
		if err != nil {
			return nil, fmt.Errorf("initiator: read response: %w", err)
		}
		switch r.h.opcode() {
		case opNopIn:
			if err := s.answerNop(r); err != nil {
				return nil, err
			}
			continue
		case opAsync:
			s.expStatSN = r.h.statSN() + 1
			s.AsyncEvents++
			continue
		case opReject:
			return nil, fmt.Errorf("%w (reason %#02x)", ErrRejected, r.h[2])
		}
		if r.h.itt() != itt {
			return nil, fmt.Errorf("initiator: opcode %#02x for task %#x, expected %#x", r.h.opcode(), r.h.itt(), itt)
		}
		switch r.h.opcode() {
		case opR2T:
			off := int(r.h.u32(40))
			n := int(r.h.u32(44))
			if off+n > len(cmd.Out) {
				return nil, fmt.Errorf("initiator: R2T for bytes %d..%d of %d", off, off+n, len(cmd.Out))
			}
			if err := s.sendData(cmd.Out, itt, r.h.ttt(), off, n); err != nil {
				return nil, err
			}
		case opDataIn:
			if off := int(r.h.u32(40)); off != len(in) {
				return nil, fmt.Errorf("initiator: Data-In at offset %d, expected %d", off, len(in))
			}
			if len(in)+len(r.data) > cmd.InLen {
				return nil, fmt.Errorf("initiator: more Data-In than the %d bytes asked for", cmd.InLen)
			}
			in = append(in, r.data...)
			if r.h.flags()&0x01 != 0 { // S: status included
				s.expStatSN = r.h.statSN() + 1
				if st := r.h[3]; st != 0 {
					return nil, &CheckError{Status: st}
				}
				return in, nil
			}
		case opSCSIResp:
			s.expStatSN = r.h.statSN() + 1
			if resp := r.h[2]; resp != 0 {
				return nil, fmt.Errorf("initiator: iSCSI response %#02x (target failure)", resp)
			}
			if st := r.h[3]; st != 0 {
				return nil, checkError(st, r.data)
			}
			return in, nil
		default:
			return nil, fmt.Errorf("initiator: unexpected opcode %#02x", r.h.opcode())
		}
	}
}

// sendData sends out[off:off+n] as Data-Out PDUs of at most the target's
// MaxRecvDataSegmentLength.
func (s *Session) sendData(out []byte, itt, ttt uint32, off, n int) error {
	var dataSN uint32
	for done := 0; done < n; {
		m := min(s.maxSendData, n-done)
		d := &pdu{data: out[off+done : off+done+m]}
		d.h[0] = opDataOut
		if done+m == n {
			d.h[1] = 0x80
		}
		lun := encodeLUN(s.cfg.LUN)
		copy(d.h[8:16], lun[:])
		d.h.put32(16, itt)
		d.h.put32(20, ttt)
		d.h.put32(28, s.expStatSN)
		d.h.put32(36, dataSN)
		d.h.put32(40, uint32(off+done))
		if err := writePDU(s.conn, d); err != nil {
			return fmt.Errorf("initiator: send data: %w", err)
		}
		dataSN++
		done += m
	}
	return nil
}

// answerNop replies to a target ping (TTT set); unsolicited NOP-Ins without
// a TTT need no answer.
func (s *Session) answerNop(r *pdu) error {
	if r.h.ttt() == reservedTag {
		return nil
	}
	q := &pdu{}
	q.h[0] = 0x40 | opNopOut
	q.h[1] = 0x80
	copy(q.h[8:16], r.h[8:16])
	q.h.put32(16, reservedTag)
	q.h.put32(20, r.h.ttt())
	q.h.put32(24, s.cmdSN)
	q.h.put32(28, s.expStatSN)
	if err := writePDU(s.conn, q); err != nil {
		return fmt.Errorf("initiator: answer NOP-In: %w", err)
	}
	return nil
}

func checkError(status byte, data []byte) *CheckError {
	e := &CheckError{Status: status}
	if len(data) < 2 {
		return e
	}
	n := int(binary.BigEndian.Uint16(data))
	sense := data[2:]
	if n < len(sense) {
		sense = sense[:n]
	}
	e.Sense = append([]byte(nil), sense...)
	if len(sense) == 0 {
		return e
	}
	switch sense[0] & 0x7f {
	case 0x70, 0x71: // fixed format
		if len(sense) > 2 {
			e.Key = sense[2] & 0x0f
		}
		if len(sense) > 13 {
			e.ASC, e.ASCQ = sense[12], sense[13]
		}
	case 0x72, 0x73: // descriptor format
		if len(sense) > 3 {
			e.Key, e.ASC, e.ASCQ = sense[1]&0x0f, sense[2], sense[3]
		}
	}
	return e
}

// ReadCapacity10 returns the number of blocks and the block size.
func (s *Session) ReadCapacity10(ctx context.Context) (blocks uint64, blockSize uint32, err error) {
	data, err := s.Do(ctx, Command{CDB: []byte{0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0}, InLen: 8})
	if err != nil {
		return 0, 0, err
	}
	if len(data) < 8 {
		return 0, 0, fmt.Errorf("initiator: READ CAPACITY(10) returned %d bytes", len(data))
	}
	return uint64(binary.BigEndian.Uint32(data)) + 1, binary.BigEndian.Uint32(data[4:]), nil
}

// TestUnitReady sends TEST UNIT READY.
func (s *Session) TestUnitReady(ctx context.Context) error {
	_, err := s.Do(ctx, Command{CDB: make([]byte, 6)})
	return err
}

// Read10 reads blocks blocks of blockSize bytes at lba.
func (s *Session) Read10(ctx context.Context, lba uint32, blocks uint16, blockSize uint32) ([]byte, error) {
	cdb := make([]byte, 10)
	cdb[0] = 0x28
	binary.BigEndian.PutUint32(cdb[2:], lba)
	binary.BigEndian.PutUint16(cdb[7:], blocks)
	want := int(blocks) * int(blockSize)
	data, err := s.Do(ctx, Command{CDB: cdb, InLen: want})
	if err == nil && len(data) != want {
		err = fmt.Errorf("initiator: READ(10) returned %d of %d bytes", len(data), want)
	}
	return data, err
}

// Write10 writes data (whole blocks of blockSize) at lba; fua asks the
// target to make it durable before answering.
func (s *Session) Write10(ctx context.Context, lba uint32, data []byte, blockSize uint32, fua bool) error {
	if blockSize == 0 || len(data)%int(blockSize) != 0 || len(data) == 0 {
		return fmt.Errorf("initiator: WRITE(10) of %d bytes is not whole %d-byte blocks", len(data), blockSize)
	}
	cdb := make([]byte, 10)
	cdb[0] = 0x2a
	if fua {
		cdb[1] = 0x08
	}
	binary.BigEndian.PutUint32(cdb[2:], lba)
	binary.BigEndian.PutUint16(cdb[7:], uint16(len(data)/int(blockSize)))
	_, err := s.Do(ctx, Command{CDB: cdb, Out: data})
	return err
}

// Logout ends the session cleanly and closes the connection.
func (s *Session) Logout(ctx context.Context) error {
	defer s.conn.Close()
	return s.withDeadline(ctx, func() error {
		s.itt++
		p := &pdu{}
		p.h[0] = 0x40 | opLogoutReq
		p.h[1] = 0x80 // close the session
		p.h.put32(16, s.itt)
		p.h.put32(24, s.cmdSN)
		p.h.put32(28, s.expStatSN)
		if err := writePDU(s.conn, p); err != nil {
			return fmt.Errorf("initiator: logout: %w", err)
		}
		for {
			r, err := readPDU(s.r, ourMaxRecv)
			if err != nil {
				return fmt.Errorf("initiator: logout: %w", err)
			}
			switch r.h.opcode() {
			case opNopIn, opAsync:
				continue
			case opLogoutResp:
				if r.h[2] != 0 {
					return fmt.Errorf("initiator: logout response %d", r.h[2])
				}
				return nil
			default:
				return fmt.Errorf("initiator: logout: unexpected opcode %#02x", r.h.opcode())
			}
		}
	})
}

// ClearUnitAttention sends TEST UNIT READY until no UNIT ATTENTION is
// pending (a new session usually has POWER ON RESET queued) and returns how
// many it consumed, as a SCSI midlayer does after login.
func (s *Session) ClearUnitAttention(ctx context.Context) (int, error) {
	for n := 0; n < 16; n++ {
		err := s.TestUnitReady(ctx)
		var ce *CheckError
		if errors.As(err, &ce) && ce.UnitAttention() {
			continue
		}
		return n, err
	}
	return 16, errors.New("initiator: unit attention never cleared")
}
