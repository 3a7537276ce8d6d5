package driver

// Probes: commands run inside a sandbox that report what the task could
// reach, for the egress, group network and spoofing tests.

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

// release lets a task that waits for /alloc/data/<name> go on; for
// deferred cleanups, where a failure must not stop the cleanup.
func release(cfg *drivers.TaskConfig, names ...string) {
	for _, n := range names {
		_ = os.WriteFile(filepath.Join(cfg.TaskDir().SharedAllocDir, "data", n), nil, 0o644)
	}
}

// startProbing starts cfg's task; the func it returns, for defer, lets the
// task past the files gates and "finish" in /alloc/data, and destroys it
// (gone already if the test got to finish).
func (ee *egressEnv) startProbing(t *testing.T, cfg *drivers.TaskConfig, gates ...string) (stop func()) {
	t.Helper()
	_, _, err := ee.harness.StartTask(cfg)
	must.NoError(t, err)
	return func() {
		release(cfg, append(gates, "finish")...)
		_ = ee.harness.DestroyTask(cfg.ID, true)
	}
}

// probe is one command run inside the sandbox, bounded by a timeout.
type probe struct{ name, cmd string }

// probeScript runs the probes concurrently (each within 4 s) once the file
// gate (if any) exists, prints one line "[name] rc=N output" each, then
// "probes-done", and waits for /alloc/data/finish before it exits 0.
func probeScript(gate string, probes []probe) string {
	var b strings.Builder
	b.WriteString("echo ready\n")
	if gate != "" {
		fmt.Fprintf(&b, "while [ ! -e /alloc/data/%s ]; do sleep 0.05; done\n", gate)
	}
	for i, p := range probes {
		fmt.Fprintf(&b, "( out=$(timeout 4 sh -c %s 2>&1); echo \"[%s] rc=$? $(echo \"$out\" | tr '\\n' ' ')\" ) > /tmp/probe-%03d &\n", shQuote(p.cmd), p.name, i)
	}
	b.WriteString("wait\ncat /tmp/probe-*\necho probes-done\n")
	b.WriteString("while [ ! -e /alloc/data/finish ]; do sleep 0.05; done\necho finished\n")
	return b.String()
}

func shQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

var probeLine = regexp.MustCompile(`(?m)^\[([^\]]+)\] rc=(\d+) ?(.*)$`)

type probeResult struct {
	rc  string
	out string
}

func (r probeResult) ok() bool { return r.rc == "0" }

func parseProbes(t *testing.T, out string, probes []probe) map[string]probeResult {
	t.Helper()
	res := map[string]probeResult{}
	for _, m := range probeLine.FindAllStringSubmatch(out, -1) {
		res[m[1]] = probeResult{rc: m[2], out: m[3]}
	}
	for _, p := range probes {
		if _, ok := res[p.name]; !ok {
			t.Fatalf("no result for probe %s in:\n%s", p.name, out)
		}
	}
	return res
}

// probeResults waits until the task's probes are done, logs its stdout and
// returns it with their results.
func probeResults(t *testing.T, cfg *drivers.TaskConfig, probes []probe) (string, map[string]probeResult) {
	t.Helper()
	out := waitLog(t, cfg, "stdout", has("probes-done"))
	t.Logf("inside the sandbox:\n%s", out)
	return out, parseProbes(t, out, probes)
}

// wgetCmd fetches http://host:port/ with busybox wget (its -T option
// crashes busybox 1.35, so the probe's timeout bounds it).
func wgetCmd(host string, port int) string {
	return fmt.Sprintf("wget -q -O - http://%s:%d/", host, port)
}

// installEgressProbe puts the egress probe (internal/testutil/egressprobe)
// in the task's local dir: /local/egress-probe in the sandbox.
func installEgressProbe(t *testing.T, cfg *drivers.TaskConfig) {
	t.Helper()
	testutil.BuildEgressProbe(t, filepath.Join(cfg.TaskDir().LocalDir, "egress-probe"))
}

func udpCmd(a netip.Addr, port int) string {
	return fmt.Sprintf("/local/egress-probe udp %s:%d", a, port)
}

func pingCmd(a netip.Addr) string { return "/local/egress-probe ping " + a.String() }
