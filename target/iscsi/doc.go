// Package iscsi is the wire layer of hasan's iSCSI target (RFC 7143): the
// PDU codec, the text key=value codec, operational-parameter negotiation,
// CHAP, and the CmdSN window. Everything here is pure: no sockets, no
// goroutines, no clocks. Package target owns the I/O shell.
//
// Reading, as the target's connection reader does it:
//
//	rd := iscsi.Reader{R: bufio.NewReader(conn), MaxDataSegment: params.MaxRecvDataSegmentLength}
//	var p iscsi.PDU
//	for {
//		if err := rd.ReadHeader(&p); err != nil { ... } // digest or limit errors end the connection
//		buf := taskBuffer(p.BHS)                       // read payloads straight into their destination
//		err := rd.ReadData(buf[:rd.DataLen()])          // ErrDataDigest: stream still in sync, Reject
//	}
//
// Writing appends into a reusable buffer; payloads can travel by reference
// (net.Buffers) between AppendHeader and AppendTrailer.
//
// Negotiation runs as
//
//	n := iscsi.NewNegotiator(iscsi.DefaultSettings())
//	resp, security, sendTargets, err := n.Step(kvs, stage) // per login request
//	resp = append(resp, n.Finish()...)                       // on the transition to full feature phase
//	params := n.Params
package iscsi
