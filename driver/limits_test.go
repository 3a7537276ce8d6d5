package driver

import (
	"context"
	"testing"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
)

func TestDriver_Timeout(t *testing.T) {
	e := newTestEnv(t, nil)
	cases := []struct {
		name   string
		script string
		// min and max bound the run time: the timeout, plus the
		// SIGKILL grace for a task that ignores SIGTERM.
		min, max time.Duration
	}{
		{"stops on SIGTERM", "sleep 60", 2 * time.Second, 2*time.Second + timeoutKillGrace},
		{"ignores SIGTERM", "trap '' TERM; while true; do sleep 0.1; done", 2*time.Second + timeoutKillGrace, 2*time.Second + timeoutKillGrace + 5*time.Second},
		{"catches SIGTERM and exits 0", "trap 'exit 0' TERM; while true; do sleep 0.1; done", 2 * time.Second, 2*time.Second + timeoutKillGrace},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg, cleanup := e.task(t, "timeout", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", tc.script}, Timeout: "2s"}))
			defer cleanup()
			ev := e.events(t, cfg.ID)
			_, _, err := e.harness.StartTask(cfg)
			must.NoError(t, err)
			defer func() { must.NoError(t, e.harness.DestroyTask(cfg.ID, true)) }()
			res := e.wait(cfg.ID, 60*time.Second)
			// The task's own start and end, as the supervisor that
			// enforces the limit saw them: the time the start and the
			// removal take on a loaded machine is not the limit's.
			h, ok := e.driver.tasks.Get(cfg.ID)
			must.True(t, ok)
			st, err := h.sup.ExitStatus()
			must.NoError(t, err)
			took := st.CompletedAt.Sub(st.StartedAt)
			must.Error(t, res.Err, must.Sprint("a timed-out task must fail, even if it exited 0"))
			must.StrContains(t, res.Err.Error(), "time limit of 2s exceeded")
			must.False(t, res.Successful())
			must.Between(t, tc.min, took, tc.max)
			msg := ev.waitFor(t, "Time limit exceeded")
			must.StrContains(t, msg, "timeout is 2s")
		})
	}
}

func TestDriver_TimeoutSurvivesPluginRestart(t *testing.T) {
	e := newTestEnv(t, nil)
	cfg, cleanup := e.task(t, "timeout-restart", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", "echo ready; sleep 60"}, Timeout: "3s"}))
	defer cleanup()
	handle, _, err := e.harness.StartTask(cfg)
	must.NoError(t, err)
	waitLog(t, cfg, "stdout", has("ready"))
	e.driver.Shutdown()
	fresh := e.newDriver()
	e.driver = fresh
	must.NoError(t, fresh.RecoverTask(handle))
	ch, err := fresh.WaitTask(context.Background(), cfg.ID)
	must.NoError(t, err)
	select {
	case res := <-ch:
		must.Error(t, res.Err)
		must.StrContains(t, res.Err.Error(), "time limit of 3s exceeded")
	case <-time.After(30 * time.Second):
		t.Fatal("the time limit did not end the task after the plugin restarted")
	}
	must.NoError(t, fresh.DestroyTask(cfg.ID, true))
}

func TestDriver_MaxSandboxes(t *testing.T) {
	e := newTestEnv(t, func(pc *PluginConfig) { pc.MaxSandboxes = 2 })
	var ids []string
	defer func() {
		for _, id := range ids {
			must.NoError(t, e.driver.DestroyTask(id, true))
		}
	}()
	for i := 0; i < 2; i++ {
		cfg, cleanup := e.task(t, "slot", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", "sleep 600"}}))
		defer cleanup()
		_, _, err := e.harness.StartTask(cfg)
		must.NoError(t, err)
		ids = append(ids, cfg.ID)
	}
	third, cleanup := e.taskWithLogs(t, "third", readonlyDefault(TaskConfig{Command: "/bin/true"}), false)
	defer cleanup()
	start := time.Now()
	_, _, err := e.harness.StartTask(third)
	must.Error(t, err)
	must.Less(t, 5*time.Second, time.Since(start), must.Sprint("a task beyond max_sandboxes must fail fast"))
	must.StrContains(t, err.Error(), "max_sandboxes = 2")

	// A freed slot can be used again.
	must.NoError(t, e.driver.StopTask(ids[0], time.Second, "SIGKILL"))
	fourth, cleanup4 := e.task(t, "fourth", readonlyDefault(TaskConfig{Command: "/bin/true"}))
	defer cleanup4()
	res := e.run(fourth)
	must.Eq(t, 0, res.ExitCode)
}

func TestDriver_Stats(t *testing.T) {
	e := newTestEnv(t, nil)
	cfg, cleanup := e.task(t, "busy", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", "while :; do :; done"}}))
	defer cleanup()
	_, _, err := e.harness.StartTask(cfg)
	must.NoError(t, err)
	defer func() { must.NoError(t, e.harness.DestroyTask(cfg.ID, true)) }()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ch, err := e.harness.TaskStats(ctx, cfg.ID, 200*time.Millisecond)
	must.NoError(t, err)
	var last *drivers.TaskResourceUsage
	for u := range ch {
		last = u
		if u.ResourceUsage.CpuStats.TotalTicks > 0 && u.ResourceUsage.CpuStats.Percent > 20 {
			break
		}
	}
	must.NotNil(t, last, must.Sprint("the stats stream closed before a busy sample"))
	cpu, mem := last.ResourceUsage.CpuStats, last.ResourceUsage.MemoryStats
	must.Greater(t, 20, cpu.Percent, must.Sprintf("a busy loop uses a core: %+v", cpu))
	must.Positive(t, cpu.TotalTicks)
	must.SliceContainsAll(t, []string{"Percent", "User Mode", "System Mode"}, cpu.Measured)
	must.SliceNotContains(t, cpu.Measured, "Total Ticks", must.Sprint("the CLI has no column for it"))
	must.Positive(t, mem.Usage)
	must.Positive(t, mem.RSS)
	must.Positive(t, mem.MaxUsage)
}

func TestDriver_ForkBombContainedSiblingRuns(t *testing.T) {
	e := newTestEnv(t, nil)
	sib, cleanupSib := e.task(t, "sibling", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", "echo ready; sleep 600"}}))
	defer cleanupSib()
	_, _, err := e.harness.StartTask(sib)
	must.NoError(t, err)
	defer func() { must.NoError(t, e.driver.DestroyTask(sib.ID, true)) }()
	waitLog(t, sib, "stdout", has("ready"))

	// Bounded so that a broken limit cannot take the machine down.
	bomb := `b() { [ "$1" -gt 13 ] && return; b $(($1+1)) & b $(($1+1)) & wait; }; ( b 0 ) 2>/dev/null; echo bomb-ended`
	cfg, cleanup := e.task(t, "bomb", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", bomb}, PidsLimit: 64}))
	defer cleanup()
	ev := e.events(t, cfg.ID)
	res := e.run(cfg)
	must.Eq(t, 0, res.ExitCode)
	waitLog(t, cfg, "stdout", has("bomb-ended"))
	ev.waitFor(t, "pids 64")

	status, err := e.harness.InspectTask(sib.ID)
	must.NoError(t, err)
	must.Eq(t, drivers.TaskStateRunning, status.State)
	out, err := e.harness.ExecTask(sib.ID, []string{"/bin/echo", "still-here"}, 20*time.Second)
	must.NoError(t, err)
	must.Eq(t, "still-here\n", string(out.Stdout))
}
