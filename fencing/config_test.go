package fencing

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoadConfig(t *testing.T) {
	dir := t.TempDir()
	write := func(body string) string {
		p := filepath.Join(dir, "fence.json")
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := `{
	  "devices": {
	    "bmc-a": {"type": "ipmi", "timeout": "20s", "ipmi": {"host": "127.0.0.1", "port": 6230, "user": "fence", "password": "pw-123", "cipher_suite": 3}},
	    "pdu-a1": {"type": "apc-snmp", "apc_snmp": {"host": "127.0.0.1", "version": "3", "user": "u", "auth_pass": "authpass1", "priv_pass": "privpass1", "outlets": ["db1-psu-a"]}},
	    "pdu-a2": {"type": "apc-snmp", "apc_snmp": {"host": "127.0.0.1", "version": "2c", "community": "private", "outlets": ["2"]}},
	    "ops": {"type": "manual", "manual": {"node": "node-a"}}
	  },
	  "nodes": {"node-a": {"action": "reboot", "levels": [["bmc-a"], ["pdu-a1", "pdu-a2"], ["ops"]]}}
	}`
	c, err := LoadConfig(write(good))
	if err != nil {
		t.Fatal(err)
	}
	f, err := c.Fencer(nil, quiet())
	if err != nil || len(f.Devices) != 4 || f.Devices["bmc-a"].Timeout.Seconds() != 20 {
		t.Fatalf("%v %+v", err, f)
	}
	if c.Devices["bmc-a"].IPMI.Password.Reveal() != "pw-123" {
		t.Fatal("password not read")
	}
	bad := map[string]string{
		"devices.bmc-a.type": strings.Replace(good, `"type": "ipmi"`, `"type": "ipmy"`, 1),
		"devices.pdu-a2: fencing: invalid config: apc_snmp.outlets": strings.Replace(good, `"outlets": ["2"]`, `"outlets": []`, 1),
		"nodes.node-a.levels[1]":                                    strings.Replace(good, `["pdu-a1", "pdu-a2"]`, `["pdu-a1", "pdu-x"]`, 1),
		"unknown field":                                             strings.Replace(good, `"cipher_suite": 3`, `"ciphersuite": 3`, 1),
		"devices.bmc-a: fencing: invalid config: ipmi.user":         strings.Replace(good, `"user": "fence", `, ``, 1),
	}
	for want, body := range bad {
		_, err := LoadConfig(write(body))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("want %q in error, got %v", want, err)
		}
		if err != nil && want != "unknown field" && !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("%q: not ErrInvalidConfig: %v", want, err)
		}
		if err != nil && strings.Contains(err.Error(), "pw-123") {
			t.Errorf("error leaks password: %v", err)
		}
	}
}
