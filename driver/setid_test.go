package driver

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"
	"golang.org/x/sys/unix"
)

// setIDScript, run as root in a sandbox without any disk, leaves set-uid
// and set-gid root copies of busybox in every host directory the task
// writes, then says so and keeps running.
const setIDScript = `for f in /local/suid /alloc/data/suid; do cp /bin/busybox $f && chmod 4755 $f; done
mkdir -p /local/a/b && cp /bin/busybox /local/a/b/both && chmod 6777 /local/a/b/both
cp /bin/busybox /alloc/tmp/sgid && chmod 2755 /alloc/tmp/sgid
echo ok > /local/done; sleep 600`

// setIDFiles are the host paths setIDScript makes set-id, with the mode
// each must have without its set-id bits.
func setIDFiles(cfg *drivers.TaskConfig) map[string]os.FileMode {
	td := cfg.TaskDir()
	return map[string]os.FileMode{
		filepath.Join(td.LocalDir, "suid"):                   0o755,
		filepath.Join(td.LocalDir, "a", "b", "both"):         0o777,
		filepath.Join(cfg.AllocDir, "alloc", "data", "suid"): 0o755,
		filepath.Join(cfg.AllocDir, "alloc", "tmp", "sgid"):  0o755,
	}
}

// noDiskEnv is a driver whose tasks get no disk (default_disk_limit "0"):
// their sandboxes write the host's task directories themselves.
func noDiskEnv(t *testing.T) *testEnv {
	return diskEnv(t, func(pc *PluginConfig) { pc.DefaultDiskLimit = "0" })
}

// waitSetIDWritten waits until the task has written its set-id files, and
// checks that each is on a host mount where set-id bits do nothing.
func waitSetIDWritten(t *testing.T, cfg *drivers.TaskConfig) {
	t.Helper()
	done := filepath.Join(cfg.TaskDir().LocalDir, "done")
	must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool {
		b, _ := os.ReadFile(done)
		return string(b) == "ok\n"
	}), wait.Timeout(30*time.Second), wait.Gap(20*time.Millisecond)), must.Sprintf("stderr: %s", readLog(cfg, "stderr")))
	for p := range setIDFiles(cfg) {
		fi, err := os.Lstat(p)
		must.NoError(t, err)
		must.NotEq(t, 0, fi.Mode()&(os.ModeSetuid|os.ModeSetgid), must.Sprintf("%s: the sandbox did not make it set-id (%v): the test proves nothing", p, fi.Mode()))
		var st unix.Statfs_t
		must.NoError(t, unix.Statfs(p, &st))
		must.NotEq(t, 0, st.Flags&unix.ST_NOSUID, must.Sprintf("%s is on a host mount that honours set-id bits while the task runs", p))
	}
}

// assertSetIDGone checks that no set-id bit is left on the host and that
// nothing is mounted on the task's directories any more.
func assertSetIDGone(t *testing.T, cfg *drivers.TaskConfig) {
	t.Helper()
	for p, mode := range setIDFiles(cfg) {
		fi, err := os.Lstat(p)
		must.NoError(t, err)
		must.Eq(t, mode, fi.Mode(), must.Sprintf("%s kept set-id bits on the host", p))
	}
	// Nomad's own tmpfs mounts (secrets/, private/) stay: they are not
	// the driver's.
	bound := map[string]bool{cfg.TaskDir().LocalDir: true, filepath.Join(cfg.AllocDir, "alloc", "data"): true, filepath.Join(cfg.AllocDir, "alloc", "tmp"): true}
	b, err := os.ReadFile("/proc/self/mountinfo")
	must.NoError(t, err)
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && bound[f[4]] {
			t.Errorf("left mounted on a task directory: %s", line)
		}
	}
}

// A task without any disk, running as root, makes set-id root executables
// in /local, /alloc/data and /alloc/tmp (/secrets is Nomad's noexec tmpfs).
// While it runs they are on nosuid binds on the host; when it is destroyed they have lost the
// bits and nothing is left mounted.
func TestSetID_InertWithoutDisk(t *testing.T) {
	e := noDiskEnv(t)
	cfg, cleanup := e.task(t, "setid", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", setIDScript}}))
	defer cleanup()
	_, _, err := e.harness.StartTask(cfg)
	must.NoError(t, err)
	// Before the allocation directory goes, also when the test fails.
	defer func() { _ = e.harness.DestroyTask(cfg.ID, true) }()
	waitSetIDWritten(t, cfg)
	must.NoError(t, e.harness.DestroyTask(cfg.ID, true))
	assertSetIDGone(t, cfg)
}

// The same when the plugin is killed (SIGKILL) while the task runs: the
// sweep of the restarted plugin strips the bits and removes the binds.
func TestSetID_InertWithoutDiskAfterPluginCrash(t *testing.T) {
	e := noDiskEnv(t)
	tc := readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", setIDScript}, Tmpfs: []string{"/tmp"}, Rootfs: e.rootfs})
	cfg, cleanup := e.task(t, "setid", tc)
	defer cleanup()
	t.Cleanup(func() { e.forceRemove(sandboxID(cfg)) })
	ch := e.startChild(t, cfg, tc, "", "")
	ch.handle(t)
	waitSetIDWritten(t, cfg)
	ch.kill(t)
	e.driver.sweep(context.Background(), true)
	_, err := os.Stat(filepath.Join(e.config.StateDir, sandboxID(cfg)))
	must.ErrorIs(t, err, os.ErrNotExist, must.Sprint("the sweep left the task's state directory"))
	assertSetIDGone(t, cfg)
}
