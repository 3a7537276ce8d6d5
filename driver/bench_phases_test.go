package driver

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

// benchPhases split one driver cycle by timestamps the benchmark sees
// without touching the driver: a wrapper standing in for runsc logs when
// each runsc command begins and ends, and the supervisor's exit status has
// StartedAt (taken just before the sandbox's first runsc command) and
// CompletedAt (sandbox reaped, before the supervisor's `runsc delete`).
// The supervisor starts the sandbox either with `runsc create` and `runsc
// start`, or with a single `runsc run --detach` (detached: create holds
// that command, gap and start are 0).
type benchPhases struct {
	ok       bool
	lost     bool          // the exit status was lost: result is meaningless
	detached bool          // started by `runsc run --detach`
	prep     time.Duration // StartTask called -> `runsc create` began (the sum of the next three)
	plugin   time.Duration // StartTask called -> supervisor wrapper runs: decode, checks, task files, bundle, spec, fork/exec (and bash start)
	supInit  time.Duration // -> supervisor about to run `runsc create`: exec, Go init, spec, pid file, socket, pipes
	execCrt  time.Duration // -> `runsc create` began: exec of the runsc wrapper (bash)
	create   time.Duration // `runsc create` (detached: `runsc run --detach`)
	gap      time.Duration // create ended -> `runsc start` began
	start    time.Duration // `runsc start`
	ready    time.Duration // start (detached: run) ended -> StartTask returned (ready pipe)
	run      time.Duration // StartTask returned -> sandbox reaped by the supervisor
	toDelete time.Duration // sandbox reaped -> the supervisor's `runsc delete` began (output relays)
	delete   time.Duration // the supervisor's `runsc delete --force`
	result   time.Duration // that delete ended -> WaitTask's result (exit.json, socket, handle)
	// destroy lists the runsc commands DestroyTask ran; destroyRunsc is
	// their total time.
	destroy      []string
	destroyRunsc time.Duration
}

// BenchmarkStartTask_Phases is BenchmarkStartTask_True with runsc_path
// pointing at a bash wrapper that timestamps every runsc command, to show
// where the driver's time goes (metrics in ms, medians). The wrapper adds a
// bash start to each runsc command, so use BenchmarkStartTask_True for the
// ratio. It also times, outside the driver, two parts of "prep": executing
// the supervisor binary up to its first failure (exec and Go init), and
// runtime.WriteBundle.
func BenchmarkStartTask_Phases(b *testing.B) {
	e := newBenchEnv(b, true)
	e.runTrue(b)
	var ph []benchPhases
	lost := 0
	for b.Loop() {
		r := e.runTrue(b)
		if !r.phases.ok {
			raw, _ := os.ReadFile(e.wrapLog)
			b.Fatalf("could not split the cycle from the wrapper's log %s:\n%s", e.wrapLog, raw)
		}
		if r.lostExit {
			lost++
		}
		ph = append(ph, r.phases)
	}
	b.StopTimer()
	steps := []struct {
		name string
		f    func(benchPhases) time.Duration
	}{
		{"prep", func(p benchPhases) time.Duration { return p.prep }},
		{"prep-plugin", func(p benchPhases) time.Duration { return p.plugin }},
		{"prep-supervisor", func(p benchPhases) time.Duration { return p.supInit }},
		{"prep-exec-create", func(p benchPhases) time.Duration { return p.execCrt }},
		{"create", func(p benchPhases) time.Duration { return p.create }},
		{"gap", func(p benchPhases) time.Duration { return p.gap }},
		{"start", func(p benchPhases) time.Duration { return p.start }},
		{"ready", func(p benchPhases) time.Duration { return p.ready }},
		{"run", func(p benchPhases) time.Duration { return p.run }},
		{"to-delete", func(p benchPhases) time.Duration { return p.toDelete }},
		{"delete", func(p benchPhases) time.Duration { return p.delete }},
		{"result", func(p benchPhases) time.Duration { return p.result }},
		{"destroy-runsc", func(p benchPhases) time.Duration { return p.destroyRunsc }},
	}
	detached := 0
	for _, p := range ph {
		if p.detached {
			detached++
		}
	}
	if detached == len(ph) {
		// One `runsc run --detach`: report it under its own name, with
		// no separate start.
		var kept []struct {
			name string
			f    func(benchPhases) time.Duration
		}
		for _, s := range steps {
			switch s.name {
			case "create":
				s.name = "run-detach"
			case "gap", "start":
				continue
			case "prep-exec-create":
				s.name = "prep-exec-run"
			}
			kept = append(kept, s)
		}
		steps = kept
	}
	var parts []string
	for _, s := range steps {
		ds := make([]time.Duration, 0, len(ph))
		for _, p := range ph {
			if s.name == "result" && p.lost {
				continue
			}
			ds = append(ds, s.f(p))
		}
		if len(ds) == 0 {
			continue
		}
		v := testutil.Median(ds).Seconds() * 1000
		b.ReportMetric(v, s.name+"-ms")
		parts = append(parts, fmt.Sprintf("%s %.1f", s.name, v))
	}

	supExec := e.timeSupervisorExec(b, e.exe)
	pluginExec := time.Duration(0)
	if plugin := benchPluginBinary(b); plugin != "" {
		pluginExec = e.timeSupervisorExec(b, plugin)
		b.ReportMetric(pluginExec.Seconds()*1000, "plugin-binary-supervisor-exec-ms")
	}
	bundleDir := filepath.Join(e.dir, "bundle-timing")
	if err := os.MkdirAll(bundleDir, 0o700); err != nil {
		b.Fatal(err)
	}
	var bw []time.Duration
	for i := 0; i < 5; i++ {
		t0 := time.Now()
		if err := runtime.WriteBundle(bundleDir, e.bareConfig); err != nil {
			b.Fatal(err)
		}
		bw = append(bw, time.Since(t0))
	}
	// The fixed cost of one runsc command: exec of the static binary and
	// its init, with no sandbox work (`list` of an empty root).
	var rx []time.Duration
	for i := 0; i < 5; i++ {
		t0 := time.Now()
		if _, err := e.bare.List(context.Background()); err != nil {
			b.Fatal(err)
		}
		rx = append(rx, time.Since(t0))
	}
	runscExec := testutil.Median(rx)
	b.ReportMetric(runscExec.Seconds()*1000, "runsc-exec-ms")
	b.ReportMetric(supExec.Seconds()*1000, "supervisor-exec-ms")
	b.ReportMetric(testutil.Median(bw).Seconds()*1000, "write-bundle-ms")

	seen := map[string]int{}
	for _, p := range ph {
		seen[strings.Join(p.destroy, "+")]++
	}
	var dc []string
	for c, n := range seen {
		dc = append(dc, fmt.Sprintf("[%s] x%d", c, n))
	}
	sort.Strings(dc)
	pluginNote := "bin/plugins/sandbox not built"
	if pluginExec > 0 {
		pluginNote = fmt.Sprintf("%.1f with bin/plugins/sandbox", pluginExec.Seconds()*1000)
	}
	startedBy := "runsc create + start"
	switch {
	case detached == len(ph):
		startedBy = "runsc run --detach"
	case detached > 0:
		startedBy = fmt.Sprintf("runsc run --detach in %d cycles (create = run there), create + start in the others", detached)
	}
	line := fmt.Sprintf("driver phases, median ms of %d (runsc and supervisor behind timestamping bash wrappers; sandbox started by %s): %s | outside the driver: supervisor exec+init %.1f (test binary; %s), WriteBundle %.1f, one runsc command's fixed cost (runsc list) %.1f | DestroyTask ran runsc: %s",
		len(ph), startedBy, strings.Join(parts, ", "), supExec.Seconds()*1000, pluginNote, testutil.Median(bw).Seconds()*1000, runscExec.Seconds()*1000, strings.Join(dc, ", "))
	if lost > 0 {
		line += fmt.Sprintf(" | WARNING: %d cycles lost their exit status (left out of \"result\")", lost)
	}
	benchSummary(b, line)
}

// timeSupervisorExec times starting the supervisor binary the way
// Supervisor.Start does (ready pipe on fd 3, own session) on a state
// directory without a spec: exec, Go runtime and package init, the failed
// read, the error on the pipe, exit.
func (e *benchEnv) timeSupervisorExec(b *testing.B, exe string) time.Duration {
	b.Helper()
	var ds []time.Duration
	for i := 0; i < 5; i++ {
		rd, wr, err := os.Pipe()
		if err != nil {
			b.Fatal(err)
		}
		cmd := exec.Command(exe, runtime.SupervisorArg, filepath.Join(e.dir, "no-such-state-dir"))
		cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
		cmd.ExtraFiles = []*os.File{wr}
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		t0 := time.Now()
		err = cmd.Start()
		wr.Close()
		if err != nil {
			rd.Close()
			b.Fatal(err)
		}
		line, _ := bufio.NewReader(rd).ReadString('\n')
		ds = append(ds, time.Since(t0))
		rd.Close()
		_ = cmd.Wait()
		if !strings.HasPrefix(line, "error: ") {
			b.Fatalf("supervisor without a spec said %q", line)
		}
	}
	return testutil.Median(ds)
}

// benchWrapper logs "B|E <epoch seconds> <pid> <verb> [status]" around each
// runsc command to the file %[1]q, and otherwise is runsc (%[2]q).
const benchWrapper = `#!/bin/bash
verb=
for a in "$@"; do
	case "$a" in create|start|run|delete|state|list|kill|events|exec|wait|--version) verb=$a; break;; esac
done
echo "B $EPOCHREALTIME $$ $verb" >> %[1]q
%[2]q "$@"
rc=$?
echo "E $EPOCHREALTIME $$ $verb $rc" >> %[1]q
exit $rc
`

// benchSupervisorWrapper logs "S <epoch seconds> <pid>" to the file %[1]q
// and becomes the supervisor (%[2]q), keeping its pid and arguments.
const benchSupervisorWrapper = `#!/bin/bash
echo "S $EPOCHREALTIME $$" >> %[1]q
exec %[2]q "$@"
`

type benchCall struct {
	verb       string
	begin, end time.Time
}

func readBenchCalls(path string) []benchCall {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	open := map[string]*benchCall{}
	var out []benchCall
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 {
			continue
		}
		sec, frac, _ := strings.Cut(f[1], ".")
		s, err1 := strconv.ParseInt(sec, 10, 64)
		us, err2 := strconv.ParseInt((frac + "000000")[:6], 10, 64)
		if err1 != nil || err2 != nil {
			continue
		}
		ts := time.Unix(s, us*1000)
		verb := ""
		if len(f) > 3 {
			verb = f[3]
		}
		switch f[0] {
		case "S":
			out = append(out, benchCall{verb: "supervisor", begin: ts, end: ts})
		case "B":
			open[f[2]] = &benchCall{verb: verb, begin: ts}
		case "E":
			if c := open[f[2]]; c != nil {
				c.end = ts
				out = append(out, *c)
				delete(open, f[2])
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].begin.Before(out[j].begin) })
	return out
}

func wrapperPhases(path string, t0 time.Time, r benchRun, st *runtime.ExitStatus) benchPhases {
	var p benchPhases
	startRet, exitRet := t0.Add(r.start), t0.Add(r.exit)
	var sup, create, start, run, del *benchCall
	calls := readBenchCalls(path)
	for i := range calls {
		c := &calls[i]
		switch {
		case c.verb == "supervisor":
			sup = c
		case !c.begin.Before(r.destroyAt):
			p.destroy = append(p.destroy, c.verb)
			p.destroyRunsc += c.end.Sub(c.begin)
		case c.verb == "create" && create == nil:
			create = c
		case c.verb == "start" && start == nil:
			start = c
		case c.verb == "run" && run == nil:
			run = c
		case c.verb == "delete" && del == nil:
			del = c
		}
	}
	if create == nil && start == nil && run != nil {
		// `runsc run --detach`: one command creates and starts.
		p.detached = true
		create, start = run, &benchCall{verb: "start", begin: run.end, end: run.end}
	}
	if sup == nil || create == nil || start == nil || del == nil {
		return p
	}
	p.prep = create.begin.Sub(t0)
	p.plugin = sup.begin.Sub(t0)
	p.supInit = st.StartedAt.Sub(sup.begin)
	p.execCrt = create.begin.Sub(st.StartedAt)
	p.create = create.end.Sub(create.begin)
	p.gap = start.begin.Sub(create.end)
	p.start = start.end.Sub(start.begin)
	p.ready = startRet.Sub(start.end)
	p.run = st.CompletedAt.Sub(startRet)
	p.toDelete = del.begin.Sub(st.CompletedAt)
	p.delete = del.end.Sub(del.begin)
	p.result = exitRet.Sub(del.end)
	p.lost = r.lostExit
	p.ok = true
	return p
}
