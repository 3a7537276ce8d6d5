package main

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/nomad/api"
)

// verdict is how the followed task ended, as an exit code for the tool and
// a line for people.
type verdict struct {
	code   int
	reason string
}

// judge turns the final state of the followed task into the tool's verdict.
// It looks at the task's last attempt: the events after its last "Started".
func judge(a *api.Allocation, task string) verdict {
	ts := a.TaskStates[task]
	if ts == nil {
		if a.ClientStatus == api.AllocClientStatusLost {
			return verdict{exitDidNotRun, "the allocation was lost before the task started (its node stopped answering)"}
		}
		return verdict{exitDidNotRun, fmt.Sprintf("the task never started (allocation %s: %s)", a.ClientStatus, a.ClientDescription)}
	}
	last := lastAttempt(ts.Events)
	term := lastOfType(last, api.TaskTerminated)
	if term == nil {
		// Never ran, or never finished where Nomad could see it.
		why := "the task never started"
		if hasType(ts.Events, api.TaskStarted) {
			why = "the task did not run to its end"
		}
		if a.ClientStatus == api.AllocClientStatusLost {
			why += " (the allocation was lost: its node stopped answering)"
		}
		return verdict{exitDidNotRun, why + ": " + describeEvents(ts.Events)}
	}
	if term.Details["oom_killed"] == "true" {
		if e := driverEvent(last, "OOM killed"); e != nil {
			return verdict{exitOOMKilled, eventText(e)}
		}
		return verdict{exitOOMKilled, "OOM killed: the task reached its memory limit"}
	}
	if e := driverEvent(last, "Time limit exceeded"); e != nil {
		return verdict{exitTimeLimit, eventText(e)}
	}
	if strings.Contains(term.Message, "time limit of") {
		return verdict{exitTimeLimit, "the task's timeout ended it: " + term.Message}
	}
	if hasType(last, api.TaskKilling) {
		return verdict{exitDidNotRun, "Nomad stopped the task before it ended: " + describeEvents(last)}
	}
	code := term.ExitCode
	reason := fmt.Sprintf("the task exited with code %d", code)
	if code == 0 && term.Signal != 0 {
		code = 128 + term.Signal
		reason = fmt.Sprintf("the task was ended by signal %d", term.Signal)
	}
	if code == 0 && ts.Failed {
		return verdict{exitDidNotRun, "Nomad marked the task failed although it exited 0: " + describeEvents(last)}
	}
	if code > 255 || code < 0 {
		code = exitDidNotRun
	}
	return verdict{code, reason}
}

// lastAttempt is the events of the task's last attempt: from its last
// "Started" event on (all of them if it never started).
func lastAttempt(events []*api.TaskEvent) []*api.TaskEvent {
	for i := len(events) - 1; i >= 0; i-- {
		if events[i].Type == api.TaskStarted {
			return events[i:]
		}
	}
	return events
}

func lastOfType(events []*api.TaskEvent, typ string) *api.TaskEvent {
	for i := len(events) - 1; i >= 0; i-- {
		if events[i].Type == typ {
			return events[i]
		}
	}
	return nil
}

func hasType(events []*api.TaskEvent, typ string) bool {
	return lastOfType(events, typ) != nil
}

// driverEvent is the first event of the driver whose text starts with
// prefix, or nil.
func driverEvent(events []*api.TaskEvent, prefix string) *api.TaskEvent {
	for _, e := range events {
		if e.Type == "Driver" && strings.HasPrefix(eventText(e), prefix) {
			return e
		}
	}
	return nil
}

// eventText is what the event says, in the first field that has it.
func eventText(e *api.TaskEvent) string {
	for _, s := range []string{e.DisplayMessage, e.Message, e.DriverError, e.SetupError, e.ValidationError,
		e.KillError, e.DownloadError, e.VaultError, e.KillReason, e.DriverMessage} {
		if s != "" {
			return s
		}
	}
	return ""
}

// describeEvents lists events as "Type: text; Type: text", leaving out the
// routine ones and those that repeat what an earlier one said (a driver's
// error comes as its own event and again as "Driver Failure", wrapped by
// gRPC).
func describeEvents(events []*api.TaskEvent) string {
	var parts, said []string
	for _, e := range events {
		switch e.Type {
		case api.TaskReceived, "Task Setup":
			continue
		}
		t := strings.TrimPrefix(eventText(e), "rpc error: code = Unknown desc = ")
		if t == "" {
			parts = append(parts, e.Type)
			continue
		}
		repeated := false
		for _, s := range said {
			repeated = repeated || strings.Contains(s, t)
		}
		if repeated {
			continue
		}
		said = append(said, t)
		parts = append(parts, e.Type+": "+t)
	}
	if len(parts) == 0 {
		return "no events"
	}
	return strings.Join(parts, "; ")
}

// describeMetric says why the scheduler could not place an allocation.
func describeMetric(m *api.AllocationMetric) string {
	if m == nil {
		return "no reason given"
	}
	parts := []string{fmt.Sprintf("%d of %d nodes in the pool evaluated", m.NodesEvaluated, m.NodesInPool)}
	if m.NodesEvaluated == 0 {
		parts = []string{"no node is ready in the job's datacenters and node pool"}
	}
	add := func(title string, mp map[string]int) {
		if len(mp) == 0 {
			return
		}
		keys := make([]string, 0, len(mp))
		for k := range mp {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var kv []string
		for _, k := range keys {
			kv = append(kv, fmt.Sprintf("%s (%d)", k, mp[k]))
		}
		parts = append(parts, title+": "+strings.Join(kv, ", "))
	}
	add("filtered by", m.ConstraintFiltered)
	add("filtered by class", m.ClassFiltered)
	add("exhausted", m.DimensionExhausted)
	if len(m.QuotaExhausted) > 0 {
		parts = append(parts, "quota exhausted: "+strings.Join(m.QuotaExhausted, ", "))
	}
	return strings.Join(parts, "; ")
}

// mayReschedule reports whether Nomad will replace the finished allocation
// a: a lost one is replaced, a failed one if its group's reschedule policy
// has attempts left (the same count the scheduler makes).
func mayReschedule(a *api.Allocation, now time.Time) bool {
	if a.DesiredStatus != api.AllocDesiredStatusRun {
		return false
	}
	switch a.ClientStatus {
	case api.AllocClientStatusLost:
		return true
	case api.AllocClientStatusFailed:
	default:
		return false
	}
	if a.Job == nil {
		return false
	}
	tg := a.Job.LookupTaskGroup(a.TaskGroup)
	if tg == nil || tg.ReschedulePolicy == nil {
		return false
	}
	p := tg.ReschedulePolicy
	if p.Unlimited != nil && *p.Unlimited {
		return true
	}
	attempts := 0
	if p.Attempts != nil {
		attempts = *p.Attempts
	}
	if attempts <= 0 {
		return false
	}
	used := 0
	if a.RescheduleTracker != nil {
		var interval time.Duration
		if p.Interval != nil {
			interval = *p.Interval
		}
		for _, ev := range a.RescheduleTracker.Events {
			if interval <= 0 || now.Sub(time.Unix(0, ev.RescheduleTime)) < interval {
				used++
			}
		}
	}
	return used < attempts
}
