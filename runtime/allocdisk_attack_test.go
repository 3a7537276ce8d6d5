package runtime

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"
	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

// What the tasks wrote to alloc/data is on the allocation's disk until the
// copy back. A removal that finds the overlays gone (the node restarted:
// the mounts went, disk_dir stayed) must copy the disk back, not drop it,
// whether the sweep or the next task's start finds it.
func TestAllocDisk_UnmountedDiskIsCopiedBack(t *testing.T) {
	for _, by := range []string{"sweep", "join"} {
		t.Run(by, func(t *testing.T) {
			e := newAllocDiskEnv(t)
			s := e.task(t, "s")
			e.join(t, s, 16<<20)
			x := filepath.Join(e.allocDir, "alloc", "data", "x")
			must.NoError(t, os.WriteFile(x, []byte("written before the restart"), 0o644))
			base := allocDiskBase(e.diskDir, "a1")
			for _, m := range []string{filepath.Join(e.allocDir, "alloc", "data"), filepath.Join(e.allocDir, "alloc", "tmp"), base} {
				must.NoError(t, unix.Unmount(m, 0))
			}
			must.NoError(t, os.RemoveAll(s))
			switch by {
			case "sweep":
				_, err := SweepAllocDisks(e.diskDir, e.stateRoot)
				must.NoError(t, err)
			case "join":
				n := e.task(t, "n")
				e.join(t, n, 16<<20)
				defer func() { must.NoError(t, LeaveAllocDisk(n)) }()
			}
			got, err := os.ReadFile(x)
			must.NoError(t, err, must.Sprint("what the task wrote was dropped with the disk"))
			must.Eq(t, "written before the restart", string(got))
		})
	}
}

// A copy back that fails (the node's disk is full) keeps what the tasks
// wrote where Nomad and the next task see it, the disk mounted and bounding
// them, and the next try copies it back.
func TestAllocDisk_FailedCopyBackKeepsDataAndLimit(t *testing.T) {
	e := newAllocDiskEnv(t)
	// The allocation directory on a file system too small for the copy.
	must.NoError(t, unix.Mount("tmpfs", e.allocDir, "tmpfs", 0, "size=2m"))
	t.Cleanup(func() { _ = unix.Unmount(e.allocDir, unix.MNT_DETACH) })
	for _, d := range []string{"data", "tmp"} {
		must.NoError(t, os.MkdirAll(filepath.Join(e.allocDir, "alloc", d), 0o777))
	}
	a := e.task(t, "a")
	e.join(t, a, 16<<20)
	big := bytes.Repeat([]byte("d"), 4<<20)
	x := filepath.Join(e.allocDir, "alloc", "data", "x")
	must.NoError(t, os.WriteFile(x, big, 0o644))
	// Refused before it writes: a retry must not fill the node's disk
	// each time only to give up.
	err := LeaveAllocDisk(a)
	must.ErrorIs(t, err, unix.ENOSPC)
	must.ErrorContains(t, err, "free on the node's disk")

	// The data is still at the host path, on the disk.
	got, err := os.ReadFile(x)
	must.NoError(t, err, must.Sprint("a failed copy back hid what the task wrote"))
	must.Eq(t, len(big), len(got))
	must.True(t, e.mounted(t), must.Sprint("a failed copy back took the disk off alloc/data"))

	// The next task of the allocation is on the disk, not unlimited.
	b := e.task(t, "b")
	must.Eq(t, "", e.join(t, b, 16<<20))
	must.True(t, e.mounted(t))

	// Room made: the retries succeed and copy everything back.
	must.NoError(t, unix.Mount("", e.allocDir, "", unix.MS_REMOUNT, "size=64m"))
	must.NoError(t, LeaveAllocDisk(b))
	must.NoError(t, LeaveAllocDisk(a))
	must.False(t, e.mounted(t))
	got, err = os.ReadFile(x)
	must.NoError(t, err)
	must.Eq(t, len(big), len(got))
}

// The node's other users can write alloc/data (Nomad makes it
// world-writable) while the copy back runs, and swap a file it found
// regular for a FIFO before it opens it: the open must not wait for a
// writer that never comes (DestroyTask and the sweep would hang, holding
// the allocation's lock and the sweep's), and the FIFO is not copied.
func TestCopyBack_FileSwappedForFIFO(t *testing.T) {
	testutil.RequireRoot(t)
	srcDir, dstDir := t.TempDir(), t.TempDir()
	must.NoError(t, unix.Mkfifo(filepath.Join(srcDir, "f"), 0o666))
	src, err := unix.Open(srcDir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	must.NoError(t, err)
	defer unix.Close(src)
	dst, err := unix.Open(dstDir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	must.NoError(t, err)
	defer unix.Close(dst)
	c := &treeCopy{root: dst, links: map[[2]uint64]string{}}
	done := make(chan error, 1)
	// As if the Lstat had seen a regular file of 10 bytes there.
	go func() { done <- c.file(src, dst, "f", 10) }()
	select {
	case err := <-done:
		must.Error(t, err)
	case <-time.After(10 * time.Second):
		// Unblock the open so that the goroutine ends.
		if w, err := os.OpenFile(filepath.Join(srcDir, "f"), os.O_WRONLY, 0); err == nil {
			w.Close()
		}
		<-done
		t.Fatal("the copy back blocked opening a FIFO")
	}
	_, err = os.Lstat(filepath.Join(dstDir, "f"))
	must.True(t, os.IsNotExist(err), must.Sprint("the FIFO's stand-in was left in the copy"))
}

// A task nests a directory in itself thousands of times (an inode each).
// The copy back costs the same per entry at any depth (walked by path, a
// chain of 1,000 took 18 s and of 4,000 took 4 minutes, holding the
// allocation's lock, and the sweep's when the sweep ran it); what lies
// deeper than maxCopyDepth is left out, and the next start measures what
// is left without failing.
func TestAllocDisk_DeepTreeCopiedBackInLinearTime(t *testing.T) {
	e := newAllocDiskEnv(t)
	a := e.task(t, "a")
	e.join(t, a, 64<<20)
	data := filepath.Join(e.allocDir, "alloc", "data")
	fd, err := unix.Open(data, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	must.NoError(t, err)
	const depth = 3000
	for i := range depth {
		if i == 10 || i == depth-1 {
			f, err := unix.Openat(fd, "f", unix.O_CREAT|unix.O_WRONLY|unix.O_CLOEXEC, 0o644)
			must.NoError(t, err)
			unix.Close(f)
			must.NoError(t, unix.Linkat(fd, "f", fd, "g", 0))
		}
		must.NoError(t, unix.Mkdirat(fd, "d", 0o755))
		next, err := unix.Openat(fd, "d", unix.O_RDONLY|unix.O_DIRECTORY, 0)
		unix.Close(fd)
		must.NoError(t, err)
		fd = next
	}
	unix.Close(fd)
	done := make(chan error, 1)
	go func() { done <- LeaveAllocDisk(a) }()
	select {
	case err := <-done:
		must.NoError(t, err)
	case <-time.After(30 * time.Second):
		t.Fatal("the copy back of a deep tree took more than 30 s")
	}
	shallow := filepath.Join(data, strings.Repeat("d/", 10))
	f, err := os.Stat(filepath.Join(shallow, "f"))
	must.NoError(t, err)
	g, err := os.Stat(filepath.Join(shallow, "g"))
	must.NoError(t, err)
	must.True(t, os.SameFile(f, g), must.Sprint("a hard link was copied as a file"))
	_, entries, err := DirUsage(data)
	must.NoError(t, err)
	// maxCopyDepth directories and one file under two names.
	must.Eq(t, int64(maxCopyDepth+1), entries, must.Sprint("not every directory down to maxCopyDepth was copied, or deeper ones were"))
	b := e.task(t, "b")
	e.join(t, b, 64<<20)
	must.NoError(t, LeaveAllocDisk(b))
	must.NoError(t, os.RemoveAll(data))
}

// DirUsage never measures through a link at the directory itself (a local
// user can put one at local/, pointing at the whole host), but follows a
// descriptor's /proc link given with a trailing slash.
func TestDirUsage_LinkNotFollowed(t *testing.T) {
	dir := t.TempDir()
	real := filepath.Join(dir, "real")
	must.NoError(t, os.Mkdir(real, 0o755))
	must.NoError(t, os.WriteFile(filepath.Join(real, "f"), []byte("x"), 0o644))
	must.NoError(t, os.Symlink("/usr", filepath.Join(dir, "link")))
	_, _, err := DirUsage(filepath.Join(dir, "link"))
	must.Error(t, err)
	fd, err := unix.Open(real, unix.O_PATH|unix.O_DIRECTORY, 0)
	must.NoError(t, err)
	defer unix.Close(fd)
	_, n, err := DirUsage(fmt.Sprintf("/proc/self/fd/%d/", fd))
	must.NoError(t, err)
	must.Eq(t, int64(1), n)
}
