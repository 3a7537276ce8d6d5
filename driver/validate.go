package driver

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/netpolicy"
)

// The validation of a task is one path from StartTask: validateTask checks
// everything the job sets against the node's Settings (which
// PluginConfig.Validate made) and returns the limits that apply, before
// anything is created: the config block (TaskConfig.Validate: bytes, root,
// command, capabilities, tmpfs, pids, timeout, disk, hostname), then what
// the job sets outside it (validateTaskBytes: user, env, volumes), egress
// (validateEgress), the identity token, the network mode (networkMode) and
// the volume destinations. Every message names the field and the fix.

// validateTask validates the task against the node's settings and returns
// the limits that apply. It is cheap and creates nothing.
func (d *Driver) validateTask(cfg *drivers.TaskConfig, tc *TaskConfig) (taskLimits, error) {
	lim, err := tc.Validate(d.config)
	if err != nil {
		return lim, err
	}
	if err := validateTaskBytes(cfg); err != nil {
		return lim, err
	}
	if lim.egress, err = tc.validateEgress(d.config); err != nil {
		return lim, err
	}
	if d.config.DenyEnvIdentity {
		for k := range cfg.Env {
			if k == "NOMAD_TOKEN" || strings.HasPrefix(k, "NOMAD_TOKEN_") {
				return lim, fmt.Errorf("the job asks for its workload identity in the environment (identity { env = true }), which this node forbids (the plugin's deny_env_identity): use identity { file = true } and read /secrets/nomad_token")
			}
		}
	}
	if lim.net, err = d.networkMode(cfg, lim.egress); err != nil {
		return lim, err
	}
	for _, m := range cfg.Mounts {
		if !filepath.IsAbs(m.TaskPath) || reservedMount(filepath.Clean(m.TaskPath)) || filepath.Clean(m.TaskPath) == "/" {
			return lim, fmt.Errorf("volume_mount destination %q must be an absolute path outside /alloc, /local, /secrets, /proc, /dev and /sys", m.TaskPath)
		}
	}
	return lim, nil
}

// taskLimits are the limits that apply to a task once the plugin's
// defaults and ceilings are taken into account.
type taskLimits struct {
	pids    int64
	timeout time.Duration
	// egress is the task's allowlist, checked against the node's ceiling;
	// empty means no network but loopback (or, in a group network, nothing
	// but replies to the allocation's ports).
	egress []netpolicy.Entry
	// net is where the sandbox's network comes from.
	net netMode
	// diskBytes and diskInodes size the task's disk (local/); 0 bytes
	// means no limit.
	diskBytes, diskInodes int64
}

// netMode is where a sandbox's network comes from.
type netMode int

const (
	// netOwn: a namespace of the driver's own when the task has egress,
	// loopback only otherwise.
	netOwn netMode = iota
	// netGroup: the allocation's namespace, made by Nomad (group network
	// in bridge, cni/* or none mode).
	netGroup
	// netHost: the node's network (host mode, allowed by allow_host_network).
	netHost
)

// Validate checks the task's config block against the node's settings and
// returns the limits that apply. It is the config block's part of
// Driver.validateTask: it runs before anything is created, and every
// message names the field and what to change.
func (tc *TaskConfig) Validate(s *Settings) (taskLimits, error) {
	var lim taskLimits
	err := tc.validate(s, &lim)
	return lim, err
}

func (tc *TaskConfig) validate(s *Settings, lim *taskLimits) error {
	if err := tc.validateBytes(); err != nil {
		return err
	}
	switch {
	case tc.Image != "" && tc.Rootfs != "":
		return fmt.Errorf("image and rootfs are both set: use one of them")
	case tc.Image == "" && strings.TrimSpace(tc.Rootfs) == "":
		return fmt.Errorf("rootfs or image is required: set image to an OCI image reference, or rootfs to a directory holding the task's root filesystem")
	case tc.Image == "" && tc.Command == "" && len(tc.Entrypoint) == 0:
		return fmt.Errorf("command is required: set command (and args) or entrypoint")
	}
	if tc.WorkDir != "" && !filepath.IsAbs(tc.WorkDir) {
		return fmt.Errorf("work_dir %q must be an absolute path inside the sandbox", tc.WorkDir)
	}
	caps, err := normalizeCaps(tc.CapAdd)
	if err != nil {
		return fmt.Errorf("cap_add: %w", err)
	}
	for _, c := range caps {
		if !slices.Contains(s.AllowCaps, c) {
			return fmt.Errorf("cap_add: %s is not allowed on this node: the operator must add it to the plugin's allow_caps", c)
		}
	}
	tc.CapAdd = caps
	if !tc.ReadonlyRootfs && !s.AllowWritableRootfs {
		return fmt.Errorf("readonly_rootfs = false is not allowed on this node: the operator must set allow_writable_rootfs in the plugin config")
	}
	seen := map[string]bool{}
	for _, p := range tc.Tmpfs {
		clean := filepath.Clean(p)
		if !filepath.IsAbs(p) || clean == "/" {
			return fmt.Errorf("tmpfs %q must be an absolute path other than /", p)
		}
		if reservedMount(clean) {
			return fmt.Errorf("tmpfs %q would cover a path the driver mounts (/alloc, /local, /secrets, /proc, /dev, /sys, /etc/resolv.conf, /etc/hosts)", p)
		}
		if seen[clean] {
			return fmt.Errorf("tmpfs %q is listed twice", p)
		}
		seen[clean] = true
	}
	switch {
	case tc.PidsLimit < 0:
		return fmt.Errorf("pids_limit %d must be positive", tc.PidsLimit)
	case tc.PidsLimit == 0:
		lim.pids = s.DefaultPidsLimit
	case s.MaxPidsLimit > 0 && tc.PidsLimit > s.MaxPidsLimit:
		return fmt.Errorf("pids_limit %d is above this node's ceiling of %d (the plugin's max_pids_limit): ask for %d or less", tc.PidsLimit, s.MaxPidsLimit, s.MaxPidsLimit)
	default:
		lim.pids = tc.PidsLimit
	}
	timeout, err := parseTimeout("timeout", tc.Timeout)
	if err != nil {
		return err
	}
	def, max := s.defaultTimeout, s.maxTimeout
	switch {
	case timeout == 0 && def > 0:
		lim.timeout = def
	case timeout == 0:
		// With a ceiling but no default, the ceiling applies.
		lim.timeout = max
	case max > 0 && timeout > max:
		return fmt.Errorf("timeout %s is above this node's ceiling of %s (the plugin's max_timeout): ask for %s or less", timeout, max, max)
	default:
		lim.timeout = timeout
	}
	if err := tc.diskLimits(s, lim); err != nil {
		return err
	}
	if tc.Hostname != "" && !validHostname(tc.Hostname) {
		return fmt.Errorf("hostname %q is not a valid host name: use letters, digits and '-', at most 63 characters per label", tc.Hostname)
	}
	return nil
}

// validateBytes refuses a NUL byte in any string of the task config, and a
// control character in the ones that are paths or names: runsc and the
// kernel would cut such a string short or fail on it only after the
// sandbox's state, cgroup and network were made.
func (tc *TaskConfig) validateBytes() error {
	one := func(s string) []string { return []string{s} }
	for _, f := range []struct {
		name string
		vals []string
		// list fields are named with the index of the bad element.
		list, path bool
	}{
		{"rootfs", one(tc.Rootfs), false, true},
		{"image", one(tc.Image), false, true},
		{"command", one(tc.Command), false, true},
		{"work_dir", one(tc.WorkDir), false, true},
		{"hostname", one(tc.Hostname), false, true},
		{"timeout", one(tc.Timeout), false, true},
		{"disk_limit", one(tc.DiskLimit), false, true},
		{"auth.username", one(tc.Auth.Username), false, true},
		{"auth.password", one(tc.Auth.Password), false, false},
		{"args", tc.Args, true, false},
		{"entrypoint", tc.Entrypoint, true, false},
		{"cap_add", tc.CapAdd, true, true},
		{"tmpfs", tc.Tmpfs, true, true},
		{"egress", tc.Egress, true, true},
	} {
		for i, v := range f.vals {
			name := f.name
			if f.list {
				name = fmt.Sprintf("%s[%d]", f.name, i)
			}
			if err := validateString(name, v, f.path); err != nil {
				return err
			}
		}
	}
	return nil
}

// validateString refuses a NUL byte in s, and any control character when s
// is a path or a name; the error names field.
func validateString(field, s string, path bool) error {
	for _, r := range s {
		switch {
		case r == 0:
			return fmt.Errorf("%s holds a NUL byte: remove it (no string the sandbox gets may contain one)", field)
		case path && (r < 0x20 || r == 0x7f):
			return fmt.Errorf("%s %q holds a control character (%U): remove it, paths and names must be printable", field, s, r)
		}
	}
	return nil
}

func reservedMount(p string) bool {
	for _, r := range []string{"/alloc", "/local", "/secrets", "/proc", "/dev", "/sys"} {
		if p == r || strings.HasPrefix(p, r+"/") {
			return true
		}
	}
	return p == "/etc/resolv.conf" || p == "/etc/hosts"
}

func validHostname(h string) bool {
	if len(h) > 253 {
		return false
	}
	for _, label := range strings.Split(h, ".") {
		if len(label) == 0 || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
				return false
			}
		}
	}
	return true
}

// validateTaskBytes refuses NUL bytes in what the job sets outside the
// driver's config block (env, user, volume paths), and control characters
// in the paths and names among them (see validateString).
func validateTaskBytes(cfg *drivers.TaskConfig) error {
	if err := validateString("user", cfg.User, true); err != nil {
		return err
	}
	for _, env := range []map[string]string{cfg.Env, cfg.DeviceEnv} {
		for k, v := range env {
			if err := validateString(fmt.Sprintf("env name %q", k), k, false); err != nil {
				return err
			}
			if strings.Contains(k, "=") {
				return fmt.Errorf("env name %q holds '=': rename the variable", k)
			}
			if err := validateString(fmt.Sprintf("env %q", k), v, false); err != nil {
				return err
			}
		}
	}
	for _, m := range cfg.Mounts {
		if err := validateString("volume_mount destination", m.TaskPath, true); err != nil {
			return err
		}
		if err := validateString("volume source path", m.HostPath, true); err != nil {
			return err
		}
	}
	return nil
}

// validateEgress parses the task's egress entries and checks each against
// the node's ceiling (allowed_egress).
func (tc *TaskConfig) validateEgress(s *Settings) ([]netpolicy.Entry, error) {
	if len(tc.Egress) == 0 {
		return nil, nil
	}
	if n, limit := len(tc.Egress), s.maxEgressEntries(); n > limit {
		return nil, fmt.Errorf("egress lists %d entries, more than this node allows (the plugin's max_egress_entries, %d): use CIDR prefixes, port ranges or wildcard names to cover more with fewer entries", n, limit)
	}
	var out []netpolicy.Entry
	for _, raw := range tc.Egress {
		e, err := netpolicy.ParseEgress(raw)
		if err != nil {
			return nil, err
		}
		if !slices.ContainsFunc(s.allowedEgress, func(c netpolicy.Entry) bool { return c.Covers(e) }) {
			if len(s.allowedEgress) == 0 {
				return nil, fmt.Errorf("egress %q: this node allows no egress: the operator must list permitted destinations in the plugin's allowed_egress", raw)
			}
			return nil, fmt.Errorf("egress %q is outside what this node permits (the plugin's allowed_egress): ask for a destination within %s", raw, strings.Join(s.AllowedEgress, ", "))
		}
		out = append(out, e)
	}
	return out, nil
}
