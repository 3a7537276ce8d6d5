package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/nomad/api"
	"github.com/shoenig/test/must"
)

func env(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestParseArgs(t *testing.T) {
	o, err := parseArgs([]string{"-job", "ci", "-meta", "git_ref=abc", "-meta", "repo_url=https://x/y.git?a=b", "-payload", "-", "-timeout", "90s"},
		env(map[string]string{"NOMAD_ADDR": "http://127.0.0.1:9999", "NOMAD_TOKEN": "secret", "NOMAD_NAMESPACE": "ci"}))
	must.NoError(t, err)
	must.Eq(t, "ci", o.job)
	must.Eq(t, map[string]string{"git_ref": "abc", "repo_url": "https://x/y.git?a=b"}, o.meta)
	must.Eq(t, "-", o.payload)
	must.Eq(t, 90*time.Second, o.timeout)
	must.Eq(t, "http://127.0.0.1:9999", o.address)
	must.Eq(t, "secret", o.token)
	must.Eq(t, "ci", o.namespace)

	// Flags win over the environment; the defaults apply without either.
	o, err = parseArgs([]string{"-job", "ci", "-address", "http://10.0.0.1:4646", "-token", "t2"}, env(map[string]string{"NOMAD_ADDR": "http://x:1", "NOMAD_TOKEN": "t1"}))
	must.NoError(t, err)
	must.Eq(t, "http://10.0.0.1:4646", o.address)
	must.Eq(t, "t2", o.token)
	o, err = parseArgs([]string{"-job", "ci"}, env(nil))
	must.NoError(t, err)
	must.Eq(t, "http://127.0.0.1:4646", o.address)
	must.Eq(t, time.Hour, o.timeout)
	must.Eq(t, "", o.payload)

	for _, bad := range [][]string{
		{},
		{"-meta", "a=b"},
		{"-job", "ci", "-meta", "novalue"},
		{"-job", "ci", "-meta", "=v"},
		{"-job", "ci", "-meta", "a=1", "-meta", "a=2"},
		{"-job", "ci", "extra"},
		{"-job", "ci", "-timeout", "-1s"},
		{"-job", "ci", "-bogus"},
	} {
		_, err := parseArgs(bad, env(nil))
		must.Error(t, err, must.Sprintf("args %q", bad))
	}
}

// Bad flags are the dispatch failing (126), never a code a task could
// have returned through the tool; -h is not an error.
func TestRunUsage(t *testing.T) {
	var out, errb bytes.Buffer
	must.Eq(t, exitDispatchFailed, run([]string{"-meta", "a=b"}, strings.NewReader(""), &out, &errb))
	must.StrContains(t, errb.String(), "-job is required")

	out.Reset()
	must.Eq(t, 0, run([]string{"-h"}, strings.NewReader(""), &out, &errb))
	for _, want := range []string{"-job", "-meta", "-payload", "-timeout", "124", "125", "126", "137"} {
		must.StrContains(t, out.String(), want)
	}

	errb.Reset()
	must.Eq(t, exitDispatchFailed, run([]string{"-job", "x", "-payload", "/nonexistent/payload"}, strings.NewReader(""), &out, &errb))
	must.StrContains(t, errb.String(), "/nonexistent/payload")
}

// An API that does not answer is a failed dispatch, at once.
func TestRunNoAgent(t *testing.T) {
	var out, errb bytes.Buffer
	code := run([]string{"-job", "ci", "-address", "http://127.0.0.1:1", "-timeout", "20s"}, strings.NewReader(""), &out, &errb)
	must.Eq(t, exitDispatchFailed, code, must.Sprint(errb.String()))
	must.StrContains(t, errb.String(), "verdict: exit 126")
}

func TestReadPayload(t *testing.T) {
	b, err := readPayload("-", strings.NewReader(`{"a":1}`))
	must.NoError(t, err)
	must.Eq(t, `{"a":1}`, string(b))
	b, err = readPayload("", strings.NewReader("ignored"))
	must.NoError(t, err)
	must.Nil(t, b)
}

func ev(typ, msg string, mod ...func(*api.TaskEvent)) *api.TaskEvent {
	e := &api.TaskEvent{Type: typ, DisplayMessage: msg, Message: msg, Details: map[string]string{}}
	for _, m := range mod {
		m(e)
	}
	return e
}

func exit(code, sig int) func(*api.TaskEvent) {
	return func(e *api.TaskEvent) { e.ExitCode, e.Signal = code, sig }
}

func allocWith(status string, ts *api.TaskState) *api.Allocation {
	return &api.Allocation{ID: "a1", ClientStatus: status, DesiredStatus: "run", TaskStates: map[string]*api.TaskState{"main": ts}}
}

func TestJudge(t *testing.T) {
	started := ev("Started", "Task started by client")
	cases := []struct {
		name   string
		status string
		ts     *api.TaskState
		code   int
		reason string
	}{
		{"success", "complete", &api.TaskState{State: "dead", Events: []*api.TaskEvent{started, ev("Terminated", "", exit(0, 0))}}, 0, "exited with code 0"},
		{"failure", "failed", &api.TaskState{State: "dead", Failed: true, Events: []*api.TaskEvent{started, ev("Terminated", "", exit(3, 0))}}, 3, "exited with code 3"},
		{"signal", "failed", &api.TaskState{State: "dead", Failed: true, Events: []*api.TaskEvent{started, ev("Terminated", "", exit(0, 15))}}, 143, "signal 15"},
		{"time limit", "failed", &api.TaskState{State: "dead", Failed: true, Events: []*api.TaskEvent{started,
			ev("Terminated", "time limit of 2s exceeded", exit(143, 0))}}, exitTimeLimit, "time limit of 2s exceeded"},
		{"time limit, driver event", "failed", &api.TaskState{State: "dead", Failed: true, Events: []*api.TaskEvent{started,
			ev("Terminated", "time limit of 2s exceeded", exit(143, 0)), ev("Driver", "Time limit exceeded: the task ran for 2s and its timeout is 2s")}},
			exitTimeLimit, "Time limit exceeded: the task ran for 2s"},
		{"time limit, task exited 0", "failed", &api.TaskState{State: "dead", Failed: true, Events: []*api.TaskEvent{started,
			ev("Terminated", "time limit of 3s exceeded", exit(0, 0))}}, exitTimeLimit, "timeout"},
		{"oom", "failed", &api.TaskState{State: "dead", Failed: true, Events: []*api.TaskEvent{started,
			ev("Terminated", "", exit(137, 0), func(e *api.TaskEvent) { e.Details["oom_killed"] = "true" }),
			ev("Driver", "OOM killed: the sandbox reached its memory limit of 64 MiB; raise resources.memory (or memory_max).")}}, exitOOMKilled, "64 MiB"},
		{"driver failure", "failed", &api.TaskState{State: "dead", Failed: true, Events: []*api.TaskEvent{ev("Received", "Task received by client"),
			ev("Driver", "Sandbox refused: rootfs \"/x\" is not under a directory in the plugin's allow_host_rootfs []"),
			ev("Driver Failure", "rpc error: code = Unknown desc = rootfs \"/x\" is not under a directory in the plugin's allow_host_rootfs []"),
			ev("Not Restarting", "Error was unrecoverable")}}, exitDidNotRun, "allow_host_rootfs"},
		{"never started, lost", "lost", &api.TaskState{State: "pending"}, exitDidNotRun, "lost"},
		{"stopped by Nomad", "complete", &api.TaskState{State: "dead", Events: []*api.TaskEvent{started,
			ev("Killing", "Sent interrupt. Waiting 5s before force killing"), ev("Terminated", "", exit(0, 0)), ev("Killed", "Task successfully killed")}}, exitDidNotRun, "Nomad stopped the task"},
		{"failed but exit 0", "failed", &api.TaskState{State: "dead", Failed: true, Events: []*api.TaskEvent{started, ev("Terminated", "", exit(0, 0))}}, exitDidNotRun, "marked the task failed"},
		// Restarts: the last attempt counts.
		{"restarted, then passed", "complete", &api.TaskState{State: "dead", Restarts: 1, Events: []*api.TaskEvent{started,
			ev("Terminated", "", exit(7, 0)), ev("Restarting", "Task restarting in 1s"), ev("Started", "Task started by client"), ev("Terminated", "", exit(0, 0))}}, 0, "code 0"},
		{"time limit in an earlier attempt", "failed", &api.TaskState{State: "dead", Failed: true, Events: []*api.TaskEvent{started,
			ev("Terminated", "time limit of 2s exceeded", exit(143, 0)), ev("Restarting", ""), ev("Started", ""), ev("Terminated", "", exit(4, 0))}}, 4, "code 4"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			v := judge(allocWith(tc.status, tc.ts), "main")
			must.Eq(t, tc.code, v.code, must.Sprint(v.reason))
			must.StrContains(t, v.reason, tc.reason)
		})
	}
	// A driver's error is said once, without gRPC's wrapping.
	v := judge(allocWith("failed", &api.TaskState{State: "dead", Failed: true, Events: []*api.TaskEvent{
		ev("Driver", "Sandbox refused: timeout 1h0m0s is above this node's ceiling of 10m0s (the plugin's max_timeout): ask for 10m0s or less"),
		ev("Driver Failure", "rpc error: code = Unknown desc = timeout 1h0m0s is above this node's ceiling of 10m0s (the plugin's max_timeout): ask for 10m0s or less"),
		ev("Not Restarting", "Error was unrecoverable")}}), "main")
	must.Eq(t, "the task never started: Driver: Sandbox refused: timeout 1h0m0s is above this node's ceiling of 10m0s (the plugin's max_timeout): ask for 10m0s or less; Not Restarting: Error was unrecoverable", v.reason)

	v = judge(&api.Allocation{ClientStatus: "failed", TaskStates: map[string]*api.TaskState{}}, "main")
	must.Eq(t, exitDidNotRun, v.code)
}

func TestMayReschedule(t *testing.T) {
	attempts := func(n int, unlimited bool) *api.Job {
		i, u, iv := n, unlimited, time.Hour
		g := "g"
		return &api.Job{TaskGroups: []*api.TaskGroup{{Name: &g, ReschedulePolicy: &api.ReschedulePolicy{Attempts: &i, Unlimited: &u, Interval: &iv}}}}
	}
	now := time.Now()
	a := &api.Allocation{TaskGroup: "g", ClientStatus: "failed", DesiredStatus: "run", Job: attempts(0, false)}
	must.False(t, mayReschedule(a, now))
	a.Job = attempts(1, false)
	must.True(t, mayReschedule(a, now))
	a.RescheduleTracker = &api.RescheduleTracker{Events: []*api.RescheduleEvent{{RescheduleTime: now.Add(-time.Minute).UnixNano()}}}
	must.False(t, mayReschedule(a, now), must.Sprint("the one attempt is used"))
	a.RescheduleTracker.Events[0].RescheduleTime = now.Add(-2 * time.Hour).UnixNano()
	must.True(t, mayReschedule(a, now), must.Sprint("the attempt is outside the interval"))
	a.Job = attempts(0, true)
	must.True(t, mayReschedule(a, now))
	a.DesiredStatus = "stop"
	must.False(t, mayReschedule(a, now), must.Sprint("a stopped job is not rescheduled"))
	a.DesiredStatus, a.ClientStatus = "run", "complete"
	must.False(t, mayReschedule(a, now))
	a.ClientStatus, a.Job = "lost", attempts(0, false)
	must.True(t, mayReschedule(a, now), must.Sprint("a lost allocation is replaced"))
}

func TestPickTask(t *testing.T) {
	s := func(v string) *string { return &v }
	n := func(v int) *int { return &v }
	job := &api.Job{ID: s("ci"), TaskGroups: []*api.TaskGroup{{Name: s("g"), Count: n(1), Tasks: []*api.Task{
		{Name: "fetch", Lifecycle: &api.TaskLifecycle{Hook: "prestart"}},
		{Name: "build"},
	}}}}
	g, task, err := pickTask(job, "")
	must.NoError(t, err)
	must.Eq(t, "g", g)
	must.Eq(t, "build", task)
	_, task, err = pickTask(job, "fetch")
	must.NoError(t, err)
	must.Eq(t, "fetch", task)
	_, _, err = pickTask(job, "nope")
	must.ErrorContains(t, err, "fetch, build")

	job.TaskGroups[0].Tasks = append(job.TaskGroups[0].Tasks, &api.Task{Name: "test"})
	_, _, err = pickTask(job, "")
	must.ErrorContains(t, err, "-task")
	_, task, err = pickTask(job, "test")
	must.NoError(t, err)
	must.Eq(t, "test", task)

	job.TaskGroups[0].Count = n(2)
	_, _, err = pickTask(job, "test")
	must.ErrorContains(t, err, "count = 2")
}

func TestDescribeMetric(t *testing.T) {
	m := &api.AllocationMetric{NodesEvaluated: 2, NodesInPool: 2, NodesFiltered: 1,
		ConstraintFiltered: map[string]int{"missing drivers": 1}, DimensionExhausted: map[string]int{"memory": 1}}
	must.Eq(t, "2 of 2 nodes in the pool evaluated; filtered by: missing drivers (1); exhausted: memory (1)", describeMetric(m))
	must.StrContains(t, describeMetric(&api.AllocationMetric{}), "no node is ready")
}
