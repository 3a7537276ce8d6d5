package driver

import (
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/trace"
)

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
