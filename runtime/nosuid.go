package runtime

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/atomicfile"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/safeopen"
)

// gVisor's gofer passes a file's mode to the host as the sandbox sets it,
// so a task running as root can leave a set-uid root executable in a host
// directory it writes, which any local user who reaches the directory would
// run as root. A disk's overlay is mounted nosuid and its copy back drops
// the bits; a directory the sandbox writes without a disk under it (local/
// of a task without a disk_limit, alloc/data and alloc/tmp of an allocation
// without a disk) gets the same from a bind of itself mounted nosuid,nodev
// for as long as sandboxes write it. Before the bind goes, every regular
// file beneath loses its set-id bits, so that nothing set-id is left live
// on the node's disk once it is a plain directory again.

// noSuidRecord, in StateDir.NoSuid, lists the task's own directories bound
// nosuid (absolute host paths), recorded before each bind is made so that
// the removal, or the sweep after a crash, finds it.
type noSuidRecord struct {
	Paths []string `json:"paths"`
}

// CoverTaskDirs binds each of the task's own directories rels (resolved
// beneath root, the task directory, without following any link) over
// itself nosuid,nodev, unless it is the root of a mount that keeps set-id
// bits inert already (Nomad's noexec tmpfs for secrets/, a disk's overlay).
// Call it before the sandbox is made; UncoverTaskDirs undoes it.
func CoverTaskDirs(dir, root string, rels ...string) error {
	var rec noSuidRecord
	for _, rel := range rels {
		h, err := resolveDir(root, rel)
		if err != nil {
			return err
		}
		err = cover(h, func() error {
			rec.Paths = append(rec.Paths, filepath.Join(root, rel))
			return atomicfile.WriteJSON(StateDir(dir).NoSuid(), rec, 0o600)
		})
		h.Close()
		if err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
	}
	return nil
}

// UncoverTaskDirs strips the set-id bits beneath the directories
// CoverTaskDirs bound for the task in dir, then removes the binds. Call it
// only when the sandbox is gone. Safe to call again after a failure or a
// crash, and when nothing was bound.
func UncoverTaskDirs(dir string) error {
	var rec noSuidRecord
	if err := atomicfile.ReadJSON(StateDir(dir).NoSuid(), &rec); errors.Is(err, os.ErrNotExist) {
		return nil
	} else if err != nil {
		return err
	}
	var errs []error
	for _, p := range rec.Paths {
		if err := uncover(filepath.Dir(p), filepath.Base(p)); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if err := os.Remove(StateDir(dir).NoSuid()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// coverAllocShare binds alloc/data and alloc/tmp nosuid,nodev for an
// allocation without a disk, unless a bind of this kind is there already
// (another task of the allocation made it). The allocation's lock must be
// held; the last holder's leave removes the binds (uncoverAllocShare).
func coverAllocShare(allocDir string) error {
	for _, sub := range allocSubdirs {
		h, err := resolveAllocSubdir(allocDir, sub)
		if err != nil {
			return err
		}
		// The holders' records (allocHolder.AllocDir) say where it is.
		err = cover(h, func() error { return nil })
		h.Close()
		if err != nil {
			return fmt.Errorf("alloc/%s: %w", sub, err)
		}
	}
	return nil
}

// uncoverAllocShare strips the set-id bits beneath alloc/data and alloc/tmp
// and removes their nosuid binds, where there are any. The allocation's
// lock must be held and no sandbox of the allocation may run.
func uncoverAllocShare(allocDir string) error {
	var errs []error
	for _, sub := range allocSubdirs {
		if err := uncover(filepath.Join(allocDir, "alloc"), sub); err != nil {
			errs = append(errs, fmt.Errorf("alloc/%s: %w", sub, err))
		}
	}
	return errors.Join(errs...)
}

// resolveDir opens root/rel without following any link; it must be a
// directory.
func resolveDir(root, rel string) (*safeopen.Handle, error) {
	h, err := safeopen.Resolve(root, rel, safeopen.NoSymlinks)
	if err != nil {
		return nil, fmt.Errorf("task directory %s: %w", rel, err)
	}
	if h.Type() != unix.S_IFDIR {
		h.Close()
		return nil, fmt.Errorf("task directory %s is not a directory (mode %#o): refused", rel, h.Stat.Mode)
	}
	return h, nil
}

// cover binds the directory h nosuid (bindNoSuid) unless it is the root of
// a mount on which set-id bits are inert already; record is called first,
// so that a crash leaves the bind found.
func cover(h *safeopen.Handle, record func() error) error {
	inert, err := inertMountRoot(h)
	if err != nil || inert {
		return err
	}
	if err := record(); err != nil {
		return err
	}
	return bindNoSuid(h)
}

// inertMountRoot says whether the directory h is the root of a mount on
// which set-id bits do nothing (nosuid, or noexec).
func inertMountRoot(h *safeopen.Handle) (bool, error) {
	root, fs, err := mountRootOf(h)
	if err != nil || !root {
		return false, err
	}
	return fs.Flags&(unix.ST_NOSUID|unix.ST_NOEXEC) != 0, nil
}

// mountRootOf says whether h is the root of a mount, and describes the
// mount's file system.
func mountRootOf(h *safeopen.Handle) (bool, unix.Statfs_t, error) {
	var fs unix.Statfs_t
	fd, err := h.Open(unix.O_RDONLY | unix.O_DIRECTORY)
	if err != nil {
		return false, fs, err
	}
	defer unix.Close(fd)
	var stx unix.Statx_t
	if err := unix.Statx(fd, "", unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW, unix.STATX_BASIC_STATS, &stx); err != nil {
		return false, fs, fmt.Errorf("statx: %w", err)
	}
	if err := unix.Fstatfs(fd, &fs); err != nil {
		return false, fs, fmt.Errorf("statfs: %w", err)
	}
	return stx.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT != 0 && stx.Attributes&unix.STATX_ATTR_MOUNT_ROOT != 0, fs, nil
}

// bindNoSuid mounts a bind of the directory h over itself, nosuid and
// nodev from the moment it is attached (the new mount API sets the flags
// on the detached copy), on the descriptor: the directory resolved, not
// whatever its name points at by then. Not recursive: nothing is mounted
// in a task's directories, and the strip then walks one file system.
func bindNoSuid(h *safeopen.Handle) error {
	dfd, err := h.Open(unix.O_RDONLY | unix.O_DIRECTORY)
	if err != nil {
		return err
	}
	defer unix.Close(dfd)
	mfd, err := unix.OpenTree(dfd, "", unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC|unix.AT_EMPTY_PATH)
	if err != nil {
		return fmt.Errorf("bind nosuid: %w", err)
	}
	defer unix.Close(mfd)
	attr := unix.MountAttr{Attr_set: unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV}
	if err := unix.MountSetattr(mfd, "", unix.AT_EMPTY_PATH, &attr); err != nil {
		return fmt.Errorf("bind nosuid: %w", err)
	}
	if err := unix.MoveMount(mfd, "", dfd, "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH); err != nil {
		return fmt.Errorf("bind nosuid: %w", err)
	}
	return nil
}

// uncover strips the set-id bits beneath parent/name and removes the
// nosuid bind there: only a bind of bindNoSuid's kind (the root of a
// nosuid,nodev mount that is no disk overlay), never another mount. A
// directory that is gone (Nomad removed the allocation) or not bound is
// left alone.
func uncover(parent, name string) error {
	h, err := safeopen.Resolve(parent, name, safeopen.NoSymlinks)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	defer h.Close()
	if h.Type() != unix.S_IFDIR {
		return nil
	}
	root, fs, err := mountRootOf(h)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	const ours = unix.ST_NOSUID | unix.ST_NODEV
	if !root || fs.Flags&ours != ours || fs.Type == unix.OVERLAYFS_SUPER_MAGIC {
		return nil
	}
	fd, err := h.Open(unix.O_RDONLY | unix.O_DIRECTORY)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	err = stripSetID(fd)
	unix.Close(fd)
	if err != nil {
		return fmt.Errorf("strip set-id bits beneath %s: %w", filepath.Join(parent, name), err)
	}
	// Our descriptors hold the mount: detached, it goes when they close
	// (and when Nomad's readers are done).
	target := filepath.Join(parent, name)
	if err := unix.Unmount(target, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW); err != nil && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("unmount nosuid bind %s: %w", target, err)
	}
	return nil
}

// stripSetID clears S_ISUID and S_ISGID on every regular file beneath the
// directory open at root, walking by descriptor without following links.
// A directory deeper than maxCopyDepth (a task can nest one in itself once
// per inode) is not walked: it is made root's and closed to everyone else
// instead, so that nothing set-id beneath it can be reached.
func stripSetID(root int) error {
	w := treeWalk{
		skipGone: true,
		visit: func(dir int, name, rel string, st *unix.Stat_t) (bool, error) {
			// Only the sandbox (gone now) could have set the bits on a
			// file it made; a name without them needs no open.
			if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Mode&(unix.S_ISUID|unix.S_ISGID) == 0 {
				return true, nil
			}
			if err := stripFile(dir, name); err != nil {
				return false, fmt.Errorf("%s: %w", rel, err)
			}
			return false, nil
		},
		deep: func(dir int, name, rel string) error {
			fd, err := unix.Openat(dir, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) {
				return nil
			}
			if err == nil {
				err = unix.Fchown(fd, 0, 0)
				if err == nil {
					err = unix.Fchmod(fd, 0o700)
				}
				unix.Close(fd)
			}
			if err != nil {
				return fmt.Errorf("%s: %w", rel, err)
			}
			return nil
		},
	}
	return w.walk(root, ".")
}

// stripFile clears the set-id bits of the regular file name in dir through
// a descriptor of its own: never through a link, never waiting (a local
// user may have swapped it for a FIFO), and only if what was opened is a
// regular file.
func stripFile(dir int, name string) error {
	fd, err := unix.Openat(dir, name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ELOOP) {
		return nil
	}
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Mode&(unix.S_ISUID|unix.S_ISGID) == 0 {
		return nil
	}
	return unix.Fchmod(fd, st.Mode&0o1777)
}
