package driver

import (
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/nomad/helper/pluginutils/hclspecutils"
	"github.com/hashicorp/nomad/helper/pluginutils/hclutils"
	"github.com/shoenig/test/must"
)

// The specs are parsed from real HCL so that the hclspec and the struct tags
// can never drift apart.

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
	}, tc)
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
	must.NoError(t, pc.Validate())

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
}`, &pc)
	must.NoError(t, pc.Validate())
	must.Eq(t, "kvm", pc.Platform)
	must.Eq(t, []string{"CAP_NET_BIND_SERVICE", "CAP_NET_RAW"}, pc.AllowCaps)
	must.True(t, pc.AllowWritableRootfs)
	must.Eq(t, []string{"/var/lib/images"}, pc.AllowHostRootfs)
	must.Eq(t, 128, pc.DefaultPidsLimit)
	must.Eq(t, 512, pc.MaxPidsLimit)
	must.Eq(t, "10m", pc.DefaultTimeout)
	must.Eq(t, "1h", pc.MaxTimeout)
	must.Eq(t, 8, pc.MaxSandboxes)
	must.Eq(t, "/var/log/nomad-sandbox/audit.log", pc.AuditLog)
	must.True(t, pc.DenyEnvIdentity)
	must.True(t, pc.AllowTaskAPI)
	must.True(t, pc.AllowHostNetwork)
}

func TestPluginConfig_Validate(t *testing.T) {
	good := func() PluginConfig {
		return PluginConfig{RunscPath: "runsc", RunscRoot: "/run/r", StateDir: "/run/s", Platform: "systrap", ImageDir: "/var/lib/i"}
	}
	cases := []struct {
		name   string
		mutate func(*PluginConfig)
		want   string
	}{
		{"platform", func(c *PluginConfig) { c.Platform = "ptrace" }, `platform "ptrace" is not supported: use "systrap" or "kvm"`},
		{"relative root", func(c *PluginConfig) { c.RunscRoot = "runsc" }, `runsc_root "runsc" must be an absolute path`},
		{"relative state", func(c *PluginConfig) { c.StateDir = "state" }, `state_dir "state" must be an absolute path`},
		{"unknown cap", func(c *PluginConfig) { c.AllowCaps = []string{"CAP_MAGIC"} }, `allow_caps: unknown capability "CAP_MAGIC"`},
		{"all caps", func(c *PluginConfig) { c.AllowCaps = []string{"ALL"} }, `list each capability by name`},
		{"host rootfs /", func(c *PluginConfig) { c.AllowHostRootfs = []string{"/"} }, `allow_host_rootfs "/" must be an absolute directory other than /`},
		{"empty runsc", func(c *PluginConfig) { c.RunscPath = "" }, `runsc_path must not be empty`},
		{"bad timeout", func(c *PluginConfig) { c.MaxTimeout = "forever" }, `max_timeout "forever" is not a positive duration`},
		{"default above max timeout", func(c *PluginConfig) { c.DefaultTimeout, c.MaxTimeout = "2h", "1h" }, `default_timeout 2h0m0s is above max_timeout 1h0m0s`},
		{"default above max pids", func(c *PluginConfig) { c.DefaultPidsLimit, c.MaxPidsLimit = 100, 50 }, `default_pids_limit 100 is above max_pids_limit 50`},
		{"bad egress ceiling", func(c *PluginConfig) { c.AllowedEgress = []string{"example.com:99999"} }, `allowed_egress: egress entry "example.com:99999"`},
		{"bad denied egress", func(c *PluginConfig) { c.DeniedEgress = []string{"nope"} }, `denied_egress "nope" is not an address or CIDR prefix`},
		{"bad dns server", func(c *PluginConfig) { c.DNSServers = []string{"dns.google"} }, `dns_servers "dns.google" is not an IP address`},
		{"small subnet", func(c *PluginConfig) { c.NetworkSubnet = "10.89.0.0/28" }, `network_subnet "10.89.0.0/28" must be an IPv4 CIDR prefix of /24 or larger`},
		{"relative audit log", func(c *PluginConfig) { c.AuditLog = "audit.log" }, `audit_log "audit.log" must be an absolute path`},
		{"negative sandboxes", func(c *PluginConfig) { c.MaxSandboxes = -1 }, `max_sandboxes must not be negative`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := good()
			tc.mutate(&c)
			err := c.Validate()
			must.Error(t, err)
			must.StrContains(t, err.Error(), tc.want)
			must.True(t, strings.HasPrefix(err.Error(), "plugin config: "))
		})
	}
	c := good()
	must.NoError(t, c.Validate())
}

func TestTaskConfig_LimitsAgainstCeilings(t *testing.T) {
	pc := PluginConfig{RunscPath: "runsc", RunscRoot: "/r", StateDir: "/s", Platform: "systrap", ImageDir: "/i",
		DefaultPidsLimit: 100, MaxPidsLimit: 200, DefaultTimeout: "10m", MaxTimeout: "1h"}
	must.NoError(t, pc.Validate())
	base := TaskConfig{Rootfs: "local/rootfs", Command: "/bin/true", ReadonlyRootfs: true}

	lim, err := base.Validate(&pc)
	must.NoError(t, err)
	must.Eq(t, taskLimits{pids: 100, timeout: 10 * time.Minute}, lim)

	tc := base
	tc.PidsLimit, tc.Timeout = 150, "30m"
	lim, err = tc.Validate(&pc)
	must.NoError(t, err)
	must.Eq(t, taskLimits{pids: 150, timeout: 30 * time.Minute}, lim)

	tc = base
	tc.Timeout = "2h"
	_, err = tc.Validate(&pc)
	must.EqError(t, err, "timeout 2h0m0s is above this node's ceiling of 1h0m0s (the plugin's max_timeout): ask for 1h0m0s or less")

	tc = base
	tc.PidsLimit = 500
	_, err = tc.Validate(&pc)
	must.EqError(t, err, "pids_limit 500 is above this node's ceiling of 200 (the plugin's max_pids_limit): ask for 200 or less")

	tc = base
	tc.Timeout = "soon"
	_, err = tc.Validate(&pc)
	must.StrContains(t, err.Error(), `timeout "soon" is not a positive duration`)

	// A ceiling without a default is the default.
	pc.DefaultTimeout = ""
	lim, err = base.Validate(&pc)
	must.NoError(t, err)
	must.Eq(t, time.Hour, lim.timeout)
}
