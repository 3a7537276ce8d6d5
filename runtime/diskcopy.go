package runtime

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"

	"os"
	"path"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/safeopen"
)

// When a task's sandbox is gone, what its local/ holds is copied back to
// the host directory and its image removed: Nomad (alloc fs, the UI) reads
// local/ after the task's end, and removes the allocation's directory
// without unmounting anything in it. The copy is bounded by the disk: holes
// stay holes and hard links stay links, so a task cannot turn its
// disk_limit into more on the node's disk.

// maxCopyDepth is how many directories deep below local/, alloc/data or
// alloc/tmp the copy back and DirUsage go. Each level holds descriptors
// while it is walked, and a task can nest a directory in itself as often
// as it has inodes (far beyond PATH_MAX, which no program's paths pass):
// deeper directories are left out of the copy, and DirUsage refuses them.
const maxCopyDepth = 1024

// DirUsage is what a directory tree holds on disk, in bytes of allocated
// blocks and in entries, counted without following links. It walks by
// descriptor, so the cost is one stat per entry however deep the tree.
func DirUsage(dir string) (bytes, entries int64, err error) {
	return dirUsage(dir, false)
}

// dirUsage is DirUsage; with leaveOutDeep, directories deeper than
// maxCopyDepth are not counted (as the copy back leaves them out) instead
// of refused.
func dirUsage(dir string, leaveOutDeep bool) (bytes, entries int64, err error) {
	// Never through a link at dir itself (a local user may have put one
	// at local/); "/proc/self/fd/N/" is followed for its trailing slash.
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, 0, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	defer unix.Close(fd)
	seen := map[[2]uint64]bool{}
	w := treeWalk{
		visit: func(_ int, _, _ string, st *unix.Stat_t) (bool, error) {
			key := [2]uint64{st.Dev, st.Ino}
			if seen[key] {
				return false, nil
			}
			seen[key] = true
			bytes += st.Blocks * 512
			entries++
			return true, nil
		},
		deep: func(_ int, _, rel string) error {
			if leaveOutDeep {
				return nil
			}
			return fmt.Errorf("%s: directories nested more than %d deep", rel, maxCopyDepth)
		},
	}
	err = w.walk(fd, dir)
	return bytes, entries, err
}

// treeWalk walks a tree by descriptor, never following a link, so that
// each entry costs the same at any depth (a task can nest a directory in
// itself once per inode, far beyond PATH_MAX).
type treeWalk struct {
	// visit is called for each entry with the descriptor of the directory
	// holding it, its name, its path and its lstat; for a directory it
	// says whether to go into it.
	visit func(dir int, name, rel string, st *unix.Stat_t) (bool, error)
	// deep is called instead of going into a directory maxCopyDepth levels
	// down: each level walked holds a descriptor.
	deep func(dir int, name, rel string) error
	// skipGone skips an entry that is gone, or no longer a directory,
	// when it is looked at or opened (a local user changed the tree)
	// instead of failing.
	skipGone bool
}

// walk walks the directory open at fd, named rel in messages.
func (w *treeWalk) walk(fd int, rel string) error {
	return w.dir(fd, rel, 0)
}

func (w *treeWalk) dir(fd int, rel string, depth int) error {
	names, err := readNames(fd)
	if err != nil {
		return fmt.Errorf("%s: %w", rel, err)
	}
	for _, name := range names {
		p := path.Join(rel, name)
		var st unix.Stat_t
		if err := unix.Fstatat(fd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			if w.skipGone && errors.Is(err, unix.ENOENT) {
				continue
			}
			return fmt.Errorf("%s: %w", p, err)
		}
		into, err := w.visit(fd, name, p, &st)
		if err != nil {
			return err
		}
		if !into || st.Mode&unix.S_IFMT != unix.S_IFDIR {
			continue
		}
		if depth >= maxCopyDepth {
			if err := w.deep(fd, name, p); err != nil {
				return err
			}
			continue
		}
		sub, err := unix.Openat(fd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			if w.skipGone && (errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP)) {
				continue
			}
			return fmt.Errorf("%s: %w", p, err)
		}
		err = w.dir(sub, p, depth+1)
		unix.Close(sub)
		if err != nil {
			return err
		}
	}
	return nil
}

// readNames lists the directory open at fd (through a descriptor of its
// own, so that fd's offset is untouched).
func readNames(fd int) ([]string, error) {
	d, err := unix.Openat(fd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(d), ".")
	defer f.Close()
	return f.Readdirnames(-1)
}

// copyBack replaces the directory target (the overlay, still mounted) with
// a plain directory holding what the overlay shows. unmount removes the
// overlay between the copy and the swap. name is target as messages call
// it (local/, alloc/data).
func copyBack(target, name string, unmount func() error) error {
	parent, base := filepath.Dir(target), filepath.Base(target)
	// Names nobody can guess: the job's templates may write anywhere in
	// the task directory, and must not be able to put a link where the
	// copy will be renamed from. A crash leaves them to Nomad, which
	// removes the task directory with the allocation.
	var r [8]byte
	if _, err := rand.Read(r[:]); err != nil {
		return err
	}
	tmp := "." + base + ".sandbox-new-" + hex.EncodeToString(r[:])
	var rootSt unix.Stat_t
	if err := unix.Stat(target, &rootSt); err != nil {
		return err
	}
	if err := roomFor(target, parent); err != nil {
		return fmt.Errorf("copy %s back from its disk: %w", name, err)
	}
	if err := os.Mkdir(filepath.Join(parent, tmp), 0o700); err != nil {
		return err
	}
	// The new directory is opened as the one just made, never through a
	// link someone put in its place.
	h, err := safeopen.Resolve(parent, tmp, safeopen.NoSymlinks)
	if err != nil {
		return err
	}
	defer h.Close()
	if h.Type() != unix.S_IFDIR {
		return fmt.Errorf("%s is not the directory just made", tmp)
	}
	dst, err := h.Open(unix.O_RDONLY | unix.O_DIRECTORY)
	if err != nil {
		return err
	}
	defer unix.Close(dst)
	src, err := unix.Open(target, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	c := &treeCopy{root: dst, links: map[[2]uint64]string{}}
	err = c.dir(src, dst, ".", 0)
	unix.Close(src)
	if err == nil {
		err = unix.Fchown(dst, int(rootSt.Uid), int(rootSt.Gid))
	}
	if err == nil {
		err = unix.Fchmod(dst, rootSt.Mode&0o1777)
	}
	if err != nil {
		_ = os.RemoveAll(filepath.Join(parent, tmp))
		return fmt.Errorf("copy %s back from its disk: %w", name, err)
	}
	if err := unmount(); err != nil {
		_ = os.RemoveAll(filepath.Join(parent, tmp))
		return err
	}
	// One exchange, not two renames: a crash between two renames would
	// leave no target at all, and the allocation's next start would fail.
	if err := unix.Renameat2(unix.AT_FDCWD, filepath.Join(parent, tmp), unix.AT_FDCWD, target, unix.RENAME_EXCHANGE); err != nil {
		return fmt.Errorf("swap %s with its copy: %w", name, err)
	}
	// tmp is the old directory now.
	return os.RemoveAll(filepath.Join(parent, tmp))
}

// roomFor checks that what target shows fits on the file system of
// parent, in blocks (root's: the reserved ones count) and inodes, before
// the copy writes anything: a copy back that failed for lack of room is
// tried again (the sweep, every minute), and must not fill the node's disk
// each time only to give up.
func roomFor(target, parent string) error {
	need, n, err := dirUsage(target, true)
	if err != nil {
		return err
	}
	var st unix.Statfs_t
	if err := unix.Statfs(parent, &st); err != nil {
		return err
	}
	if free := int64(st.Bfree) * st.Bsize; need > free {
		return fmt.Errorf("%s needed, %s free on the node's disk: %w", FormatSize(need), FormatSize(free), unix.ENOSPC)
	}
	if st.Files > 0 && n > int64(st.Ffree) {
		return fmt.Errorf("%d inodes needed, %d free on the node's disk: %w", n, st.Ffree, unix.ENOSPC)
	}
	return nil
}

// treeCopy copies a tree between two directories, by descriptor (each
// entry costs the same at any depth): directories, regular files (their
// data extents only) and symbolic links (as links); set-id bits are
// dropped, devices, FIFOs and sockets left out, and directories deeper than
// maxCopyDepth too. The destination is the copy's own directory, which
// nobody else can enter until the copy is done.
type treeCopy struct {
	// root is the destination's top directory; links maps a multiply
	// linked source inode to the path, beneath root, of its first copy.
	root  int
	links map[[2]uint64]string
}

func (c *treeCopy) dir(src, dst int, rel string, depth int) error {
	names, err := readNames(src)
	if err != nil {
		return fmt.Errorf("%s: %w", rel, err)
	}
	for _, name := range names {
		if err := c.entry(src, dst, name, path.Join(rel, name), depth); err != nil {
			return err
		}
	}
	return nil
}

func (c *treeCopy) entry(src, dst int, name, rel string, depth int) error {
	var st unix.Stat_t
	if err := unix.Fstatat(src, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("%s: %w", rel, err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		if depth >= maxCopyDepth {
			return nil
		}
		if err := unix.Mkdirat(dst, name, 0o700); err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		s, err := unix.Openat(src, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) {
			// Swapped since the fstatat: left out.
			return unix.Unlinkat(dst, name, unix.AT_REMOVEDIR)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		d, err := unix.Openat(dst, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err == nil {
			err = c.dir(s, d, rel, depth+1)
			unix.Close(d)
		}
		unix.Close(s)
		if err != nil {
			return err
		}
	case unix.S_IFLNK:
		to, err := readlinkat(src, name)
		if err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		if err := unix.Symlinkat(to, dst, name); err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		return unix.Fchownat(dst, name, int(st.Uid), int(st.Gid), unix.AT_SYMLINK_NOFOLLOW)
	case unix.S_IFREG:
		key := [2]uint64{st.Dev, st.Ino}
		if first, ok := c.links[key]; ok {
			return c.link(first, dst, name, rel)
		}
		if err := c.file(src, dst, name, st.Size); errors.Is(err, errNotRegular) {
			// Swapped since the fstatat: left out, as FIFOs are.
			return nil
		} else if err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		if st.Nlink > 1 {
			c.links[key] = rel
		}
	default:
		return nil
	}
	if err := unix.Fchownat(dst, name, int(st.Uid), int(st.Gid), unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("%s: %w", rel, err)
	}
	// Permissions and the sticky bit; never set-uid or set-gid.
	if err := unix.Fchmodat(dst, name, st.Mode&0o1777, 0); err != nil {
		return fmt.Errorf("%s: %w", rel, err)
	}
	ts := []unix.Timespec{st.Mtim, st.Mtim}
	if err := unix.UtimesNanoAt(dst, name, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("%s: %w", rel, err)
	}
	return nil
}

// link makes name in dst a hard link to first, the path beneath the
// copy's root of an earlier copy of the same file. A path too long for one
// lookup is walked a directory at a time.
func (c *treeCopy) link(first string, dst int, name, rel string) error {
	if len(first) < unix.PathMax-1 {
		if err := unix.Linkat(c.root, first, dst, name, 0); err != nil {
			return fmt.Errorf("%s: link to %s: %w", rel, first, err)
		}
		return nil
	}
	dir, err := unix.Dup(c.root)
	if err != nil {
		return err
	}
	parts := strings.Split(first, "/")
	for _, p := range parts[:len(parts)-1] {
		next, err := unix.Openat(dir, p, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		unix.Close(dir)
		if err != nil {
			return fmt.Errorf("%s: link to %s: %w", rel, first, err)
		}
		dir = next
	}
	defer unix.Close(dir)
	if err := unix.Linkat(dir, parts[len(parts)-1], dst, name, 0); err != nil {
		return fmt.Errorf("%s: link to %s: %w", rel, first, err)
	}
	return nil
}

// readlinkat reads the target of the symbolic link name in dir.
func readlinkat(dir int, name string) (string, error) {
	for size := 256; ; size *= 2 {
		b := make([]byte, size)
		n, err := unix.Readlinkat(dir, name, b)
		if err != nil {
			return "", err
		}
		if n < size {
			return string(b[:n]), nil
		}
	}
}

// errNotRegular is file's answer for what is no longer a regular file.
var errNotRegular = errors.New("not a regular file")

// file copies the data extents of a regular file; its holes stay holes.
// The open never waits: what was seen as a regular file may have been
// swapped for a FIFO since (alloc/data is world-writable), which is then
// left out (errNotRegular).
func (c *treeCopy) file(src, dst int, name string, size int64) error {
	fd, err := unix.Openat(src, name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	in := os.NewFile(uintptr(fd), name)
	defer in.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return errNotRegular
	}
	ofd, err := unix.Openat(dst, name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	out := os.NewFile(uintptr(ofd), name)
	for off := int64(0); off < size; {
		data, err := unix.Seek(int(in.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			out.Close()
			return err
		}
		hole, err := unix.Seek(int(in.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			out.Close()
			return err
		}
		if _, err := io.Copy(io.NewOffsetWriter(out, data), io.NewSectionReader(in, data, hole-data)); err != nil {
			out.Close()
			return err
		}
		off = hole
	}
	err = out.Truncate(size)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}
