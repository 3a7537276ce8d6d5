package driver

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"
	"golang.org/x/sys/unix"
)

// A task writes set-uid and set-gid root executables to /alloc/data and
// /alloc/tmp. On the host they are inert while it runs (the overlays are
// mounted nosuid) and lose the bits in the copy back, so no local user
// runs them as root. (Without any disk, nosuid binds do the same: see
// TestSetID_InertWithoutDisk.)
func TestAllocDisk_SetIDFilesInertOnHost(t *testing.T) {
	e := diskEnv(t, nil)
	cfg, cleanup := e.task(t, "setid", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c",
		"cp /bin/busybox /alloc/data/suid; chmod 4755 /alloc/data/suid; cp /bin/busybox /alloc/tmp/sgid; chmod 2755 /alloc/tmp/sgid; echo ok > /alloc/data/done; sleep 600"},
		DiskLimit: "16MiB"}))
	defer cleanup()
	_, _, err := e.harness.StartTask(cfg)
	must.NoError(t, err)
	t.Cleanup(func() { _ = e.harness.DestroyTask(cfg.ID, true) })
	files := []string{filepath.Join(cfg.AllocDir, "alloc", "data", "suid"), filepath.Join(cfg.AllocDir, "alloc", "tmp", "sgid")}
	done := filepath.Join(cfg.AllocDir, "alloc", "data", "done")
	must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool {
		b, _ := os.ReadFile(done)
		return string(b) == "ok\n"
	}), wait.Timeout(30*time.Second), wait.Gap(20*time.Millisecond)))
	for _, p := range files {
		var st unix.Statfs_t
		must.NoError(t, unix.Statfs(p, &st))
		must.NotEq(t, 0, st.Flags&unix.ST_NOSUID, must.Sprintf("%s is on a host mount that honours set-id bits", p))
	}
	must.NoError(t, e.harness.DestroyTask(cfg.ID, true))
	for _, p := range files {
		fi, err := os.Lstat(p)
		must.NoError(t, err)
		must.Eq(t, os.FileMode(0o755), fi.Mode(), must.Sprintf("%s kept set-id bits on the host", p))
	}
}

// Every way around the allocation's disk from inside the sandbox fails:
// renaming data/ or tmp/ out from under the overlays, writing beside them
// in /alloc directly, through a link, through .. or in /alloc/logs, and
// hard links out of the disk. The host's alloc/ holds what Nomad made and
// nothing else.
func TestAllocDisk_NoWayAroundTheOverlays(t *testing.T) {
	e := diskEnv(t, nil)
	script := `cd /alloc
mv data d2 && echo ESCAPED mv data
mv tmp t2 && echo ESCAPED mv tmp
ln -s /alloc/x data/lnk; echo x > data/lnk && echo ESCAPED link
echo x > /alloc/logs/x && echo ESCAPED logs
mkdir /alloc/x && echo ESCAPED mkdir
touch /alloc/data/../x && echo ESCAPED dotdot
echo a > /alloc/data/f
ln /alloc/data/f /alloc/tmp/f && echo ESCAPED hard link tmp
ln /alloc/data/f /local/f && echo ESCAPED hard link local
echo done`
	cfg, cleanup := e.task(t, "around", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", script}, DiskLimit: "16MiB"}))
	defer cleanup()
	res := e.run(cfg)
	must.Eq(t, 0, res.ExitCode, must.Sprintf("stderr: %s", readLog(cfg, "stderr")))
	out := waitLog(t, cfg, "stdout", has("done"))
	must.Eq(t, "done\n", out, must.Sprintf("stderr: %s", readLog(cfg, "stderr")))
	entries, err := os.ReadDir(filepath.Join(cfg.AllocDir, "alloc"))
	must.NoError(t, err)
	var names []string
	for _, en := range entries {
		names = append(names, en.Name())
	}
	must.Eq(t, []string{"data", "logs", "tmp"}, names)
	b, err := os.ReadFile(filepath.Join(cfg.AllocDir, "alloc", "data", "f"))
	must.NoError(t, err)
	must.Eq(t, "a\n", string(b))
}
