package driver

import (
	"errors"
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

// PluginConfig is the decoded plugin configuration, grouped by the plane
// each setting governs (the README's plugin table says what each does).
type PluginConfig struct {
	// The runtime and where it keeps its state.
	RunscPath string `codec:"runsc_path"`
	RunscRoot string `codec:"runsc_root"`
	StateDir  string `codec:"state_dir"`
	Platform  string `codec:"platform"`

	// Loosenings of the process and file system planes.
	AllowCaps           []string `codec:"allow_caps"`
	AllowWritableRootfs bool     `codec:"allow_writable_rootfs"`
	AllowHostRootfs     []string `codec:"allow_host_rootfs"`

	// Limits: defaults for tasks that set none, and ceilings.
	DefaultPidsLimit int64  `codec:"default_pids_limit"`
	MaxPidsLimit     int64  `codec:"max_pids_limit"`
	DefaultTimeout   string `codec:"default_timeout"`
	MaxTimeout       string `codec:"max_timeout"`
	MaxSandboxes     int    `codec:"max_sandboxes"`

	// The audit log and the syscall trail.
	AuditLog        string   `codec:"audit_log"`
	TraceLog        string   `codec:"trace_log"`
	TracePoints     []string `codec:"trace_points"`
	TraceRate       int64    `codec:"trace_rate"`
	TraceMaxRecords int64    `codec:"trace_max_records"`

	// Identity.
	DenyEnvIdentity bool `codec:"deny_env_identity"`
	AllowTaskAPI    bool `codec:"allow_task_api"`

	// Images and their pulls.
	ImageDir          string   `codec:"image_dir"`
	ImagePullTimeout  string   `codec:"image_pull_timeout"`
	ImageMaxSizeMB    int64    `codec:"image_max_size_mb"`
	RequireDigest     bool     `codec:"require_digest"`
	AllowedRegistries []string `codec:"allowed_registries"`
	AuthConfig        string   `codec:"auth_config"`
	ImageGC           ImageGC  `codec:"image_gc"`

	// The network and its egress policy.
	AllowedEgress    []string `codec:"allowed_egress"`
	DeniedEgress     []string `codec:"denied_egress"`
	DNSServers       []string `codec:"dns_servers"`
	NetworkSubnet    string   `codec:"network_subnet"`
	AllowHostNetwork bool     `codec:"allow_host_network"`
	MaxEgressEntries int      `codec:"max_egress_entries"`

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

// Settings is the plugin configuration as Validate returns it, and the
// only form the driver reads: the decoded fields, normalised (capability
// names, host rootfs directories, the subnet and trace points defaulted),
// and every value that is parsed from a string (the platform, durations,
// sizes, prefixes, egress entries) parsed once, by Validate.
//
// A type of its own rather than unexported fields that Validate fills in
// PluginConfig: a configuration that was never validated cannot be passed
// where parsed values are read, so no caller can forget the parse and read
// zeros, and no parse of a field happens twice (where two parsers could
// one day disagree).
type Settings struct {
	PluginConfig

	platform runtime.Platform
	// defaultTimeout and maxTimeout are 0 when unset.
	defaultTimeout, maxTimeout time.Duration
	// imagePullTimeout is 0 when unset: the image store's own default.
	imagePullTimeout time.Duration
	// imageMaxAge is image_gc.max_age, or defaultImageMaxAge.
	imageMaxAge time.Duration
	subnet      netip.Prefix
	// deniedEgress is denied_egress, each an address or a prefix.
	deniedEgress []netip.Prefix
	// allowedEgress is the ceiling of every task's egress.
	allowedEgress []netpolicy.Entry
	// defaultDiskBytes and maxDiskBytes are 0 for none.
	defaultDiskBytes, maxDiskBytes int64
}

// Validate checks the plugin configuration and returns it parsed and
// normalised; c itself is left as it is. Every message names the field.
func (c PluginConfig) Validate() (*Settings, error) {
	s, err := c.validate()
	if err != nil {
		return nil, fmt.Errorf("plugin config: %w", err)
	}
	return s, nil
}

func (c PluginConfig) validate() (*Settings, error) {
	s := &Settings{PluginConfig: c}
	if err := s.platform.Set(c.Platform); err != nil {
		return nil, err
	}
	if c.RunscPath == "" {
		return nil, errors.New("runsc_path must not be empty")
	}
	for _, f := range []struct{ name, val string }{{"runsc_root", c.RunscRoot}, {"state_dir", c.StateDir}} {
		if !filepath.IsAbs(f.val) {
			return nil, fmt.Errorf("%s %q must be an absolute path", f.name, f.val)
		}
	}
	caps, err := normalizeCaps(c.AllowCaps)
	if err != nil {
		return nil, fmt.Errorf("allow_caps: %w", err)
	}
	s.AllowCaps = caps
	// A new slice: the caller's stays as it was decoded.
	s.AllowHostRootfs = make([]string, len(c.AllowHostRootfs))
	for i, d := range c.AllowHostRootfs {
		if !filepath.IsAbs(d) || filepath.Clean(d) == "/" {
			return nil, fmt.Errorf("allow_host_rootfs %q must be an absolute directory other than /", d)
		}
		s.AllowHostRootfs[i] = filepath.Clean(d)
	}
	if c.DefaultPidsLimit < 0 || c.MaxPidsLimit < 0 {
		return nil, errors.New("default_pids_limit and max_pids_limit must not be negative")
	}
	if c.MaxPidsLimit > 0 && c.DefaultPidsLimit > c.MaxPidsLimit {
		return nil, fmt.Errorf("default_pids_limit %d is above max_pids_limit %d", c.DefaultPidsLimit, c.MaxPidsLimit)
	}
	if s.defaultTimeout, err = parseTimeout("default_timeout", c.DefaultTimeout); err != nil {
		return nil, err
	}
	if s.maxTimeout, err = parseTimeout("max_timeout", c.MaxTimeout); err != nil {
		return nil, err
	}
	if s.maxTimeout > 0 && s.defaultTimeout > s.maxTimeout {
		return nil, fmt.Errorf("default_timeout %s is above max_timeout %s", s.defaultTimeout, s.maxTimeout)
	}
	if !filepath.IsAbs(c.ImageDir) {
		return nil, fmt.Errorf("image_dir %q must be an absolute path", c.ImageDir)
	}
	if c.AuthConfig != "" && !filepath.IsAbs(c.AuthConfig) {
		return nil, fmt.Errorf("auth_config %q must be an absolute path to a docker config.json", c.AuthConfig)
	}
	if s.imagePullTimeout, err = parseTimeout("image_pull_timeout", c.ImagePullTimeout); err != nil {
		return nil, err
	}
	if s.imageMaxAge, err = parseTimeout("image_gc.max_age", c.ImageGC.MaxAge); err != nil {
		return nil, err
	}
	if s.imageMaxAge == 0 {
		s.imageMaxAge = defaultImageMaxAge
	}
	if c.ImageGC.MaxSizeMB < 0 {
		return nil, errors.New("image_gc.max_size_mb must not be negative")
	}
	if c.ImageMaxSizeMB < 0 {
		return nil, errors.New("image_max_size_mb must not be negative: give the largest unpacked image a task may use in MiB, e.g. 4096")
	}
	if c.imageMaxSizeMB() > c.imageCacheMB() {
		return nil, fmt.Errorf("image_max_size_mb %d is larger than the image cache (image_gc.max_size_mb %d): lower image_max_size_mb or raise image_gc.max_size_mb", c.imageMaxSizeMB(), c.imageCacheMB())
	}
	for _, a := range c.AllowedEgress {
		e, err := netpolicy.ParseEgress(a)
		if err != nil {
			return nil, fmt.Errorf("allowed_egress: %w", err)
		}
		s.allowedEgress = append(s.allowedEgress, e)
	}
	for _, d := range c.DeniedEgress {
		p, err := parseDenied(d)
		if err != nil {
			return nil, err
		}
		s.deniedEgress = append(s.deniedEgress, p)
	}
	for _, d := range c.DNSServers {
		if _, err := netpolicy.ParseUpstream(d); err != nil {
			return nil, fmt.Errorf("dns_servers %q is not an IP address or IP:port", d)
		}
	}
	if c.NetworkSubnet == "" {
		s.NetworkSubnet = netpolicy.DefaultSubnet
	}
	if s.subnet, err = netip.ParsePrefix(s.NetworkSubnet); err != nil || !s.subnet.Addr().Is4() || s.subnet.Bits() > 24 {
		return nil, fmt.Errorf("network_subnet %q must be an IPv4 CIDR prefix of /24 or larger, e.g. \"10.89.0.0/16\"", s.NetworkSubnet)
	}
	if c.AuditLog != "" && !filepath.IsAbs(c.AuditLog) {
		return nil, fmt.Errorf("audit_log %q must be an absolute path", c.AuditLog)
	}
	if c.MaxSandboxes < 0 {
		return nil, errors.New("max_sandboxes must not be negative (0 means no limit)")
	}
	if err := s.validateTrace(); err != nil {
		return nil, err
	}
	if s.defaultDiskBytes, s.maxDiskBytes, err = c.parseDisk(); err != nil {
		return nil, err
	}
	if c.MaxEgressEntries < 0 {
		return nil, fmt.Errorf("max_egress_entries must not be negative (0 means the default, %d)", defaultMaxEgressEntries)
	}
	return s, nil
}

// parseDenied parses one denied_egress entry: a CIDR prefix, else a single
// address (its own /32 or /128).
func parseDenied(d string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(d); err == nil {
		return p, nil
	}
	a, err := netip.ParseAddr(d)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("denied_egress %q is not an address or CIDR prefix", d)
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
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

// TaskConfig is the decoded task configuration, grouped by plane as
// PluginConfig is.
type TaskConfig struct {
	// What runs, and in which root.
	Rootfs     string   `codec:"rootfs"`
	Image      string   `codec:"image"`
	Auth       TaskAuth `codec:"auth"`
	Command    string   `codec:"command"`
	Args       []string `codec:"args"`
	Entrypoint []string `codec:"entrypoint"`
	WorkDir    string   `codec:"work_dir"`
	Hostname   string   `codec:"hostname"`

	// Privileges and file systems.
	CapAdd         []string `codec:"cap_add"`
	ReadonlyRootfs bool     `codec:"readonly_rootfs"`
	Tmpfs          []string `codec:"tmpfs"`

	// Limits.
	PidsLimit  int64  `codec:"pids_limit"`
	DiskLimit  string `codec:"disk_limit"`
	DiskInodes int64  `codec:"disk_inodes"`
	Timeout    string `codec:"timeout"`

	// Egress.
	Egress []string `codec:"egress"`
}

// TaskAuth is the task's own registry credentials (the auth block).
type TaskAuth struct {
	Username string `codec:"username"`
	Password string `codec:"password"`
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
