package driver

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/hashicorp/nomad/plugins/shared/hclspec"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/netpolicy"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

const (
	// PluginName is both the binary's name (matched by the client's
	// `plugin "sandbox"` block) and the name jobs use in `driver = "sandbox"`.
	PluginName = "sandbox"

	// PluginVersion is the driver's semantic version.
	PluginVersion = "0.1.0"

	// taskHandleVersion is the version of the state kept in TaskHandle.
	taskHandleVersion = 1

	fingerprintPeriod = 30 * time.Second
)

var pluginInfo = &base.PluginInfoResponse{
	Type:              base.PluginTypeDriver,
	PluginApiVersions: []string{drivers.ApiVersion010},
	PluginVersion:     PluginVersion,
	Name:              PluginName,
}

// configSpec is the plugin's `config {}` block in the client's
// `plugin "sandbox"` stanza.
var configSpec = hclspec.NewObject(map[string]*hclspec.Spec{
	"runsc_path": hclspec.NewDefault(hclspec.NewAttr("runsc_path", "string", false), hclspec.NewLiteral(`"runsc"`)),
	"runsc_root": hclspec.NewDefault(hclspec.NewAttr("runsc_root", "string", false), hclspec.NewLiteral(`"/run/nomad-sandbox/runsc"`)),
	"state_dir":  hclspec.NewDefault(hclspec.NewAttr("state_dir", "string", false), hclspec.NewLiteral(`"/run/nomad-sandbox/tasks"`)),
	"platform":   hclspec.NewDefault(hclspec.NewAttr("platform", "string", false), hclspec.NewLiteral(`"systrap"`)),
	"allow_caps": hclspec.NewDefault(hclspec.NewAttr("allow_caps", "list(string)", false), hclspec.NewLiteral(`[]`)),
	"allow_writable_rootfs": hclspec.NewDefault(
		hclspec.NewAttr("allow_writable_rootfs", "bool", false), hclspec.NewLiteral(`false`)),
	"allow_host_rootfs": hclspec.NewDefault(hclspec.NewAttr("allow_host_rootfs", "list(string)", false), hclspec.NewLiteral(`[]`)),
	"default_pids_limit": hclspec.NewDefault(
		hclspec.NewAttr("default_pids_limit", "number", false), hclspec.NewLiteral(`1024`)),
	"max_pids_limit": hclspec.NewDefault(
		hclspec.NewAttr("max_pids_limit", "number", false), hclspec.NewLiteral(`4096`)),
	"default_timeout": hclspec.NewAttr("default_timeout", "string", false),
	"max_timeout":     hclspec.NewAttr("max_timeout", "string", false),
	"max_sandboxes":   hclspec.NewAttr("max_sandboxes", "number", false),
	"audit_log":       hclspec.NewAttr("audit_log", "string", false),
	"trace_log":       hclspec.NewAttr("trace_log", "string", false),
	"trace_points": hclspec.NewDefault(
		hclspec.NewAttr("trace_points", "list(string)", false), hclspec.NewLiteral(`["exec", "connect", "exit"]`)),
	"trace_rate":        hclspec.NewAttr("trace_rate", "number", false),
	"trace_max_records": hclspec.NewAttr("trace_max_records", "number", false),
	"deny_env_identity": hclspec.NewDefault(
		hclspec.NewAttr("deny_env_identity", "bool", false), hclspec.NewLiteral(`false`)),
	"allow_task_api": hclspec.NewDefault(
		hclspec.NewAttr("allow_task_api", "bool", false), hclspec.NewLiteral(`false`)),
	"image_dir": hclspec.NewDefault(
		hclspec.NewAttr("image_dir", "string", false), hclspec.NewLiteral(`"/var/lib/nomad-sandbox/images"`)),
	"image_pull_timeout": hclspec.NewDefault(
		hclspec.NewAttr("image_pull_timeout", "string", false), hclspec.NewLiteral(`"5m"`)),
	"image_max_size_mb": hclspec.NewAttr("image_max_size_mb", "number", false),
	"require_digest": hclspec.NewDefault(
		hclspec.NewAttr("require_digest", "bool", false), hclspec.NewLiteral(`false`)),
	"allowed_registries": hclspec.NewDefault(
		hclspec.NewAttr("allowed_registries", "list(string)", false), hclspec.NewLiteral(`[]`)),
	"auth_config": hclspec.NewAttr("auth_config", "string", false),
	"allowed_egress": hclspec.NewDefault(
		hclspec.NewAttr("allowed_egress", "list(string)", false), hclspec.NewLiteral(`[]`)),
	"denied_egress": hclspec.NewDefault(
		hclspec.NewAttr("denied_egress", "list(string)", false), hclspec.NewLiteral(`[]`)),
	"dns_servers": hclspec.NewDefault(
		hclspec.NewAttr("dns_servers", "list(string)", false), hclspec.NewLiteral(`[]`)),
	"allow_host_network": hclspec.NewDefault(
		hclspec.NewAttr("allow_host_network", "bool", false), hclspec.NewLiteral(`false`)),
	"max_egress_entries": hclspec.NewDefault(
		hclspec.NewAttr("max_egress_entries", "number", false), hclspec.NewLiteral(`256`)),
	"network_subnet": hclspec.NewDefault(
		hclspec.NewAttr("network_subnet", "string", false), hclspec.NewLiteral(`"10.89.0.0/16"`)),
	"default_disk_limit": hclspec.NewDefault(
		hclspec.NewAttr("default_disk_limit", "string", false), hclspec.NewLiteral(`"1GiB"`)),
	"max_disk_limit": hclspec.NewDefault(
		hclspec.NewAttr("max_disk_limit", "string", false), hclspec.NewLiteral(`"16GiB"`)),
	"default_disk_inodes": hclspec.NewAttr("default_disk_inodes", "number", false),
	"max_disk_inodes":     hclspec.NewAttr("max_disk_inodes", "number", false),
	"disk_dir": hclspec.NewDefault(
		hclspec.NewAttr("disk_dir", "string", false), hclspec.NewLiteral(`"/var/lib/nomad-sandbox/disks"`)),
	"image_gc": hclspec.NewBlock("image_gc", false, hclspec.NewObject(map[string]*hclspec.Spec{
		"max_age":     hclspec.NewAttr("max_age", "string", false),
		"max_size_mb": hclspec.NewAttr("max_size_mb", "number", false),
	})),
})

// taskConfigSpec is the task's `config {}` block.
var taskConfigSpec = hclspec.NewObject(map[string]*hclspec.Spec{
	"rootfs":     hclspec.NewAttr("rootfs", "string", false),
	"command":    hclspec.NewAttr("command", "string", false),
	"args":       hclspec.NewAttr("args", "list(string)", false),
	"entrypoint": hclspec.NewAttr("entrypoint", "list(string)", false),
	"work_dir":   hclspec.NewAttr("work_dir", "string", false),
	"cap_add":    hclspec.NewAttr("cap_add", "list(string)", false),
	"readonly_rootfs": hclspec.NewDefault(
		hclspec.NewAttr("readonly_rootfs", "bool", false), hclspec.NewLiteral(`true`)),
	"tmpfs":       hclspec.NewDefault(hclspec.NewAttr("tmpfs", "list(string)", false), hclspec.NewLiteral(`["/tmp"]`)),
	"hostname":    hclspec.NewAttr("hostname", "string", false),
	"pids_limit":  hclspec.NewAttr("pids_limit", "number", false),
	"disk_limit":  hclspec.NewAttr("disk_limit", "string", false),
	"disk_inodes": hclspec.NewAttr("disk_inodes", "number", false),
	"timeout":     hclspec.NewAttr("timeout", "string", false),
	"image":       hclspec.NewAttr("image", "string", false),
	"egress":      hclspec.NewAttr("egress", "list(string)", false),
	"auth": hclspec.NewBlock("auth", false, hclspec.NewObject(map[string]*hclspec.Spec{
		"username": hclspec.NewAttr("username", "string", false),
		"password": hclspec.NewAttr("password", "string", false),
	})),
})

var capabilities = &drivers.Capabilities{
	SendSignals: true,
	Exec:        true,
	FSIsolation: drivers.FSIsolationImage,
	// Group: the sandbox joins the allocation's namespace (bridge mode) and
	// its filter goes on the host end. Host only where allow_host_network
	// says so (checked at start: Nomad never asks about host mode).
	NetIsolationModes: []drivers.NetIsolationMode{
		drivers.NetIsolationModeNone, drivers.NetIsolationModeGroup, drivers.NetIsolationModeHost,
	},
	MountConfigs: drivers.MountConfigSupportAll,
}

// PluginConfig is the decoded plugin configuration.
type PluginConfig struct {
	RunscPath           string   `codec:"runsc_path"`
	RunscRoot           string   `codec:"runsc_root"`
	StateDir            string   `codec:"state_dir"`
	Platform            string   `codec:"platform"`
	AllowCaps           []string `codec:"allow_caps"`
	AllowWritableRootfs bool     `codec:"allow_writable_rootfs"`
	AllowHostRootfs     []string `codec:"allow_host_rootfs"`
	DefaultPidsLimit    int64    `codec:"default_pids_limit"`
	MaxPidsLimit        int64    `codec:"max_pids_limit"`
	DefaultTimeout      string   `codec:"default_timeout"`
	MaxTimeout          string   `codec:"max_timeout"`
	MaxSandboxes        int      `codec:"max_sandboxes"`
	AuditLog            string   `codec:"audit_log"`
	TraceLog            string   `codec:"trace_log"`
	TracePoints         []string `codec:"trace_points"`
	TraceRate           int64    `codec:"trace_rate"`
	TraceMaxRecords     int64    `codec:"trace_max_records"`
	DenyEnvIdentity     bool     `codec:"deny_env_identity"`
	AllowTaskAPI        bool     `codec:"allow_task_api"`
	ImageDir            string   `codec:"image_dir"`
	ImagePullTimeout    string   `codec:"image_pull_timeout"`
	ImageMaxSizeMB      int64    `codec:"image_max_size_mb"`
	RequireDigest       bool     `codec:"require_digest"`
	AllowedRegistries   []string `codec:"allowed_registries"`
	AuthConfig          string   `codec:"auth_config"`
	ImageGC             ImageGC  `codec:"image_gc"`
	AllowedEgress       []string `codec:"allowed_egress"`
	DeniedEgress        []string `codec:"denied_egress"`
	DNSServers          []string `codec:"dns_servers"`
	NetworkSubnet       string   `codec:"network_subnet"`
	AllowHostNetwork    bool     `codec:"allow_host_network"`
	MaxEgressEntries    int      `codec:"max_egress_entries"`
	// Disk limits (see runtime/disk.go): sizes with a unit; "0" for
	// default_disk_limit means no limit for tasks that set none, for
	// max_disk_limit no ceiling.
	DefaultDiskLimit  string `codec:"default_disk_limit"`
	MaxDiskLimit      string `codec:"max_disk_limit"`
	DefaultDiskInodes int64  `codec:"default_disk_inodes"`
	MaxDiskInodes     int64  `codec:"max_disk_inodes"`
	DiskDir           string `codec:"disk_dir"`
}

// defaultMaxEgressEntries applies when max_egress_entries is 0: every entry
// costs filter elements and setup time under the network lock, which all
// allocations of the node share.
const defaultMaxEgressEntries = 256

func (c *PluginConfig) maxEgressEntries() int {
	if c.MaxEgressEntries == 0 {
		return defaultMaxEgressEntries
	}
	return c.MaxEgressEntries
}

// ImageGC is the plugin's image_gc block: unused images older than MaxAge
// are removed, then the oldest until the cache is under MaxSizeMB.
type ImageGC struct {
	MaxAge    string `codec:"max_age"`
	MaxSizeMB int64  `codec:"max_size_mb"`
}

// defaultImageMaxAge applies when image_gc sets no max_age.
const defaultImageMaxAge = 7 * 24 * time.Hour

// defaultImageCacheMB applies when image_gc sets no max_size_mb: without a
// cap, tasks naming ever new images would fill the node's disk.
const defaultImageCacheMB = 16384

// imageCacheMB is the cache's size cap in MiB.
func (c *PluginConfig) imageCacheMB() int64 {
	if c.ImageGC.MaxSizeMB > 0 {
		return c.ImageGC.MaxSizeMB
	}
	return defaultImageCacheMB
}

// defaultImageMaxSizeMB applies when image_max_size_mb is 0 or unset.
const defaultImageMaxSizeMB = 4096

// imageMaxSizeMB is the largest unpacked image in MiB.
func (c *PluginConfig) imageMaxSizeMB() int64 {
	if c.ImageMaxSizeMB > 0 {
		return c.ImageMaxSizeMB
	}
	return defaultImageMaxSizeMB
}

// timeouts returns default_timeout and max_timeout, which Validate checked.
func (c *PluginConfig) timeouts() (def, max time.Duration) {
	def, _ = parseTimeout("default_timeout", c.DefaultTimeout)
	max, _ = parseTimeout("max_timeout", c.MaxTimeout)
	return def, max
}

// Validate checks the plugin configuration and normalises capability names.
func (c *PluginConfig) Validate() error {
	var p runtime.Platform
	if err := p.Set(c.Platform); err != nil {
		return fmt.Errorf("plugin config: %w", err)
	}
	if c.RunscPath == "" {
		return fmt.Errorf("plugin config: runsc_path must not be empty")
	}
	for _, f := range []struct{ name, val string }{{"runsc_root", c.RunscRoot}, {"state_dir", c.StateDir}} {
		if !filepath.IsAbs(f.val) {
			return fmt.Errorf("plugin config: %s %q must be an absolute path", f.name, f.val)
		}
	}
	caps, err := normalizeCaps(c.AllowCaps)
	if err != nil {
		return fmt.Errorf("plugin config: allow_caps: %w", err)
	}
	c.AllowCaps = caps
	for i, d := range c.AllowHostRootfs {
		if !filepath.IsAbs(d) || filepath.Clean(d) == "/" {
			return fmt.Errorf("plugin config: allow_host_rootfs %q must be an absolute directory other than /", d)
		}
		c.AllowHostRootfs[i] = filepath.Clean(d)
	}
	if c.DefaultPidsLimit < 0 || c.MaxPidsLimit < 0 {
		return fmt.Errorf("plugin config: default_pids_limit and max_pids_limit must not be negative")
	}
	if c.MaxPidsLimit > 0 && c.DefaultPidsLimit > c.MaxPidsLimit {
		return fmt.Errorf("plugin config: default_pids_limit %d is above max_pids_limit %d", c.DefaultPidsLimit, c.MaxPidsLimit)
	}
	def, err := parseTimeout("default_timeout", c.DefaultTimeout)
	if err != nil {
		return fmt.Errorf("plugin config: %w", err)
	}
	max, err := parseTimeout("max_timeout", c.MaxTimeout)
	if err != nil {
		return fmt.Errorf("plugin config: %w", err)
	}
	if max > 0 && def > max {
		return fmt.Errorf("plugin config: default_timeout %s is above max_timeout %s", def, max)
	}
	if !filepath.IsAbs(c.ImageDir) {
		return fmt.Errorf("plugin config: image_dir %q must be an absolute path", c.ImageDir)
	}
	if c.AuthConfig != "" && !filepath.IsAbs(c.AuthConfig) {
		return fmt.Errorf("plugin config: auth_config %q must be an absolute path to a docker config.json", c.AuthConfig)
	}
	if _, err := parseTimeout("image_pull_timeout", c.ImagePullTimeout); err != nil {
		return fmt.Errorf("plugin config: %w", err)
	}
	if _, err := parseTimeout("image_gc.max_age", c.ImageGC.MaxAge); err != nil {
		return fmt.Errorf("plugin config: %w", err)
	}
	if c.ImageGC.MaxSizeMB < 0 {
		return fmt.Errorf("plugin config: image_gc.max_size_mb must not be negative")
	}
	if c.ImageMaxSizeMB < 0 {
		return fmt.Errorf("plugin config: image_max_size_mb must not be negative: give the largest unpacked image a task may use in MiB, e.g. 4096")
	}
	if c.imageMaxSizeMB() > c.imageCacheMB() {
		return fmt.Errorf("plugin config: image_max_size_mb %d is larger than the image cache (image_gc.max_size_mb %d): lower image_max_size_mb or raise image_gc.max_size_mb", c.imageMaxSizeMB(), c.imageCacheMB())
	}
	for _, e := range c.AllowedEgress {
		if _, err := netpolicy.ParseEgress(e); err != nil {
			return fmt.Errorf("plugin config: allowed_egress: %w", err)
		}
	}
	for _, d := range c.DeniedEgress {
		if _, err := netip.ParsePrefix(d); err != nil {
			if _, err := netip.ParseAddr(d); err != nil {
				return fmt.Errorf("plugin config: denied_egress %q is not an address or CIDR prefix", d)
			}
		}
	}
	for _, s := range c.DNSServers {
		if _, err := netip.ParseAddr(s); err != nil {
			if _, err := netip.ParseAddrPort(s); err != nil {
				return fmt.Errorf("plugin config: dns_servers %q is not an IP address or IP:port", s)
			}
		}
	}
	if c.NetworkSubnet == "" {
		c.NetworkSubnet = netpolicy.DefaultSubnet
	}
	if p, err := netip.ParsePrefix(c.NetworkSubnet); err != nil || !p.Addr().Is4() || p.Bits() > 24 {
		return fmt.Errorf("plugin config: network_subnet %q must be an IPv4 CIDR prefix of /24 or larger, e.g. \"10.89.0.0/16\"", c.NetworkSubnet)
	}
	if c.AuditLog != "" && !filepath.IsAbs(c.AuditLog) {
		return fmt.Errorf("plugin config: audit_log %q must be an absolute path", c.AuditLog)
	}
	if c.MaxSandboxes < 0 {
		return fmt.Errorf("plugin config: max_sandboxes must not be negative (0 means no limit)")
	}
	if err := c.validateTrace(); err != nil {
		return fmt.Errorf("plugin config: %w", err)
	}
	if err := c.validateDisk(); err != nil {
		return fmt.Errorf("plugin config: %w", err)
	}
	if c.MaxEgressEntries < 0 {
		return fmt.Errorf("plugin config: max_egress_entries must not be negative (0 means the default, %d)", defaultMaxEgressEntries)
	}
	return nil
}

// parseTimeout parses a Go duration such as "90s" or "1h30m"; empty is none.
func parseTimeout(field, s string) (time.Duration, error) {
	if s == "" {
		return 0, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("%s %q is not a positive duration: write it like \"90s\", \"15m\" or \"2h\"", field, s)
	}
	return d, nil
}

// TaskConfig is the decoded task configuration.
type TaskConfig struct {
	Rootfs         string   `codec:"rootfs"`
	Command        string   `codec:"command"`
	Args           []string `codec:"args"`
	Entrypoint     []string `codec:"entrypoint"`
	WorkDir        string   `codec:"work_dir"`
	CapAdd         []string `codec:"cap_add"`
	ReadonlyRootfs bool     `codec:"readonly_rootfs"`
	Tmpfs          []string `codec:"tmpfs"`
	Hostname       string   `codec:"hostname"`
	PidsLimit      int64    `codec:"pids_limit"`
	DiskLimit      string   `codec:"disk_limit"`
	DiskInodes     int64    `codec:"disk_inodes"`
	Timeout        string   `codec:"timeout"`
	Image          string   `codec:"image"`
	Auth           TaskAuth `codec:"auth"`
	Egress         []string `codec:"egress"`
}

// TaskAuth is the task's own registry credentials (the auth block).
type TaskAuth struct {
	Username string `codec:"username"`
	Password string `codec:"password"`
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

// Validate checks a task's configuration against the plugin's ceiling and
// returns the limits that apply. It runs before anything is created, and
// every message names the field and what to change.
func (tc *TaskConfig) Validate(pc *PluginConfig) (taskLimits, error) {
	var lim taskLimits
	err := tc.validate(pc, &lim)
	return lim, err
}

func (tc *TaskConfig) validate(pc *PluginConfig, lim *taskLimits) error {
	if err := tc.checkBytes(); err != nil {
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
		if !slices.Contains(pc.AllowCaps, c) {
			return fmt.Errorf("cap_add: %s is not allowed on this node: the operator must add it to the plugin's allow_caps", c)
		}
	}
	tc.CapAdd = caps
	if !tc.ReadonlyRootfs && !pc.AllowWritableRootfs {
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
		lim.pids = pc.DefaultPidsLimit
	case pc.MaxPidsLimit > 0 && tc.PidsLimit > pc.MaxPidsLimit:
		return fmt.Errorf("pids_limit %d is above this node's ceiling of %d (the plugin's max_pids_limit): ask for %d or less", tc.PidsLimit, pc.MaxPidsLimit, pc.MaxPidsLimit)
	default:
		lim.pids = tc.PidsLimit
	}
	timeout, err := parseTimeout("timeout", tc.Timeout)
	if err != nil {
		return err
	}
	def, max := pc.timeouts()
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
	if err := tc.diskLimits(pc, lim); err != nil {
		return err
	}
	if tc.Hostname != "" && !validHostname(tc.Hostname) {
		return fmt.Errorf("hostname %q is not a valid host name: use letters, digits and '-', at most 63 characters per label", tc.Hostname)
	}
	return nil
}

// checkBytes refuses a NUL byte in any string of the task config, and a
// control character in the ones that are paths or names: runsc and the
// kernel would cut such a string short or fail on it only after the
// sandbox's state, cgroup and network were made.
func (tc *TaskConfig) checkBytes() error {
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
			if err := checkString(name, v, f.path); err != nil {
				return err
			}
		}
	}
	return nil
}

// checkString refuses a NUL byte in s, and any control character when s is
// a path or a name; the error names field.
func checkString(field, s string, path bool) error {
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

// knownCaps are the Linux capabilities by their OCI names.
var knownCaps = []string{
	"CAP_AUDIT_CONTROL", "CAP_AUDIT_READ", "CAP_AUDIT_WRITE", "CAP_BLOCK_SUSPEND", "CAP_BPF",
	"CAP_CHECKPOINT_RESTORE", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER",
	"CAP_FSETID", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_KILL", "CAP_LEASE", "CAP_LINUX_IMMUTABLE",
	"CAP_MAC_ADMIN", "CAP_MAC_OVERRIDE", "CAP_MKNOD", "CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE",
	"CAP_NET_BROADCAST", "CAP_NET_RAW", "CAP_PERFMON", "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP",
	"CAP_SETUID", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_CHROOT", "CAP_SYS_MODULE", "CAP_SYS_NICE",
	"CAP_SYS_PACCT", "CAP_SYS_PTRACE", "CAP_SYS_RAWIO", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
	"CAP_SYS_TTY_CONFIG", "CAP_SYSLOG", "CAP_WAKE_ALARM",
}

// normalizeCaps accepts "net_raw", "NET_RAW" or "CAP_NET_RAW" and returns the
// sorted, de-duplicated OCI names. "all" is refused: a ceiling must be listed.
func normalizeCaps(in []string) ([]string, error) {
	set := map[string]bool{}
	for _, c := range in {
		name := strings.ToUpper(strings.TrimSpace(c))
		if name == "ALL" {
			return nil, fmt.Errorf("%q is not accepted: list each capability by name", c)
		}
		if !strings.HasPrefix(name, "CAP_") {
			name = "CAP_" + name
		}
		if !slices.Contains(knownCaps, name) {
			return nil, fmt.Errorf("unknown capability %q", c)
		}
		set[name] = true
	}
	out := make([]string, 0, len(set))
	for c := range set {
		out = append(out, c)
	}
	sort.Strings(out)
	return out, nil
}
