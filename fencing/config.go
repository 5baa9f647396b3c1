package fencing

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sort"
	"time"
)

// Config is the fencing part of a cluster's configuration, as read from a
// JSON file until the cluster keeps it in Raft.
//
//	{
//	  "devices": {
//	    "bmc-a": {"type": "ipmi", "timeout": "20s",
//	              "ipmi": {"host": "10.0.0.11", "user": "fence", "password": "...", "cipher_suite": 17}}
//	  },
//	  "nodes": {"node-a": {"action": "off", "levels": [["bmc-a"], ["pdu-a1", "pdu-a2"]]}}
//	}
type Config struct {
	Devices map[string]DeviceConfig `json:"devices"`
	Nodes   map[string]NodeTopology `json:"nodes"`
}

// DeviceConfig is one fence device. Exactly the section named by Type is
// used.
type DeviceConfig struct {
	// Type is ipmi, apc-snmp, redfish, external or manual.
	Type string `json:"type"`
	// Timeout bounds off+confirm on this device; default 30s.
	Timeout Duration `json:"timeout,omitzero"`
	// PollInterval between status reads; default 100ms (1s for external).
	PollInterval Duration `json:"poll_interval,omitzero"`

	IPMI     *IPMIConfig     `json:"ipmi,omitempty"`
	APC      *APCConfig      `json:"apc_snmp,omitempty"`
	Redfish  *RedfishConfig  `json:"redfish,omitempty"`
	External *ExternalConfig `json:"external,omitempty"`
	Manual   *ManualConfig   `json:"manual,omitempty"`
}

// Validate names the bad field, prefixed with the device's name.
func (c Config) Validate() error {
	if len(c.Devices) == 0 {
		return invalid("devices", "at least one device is required")
	}
	for _, name := range sortedKeys(c.Devices) {
		if err := c.Devices[name].validate("devices." + name); err != nil {
			return err
		}
	}
	f := &Fencer{Devices: map[string]Device{}, Nodes: c.Nodes}
	for n := range c.Devices {
		f.Devices[n] = Device{}
	}
	return f.Validate()
}

func (d DeviceConfig) validate(field string) error {
	if d.Timeout < 0 {
		return invalid(field+".timeout", "negative")
	}
	if d.PollInterval < 0 {
		return invalid(field+".poll_interval", "negative")
	}
	var err error
	switch d.Type {
	case "ipmi":
		if d.IPMI == nil {
			return invalid(field+".ipmi", "section required for type ipmi")
		}
		err = d.IPMI.Validate()
	case "apc-snmp":
		if d.APC == nil {
			return invalid(field+".apc_snmp", "section required for type apc-snmp")
		}
		err = d.APC.Validate()
	case "redfish":
		if d.Redfish == nil {
			return invalid(field+".redfish", "section required for type redfish")
		}
		err = d.Redfish.Validate()
	case "external":
		if d.External == nil {
			return invalid(field+".external", "section required for type external")
		}
		err = d.External.Validate()
	case "manual":
		if d.Manual == nil {
			return invalid(field+".manual", "section required for type manual")
		}
		err = d.Manual.Validate()
	default:
		return invalid(field+".type", "%q: want ipmi, apc-snmp, redfish, external or manual", d.Type)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", field, err)
	}
	return nil
}

// LoadConfig reads and validates a JSON config file. Unknown fields are
// errors, so a typo cannot silently drop a setting.
func LoadConfig(path string) (Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return Config{}, fmt.Errorf("fencing: config: %w", err)
	}
	defer f.Close()
	dec := json.NewDecoder(f)
	dec.DisallowUnknownFields()
	var c Config
	if err := dec.Decode(&c); err != nil {
		return Config{}, fmt.Errorf("fencing: config %s: %w", path, err)
	}
	if err := c.Validate(); err != nil {
		return Config{}, fmt.Errorf("fencing: config %s: %w", path, err)
	}
	return c, nil
}

// Build turns a validated config into devices. logger may be nil.
func (c Config) Build(logger *slog.Logger) (map[string]Device, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	out := map[string]Device{}
	for _, name := range sortedKeys(c.Devices) {
		dc := c.Devices[name]
		var (
			a   Agent
			err error
		)
		switch dc.Type {
		case "ipmi":
			a, err = NewIPMI(*dc.IPMI)
		case "apc-snmp":
			a, err = NewAPCSNMP(*dc.APC)
		case "redfish":
			a, err = NewRedfish(*dc.Redfish, logger)
		case "external":
			a, err = NewExternal(*dc.External)
		case "manual":
			a, err = NewManual(*dc.Manual, nil, logger)
		}
		if err != nil {
			_ = CloseDevices(out)
			return nil, fmt.Errorf("devices.%s: %w", name, err)
		}
		d := Device{Name: name, Agent: a, Timeout: time.Duration(dc.Timeout), PollInterval: time.Duration(dc.PollInterval)}
		if d.PollInterval == 0 && dc.Type == "external" {
			d.PollInterval = time.Second // each status is a process start
		}
		out[name] = d
	}
	return out, nil
}

// CloseDevices closes every agent that holds resources (a Redfish session,
// for one). Whoever called Build calls it when done with the devices.
func CloseDevices(devs map[string]Device) error {
	var errs []error
	for _, name := range sortedKeys(devs) {
		if c, ok := devs[name].Agent.(WithClose); ok {
			if err := c.Close(); err != nil {
				errs = append(errs, fmt.Errorf("devices.%s: close: %w", name, err))
			}
		}
	}
	return errors.Join(errs...)
}

// Fencer builds the devices and returns a Fencer over c's topology.
func (c Config) Fencer(history HistoryStore, logger *slog.Logger) (*Fencer, error) {
	devs, err := c.Build(logger)
	if err != nil {
		return nil, err
	}
	return &Fencer{Devices: devs, Nodes: c.Nodes, History: history, Logger: logger}, nil
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}
