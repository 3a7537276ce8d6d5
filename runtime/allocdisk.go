package runtime

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/atomicfile"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/cleanup"
)

// The tasks of an allocation share its alloc/ directory, so the share a
// task may write there (alloc/data, alloc/tmp) cannot be a file system of
// the task's own: one task writes a file while another reads it. It is one
// file system per allocation instead, made as local/'s is (a sparse ext4
// image in disk_dir on a loop device), whose upper layers back two
// overlays mounted over the host's alloc/data and alloc/tmp. Their lower
// layers are what is there already (Nomad's sticky or migrated data, what
// earlier runs wrote), and Nomad (alloc fs, templates, dispatch -collect)
// reads the same host paths the sandboxes write.
//
// The disk is held by the tasks of the allocation that run: each records
// its holding in its own state directory (StateDir.AllocDisk), so a holder lasts
// exactly as long as its state directory and the sweep, which removes
// leftover state directories, also ends their holdings. Joining and leaving
// happen under an flock on a per-allocation lock file in disk_dir, so that
// concurrent starts and removals, in this process or another, agree on who
// makes the disk and who removes it. The first task with a limit makes it;
// the last holder to leave (when its sandbox is gone) copies what the
// overlays show back into plain directories (copyBack's rules) and removes
// the disk.

const (
	// allocDiskDir, in disk_dir, holds the allocations' disks: for each,
	// NAME.img, its record NAME.json, its lock NAME.lock and the mount
	// point NAME/ of its file system.
	allocDiskDir = "alloc"
	// minAllocDisk is the smallest disk an allocation's share is made
	// with: ext4 needs room for its journal and tables.
	minAllocDisk = 8 << 20
)

// allocSubdirs are the directories of alloc/ the disk backs; alloc/ itself
// is read-only in the sandbox and alloc/logs is Nomad's.
var allocSubdirs = [...]string{"data", "tmp"}

// AllocDisk is a task's request to join its allocation's disk.
type AllocDisk struct {
	// Dir is the driver's disk_dir.
	Dir string
	// AllocID names the allocation.
	AllocID string
	// AllocDir is the allocation directory (the node's own path, links
	// in it resolved): alloc/data and alloc/tmp are resolved beneath it
	// without following any link.
	AllocDir string
	// LimitBytes and Inodes are the task's disk_limit and disk_inodes;
	// zero for a task without a limit, which joins a disk that exists
	// but never makes one.
	LimitBytes int64
	Inodes     int64
}

// allocHolder is StateDir.AllocDisk.
type allocHolder struct {
	// Base is the disk's path in disk_dir without a suffix.
	Base       string `json:"base"`
	AllocID    string `json:"alloc_id"`
	LimitBytes int64  `json:"limit_bytes"`
	// AllocDir is the allocation directory: the last holder to leave
	// finds alloc/data and alloc/tmp there to strip and unbind when the
	// allocation has no disk (see coverAllocShare).
	AllocDir string `json:"alloc_dir,omitempty"`
}

// allocDiskRecord is NAME.json next to the image: what the disk was made
// with, for messages and the sweep.
type allocDiskRecord struct {
	AllocDir string `json:"alloc_dir"`
	// SizeBytes and Inodes are the file system's: the limits less what
	// alloc/data and alloc/tmp held when it was made.
	SizeBytes int64 `json:"size_bytes"`
	Inodes    int64 `json:"inodes"`
	// LimitBytes is the disk_limit of the task that made it.
	LimitBytes int64 `json:"limit_bytes"`
}

func allocDiskBase(dir, allocID string) string {
	return filepath.Join(dir, allocDiskDir, allocID)
}

func allocOverlaySource(base, sub string) string {
	return overlaySourcePrefix + "alloc-" + filepath.Base(base) + "-" + sub
}

// lockAllocDisk takes the allocation's lock (an flock on base.lock, which
// another process may remove when it is done with the disk: the lock is
// held only on the file that is still at that path).
func lockAllocDisk(base string) (unlock func(), err error) {
	if err := os.MkdirAll(filepath.Dir(base), 0o700); err != nil {
		return nil, fmt.Errorf("disk_dir: %w", err)
	}
	for {
		f, err := os.OpenFile(base+".lock", os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return nil, fmt.Errorf("allocation disk lock: %w", err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
			f.Close()
			return nil, fmt.Errorf("allocation disk lock: %w", err)
		}
		var held, now unix.Stat_t
		if unix.Fstat(int(f.Fd()), &held) == nil && unix.Lstat(base+".lock", &now) == nil && held.Ino == now.Ino && held.Dev == now.Dev {
			return func() { f.Close() }, nil
		}
		// Removed (or replaced) while we waited: take the new one.
		f.Close()
	}
}

// holders lists the state directories under stateRoot whose task holds the
// disk at base.
func holders(stateRoot, base string) []string {
	files, _ := filepath.Glob(StateDir(filepath.Join(stateRoot, "*")).AllocDisk())
	var out []string
	for _, f := range files {
		if h := readHolder(filepath.Dir(f)); h != nil && h.Base == base {
			out = append(out, filepath.Dir(f))
		}
	}
	return out
}

// readHolder is the holding recorded in the state directory dir; nil when
// there is none (or it is unreadable: a holding is written whole).
func readHolder(dir string) *allocHolder {
	var h allocHolder
	if atomicfile.ReadJSON(StateDir(dir).AllocDisk(), &h) != nil || h.Base == "" {
		return nil
	}
	return &h
}

// readAllocDiskRecord is the record of the disk at base; nil when there is
// none.
func readAllocDiskRecord(base string) *allocDiskRecord {
	var r allocDiskRecord
	if atomicfile.ReadJSON(base+".json", &r) != nil {
		return nil
	}
	return &r
}

// JoinAllocDisk makes the task whose state directory is dir a holder of its
// allocation's disk: it makes and mounts the disk when none exists and the
// task has a limit. The disk keeps the size it was made with: a task with a
// larger limit joins it as it is (notice says so). Growing it online
// (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE, which a plugin may lack,
// and a start must not fail on it. It never makes one while other tasks of
// the allocation run without it (their sandboxes write the plain
// directories, and an overlay mounted under them would split what the
// tasks see): then notice says so and alloc/ is not limited. The holding
// is recorded before anything is made, so that a crash leaves something
// LeaveAllocDisk or the sweep finds. dir's parent is the driver's
// state_dir.
func JoinAllocDisk(ctx context.Context, dir string, d AllocDisk) (notice string, err error) {
	base := allocDiskBase(d.Dir, d.AllocID)
	unlock, err := lockAllocDisk(base)
	if err != nil {
		return "", err
	}
	defer unlock()
	others := holders(filepath.Dir(dir), base)
	if err := atomicfile.WriteJSON(StateDir(dir).AllocDisk(), allocHolder{Base: base, AllocID: d.AllocID, LimitBytes: d.LimitBytes, AllocDir: d.AllocDir}, 0o600); err != nil {
		return "", err
	}
	rec := readAllocDiskRecord(base)
	if rec != nil && !allocOverlaysMounted(base, rec) {
		// A record whose overlays are gone (the node restarted, or
		// a removal copied one back and failed on the other). With
		// other holders, their disk is mounted again, never left off
		// (the task would write the node's disk unbounded); with none
		// it is copied back, removed and made again below.
		if len(others) > 0 {
			for _, sub := range allocSubdirs {
				if err := reattachAllocOverlay(base, *rec, sub, true); err != nil {
					return "", fmt.Errorf("mount the allocation's disk again: alloc/%s: %w", sub, err)
				}
			}
			return "", nil
		}
		if err := removeAllocDisk(base, *rec, true); err != nil {
			return "", fmt.Errorf("remove the allocation's stale disk: %w", err)
		}
		rec = nil
	}
	if rec != nil {
		if d.LimitBytes > rec.LimitBytes {
			return fmt.Sprintf("alloc/data and alloc/tmp are on the allocation's disk of %s, made by the task of the allocation that started first; it does not grow to this task's %s", FormatSize(rec.LimitBytes), FormatSize(d.LimitBytes)), nil
		}
		return "", nil
	}
	if d.LimitBytes > 0 && len(others) == 0 {
		// A nosuid bind that no holder accounts for (their state
		// directories went without a leave) must not end up under the
		// overlays, whose copy back renames the directory.
		if err := uncoverAllocShare(d.AllocDir); err != nil {
			return "", err
		}
		return "", makeAllocDisk(ctx, base, d)
	}
	// No disk: the sandboxes write the host's directories, which are
	// bound nosuid while any task holds them.
	if err := coverAllocShare(d.AllocDir); err != nil {
		return "", err
	}
	if d.LimitBytes == 0 {
		return "", nil
	}
	return fmt.Sprintf("alloc/data and alloc/tmp are not limited: %d other task(s) of the allocation without a disk limit run on them", len(others)), nil
}

// allocOverlaysMounted says whether the disk's overlays are on alloc/data
// and alloc/tmp.
func allocOverlaysMounted(base string, rec *allocDiskRecord) bool {
	for _, sub := range allocSubdirs {
		src, err := MountSource(filepath.Join(rec.AllocDir, "alloc", sub))
		if err != nil || src != allocOverlaySource(base, sub) {
			return false
		}
	}
	return true
}

// makeAllocDisk makes, formats and mounts the disk and its overlays; on
// failure it removes what it made.
func makeAllocDisk(ctx context.Context, base string, d AllocDisk) error {
	var used, entries int64
	for _, sub := range allocSubdirs {
		h, err := resolveDir(d.AllocDir, filepath.Join("alloc", sub))
		if err != nil {
			return err
		}
		// Through the descriptor (the trailing slash follows its
		// /proc link), so the tree measured is the one resolved.
		b, n, err := DirUsage(h.ProcPath() + "/")
		h.Close()
		if err != nil {
			return fmt.Errorf("measure alloc/%s: %w", sub, err)
		}
		used, entries = used+b, entries+n
	}
	rec := allocDiskRecord{AllocDir: d.AllocDir, LimitBytes: d.LimitBytes}
	rec.SizeBytes = d.LimitBytes - used
	rec.SizeBytes -= rec.SizeBytes % 4096
	rec.Inodes = min(d.Inodes-entries, MaxInodes(rec.SizeBytes))
	if rec.SizeBytes < minAllocDisk || rec.Inodes < 64 {
		return fmt.Errorf("alloc/data and alloc/tmp hold %s in %d files already (what Nomad and earlier runs put there), too much of the task's %s and %d inodes: raise disk_limit (or disk_inodes)", FormatSize(used), entries, FormatSize(d.LimitBytes), d.Inodes)
	}
	if err := atomicfile.WriteJSON(base+".json", rec, 0o600); err != nil {
		return err
	}
	cu := cleanup.Make(func() { _ = removeAllocDisk(base, rec, false) })
	defer cu.Clean()
	disk := &Disk{Image: base + ".img", SizeBytes: rec.SizeBytes, Inodes: rec.Inodes, LimitBytes: d.LimitBytes}
	if dev := loopOf(disk.Image); dev != "" {
		return fmt.Errorf("allocation disk image %s is in use already (%s)", disk.Image, dev)
	}
	// An image without its record (a crash while it was removed) is
	// never reused: what it held is not known to be newer than the
	// directories.
	_ = os.Remove(disk.Image)
	if _, err := disk.Prepare(ctx); err != nil {
		return err
	}
	if err := os.Mkdir(base, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("allocation disk mount point: %w", err)
	}
	if err := mountImage(disk.Image, base); err != nil {
		return err
	}
	for _, sub := range allocSubdirs {
		if err := mountAllocOverlay(base, d.AllocDir, sub); err != nil {
			return err
		}
	}
	cu.Release()
	return nil
}

// mountAllocOverlay mounts the overlay over alloc/<sub>, its upper layer on
// the disk mounted at base.
func mountAllocOverlay(base, allocDir, sub string) error {
	h, err := resolveDir(allocDir, filepath.Join("alloc", sub))
	if err != nil {
		return err
	}
	defer h.Close()
	target := filepath.Join(allocDir, "alloc", sub)
	if src, err := MountSource(target); err != nil {
		return err
	} else if strings.HasPrefix(src, overlaySourcePrefix) {
		return fmt.Errorf("alloc/%s still carries a disk (%s), which was not removed", sub, strings.TrimPrefix(src, overlaySourcePrefix))
	}
	upper, work := filepath.Join(base, sub, "upper"), filepath.Join(base, sub, "work")
	for _, p := range []string{filepath.Join(base, sub), upper, work} {
		if err := os.Mkdir(p, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("allocation disk: %w", err)
		}
	}
	// The overlay's root takes the owner and mode Nomad gave the
	// directory.
	if err := unix.Chown(upper, int(h.Stat.Uid), int(h.Stat.Gid)); err == nil {
		err = unix.Chmod(upper, h.Stat.Mode&0o7777)
	}
	fd := h.ProcPath()
	opts := "lowerdir=" + fd + ",upperdir=" + upper + ",workdir=" + work
	if err := unix.Mount(allocOverlaySource(base, sub), fd, "overlay", unix.MS_NOSUID|unix.MS_NODEV, opts); err != nil {
		return fmt.Errorf("mount overlay over alloc/%s: %w", sub, err)
	}
	return nil
}

// LeaveAllocDisk ends the holding of the task whose state directory is dir
// (a no-op when it holds none). The last holder copies what the overlays
// show back into plain alloc/data and alloc/tmp and removes the disk. It
// must be called only when the task's sandbox is gone. When the copy fails
// (the node's disk is full), the holding stays and the error is returned:
// the state directory is kept and the removal tried again.
func LeaveAllocDisk(dir string) error {
	h := readHolder(dir)
	if h == nil {
		return nil
	}
	unlock, err := lockAllocDisk(h.Base)
	if err != nil {
		return err
	}
	defer unlock()
	if err := finishAllocDisk(filepath.Dir(dir), h.Base, dir); err != nil {
		return err
	}
	if err := os.Remove(StateDir(dir).AllocDisk()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("allocation disk holding: %w", err)
	}
	return nil
}

// finishAllocDisk removes the disk at base (and its lock) when no task but
// self (a state directory, or "") holds it. The lock must be held.
func finishAllocDisk(stateRoot, base, self string) error {
	for _, o := range holders(stateRoot, base) {
		if o != self {
			return nil
		}
	}
	allocDir := ""
	if self != "" {
		if h := readHolder(self); h != nil {
			allocDir = h.AllocDir
		}
	}
	if rec := readAllocDiskRecord(base); rec != nil {
		if err := removeAllocDisk(base, *rec, true); err != nil {
			return err
		}
		allocDir = rec.AllocDir
	}
	// The set-id bits go before the nosuid binds that kept them inert.
	if allocDir != "" {
		if err := uncoverAllocShare(allocDir); err != nil {
			return err
		}
	}
	// Removed while held: a waiter finds the path gone and makes a new
	// one (see lockAllocDisk).
	if err := os.Remove(base + ".lock"); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// removeAllocDisk copies the overlays' content back (when copy is set and
// the allocation directory is still there), unmounts the overlays and the
// file system (its loop device detaches itself) and removes the image and
// its record. An overlay the node lost (a restart) is mounted again first,
// so that what the disk holds is copied back, not dropped with it. An
// overlay whose copy back fails stays mounted, with the disk under it: what
// the tasks wrote stays where Nomad and the allocation's next task see it,
// still bounded by the disk, and the next try copies it.
func removeAllocDisk(base string, rec allocDiskRecord, copy bool) error {
	var errs []error
	for _, sub := range allocSubdirs {
		target := filepath.Join(rec.AllocDir, "alloc", sub)
		// Only an overlay of this disk's: whatever else is mounted
		// there is not ours to remove.
		ours := func() bool {
			src, err := MountSource(target)
			return err == nil && src == allocOverlaySource(base, sub)
		}
		if copy && !ours() {
			if err := reattachAllocOverlay(base, rec, sub, false); err != nil {
				errs = append(errs, fmt.Errorf("alloc/%s: copy back what the disk holds: %w", sub, err))
				continue
			}
		}
		if !ours() {
			continue
		}
		unmount := func() error { return unmountOverlay(target) }
		if copy {
			if err := copyBack(target, "alloc/"+sub, unmount); err != nil {
				errs = append(errs, err)
				continue
			}
			// Copied: a later try must not lay this upper layer over
			// the copy again.
			done := filepath.Join(base, sub+".copied")
			_ = os.RemoveAll(done)
			if err := os.Rename(filepath.Join(base, sub), done); err != nil {
				errs = append(errs, fmt.Errorf("allocation disk: %w", err))
				continue
			}
		}
		if ours() {
			if err := unmount(); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if err := unmountFS(base); err != nil {
		return err
	}
	_ = os.RemoveAll(base)
	if err := os.Remove(base + ".img"); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := os.Remove(base + ".json"); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// reattachAllocOverlay mounts the disk's file system at base and its
// overlay over alloc/<sub> again after the node lost them (a restart keeps
// disk_dir, not the mounts). It does nothing when the image or alloc/<sub>
// is gone (nothing to copy, or nowhere to), nor, unless always is set, when
// the disk holds no upper layer for sub (nothing written, or copied back
// already). The image is never mounted twice.
func reattachAllocOverlay(base string, rec allocDiskRecord, sub string, always bool) error {
	target := filepath.Join(rec.AllocDir, "alloc", sub)
	if _, err := os.Lstat(target); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if src, err := MountSource(target); err != nil || src == allocOverlaySource(base, sub) {
		return err
	}
	image := base + ".img"
	if _, err := os.Lstat(image); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	src, err := MountSource(base)
	if err != nil {
		return err
	}
	if src == "" {
		if dev := loopOf(image); dev != "" {
			return fmt.Errorf("allocation disk image %s is on %s but not mounted at %s: not mounted twice", image, dev, base)
		}
		if err := os.Mkdir(base, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("allocation disk mount point: %w", err)
		}
		if err := mountImage(image, base); err != nil {
			return err
		}
	}
	if !always {
		if _, err := os.Lstat(filepath.Join(base, sub, "upper")); errors.Is(err, os.ErrNotExist) {
			return nil
		}
	}
	return mountAllocOverlay(base, rec.AllocDir, sub)
}

// SweepAllocDisks finishes what crashes left in disk_dir: the disks that no
// task under stateRoot holds any more (their content is copied back when
// the allocation directory is still there), and lock files of no disk. It
// returns the allocations whose disk it removed.
func SweepAllocDisks(diskDir, stateRoot string) (removed []string, err error) {
	entries, err := os.ReadDir(filepath.Join(diskDir, allocDiskDir))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	names := map[string]bool{}
	for _, e := range entries {
		n := e.Name()
		for _, suf := range []string{".json", ".lock", ".img"} {
			if s, ok := strings.CutSuffix(n, suf); ok {
				names[s] = true
			}
		}
	}
	var errs []error
	for name := range names {
		base := allocDiskBase(diskDir, name)
		unlock, err := lockAllocDisk(base)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		had := readAllocDiskRecord(base) != nil
		if err := finishAllocDisk(stateRoot, base, ""); err != nil {
			errs = append(errs, fmt.Errorf("allocation %s: %w", name, err))
		} else if had && readAllocDiskRecord(base) == nil {
			removed = append(removed, name)
		}
		unlock()
	}
	return removed, errors.Join(errs...)
}

// allocDiskFull is DiskFull's sentence for the allocation's disk that the
// task in dir holds; "" when it is not full or the task holds none.
func allocDiskFull(dir string) string {
	h := readHolder(dir)
	if h == nil {
		return ""
	}
	rec := readAllocDiskRecord(h.Base)
	if rec == nil {
		return ""
	}
	switch fullness(h.Base) {
	case "inodes":
		return fmt.Sprintf("inode limit reached: alloc/data and alloc/tmp hold their %d files and directories (disk_inodes)", rec.Inodes)
	case "blocks":
		return fmt.Sprintf("disk limit reached: alloc/data and alloc/tmp are full at %s (disk_limit)", FormatSize(rec.LimitBytes))
	}
	return ""
}
