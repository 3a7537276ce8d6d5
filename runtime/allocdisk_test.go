package runtime

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/shoenig/test/must"
	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

// allocDiskEnv is an allocation directory with alloc/data and alloc/tmp, a
// state_dir and a disk_dir, all the test's; nothing of a disk may be left
// when it ends.
type allocDiskEnv struct {
	allocDir, stateRoot, diskDir string
}

func newAllocDiskEnv(t *testing.T) *allocDiskEnv {
	t.Helper()
	testutil.RequireRoot(t)
	base := t.TempDir()
	e := &allocDiskEnv{allocDir: filepath.Join(base, "alloc-dir"), stateRoot: filepath.Join(base, "state"), diskDir: filepath.Join(base, "disks")}
	for _, d := range []string{"data", "tmp"} {
		must.NoError(t, os.MkdirAll(filepath.Join(e.allocDir, "alloc", d), 0o777))
	}
	must.NoError(t, os.MkdirAll(e.stateRoot, 0o700))
	t.Cleanup(func() {
		for _, sub := range []string{"data", "tmp"} {
			src, _ := MountSource(filepath.Join(e.allocDir, "alloc", sub))
			if src != "" {
				t.Errorf("alloc/%s still mounted (%s)", sub, src)
				_ = unix.Unmount(filepath.Join(e.allocDir, "alloc", sub), unix.MNT_DETACH)
			}
		}
		if left, _ := filepath.Glob(filepath.Join(e.diskDir, "alloc", "*")); len(left) > 0 {
			t.Errorf("allocation disk left: %v", left)
			_ = unix.Unmount(allocDiskBase(e.diskDir, "a1"), unix.MNT_DETACH)
		}
	})
	return e
}

func (e *allocDiskEnv) task(t *testing.T, name string) string {
	t.Helper()
	dir := filepath.Join(e.stateRoot, name)
	must.NoError(t, os.Mkdir(dir, 0o700))
	return dir
}

func (e *allocDiskEnv) join(t *testing.T, dir string, limit int64) string {
	t.Helper()
	notice, err := JoinAllocDisk(context.Background(), dir, AllocDisk{Dir: e.diskDir, AllocID: "a1", AllocDir: e.allocDir, LimitBytes: limit, Inodes: DefaultInodes(limit)})
	must.NoError(t, err)
	return notice
}

func (e *allocDiskEnv) mounted(t *testing.T) bool {
	t.Helper()
	src, err := MountSource(filepath.Join(e.allocDir, "alloc", "data"))
	must.NoError(t, err)
	return src == allocOverlaySource(allocDiskBase(e.diskDir, "a1"), "data")
}

// The first task with a limit makes the disk, a task without one joins
// it, it stays while one holds it, and the last to leave copies alloc/data
// back and removes everything of it.
func TestAllocDisk_HoldersAndCopyBack(t *testing.T) {
	e := newAllocDiskEnv(t)
	a, b := e.task(t, "a"), e.task(t, "b")
	must.Eq(t, "", e.join(t, a, 16<<20))
	must.True(t, e.mounted(t))
	must.Eq(t, "", e.join(t, b, 0))
	x := filepath.Join(e.allocDir, "alloc", "data", "x")
	must.NoError(t, os.WriteFile(x, []byte("on the disk"), 0o644))
	must.NoError(t, LeaveAllocDisk(a))
	must.True(t, e.mounted(t), must.Sprint("the disk went while a task held it"))
	must.NoError(t, LeaveAllocDisk(b))
	must.False(t, e.mounted(t))
	got, err := os.ReadFile(x)
	must.NoError(t, err)
	must.Eq(t, "on the disk", string(got))
	for _, d := range []string{a, b} {
		_, err := os.Lstat(StateDir(d).AllocDisk())
		must.True(t, os.IsNotExist(err))
	}
}

// A task without a limit that runs on the plain directories keeps the
// first limited task from making a disk under it; a disk record whose
// overlays are gone (a node restart) is replaced by a new disk.
func TestAllocDisk_UnlimitedFirstAndStaleRecord(t *testing.T) {
	e := newAllocDiskEnv(t)
	u, l := e.task(t, "u"), e.task(t, "l")
	must.Eq(t, "", e.join(t, u, 0))
	must.StrContains(t, e.join(t, l, 16<<20), "not limited")
	must.False(t, e.mounted(t))
	must.NoError(t, LeaveAllocDisk(u))
	must.NoError(t, LeaveAllocDisk(l))

	s := e.task(t, "s")
	e.join(t, s, 16<<20)
	must.True(t, e.mounted(t))
	// The node restarts: mounts and state_dir (on /run) are gone, the
	// record in disk_dir is not.
	base := allocDiskBase(e.diskDir, "a1")
	for _, m := range []string{filepath.Join(e.allocDir, "alloc", "data"), filepath.Join(e.allocDir, "alloc", "tmp"), base} {
		must.NoError(t, unix.Unmount(m, 0))
	}
	must.NoError(t, os.RemoveAll(s))
	n := e.task(t, "n")
	must.Eq(t, "", e.join(t, n, 16<<20))
	must.True(t, e.mounted(t), must.Sprint("a stale record kept the new task off a disk"))
	must.NoError(t, LeaveAllocDisk(n))
}

// Tasks of one allocation joining and leaving at once, in any order, end
// with no disk and no holding left; and the sweep removes a disk that no
// task holds any more.
func TestAllocDisk_ConcurrentAndSweep(t *testing.T) {
	e := newAllocDiskEnv(t)
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := range 8 {
		dir := e.task(t, fmt.Sprintf("t%d", i))
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := JoinAllocDisk(context.Background(), dir, AllocDisk{Dir: e.diskDir, AllocID: "a1", AllocDir: e.allocDir, LimitBytes: 16 << 20, Inodes: 1024}); err != nil {
				errs <- err
				return
			}
			if !e.mounted(t) {
				errs <- fmt.Errorf("%s joined, no disk mounted", dir)
			}
			errs <- LeaveAllocDisk(dir)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		must.NoError(t, err)
	}
	must.False(t, e.mounted(t))

	c := e.task(t, "crashed")
	e.join(t, c, 16<<20)
	// Its state directory goes without a leave (a crash mid-removal).
	must.NoError(t, os.RemoveAll(c))
	removed, err := SweepAllocDisks(e.diskDir, e.stateRoot)
	must.NoError(t, err)
	must.Eq(t, []string{"a1"}, removed)
	must.False(t, e.mounted(t))
}
