package runtime

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/atomicfile"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/safeopen"
)

// PinPaths pins every host path of spec (its root and the sources of its bind
// mounts) that lies beneath root, the allocation directory. Nomad makes the
// task directory and the shared alloc directory world-writable, so the node's
// other users can replace local/, alloc/logs, a token in secrets/ or a
// rootfs under local/ with a link to a host directory, before the start or
// between the driver's checks and runsc's own open of the path. Each such
// path is therefore resolved beneath root now, following no symbolic link,
// and the inode found is bound, by its descriptor, onto a directory or file
// in dir's StateDir.Pins (root's alone); the spec then names that instead, so runsc
// opens exactly what was checked. A path that goes through a link, or is
// neither a directory nor a regular file, is refused. The pins are needed
// only until runsc has started the sandbox (its gofer has bound them into its
// own mount namespace by then): UnpinPaths removes them, and must run before
// dir is removed, or the removal would go down into the task's directories.
// On error, what was pinned is left for UnpinPaths.
func PinPaths(spec *specs.Spec, root, dir string) error {
	pins := StateDir(dir).Pins()
	if err := os.Mkdir(pins, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("pin task paths: %w", err)
	}
	n := 0
	pin := func(p string) (string, error) {
		rel, err := filepath.Rel(root, p)
		if err != nil || !filepath.IsLocal(rel) {
			return p, nil
		}
		h, err := safeopen.Resolve(root, rel, safeopen.NoSymlinks)
		if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.EXDEV) {
			return "", fmt.Errorf("%s goes through a symbolic link, which someone other than Nomad put there: the task directory is refused", p)
		}
		if err != nil {
			return "", err
		}
		defer h.Close()
		if h.Type() == unix.S_IFLNK {
			return "", fmt.Errorf("%s is a symbolic link, which someone other than Nomad put there: the task directory is refused", p)
		}
		target := filepath.Join(pins, strconv.Itoa(n))
		n++
		switch h.Type() {
		case unix.S_IFDIR:
			err = os.Mkdir(target, 0o700)
		case unix.S_IFREG:
			var f *os.File
			if f, err = os.OpenFile(target, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600); err == nil {
				err = f.Close()
			}
		default:
			return "", fmt.Errorf("%s is neither a directory nor a regular file (mode %#o): refused", p, h.Stat.Mode)
		}
		if err != nil {
			return "", fmt.Errorf("pin %s: %w", p, err)
		}
		// Recursive, as runsc's own binds are (rbind): what is mounted
		// inside the path is seen as before.
		if err := unix.Mount(h.ProcPath(), target, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return "", fmt.Errorf("pin %s: bind: %w", p, err)
		}
		// Nothing propagates to or from the pin: its removal touches
		// neither the task's directory nor runsc's copy.
		if err := unix.Mount("", target, "", unix.MS_PRIVATE|unix.MS_REC, ""); err != nil {
			return "", fmt.Errorf("pin %s: %w", p, err)
		}
		return target, nil
	}
	var err error
	if spec.Root != nil {
		if spec.Root.Path, err = pin(spec.Root.Path); err != nil {
			return fmt.Errorf("rootfs: %w", err)
		}
	}
	for i := range spec.Mounts {
		m := &spec.Mounts[i]
		if m.Type != "bind" {
			continue
		}
		if m.Source, err = pin(m.Source); err != nil {
			return fmt.Errorf("mount %s: %w", m.Destination, err)
		}
	}
	return nil
}

// UnpinPaths undoes PinPaths for the task state directory dir (and is a
// no-op where it pinned nothing). The state directory must not be removed
// while a pin is mounted: removing it would go down into the task's own
// directories.
func UnpinPaths(dir string) error {
	pins := StateDir(dir).Pins()
	entries, err := os.ReadDir(pins)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("unpin task paths: %w", err)
	}
	var errs []error
	for _, en := range entries {
		p := filepath.Join(pins, en.Name())
		if err := unix.Unmount(p, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("unpin %s: %w", p, err))
			continue
		}
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("unpin %s: %w", p, err))
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if err := os.Remove(pins); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("unpin task paths: %w", err)
	}
	return nil
}

// WritePinnedBundle writes config.json for c into bundle, which must exist,
// with its paths beneath root pinned in the task state directory dir (see
// PinPaths).
func WritePinnedBundle(bundle string, c *BundleConfig, root, dir string) error {
	spec := c.Spec()
	if err := PinPaths(spec, root, dir); err != nil {
		return err
	}
	return atomicfile.WriteJSON(bundleSpec(bundle), spec, 0o600)
}
