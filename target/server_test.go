package target

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/target/iscsi"
	"github.com/hasan-storage/hasan/target/scsi"
)

// The real LU satisfies the interface the server needs.
var _ LUN = (*scsi.LogicalUnit)(nil)

func pattern(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func TestLoginAndIO(t *testing.T) {
	srv, addr, lu := startWithLU(t, Config{}, TargetConfig{Alias: "disk"})
	ini := loginOK(t, addr, loginOpts{})
	data := pattern(4096, 1)
	if r := ini.write(0, 8, data); r.status != scsi.StatusGood || r.flags != 0 {
		t.Fatalf("write: %+v", r)
	}
	if !bytes.Equal(lu.bytes(8*512, 4096), data) {
		t.Fatal("LU did not receive the written data")
	}
	r := ini.read(0, 8, 4096)
	if r.status != scsi.StatusGood || !bytes.Equal(r.data, data) {
		t.Fatalf("read back: status %v, %d bytes", r.status, len(r.data))
	}
	s := srv.Sessions()
	if len(s) != 1 || s[0].InitiatorName != testInitiatorName || s[0].TargetName != testIQN || s[0].TSIH == 0 {
		t.Fatalf("Sessions() = %+v", s)
	}
	if err := ini.logout(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return lu.lostCount() == 1 && len(srv.Sessions()) == 0 }, "NexusLost after logout")
}

func waitFor(t testing.TB, cond func() bool, what string) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

// TestWriteBurstSettings runs large writes through every mix of immediate
// data, unsolicited Data-Out and R2T bursts.
func TestWriteBurstSettings(t *testing.T) {
	cases := []struct {
		name string
		cfg  Config
		ops  []iscsi.KV
	}{
		{"immediate+unsolicited", Config{}, []iscsi.KV{{Key: "ImmediateData", Value: "Yes"}, {Key: "InitialR2T", Value: "No"},
			{Key: "FirstBurstLength", Value: "65536"}, {Key: "MaxBurstLength", Value: "131072"}, {Key: "MaxRecvDataSegmentLength", Value: "8192"}}},
		{"r2t-only", Config{}, []iscsi.KV{{Key: "ImmediateData", Value: "No"}, {Key: "InitialR2T", Value: "Yes"},
			{Key: "MaxBurstLength", Value: "16384"}, {Key: "MaxOutstandingR2T", Value: "4"}}},
		{"immediate+r2t", Config{}, []iscsi.KV{{Key: "ImmediateData", Value: "Yes"}, {Key: "InitialR2T", Value: "Yes"},
			{Key: "MaxBurstLength", Value: "512"}}},
		{"server-forces-r2t", Config{InitialR2T: true, NoImmediateData: true, MaxRecvDataSegmentLength: 4096, MaxBurstLength: 8192},
			[]iscsi.KV{{Key: "ImmediateData", Value: "Yes"}, {Key: "InitialR2T", Value: "No"}, {Key: "MaxBurstLength", Value: "1048576"}}},
		{"small-first-burst", Config{FirstBurstLength: 4096}, []iscsi.KV{{Key: "InitialR2T", Value: "No"},
			{Key: "FirstBurstLength", Value: "262144"}, {Key: "MaxBurstLength", Value: "65536"}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, addr, lu := startWithLU(t, tc.cfg, TargetConfig{})
			ini := loginOK(t, addr, loginOpts{ops: tc.ops})
			if tc.cfg.InitialR2T && !ini.initialR2T || tc.cfg.NoImmediateData && ini.immediateData {
				t.Fatalf("server preferences not enforced: InitialR2T=%v ImmediateData=%v", ini.initialR2T, ini.immediateData)
			}
			for i, size := range []int{512, 4096, 65536 + 512, 300 * 1024} {
				data := pattern(size, uint64(i))
				if r := ini.write(0, 100, data); r.status != scsi.StatusGood {
					t.Fatalf("write %d: %+v", size, r)
				}
				if !bytes.Equal(lu.bytes(100*512, size), data) {
					t.Fatalf("write %d: data mismatch", size)
				}
				if r := ini.read(0, 100, size); !bytes.Equal(r.data, data) {
					t.Fatalf("read %d: mismatch", size)
				}
			}
		})
	}
}

func TestDigests(t *testing.T) {
	_, addr, _ := startWithLU(t, Config{}, TargetConfig{})
	ini := loginOK(t, addr, loginOpts{ops: []iscsi.KV{{Key: "HeaderDigest", Value: "CRC32C"}, {Key: "DataDigest", Value: "CRC32C"},
		{Key: "MaxRecvDataSegmentLength", Value: "4096"}}})
	if !ini.hd || !ini.dd {
		t.Fatal("digests not negotiated")
	}
	data := pattern(20000, 3)
	data = data[:len(data)/512*512]
	ini.write(0, 0, data)
	if r := ini.read(0, 0, len(data)); !bytes.Equal(r.data, data) {
		t.Fatal("read with digests mismatched")
	}
	// A corrupted header digest drops the connection.
	p := &iscsi.PDU{}
	p.BHS.SetOpcode(iscsi.OpNopOut, true)
	p.BHS.SetFlags(iscsi.FlagFinal)
	p.BHS.SetITT(1)
	p.BHS.SetTTT(iscsi.ReservedTag)
	wire := iscsi.AppendPDU(nil, p, true, true)
	wire[BHSDigestOffset] ^= 0xff
	ini.nc.Write(wire)
	if err := ini.expectClosed(2 * time.Second); err != nil {
		t.Fatal(err)
	}
}

// BHSDigestOffset is where the header digest starts on the wire.
const BHSDigestOffset = iscsi.BHSLen

func TestDataDigestErrorRejects(t *testing.T) {
	_, addr, _ := startWithLU(t, Config{}, TargetConfig{})
	ini := loginOK(t, addr, loginOpts{ops: []iscsi.KV{{Key: "HeaderDigest", Value: "CRC32C"}, {Key: "DataDigest", Value: "CRC32C"}}})
	p := &iscsi.PDU{Data: []byte("ping")}
	p.BHS.SetOpcode(iscsi.OpNopOut, true)
	p.BHS.SetFlags(iscsi.FlagFinal)
	p.BHS.SetITT(5)
	p.BHS.SetTTT(iscsi.ReservedTag)
	p.BHS.SetCmdSN(ini.cmdSN)
	wire := iscsi.AppendPDU(nil, p, true, true)
	wire[len(wire)-1] ^= 0xff // data digest
	ini.nc.Write(wire)
	r, err := ini.recv(2 * time.Second)
	if err != nil || r.BHS.Opcode() != iscsi.OpReject || r.BHS.RejectReason() != 0x02 {
		t.Fatalf("got %v err %v, want Reject(data digest)", r, err)
	}
	// The session goes on.
	if res := ini.read(0, 0, 512); res.status != scsi.StatusGood {
		t.Fatal("session unusable after data digest reject")
	}
}

func TestCHAP(t *testing.T) {
	chap := &CHAP{User: "alice", Secret: "alice-secret-1"}
	mutual := &CHAP{User: "target", Secret: "target-secret-2"}
	_, addr, _ := startWithLU(t, Config{}, TargetConfig{CHAP: chap, MutualCHAP: mutual})
	t.Run("one-way", func(t *testing.T) {
		ini := loginOK(t, addr, loginOpts{chapUser: "alice", chapSecret: "alice-secret-1"})
		ini.read(0, 0, 512)
	})
	t.Run("mutual", func(t *testing.T) {
		loginOK(t, addr, loginOpts{chapUser: "alice", chapSecret: "alice-secret-1", mutualUser: "target", mutualSecret: "target-secret-2"})
	})
	for name, o := range map[string]loginOpts{
		"wrong-secret": {target: testIQN, chapUser: "alice", chapSecret: "wrong-secret-9"},
		"wrong-user":   {target: testIQN, chapUser: "mallory", chapSecret: "alice-secret-1"},
		"no-chap":      {target: testIQN},
		"reflected":    {target: testIQN, chapUser: "alice", chapSecret: "alice-secret-1", reflect: true},
	} {
		t.Run(name, func(t *testing.T) {
			st, err := dial(t, addr).login(o)
			if st != 0x0201 {
				t.Fatalf("status %#04x err %v, want 0x0201", st, err)
			}
		})
	}
}

func TestCHAPSecretRedacted(t *testing.T) {
	c := CHAP{User: "u", Secret: "supersecretvalue"}
	for _, s := range []string{fmt.Sprint(c), fmt.Sprintf("%v %+v %#v", c, &c, c), c.LogValue().String()} {
		if strings.Contains(s, "supersecretvalue") {
			t.Fatalf("secret leaked: %s", s)
		}
	}
}

func TestLoginStatusCodes(t *testing.T) {
	srv, addr, _ := startWithLU(t, Config{}, TargetConfig{AllowedInitiators: []string{"iqn.2026-11.io.hasan:other"}})
	if st, _ := dial(t, addr).login(loginOpts{target: testIQN}); st != 0x0202 {
		t.Fatalf("ACL denial: status %#04x, want 0x0202", st)
	}
	if st, _ := dial(t, addr).login(loginOpts{target: "iqn.2026-11.io.hasan:nope"}); st != 0x0203 {
		t.Fatalf("unknown target: status %#04x, want 0x0203", st)
	}
	// ACL updated at runtime: the next login passes.
	if err := srv.UpdateTarget(TargetConfig{Name: testIQN, AllowedInitiators: []string{testInitiatorName}}); err != nil {
		t.Fatal(err)
	}
	loginOK(t, addr, loginOpts{})
	// Missing InitiatorName: 0x0207.
	ini := dial(t, addr)
	_, st, err := ini.loginPDU(0, 1, true, []iscsi.KV{{Key: "TargetName", Value: testIQN}, {Key: "AuthMethod", Value: "None"}})
	if st != 0x0207 {
		t.Fatalf("missing InitiatorName: %#04x %v", st, err)
	}
}

func TestDiscoveryFilteredByACL(t *testing.T) {
	srv, addr := startServer(t, Config{})
	for _, tc := range []TargetConfig{
		{Name: "iqn.2026-11.io.hasan:open"},
		{Name: "iqn.2026-11.io.hasan:mine", AllowedInitiators: []string{testInitiatorName}, TPGT: 7},
		{Name: "iqn.2026-11.io.hasan:theirs", AllowedInitiators: []string{"iqn.2026-11.io.hasan:someone"}},
	} {
		if err := srv.AddTarget(tc); err != nil {
			t.Fatal(err)
		}
	}
	ini := loginOK(t, addr, loginOpts{discovery: true})
	p := &iscsi.PDU{Data: iscsi.AppendText(nil, []iscsi.KV{{Key: "SendTargets", Value: "All"}})}
	p.BHS.SetOpcode(iscsi.OpTextReq, true)
	p.BHS.SetFlags(iscsi.FlagFinal)
	p.BHS.SetITT(ini.nextITT())
	p.BHS.SetTTT(iscsi.ReservedTag)
	p.BHS.SetCmdSN(ini.cmdSN)
	ini.send(p)
	r, err := ini.recv(2 * time.Second)
	if err != nil || r.BHS.Opcode() != iscsi.OpTextResp {
		t.Fatalf("text response: %v %v", r, err)
	}
	got := string(bytes.ReplaceAll(r.Data, []byte{0}, []byte{'\n'}))
	want := "TargetName=iqn.2026-11.io.hasan:mine\nTargetAddress=" + addr + ",7\n" +
		"TargetName=iqn.2026-11.io.hasan:open\nTargetAddress=" + addr + ",1\n"
	if got != want {
		t.Fatalf("SendTargets:\n%s\nwant:\n%s", got, want)
	}
	// SCSI commands are not allowed in a discovery session.
	c := &iscsi.PDU{}
	c.BHS.SetOpcode(iscsi.OpSCSICmd, true)
	c.BHS.SetFlags(iscsi.FlagFinal)
	ini.send(c)
	if r, err := ini.recv(2 * time.Second); err != nil || r.BHS.Opcode() != iscsi.OpReject {
		t.Fatalf("SCSI in discovery: %v %v", r, err)
	}
}

func TestNopInTimeoutDropsDeadInitiator(t *testing.T) {
	_, addr, lu := startWithLU(t, Config{NopInInterval: 30 * time.Millisecond, NopInTimeout: 150 * time.Millisecond}, TargetConfig{})
	dead := loginOK(t, addr, loginOpts{})
	dead.answerPings = false
	alive := dial(t, addr)
	alive.isid[5] = 2
	if st, err := alive.login(loginOpts{target: testIQN}); st != 0 || err != nil {
		t.Fatal(st, err)
	}
	// The live initiator keeps working (answering pings as it reads)
	// while the dead one is detected.
	aliveErr := make(chan error, 1)
	go func() {
		for i := 0; i < 15; i++ {
			r, err := alive.command(0, cdb10(0x28, 0, 1), true, nil, 512)
			if err != nil || r.status != scsi.StatusGood {
				aliveErr <- fmt.Errorf("live session broken: %v %v", r, err)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		aliveErr <- nil
	}()
	start := time.Now()
	if err := dead.expectClosed(3 * time.Second); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el < 150*time.Millisecond {
		t.Fatalf("dropped after %v, before the timeout", el)
	}
	if err := <-aliveErr; err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return lu.lostCount() >= 1 }, "NexusLost for the dead initiator")
}

func nop(ini *initiator, immediate bool, itt uint32, payload []byte) {
	p := &iscsi.PDU{Data: payload}
	p.BHS.SetOpcode(iscsi.OpNopOut, immediate)
	p.BHS.SetFlags(iscsi.FlagFinal)
	p.BHS.SetITT(itt)
	p.BHS.SetTTT(iscsi.ReservedTag)
	p.BHS.SetCmdSN(ini.cmdSN)
	if !immediate {
		ini.cmdSN++
	}
	ini.send(p)
}

// TestNopOutAdvancesCmdSN: a non-immediate NOP-Out consumes a CmdSN; a
// target that forgets this (gotgt) stalls the initiator.
func TestNopOutAdvancesCmdSN(t *testing.T) {
	_, addr, _ := startWithLU(t, Config{CmdWindow: 4}, TargetConfig{})
	ini := loginOK(t, addr, loginOpts{})
	for i := 0; i < 10; i++ {
		nop(ini, false, ini.nextITT(), []byte("echo"))
		r, err := ini.recv(2 * time.Second)
		if err != nil || r.BHS.Opcode() != iscsi.OpNopIn || string(r.Data) != "echo" {
			t.Fatalf("NOP-In: %v %v", r, err)
		}
		if r.BHS.ExpCmdSN() != ini.cmdSN {
			t.Fatalf("ExpCmdSN %d after non-immediate NOP-Out, want %d", r.BHS.ExpCmdSN(), ini.cmdSN)
		}
	}
	// A ping with ITT 0xffffffff gets no answer; the next command still works.
	nop(ini, true, iscsi.ReservedTag, nil)
	if r := ini.read(0, 0, 512); r.status != scsi.StatusGood {
		t.Fatal("read after ITT=0xffffffff ping failed")
	}
}

func TestCmdSNWindow(t *testing.T) {
	_, addr, _ := startWithLU(t, Config{CmdWindow: 8}, TargetConfig{})
	ini := loginOK(t, addr, loginOpts{})
	// Outside the window (too high and too low): silently dropped.
	for _, sn := range []uint32{ini.cmdSN + 8, ini.cmdSN - 1} {
		p := &iscsi.PDU{}
		p.BHS.SetOpcode(iscsi.OpSCSICmd, false)
		p.BHS.SetFlags(iscsi.FlagFinal)
		p.BHS.SetITT(0xabc)
		p.BHS.SetCmdSN(sn)
		ini.send(p)
	}
	if _, err := ini.recv(200 * time.Millisecond); err == nil {
		t.Fatal("answer to a command outside the CmdSN window")
	}
	// Out of order inside the window: held until the gap fills, then both
	// run.
	first, second := ini.cmdSN, ini.cmdSN+1
	send := func(sn, itt uint32) {
		p := &iscsi.PDU{}
		p.BHS.SetOpcode(iscsi.OpSCSICmd, false)
		p.BHS.SetFlags(iscsi.FlagFinal)
		p.BHS.SetITT(itt)
		p.BHS.SetCmdSN(sn)
		ini.send(p)
	}
	send(second, 0x2)
	if _, err := ini.recv(200 * time.Millisecond); err == nil {
		t.Fatal("command beyond a CmdSN gap ran early")
	}
	send(first, 0x1)
	seen := map[uint32]bool{}
	for i := 0; i < 2; i++ {
		r, err := ini.recv(2 * time.Second)
		if err != nil || r.BHS.Opcode() != iscsi.OpSCSIResp {
			t.Fatalf("response %d: %v %v", i, r, err)
		}
		seen[r.BHS.ITT()] = true
		if i == 1 && r.BHS.ExpCmdSN() != second+1 {
			t.Fatalf("ExpCmdSN %d, want %d", r.BHS.ExpCmdSN(), second+1)
		}
	}
	if !seen[1] || !seen[2] {
		t.Fatalf("responses %v", seen)
	}
}

func tmf(ini *initiator, fn uint8, lun uint64, rtt uint32) *iscsi.PDU {
	p := &iscsi.PDU{}
	p.BHS.SetOpcode(iscsi.OpTaskMgmtReq, true)
	p.BHS.SetFlags(iscsi.FlagFinal | fn)
	p.BHS.SetLUN(scsi.EncodeLUN(lun))
	p.BHS.SetITT(ini.nextITT())
	p.BHS.SetRefTaskTag(rtt)
	p.BHS.SetCmdSN(ini.cmdSN)
	ini.send(p)
	return p
}

func TestTMFAbortTask(t *testing.T) {
	_, addr, lu := startWithLU(t, Config{}, TargetConfig{})
	lu.gate = make(chan struct{})
	lu.entered = make(chan uint32, 4)
	ini := loginOK(t, addr, loginOpts{})
	itt := ini.itt + 1
	p := &iscsi.PDU{}
	p.BHS.SetOpcode(iscsi.OpSCSICmd, false)
	p.BHS.SetFlags(iscsi.FlagFinal | iscsi.FlagRead)
	p.BHS.SetITT(ini.nextITT())
	p.BHS.SetCmdSN(ini.cmdSN)
	p.BHS.SetExpectedDataTransferLength(512)
	copy(p.BHS.CDB(), cdb10(0x28, 0, 1))
	ini.cmdSN++
	ini.send(p)
	<-lu.entered
	tm := tmf(ini, tmfAbortTask, 0, itt)
	r, err := ini.recv(2 * time.Second)
	if err != nil || r.BHS.Opcode() != iscsi.OpTaskMgmtResp || r.BHS.ITT() != tm.BHS.ITT() || r.BHS.Response() != tmfRespComplete {
		t.Fatalf("abort response: %+v %v", r, err)
	}
	// No response for the aborted task; later commands work.
	close(lu.gate)
	lu.entered = nil
	if res := ini.read(0, 0, 512); res.status != scsi.StatusGood {
		t.Fatal("read after abort failed")
	}
	tmf(ini, tmfAbortTask, 0, 0xdead)
	if r, _ := ini.recv(2 * time.Second); r == nil || r.BHS.Response() != tmfRespNoTask {
		t.Fatalf("abort of unknown task: %+v", r)
	}
	tmf(ini, tmfLUNReset, 0, 0)
	if r, _ := ini.recv(2 * time.Second); r == nil || r.BHS.Response() != tmfRespComplete {
		t.Fatalf("LUN reset: %+v", r)
	}
	tmf(ini, tmfLUNReset, 9, 0)
	if r, _ := ini.recv(2 * time.Second); r == nil || r.BHS.Response() != tmfRespNoLUN {
		t.Fatalf("LUN reset of missing LUN: %+v", r)
	}
	tmf(ini, tmfClearACA, 0, 0)
	if r, _ := ini.recv(2 * time.Second); r == nil || r.BHS.Response() != tmfRespNotSupp {
		t.Fatalf("CLEAR ACA: %+v", r)
	}
	tmf(ini, tmfTargetWarm, 0, 0)
	if r, _ := ini.recv(2 * time.Second); r == nil || r.BHS.Response() != tmfRespComplete {
		t.Fatalf("warm reset: %+v", r)
	}
	lu.mu.Lock()
	resets := append([]scsi.ResetKind(nil), lu.resets...)
	lu.mu.Unlock()
	if len(resets) != 2 || resets[0] != scsi.ResetLUN || resets[1] != scsi.ResetTargetWarm {
		t.Fatalf("LU resets %v", resets)
	}
	tmf(ini, tmfTargetCold, 0, 0)
	if r, _ := ini.recv(2 * time.Second); r == nil || r.BHS.Response() != tmfRespComplete {
		t.Fatalf("cold reset: %+v", r)
	}
	if err := ini.expectClosed(2 * time.Second); err != nil {
		t.Fatalf("cold reset kept the connection: %v", err)
	}
}

func TestResidualsAndReportLUNs(t *testing.T) {
	srv, addr, _ := startWithLU(t, Config{}, TargetConfig{})
	if err := srv.AddLUN(testIQN, 3, newMemLU(1<<20)); err != nil {
		t.Fatal(err)
	}
	ini := loginOK(t, addr, loginOpts{})
	// READ of 2 blocks with EDTL of 1 block: overflow, data cut.
	r, err := ini.command(0, cdb10(0x28, 0, 2), true, nil, 512)
	if err != nil || r.flags != iscsi.FlagOverflow || r.residual != 512 || len(r.data) != 512 {
		t.Fatalf("overflow: %+v %v", r, err)
	}
	r, err = ini.command(0, cdb10(0x28, 0, 1), true, nil, 4096)
	if err != nil || r.flags != iscsi.FlagUnderflow || r.residual != 4096-512 || len(r.data) != 512 {
		t.Fatalf("underflow: %+v %v", r, err)
	}
	rl := make([]byte, 16)
	rl[0], rl[9] = 0xA0, 64
	r, err = ini.command(5, rl, true, nil, 64)
	if err != nil || r.status != scsi.StatusGood || len(r.data) != 24 || r.data[3] != 16 || r.data[8+8+1] != 3 {
		t.Fatalf("REPORT LUNS: %+v %v", r, err)
	}
	r, err = ini.command(7, cdb10(0x28, 0, 1), true, nil, 512)
	if err != nil || r.status != scsi.StatusCheckCondition || len(r.sense) < 14 || r.sense[12] != 0x25 {
		t.Fatalf("missing LUN: %+v %v", r, err)
	}
}

func TestConcurrentSessions(t *testing.T) {
	_, addr, lu := startWithLU(t, Config{}, TargetConfig{})
	lu.delay = time.Millisecond
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for s := 0; s < 4; s++ {
		ini := dial(t, addr)
		ini.isid[5] = byte(s + 1)
		if st, err := ini.login(loginOpts{target: testIQN}); st != 0 || err != nil {
			t.Fatal(st, err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			lba := uint32(1000 * (s + 1))
			for i := 0; i < 20; i++ {
				data := pattern(4096, uint64(s*100+i))
				w, err := ini.command(0, cdb10(0x2a, lba, 8), false, data, 4096)
				if err != nil || w.status != scsi.StatusGood {
					errs <- fmt.Errorf("session %d write: %v %v", s, w, err)
					return
				}
				r, err := ini.command(0, cdb10(0x28, lba, 8), true, nil, 4096)
				if err != nil || !bytes.Equal(r.data, data) {
					errs <- fmt.Errorf("session %d read mismatch: %v", s, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// pipeline sends n READs without waiting, then collects the responses.
func pipeline(ini *initiator, n int) error {
	for i := 0; i < n; i++ {
		p := &iscsi.PDU{}
		p.BHS.SetOpcode(iscsi.OpSCSICmd, false)
		p.BHS.SetFlags(iscsi.FlagFinal | iscsi.FlagRead)
		p.BHS.SetITT(ini.nextITT())
		p.BHS.SetCmdSN(ini.cmdSN)
		p.BHS.SetExpectedDataTransferLength(512)
		copy(p.BHS.CDB(), cdb10(0x28, uint32(i), 1))
		ini.cmdSN++
		if err := iscsi.WritePDU(ini.nc, p, false, false); err != nil {
			return err
		}
	}
	for i := 0; i < n; i++ {
		if _, err := ini.recv(5 * time.Second); err != nil {
			return err
		}
	}
	return nil
}

func TestQueueDepthRunsConcurrently(t *testing.T) {
	_, addr, lu := startWithLU(t, Config{}, TargetConfig{})
	lu.delay = 20 * time.Millisecond
	ini := loginOK(t, addr, loginOpts{})
	start := time.Now()
	if err := pipeline(ini, 32); err != nil {
		t.Fatal(err)
	}
	if p := lu.peak.Load(); p < 8 {
		t.Fatalf("peak concurrency %d at queue depth 32", p)
	}
	if el := time.Since(start); el > 32*20*time.Millisecond/2 {
		t.Fatalf("32 commands took %v: not concurrent", el)
	}
}

// TestCloseUnderLoad: Close returns only once no Execute is running, and
// none starts afterwards.
func TestCloseUnderLoad(t *testing.T) {
	srv, addr, lu := startWithLU(t, Config{}, TargetConfig{})
	lu.delay = 2 * time.Millisecond
	var wg sync.WaitGroup
	for s := 0; s < 4; s++ {
		ini := dial(t, addr)
		ini.isid[5] = byte(s + 1)
		if st, err := ini.login(loginOpts{target: testIQN}); st != 0 || err != nil {
			t.Fatal(st, err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for pipeline(ini, 16) == nil {
			}
		}()
	}
	waitFor(t, func() bool { return lu.inflight.Load() > 4 }, "load")
	srv.Close()
	if n := lu.inflight.Load(); n != 0 {
		t.Fatalf("Close returned with %d Execute calls running", n)
	}
	calls := lu.calls.Load()
	time.Sleep(50 * time.Millisecond)
	if lu.calls.Load() != calls {
		t.Fatal("Execute called after Close returned")
	}
	wg.Wait()
	if err := srv.AddTarget(TargetConfig{Name: "iqn.2026-11.io.hasan:late"}); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("AddTarget after Close: %v", err)
	}
}

func TestRemoveLUNWaitsForCommands(t *testing.T) {
	srv, addr, lu := startWithLU(t, Config{}, TargetConfig{})
	other := newMemLU(1 << 20)
	if err := srv.AddLUN(testIQN, 1, other); err != nil {
		t.Fatal(err)
	}
	lu.gate = make(chan struct{})
	lu.entered = make(chan uint32, 1)
	ini := loginOK(t, addr, loginOpts{})
	go ini.command(0, cdb10(0x28, 0, 1), true, nil, 512)
	<-lu.entered
	removed := make(chan error, 1)
	go func() { removed <- srv.RemoveLUN(context.Background(), testIQN, 0) }()
	select {
	case err := <-removed:
		t.Fatalf("RemoveLUN returned (%v) while a command was in the LU", err)
	case <-time.After(100 * time.Millisecond):
	}
	close(lu.gate)
	if err := <-removed; err != nil {
		t.Fatal(err)
	}
	if lu.inflight.Load() != 0 {
		t.Fatal("RemoveLUN returned with a command running")
	}
	other.mu.Lock()
	changed := other.changed
	other.mu.Unlock()
	if changed != 1 {
		t.Fatalf("LUNsChanged called %d times on the remaining LUN", changed)
	}
	if err := srv.RemoveLUN(context.Background(), testIQN, 0); !errors.Is(err, ErrLUNNotFound) {
		t.Fatalf("second RemoveLUN: %v", err)
	}
}

func TestRemoveTargetClosesSessions(t *testing.T) {
	srv, addr, _ := startWithLU(t, Config{}, TargetConfig{})
	ini := loginOK(t, addr, loginOpts{})
	if err := srv.RemoveTarget(context.Background(), testIQN); err != nil {
		t.Fatal(err)
	}
	if err := ini.expectClosed(2 * time.Second); err != nil {
		t.Fatal(err)
	}
	if st, _ := dial(t, addr).login(loginOpts{target: testIQN}); st != 0x0203 {
		t.Fatalf("login to removed target: %#04x", st)
	}
}

func TestSessionReinstatement(t *testing.T) {
	srv, addr, lu := startWithLU(t, Config{}, TargetConfig{})
	old := loginOK(t, addr, loginOpts{})
	oldTSIH := old.tsih
	fresh := loginOK(t, addr, loginOpts{}) // same ISID, TSIH 0
	if err := old.expectClosed(2 * time.Second); err != nil {
		t.Fatalf("old session survived reinstatement: %v", err)
	}
	if fresh.tsih == oldTSIH {
		t.Fatal("reinstated session reused the TSIH")
	}
	if r := fresh.read(0, 0, 512); r.status != scsi.StatusGood {
		t.Fatal("new session unusable")
	}
	if lu.lostCount() != 1 {
		t.Fatalf("NexusLost called %d times", lu.lostCount())
	}
	if n := len(srv.Sessions()); n != 1 {
		t.Fatalf("%d sessions after reinstatement", n)
	}
	// A login naming a TSIH that does not exist: 0x020a.
	if st, _ := dial(t, addr).login(loginOpts{target: testIQN, tsih: 999}); st != 0x020a {
		t.Fatalf("bogus TSIH: %#04x", st)
	}
}

func TestMalformedPDUs(t *testing.T) {
	_, addr, lu := startWithLU(t, Config{MaxRecvDataSegmentLength: 4096}, TargetConfig{})
	ini := loginOK(t, addr, loginOpts{})
	p := &iscsi.PDU{}
	p.BHS.SetOpcode(0x1f, true) // no such opcode
	ini.send(p)
	r, err := ini.recv(2 * time.Second)
	if err != nil || r.BHS.Opcode() != iscsi.OpReject || r.BHS.RejectReason() != rejectNotSupported || len(r.Data) != 48 {
		t.Fatalf("unknown opcode: %+v %v", r, err)
	}
	p = &iscsi.PDU{}
	p.BHS.SetOpcode(iscsi.OpSNACKReq, true)
	ini.send(p)
	if r, err := ini.recv(2 * time.Second); err != nil || r.BHS.Opcode() != iscsi.OpReject {
		t.Fatalf("SNACK: %+v %v", r, err)
	}
	// A data segment above MaxRecvDataSegmentLength ends the connection.
	big := &iscsi.PDU{Data: make([]byte, 8192)}
	big.BHS.SetOpcode(iscsi.OpNopOut, true)
	big.BHS.SetITT(1)
	big.BHS.SetTTT(iscsi.ReservedTag)
	ini.send(big)
	if err := ini.expectClosed(2 * time.Second); err != nil {
		t.Fatal(err)
	}
	// A panicking LU closes only that connection.
	lu.panicOn = 0x12
	a := loginOK(t, addr, loginOpts{})
	b := dial(t, addr)
	b.isid[5] = 9
	if st, err := b.login(loginOpts{target: testIQN}); st != 0 || err != nil {
		t.Fatal(st, err)
	}
	inq := make([]byte, 16)
	inq[0], inq[4] = 0x12, 36
	a.command(0, inq, true, nil, 36)
	if err := a.expectClosed(2 * time.Second); err != nil {
		t.Fatal(err)
	}
	if r := b.read(0, 0, 512); r.status != scsi.StatusGood {
		t.Fatal("other session hurt by a panic")
	}
}

func TestShutdownAsksForLogout(t *testing.T) {
	srv, addr, _ := startWithLU(t, Config{}, TargetConfig{})
	ini := loginOK(t, addr, loginOpts{})
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		done <- srv.Shutdown(ctx)
	}()
	// Wait for the Async Message, then log out as an initiator would.
	for len(ini.async) == 0 {
		if _, err := ini.recv(2 * time.Second); err != nil {
			var ne interface{ Timeout() bool }
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			t.Fatalf("waiting for async message: %v", err)
		}
	}
	if ev := ini.async[0].AsyncEvent(); ev != 1 {
		t.Fatalf("async event %d, want 1 (logout requested)", ev)
	}
	if err := ini.logout(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

func TestLoginTimeout(t *testing.T) {
	_, addr, _ := startWithLU(t, Config{LoginTimeout: 100 * time.Millisecond}, TargetConfig{})
	ini := dial(t, addr)
	if err := ini.expectClosed(2 * time.Second); err != nil {
		t.Fatalf("half-open login kept: %v", err)
	}
}

func TestValidation(t *testing.T) {
	srv := NewServer(Config{})
	for _, tc := range []TargetConfig{
		{Name: "bogus"}, {Name: "iqn.20x6-11.io.hasan:x"}, {Name: "eui.123"}, {Name: "naa.12345"},
		{Name: testIQN, CHAP: &CHAP{User: "u"}},
		{Name: testIQN, MutualCHAP: &CHAP{User: "u", Secret: "s"}},
		{Name: testIQN, AllowedInitiators: []string{"nope"}},
	} {
		if err := srv.AddTarget(tc); err == nil {
			t.Errorf("%+v accepted", tc)
		}
	}
	for _, ok := range []string{testIQN, "eui.0123456789ABCDEF", "naa.52004567BA64678D", "iqn.1993-08.org.debian:01:abc"} {
		if err := ValidateName(ok); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
	if err := srv.AddTarget(TargetConfig{Name: testIQN}); err != nil {
		t.Fatal(err)
	}
	if err := srv.AddTarget(TargetConfig{Name: testIQN}); !errors.Is(err, ErrTargetExists) {
		t.Fatalf("duplicate target: %v", err)
	}
	if err := srv.AddLUN("iqn.2026-11.io.hasan:none", 0, newMemLU(512)); !errors.Is(err, ErrTargetNotFound) {
		t.Fatalf("AddLUN to missing target: %v", err)
	}
	if err := (Config{MaxRecvDataSegmentLength: 100}).Validate(); err == nil || !strings.Contains(err.Error(), "MaxRecvDataSegmentLength") {
		t.Fatalf("bad MRDSL: %v", err)
	}
}

// TestHostileStreams throws random bytes at a fresh connection and at a
// logged-in one; the server must drop them without harm to other sessions.
func TestHostileStreams(t *testing.T) {
	_, addr, _ := startWithLU(t, Config{LoginTimeout: time.Second}, TargetConfig{})
	r := rand.New(rand.NewPCG(7, 7))
	for i := 0; i < 20; i++ {
		junk := make([]byte, 48+r.IntN(400))
		for j := range junk {
			junk[j] = byte(r.Uint32())
		}
		if i%2 == 0 {
			junk[0] = byte(iscsi.OpLoginReq) | 0x40 // get past the opcode check
		}
		ini := dial(t, addr)
		if i%3 == 0 {
			ini = loginOK(t, addr, loginOpts{})
			junk[0] &= 0x7f
		}
		ini.nc.Write(junk)
		ini.nc.Close()
	}
	if res := loginOK(t, addr, loginOpts{}).read(0, 0, 512); res.status != scsi.StatusGood {
		t.Fatal("server unusable after hostile streams")
	}
}
