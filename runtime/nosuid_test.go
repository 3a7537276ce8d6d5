package runtime

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/shoenig/test/must"
	"golang.org/x/sys/unix"
)

// stripSetID clears the set-id bits of the regular files of a tree, never
// through a link (a set-uid file outside the tree keeps its bits), never
// opening a FIFO for good (the test would hang), and closes a directory
// nested deeper than it walks to everyone but root.
func TestStripSetID(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: chown")
	}
	dir, outside := t.TempDir(), filepath.Join(t.TempDir(), "host-suid")
	must.NoError(t, os.WriteFile(outside, []byte("x"), 0o755))
	must.NoError(t, unix.Chmod(outside, 0o4755))
	files := map[string]uint32{"a": 0o4755, "sub/b": 0o6777, "sub/c": 0o2750, "plain": 0o1644}
	for name, mode := range files {
		p := filepath.Join(dir, name)
		must.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		must.NoError(t, os.WriteFile(p, []byte("x"), 0o600))
		must.NoError(t, unix.Chmod(p, mode))
	}
	must.NoError(t, os.Symlink(outside, filepath.Join(dir, "link")))
	must.NoError(t, unix.Mkfifo(filepath.Join(dir, "fifo"), 0o644))
	// A tree deeper than the walk, owned by another user who could
	// open it again: the level past the walk becomes root's, 0700.
	deep := dir + strings.Repeat("/d", maxCopyDepth+2)
	must.NoError(t, os.MkdirAll(deep, 0o777))
	must.NoError(t, os.WriteFile(deep+"/e", []byte("x"), 0o600))
	must.NoError(t, unix.Chmod(deep+"/e", 0o4755))
	for p := dir + "/d"; len(p) <= len(deep); p += "/d" {
		must.NoError(t, os.Chown(p, 1000, 1000))
		must.NoError(t, os.Chmod(p, 0o777))
	}

	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	must.NoError(t, err)
	defer unix.Close(fd)
	must.NoError(t, stripSetID(fd))

	var st unix.Stat_t
	for name, mode := range files {
		must.NoError(t, unix.Lstat(filepath.Join(dir, name), &st))
		must.Eq(t, mode&0o1777, st.Mode&0o7777, must.Sprintf("%s", name))
	}
	must.NoError(t, unix.Lstat(outside, &st))
	must.Eq(t, uint32(0o4755), st.Mode&0o7777, must.Sprint("a link was followed out of the tree"))
	must.NoError(t, unix.Lstat(filepath.Join(dir, "fifo"), &st))
	must.Eq(t, uint32(unix.S_IFIFO), st.Mode&unix.S_IFMT)

	walked := dir + strings.Repeat("/d", maxCopyDepth)
	must.NoError(t, unix.Lstat(walked, &st))
	must.Eq(t, uint32(1000), st.Uid, must.Sprint("a walked directory was changed"))
	must.NoError(t, unix.Lstat(walked+"/d", &st))
	must.Eq(t, uint32(0), st.Uid, must.Sprint("the directory past the walk is not root's"))
	must.Eq(t, uint32(0o700), st.Mode&0o7777, must.Sprint("the directory past the walk is open to others"))
}

// Without a disk, alloc/data and alloc/tmp are bound nosuid while any task
// of the allocation holds them, including one with a limit that joins
// while a task without runs on them; the last to leave strips the set-id
// bits and removes the binds, and a leave that is not the last keeps both.
func TestAllocShare_NoSuidWhileHeld(t *testing.T) {
	e := newAllocDiskEnv(t)
	a, b := e.task(t, "a"), e.task(t, "b")
	nosuid := func(sub string) bool {
		var st unix.Statfs_t
		must.NoError(t, unix.Statfs(filepath.Join(e.allocDir, "alloc", sub), &st))
		return st.Flags&unix.ST_NOSUID != 0
	}
	must.Eq(t, "", e.join(t, a, 0))
	must.True(t, nosuid("data"))
	must.True(t, nosuid("tmp"))
	must.StrContains(t, e.join(t, b, 16<<20), "not limited")
	must.False(t, e.mounted(t))
	files := []string{filepath.Join(e.allocDir, "alloc", "data", "suid"), filepath.Join(e.allocDir, "alloc", "tmp", "sgid")}
	for _, p := range files {
		must.NoError(t, os.WriteFile(p, []byte("x"), 0o600))
		must.NoError(t, unix.Chmod(p, 0o6755))
	}
	var st unix.Stat_t
	must.NoError(t, LeaveAllocDisk(a))
	must.True(t, nosuid("data"), must.Sprint("a leave that was not the last removed the bind"))
	must.NoError(t, unix.Lstat(files[0], &st))
	must.Eq(t, uint32(0o6755), st.Mode&0o7777)
	must.NoError(t, LeaveAllocDisk(b))
	for _, p := range files {
		must.NoError(t, unix.Lstat(p, &st))
		must.Eq(t, uint32(0o755), st.Mode&0o7777, must.Sprintf("%s kept set-id bits", p))
		src, err := MountSource(filepath.Dir(p))
		must.NoError(t, err)
		must.Eq(t, "", src, must.Sprintf("%s is still mounted", filepath.Dir(p)))
	}
}

// While the strip walks, the bind is read-only for everyone but the strip
// itself, so that nobody can move a set-id file from a directory not
// walked yet into one walked already; a bind a failed removal left so is
// made writable again by the next cover; the removal leaves nothing
// mounted.
func TestStripBeneath_BindReadOnlyMeanwhile(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: mounts")
	}
	root, state := t.TempDir(), t.TempDir()
	target := filepath.Join(root, "local")
	must.NoError(t, os.MkdirAll(filepath.Join(target, "w"), 0o777))
	t.Cleanup(func() { _ = unix.Unmount(target, unix.MNT_DETACH) })
	must.NoError(t, CoverTaskDirs(state, root, "local"))
	suid := filepath.Join(target, "w", "suid")
	must.NoError(t, os.WriteFile(suid, []byte("x"), 0o600))
	must.NoError(t, unix.Chmod(suid, 0o4755))

	h, err := resolveDir(root, "local")
	must.NoError(t, err)
	must.NoError(t, stripBeneath(h))
	h.Close()
	var st unix.Stat_t
	must.NoError(t, unix.Lstat(suid, &st))
	must.Eq(t, uint32(0o755), st.Mode&0o7777)
	must.ErrorIs(t, os.Rename(suid, filepath.Join(target, "moved")), unix.EROFS)

	must.NoError(t, CoverTaskDirs(state, root, "local"))
	must.NoError(t, os.WriteFile(filepath.Join(target, "again"), nil, 0o600), must.Sprint("the next cover left the bind read-only"))
	must.NoError(t, UncoverTaskDirs(state))
	src, err := MountSource(target)
	must.NoError(t, err)
	must.Eq(t, "", src)
	_, err = os.Stat(StateDir(state).NoSuid())
	must.ErrorIs(t, err, os.ErrNotExist)
}

// What the nosuid bind adds to a task without a disk: the bind at the
// start, and at the removal the strip's walk of local/ (empty, and 1,000
// files in 10 directories, none set-id) and the unmount.
func BenchmarkNoSuidCoverAndUncover(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root: mounts")
	}
	for _, files := range []int{0, 1000} {
		b.Run(strconv.Itoa(files)+" files", func(b *testing.B) {
			root, state := b.TempDir(), b.TempDir()
			target := filepath.Join(root, "local")
			must.NoError(b, os.MkdirAll(target, 0o755))
			for f := range files {
				sub := filepath.Join(target, strconv.Itoa(f%10))
				must.NoError(b, os.MkdirAll(sub, 0o755))
				must.NoError(b, os.WriteFile(filepath.Join(sub, strconv.Itoa(f)), nil, 0o644))
			}
			b.Cleanup(func() { _ = unix.Unmount(target, unix.MNT_DETACH) })
			b.ResetTimer()
			for range b.N {
				must.NoError(b, CoverTaskDirs(state, root, "local"))
				must.NoError(b, UncoverTaskDirs(state))
			}
		})
	}
}
