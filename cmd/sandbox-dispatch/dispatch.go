package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/nomad/api"
)

// runner dispatches one job and follows what the dispatch created.
type runner struct {
	o      *options
	c      *api.Client
	stdout io.Writer
	stderr io.Writer

	mu      sync.Mutex
	child   string // the dispatched job's ID, once dispatched
	started bool   // the followed task has started at least once
}

func newRunner(o *options, stdout, stderr io.Writer) (*runner, error) {
	cfg := api.DefaultConfig()
	cfg.Address = o.address
	cfg.SecretID = o.token
	if o.namespace != "" {
		cfg.Namespace = o.namespace
	}
	c, err := api.NewClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("Nomad API client for %s: %w", o.address, err)
	}
	return &runner{o: o, c: c, stdout: stdout, stderr: stderr}, nil
}

func (r *runner) logf(format string, args ...any) {
	fmt.Fprintf(r.stderr, "sandbox-dispatch: "+format+"\n", args...)
}

// errGone is returned when the dispatched job or its allocation no longer
// exists (purged by someone else).
var errGone = errors.New("gone")

// run dispatches and follows, and returns the exit code. The run ends early
// at -timeout or on a signal from sigs; the dispatched job is then stopped.
func (r *runner) run(payload []byte, sigs <-chan os.Signal) int {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	var (
		causeMu sync.Mutex
		cause   os.Signal // nil: -timeout
	)
	var deadline <-chan time.Time
	if r.o.timeout > 0 {
		t := time.NewTimer(r.o.timeout)
		defer t.Stop()
		deadline = t.C
	}
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		select {
		case <-deadline:
		case s := <-sigs:
			causeMu.Lock()
			cause = s
			causeMu.Unlock()
		case <-ctx.Done():
			return
		}
		cancel()
	}()

	v, err := r.dispatchAndFollow(ctx, payload)
	if ctx.Err() != nil {
		<-stopped
		causeMu.Lock()
		sig := cause
		causeMu.Unlock()
		return r.ended(sig)
	}
	cancel()
	if err != nil {
		switch {
		case errors.Is(err, errGone):
			v = verdict{exitDidNotRun, fmt.Sprintf("job %s or its allocation was purged before the task ended", r.childID())}
		default:
			v = verdict{exitDispatchFailed, err.Error()}
			if child := r.childID(); child != "" {
				v.reason = fmt.Sprintf("cannot follow job %s: %v", child, err)
				r.stopJob()
			}
		}
	}
	job := r.childID()
	if job == "" {
		job = r.o.job
	}
	r.logf("%s: verdict: exit %d: %s", job, v.code, v.reason)
	return v.code
}

// ended handles a run cut short by -timeout (sig nil) or a signal.
func (r *runner) ended(sig os.Signal) int {
	child := r.childID()
	r.mu.Lock()
	started := r.started
	r.mu.Unlock()
	if child != "" {
		r.stopJob()
	}
	name := child
	if name == "" {
		name = r.o.job
	}
	if sig != nil {
		code := 128 + 2
		if s, ok := sig.(syscall.Signal); ok {
			code = 128 + int(s)
		}
		r.logf("%s: verdict: exit %d: interrupted by %s", name, code, sig)
		return code
	}
	switch {
	case child == "":
		r.logf("%s: verdict: exit %d: -timeout %s passed before the dispatch went through", name, exitDispatchFailed, r.o.timeout)
		return exitDispatchFailed
	case !started:
		r.logf("%s: verdict: exit %d: -timeout %s passed before the task started", name, exitDidNotRun, r.o.timeout)
		return exitDidNotRun
	default:
		r.logf("%s: verdict: exit %d: -timeout %s passed while the task ran", name, exitTimeLimit, r.o.timeout)
		return exitTimeLimit
	}
}

func (r *runner) childID() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.child
}

// stopJob stops the dispatched job, so that nothing runs on for a caller
// that has given up on it.
func (r *runner) stopJob() {
	child := r.childID()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	w := (&api.WriteOptions{}).WithContext(ctx)
	if _, _, err := r.c.Jobs().Deregister(child, false, w); err != nil {
		r.logf("could not stop job %s: %v (stop it with: nomad job stop %s)", child, err, child)
		return
	}
	r.logf("stopped job %s", child)
}

func (r *runner) dispatchAndFollow(ctx context.Context, payload []byte) (verdict, error) {
	q := (&api.QueryOptions{}).WithContext(ctx)
	job, _, err := r.c.Jobs().Info(r.o.job, q)
	if err != nil {
		if statusOf(err) == http.StatusNotFound {
			return verdict{}, fmt.Errorf("job %q not found in namespace %q", r.o.job, r.namespace())
		}
		return verdict{}, fmt.Errorf("read job %q: %w", r.o.job, err)
	}
	if job.ParameterizedJob == nil {
		return verdict{}, fmt.Errorf("job %q is not a parameterized job: only a job with a parameterized block can be dispatched", r.o.job)
	}
	group, task, err := pickTask(job, r.o.task)
	if err != nil {
		return verdict{}, err
	}

	w := (&api.WriteOptions{}).WithContext(ctx)
	resp, _, err := r.c.Jobs().Dispatch(r.o.job, r.o.meta, payload, "", w)
	if err != nil {
		return verdict{}, fmt.Errorf("dispatch job %q: %w", r.o.job, err)
	}
	r.mu.Lock()
	r.child = resp.DispatchedJobID
	r.mu.Unlock()
	r.logf("dispatched job %s (evaluation %s); following task %q", resp.DispatchedJobID, resp.EvalID, task)

	allocID, err := r.waitAlloc(ctx, group, resp.EvalID)
	if err != nil {
		return verdict{}, err
	}
	for {
		a, err := r.followAlloc(ctx, allocID, task)
		if err != nil {
			return verdict{}, err
		}
		v := judge(a, task)
		next, err := r.replacement(ctx, a, v)
		if err != nil {
			return verdict{}, err
		}
		if next == "" {
			if r.o.collect != "" {
				if err := r.collect(ctx, a, r.o.collect); err != nil {
					r.logf("-collect: %v", err)
				}
			}
			return v, nil
		}
		r.logf("allocation %s ended (%s: %s); Nomad rescheduled it as %s, following that", a.ID, a.ClientStatus, v.reason, next)
		allocID = next
	}
}

func (r *runner) namespace() string {
	if r.o.namespace == "" {
		return "default"
	}
	return r.o.namespace
}

// pickTask finds the task to follow: the one named, or the job's only main
// task. Its group must have count = 1: the tool follows one allocation.
func pickTask(job *api.Job, name string) (group, task string, err error) {
	type cand struct {
		group string
		count int
		task  string
	}
	var found []cand
	var all []string
	for _, g := range job.TaskGroups {
		gname, count := "", 1
		if g.Name != nil {
			gname = *g.Name
		}
		if g.Count != nil {
			count = *g.Count
		}
		for _, t := range g.Tasks {
			all = append(all, t.Name)
			main := t.Lifecycle == nil || t.Lifecycle.Hook == ""
			if (name != "" && t.Name == name) || (name == "" && main) {
				found = append(found, cand{gname, count, t.Name})
			}
		}
	}
	jobID := ""
	if job.ID != nil {
		jobID = *job.ID
	}
	switch {
	case len(found) == 0 && name != "":
		return "", "", fmt.Errorf("job %q has no task %q (its tasks: %s)", jobID, name, strings.Join(all, ", "))
	case len(found) == 0:
		return "", "", fmt.Errorf("job %q has no main task (one without a lifecycle block): name the task to follow with -task", jobID)
	case len(found) > 1 && name != "":
		return "", "", fmt.Errorf("job %q has a task %q in more than one group: the tool follows one task", jobID, name)
	case len(found) > 1:
		var names []string
		for _, f := range found {
			names = append(names, f.task)
		}
		return "", "", fmt.Errorf("job %q has %d main tasks (%s): name the one to follow with -task", jobID, len(found), strings.Join(names, ", "))
	}
	f := found[0]
	if f.count != 1 {
		return "", "", fmt.Errorf("group %q of job %q has count = %d: the tool follows one allocation, so use count = 1", f.group, jobID, f.count)
	}
	return f.group, f.task, nil
}

// statusOf is the HTTP status of an API error, 0 if it has none.
func statusOf(err error) int {
	var ure api.UnexpectedResponseError
	if errors.As(err, &ure) && ure.HasStatusCode() {
		return ure.StatusCode()
	}
	return 0
}

// retry calls fn until it succeeds, fails for good, or ctx ends. Errors
// without an HTTP status (connection refused, reset: an agent restarting)
// and 429/5xx are retried; 404 is errGone; other statuses are final.
func (r *runner) retry(ctx context.Context, what string, fn func() error) error {
	backoff := 250 * time.Millisecond
	warned := false
	for {
		err := fn()
		if err == nil {
			if warned {
				r.logf("%s: the API answers again", what)
			}
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		switch st := statusOf(err); {
		case st == http.StatusNotFound:
			return fmt.Errorf("%s: %w (%v)", what, errGone, err)
		case st != 0 && st != http.StatusTooManyRequests && st < 500:
			return fmt.Errorf("%s: %w", what, err)
		}
		if !warned {
			r.logf("%s: %v; retrying", what, err)
			warned = true
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		if backoff *= 2; backoff > 5*time.Second {
			backoff = 5 * time.Second
		}
	}
}

// waitAlloc waits for the dispatched job's allocation of group and returns
// its ID. While none is placed it says why, once.
func (r *runner) waitAlloc(ctx context.Context, group, evalID string) (string, error) {
	child := r.childID()
	var index uint64
	var reported string
	for {
		var stubs []*api.AllocationListStub
		err := r.retry(ctx, "list the allocations of "+child, func() error {
			q := (&api.QueryOptions{WaitIndex: index, WaitTime: 5 * time.Second}).WithContext(ctx)
			s, meta, err := r.c.Jobs().Allocations(child, true, q)
			if err != nil {
				return err
			}
			stubs, index = s, meta.LastIndex
			return nil
		})
		if err != nil {
			return "", err
		}
		var first *api.AllocationListStub
		for _, s := range stubs {
			if s.TaskGroup == group && (first == nil || s.CreateIndex < first.CreateIndex) {
				first = s
			}
		}
		if first != nil {
			return first.ID, nil
		}
		q := (&api.QueryOptions{}).WithContext(ctx)
		ev, _, err := r.c.Evaluations().Info(evalID, q)
		if err != nil {
			continue
		}
		switch ev.Status {
		case "failed", "canceled":
			return "", fmt.Errorf("evaluation %s %s: %s", evalID, ev.Status, ev.StatusDescription)
		case "complete":
			if m, ok := ev.FailedTGAllocs[group]; ok {
				why := describeMetric(m)
				if why != reported {
					r.logf("not placed yet: %s; waiting for a node that can run it (up to -timeout)", why)
					reported = why
				}
			}
		}
	}
}

// followAlloc follows the allocation until the task is dead (or the
// allocation has ended), streaming the task's logs, and returns the
// allocation as it ended.
func (r *runner) followAlloc(ctx context.Context, allocID, task string) (*api.Allocation, error) {
	var index uint64
	var logs *taskLogs
	defer func() {
		if logs != nil {
			logs.stop()
		}
	}()
	wait := 5 * time.Second
	for {
		var a *api.Allocation
		err := r.retry(ctx, "read allocation "+allocID, func() error {
			q := (&api.QueryOptions{WaitIndex: index, WaitTime: wait}).WithContext(ctx)
			al, meta, err := r.c.Allocations().Info(allocID, q)
			if err != nil {
				return err
			}
			a, index = al, meta.LastIndex
			return nil
		})
		if err != nil {
			return nil, err
		}
		ts := a.TaskStates[task]
		started := ts != nil && !ts.StartedAt.IsZero()
		if started {
			r.mu.Lock()
			r.started = true
			r.mu.Unlock()
		}
		if taskEnded(a, ts) {
			if started {
				if logs == nil {
					logs = newTaskLogs(r.c, a, task, r.stdout, r.stderr)
				}
				logs.finish(ctx, r.logf)
			}
			return a, nil
		}
		if started && logs == nil {
			logs = newTaskLogs(r.c, a, task, r.stdout, r.stderr)
			logs.follow(ctx)
		}
		wait = 5 * time.Second
		if logs != nil && logs.repair(ctx, r.logf) {
			// Look again soon while a stream is down.
			wait = time.Second
		}
	}
}

// taskEnded reports whether the followed task is done for good in this
// allocation.
func taskEnded(a *api.Allocation, ts *api.TaskState) bool {
	if ts != nil && ts.State == "dead" {
		return true
	}
	switch a.ClientStatus {
	case api.AllocClientStatusComplete, api.AllocClientStatusFailed, api.AllocClientStatusLost:
		return true
	}
	return false
}

// replacement returns the allocation that replaces a, if Nomad reschedules
// it, waiting for Nomad to create it; "" if a is the last attempt.
func (r *runner) replacement(ctx context.Context, a *api.Allocation, v verdict) (string, error) {
	if a.NextAllocation != "" {
		return a.NextAllocation, nil
	}
	if v.code == 0 {
		return "", nil
	}
	var index uint64
	told := false
	for {
		if a.NextAllocation != "" {
			return a.NextAllocation, nil
		}
		switch a.ClientStatus {
		case api.AllocClientStatusComplete, api.AllocClientStatusFailed, api.AllocClientStatusLost:
			if !mayReschedule(a, time.Now()) {
				return "", nil
			}
			if !told {
				r.logf("allocation %s %s (%s); its reschedule policy allows another attempt, waiting for it", a.ID, a.ClientStatus, v.reason)
				told = true
			}
		default:
			// The task is dead but the allocation still runs
			// (other tasks are stopping): wait for its end.
		}
		err := r.retry(ctx, "read allocation "+a.ID, func() error {
			q := (&api.QueryOptions{WaitIndex: index, WaitTime: 5 * time.Second}).WithContext(ctx)
			al, meta, err := r.c.Allocations().Info(a.ID, q)
			if err != nil {
				return err
			}
			a, index = al, meta.LastIndex
			return nil
		})
		if err != nil {
			return "", err
		}
	}
}

// collect copies the allocation's alloc/data directory into dir.
func (r *runner) collect(ctx context.Context, a *api.Allocation, dir string) error {
	n, err := r.collectDir(ctx, a, "alloc/data", dir, 0)
	if err != nil {
		return err
	}
	r.logf("collected %d files from %s/alloc/data into %s", n, a.ID, dir)
	return nil
}

// collectDir copies the regular files and directories under src (a path in
// the allocation directory) into dst. Names come from the task, which is
// not trusted: only plain names are used, nothing is followed through a
// symbolic link on either side.
func (r *runner) collectDir(ctx context.Context, a *api.Allocation, src, dst string, depth int) (int, error) {
	if depth > 32 {
		return 0, fmt.Errorf("%s: directories nested too deep", src)
	}
	q := (&api.QueryOptions{}).WithContext(ctx)
	entries, _, err := r.c.AllocFS().List(a, src, q)
	if err != nil {
		return 0, fmt.Errorf("list %s: %w", src, err)
	}
	if err := os.Mkdir(dst, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return 0, err
	}
	if fi, err := os.Lstat(dst); err != nil || !fi.IsDir() {
		return 0, fmt.Errorf("%s is not a directory", dst)
	}
	count := 0
	for _, e := range entries {
		if e.Name == "" || e.Name == "." || e.Name == ".." || strings.Contains(e.Name, "/") {
			continue
		}
		s, d := path.Join(src, e.Name), filepath.Join(dst, e.Name)
		switch {
		case e.IsDir:
			n, err := r.collectDir(ctx, a, s, d, depth+1)
			count += n
			if err != nil {
				return count, err
			}
		case strings.HasPrefix(e.FileMode, "-"):
			if err := r.collectFile(ctx, a, s, d); err != nil {
				return count, err
			}
			count++
		default:
			r.logf("-collect: skipping %s (%s): only regular files and directories are copied", s, e.FileMode)
		}
	}
	return count, nil
}

func (r *runner) collectFile(ctx context.Context, a *api.Allocation, src, dst string) error {
	q := (&api.QueryOptions{}).WithContext(ctx)
	rc, err := r.c.AllocFS().Cat(a, src, q)
	if err != nil {
		return fmt.Errorf("read %s: %w", src, err)
	}
	defer rc.Close()
	f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, rc); err != nil {
		f.Close()
		return fmt.Errorf("read %s: %w", src, err)
	}
	return f.Close()
}
