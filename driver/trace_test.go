package driver

import (
	"testing"

	"github.com/hashicorp/nomad/helper/pluginutils/hclutils"
	"github.com/shoenig/test/must"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/audit"
)

func TestPluginConfig_Trace(t *testing.T) {
	var pc PluginConfig
	hclutils.NewConfigParser(configSpec).ParseHCL(t, `config {}`, &pc)
	must.NoError(t, pc.Validate())
	must.Nil(t, pc.traceConfig(&audit.Record{}), must.Sprint("no trace_log, no trail"))

	hclutils.NewConfigParser(configSpec).ParseHCL(t, `
config {
  trace_log         = "/var/log/nomad-sandbox/trail.jsonl"
  trace_points      = ["exec", "open_write", "bind"]
  trace_rate        = 50
  trace_max_records = 1000
}`, &pc)
	must.NoError(t, pc.Validate())
	tc := pc.traceConfig(&audit.Record{Namespace: "default", Job: "web", TaskGroup: "g", Task: "t", AllocID: "a", Node: "n", SandboxID: "sb"})
	must.NotNil(t, tc)
	must.Eq(t, "/var/log/nomad-sandbox/trail.jsonl", tc.Log)
	must.Eq(t, []string{"exec", "open_write", "bind"}, tc.Points)
	must.Eq(t, 50, tc.Rate)
	must.Eq(t, 250, tc.Burst)
	must.Eq(t, 1000, tc.MaxRecords)
	must.Eq(t, "g", tc.Identity.TaskGroup)
	must.Eq(t, "sb", tc.Identity.SandboxID)

	pc.TraceRate, pc.TraceMaxRecords = 0, 0
	tc = pc.traceConfig(&audit.Record{})
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
			must.ErrorContains(t, bad.Validate(), c.want)
		})
	}
}
