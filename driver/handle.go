package driver

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

// taskState is what the client keeps for us in the TaskHandle, so a new
// plugin process can find a running task again.
type taskState struct {
	SandboxID string
	StateDir  string
	StartedAt time.Time
}

type taskHandle struct {
	sandboxID  string
	stateDir   string
	taskConfig *drivers.TaskConfig
	sup        *runtime.Supervisor
	// spec is what the supervisor was started with: the cgroup to read
	// stats from and the time limit.
	spec   *runtime.SupervisorSpec
	logger hclog.Logger
	// net is the sandbox's network when it has an egress allowlist.
	net *taskNet

	// done is closed when the task has ended and exitResult is set.
	done chan struct{}

	mu          sync.RWMutex
	state       drivers.TaskState
	startedAt   time.Time
	completedAt time.Time
	exitResult  *drivers.ExitResult
}

func newTaskHandle(cfg *drivers.TaskConfig, st taskState, sup *runtime.Supervisor, spec *runtime.SupervisorSpec, logger hclog.Logger) *taskHandle {
	return &taskHandle{
		sandboxID:  st.SandboxID,
		stateDir:   st.StateDir,
		taskConfig: cfg,
		sup:        sup,
		spec:       spec,
		logger:     logger,
		done:       make(chan struct{}),
		state:      drivers.TaskStateRunning,
		startedAt:  st.StartedAt,
	}
}

// awaitExit waits for the supervisor to report the end of the task. It returns
// the status, or nil when ctx ended first.
func (h *taskHandle) awaitExit(ctx context.Context) *runtime.ExitStatus {
	st, err := h.sup.Wait(ctx)
	if ctx.Err() != nil {
		// The plugin is shutting down; the task goes on without us.
		return nil
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.state = drivers.TaskStateExited
	if err != nil {
		h.completedAt = time.Now()
		h.exitResult = &drivers.ExitResult{ExitCode: -1, Err: err}
		st = &runtime.ExitStatus{Err: err.Error()}
	} else {
		h.completedAt = st.CompletedAt
		h.exitResult = exitResult(st, h.spec.Timeout)
	}
	close(h.done)
	return st
}

func exitResult(st *runtime.ExitStatus, timeout time.Duration) *drivers.ExitResult {
	r := &drivers.ExitResult{ExitCode: st.ExitCode, Signal: st.Signal, OOMKilled: st.OOMKilled}
	switch {
	case st.Err != "":
		r.Err = errString(st.Err)
	case st.TimedOut:
		// An error makes the result a failure even if the task caught
		// SIGTERM and exited 0: it did not finish its work in time.
		r.Err = errString(fmt.Sprintf("time limit of %s exceeded", timeout))
	case st.OOMKilled:
		r.Err = errString("out of memory: killed by the host's OOM killer at the task's memory limit")
	}
	return r
}

type errString string

func (e errString) Error() string { return string(e) }

func (h *taskHandle) status() *drivers.TaskStatus {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return &drivers.TaskStatus{
		ID:          h.taskConfig.ID,
		Name:        h.taskConfig.Name,
		State:       h.state,
		StartedAt:   h.startedAt,
		CompletedAt: h.completedAt,
		ExitResult:  h.exitResult.Copy(),
		DriverAttributes: map[string]string{
			"sandbox_id": h.sandboxID,
		},
	}
}

func (h *taskHandle) result() *drivers.ExitResult {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.exitResult.Copy()
}

func (h *taskHandle) running() bool {
	select {
	case <-h.done:
		return false
	default:
		return true
	}
}
