//go:build e2e

package e2e

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"
)

// eventWith returns the first of the task's events of type typ (any type if
// empty) whose text holds every one of words, or nil.
func eventWith(ts *taskState, typ string, words ...string) *taskEvent {
	if ts == nil {
		return nil
	}
	for _, e := range ts.Events {
		if typ != "" && e.Type != typ {
			continue
		}
		ok := true
		for _, w := range words {
			ok = ok && strings.Contains(e.text(), w)
		}
		if ok {
			return e
		}
	}
	return nil
}

// waitEnd waits until the allocation has finished and its task has an
// event of type typ holding words: the driver reports how a task ended
// (time limit, OOM) in an event that may reach Nomad after the task's end.
func (j *runningJob) waitEnd(t *testing.T, typ string, words ...string) (*allocation, *taskState) {
	t.Helper()
	a := j.waitAlloc(t, 90*time.Second, fmt.Sprintf("allocation finished with a %q event holding %q", typ, words), func(a *allocation) error {
		if !allocDone(a) {
			return fmt.Errorf("client status %s", a.ClientStatus)
		}
		if eventWith(a.TaskStates[j.spec.Task], typ, words...) == nil {
			return fmt.Errorf("no %q event holding %q", typ, words)
		}
		return nil
	})
	ts := a.TaskStates[j.spec.Task]
	must.NotNil(t, ts, must.Sprintf("no state for task %s", j.spec.Task))
	return a, ts
}

// runningFor is how long the task ran as Nomad's events tell it: from its
// Started event to its Terminated event.
func runningFor(t *testing.T, ts *taskState) time.Duration {
	t.Helper()
	started, term := ts.events("Started"), ts.events("Terminated")
	must.Len(t, 1, started, must.Sprintf("task: %s", ts))
	must.Len(t, 1, term, must.Sprintf("task: %s", ts))
	return time.Duration(term[0].Time - started[0].Time)
}

// A task that uses more memory than its resources.memory is killed by the
// host's OOM killer at that limit: Nomad records OOMKilled on the Terminated
// event, the allocation fails, and the driver says why in an event.
func TestMemoryLimitOOMKill(t *testing.T) {
	defer catchPanic(t)
	// /tmp is a tmpfs inside the sandbox: its pages are the sandbox's
	// memory, charged to the task's host cgroup.
	spec := shellJob(t, "batch", "echo filling; dd if=/dev/zero of=/tmp/fill bs=1M count=512 2>&1; echo survived")
	spec.MemoryMB = 64
	j := runJob(t, spec)

	a, ts := j.waitEnd(t, "Driver", "OOM killed")
	t.Logf("task: %s", ts)
	must.Eq(t, "failed", a.ClientStatus, must.Sprintf("task: %s", ts))
	must.True(t, ts.Failed, must.Sprintf("task: %s", ts))
	term := ts.events("Terminated")
	must.Len(t, 1, term, must.Sprintf("task: %s", ts))
	must.Eq(t, "true", term[0].Details["oom_killed"], must.Sprintf("the Terminated event does not say OOMKilled; details %v", term[0].Details))
	must.NotEq(t, 0, term[0].ExitCode, must.Sprintf("task: %s", ts))
	oom := eventWith(ts, "Driver", "OOM killed")
	must.StrContains(t, oom.DisplayMessage, "64 MiB", must.Sprint("the OOM event does not name the limit"))
	must.NotNil(t, eventWith(ts, "Driver", "Limits applied", "memory 64 MiB"), must.Sprintf("task: %s", ts))

	out := j.waitLogs(t, false, "filling")
	must.StrNotContains(t, out, "survived", must.Sprint("the task wrote 512 MiB into memory limited to 64 MiB and went on"))
}

// A fork bomb in a task with pids_limit = 64 cannot run more than 64
// processes and leaves the node and a sibling task alone: the sibling
// answers `nomad alloc exec` and the agent's API answers while the bomb
// presses against the limit.
func TestForkBombContained(t *testing.T) {
	defer catchPanic(t)
	sibling := runJob(t, shellJob(t, "service", "echo ready; while :; do sleep 1; done"))
	sibling.waitRunning(t)
	sibling.waitLogs(t, false, "ready")

	// First the limit, counted: a subshell starts sleepers until a fork
	// fails, writing how many it has after each.
	//
	// Then the bomb: every process forks two more and waits for them,
	// again and again, so that it keeps the process table full until the
	// test creates /alloc/data/stop (or 60 s pass, if the test never
	// does; the task's timeout is a further bound). A bomb of bounded
	// depth run once ends within half a second here, too soon to check
	// anything while it runs. A shell that cannot fork exits, so the
	// main shell forks only while the table has room: after the
	// sleepers are gone, and once for the subshell that starts the bomb,
	// which forks only twice, at once, and then only counts the
	// processes (with builtins) each second until the bomb ends. The
	// main shell waits for that subshell, reaping the bomb's orphans.
	// ${...} is not used: Nomad interpolates it in task configs.
	script := `
echo "NPROC=$(ulimit -u)"
mkfifo /tmp/tick
exec 3<>/tmp/tick
( i=0; while [ $i -lt 200 ]; do sleep 2 & i=$((i+1)); echo $i > /tmp/forked; done ) 2>/dev/null
read n < /tmp/forked
echo "FORKED=$n"
sleep 3
IFS=. read now rest < /proc/uptime
end=$((now + 60))
going() { IFS=. read now rest < /proc/uptime && [ $now -lt $end ] && [ ! -e /alloc/data/stop ]; }
b() { while going; do b & b & wait; done; }
(
  b & b &
  echo bomb-started
  while going; do
    n=0; for p in /proc/[0-9]*; do n=$((n+1)); done
    echo "PROCS=$n"
    read -t 1 x <&3
  done
) 2>/dev/null
echo bomb-ended
`
	spec := shellJob(t, "batch", script)
	spec.ExtraConfig = []string{"pids_limit = 64", `timeout = "2m"`}
	bomb := runJob(t, spec)
	out := bomb.waitLogs(t, false, "FORKED=")
	must.Eq(t, "64", lineValue(t, out, "NPROC="), must.Sprint("the task's RLIMIT_NPROC is not its pids_limit"))
	forked, err := strconv.Atoi(lineValue(t, out, "FORKED="))
	must.NoError(t, err)
	t.Logf("the task started %d sleepers before a fork failed", forked)
	must.Between(t, 1, forked, 63, must.Sprint("the task started more processes than its pids_limit of 64 allows"))
	bomb.waitLogs(t, false, "bomb-started")
	procs := func(out string) []int {
		var n []int
		for _, m := range regexp.MustCompile(`(?m)^PROCS=(\d+)$`).FindAllStringSubmatch(out, -1) {
			v, _ := strconv.Atoi(m[1])
			n = append(n, v)
		}
		return n
	}
	// The bomb has filled the table.
	must.Wait(t, wait.InitialSuccess(
		wait.BoolFunc(func() bool {
			out = bomb.logs(t, false)
			for _, n := range procs(out) {
				if n >= 48 {
					return true
				}
			}
			return false
		}),
		wait.Timeout(30*time.Second),
		wait.Gap(250*time.Millisecond),
	), must.Func(func() string { return "the bomb never ran 48 processes at once; its output:\n" + out }))

	// While it runs: the sibling answers exec and can start processes,
	// the API answers.
	for i := 0; i < 5; i++ {
		start := time.Now()
		res := nomadCLI(t, 30*time.Second, "", "alloc", "exec", "-i=false", "-t=false", sibling.allocID,
			"/bin/sh", "-c", "for i in 1 2 3 4 5 6 7 8; do sleep 0 & done; wait; echo alive")
		must.Eq(t, 0, res.Code, must.Sprintf("exec in the sibling during the bomb: %s", res))
		must.Eq(t, "alive", strings.TrimSpace(res.Stdout), must.Sprintf("exec in the sibling during the bomb: %s", res))
		var self map[string]any
		must.NoError(t, apiGet("/v1/agent/self", &self), must.Sprint("the agent's API does not answer during the bomb"))
		t.Logf("exec in the sibling and the agent's API answered in %s", time.Since(start).Round(time.Millisecond))
	}
	a, err := getAlloc(bomb.allocID)
	must.NoError(t, err)
	must.Eq(t, "running", a.ClientStatus, must.Sprintf("the bomb ended before the checks did: %s", bomb.taskStateOf(a)))
	must.StrNotContains(t, bomb.logs(t, false), "bomb-ended", must.Sprint("the bomb ended before the checks did"))

	must.NoError(t, os.WriteFile(filepath.Join(bomb.allocDir(), "alloc", "data", "stop"), nil, 0o644))
	a, ts := bomb.waitDone(t)
	out = bomb.waitLogs(t, false, "bomb-ended")
	t.Logf("the bomb's output:\n%s", out)
	must.Eq(t, "complete", a.ClientStatus, must.Sprintf("task: %s", ts))
	for _, n := range procs(out) {
		must.LessEq(t, 64, n, must.Sprint("the bomb ran more processes than its pids_limit of 64 allows"))
	}

	// The sibling still runs, in its first sandbox.
	a, err = getAlloc(sibling.allocID)
	must.NoError(t, err)
	sts := sibling.taskStateOf(a)
	must.Eq(t, "running", a.ClientStatus, must.Sprintf("sibling: %s", sts))
	must.Eq(t, uint64(0), sts.Restarts, must.Sprintf("sibling: %s", sts))
}

// A task's timeout ends it: SIGTERM when the time is up, SIGKILL 5 s later.
// The allocation fails even if the task exits 0 on SIGTERM, and an event
// says why. A timeout above the plugin's max_timeout is refused before
// anything starts.
func TestTimeout(t *testing.T) {
	defer catchPanic(t)
	cases := []struct {
		name   string
		script string
		exit0  bool // the task exits 0 on SIGTERM
		min    time.Duration
		max    time.Duration
	}{
		{
			name:   "sleep",
			script: "echo sleeping; sleep 60",
			min:    2500 * time.Millisecond,
			max:    12 * time.Second,
		},
		{
			name:   "exits 0 on SIGTERM",
			script: "trap 'echo got-sigterm; exit 0' TERM; echo ready; while :; do sleep 0.2; done",
			exit0:  true,
			min:    2500 * time.Millisecond,
			max:    7 * time.Second,
		},
		{
			name:   "ignores SIGTERM",
			script: "trap '' TERM; echo ready; while :; do sleep 0.2; done",
			min:    7500 * time.Millisecond,
			max:    15 * time.Second,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			defer catchPanic(t)
			t.Parallel()
			spec := shellJob(t, "batch", tc.script)
			spec.ExtraConfig = []string{`timeout = "3s"`}
			j := runJob(t, spec)
			a, ts := j.waitEnd(t, "Driver", "Time limit exceeded")
			ran := runningFor(t, ts)
			t.Logf("ran for %s; task: %s", ran.Round(time.Millisecond), ts)
			must.Eq(t, "failed", a.ClientStatus, must.Sprintf("task: %s", ts))
			must.True(t, ts.Failed, must.Sprintf("task: %s", ts))
			term := ts.events("Terminated")[0]
			must.StrContains(t, term.Message, "time limit of 3s exceeded", must.Sprintf("task: %s", ts))
			must.Between(t, tc.min, ran, tc.max, must.Sprintf("the task ran for %s", ran))
			must.NotNil(t, eventWith(ts, "Driver", "Limits applied", "timeout 3s"), must.Sprintf("task: %s", ts))
			if tc.exit0 {
				must.Eq(t, 0, term.ExitCode, must.Sprintf("task: %s", ts))
				j.waitLogs(t, false, "got-sigterm")
			}
		})
	}

	t.Run("above max_timeout", func(t *testing.T) {
		defer catchPanic(t)
		t.Parallel()
		spec := shellJob(t, "batch", "echo should not run")
		spec.ExtraConfig = []string{`timeout = "1h"`}
		j := runJob(t, spec)
		a, ts := j.waitDone(t)
		t.Logf("task: %s", ts)
		must.Eq(t, "failed", a.ClientStatus, must.Sprintf("task: %s", ts))
		must.Len(t, 0, ts.events("Started"), must.Sprintf("task: %s", ts))
		must.NotNil(t, eventWith(ts, "Driver Failure", "max_timeout", "1h0m0s", "10m0s"),
			must.Sprintf("no Driver Failure event names max_timeout and both durations; task: %s", ts))
		must.Nil(t, eventWith(ts, "", "Sandbox started"), must.Sprintf("task: %s", ts))
		must.SliceEmpty(t, suite.leftovers(j.sandboxPrefix()))
		must.Eq(t, "", j.logs(t, false))
	})
}

// allocStats is the part of /v1/client/allocation/<id>/stats the tests read.
type allocStats struct {
	ResourceUsage *resourceUsage
	Tasks         map[string]*struct {
		ResourceUsage *resourceUsage
		Timestamp     int64
	}
}

type resourceUsage struct {
	MemoryStats *struct {
		RSS, Usage, MaxUsage uint64
		Measured             []string
	}
	CpuStats *struct {
		Percent, UserMode, SystemMode, TotalTicks float64
		Measured                                  []string
	}
}

// A busy task's CPU and memory use, read from its host cgroup, reach Nomad:
// in `nomad alloc status -stats` and in the client's allocation stats API.
func TestStats(t *testing.T) {
	defer catchPanic(t)
	j := runJob(t, shellJob(t, "service", "echo ready; while :; do :; done"))
	j.waitRunning(t)
	j.waitLogs(t, false, "ready")

	var st allocStats
	var last string
	must.Wait(t, wait.InitialSuccess(
		wait.ErrorFunc(func() error {
			st = allocStats{}
			if err := apiGet("/v1/client/allocation/"+url.PathEscape(j.allocID)+"/stats", &st); err != nil {
				return err
			}
			task := st.Tasks[j.spec.Task]
			if task == nil || task.ResourceUsage == nil || task.ResourceUsage.CpuStats == nil || task.ResourceUsage.MemoryStats == nil {
				return fmt.Errorf("no stats for task %s yet", j.spec.Task)
			}
			cpu, mem := task.ResourceUsage.CpuStats, task.ResourceUsage.MemoryStats
			last = fmt.Sprintf("cpu %+v; memory %+v", *cpu, *mem)
			if cpu.TotalTicks <= 0 {
				return errors.New("TotalTicks is 0")
			}
			if mem.Usage == 0 && mem.RSS == 0 {
				return errors.New("memory Usage and RSS are 0")
			}
			return nil
		}),
		wait.Timeout(60*time.Second),
		wait.Gap(500*time.Millisecond),
	), must.Func(func() string { return "no stats sample with CPU ticks and memory; last: " + last }))
	t.Logf("task stats: %s", last)
	cpu := st.Tasks[j.spec.Task].ResourceUsage.CpuStats
	// A busy loop keeps a core busy: far more than a few percent.
	must.Greater(t, 20, cpu.Percent, must.Sprintf("a busy task used %.1f%% CPU", cpu.Percent))
	must.Greater(t, 0, st.ResourceUsage.CpuStats.TotalTicks, must.Sprint("the allocation's total has no CPU ticks"))

	// The CLI shows the same: "<used>/<reserved> MHz" and memory in use.
	var res cliResult
	cpuMem := regexp.MustCompile(`(\d+)/100 MHz\s+(\d+(?:\.\d+)?) ([KMG]i)?B/128 MiB`)
	must.Wait(t, wait.InitialSuccess(
		wait.ErrorFunc(func() error {
			res = nomadCLI(t, 30*time.Second, "", "alloc", "status", "-stats", j.allocID)
			if res.Code != 0 {
				return errors.New("nomad alloc status failed")
			}
			m := cpuMem.FindStringSubmatch(res.Stdout)
			if m == nil {
				return errors.New("no CPU and memory usage line")
			}
			if m[1] == "0" {
				return errors.New("CPU usage is 0 MHz")
			}
			if v, _ := strconv.ParseFloat(m[2], 64); v == 0 {
				return errors.New("memory usage is 0")
			}
			return nil
		}),
		wait.Timeout(60*time.Second),
		wait.Gap(time.Second),
	), must.Func(func() string { return fmt.Sprintf("nomad alloc status -stats does not show the task's use: %s", res) }))
	t.Logf("nomad alloc status -stats:\n%s", res.Stdout)
	for _, table := range []string{"Memory Stats", "CPU Stats"} {
		head, vals := statsTable(t, res.Stdout, table)
		if len(head) != len(vals) {
			msg := fmt.Sprintf("nomad alloc status -stats: the %s table has %d columns %q but %d values %q: the CLI prints a value only for the Measured names it knows",
				table, len(head), head, len(vals), vals)
			if strictStatsTables {
				t.Error(msg)
			} else {
				t.Logf("KNOWN DRIVER BUG (not failing the test): %s", msg)
			}
		}
	}
}

// strictStatsTables makes TestStats fail when a stats table of the CLI has
// more columns than values. The driver lists "Total Ticks" among the
// measured CPU stats, which the 1.6 CLI has no column value for, so its
// CPU Stats table is shifted (User Mode's value shows under "Total Ticks").
// Set it to true once the driver no longer does.
const strictStatsTables = true

// statsTable returns the header and value cells of the table titled title
// in `nomad alloc status -stats` output (columns are two or more spaces
// apart).
func statsTable(t *testing.T, out, title string) (head, vals []string) {
	t.Helper()
	lines := strings.Split(out, "\n")
	for i, l := range lines {
		if strings.TrimSpace(l) == title && i+2 < len(lines) {
			split := regexp.MustCompile(`\s{2,}`)
			return split.Split(strings.TrimSpace(lines[i+1]), -1), split.Split(strings.TrimSpace(lines[i+2]), -1)
		}
	}
	t.Fatalf("no %q table in:\n%s", title, out)
	return nil, nil
}

// With max_sandboxes = 2, two tasks run and a third fails at once with an
// event naming the limit; once one of the two has ended, a task starts
// again. The agent runs with that limit for this test only.
func TestMaxSandboxes(t *testing.T) {
	defer catchPanic(t)
	suite.withPluginConfig(t, `max_timeout = "10m"`, `max_sandboxes = 2`)

	var running []*runningJob
	for i := 0; i < 2; i++ {
		j := runJob(t, shellJob(t, "service", "echo ready; while :; do sleep 1; done"))
		running = append(running, j)
	}
	for _, j := range running {
		j.waitRunning(t)
	}

	third := runJob(t, shellJob(t, "service", "echo should not run; sleep 600"))
	a := third.waitAlloc(t, 20*time.Second, "the third task refused", func(a *allocation) error {
		if !allocDone(a) {
			return fmt.Errorf("client status %s", a.ClientStatus)
		}
		return nil
	})
	ts := third.taskStateOf(a)
	t.Logf("third task: %s", ts)
	must.Eq(t, "failed", a.ClientStatus, must.Sprintf("task: %s", ts))
	must.Len(t, 0, ts.events("Started"), must.Sprintf("task: %s", ts))
	fail := eventWith(ts, "Driver Failure", "max_sandboxes = 2")
	must.NotNil(t, fail, must.Sprintf("no Driver Failure event names max_sandboxes = 2; task: %s", ts))
	recv := ts.events("Received")
	must.Len(t, 1, recv, must.Sprintf("task: %s", ts))
	took := time.Duration(fail.Time - recv[0].Time)
	t.Logf("refused %s after the client received the task", took.Round(time.Millisecond))
	must.Less(t, 10*time.Second, took, must.Sprint("the third task was not refused at once"))
	must.SliceEmpty(t, suite.leftovers(third.sandboxPrefix()))

	// The two go on.
	for _, j := range running {
		a, err := getAlloc(j.allocID)
		must.NoError(t, err)
		must.Eq(t, "running", a.ClientStatus, must.Sprintf("task: %s", j.taskStateOf(a)))
	}

	// A slot frees when a task ends.
	res := nomadCLI(t, 2*time.Minute, "", "job", "stop", "-detach", running[0].spec.Name)
	must.Eq(t, 0, res.Code, must.Sprintf("nomad job stop: %s", res))
	running[0].waitDone(t)
	next := runJob(t, shellJob(t, "batch", "echo fits-again"))
	a, ts = next.waitDone(t)
	must.Eq(t, "complete", a.ClientStatus, must.Sprintf("a task did not start after a slot freed: %s", ts))
	next.waitLogs(t, false, "fits-again")
}

// The driver tells, as task events, which runsc and platform run the task
// and which limits apply; the memory limit is the task's host cgroup's.
func TestLimitEvents(t *testing.T) {
	defer catchPanic(t)
	version := runscVersion(t)

	t.Run("set by the task", func(t *testing.T) {
		defer catchPanic(t)
		spec := shellJob(t, "service", "echo ready; while :; do sleep 1; done")
		spec.MemoryMB = 96
		spec.ExtraConfig = []string{"pids_limit = 100", `timeout = "2m"`}
		j := runJob(t, spec)
		j.waitRunning(t)
		ts := j.waitEvents(t, "Limits applied")
		started := eventWith(ts, "Driver", "Sandbox started")
		must.NotNil(t, started, must.Sprintf("task: %s", ts))
		must.Eq(t, "Sandbox started: runsc "+version+", platform systrap", started.DisplayMessage)
		limits := eventWith(ts, "Driver", "Limits applied")
		t.Logf("%s", limits.DisplayMessage)
		must.RegexMatch(t, regexp.MustCompile(`^Limits applied: memory 96 MiB, cpu shares 100, .*pids 100, disk 1GiB, \d+ inodes, timeout 2m(0s)?$`), limits.DisplayMessage)

		// The limit is the sandbox's host memory cgroup's.
		must.Eq(t, strconv.Itoa(96<<20), memoryLimitOf(t, j))
	})

	t.Run("defaults", func(t *testing.T) {
		defer catchPanic(t)
		j := runJob(t, shellJob(t, "batch", "echo done"))
		a, ts := j.waitEnd(t, "Driver", "Limits applied")
		must.Eq(t, "complete", a.ClientStatus, must.Sprintf("task: %s", ts))
		limits := eventWith(ts, "Driver", "Limits applied")
		t.Logf("%s", limits.DisplayMessage)
		// default_pids_limit is 1024, default_disk_limit 1GiB; with no
		// default_timeout, the suite's max_timeout applies.
		must.RegexMatch(t, regexp.MustCompile(`^Limits applied: memory 128 MiB, .*pids 1024, disk 1GiB, \d+ inodes, timeout 10m(0s)?$`), limits.DisplayMessage)
	})
}

// waitEvents waits until the task has an event holding words and returns
// its state.
func (j *runningJob) waitEvents(t *testing.T, words ...string) *taskState {
	t.Helper()
	a := j.waitAlloc(t, 30*time.Second, fmt.Sprintf("an event holding %q", words), func(a *allocation) error {
		if eventWith(a.TaskStates[j.spec.Task], "", words...) == nil {
			return fmt.Errorf("no event holding %q", words)
		}
		return nil
	})
	return a.TaskStates[j.spec.Task]
}

// runscVersion is the version bin/runsc reports.
func runscVersion(t *testing.T) string {
	t.Helper()
	res := runCmd(t, 30*time.Second, "", suite.runscBin, "--version")
	must.Eq(t, 0, res.Code, must.Sprint(res))
	line, _, _ := strings.Cut(res.Stdout, "\n")
	v := strings.TrimSpace(strings.TrimPrefix(line, "runsc version"))
	must.NotEq(t, "", v, must.Sprint(res))
	return v
}

// memoryLimitOf reads the memory limit of the job's sandbox's host cgroup
// (v1 or v2).
func memoryLimitOf(t *testing.T, j *runningJob) string {
	t.Helper()
	for _, f := range []string{"memory/nomad-sandbox/%s*/memory.limit_in_bytes", "nomad-sandbox/%s*/memory.max"} {
		m, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", fmt.Sprintf(f, j.sandboxPrefix())))
		if len(m) > 1 {
			t.Fatalf("more than one memory cgroup for the job's sandbox: %v", m)
		}
		if len(m) == 1 {
			b, err := os.ReadFile(m[0])
			must.NoError(t, err)
			return strings.TrimSpace(string(b))
		}
	}
	t.Fatalf("no memory cgroup for sandbox %s* under /sys/fs/cgroup", j.sandboxPrefix())
	return ""
}
