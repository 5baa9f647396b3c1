// Package initiator is a small iSCSI initiator for probes and benchmarks:
// one session, one connection, one command at a time, no digests, error
// recovery level 0. It logs in (optionally with one-way CHAP), answers
// target NOP-In pings while a command runs, handles immediate, unsolicited
// and R2T-solicited data, and decodes sense data. Every call takes a
// context whose deadline bounds the whole exchange, which is what a
// failover probe needs: a login deadline and an I/O deadline.
//
//	s, err := initiator.Login(loginCtx, initiator.Config{Portal: "10.77.1.200:3260", Target: iqn})
//	if err != nil { /* count a failed login, retry */ }
//	defer s.Close()
//	blocks, bs, err := s.ReadCapacity10(ctx)
//	err = s.Write10(ioCtx, lba, buf, bs, true) // FUA
//	got, err := s.Read10(ioCtx, lba, 1, bs)
//
// After any error other than a *CheckError the session is unusable: close
// it and log in again. The PDU codec here is independent of target/iscsi,
// so a codec bug in the target cannot hide behind a matching bug in its
// probe.
package initiator
