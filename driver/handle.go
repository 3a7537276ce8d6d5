package driver

import (
	"context"
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
	logger     hclog.Logger

	// done is closed when the task has ended and exitResult is set.
	done chan struct{}

	mu          sync.RWMutex
	state       drivers.TaskState
	startedAt   time.Time
	completedAt time.Time
	exitResult  *drivers.ExitResult
}

func newTaskHandle(cfg *drivers.TaskConfig, st taskState, sup *runtime.Supervisor, logger hclog.Logger) *taskHandle {
	return &taskHandle{
		sandboxID:  st.SandboxID,
		stateDir:   st.StateDir,
		taskConfig: cfg,
		sup:        sup,
		logger:     logger,
		done:       make(chan struct{}),
		state:      drivers.TaskStateRunning,
		startedAt:  st.StartedAt,
	}
}

// watch waits for the supervisor to report the end of the task.
func (h *taskHandle) watch(ctx context.Context) {
	st, err := h.sup.Wait(ctx)
	if ctx.Err() != nil {
		// The plugin is shutting down; the task goes on without us.
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.state = drivers.TaskStateExited
	if err != nil {
		h.completedAt = time.Now()
		h.exitResult = &drivers.ExitResult{ExitCode: -1, Err: err}
	} else {
		h.completedAt = st.CompletedAt
		h.exitResult = exitResult(st)
	}
	close(h.done)
}

func exitResult(st *runtime.ExitStatus) *drivers.ExitResult {
	r := &drivers.ExitResult{ExitCode: st.ExitCode, Signal: st.Signal, OOMKilled: st.OOMKilled}
	if st.Err != "" {
		r.Err = errString(st.Err)
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
