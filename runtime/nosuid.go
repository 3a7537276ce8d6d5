package runtime

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

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
// bits inert already (nosuid or noexec, as Nomad's tmpfs on secrets/ is).
// Call it before the sandbox is made; UncoverTaskDirs undoes it.
func CoverTaskDirs(dir, root string, rels ...string) error {
	var rec noSuidRecord
	for _, rel := range rels {
		h, err := resolveDir(root, rel)
		if err != nil {
			return err
		}
		err = cover(h, root, rel, func() error {
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
		h, err := resolveDir(allocDir, filepath.Join("alloc", sub))
		if err != nil {
			return err
		}
		// The holders' records (allocHolder.AllocDir) say where it is.
		err = cover(h, allocDir, filepath.Join("alloc", sub), func() error { return nil })
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
// directory. The task's and the allocation's directories are world-writable
// (Nomad's), so a node's other user can replace one with a link at any time.
func resolveDir(root, rel string) (*safeopen.Handle, error) {
	h, err := safeopen.Resolve(root, rel, safeopen.NoSymlinks)
	if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.EXDEV) || err == nil && h.Type() == unix.S_IFLNK {
		if h != nil {
			h.Close()
		}
		return nil, fmt.Errorf("task directory %s is a symbolic link or goes through one, which someone other than Nomad put there: refused", rel)
	}
	if err != nil {
		return nil, fmt.Errorf("task directory %s: %w", rel, err)
	}
	if h.Type() != unix.S_IFDIR {
		h.Close()
		return nil, fmt.Errorf("task directory %s is not a directory (mode %#o): refused", rel, h.Stat.Mode)
	}
	return h, nil
}

// cover binds the directory h (resolveDir's base/rel) nosuid (bindNoSuid)
// unless it is the root of a mount on which set-id bits are inert already;
// record is called first, so that a crash leaves the bind found. A bind of
// ours that a failed removal left read-only (see stripBeneath) is made
// writable again for the new sandbox.
func cover(h *safeopen.Handle, base, rel string, record func() error) error {
	root, fs, err := mountRootOf(h)
	if err != nil {
		return err
	}
	if root && fs.Flags&(unix.ST_NOSUID|unix.ST_NOEXEC) != 0 {
		if ourBind(root, fs) && fs.Flags&unix.ST_RDONLY != 0 {
			return setMountAttr(h, unix.MountAttr{Attr_clr: unix.MOUNT_ATTR_RDONLY})
		}
		return nil
	}
	if err := record(); err != nil {
		return err
	}
	clone, err := bindNoSuid(h)
	if err != nil {
		return err
	}
	defer unix.Close(clone)
	// The bind is on the directory resolved; a node's other user may have
	// renamed it away before the bind and made a plain one in its place,
	// which the sandbox would then write. From here on the name holds: a
	// mount point can be neither renamed nor removed.
	if err := boundAt(h, base, rel); err != nil {
		if uerr := unix.Unmount("/proc/self/fd/"+strconv.Itoa(clone), unix.MNT_DETACH); uerr != nil {
			return errors.Join(err, fmt.Errorf("unmount the nosuid bind: %w", uerr))
		}
		return err
	}
	return nil
}

// boundAt says whether base/rel, resolved again, is the directory h with
// the nosuid bind on it.
func boundAt(h *safeopen.Handle, base, rel string) error {
	now, err := resolveDir(base, rel)
	if err != nil {
		return err
	}
	defer now.Close()
	root, fs, err := mountRootOf(now)
	if err != nil {
		return err
	}
	if now.Stat.Dev != h.Stat.Dev || now.Stat.Ino != h.Stat.Ino || !ourBind(root, fs) {
		return fmt.Errorf("%s was replaced while it was being bound nosuid, which someone other than Nomad did: refused", rel)
	}
	return nil
}

// ourBind says whether a directory that is (root) or is not the root of a
// mount whose file system fs describes carries a bind of bindNoSuid's
// kind: nosuid and nodev, and no disk's overlay.
func ourBind(root bool, fs unix.Statfs_t) bool {
	const flags = unix.ST_NOSUID | unix.ST_NODEV
	return root && fs.Flags&flags == flags && fs.Type != unix.OVERLAYFS_SUPER_MAGIC
}

// setMountAttr changes the flags of the mount whose root h is.
func setMountAttr(h *safeopen.Handle, attr unix.MountAttr) error {
	fd, err := h.Open(unix.O_RDONLY | unix.O_DIRECTORY)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return mountSetattr(fd, attr)
}

// mountSetattr changes the flags of the mount whose root fd is.
func mountSetattr(fd int, attr unix.MountAttr) error {
	if err := unix.MountSetattr(fd, "", unix.AT_EMPTY_PATH, &attr); err != nil {
		return fmt.Errorf("mount_setattr: %w", err)
	}
	return nil
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
// whatever its name points at by then (cover checks the name). Not
// recursive: nothing is mounted in a task's directories, and the strip then
// walks one file system. It returns the bind's descriptor, which the caller
// closes.
func bindNoSuid(h *safeopen.Handle) (int, error) {
	fd, clone, err := cloneMount(h)
	if err != nil {
		return -1, fmt.Errorf("bind nosuid: %w", err)
	}
	defer unix.Close(fd)
	if err := mountSetattr(clone, unix.MountAttr{Attr_set: unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV}); err != nil {
		unix.Close(clone)
		return -1, fmt.Errorf("bind nosuid: %w", err)
	}
	if err := unix.MoveMount(clone, "", fd, "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH); err != nil {
		unix.Close(clone)
		return -1, fmt.Errorf("bind nosuid: move_mount: %w", err)
	}
	return clone, nil
}

// cloneMount opens the directory h (the root of a mount, or any directory)
// and a detached copy of it as a bind (open_tree), for bindNoSuid to attach
// or stripBeneath to write through; the caller closes both.
func cloneMount(h *safeopen.Handle) (fd, clone int, err error) {
	if fd, err = h.Open(unix.O_RDONLY | unix.O_DIRECTORY); err != nil {
		return -1, -1, err
	}
	if clone, err = unix.OpenTree(fd, "", unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC|unix.AT_EMPTY_PATH); err != nil {
		unix.Close(fd)
		return -1, -1, fmt.Errorf("open_tree: %w", err)
	}
	return fd, clone, nil
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
	if !ourBind(root, fs) {
		return nil
	}
	if err := stripBeneath(h); err != nil {
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

// stripBeneath strips the set-id bits beneath the bind whose root h is.
// While the strip walks, nobody may move a file from a directory not walked
// yet into one walked already (a local user in a directory the task made
// world-writable), or that file would keep its bits once the bind is gone:
// the bind turns read-only for everyone first, and the strip writes through
// a writable copy of it that only this process holds.
func stripBeneath(h *safeopen.Handle) error {
	fd, clone, err := cloneMount(h)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	defer unix.Close(clone)
	if err := mountSetattr(fd, unix.MountAttr{Attr_set: unix.MOUNT_ATTR_RDONLY}); err != nil {
		return err
	}
	if err := mountSetattr(clone, unix.MountAttr{Attr_clr: unix.MOUNT_ATTR_RDONLY}); err != nil {
		return err
	}
	dir, err := unix.Openat(clone, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(dir)
	return stripSetID(dir)
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
