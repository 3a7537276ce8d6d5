package driver

import (
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/nomad/helper/pluginutils/hclutils"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/audit"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/trace"
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

// Through the driver and a real sandbox network: the trail of a task that
// fetches from an allowlisted destination and tries a denied one shows both
// connects, the allowed one "ok" and the one the egress filter dropped as
// not succeeding, with the task's identity; the exited audit record names
// both destinations.
func TestDriver_TrailEgress(t *testing.T) {
	ee := newEgressEnv(t, nil, nil, nil)
	h := ee.host
	trail := filepath.Join(t.TempDir(), "trail.jsonl")
	ee.driver.config.TraceLog = trail
	ee.driver.config.TracePoints = []string{"exec", "connect", "exit"}
	allowed := netip.AddrPortFrom(h.Addr, egTCP1)
	denied := netip.AddrPortFrom(h.Addr, egTCP2)
	probes := []probe{
		{"allowed", wgetCmd(h.Addr.String(), egTCP1)},
		{"denied", wgetCmd(h.Addr.String(), egTCP2)},
	}
	cfg, cleanup := ee.task(t, "trail-egress", readonlyDefault(TaskConfig{
		Command: "/bin/sh", Args: []string{"-c", probeScript("", probes)},
		Egress:  []string{allowed.String()},
		Timeout: "60s",
	}))
	t.Cleanup(cleanup) // after startProbes' cleanup, which destroys the task
	out, res := ee.startProbes(t, cfg, probes)
	must.True(t, res["allowed"].ok(), must.Sprint(out))
	must.False(t, res["denied"].ok(), must.Sprint(out))
	exit := ee.finish(t, cfg)

	b, err := os.ReadFile(trail)
	must.NoError(t, err)
	results := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var r trace.Record
		must.NoError(t, json.Unmarshal([]byte(line), &r))
		must.Eq(t, cfg.AllocID, r.AllocID)
		must.Eq(t, cfg.Name, r.Task)
		must.Eq(t, cfg.TaskGroupName, r.TaskGroup)
		must.Eq(t, cfg.JobID, r.Job)
		must.Eq(t, sandboxID(cfg), r.SandboxID)
		if r.Point == trace.PointConnect && r.Port != nil {
			results[netip.AddrPortFrom(netip.MustParseAddr(r.Address), uint16(*r.Port)).String()] = r.Result
		}
	}
	t.Logf("connects: %v", results)
	must.Eq(t, "ok", results[allowed.String()])
	// The filter drops the SYN: the connect hangs until wget is killed
	// by its timeout (or gives up).
	must.SliceContains(t, []string{"interrupted", "ETIMEDOUT", "no_return"}, results[denied.String()],
		must.Sprint("the egress filter's drop shows as a connect that never succeeded"))
	must.NotNil(t, exit.Trail)
	must.SliceContainsAll(t, []string{allowed.String() + "/tcp", denied.String() + "/tcp"}, exit.Trail.Destinations)
}

// startProbes starts a task running probeScript(probes) and returns its
// output and results once the probes are done; the task is released and
// destroyed at cleanup whatever happens.
func (ee *egressEnv) startProbes(t *testing.T, cfg *drivers.TaskConfig, probes []probe) (string, map[string]probeResult) {
	t.Helper()
	_, _, err := ee.harness.StartTask(cfg)
	must.NoError(t, err)
	t.Cleanup(func() {
		release(cfg, "finish")
		_ = ee.harness.DestroyTask(cfg.ID, true) // gone already if the test got to finish
	})
	out := waitLog(t, cfg, "stdout", has("probes-done"))
	return out, parseProbes(t, out, probes)
}
