package driver

import (
	"net/netip"
	"testing"
	"time"

	"github.com/hashicorp/nomad/helper/pluginutils/hclspecutils"
	"github.com/hashicorp/nomad/helper/pluginutils/hclutils"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/audit"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/netpolicy"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

// The tests in this file are pure: no root, no runsc, nothing created. The
// specs are parsed from real HCL so that the hclspec and the struct tags
// can never drift apart.

// minimalConfig is the smallest plugin config Validate accepts, as a Go
// value (the hclspec's defaults are not applied to it).
func minimalConfig() PluginConfig {
	return PluginConfig{RunscPath: "runsc", RunscRoot: "/run/r", StateDir: "/run/s", Platform: "systrap", ImageDir: "/var/lib/i"}
}

// mustValidate returns pc's settings, failing the test if Validate refuses it.
func mustValidate(t *testing.T, pc PluginConfig) *Settings {
	t.Helper()
	s, err := pc.Validate()
	must.NoError(t, err)
	return s
}

func TestTaskConfig_ParseHCL(t *testing.T) {
	var tc TaskConfig
	hclutils.NewConfigParser(taskConfigSpec).ParseHCL(t, `
config {
  rootfs          = "local/rootfs"
  command         = "/bin/sh"
  args            = ["-c", "echo hi"]
  entrypoint      = ["/bin/tini", "--"]
  work_dir        = "/work"
  cap_add         = ["NET_BIND_SERVICE"]
  readonly_rootfs = false
  tmpfs           = ["/tmp", "/run"]
  hostname        = "builder"
  pids_limit      = 64
  timeout         = "90s"
  disk_limit      = "2GiB"
  disk_inodes     = 50000
  egress          = ["203.0.113.7:443", "*.pypi.org:443", "10.1.2.3:53/udp"]
}`, &tc)
	must.Eq(t, TaskConfig{
		Rootfs:         "local/rootfs",
		Command:        "/bin/sh",
		Args:           []string{"-c", "echo hi"},
		Entrypoint:     []string{"/bin/tini", "--"},
		WorkDir:        "/work",
		CapAdd:         []string{"NET_BIND_SERVICE"},
		ReadonlyRootfs: false,
		Tmpfs:          []string{"/tmp", "/run"},
		Hostname:       "builder",
		PidsLimit:      64,
		Timeout:        "90s",
		DiskLimit:      "2GiB",
		DiskInodes:     50000,
		Egress:         []string{"203.0.113.7:443", "*.pypi.org:443", "10.1.2.3:53/udp"},
	}, tc)
}

func TestTaskConfig_ParseHCLImageAndAuth(t *testing.T) {
	var tc TaskConfig
	hclutils.NewConfigParser(taskConfigSpec).ParseHCL(t, `
config {
  image = "registry.example.com/team/app@sha256:0123"
  auth {
    username = "robot"
    password = "s3cret"
  }
}`, &tc)
	must.Eq(t, "registry.example.com/team/app@sha256:0123", tc.Image)
	must.Eq(t, TaskAuth{Username: "robot", Password: "s3cret"}, tc.Auth)
	must.Eq(t, "", tc.Rootfs)

	lim, err := tc.Validate(mustValidate(t, minimalConfig()))
	must.NoError(t, err, must.Sprint("an image needs no command: the image's own is the default"))
	must.Eq(t, taskLimits{}, lim)
}

func TestTaskConfig_Defaults(t *testing.T) {
	var tc TaskConfig
	hclutils.NewConfigParser(taskConfigSpec).ParseHCL(t, `
config {
  rootfs  = "local/rootfs"
  command = "/bin/true"
}`, &tc)
	must.True(t, tc.ReadonlyRootfs, must.Sprint("the root filesystem is read-only unless a job asks otherwise"))
	must.Eq(t, []string{"/tmp"}, tc.Tmpfs)
	must.SliceEmpty(t, tc.CapAdd)
	must.SliceEmpty(t, tc.Egress)
	must.Eq(t, "", tc.DiskLimit)
}

func TestTaskConfig_UnknownFieldRejected(t *testing.T) {
	spec, diags := hclspecutils.Convert(taskConfigSpec)
	must.False(t, diags.HasErrors())
	cfg := hclutils.HclConfigToInterface(t, `
config {
  rootfs     = "local/rootfs"
  command    = "/bin/true"
  privileged = true
}`)
	_, diag, errs := hclutils.ParseHclInterface(cfg, spec, nil)
	must.True(t, diag.HasErrors())
	must.SliceNotEmpty(t, errs)
	must.StrContains(t, errs[0].Error(), `"privileged"`)
}

func TestPluginConfig_ParseHCLAndDefaults(t *testing.T) {
	var pc PluginConfig
	hclutils.NewConfigParser(configSpec).ParseHCL(t, `config {}`, &pc)
	must.Eq(t, PluginConfig{
		RunscPath:         "runsc",
		RunscRoot:         "/run/nomad-sandbox/runsc",
		StateDir:          "/run/nomad-sandbox/tasks",
		Platform:          "systrap",
		AllowCaps:         []string{},
		AllowHostRootfs:   []string{},
		DefaultPidsLimit:  1024,
		MaxPidsLimit:      4096,
		ImageDir:          "/var/lib/nomad-sandbox/images",
		ImagePullTimeout:  "5m",
		AllowedRegistries: []string{},
		AllowedEgress:     []string{},
		DeniedEgress:      []string{},
		DNSServers:        []string{},
		NetworkSubnet:     "10.89.0.0/16",
		TracePoints:       []string{"exec", "connect", "exit"},
		MaxEgressEntries:  256,
		DefaultDiskLimit:  "1GiB",
		MaxDiskLimit:      "16GiB",
		DiskDir:           "/var/lib/nomad-sandbox/disks",
	}, pc)
	s := mustValidate(t, pc)
	must.Eq(t, runtime.PlatformSystrap, s.platform)
	must.Eq(t, 0, s.defaultTimeout)
	must.Eq(t, 0, s.maxTimeout)
	must.Eq(t, 5*time.Minute, s.imagePullTimeout)
	must.Eq(t, defaultImageMaxAge, s.imageMaxAge)
	must.Eq(t, netip.MustParsePrefix("10.89.0.0/16"), s.subnet)
	must.SliceEmpty(t, s.allowedEgress)
	must.SliceEmpty(t, s.deniedEgress)
	must.Eq(t, 1<<30, s.defaultDiskBytes)
	must.Eq(t, 16<<30, s.maxDiskBytes)

	hclutils.NewConfigParser(configSpec).ParseHCL(t, `
config {
  runsc_path            = "/usr/local/bin/runsc"
  runsc_root            = "/run/sbx"
  state_dir             = "/run/sbx-tasks"
  platform              = "kvm"
  allow_caps            = ["net_raw", "CAP_NET_BIND_SERVICE"]
  allow_writable_rootfs = true
  allow_host_rootfs     = ["/var/lib/images/"]
  default_pids_limit    = 128
  max_pids_limit        = 512
  default_timeout       = "10m"
  max_timeout           = "1h"
  max_sandboxes         = 8
  audit_log             = "/var/log/nomad-sandbox/audit.log"
  deny_env_identity     = true
  allow_task_api        = true
  allow_host_network    = true
  image_pull_timeout    = "90s"
  image_max_size_mb     = 512
  require_digest        = true
  allowed_registries    = ["registry.example.com"]
  auth_config           = "/etc/nomad-sandbox/config.json"
  image_gc {
    max_age     = "24h"
    max_size_mb = 2048
  }
  allowed_egress        = ["10.1.0.0/16", "*.pypi.org:443"]
  denied_egress         = ["203.0.113.9", "198.51.100.0/24"]
  dns_servers           = ["192.0.2.53", "192.0.2.54:5353"]
  network_subnet        = "10.77.0.0/20"
  max_egress_entries    = 16
  default_disk_limit    = "256MiB"
  max_disk_limit        = "2GiB"
  default_disk_inodes   = 1000
  max_disk_inodes       = 9000
  disk_dir              = "/srv/disks"
}`, &pc)
	s = mustValidate(t, pc)
	must.Eq(t, "kvm", s.Platform)
	must.Eq(t, runtime.PlatformKVM, s.platform)
	must.Eq(t, []string{"CAP_NET_BIND_SERVICE", "CAP_NET_RAW"}, s.AllowCaps)
	must.Eq(t, []string{"net_raw", "CAP_NET_BIND_SERVICE"}, pc.AllowCaps, must.Sprint("Validate leaves the decoded config as it is"))
	must.True(t, s.AllowWritableRootfs)
	must.Eq(t, []string{"/var/lib/images"}, s.AllowHostRootfs)
	must.Eq(t, []string{"/var/lib/images/"}, pc.AllowHostRootfs)
	must.Eq(t, 128, s.DefaultPidsLimit)
	must.Eq(t, 512, s.MaxPidsLimit)
	must.Eq(t, 10*time.Minute, s.defaultTimeout)
	must.Eq(t, time.Hour, s.maxTimeout)
	must.Eq(t, 8, s.MaxSandboxes)
	must.Eq(t, "/var/log/nomad-sandbox/audit.log", s.AuditLog)
	must.True(t, s.DenyEnvIdentity)
	must.True(t, s.AllowTaskAPI)
	must.True(t, s.AllowHostNetwork)
	must.Eq(t, 90*time.Second, s.imagePullTimeout)
	must.Eq(t, 512, s.imageMaxSizeMB())
	must.True(t, s.RequireDigest)
	must.Eq(t, []string{"registry.example.com"}, s.AllowedRegistries)
	must.Eq(t, "/etc/nomad-sandbox/config.json", s.AuthConfig)
	must.Eq(t, 24*time.Hour, s.imageMaxAge)
	must.Eq(t, 2048, s.imageCacheMB())
	must.Eq(t, []netpolicy.Entry{
		{Prefix: netip.MustParsePrefix("10.1.0.0/16"), Proto: "tcp"},
		{Host: "pypi.org", Wildcard: true, PortLo: 443, PortHi: 443, Proto: "tcp"},
	}, s.allowedEgress)
	must.Eq(t, []netip.Prefix{netip.MustParsePrefix("203.0.113.9/32"), netip.MustParsePrefix("198.51.100.0/24")}, s.deniedEgress,
		must.Sprint("denied_egress: a prefix, else an address as its own /32"))
	must.Eq(t, []string{"192.0.2.53", "192.0.2.54:5353"}, s.DNSServers)
	must.Eq(t, netip.MustParsePrefix("10.77.0.0/20"), s.subnet)
	must.Eq(t, 16, s.maxEgressEntries())
	must.Eq(t, 256<<20, s.defaultDiskBytes)
	must.Eq(t, 2<<30, s.maxDiskBytes)
	must.Eq(t, 1000, s.DefaultDiskInodes)
	must.Eq(t, 9000, s.MaxDiskInodes)
	must.Eq(t, "/srv/disks", s.diskDir())
}

// A config built in Go (no hclspec defaults) gets the same defaults from
// Validate: the platform, the subnet, the trace points, the image GC age.
func TestPluginConfig_ValidateFillsDefaults(t *testing.T) {
	s := mustValidate(t, PluginConfig{RunscPath: "runsc", RunscRoot: "/r", StateDir: "/s", ImageDir: "/i"})
	must.Eq(t, runtime.PlatformSystrap, s.platform)
	must.Eq(t, netpolicy.DefaultSubnet, s.NetworkSubnet)
	must.Eq(t, netip.MustParsePrefix(netpolicy.DefaultSubnet), s.subnet)
	must.Eq(t, []string{"exec", "connect", "exit"}, s.TracePoints)
	must.Eq(t, defaultImageMaxAge, s.imageMaxAge)
	must.Eq(t, 0, s.imagePullTimeout, must.Sprint("unset: the image store's own default"))
	must.Eq(t, 0, s.defaultDiskBytes, must.Sprint("unset default_disk_limit: no limit"))
	must.Eq(t, defaultMaxEgressEntries, s.maxEgressEntries())
	must.Eq(t, defaultDiskDir, s.diskDir())
}

// Every refusal of Validate, with its whole message: each names the field
// and, where there is one, the fix.
func TestPluginConfig_Validate(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(*PluginConfig)
		want   string
	}{
		{"platform", func(c *PluginConfig) { c.Platform = "ptrace" }, `platform "ptrace" is not supported: use "systrap" or "kvm"`},
		{"empty runsc", func(c *PluginConfig) { c.RunscPath = "" }, `runsc_path must not be empty`},
		{"relative root", func(c *PluginConfig) { c.RunscRoot = "runsc" }, `runsc_root "runsc" must be an absolute path`},
		{"relative state", func(c *PluginConfig) { c.StateDir = "state" }, `state_dir "state" must be an absolute path`},
		{"unknown cap", func(c *PluginConfig) { c.AllowCaps = []string{"CAP_MAGIC"} }, `allow_caps: unknown capability "CAP_MAGIC"`},
		{"all caps", func(c *PluginConfig) { c.AllowCaps = []string{"ALL"} }, `allow_caps: "ALL" is not accepted: list each capability by name`},
		{"host rootfs /", func(c *PluginConfig) { c.AllowHostRootfs = []string{"/"} }, `allow_host_rootfs "/" must be an absolute directory other than /`},
		{"host rootfs relative", func(c *PluginConfig) { c.AllowHostRootfs = []string{"images"} }, `allow_host_rootfs "images" must be an absolute directory other than /`},
		{"negative pids", func(c *PluginConfig) { c.DefaultPidsLimit = -1 }, `default_pids_limit and max_pids_limit must not be negative`},
		{"default above max pids", func(c *PluginConfig) { c.DefaultPidsLimit, c.MaxPidsLimit = 100, 50 }, `default_pids_limit 100 is above max_pids_limit 50`},
		{"bad default timeout", func(c *PluginConfig) { c.DefaultTimeout = "10" }, `default_timeout "10" is not a positive duration: write it like "90s", "15m" or "2h"`},
		{"bad timeout", func(c *PluginConfig) { c.MaxTimeout = "forever" }, `max_timeout "forever" is not a positive duration: write it like "90s", "15m" or "2h"`},
		{"negative timeout", func(c *PluginConfig) { c.MaxTimeout = "-1h" }, `max_timeout "-1h" is not a positive duration: write it like "90s", "15m" or "2h"`},
		{"default above max timeout", func(c *PluginConfig) { c.DefaultTimeout, c.MaxTimeout = "2h", "1h" }, `default_timeout 2h0m0s is above max_timeout 1h0m0s`},
		{"relative image dir", func(c *PluginConfig) { c.ImageDir = "images" }, `image_dir "images" must be an absolute path`},
		{"relative auth config", func(c *PluginConfig) { c.AuthConfig = "config.json" }, `auth_config "config.json" must be an absolute path to a docker config.json`},
		{"bad pull timeout", func(c *PluginConfig) { c.ImagePullTimeout = "0s" }, `image_pull_timeout "0s" is not a positive duration: write it like "90s", "15m" or "2h"`},
		{"bad gc age", func(c *PluginConfig) { c.ImageGC.MaxAge = "a week" }, `image_gc.max_age "a week" is not a positive duration: write it like "90s", "15m" or "2h"`},
		{"negative gc size", func(c *PluginConfig) { c.ImageGC.MaxSizeMB = -1 }, `image_gc.max_size_mb must not be negative`},
		{"negative image size", func(c *PluginConfig) { c.ImageMaxSizeMB = -1 }, `image_max_size_mb must not be negative: give the largest unpacked image a task may use in MiB, e.g. 4096`},
		{"image above cache", func(c *PluginConfig) { c.ImageGC.MaxSizeMB = 1000 }, `image_max_size_mb 4096 is larger than the image cache (image_gc.max_size_mb 1000): lower image_max_size_mb or raise image_gc.max_size_mb`},
		{"bad egress ceiling", func(c *PluginConfig) { c.AllowedEgress = []string{"example.com:99999"} }, `allowed_egress: egress entry "example.com:99999": port 99999 out of range 1-65535; ` + netpolicy.EgressForms},
		{"bad denied egress", func(c *PluginConfig) { c.DeniedEgress = []string{"nope"} }, `denied_egress "nope" is not an address or CIDR prefix`},
		{"bad dns server", func(c *PluginConfig) { c.DNSServers = []string{"dns.google"} }, `dns_servers "dns.google" is not an IP address or IP:port`},
		{"small subnet", func(c *PluginConfig) { c.NetworkSubnet = "10.89.0.0/28" }, `network_subnet "10.89.0.0/28" must be an IPv4 CIDR prefix of /24 or larger, e.g. "10.89.0.0/16"`},
		{"v6 subnet", func(c *PluginConfig) { c.NetworkSubnet = "fd00::/64" }, `network_subnet "fd00::/64" must be an IPv4 CIDR prefix of /24 or larger, e.g. "10.89.0.0/16"`},
		{"relative audit log", func(c *PluginConfig) { c.AuditLog = "audit.log" }, `audit_log "audit.log" must be an absolute path`},
		{"negative sandboxes", func(c *PluginConfig) { c.MaxSandboxes = -1 }, `max_sandboxes must not be negative (0 means no limit)`},
		{"relative trace log", func(c *PluginConfig) { c.TraceLog = "trail.jsonl" }, `trace_log "trail.jsonl" must be an absolute path (unset, there is no trail)`},
		{"bad disk limit", func(c *PluginConfig) { c.DefaultDiskLimit = "1G" }, `default_disk_limit "1G" is not a size: write a number and a unit, e.g. "512MiB" or "2GiB" (units B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB)`},
		{"bad max disk limit", func(c *PluginConfig) { c.MaxDiskLimit = "lots" }, `max_disk_limit "lots" is not a size: write a number and a unit, e.g. "512MiB" or "2GiB" (units B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB)`},
		{"small disk limit", func(c *PluginConfig) { c.DefaultDiskLimit = "1MiB" }, `default_disk_limit "1MiB" is below the smallest disk of 8MiB: raise it, or write "0" for no limit`},
		{"default above max disk", func(c *PluginConfig) { c.DefaultDiskLimit, c.MaxDiskLimit = "2GiB", "1GiB" }, `default_disk_limit 2GiB is above max_disk_limit 1GiB`},
		{"negative inodes", func(c *PluginConfig) { c.MaxDiskInodes = -1 }, `default_disk_inodes and max_disk_inodes must not be negative (0: the default)`},
		{"default above max inodes", func(c *PluginConfig) { c.DefaultDiskInodes, c.MaxDiskInodes = 10, 5 }, `default_disk_inodes 10 is above max_disk_inodes 5`},
		{"relative disk dir", func(c *PluginConfig) { c.DiskDir = "disks" }, `disk_dir "disks" must be an absolute path (a directory on the node's data disk, not tmpfs)`},
		{"negative egress entries", func(c *PluginConfig) { c.MaxEgressEntries = -1 }, `max_egress_entries must not be negative (0 means the default, 256)`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := minimalConfig()
			tc.mutate(&c)
			s, err := c.Validate()
			must.Nil(t, s)
			must.EqError(t, err, "plugin config: "+tc.want)
		})
	}
	mustValidate(t, minimalConfig())
}

// TestPluginConfig_DNSServersOneParser: dns_servers accepts exactly what the
// DNS service uses (netpolicy.ParseUpstream), so a node is never refused a
// form the service takes, nor started with one it cannot use.
func TestPluginConfig_DNSServersOneParser(t *testing.T) {
	for _, d := range []string{"192.0.2.53", "192.0.2.53:5353", "2001:db8::53", "[2001:db8::53]", "[2001:db8::53]:5353", "dns.google", "192.0.2.53:", "[2001:db8::53", ""} {
		c := minimalConfig()
		c.DNSServers = []string{d}
		_, verr := c.Validate()
		_, perr := netpolicy.ParseUpstream(d)
		must.Eq(t, perr == nil, verr == nil, must.Sprintf("dns_servers %q: Validate says %v, the DNS service's parser %v", d, verr, perr))
	}
}

// TestPluginConfig_ImageSizes: the image size caps default to non-zero
// values, and settings that cannot work are refused naming the fields.
func TestPluginConfig_ImageSizes(t *testing.T) {
	pc := minimalConfig()
	s := mustValidate(t, pc)
	must.Eq(t, 4096, s.imageMaxSizeMB())
	must.Eq(t, 16384, s.imageCacheMB())

	neg := pc
	neg.ImageMaxSizeMB = -1
	_, err := neg.Validate()
	must.ErrorContains(t, err, "image_max_size_mb must not be negative")

	over := pc
	over.ImageGC.MaxSizeMB = 1000
	_, err = over.Validate()
	must.ErrorContains(t, err, "image_max_size_mb 4096 is larger than the image cache (image_gc.max_size_mb 1000)")
	over.ImageMaxSizeMB = 500
	s = mustValidate(t, over)
	must.Eq(t, 500<<20, s.imageMaxSizeMB()<<20)
}

func TestPluginConfig_Trace(t *testing.T) {
	var pc PluginConfig
	hclutils.NewConfigParser(configSpec).ParseHCL(t, `config {}`, &pc)
	s := mustValidate(t, pc)
	must.Nil(t, s.traceConfig(&audit.Record{}), must.Sprint("no trace_log, no trail"))

	hclutils.NewConfigParser(configSpec).ParseHCL(t, `
config {
  trace_log         = "/var/log/nomad-sandbox/trail.jsonl"
  trace_points      = ["exec", "open_write", "bind"]
  trace_rate        = 50
  trace_max_records = 1000
}`, &pc)
	s = mustValidate(t, pc)
	tc := s.traceConfig(&audit.Record{Namespace: "default", Job: "web", TaskGroup: "g", Task: "t", AllocID: "a", Node: "n", SandboxID: "sb"})
	must.NotNil(t, tc)
	must.Eq(t, "/var/log/nomad-sandbox/trail.jsonl", tc.Log)
	must.Eq(t, []string{"exec", "open_write", "bind"}, tc.Points)
	must.Eq(t, 50, tc.Rate)
	must.Eq(t, 250, tc.Burst)
	must.Eq(t, 1000, tc.MaxRecords)
	must.Eq(t, "g", tc.Identity.TaskGroup)
	must.Eq(t, "sb", tc.Identity.SandboxID)

	pc.TraceRate, pc.TraceMaxRecords = 0, 0
	tc = mustValidate(t, pc).traceConfig(&audit.Record{})
	must.Eq(t, defaultTraceRate, tc.Rate)
	must.Eq(t, defaultTraceMaxRecords, tc.MaxRecords)

	for _, c := range []struct {
		name string
		set  func(*PluginConfig)
		want string
	}{
		{"relative", func(p *PluginConfig) { p.TraceLog = "trail.jsonl" }, "trace_log"},
		{"unknown point", func(p *PluginConfig) { p.TracePoints = []string{"exec", "fork"} }, `trace_points: unknown point "fork"`},
		{"empty points", func(p *PluginConfig) { p.TracePoints = []string{} }, "trace_points is empty"},
		{"negative rate", func(p *PluginConfig) { p.TraceRate = -1 }, "trace_rate"},
		{"negative total", func(p *PluginConfig) { p.TraceMaxRecords = -1 }, "trace_max_records"},
	} {
		t.Run(c.name, func(t *testing.T) {
			bad := pc
			bad.TracePoints = append([]string(nil), pc.TracePoints...)
			c.set(&bad)
			_, err := bad.Validate()
			must.ErrorContains(t, err, c.want)
		})
	}
}

func TestTaskConfig_LimitsAgainstCeilings(t *testing.T) {
	pc := PluginConfig{RunscPath: "runsc", RunscRoot: "/r", StateDir: "/s", Platform: "systrap", ImageDir: "/i",
		DefaultPidsLimit: 100, MaxPidsLimit: 200, DefaultTimeout: "10m", MaxTimeout: "1h"}
	s := mustValidate(t, pc)
	base := TaskConfig{Rootfs: "local/rootfs", Command: "/bin/true", ReadonlyRootfs: true}

	lim, err := base.Validate(s)
	must.NoError(t, err)
	must.Eq(t, taskLimits{pids: 100, timeout: 10 * time.Minute}, lim)

	tc := base
	tc.PidsLimit, tc.Timeout = 150, "30m"
	lim, err = tc.Validate(s)
	must.NoError(t, err)
	must.Eq(t, taskLimits{pids: 150, timeout: 30 * time.Minute}, lim)

	tc = base
	tc.Timeout = "2h"
	_, err = tc.Validate(s)
	must.EqError(t, err, "timeout 2h0m0s is above this node's ceiling of 1h0m0s (the plugin's max_timeout): ask for 1h0m0s or less")

	tc = base
	tc.PidsLimit = 500
	_, err = tc.Validate(s)
	must.EqError(t, err, "pids_limit 500 is above this node's ceiling of 200 (the plugin's max_pids_limit): ask for 200 or less")

	tc = base
	tc.Timeout = "soon"
	_, err = tc.Validate(s)
	must.EqError(t, err, `timeout "soon" is not a positive duration: write it like "90s", "15m" or "2h"`)

	// A ceiling without a default is the default.
	pc.DefaultTimeout = ""
	lim, err = base.Validate(mustValidate(t, pc))
	must.NoError(t, err)
	must.Eq(t, time.Hour, lim.timeout)
}

// Every refusal of TaskConfig.Validate, with its whole message.
func TestTaskConfig_ValidateMessages(t *testing.T) {
	pc := minimalConfig()
	pc.AllowCaps = []string{"net_bind_service"}
	s := mustValidate(t, pc)
	cases := []struct {
		name   string
		mutate func(*TaskConfig)
		want   string
	}{
		{"image and rootfs", func(tc *TaskConfig) { tc.Image = "busybox" }, "image and rootfs are both set: use one of them"},
		{"no root", func(tc *TaskConfig) { tc.Rootfs = " " }, "rootfs or image is required: set image to an OCI image reference, or rootfs to a directory holding the task's root filesystem"},
		{"no command", func(tc *TaskConfig) { tc.Command = "" }, "command is required: set command (and args) or entrypoint"},
		{"relative work_dir", func(tc *TaskConfig) { tc.WorkDir = "work" }, `work_dir "work" must be an absolute path inside the sandbox`},
		{"unknown cap", func(tc *TaskConfig) { tc.CapAdd = []string{"fly"} }, `cap_add: unknown capability "fly"`},
		{"cap not allowed", func(tc *TaskConfig) { tc.CapAdd = []string{"sys_admin"} }, "cap_add: CAP_SYS_ADMIN is not allowed on this node: the operator must add it to the plugin's allow_caps"},
		{"writable rootfs", func(tc *TaskConfig) { tc.ReadonlyRootfs = false }, "readonly_rootfs = false is not allowed on this node: the operator must set allow_writable_rootfs in the plugin config"},
		{"tmpfs relative", func(tc *TaskConfig) { tc.Tmpfs = []string{"tmp"} }, `tmpfs "tmp" must be an absolute path other than /`},
		{"tmpfs root", func(tc *TaskConfig) { tc.Tmpfs = []string{"/"} }, `tmpfs "/" must be an absolute path other than /`},
		{"tmpfs reserved", func(tc *TaskConfig) { tc.Tmpfs = []string{"/local/x"} }, `tmpfs "/local/x" would cover a path the driver mounts (/alloc, /local, /secrets, /proc, /dev, /sys, /etc/resolv.conf, /etc/hosts)`},
		{"tmpfs twice", func(tc *TaskConfig) { tc.Tmpfs = []string{"/tmp", "/tmp/"} }, `tmpfs "/tmp/" is listed twice`},
		{"negative pids", func(tc *TaskConfig) { tc.PidsLimit = -1 }, "pids_limit -1 must be positive"},
		{"bad hostname", func(tc *TaskConfig) { tc.Hostname = "-web" }, `hostname "-web" is not a valid host name: use letters, digits and '-', at most 63 characters per label`},
		{"bad disk limit", func(tc *TaskConfig) { tc.DiskLimit = "100" }, `disk_limit "100" is not a size: write a number and a unit, e.g. "512MiB" or "2GiB" (units B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB)`},
		{"NUL in command", func(tc *TaskConfig) { tc.Command = "/bin/sh\x00x" }, "command holds a NUL byte: remove it (no string the sandbox gets may contain one)"},
		{"NUL in arg", func(tc *TaskConfig) { tc.Args = []string{"ok", "a\x00"} }, "args[1] holds a NUL byte: remove it (no string the sandbox gets may contain one)"},
		{"control in path", func(tc *TaskConfig) { tc.Rootfs = "local/\nroot" }, `rootfs "local/\nroot" holds a control character (U+000A): remove it, paths and names must be printable`},
		{"control in arg is fine, NUL in password is not", func(tc *TaskConfig) { tc.Args = []string{"a\nb"}; tc.Auth.Password = "p\x00" }, "auth.password holds a NUL byte: remove it (no string the sandbox gets may contain one)"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tc := TaskConfig{Rootfs: "local/rootfs", Command: "/bin/true", ReadonlyRootfs: true, Tmpfs: []string{"/tmp"}}
			c.mutate(&tc)
			_, err := tc.Validate(s)
			must.EqError(t, err, c.want)
		})
	}
	tc := TaskConfig{Rootfs: "local/rootfs", Command: "/bin/true", CapAdd: []string{"NET_BIND_SERVICE", "cap_net_bind_service"}, ReadonlyRootfs: true}
	_, err := tc.Validate(s)
	must.NoError(t, err)
	must.Eq(t, []string{"CAP_NET_BIND_SERVICE"}, tc.CapAdd, must.Sprint("cap_add is normalised"))
}

func TestTaskConfig_ValidateEgress(t *testing.T) {
	pc := minimalConfig()
	none := mustValidate(t, pc)
	pc.AllowedEgress = []string{"10.198.0.0/16:443", "*.pypi.test:443"}
	pc.MaxEgressEntries = 2
	s := mustValidate(t, pc)

	got, err := (&TaskConfig{}).validateEgress(none)
	must.NoError(t, err)
	must.Nil(t, got)
	_, err = (&TaskConfig{Egress: []string{"10.198.0.1:443"}}).validateEgress(none)
	must.EqError(t, err, `egress "10.198.0.1:443": this node allows no egress: the operator must list permitted destinations in the plugin's allowed_egress`)

	got, err = (&TaskConfig{Egress: []string{"10.198.3.4:443", "files.pypi.test:443"}}).validateEgress(s)
	must.NoError(t, err)
	must.Eq(t, []netpolicy.Entry{
		{Prefix: netip.MustParsePrefix("10.198.3.4/32"), PortLo: 443, PortHi: 443, Proto: "tcp"},
		{Host: "files.pypi.test", PortLo: 443, PortHi: 443, Proto: "tcp"},
	}, got)
	_, err = (&TaskConfig{Egress: []string{"10.198.3.4:80"}}).validateEgress(s)
	must.EqError(t, err, `egress "10.198.3.4:80" is outside what this node permits (the plugin's allowed_egress): ask for a destination within 10.198.0.0/16:443, *.pypi.test:443`)
	_, err = (&TaskConfig{Egress: []string{"10.198.3.4:http"}}).validateEgress(s)
	must.EqError(t, err, `egress entry "10.198.3.4:http": invalid port "http"; `+netpolicy.EgressForms)
	_, err = (&TaskConfig{Egress: []string{"10.198.3.4:443", "10.198.3.5:443", "10.198.3.6:443"}}).validateEgress(s)
	must.EqError(t, err, "egress lists 3 entries, more than this node allows (the plugin's max_egress_entries, 2): use CIDR prefixes, port ranges or wildcard names to cover more with fewer entries")
}

// validateTask's own steps, after the config block: what the job sets
// outside it, and where the network comes from. Nothing is created.
func TestDriver_ValidateTask(t *testing.T) {
	pc := minimalConfig()
	pc.AllowedEgress = []string{"203.0.113.0/24"}
	pc.DenyEnvIdentity = true
	d := &Driver{config: mustValidate(t, pc)}
	good := func() (*drivers.TaskConfig, *TaskConfig) {
		return &drivers.TaskConfig{Env: map[string]string{"A": "1"}, User: "nobody"},
			&TaskConfig{Rootfs: "local/rootfs", Command: "/bin/true", ReadonlyRootfs: true, Egress: []string{"203.0.113.7:443"}}
	}
	cases := []struct {
		name   string
		mutate func(*drivers.TaskConfig, *TaskConfig)
		want   string
	}{
		{"config block first", func(cfg *drivers.TaskConfig, tc *TaskConfig) { tc.Command = ""; cfg.User = "\x00" }, "command is required: set command (and args) or entrypoint"},
		{"user", func(cfg *drivers.TaskConfig, _ *TaskConfig) { cfg.User = "no\x00body" }, "user holds a NUL byte: remove it (no string the sandbox gets may contain one)"},
		{"env name", func(cfg *drivers.TaskConfig, _ *TaskConfig) { cfg.Env = map[string]string{"A=B": "1"} }, `env name "A=B" holds '=': rename the variable`},
		{"env value", func(cfg *drivers.TaskConfig, _ *TaskConfig) { cfg.Env = map[string]string{"A": "1\x00"} }, `env "A" holds a NUL byte: remove it (no string the sandbox gets may contain one)`},
		{"mount bytes", func(cfg *drivers.TaskConfig, _ *TaskConfig) {
			cfg.Mounts = []*drivers.MountConfig{{TaskPath: "/data\n", HostPath: "/srv"}}
		}, `volume_mount destination "/data\n" holds a control character (U+000A): remove it, paths and names must be printable`},
		{"egress", func(_ *drivers.TaskConfig, tc *TaskConfig) { tc.Egress = []string{"198.51.100.1"} }, `egress "198.51.100.1" is outside what this node permits (the plugin's allowed_egress): ask for a destination within 203.0.113.0/24`},
		{"identity", func(cfg *drivers.TaskConfig, _ *TaskConfig) { cfg.Env = map[string]string{"NOMAD_TOKEN": "x"} }, "the job asks for its workload identity in the environment (identity { env = true }), which this node forbids (the plugin's deny_env_identity): use identity { file = true } and read /secrets/nomad_token"},
		{"driver network", func(cfg *drivers.TaskConfig, _ *TaskConfig) {
			cfg.NetworkIsolation = &drivers.NetworkIsolationSpec{Mode: drivers.NetIsolationModeTask}
		}, `network mode "driver" is not supported: use network { mode = "bridge" } or no network block`},
		{"mount destination", func(cfg *drivers.TaskConfig, _ *TaskConfig) {
			cfg.Mounts = []*drivers.MountConfig{{TaskPath: "/secrets/x", HostPath: "/srv"}}
		}, `volume_mount destination "/secrets/x" must be an absolute path outside /alloc, /local, /secrets, /proc, /dev and /sys`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg, tc := good()
			c.mutate(cfg, tc)
			_, err := d.validateTask(cfg, tc)
			must.EqError(t, err, c.want)
		})
	}
	cfg, tc := good()
	lim, err := d.validateTask(cfg, tc)
	must.NoError(t, err)
	must.Eq(t, netOwn, lim.net)
	must.Eq(t, 1, len(lim.egress))
	must.Eq(t, "203.0.113.7:443", lim.egress[0].String())
}

func TestDiskLimits_Validate(t *testing.T) {
	pc := minimalConfig()
	pc.DefaultDiskLimit, pc.MaxDiskLimit, pc.MaxDiskInodes = "1GiB", "16GiB", 100000
	s := mustValidate(t, pc)
	for _, c := range []struct {
		tc            TaskConfig
		bytes, inodes int64
		err           string
	}{
		{TaskConfig{}, 1 << 30, 65536, ""},
		{TaskConfig{DiskLimit: "2GiB"}, 2 << 30, 100000, ""},
		{TaskConfig{DiskLimit: "2GiB", DiskInodes: 100001}, 0, 0, "disk_inodes 100001 is above this node's ceiling of 100000 (the plugin's max_disk_inodes): ask for 100000 or less"},
		{TaskConfig{DiskLimit: "500MB", DiskInodes: 5000}, 500e6, 5000, ""},
		{TaskConfig{DiskLimit: "17GiB"}, 0, 0, "disk_limit 17GiB is above this node's ceiling of 16GiB (the plugin's max_disk_limit): ask for 16GiB or less"},
		{TaskConfig{DiskLimit: "2 GiB"}, 2 << 30, 100000, ""},
		{TaskConfig{DiskLimit: "2G"}, 0, 0, `disk_limit "2G" is not a size: write a number and a unit, e.g. "512MiB" or "2GiB" (units B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB)`},
		{TaskConfig{DiskLimit: "4MiB"}, 0, 0, `disk_limit "4MiB" is below the smallest disk of 8MiB: ask for more`},
		{TaskConfig{DiskLimit: "16MiB", DiskInodes: 50000}, 0, 0, "disk_inodes 50000 is more than a disk of 16MiB holds (at most 32768): raise disk_limit or lower disk_inodes"},
		{TaskConfig{DiskInodes: -1}, 0, 0, "disk_inodes -1 must be positive"},
	} {
		var lim taskLimits
		err := c.tc.diskLimits(s, &lim)
		if c.err != "" {
			must.EqError(t, err, c.err, must.Sprintf("%+v", c.tc))
			continue
		}
		must.NoError(t, err)
		must.Eq(t, c.bytes, lim.diskBytes)
		must.Eq(t, c.inodes, lim.diskInodes)
	}
	var lim taskLimits
	pc = minimalConfig()
	pc.DefaultDiskLimit = "0"
	must.NoError(t, (&TaskConfig{}).diskLimits(mustValidate(t, pc), &lim))
	must.Eq(t, 0, lim.diskBytes)
	must.EqError(t, (&TaskConfig{DiskInodes: 10}).diskLimits(mustValidate(t, minimalConfig()), &lim), "disk_inodes needs a disk_limit: this node sets no default_disk_limit, so set disk_limit too")
}
