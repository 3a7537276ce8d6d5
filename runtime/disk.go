package runtime

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/atomicfile"
)

// A task's disk limit is a file system of its own: a sparse image file of
// exactly the limit's size, formatted ext4 with a fixed inode count, on the
// node's data disk (never on tmpfs). The node's file system here has no
// project quotas, and a fixed-size image holds against any writer: the
// kernel refuses a block beyond it with ENOSPC however fast the task
// writes, so nothing overshoots. The task's local/ becomes an overlay whose
// upper layer is on that file system and whose lower layer is what Nomad
// put there before the start (artifacts, templates): nothing is copied at
// the start, and the overlay is mounted over the host's local/ so that Nomad
// (alloc fs, templates re-rendered while the task runs) sees what the
// sandbox sees. When the sandbox is gone, the overlay's content is copied
// back into a plain local/ (see copyBack) and the image removed.

const (
	// overlaySourcePrefix names the overlays this driver mounts (the
	// source field of /proc/self/mountinfo), so that leftovers are found.
	overlaySourcePrefix = "nomad-sandbox-disk:"
	// inodeRatio is ext4's default bytes per inode, used when no inode
	// count is given.
	inodeRatio = 16 << 10
	minInodes  = 1024
	// ext4InodeSize is the on-disk inode size mkfs is told to use.
	ext4InodeSize = 256
)

// Disk is the size-limited file system of one task.
type Disk struct {
	// Image is the image file's path.
	Image string
	// SizeBytes and Inodes are what it is made with: the task's limits
	// less what its local/ holds already.
	SizeBytes int64
	Inodes    int64
	// LimitBytes is the task's disk_limit, for messages.
	LimitBytes int64
}

// DiskRecord, in StateDir.Disk, records a task's mounted disk for the exit
// record and for the removal. The image's file system is mounted at
// StateDir.DiskMount, under the state directory, so a removal that detaches
// everything mounted there detaches it too.
type DiskRecord struct {
	Image      string `json:"image"`
	Target     string `json:"target"`
	SizeBytes  int64  `json:"size_bytes"`
	Inodes     int64  `json:"inodes"`
	LimitBytes int64  `json:"limit_bytes"`
}

// DefaultInodes is the inode count of a disk of size bytes whose task set
// none: ext4's own default ratio, one per 16 KiB.
func DefaultInodes(size int64) int64 {
	return max(size/inodeRatio, minInodes)
}

// MaxInodes is the most inodes a disk of size bytes can hold: the inode
// tables must fit in the image, beside the block bitmaps and the journal.
func MaxInodes(size int64) int64 {
	return size / ext4InodeSize / 2
}

// ParseSize parses a size with a unit: B, KiB, MiB, GiB, TiB (powers of
// 1024) or KB, MB, GB, TB (powers of 1000). A bare number is refused, so
// that "2048" is never taken for bytes when megabytes were meant.
func ParseSize(field, s string) (int64, error) {
	t := strings.TrimSpace(s)
	i := strings.IndexFunc(t, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	bad := fmt.Errorf("%s %q is not a size: write a number and a unit, e.g. \"512MiB\" or \"2GiB\" (units B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB)", field, s)
	if i <= 0 {
		return 0, bad
	}
	mult := map[string]float64{
		"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
		"kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
	}[strings.ToLower(strings.TrimSpace(t[i:]))]
	n, err := strconv.ParseFloat(t[:i], 64)
	if mult == 0 || err != nil || n < 0 {
		return 0, bad
	}
	v := n * mult
	if v >= 1<<62 {
		return 0, fmt.Errorf("%s %q is too large", field, s)
	}
	return int64(v), nil
}

// Prepare makes the image when it does not exist yet: a sparse file of
// SizeBytes formatted ext4 with Inodes inodes. An image that exists (its
// content could not be copied back when the task last ended) is used again.
// The directory holding images is the operator's.
func (d *Disk) Prepare(ctx context.Context) (created bool, err error) {
	fi, err := os.Lstat(d.Image)
	switch {
	case err == nil && fi.Mode().IsRegular():
		return false, nil
	case err == nil:
		return false, fmt.Errorf("disk image %s is not a regular file (%v): remove it", d.Image, fi.Mode().Type())
	case !errors.Is(err, os.ErrNotExist):
		return false, fmt.Errorf("disk image: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(d.Image), 0o700); err != nil {
		return false, fmt.Errorf("disk image directory: %w", err)
	}
	// Made under a temporary name and renamed when formatted, so that a
	// crash never leaves a half-made image under the real one.
	tmp := d.Image + ".new"
	_ = os.Remove(tmp)
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return false, fmt.Errorf("create disk image: %w", err)
	}
	err = f.Truncate(d.SizeBytes)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		// No reserved blocks (the limit is all the task's), no discard
		// (the file is sparse already), inode tables left uninitialised
		// so that formatting writes little and the image stays sparse.
		cmd := exec.CommandContext(ctx, mkfsPath(), "-q", "-F", "-m", "0",
			"-N", strconv.FormatInt(d.Inodes, 10), "-I", strconv.Itoa(ext4InodeSize),
			"-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1", tmp)
		if out, cerr := cmd.CombinedOutput(); cerr != nil {
			err = fmt.Errorf("mkfs.ext4: %w: %s", cerr, strings.TrimSpace(string(out)))
		}
	}
	if err == nil {
		err = os.Rename(tmp, d.Image)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return false, fmt.Errorf("disk image %s: %w", d.Image, err)
	}
	return true, nil
}

// mkfsPath finds mkfs.ext4 (e2fsprogs): in PATH, else where Debian puts it,
// since an agent started by an init system may have no sbin in its PATH.
func mkfsPath() string {
	if p, err := exec.LookPath("mkfs.ext4"); err == nil {
		return p
	}
	for _, p := range []string{"/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return "mkfs.ext4 (not found: install e2fsprogs)"
}

// Mount mounts the disk's file system in the state directory dir and an
// overlay over target (the task's local/, resolved beneath root without
// following any link, so a job cannot point it elsewhere): its lower layer
// is target's content, its upper layer on the disk. It records the mount in
// dir (StateDir.Disk) before making it, so that a crash leaves something the
// removal finds.
func (d *Disk) Mount(dir, root, rel string) error {
	th, err := resolveDir(root, rel)
	if err != nil {
		return err
	}
	defer th.Close()
	target := filepath.Join(root, rel)
	// Never twice: an ext4 mounted twice at once is corrupted.
	if src, err := MountSource(target); err != nil {
		return err
	} else if strings.HasPrefix(src, overlaySourcePrefix) {
		return fmt.Errorf("local/ still carries the disk of an earlier run (%s), which was not removed", strings.TrimPrefix(src, overlaySourcePrefix))
	}
	if dev := loopOf(d.Image); dev != "" {
		return fmt.Errorf("disk image %s is in use already (%s)", d.Image, dev)
	}
	if err := atomicfile.WriteJSON(StateDir(dir).Disk(), DiskRecord{Image: d.Image, Target: target, SizeBytes: d.SizeBytes, Inodes: d.Inodes, LimitBytes: d.LimitBytes}, 0o600); err != nil {
		return err
	}
	mnt := StateDir(dir).DiskMount()
	if err := os.Mkdir(mnt, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("disk mount point: %w", err)
	}
	if err := mountImage(d.Image, mnt); err != nil {
		return err
	}
	upper, work := filepath.Join(mnt, "upper"), filepath.Join(mnt, "work")
	for _, p := range []string{upper, work} {
		if err := os.Mkdir(p, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			_ = unix.Unmount(mnt, 0)
			return fmt.Errorf("disk: %w", err)
		}
	}
	// The overlay's root takes the upper directory's owner and mode:
	// those Nomad gave local/ (world-writable for tasks of another user).
	if err := unix.Chown(upper, int(th.Stat.Uid), int(th.Stat.Gid)); err == nil {
		err = unix.Chmod(upper, th.Stat.Mode&0o7777)
	}
	// Paths of the descriptors, not of the names: the lower layer and the
	// mount point are the directory resolved above, whatever its name.
	fd := th.ProcPath()
	opts := "lowerdir=" + fd + ",upperdir=" + upper + ",workdir=" + work
	if err := unix.Mount(overlaySourcePrefix+filepath.Base(dir), fd, "overlay", unix.MS_NOSUID|unix.MS_NODEV, opts); err != nil {
		_ = unix.Unmount(mnt, 0)
		return fmt.Errorf("mount overlay over %s: %w", target, err)
	}
	return nil
}

// loopOf names the loop device the image is attached to, if any.
func loopOf(image string) string {
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, f := range files {
		if b, err := os.ReadFile(f); err == nil && strings.TrimSpace(string(b)) == image {
			return "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(f)))
		}
	}
	return ""
}

// mountImage attaches the image to a free loop device that detaches itself
// when the file system is unmounted (autoclear), and mounts it at mnt.
func mountImage(image, mnt string) error {
	img, err := os.OpenFile(image, os.O_RDWR|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open disk image: %w", err)
	}
	defer img.Close()
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loop devices: %w", err)
	}
	defer ctl.Close()
	// Another process may take the free device between the two calls:
	// then it is busy and the next free one is asked for.
	for try := 0; ; try++ {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return fmt.Errorf("find a free loop device: %w", err)
		}
		dev := fmt.Sprintf("/dev/loop%d", n)
		lfd, err := unix.Open(dev, unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open %s: %w", dev, err)
		}
		cfg := unix.LoopConfig{Fd: uint32(img.Fd())}
		cfg.Info.Flags = unix.LO_FLAGS_AUTOCLEAR
		copy(cfg.Info.File_name[:], filepath.Base(image))
		err = unix.IoctlLoopConfigure(lfd, &cfg)
		if errors.Is(err, unix.EBUSY) && try < 16 {
			unix.Close(lfd)
			continue
		}
		if err != nil {
			unix.Close(lfd)
			return fmt.Errorf("attach disk image to %s: %w", dev, err)
		}
		// The mount holds the device from here; closing ours lets
		// autoclear detach it when the file system is unmounted (or
		// now, if the mount failed).
		err = unix.Mount(dev, mnt, "ext4", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "noinit_itable,errors=remount-ro")
		unix.Close(lfd)
		if err != nil {
			return fmt.Errorf("mount disk image: %w", err)
		}
		return nil
	}
}

// ReadDiskRecord reads the disk record in a task's state directory; nil
// when the task has no disk.
func ReadDiskRecord(dir string) *DiskRecord {
	var r DiskRecord
	if atomicfile.ReadJSON(StateDir(dir).Disk(), &r) != nil {
		return nil
	}
	return &r
}

// UnmountDisk copies what the task's local/ holds back to the host
// directory, removes the task's overlay from it and unmounts its file
// system (whose loop device then detaches itself), then removes the image.
// It must be called only when the sandbox is gone. When the copy fails, the
// image is kept (a restart uses it again; the sweep removes it with the
// task directory). Safe to call for a disk partly or wholly unmounted.
func UnmountDisk(dir string) error {
	rec := ReadDiskRecord(dir)
	if rec == nil {
		return nil
	}
	var errs []error
	// Only an overlay of this task's own: whatever else is mounted there
	// is not ours to remove.
	ours := func() bool {
		src, err := MountSource(rec.Target)
		return err == nil && src == overlaySourcePrefix+filepath.Base(dir)
	}
	unmount := func() error { return unmountOverlay(rec.Target) }
	copied := false
	if ours() {
		if err := copyBack(rec.Target, "local/", unmount); err != nil {
			errs = append(errs, err)
		} else {
			copied = true
		}
		if ours() {
			if err := unmount(); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := unmountFS(StateDir(dir).DiskMount()); err != nil {
		errs = append(errs, err)
	}
	if copied && len(errs) == 0 {
		if err := RemoveImage(rec.Image); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// unmountOverlay removes a disk overlay from target, detaching it when it
// is busy (Nomad reading it): it is freed when done.
func unmountOverlay(target string) error {
	if err := unix.Unmount(target, unix.UMOUNT_NOFOLLOW); err != nil && !errors.Is(err, unix.EINVAL) {
		if err := unix.Unmount(target, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW); err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("unmount disk overlay %s: %w", target, err)
		}
	}
	return nil
}

// unmountFS unmounts a disk's file system at mnt (its loop device then
// detaches itself); nothing mounted there is no error.
func unmountFS(mnt string) error {
	if err := unix.Unmount(mnt, unix.UMOUNT_NOFOLLOW); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		if err := unix.Unmount(mnt, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW); err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("unmount disk %s: %w", mnt, err)
		}
	}
	return nil
}

// MountSource is the source field of the topmost mount at path (empty when
// nothing is mounted there).
func MountSource(path string) (string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	src := ""
	for _, line := range strings.Split(string(b), "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if !ok || len(f) < 5 || len(g) < 2 {
			continue
		}
		if unescapeMount(f[4]) == path {
			src = g[1]
		}
	}
	return src, nil
}

// DiskFull says which of the task's limits its disk has reached, as a
// sentence for events and the audit log; "" when neither (or no disk). A
// disk counts as full with less than 1% or 256 KiB of its blocks left (the
// file system keeps a few for itself), or no inode left.
//
// Both the task's local/ and its allocation's alloc/data and alloc/tmp are
// looked at; when both are full, both are named.
func DiskFull(dir string) string {
	var full []string
	if rec := ReadDiskRecord(dir); rec != nil {
		switch fullness(StateDir(dir).DiskMount()) {
		case "inodes":
			full = append(full, fmt.Sprintf("inode limit reached: local/ holds its %d files and directories (disk_inodes)", rec.Inodes))
		case "blocks":
			full = append(full, fmt.Sprintf("disk limit reached: local/ is full at %s (disk_limit)", FormatSize(rec.LimitBytes)))
		}
	}
	if s := allocDiskFull(dir); s != "" {
		full = append(full, s)
	}
	return strings.Join(full, "; ")
}

// fullness says what the disk file system mounted at mnt has run out of:
// "inodes", "blocks" or "" (neither, or no disk mounted there).
func fullness(mnt string) string {
	var st unix.Statfs_t
	if err := unix.Statfs(mnt, &st); err != nil || st.Type != unix.EXT4_SUPER_MAGIC {
		return ""
	}
	free := int64(st.Bavail) * st.Bsize
	switch {
	case st.Ffree == 0:
		return "inodes"
	case free < max(256<<10, int64(st.Blocks)*st.Bsize/100):
		return "blocks"
	}
	return ""
}

// FormatSize writes a byte count in the largest binary unit that divides it.
func FormatSize(n int64) string {
	for _, u := range []struct {
		name string
		size int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if n >= u.size && n%u.size == 0 {
			return fmt.Sprintf("%d%s", n/u.size, u.name)
		}
	}
	return fmt.Sprintf("%dB", n)
}

// DiskImages lists the image files in dir with the task directory each was
// made for (read from its name's record), for the sweep. A record without
// its image (a start that failed before making it) is listed as the image
// it names.
func DiskImages(dir string) (map[string]string, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, e := range entries {
		name := e.Name()
		if rec, ok := strings.CutSuffix(name, ".json"); ok {
			name = rec + ".img"
		}
		if !strings.HasSuffix(name, ".img") {
			continue
		}
		var rec struct {
			TaskDir string `json:"task_dir"`
		}
		if atomicfile.ReadJSON(filepath.Join(dir, strings.TrimSuffix(name, ".img")+".json"), &rec) != nil {
			rec.TaskDir = ""
		}
		out[filepath.Join(dir, name)] = rec.TaskDir
	}
	return out, nil
}

// WriteImageOwner records next to an image which task directory it is for.
func WriteImageOwner(image, taskDir string) error {
	return atomicfile.WriteJSON(strings.TrimSuffix(image, ".img")+".json", map[string]string{"task_dir": taskDir}, 0o600)
}

// RemoveImage removes an image file and its record.
func RemoveImage(image string) error {
	err := os.Remove(image)
	if errors.Is(err, os.ErrNotExist) {
		err = nil
	}
	if rerr := os.Remove(strings.TrimSuffix(image, ".img") + ".json"); rerr != nil && !errors.Is(rerr, os.ErrNotExist) && err == nil {
		err = rerr
	}
	return err
}
