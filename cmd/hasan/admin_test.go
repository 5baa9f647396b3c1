package main

import (
	"encoding/json"
	"maps"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hasan-storage/hasan/cluster"
	"github.com/hasan-storage/hasan/fencing"
	"github.com/hasan-storage/hasan/webui"
)

// apiServer runs the real webui router over svc on loopback.
func apiServer(t *testing.T, svc webui.Service) *httptest.Server {
	t.Helper()
	s, err := webui.New(webui.Config{}, svc)
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s.Handler())
	t.Cleanup(ts.Close)
	return ts
}

// cli runs hasan against api and collects every byte it printed, so a
// test can check that no secret was ever shown.
type cli struct {
	t       *testing.T
	api     string
	printed []string
}

func (c *cli) run(stdin string, args ...string) (string, error) {
	c.t.Helper()
	out, errOut, err := runHasan(c.t, stdin, append([]string{"--api", c.api}, args...)...)
	c.printed = append(c.printed, out, errOut)
	if err != nil {
		c.printed = append(c.printed, err.Error())
	}
	return out, err
}

func (c *cli) ok(args ...string) string {
	c.t.Helper()
	out, err := c.run("", args...)
	if err != nil {
		c.t.Fatalf("hasan %s: %v", strings.Join(args, " "), err)
	}
	return out
}

// fails runs a command that must fail with an error containing every want.
func (c *cli) fails(args []string, want ...string) {
	c.t.Helper()
	_, err := c.run("", args...)
	if err == nil {
		c.t.Fatalf("hasan %s succeeded, want an error", strings.Join(args, " "))
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			c.t.Errorf("hasan %s: error %q lacks %q", strings.Join(args, " "), err, w)
		}
	}
}

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func contains(t *testing.T, what, s string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(s, w) {
			t.Errorf("%s lacks %q:\n%s", what, w, s)
		}
	}
}

const (
	cliIQN        = "iqn.2026-11.io.hasan:db"
	chapSecret    = "chap-secret-0001"
	mutualSecret  = "mutual-secret-02"
	bmcPassword   = "bmc-password-0003"
	pduCommunity  = "pdu-community-04"
	stdinPassword = "stdin-password-05"
)

// TestCLIWorkflow walks the operations guide: volume, target with LUN,
// ACL and CHAP, group, move, node states, maintenance, fence devices and
// topology, history and events, all through the real router over a state
// that applies real cluster commands.
func TestCLIWorkflow(t *testing.T) {
	svc := newStateService()
	ts := apiServer(t, svc)
	c := &cli{t: t, api: ts.URL}

	out := c.ok("volume", "create", "--name", "db", "--size", "16M", "--replicas", "n1,n2")
	contains(t, "volume create", out, "volume db created", "16M", "primary n1", "replicas n1,n2")
	var uuid string
	svc.read(func(st *cluster.State) {
		for id, v := range st.Volumes {
			if v.Name == "db" && v.Size == 16<<20 && v.Primary == "n1" {
				uuid = id
			}
		}
	})
	if uuid == "" {
		t.Fatal("volume not in the state")
	}
	contains(t, "volume list", c.ok("volume", "list"), "NAME", "db", uuid, "n1,n2")
	contains(t, "volume show by name", c.ok("volume", "show", "db"), "uuid:", uuid, "16777216 bytes")
	var vj cluster.Volume
	if err := json.Unmarshal([]byte(c.ok("volume", "show", uuid, "--json")), &vj); err != nil || vj.UUID != uuid {
		t.Fatalf("volume show --json: %+v %v", vj, err)
	}

	c.ok("target", "create", cliIQN)
	contains(t, "lun add", c.ok("target", "lun", "add", cliIQN, "0", "db"), "LUN 0 is volume db")
	c.ok("target", "acl", "set", cliIQN, "iqn.1993-08.org.debian:01:a", "iqn.1993-08.org.debian:01:b")
	sf := writeFile(t, "chap", chapSecret+"\n")
	if _, err := c.run(mutualSecret+"\n", "target", "chap", "set", cliIQN, "--user", "alice", "--secret-file", sf,
		"--mutual-user", "tgt", "--mutual-secret-file", "-"); err != nil {
		t.Fatal(err)
	}
	svc.read(func(st *cluster.State) {
		tg := st.Targets[cliIQN]
		if tg == nil || tg.LUNs[0] != uuid || len(tg.ACL) != 2 || tg.CHAP.Secret.Reveal() != chapSecret || tg.MutualCHAP.Secret.Reveal() != mutualSecret {
			t.Fatalf("target in state %+v", tg)
		}
	})
	contains(t, "target show", c.ok("target", "show", cliIQN), "chap:        alice", "mutual chap: tgt", "iqn.1993-08.org.debian:01:b", uuid)
	contains(t, "target list", c.ok("target", "list"), cliIQN, "0="+uuid, "2 initiators", "alice")

	out = c.ok("group", "create", "g1", "--vip", "192.0.2.10/24", "--target", cliIQN, "--prefer", "n1,n2")
	contains(t, "group create", out, "group g1 created", "192.0.2.10/24")
	svc.write(&cluster.Command{Kind: cluster.KindGroupGrant, GroupGrant: &cluster.GroupGrantCmd{Group: "g1", Node: "n1"}})
	contains(t, "group list", c.ok("group", "list"), "g1", "n1", "192.0.2.10/24", cliIQN)
	contains(t, "target move", c.ok("target", "move", "g1", "--to", "n2"), "move to n2 started")
	contains(t, "group show", c.ok("group", "show", "g1"), "moving to:  n2")

	c.ok("node", "standby", "n2")
	contains(t, "node list", c.ok("node", "list"), "n2", "standby", "w1", "witness")
	c.ok("node", "online", "n2")
	contains(t, "node show", c.ok("node", "show", "n2"), "state:   online")
	contains(t, "maintenance on", c.ok("cluster", "maintenance", "on"), "no failover")
	svc.read(func(st *cluster.State) {
		if !st.Maintenance {
			t.Fatal("maintenance not set")
		}
	})
	c.ok("cluster", "maintenance", "off")

	// Fencing: one device from its own file, one from a whole fencing
	// config (as `fence test --config` reads it), one from stdin.
	bmc := writeFile(t, "bmc.json", `{"timeout":"20s","ipmi":{"host":"10.0.0.11","user":"fence","password":"`+bmcPassword+`"}}`)
	contains(t, "device add", c.ok("fence", "device", "add", "bmc-n1", "--type", "ipmi", "--config", bmc), "bmc-n1 (ipmi 10.0.0.11)")
	whole := writeFile(t, "fencing.json", `{"devices":{"pdu-a":{"type":"apc-snmp","apc_snmp":{"host":"10.0.0.21","version":"2c","community":"`+
		pduCommunity+`","outlets":["1"]}}},"nodes":{"n1":{"levels":[["pdu-a"]]}}}`)
	c.ok("fence", "device", "add", "pdu-a", "--config", whole)
	if _, err := c.run(`{"redfish":{"host":"10.0.0.12","user":"u","password":"`+stdinPassword+`"}}`,
		"fence", "device", "add", "rf-n2", "--type", "redfish", "--config", "-"); err != nil {
		t.Fatal(err)
	}
	c.ok("fence", "device", "add", "ops", "--type", "manual", "--config", writeFile(t, "m.json", `{"manual":{"node":"n2"}}`))

	out = c.ok("fence", "topology", "set", "n1", "--level", "bmc-n1", "--level", "pdu-a,ops", "--action", "reboot")
	contains(t, "topology set", out, "bmc-n1 | pdu-a+ops (reboot)")
	c.ok("fence", "topology", "set", "n2", "--level", "rf-n2")
	svc.read(func(st *cluster.State) {
		f := st.Nodes["n1"].Fence
		if f.Action != fencing.ActionReboot || len(f.Levels) != 2 || f.Levels[1][0] != "pdu-a" || f.Levels[1][1] != "ops" {
			t.Fatalf("topology %+v", f)
		}
		dc, err := st.FenceDevices["rf-n2"].DeviceConfig()
		if err != nil || dc.Redfish.Password.Reveal() != stdinPassword {
			t.Fatalf("stdin device %+v %v", dc.Redfish, err)
		}
		dc, _ = st.FenceDevices["pdu-a"].DeviceConfig()
		if dc.APC == nil || dc.APC.Community.Reveal() != pduCommunity {
			t.Fatalf("device from a whole config %+v", dc)
		}
	})
	contains(t, "device list", c.ok("fence", "device", "list"), "bmc-n1", "10.0.0.11", "n1", "rf-n2", "by hand, node n2")
	contains(t, "device show", c.ok("fence", "device", "show", "bmc-n1"), `"password": "[redacted]"`, "used by: n1")
	contains(t, "topology list", c.ok("fence", "topology", "list"), "1: bmc-n1  2: pdu-a+ops", "reboot", "witness")
	c.fails([]string{"fence", "device", "rm", "bmc-n1"}, "in use", "node n1", "409", "change that node's topology first")
	c.ok("fence", "topology", "set", "n1", "--level", "pdu-a")
	contains(t, "device rm", c.ok("fence", "device", "rm", "bmc-n1"), "deleted")

	svc.mu.Lock()
	svc.st.FenceHistory = append(svc.st.FenceHistory,
		fencing.Record{Time: time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC), Node: "n1", Level: 1, Device: "bmc-n1", Action: "off", Outcome: fencing.OutcomeSuccess, Duration: 420 * time.Millisecond},
		fencing.Record{Time: time.Date(2026, 11, 22, 12, 1, 0, 0, time.UTC), Node: "n2", Level: 1, Device: "rf-n2", Action: "off", Outcome: fencing.OutcomeFailure, Error: "fencing: device unreachable"})
	svc.mu.Unlock()
	out = c.ok("fence", "history")
	contains(t, "fence history", out, "bmc-n1", "420ms", "rf-n2", "device unreachable")
	if i, j := strings.Index(out, "rf-n2"), strings.Index(out, "bmc-n1"); i > j {
		t.Errorf("history not newest first:\n%s", out)
	}
	if out := c.ok("fence", "history", "--node", "n1"); strings.Contains(out, "rf-n2") {
		t.Errorf("--node n1 shows n2:\n%s", out)
	}
	var evs []cluster.Event
	if err := json.Unmarshal([]byte(c.ok("events", "--json", "--limit", "3")), &evs); err != nil || len(evs) != 3 {
		t.Fatalf("events --json: %d %v", len(evs), err)
	}
	contains(t, "events", c.ok("events"), "SEVERITY", "maintenance")

	// Manual fence confirmation: the warning, the typed node name, the
	// operator's name in the state.
	out, err := c.run("n2\n", "fence", "confirm", "n2", "--by", "alice")
	if err != nil {
		t.Fatal(err)
	}
	contains(t, "fence confirm", out, "CORRUPTS DATA", "Type the node name (n2)", "alice confirmed that n2 is powered off")
	svc.read(func(st *cluster.State) {
		if got := st.FenceConfirms["n2"]; got.By != "alice" {
			t.Fatalf("confirmation %+v", got)
		}
	})
	if _, err := c.run("n1\n", "fence", "confirm", "n2", "--by", "bob"); err == nil || !strings.Contains(err.Error(), "nothing was recorded") {
		t.Fatalf("wrong node typed: %v", err)
	}
	svc.read(func(st *cluster.State) {
		if got := st.FenceConfirms["n2"]; got.By != "alice" {
			t.Fatalf("an unconfirmed prompt was recorded: %+v", got)
		}
	})
	// No prompt at all (a script with no terminal) records nothing either.
	if _, err := c.run("", "fence", "confirm", "n2", "--by", "dave"); err == nil || !strings.Contains(err.Error(), "nothing was recorded") {
		t.Fatalf("empty stdin: %v", err)
	}
	// The old one-word --yes is gone: scripts must spell out what they state.
	c.fails([]string{"fence", "confirm", "n1", "--by", "carol", "--yes"}, "unknown flag")
	contains(t, "fence confirm --yes-i-verified-it-is-off", c.ok("fence", "confirm", "n1", "--by", "carol", "--yes-i-verified-it-is-off"),
		"CORRUPTS DATA", "carol confirmed that n1 is powered off")
	svc.read(func(st *cluster.State) {
		if got := st.FenceConfirms["n1"]; got.By != "carol" {
			t.Fatalf("scripted confirmation %+v", got)
		}
	})

	c.fails([]string{"node", "remove", "n2"}, "409", "holds a replica")
	contains(t, "node remove", c.ok("node", "remove", "w1"), "node w1 removed")
	svc.read(func(st *cluster.State) {
		if st.Nodes["w1"] != nil || st.Nodes["n2"] == nil {
			t.Fatalf("nodes after remove: %v", slices.Collect(maps.Keys(st.Nodes)))
		}
	})

	c.ok("target", "chap", "clear", cliIQN)
	c.ok("target", "acl", "clear", cliIQN)
	contains(t, "after clear", c.ok("target", "show", cliIQN), "any initiator", "chap:        -")

	for _, sec := range []string{chapSecret, mutualSecret, bmcPassword, pduCommunity, stdinPassword} {
		for _, p := range c.printed {
			if strings.Contains(p, sec) {
				t.Fatalf("secret %q printed:\n%s", sec, p)
			}
		}
	}
}

// TestCLIErrors checks that mistakes are caught with a message that says
// what to fix, and that API refusals come back with their cause.
func TestCLIErrors(t *testing.T) {
	svc := newStateService()
	ts := apiServer(t, svc)
	c := &cli{t: t, api: ts.URL}
	short := writeFile(t, "short", "tooshort\n")
	bad := writeFile(t, "bad.json", `{"ipmi":{"host":"h","user":"u","password":"`+bmcPassword+`"`)
	noHost := writeFile(t, "nohost.json", `{"type":"ipmi","ipmi":{"user":"u","password":"`+bmcPassword+`"}}`)
	cases := []struct {
		args []string
		want []string
	}{
		{[]string{"volume", "create", "--name", "x", "--size", "10X", "--replicas", "n1"}, []string{"--size 10X: use a number with K, M, G or T"}},
		{[]string{"volume", "create", "--name", "x", "--size", "1000", "--replicas", "n1"}, []string{"not a multiple of the 512-byte block"}},
		{[]string{"volume", "create", "--name", "x", "--size", "1G"}, []string{"--replicas"}},
		{[]string{"volume", "create", "--size", "1G", "--replicas", "n1"}, []string{"--name"}},
		{[]string{"volume", "create", "--name", "x", "--size", "1G", "--replicas", "n1", "--primary", "n2"}, []string{"--primary n2", "one of --replicas"}},
		{[]string{"volume", "create", "--name", "x", "--size", "1G", "--replicas", "ghost"}, []string{"404", "ghost"}},
		{[]string{"volume", "create", "--name", "x", "--size", "1G", "--replicas", "w1"}, []string{"400"}},
		{[]string{"volume", "show", "nope"}, []string{`volume "nope"`, "hasan volume list"}},
		{[]string{"node", "show", "n9"}, []string{"404", "node n9"}},
		{[]string{"node", "standby", "n9"}, []string{"404"}},
		{[]string{"cluster", "maintenance", "maybe"}, []string{"say on or off"}},
		{[]string{"target", "lun", "add", cliIQN, "x", "v"}, []string{`LUN "x"`, "0 to 16383"}},
		{[]string{"target", "show", "iqn.2026-11.io.hasan:none"}, []string{"404"}},
		{[]string{"target", "chap", "set", cliIQN, "--user", "u"}, []string{"--secret-file"}},
		{[]string{"target", "chap", "set", cliIQN, "--user", "u", "--secret-file", short}, []string{"8 bytes", "12 to 255"}},
		{[]string{"target", "chap", "set", cliIQN, "--user", "u", "--secret-file", "-", "--mutual-user", "m", "--mutual-secret-file", "-"}, []string{"both read stdin"}},
		{[]string{"target", "chap", "set", cliIQN, "--user", "u", "--secret-file", "/nonexistent/f"}, []string{"--secret-file /nonexistent/f"}},
		{[]string{"group", "create", "g", "--vip", "192.0.2.10/24@eth0"}, []string{"vip_link", "--vip 192.0.2.10/24"}},
		{[]string{"group", "create", "g", "--vip", "192.0.2.10"}, []string{"prefix length"}},
		{[]string{"group", "create", "g"}, []string{"--vip"}},
		{[]string{"target", "move", "g1"}, []string{"--to"}},
		{[]string{"target", "move", "nope", "--to", "n2"}, []string{"404", "group nope"}},
		{[]string{"fence", "device", "add", "d", "--type", "snmp", "--config", noHost}, []string{"--type snmp", "ipmi, apc-snmp"}},
		{[]string{"fence", "device", "add", "d", "--type", "ipmi"}, []string{"--config"}},
		{[]string{"fence", "device", "add", "d", "--config", writeFile(t, "m.json", `{"manual":{"node":"n1"}}`)}, []string{"--type"}},
		{[]string{"fence", "device", "add", "d", "--type", "redfish", "--config", noHost}, []string{"--type redfish disagrees", `"ipmi"`}},
		{[]string{"fence", "device", "add", "d", "--type", "ipmi", "--config", bad}, []string{"invalid JSON at byte"}},
		{[]string{"fence", "device", "add", "d", "--config", noHost}, []string{"ipmi.host: required", "400"}},
		{[]string{"fence", "device", "add", "D", "--config", noHost}, []string{"name:"}},
		{[]string{"fence", "device", "add", "x", "--config", writeFile(t, "w.json", `{"devices":{"a":{}}}`)}, []string{`without device "x"`, "it has: a"}},
		{[]string{"fence", "device", "rm", "ghost"}, []string{"404"}},
		{[]string{"fence", "device", "add", "d", "--type", "ipmi", "--config", writeFile(t, "null.json", `null`)}, []string{"want a JSON object"}},
		{[]string{"fence", "device", "add", "d", "--type", "ipmi", "--config", writeFile(t, "dnull.json", `{"devices":{"d":null}}`)}, []string{"want a JSON object"}},
		{[]string{"fence", "topology", "set", "n1"}, []string{"--level"}},
		{[]string{"fence", "topology", "set", "n1", "--level", "ghost"}, []string{"404", "fence device ghost"}},
		{[]string{"fence", "topology", "set", "n1", "--level", ","}, []string{"--level 1 is empty"}},
		{[]string{"fence", "topology", "set", "n1", "--level", "a", "--action", "halt"}, []string{"--action halt"}},
		{[]string{"events", "--limit", "-1"}, []string{"--limit -1"}},
		{[]string{"fence", "confirm", "n1", "--yes-i-verified-it-is-off"}, []string{"--by"}},
		{[]string{"fence", "confirm", "n9", "--by", "alice", "--yes-i-verified-it-is-off"}, []string{"404", "node n9"}},
	}
	for _, tc := range cases {
		c.fails(tc.args, tc.want...)
	}
	for _, p := range c.printed {
		if strings.Contains(p, bmcPassword) {
			t.Fatalf("secret printed:\n%s", p)
		}
	}
	if svc.writes != 0 {
		t.Errorf("%d refused commands reached the state", svc.writes)
	}
}

// TestCLIFollowsLeader sends writes to a follower that cannot forward: the
// CLI follows X-Hasan-Leader to the leader's API.
func TestCLIFollowsLeader(t *testing.T) {
	leader := newStateService()
	lts := apiServer(t, leader)
	follower := newStateService()
	follower.notLeader = strings.TrimPrefix(lts.URL, "http://") // host:port, as api_addr is recorded
	fts := apiServer(t, follower)
	c := &cli{t: t, api: fts.URL}
	c.ok("volume", "create", "--name", "v", "--size", "1M", "--replicas", "n1")
	if len(leader.st.Volumes) != 1 || len(follower.st.Volumes) != 0 {
		t.Fatalf("volume went to the wrong node: leader %d, follower %d", len(leader.st.Volumes), len(follower.st.Volumes))
	}
	// A leader that points back at the follower: the hops are bounded.
	leader.notLeader = strings.TrimPrefix(fts.URL, "http://")
	c.fails([]string{"node", "standby", "n2"}, "503", "could not hand this to the Raft leader")
	// No leader known at all: nothing to follow.
	follower.notLeader, follower.noLeader = "", true
	c.fails([]string{"node", "standby", "n2"}, "503", "could not hand this to the Raft leader", "--api with the leader's API")
	if leader.writes != 1 || follower.writes != 0 {
		t.Errorf("writes: leader %d, follower %d", leader.writes, follower.writes)
	}
}

func TestCLIAPIAddress(t *testing.T) {
	svc := newStateService()
	ts := apiServer(t, svc)
	// HASAN_API is the default when --api is not given; host:port works.
	t.Setenv(apiEnv, strings.TrimPrefix(ts.URL, "http://"))
	out, _, err := runHasan(t, "", "node", "list")
	if err != nil || !strings.Contains(out, "n1") {
		t.Fatalf("node list via %s: %v\n%s", apiEnv, err, out)
	}
	// Nothing listening: the error says what to check.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	_, _, err = runHasan(t, "", "--api", "http://"+dead, "node", "list")
	if err == nil || !strings.Contains(err.Error(), "cannot reach the REST API at http://"+dead) || !strings.Contains(err.Error(), "hasan serve") {
		t.Fatalf("dead API: %v", err)
	}
	_, _, err = runHasan(t, "", "--api", "ftp://x", "node", "list")
	if err == nil || !strings.Contains(err.Error(), "want http://HOST:PORT") {
		t.Fatalf("bad --api: %v", err)
	}
}

func TestParseHelpers(t *testing.T) {
	for in, want := range map[string]int64{"10G": 10 << 30, "512": 512, "1k": 1 << 10, "2T": 2 << 40, "4GiB": 4 << 30, "8MB": 8 << 20} {
		if got, err := parseSizeFlag("--size", in); err != nil || got != want {
			t.Errorf("parseSizeFlag(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "G", "-1G", "1.5G", "10X", "0"} {
		if _, err := parseSizeFlag("--size", in); err == nil {
			t.Errorf("parseSizeFlag(%q) accepted", in)
		}
	}
	for in, want := range map[int64]string{512: "512B", 1 << 20: "1M", 1536 << 20: "1.5G", 10 << 40: "10T"} {
		if got := humanSize(in); got != want {
			t.Errorf("humanSize(%d) = %q, want %q", in, got, want)
		}
	}
	for in, want := range map[string]string{"127.0.0.1:7402": "http://127.0.0.1:7402", "https://h:1/": "https://h:1", "http://h:2": "http://h:2"} {
		if got, err := apiBase(in); err != nil || got != want {
			t.Errorf("apiBase(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}
