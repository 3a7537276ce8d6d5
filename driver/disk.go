package driver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

// minDiskLimit is the smallest disk_limit: ext4 needs room for its journal
// and tables before the task gets any.
const minDiskLimit = 8 << 20

// minDiskInodes is the fewest inodes a task's disk is made with (ext4
// needs some for itself).
const minDiskInodes = 64

// parseDiskLimit parses a plugin disk setting, where "0" or "" means none.
func parseDiskLimit(field, s string) (int64, error) {
	if s == "" || s == "0" {
		return 0, nil
	}
	return runtime.ParseSize(field, s)
}

// parseDisk parses and checks the plugin's disk settings; 0 bytes is no
// limit (default_disk_limit) or no ceiling (max_disk_limit).
func (c *PluginConfig) parseDisk() (def, max int64, err error) {
	if def, err = parseDiskLimit("default_disk_limit", c.DefaultDiskLimit); err != nil {
		return 0, 0, err
	}
	if max, err = parseDiskLimit("max_disk_limit", c.MaxDiskLimit); err != nil {
		return 0, 0, err
	}
	switch {
	case def > 0 && def < minDiskLimit:
		return 0, 0, fmt.Errorf("default_disk_limit %q is below the smallest disk of %s: raise it, or write \"0\" for no limit", c.DefaultDiskLimit, runtime.FormatSize(minDiskLimit))
	case max > 0 && def > max:
		return 0, 0, fmt.Errorf("default_disk_limit %s is above max_disk_limit %s", c.DefaultDiskLimit, c.MaxDiskLimit)
	case c.DefaultDiskInodes < 0 || c.MaxDiskInodes < 0:
		return 0, 0, errors.New("default_disk_inodes and max_disk_inodes must not be negative (0: the default)")
	case c.MaxDiskInodes > 0 && c.DefaultDiskInodes > c.MaxDiskInodes:
		return 0, 0, fmt.Errorf("default_disk_inodes %d is above max_disk_inodes %d", c.DefaultDiskInodes, c.MaxDiskInodes)
	case c.DiskDir != "" && !filepath.IsAbs(c.DiskDir):
		return 0, 0, fmt.Errorf("disk_dir %q must be an absolute path (a directory on the node's data disk, not tmpfs)", c.DiskDir)
	}
	return def, max, nil
}

// defaultDiskDir holds the disk images when disk_dir is unset: the node's
// data disk, never /run (tmpfs, that is memory).
const defaultDiskDir = "/var/lib/nomad-sandbox/disks"

// diskDir is where the task's disk images live.
func (c *PluginConfig) diskDir() string {
	if c.DiskDir == "" {
		return defaultDiskDir
	}
	return c.DiskDir
}

// diskLimits sets the task's disk limits from disk_limit and disk_inodes,
// the plugin's defaults and its ceilings.
func (tc *TaskConfig) diskLimits(s *Settings, lim *taskLimits) error {
	max := s.maxDiskBytes
	size := s.defaultDiskBytes
	if tc.DiskLimit != "" {
		var err error
		if size, err = runtime.ParseSize("disk_limit", tc.DiskLimit); err != nil {
			return err
		}
		if size < minDiskLimit {
			return fmt.Errorf("disk_limit %q is below the smallest disk of %s: ask for more", tc.DiskLimit, runtime.FormatSize(minDiskLimit))
		}
		if max > 0 && size > max {
			return fmt.Errorf("disk_limit %s is above this node's ceiling of %s (the plugin's max_disk_limit): ask for %s or less", tc.DiskLimit, runtime.FormatSize(max), runtime.FormatSize(max))
		}
	}
	switch {
	case tc.DiskInodes < 0:
		return fmt.Errorf("disk_inodes %d must be positive", tc.DiskInodes)
	case tc.DiskInodes > 0 && size == 0:
		return errors.New("disk_inodes needs a disk_limit: this node sets no default_disk_limit, so set disk_limit too")
	case size == 0:
		return nil
	}
	inodes := tc.DiskInodes
	if inodes == 0 {
		inodes = s.DefaultDiskInodes
		if inodes == 0 {
			inodes = runtime.DefaultInodes(size)
		}
		// A default never refuses a task that asked for nothing.
		inodes = min(inodes, runtime.MaxInodes(size))
		if s.MaxDiskInodes > 0 {
			inodes = min(inodes, s.MaxDiskInodes)
		}
	}
	if s.MaxDiskInodes > 0 && inodes > s.MaxDiskInodes {
		return fmt.Errorf("disk_inodes %d is above this node's ceiling of %d (the plugin's max_disk_inodes): ask for %d or less", inodes, s.MaxDiskInodes, s.MaxDiskInodes)
	}
	if m := runtime.MaxInodes(size); inodes > m {
		return fmt.Errorf("disk_inodes %d is more than a disk of %s holds (at most %d): raise disk_limit or lower disk_inodes", inodes, runtime.FormatSize(size), m)
	}
	lim.diskBytes, lim.diskInodes = size, inodes
	return nil
}

// diskImage is where a task's disk image lives: named after the allocation
// and the task, so that a restart of the task finds what it wrote before.
func (d *Driver) diskImage(cfg *drivers.TaskConfig) string {
	sum := sha256.Sum256([]byte(cfg.AllocID + "/" + cfg.Name))
	return filepath.Join(d.config.diskDir(), fmt.Sprintf("%s-%s-%s.img", sanitize(cfg.AllocID, 36), sanitize(cfg.Name, 40), hex.EncodeToString(sum[:6])))
}

// mountDisk gives the task's local/ its disk (see runtime.Disk) in the
// state directory dir, when it has a limit, and makes the task a holder of
// its allocation's disk for alloc/data and alloc/tmp (see
// runtime.JoinAllocDisk), which a task without a limit joins only when it
// exists.
func (d *Driver) mountDisk(ctx context.Context, cfg *drivers.TaskConfig, dir string, lim taskLimits) error {
	if lim.diskBytes > 0 {
		if err := d.mountLocalDisk(ctx, cfg, dir, lim); err != nil {
			return err
		}
	} else if err := runtime.CoverTaskDirs(dir, realPath(cfg.TaskDir().Dir), filepath.Base(cfg.TaskDir().LocalDir)); err != nil {
		// No overlay keeps local/ nosuid: a bind does (secrets/ is
		// Nomad's noexec tmpfs).
		return fmt.Errorf("bind local/ nosuid: %w", err)
	}
	notice, err := runtime.JoinAllocDisk(ctx, dir, runtime.AllocDisk{
		Dir:        d.config.diskDir(),
		AllocID:    sanitize(cfg.AllocID, 36),
		AllocDir:   realPath(cfg.AllocDir),
		LimitBytes: lim.diskBytes,
		Inodes:     lim.diskInodes,
	})
	if err != nil {
		return fmt.Errorf("allocation disk: %w", err)
	}
	if notice != "" {
		d.emitEvent(cfg, "Allocation disk: "+notice, nil)
	}
	return nil
}

// mountLocalDisk gives the task's local/ its disk. The image is recorded
// with its task directory first, so that the sweep removes it once Nomad
// removes the allocation.
func (d *Driver) mountLocalDisk(ctx context.Context, cfg *drivers.TaskConfig, dir string, lim taskLimits) error {
	td := cfg.TaskDir()
	// Everything in local/ counts: what Nomad put there and what earlier
	// runs of the task wrote (copied back when they ended), so restarts
	// cannot add up to more than the limit.
	used, entries, err := runtime.DirUsage(td.LocalDir)
	if err != nil {
		return fmt.Errorf("measure local/: %w", err)
	}
	disk := &runtime.Disk{Image: d.diskImage(cfg), SizeBytes: lim.diskBytes - used, Inodes: lim.diskInodes - entries, LimitBytes: lim.diskBytes}
	if disk.SizeBytes < minDiskLimit || disk.Inodes < minDiskInodes {
		return fmt.Errorf("local/ holds %s in %d files already (artifacts, templates, what earlier runs wrote), too much of the task's %s and %d inodes: raise disk_limit (or disk_inodes)", runtime.FormatSize(used), entries, runtime.FormatSize(lim.diskBytes), lim.diskInodes)
	}
	disk.SizeBytes -= disk.SizeBytes % 4096
	disk.Inodes = min(disk.Inodes, runtime.MaxInodes(disk.SizeBytes))
	if err := os.MkdirAll(d.config.diskDir(), 0o700); err != nil {
		return fmt.Errorf("disk_dir: %w", err)
	}
	if err := runtime.WriteImageOwner(disk.Image, realPath(td.Dir)); err != nil {
		return err
	}
	if _, err := disk.Prepare(ctx); err != nil {
		return err
	}
	return disk.Mount(dir, realPath(td.Dir), filepath.Base(td.LocalDir))
}

// sweepDisks removes the disk images of task directories Nomad removed (an
// image is kept while its task directory exists: a restart reuses it).
func (d *Driver) sweepDisks() {
	images, err := runtime.DiskImages(d.config.diskDir())
	if err != nil {
		d.logger.Warn("cannot read disk_dir", "path", d.config.diskDir(), "error", err)
		return
	}
	for image, taskDir := range images {
		if taskDir != "" {
			if _, err := os.Lstat(taskDir); !errors.Is(err, os.ErrNotExist) {
				continue
			}
		}
		if err := runtime.RemoveImage(image); err != nil {
			d.logger.Warn("failed to remove disk image", "path", image, "error", err)
			continue
		}
		d.logger.Info("removed disk image", "path", image, "reason", "Nomad removed the task directory")
	}
	removed, err := runtime.SweepAllocDisks(d.config.diskDir(), d.config.StateDir)
	for _, alloc := range removed {
		d.logger.Info("removed allocation disk", "alloc_id", alloc, "reason", "no task of the allocation holds it")
	}
	if err != nil {
		d.logger.Warn("failed to remove allocation disks", "error", err)
	}
}
