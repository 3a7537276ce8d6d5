package runtime

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/safeopen"
)

// When a task's sandbox is gone, what its local/ holds is copied back to
// the host directory and its image removed: Nomad (alloc fs, the UI) reads
// local/ after the task's end, and removes the allocation's directory
// without unmounting anything in it. The copy is bounded by the disk: holes
// stay holes and hard links stay links, so a task cannot turn its
// disk_limit into more on the node's disk.

// DirUsage is what a directory tree holds on disk, in bytes of allocated
// blocks and in entries, counted without following links.
func DirUsage(dir string) (bytes, entries int64, err error) {
	seen := map[[2]uint64]bool{}
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == dir {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			return nil
		}
		key := [2]uint64{st.Dev, st.Ino}
		if seen[key] {
			return nil
		}
		seen[key] = true
		bytes += st.Blocks * 512
		entries++
		return nil
	})
	return bytes, entries, err
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
	tmp, old := "."+base+".sandbox-new-"+hex.EncodeToString(r[:]), "."+base+".sandbox-old-"+hex.EncodeToString(r[:])
	var rootSt unix.Stat_t
	if err := unix.Stat(target, &rootSt); err != nil {
		return err
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
	dst, err := os.OpenRoot(h.ProcPath())
	if err != nil {
		return err
	}
	defer dst.Close()
	src, err := os.OpenRoot(target)
	if err != nil {
		return err
	}
	c := &treeCopy{src: src, dst: dst, links: map[[2]uint64]string{}}
	err = c.dir(".")
	src.Close()
	if err == nil {
		err = dst.Lchown(".", int(rootSt.Uid), int(rootSt.Gid))
	}
	if err == nil {
		err = dst.Chmod(".", fs.FileMode(rootSt.Mode&0o777)|stickyBit(rootSt.Mode))
	}
	if err != nil {
		_ = os.RemoveAll(filepath.Join(parent, tmp))
		return fmt.Errorf("copy %s back from its disk: %w", name, err)
	}
	if err := unmount(); err != nil {
		_ = os.RemoveAll(filepath.Join(parent, tmp))
		return err
	}
	if err := os.Rename(target, filepath.Join(parent, old)); err != nil {
		return err
	}
	if err := os.Rename(filepath.Join(parent, tmp), target); err != nil {
		return err
	}
	return os.RemoveAll(filepath.Join(parent, old))
}

func stickyBit(mode uint32) fs.FileMode {
	if mode&unix.S_ISVTX != 0 {
		return fs.ModeSticky
	}
	return 0
}

// treeCopy copies a tree between two roots: directories, regular files
// (their data extents only) and symbolic links (as links); set-id bits are
// dropped, devices, FIFOs and sockets left out.
type treeCopy struct {
	src, dst *os.Root
	links    map[[2]uint64]string
}

func (c *treeCopy) dir(rel string) error {
	f, err := c.src.OpenFile(rel, os.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	entries, err := f.ReadDir(-1)
	f.Close()
	if err != nil {
		return err
	}
	for _, e := range entries {
		if err := c.entry(path.Join(rel, e.Name())); err != nil {
			return err
		}
	}
	return nil
}

func (c *treeCopy) entry(rel string) error {
	fi, err := c.src.Lstat(rel)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("%s: no stat", rel)
	}
	perm := fi.Mode().Perm() | fi.Mode()&fs.ModeSticky
	switch {
	case fi.IsDir():
		if err := c.dst.Mkdir(rel, 0o700); err != nil {
			return err
		}
		if err := c.dir(rel); err != nil {
			return err
		}
	case fi.Mode()&fs.ModeSymlink != 0:
		to, err := c.src.Readlink(rel)
		if err != nil {
			return err
		}
		if err := c.dst.Symlink(to, rel); err != nil {
			return err
		}
		return c.dst.Lchown(rel, int(st.Uid), int(st.Gid))
	case fi.Mode().IsRegular():
		key := [2]uint64{st.Dev, st.Ino}
		if first, ok := c.links[key]; ok {
			return c.dst.Link(first, rel)
		}
		if st.Nlink > 1 {
			c.links[key] = rel
		}
		if err := c.file(rel, fi.Size()); errors.Is(err, errNotRegular) {
			// Swapped since the Lstat: left out, as FIFOs are.
			return nil
		} else if err != nil {
			return err
		}
	default:
		return nil
	}
	if err := c.dst.Lchown(rel, int(st.Uid), int(st.Gid)); err != nil {
		return err
	}
	if err := c.dst.Chmod(rel, perm); err != nil {
		return err
	}
	return c.dst.Chtimes(rel, fi.ModTime(), fi.ModTime())
}

// errNotRegular is file's answer for what is no longer a regular file.
var errNotRegular = errors.New("not a regular file")

// file copies the data extents of a regular file; its holes stay holes.
// The open never waits: what was seen as a regular file may have been
// swapped for a FIFO since (alloc/data is world-writable), which is then
// left out (errNotRegular).
func (c *treeCopy) file(rel string, size int64) error {
	in, err := c.src.OpenFile(rel, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK, 0)
	if err != nil {
		return err
	}
	defer in.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(in.Fd()), &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return fmt.Errorf("%s: %w", rel, errNotRegular)
	}
	out, err := c.dst.OpenFile(rel, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
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
