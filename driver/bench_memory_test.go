package driver

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	goruntime "runtime"
	"strings"
	"testing"
	"time"

	nbase "github.com/hashicorp/nomad/plugins/base"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

// BenchmarkTaskMemory starts a `sleep` task per iteration, measures the
// resident memory of its sandbox and of its supervisor, and destroys it.
// After the loop it reports this process's own VmRSS as an approximation
// of the plugin's: it is the test binary (the driver plus the testing
// framework) after all the tasks this benchmark ran. Metrics (medians):
//
//	sandbox-RSS-MiB     sum of VmRSS of the sandbox's processes: those whose
//	                    command line names the sandbox (runsc-sandbox,
//	                    runsc-gofer) and their children (systrap stubs);
//	                    pages they share are counted once per process
//	sandbox-PSS-MiB     the same processes' proportional set size (shared
//	                    pages split between their users)
//	supervisor-RSS-MiB  the task's supervisor (this test binary re-executed;
//	                    the plugin binary in production)
//	plugin-RSS-MiB      VmRSS of this benchmark process, after GC
func BenchmarkTaskMemory(b *testing.B) {
	e := newBenchEnv(b, false)
	var sbRSS, sbPSS, supRSS []float64
	var procs []benchProc
	for b.Loop() {
		cfg := e.taskConfig(b, "sleep", "/bin/sleep", "60")
		if _, _, err := e.d.StartTask(cfg); err != nil {
			b.Fatalf("StartTask: %v", err)
		}
		e.started[cfg.ID] = true
		b.StopTimer()
		sdir := e.stateDirOf(b, cfg.ID)
		id := filepath.Base(sdir)
		// Let the sandbox settle after `runsc start` returned.
		time.Sleep(300 * time.Millisecond)
		supPid := benchReadPid(filepath.Join(sdir, "supervisor.pid"))
		procs = benchSandboxProcs(id, supPid)
		if len(procs) == 0 {
			b.Fatalf("no process found for sandbox %s%s", id, benchPostMortem(sdir))
		}
		var rss, pss float64
		for _, p := range procs {
			rss += p.rssKiB / 1024
			pss += p.pssKiB / 1024
		}
		sbRSS, sbPSS = append(sbRSS, rss), append(sbPSS, pss)
		supRSS = append(supRSS, benchProcField(fmt.Sprintf("/proc/%d/status", supPid), "VmRSS")/1024)
		b.StartTimer()
		if err := e.d.DestroyTask(cfg.ID, true); err != nil {
			b.Fatalf("DestroyTask: %v", err)
		}
		delete(e.started, cfg.ID)
	}
	b.StopTimer()
	goruntime.GC()
	plugin := benchProcField("/proc/self/status", "VmRSS") / 1024
	var ms goruntime.MemStats
	goruntime.ReadMemStats(&ms)
	b.ReportMetric(testutil.Median(sbRSS), "sandbox-RSS-MiB")
	b.ReportMetric(testutil.Median(sbPSS), "sandbox-PSS-MiB")
	b.ReportMetric(testutil.Median(supRSS), "supervisor-RSS-MiB")
	b.ReportMetric(plugin, "plugin-RSS-MiB")
	idleNote := "bin/plugins/sandbox not built (make build)"
	if idle := benchPluginIdleRSS(b, e.dir); idle > 0 {
		b.ReportMetric(idle, "plugin-binary-idle-RSS-MiB")
		idleNote = fmt.Sprintf("the real plugin binary idle after its handshake: VmRSS %.1f MiB", idle)
	}
	var names []string
	for _, p := range procs {
		names = append(names, fmt.Sprintf("%s %.1f", p.name, p.rssKiB/1024))
	}
	summary := fmt.Sprintf("memory per sleep task: sandbox RSS %.1f MiB (PSS %.1f MiB; last one's processes, RSS MiB: %s), supervisor RSS %.1f MiB | plugin, approximated by this test process after %d tasks: VmRSS %.1f MiB, Go heap in use %.1f MiB; %s | medians of %d",
		testutil.Median(sbRSS), testutil.Median(sbPSS), strings.Join(names, ", "), testutil.Median(supRSS),
		e.seq, plugin, float64(ms.HeapInuse)/(1<<20), idleNote, len(sbRSS))
	benchSummary(b, summary)
}

// benchPluginBinary returns bin/plugins/sandbox (what `make build` makes
// and `make bench` builds first), or "" when it is not there.
func benchPluginBinary(b *testing.B) string {
	p := filepath.Join(filepath.Dir(testutil.Runsc(b)), "plugins", PluginName)
	if fi, err := os.Stat(p); err != nil || fi.IsDir() {
		return ""
	}
	return p
}

// benchPluginIdleRSS starts the real plugin binary as Nomad would (the
// go-plugin handshake cookie in its environment), waits for its handshake
// line, reads its VmRSS in MiB and kills it. It returns 0 when the binary
// is not built or does not answer.
func benchPluginIdleRSS(b *testing.B, dir string) float64 {
	b.Helper()
	exe := benchPluginBinary(b)
	if exe == "" {
		return 0
	}
	tmp := filepath.Join(dir, "plugin-tmp") // its go-plugin socket goes here
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command(exe)
	cmd.Env = []string{
		nbase.Handshake.MagicCookieKey + "=" + nbase.Handshake.MagicCookieValue,
		"TMPDIR=" + tmp,
		"PATH=/usr/sbin:/usr/bin:/sbin:/bin",
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Logf("start %s: %v", exe, err)
		return 0
	}
	defer func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}()
	got := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if strings.Contains(sc.Text(), "|grpc|") {
				got <- true
				return
			}
		}
		got <- false
	}()
	select {
	case ok := <-got:
		if !ok {
			return 0
		}
	case <-time.After(10 * time.Second):
		return 0
	}
	time.Sleep(200 * time.Millisecond)
	return benchProcField(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid), "VmRSS") / 1024
}
