//go:build e2e

package e2e

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"
)

// The agent's cells of the crash fault matrix (driver/crash_test.go has the
// others, through the driver alone): a crashed node that did not reboot.
// The agent, the plugin and (in the first cell) the task's supervisor are
// killed with SIGKILL at the same moment, and the agent is started again.
//
// | victims                      | moment                        | expected outcome                                                    |
// |------------------------------|-------------------------------|---------------------------------------------------------------------|
// | agent + plugin + supervisor  | task running                  | the task fails with the event "Sandbox lost: ..." (exit code lost)  |
// | agent + plugin               | task exits while they are down| the true exit code (4); no secret on disk while Nomad is down       |
//
// In both, once the job is purged nothing of the task is left (runJob's
// cleanup checks sandboxes, supervisors, runsc processes, state_dir,
// cgroups and the sandbox's network).
func TestCrashAgentPluginSupervisor(t *testing.T) {
	defer catchPanic(t)
	const secret = "crash-secret-5f1e"
	for _, c := range []struct {
		name           string
		killSupervisor bool
	}{
		{"agent plugin and supervisor while the task runs", true},
		{"agent and plugin while the task exits", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			defer catchPanic(t)
			spec := shellJob(t, "batch", waitForMarker)
			spec.TaskBlocks = []string{fmt.Sprintf("env { CRASH_SECRET = %q }", secret)}
			j := runJob(t, spec)
			// Runs before the job's cleanup, which needs the agent.
			t.Cleanup(func() {
				if suite.agentExited() {
					if err := suite.startAgent(); err == nil {
						_ = suite.waitReady(90 * time.Second)
					}
				}
			})
			j.waitRunning(t)
			j.waitLogs(t, false, "started")
			stateDir := stateDirOf(t, j)

			victims := []int{}
			plugins := suite.pluginProcs()
			must.Len(t, 1, plugins, must.Sprintf("plugin processes: %v", plugins))
			victims = append(victims, plugins[0].pid)
			if c.killSupervisor {
				victims = append(victims, supervisorOf(t, j))
			}
			suite.mu.Lock()
			agent := suite.agent
			suite.mu.Unlock()
			must.NotNil(t, agent)
			victims = append(victims, agent.Process.Pid)
			for _, pid := range victims {
				must.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
			}
			must.NoError(t, suite.stopAgent(syscall.SIGKILL, 30*time.Second))
			t.Logf("killed %v (plugin, supervisor if any, agent)", victims)

			if !c.killSupervisor {
				// The task ends while nobody but its supervisor is there.
				must.NoError(t, os.WriteFile(filepath.Join(j.allocDir(), "alloc", "data", "go"), nil, 0o644))
				must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool {
					_, err := os.Stat(filepath.Join(stateDir, "exit.json"))
					return err == nil
				}), wait.Timeout(30*time.Second), wait.Gap(100*time.Millisecond)), must.Sprint("the supervisor did not record the exit"))
				must.NoError(t, noSecretUnder(stateDir, secret), must.Sprint("a secret outlived the task while Nomad was down"))
			}

			must.NoError(t, suite.startAgent())
			must.NoError(t, suite.waitReady(90*time.Second))

			if c.killSupervisor {
				j.waitEvents(t, "Sandbox lost")
				a, ts := j.waitDone(t)
				must.Eq(t, "failed", a.ClientStatus, must.Sprintf("task: %s", ts))
				must.Len(t, 0, ts.events("Restarting"), must.Sprintf("task: %s", ts))
			} else {
				j.checkExit4(t)
			}
			// Purged now, with its leftovers checked (runJob's cleanup).
			j.purge(t)
		})
	}
}

// stateDirOf is the job's one task state directory.
func stateDirOf(t *testing.T, j *runningJob) string {
	t.Helper()
	entries, err := os.ReadDir(suite.stateDir)
	must.NoError(t, err)
	var dirs []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), j.sandboxPrefix()) {
			dirs = append(dirs, filepath.Join(suite.stateDir, e.Name()))
		}
	}
	must.Len(t, 1, dirs, must.Sprintf("state directories of %s", j.sandboxPrefix()))
	return dirs[0]
}

// noSecretUnder fails if a regular file under dir holds secret.
func noSecretUnder(dir, secret string) error {
	return filepath.WalkDir(dir, func(path string, de os.DirEntry, err error) error {
		if err != nil || !de.Type().IsRegular() {
			return err
		}
		b, err := os.ReadFile(path)
		if errors.Is(err, syscall.EINVAL) {
			return nil
		}
		if err != nil {
			return err
		}
		if strings.Contains(string(b), secret) {
			return fmt.Errorf("%s holds the task's secret", path)
		}
		return nil
	})
}
