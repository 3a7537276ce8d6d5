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
// runs them as root. (A task without any disk writes the plain host
// directories, and its set-id files stay: see README, Disk.)
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
