package scsi

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// recordingUA collects unit attentions per nexus key.
type recordingUA struct {
	mu  sync.Mutex
	got map[string][]Reason
}

func (r *recordingUA) establishUA(key string, reason Reason) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.got == nil {
		r.got = make(map[string][]Reason)
	}
	r.got[key] = append(r.got[key], reason)
}

func (r *recordingUA) drain(key string) []Reason {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := r.got[key]
	delete(r.got, key)
	return out
}

// failingStore wraps a store and fails saves on demand.
type failingStore struct {
	PRStore
	fail bool
}

func (f *failingStore) SavePR(ctx context.Context, st PRState) error {
	if f.fail {
		return errors.New("injected save failure")
	}
	return f.PRStore.SavePR(ctx, st)
}

const prTestTarget = "iqn.2024-01.org.hasan:lu0"

// prTestNexuses are the simulated I_T nexuses: I1 and I3 share an initiator
// name with different ISIDs, I2 is another initiator, P2 is I1 through a
// second target port.
var prTestNexuses = map[string]ITNexus{
	"I1": {InitiatorName: "iqn.2024-01.org.test:host1", ISID: [6]byte{0x40, 0, 0, 0x01, 0, 0}, TargetName: prTestTarget, TPGT: 1, RelativePortID: 1},
	"I2": {InitiatorName: "iqn.2024-01.org.test:host2", ISID: [6]byte{0x40, 0, 0, 0x02, 0, 0}, TargetName: prTestTarget, TPGT: 1, RelativePortID: 1},
	"I3": {InitiatorName: "iqn.2024-01.org.test:host1", ISID: [6]byte{0x40, 0, 0, 0x03, 0, 0}, TargetName: prTestTarget, TPGT: 1, RelativePortID: 1},
	"P2": {InitiatorName: "iqn.2024-01.org.test:host1", ISID: [6]byte{0x40, 0, 0, 0x01, 0, 0}, TargetName: prTestTarget, TPGT: 2, RelativePortID: 2},
}

var prTypeNames = map[string]uint8{
	"we": prTypeWriteExclusive, "ea": prTypeExclusiveAccess,
	"we-ro": prTypeWriteExclusiveRO, "ea-ro": prTypeExclusiveAccessRO,
	"we-ar": prTypeWriteExclusiveAR, "ea-ar": prTypeExclusiveAccessAR,
}

var prTestCDBs = map[string][]byte{
	"tur":        {prOpTestUnitReady, 0, 0, 0, 0, 0},
	"inquiry":    {prOpInquiry, 0, 0, 0, 36, 0},
	"reportluns": {prOpReportLUNs, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0},
	"read10":     {prOpRead10, 0, 0, 0, 0, 0, 0, 0, 1, 0},
	"read16":     {prOpRead16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0},
	"write10":    {0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0},
	"write16":    {0x8A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0},
	"modesense":  {prOpModeSense6, 0, 0x3f, 0, 255, 0},
	"modeselect": {prOpModeSelect6, 0x10, 0, 0, 0, 0},
	"readcap16":  {prOpServiceActionIn16, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0},
	"synccache":  {0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0},
	"rtpg":       {prOpMaintenanceIn, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0},
	"allow":      {prOpPreventAllow, 0, 0, 0, 0, 0},
	"prevent":    {prOpPreventAllow, 0, 0, 0, 1, 0},
	"prin":       {prOpPRIn, 0, 0, 0, 0, 0, 0, 0x10, 0, 0},
	"reserve6":   {prOpReserve6, 0, 0, 0, 0, 0},
	"release6":   {prOpRelease6, 0, 0, 0, 0, 0},
	"getlba":     {prOpServiceActionIn16, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0},
}

var prOutNames = map[string]uint8{
	"register": prOutRegister, "register-ignore": prOutRegisterIgnore,
	"reserve": prOutReserve, "release": prOutRelease, "clear": prOutClear,
	"preempt": prOutPreempt, "preempt-abort": prOutPreemptAndAbort,
	"register-move": prOutRegisterAndMove,
}

var prUANames = map[Reason]string{
	ReasonUAReservationsPreempted:  "reservations-preempted",
	ReasonUAReservationsReleased:   "reservations-released",
	ReasonUARegistrationsPreempted: "registrations-preempted",
}

// prScript runs one testdata/pr script against a handler. Every line is
// "command args => expected"; see testdata/pr/README.
type prScript struct {
	t     *testing.T
	dir   string
	store *failingStore
	ua    *recordingUA
	h     *prHandler
}

func newPRScript(t *testing.T) *prScript {
	s := &prScript{t: t, dir: t.TempDir(), ua: &recordingUA{}}
	s.store = &failingStore{PRStore: NewFilePRStore(filepath.Join(s.dir, "pr.json"))}
	s.restart()
	return s
}

func (s *prScript) restart() {
	h, err := newPRHandler(context.Background(), s.store, s.ua, slog.New(slog.DiscardHandler))
	if err != nil {
		s.t.Fatalf("newPRHandler: %v", err)
	}
	s.h = h
}

func formatPRResult(st Status, err error) string {
	switch {
	case err != nil:
		var ce *CheckError
		if !errors.As(err, &ce) {
			return "ERROR " + err.Error()
		}
		out := "CHECK " + strings.ReplaceAll(ce.Reason.String(), " ", "-")
		if ce.Field != nil {
			where := "param"
			if ce.Field.InCDB {
				where = "cdb"
			}
			out += fmt.Sprintf(" %s:%d/%d", where, ce.Field.Byte, ce.Field.Bit)
		}
		return out
	case st == StatusGood:
		return "GOOD"
	case st == StatusReservationConflict:
		return "CONFLICT"
	}
	return fmt.Sprintf("STATUS %#x", uint8(st))
}

// kv parses key=value arguments.
func kv(args []string) map[string]string {
	m := make(map[string]string)
	for _, a := range args {
		k, v, ok := strings.Cut(a, "=")
		if !ok {
			v = "1"
		}
		m[k] = v
	}
	return m
}

func parseNum(t testing.TB, s string) uint64 {
	if s == "" {
		return 0
	}
	v, err := strconv.ParseUint(s, 0, 64)
	if err != nil {
		t.Fatalf("bad number %q: %v", s, err)
	}
	return v
}

// buildPROut builds a PROUT CDB and parameter list from script arguments.
func buildPROut(t testing.TB, sa uint8, a map[string]string) (cdb, param []byte) {
	typ := prTypeNames[a["type"]]
	if v, ok := a["rawtype"]; ok {
		typ = uint8(parseNum(t, v))
	}
	cdb = make([]byte, 10)
	cdb[0] = prOpPROut
	cdb[1] = sa
	if v, ok := a["rawsa"]; ok {
		cdb[1] = uint8(parseNum(t, v))
	}
	cdb[2] = uint8(parseNum(t, a["scope"]))<<4 | typ
	param = make([]byte, 24)
	binary.BigEndian.PutUint64(param[0:], parseNum(t, a["key"]))
	binary.BigEndian.PutUint64(param[8:], parseNum(t, a["sark"]))
	if sa == prOutRegisterAndMove {
		if _, ok := a["unreg"]; ok {
			param[17] |= 0x02
		}
		if _, ok := a["aptpl"]; ok {
			param[17] |= 0x01
		}
		binary.BigEndian.PutUint16(param[18:], uint16(parseNum(t, a["relport"])))
		tid := encodeISCSITransportID(a["tid"])
		binary.BigEndian.PutUint32(param[20:], uint32(len(tid)))
		param = append(param, tid...)
	} else {
		if _, ok := a["aptpl"]; ok {
			param[20] |= 0x01
		}
		if _, ok := a["alltg"]; ok {
			param[20] |= 0x04
		}
		if tids, ok := a["specipt"]; ok {
			param[20] |= 0x08
			var list []byte
			for _, port := range strings.Split(tids, ",,") {
				list = append(list, encodeISCSITransportID(port)...)
			}
			param = binary.BigEndian.AppendUint32(param, uint32(len(list)))
			param = append(param, list...)
		}
	}
	plen := len(param)
	if v, ok := a["plen"]; ok {
		plen = int(parseNum(t, v))
		for len(param) < plen {
			param = append(param, 0)
		}
	}
	binary.BigEndian.PutUint32(cdb[5:], uint32(plen))
	return cdb, param
}

func (s *prScript) prin(n ITNexus, sa uint8) ([]byte, error) {
	cdb := []byte{prOpPRIn, sa, 0, 0, 0, 0, 0, 0xff, 0xff, 0}
	return s.h.persistentReserveIn(context.Background(), n, cdb)
}

func (s *prScript) nexus(name string) ITNexus {
	n, ok := prTestNexuses[name]
	if !ok {
		s.t.Fatalf("unknown nexus %q", name)
	}
	return n
}

// run executes one command line and returns its result as text.
func (s *prScript) run(fields []string) string {
	t := s.t
	verb, args := fields[0], fields[1:]
	switch verb {
	case "restart":
		s.restart()
		return "ok"
	case "fail-saves":
		s.store.fail = args[0] == "on"
		return "ok"
	case "reset":
		s.h.reset(ResetLUN)
		return "ok"
	case "nexus-lost":
		s.h.nexusLost(s.nexus(args[0]))
		return "ok"
	case "cmd":
		// cmd NEXUS name...: whether each command conflicts.
		n := s.nexus(args[0])
		var out []string
		for _, c := range args[1:] {
			cdb, ok := prTestCDBs[c]
			if !ok {
				t.Fatalf("unknown cdb %q", c)
			}
			r := "ok"
			if s.h.conflicts(n, cdb) {
				r = "conflict"
			}
			out = append(out, c+":"+r)
		}
		return strings.Join(out, " ")
	case "reserve6", "release6", "reserve10":
		n := s.nexus(args[0])
		var cdb []byte
		switch verb {
		case "reserve10":
			cdb = []byte{prOpReserve10, 0, 0, 0, 0, 0, 0, 0, 0, 0}
		default:
			cdb = slices.Clone(prTestCDBs[verb])
		}
		if len(args) > 1 {
			cdb[1] = uint8(parseNum(t, args[1]))
		}
		if s.h.conflicts(n, cdb) {
			return "CONFLICT"
		}
		if verb == "release6" {
			return formatPRResult(s.h.release(n, cdb))
		}
		return formatPRResult(s.h.reserve(n, cdb))
	case "keys":
		b, err := s.prin(s.nexus(args[0]), prInReadKeys)
		if err != nil {
			return formatPRResult(0, err)
		}
		out := fmt.Sprintf("gen=%d", binary.BigEndian.Uint32(b))
		for i := 8; i+8 <= len(b); i += 8 {
			out += fmt.Sprintf(" %#x", binary.BigEndian.Uint64(b[i:]))
		}
		return out
	case "resv":
		b, err := s.prin(s.nexus(args[0]), prInReadReservation)
		if err != nil {
			return formatPRResult(0, err)
		}
		if binary.BigEndian.Uint32(b[4:]) == 0 {
			return "none"
		}
		typ := b[21] & 0x0f
		for name, v := range prTypeNames {
			if v == typ {
				return fmt.Sprintf("key=%#x type=%s", binary.BigEndian.Uint64(b[8:]), name)
			}
		}
		return fmt.Sprintf("key=%#x type=%#x", binary.BigEndian.Uint64(b[8:]), typ)
	case "status":
		// READ FULL STATUS, one "key port rel flags" entry per registration.
		b, err := s.prin(s.nexus(args[0]), prInReadFullStatus)
		if err != nil {
			return formatPRResult(0, err)
		}
		var out []string
		for i := 8; i+24 <= len(b); {
			d := b[i:]
			tl := int(binary.BigEndian.Uint32(d[20:]))
			tid := d[24 : 24+tl]
			name := strings.TrimRight(string(tid[4:]), "\x00")
			e := fmt.Sprintf("%#x %s fmt=%d rel=%d", binary.BigEndian.Uint64(d), name, tid[0]>>6, binary.BigEndian.Uint16(d[18:]))
			if d[12]&2 != 0 {
				e += " alltg"
			}
			if d[12]&1 != 0 {
				e += fmt.Sprintf(" holder=%#x", d[13])
			}
			out = append(out, e)
			i += 24 + tl
		}
		if len(out) == 0 {
			return "empty"
		}
		return strings.Join(out, "; ")
	case "ua":
		var out []string
		for _, r := range s.ua.drain(s.nexus(args[0]).Key()) {
			out = append(out, prUANames[r])
		}
		if len(out) == 0 {
			return "none"
		}
		return strings.Join(out, " ")
	case "prin":
		sa := uint8(parseNum(t, args[1]))
		_, err := s.prin(s.nexus(args[0]), sa)
		return formatPRResult(StatusGood, err)
	}
	sa, ok := prOutNames[verb]
	if !ok {
		t.Fatalf("unknown command %q", verb)
	}
	n := s.nexus(args[0])
	cdb, param := buildPROut(t, sa, kv(args[1:]))
	if s.h.conflicts(n, cdb) {
		return "CONFLICT"
	}
	return formatPRResult(s.h.persistentReserveOut(context.Background(), n, cdb, param))
}

func TestPRScripts(t *testing.T) {
	files, err := filepath.Glob("testdata/pr/*.txt")
	if err != nil || len(files) == 0 {
		t.Fatalf("no scripts: %v", err)
	}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			f, err := os.Open(file)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			s := newPRScript(t)
			sc := bufio.NewScanner(f)
			line := 0
			for sc.Scan() {
				line++
				text := strings.TrimSpace(sc.Text())
				if text == "" || strings.HasPrefix(text, "#") {
					continue
				}
				cmd, want, ok := strings.Cut(text, "=>")
				if !ok {
					t.Fatalf("%s:%d: missing =>", file, line)
				}
				got := s.run(strings.Fields(cmd))
				if want = strings.TrimSpace(want); got != want {
					t.Errorf("%s:%d: %s\n\tgot  %s\n\twant %s", file, line, strings.TrimSpace(cmd), got, want)
				}
			}
			if err := sc.Err(); err != nil {
				t.Fatal(err)
			}
		})
	}
}
