package driver

import (
	"strings"
	"testing"

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
		RunscPath:       "runsc",
		RunscRoot:       "/run/nomad-sandbox/runsc",
		StateDir:        "/run/nomad-sandbox/tasks",
		Platform:        "systrap",
		AllowCaps:       []string{},
		AllowHostRootfs: []string{},
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
}`, &pc)
	must.NoError(t, pc.Validate())
	must.Eq(t, "kvm", pc.Platform)
	must.Eq(t, []string{"CAP_NET_BIND_SERVICE", "CAP_NET_RAW"}, pc.AllowCaps)
	must.True(t, pc.AllowWritableRootfs)
	must.Eq(t, []string{"/var/lib/images"}, pc.AllowHostRootfs)
}

func TestPluginConfig_Validate(t *testing.T) {
	good := func() PluginConfig {
		return PluginConfig{RunscPath: "runsc", RunscRoot: "/run/r", StateDir: "/run/s", Platform: "systrap"}
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
