package driver

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shoenig/test/must"
	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

// TestDriver_SweepRemovesLeftovers plays a plugin that crashed: a new
// plugin process must remove what no Nomad task can still recover, and keep
// what it can.
func TestDriver_SweepRemovesLeftovers(t *testing.T) {
	e := newTestEnv(t, nil)
	script := `echo ready; sleep 600`

	// A running task whose allocation Nomad still has: kept.
	keepCfg, keepCleanup := e.task(t, "keep", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", script}}))
	defer keepCleanup()
	keepHandle, _, err := e.harness.StartTask(keepCfg)
	must.NoError(t, err)
	waitLog(t, keepCfg, "stdout", has("ready"))

	// A running task whose allocation directory is gone: removed.
	goneCfg, goneCleanup := e.task(t, "gone", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", script}}))
	defer goneCleanup()
	goneHandle, _, err := e.harness.StartTask(goneCfg)
	must.NoError(t, err)
	waitLog(t, goneCfg, "stdout", has("ready"))
	var goneState taskState
	must.NoError(t, goneHandle.GetDriverState(&goneState))
	// Control: while it runs, runsc knows the sandbox.
	exists, err := e.driver.runsc.Exists(context.Background(), goneState.SandboxID)
	must.NoError(t, err)
	must.True(t, exists, must.Sprint("runsc does not know a running sandbox"))

	// A state directory from a create that crashed half-way: removed.
	half := filepath.Join(e.config.StateDir, "nomad-halfmade")
	must.NoError(t, os.MkdirAll(runtime.StateDir(half).Bundle(), 0o700))

	e.driver.Shutdown()
	// Nomad's garbage collection of the allocation (secrets and private
	// are mounts of their own).
	unmountUnder(t, goneCfg.TaskDir().Dir)
	must.NoError(t, os.RemoveAll(goneCfg.TaskDir().Dir))

	fresh := e.newDriver()
	e.driver = fresh
	// While the grace lasts, only what Nomad cannot have goes.
	fresh.sweep(context.Background(), false)

	_, err = os.Stat(half)
	must.True(t, os.IsNotExist(err), must.Sprint("half-made state must be removed"))
	_, err = os.Stat(goneState.StateDir)
	must.True(t, os.IsNotExist(err), must.Sprint("state of a task whose allocation is gone must be removed"))
	exists, err = fresh.runsc.Exists(context.Background(), goneState.SandboxID)
	must.NoError(t, err)
	must.False(t, exists, must.Sprint("the orphaned sandbox must be deleted"))

	must.NoError(t, fresh.RecoverTask(keepHandle), must.Sprint("a task Nomad can still recover must be kept"))
	// After the grace, a recovered task is still never touched.
	fresh.sweep(context.Background(), true)
	status, err := fresh.InspectTask(keepCfg.ID)
	must.NoError(t, err)
	must.Eq(t, "running", string(status.State))
	must.NoError(t, fresh.DestroyTask(keepCfg.ID, true))
}

func unmountUnder(t *testing.T, dir string) {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mounts")
	must.NoError(t, err)
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 1 && strings.HasPrefix(f[1], dir+"/") {
			must.NoError(t, unix.Unmount(f[1], unix.MNT_DETACH))
		}
	}
}

// TestDriver_SweepStraysWithoutStateDir: a running sandbox whose state
// directory is gone (removed by hand while the plugin was down), and runsc's
// state too in the second case, is found through runsc and the process
// list: its container, supervisor, sandbox and gofer processes and cgroups
// are removed by a sweep, even within the grace.
func TestDriver_SweepStraysWithoutStateDir(t *testing.T) {
	for _, runscStateToo := range []bool{false, true} {
		t.Run(fmt.Sprintf("runsc state removed %v", runscStateToo), func(t *testing.T) {
			e := newTestEnv(t, nil)
			cfg, cleanup := e.task(t, "stray", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", `echo ready; while :; do sleep 0.05; done`}}))
			defer cleanup()
			t.Cleanup(func() { e.forceRemove(sandboxID(cfg)) })
			_, _, err := e.harness.StartTask(cfg)
			must.NoError(t, err)
			waitLog(t, cfg, "stdout", has("ready"))
			tr := e.tracesOf(t, cfg, false)
			must.True(t, (&runtime.Supervisor{Dir: tr.stateDir}).Alive())

			e.driver.Shutdown()
			must.NoError(t, os.RemoveAll(tr.stateDir))
			want := 5 // runsc container, cgroups, supervisor, sandbox, gofer
			if runscStateToo {
				files, err := filepath.Glob(filepath.Join(e.config.RunscRoot, "*"+tr.id+"*"))
				must.NoError(t, err)
				must.SliceNotEmpty(t, files)
				for _, f := range files {
					must.NoError(t, os.Remove(f))
				}
				want = 4
			}
			// Control: everything else of the task is still there.
			must.SliceLen(t, want, e.leftOf(tr), must.Sprintf("%v", e.leftOf(tr)))

			fresh := e.newDriver()
			e.driver = fresh
			fresh.sweep(context.Background(), false)
			e.assertGone(t, tr)
		})
	}
}

// TestDriver_SweepIgnoresOtherUsersLookalikes: anyone can run a process
// whose argv reads like one of this driver's sandboxes. The sweep kills such
// a process, and removes the cgroup it names, only when it is root's (the
// control); another user's lookalike, naming the cgroup of a sandbox that is
// not this driver's, is left alone, and so is that cgroup.
func TestDriver_SweepIgnoresOtherUsersLookalikes(t *testing.T) {
	e := newTestEnv(t, nil)
	for _, c := range []struct {
		name string
		uid  uint32
		gone bool
	}{
		{"root", 0, true},
		{"nobody", 65534, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			id := fmt.Sprintf("nomad-lookalike-%s-%d", c.name, os.Getpid())
			cg := filepath.Join(runtime.CgroupRoot, "memory", "nomad-sandbox", id)
			must.NoError(t, os.MkdirAll(cg, 0o755))
			t.Cleanup(func() { _ = unix.Rmdir(cg) })
			cmd := exec.Command("/bin/sh", "-c", "sleep 600; exit 0", "runsc-sandbox", "--root="+filepath.Clean(e.config.RunscRoot), "boot", id)
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: &syscall.Credential{Uid: c.uid, Gid: c.uid}}
			must.NoError(t, cmd.Start())
			exited := make(chan struct{})
			go func() { _ = cmd.Wait(); close(exited) }()
			t.Cleanup(func() {
				_ = unix.Kill(-cmd.Process.Pid, unix.SIGKILL)
				<-exited
			})

			e.driver.sweep(context.Background(), true)

			_, err := os.Stat(cg)
			if c.gone {
				select {
				case <-exited:
				case <-time.After(10 * time.Second):
					t.Fatal("root's leftover sandbox process was not killed")
				}
				must.True(t, os.IsNotExist(err), must.Sprint("the cgroup a killed leftover named was kept"))
				return
			}
			// Alive, not a zombie: its command line is still there.
			b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", cmd.Process.Pid))
			must.StrContains(t, string(b), id, must.Sprint("another user's process was killed"))
			must.NoError(t, err, must.Sprint("the cgroup another user's process named was removed"))
		})
	}
}
