package netpolicy

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/cleanup"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/netnsrun"
)

// Named network namespaces are files bind-mounted from /proc/<tid>/ns/net,
// the layout `ip netns` uses, so the tools work on them.

// prepareNetnsDir makes dir a shared mount point, as `ip netns add` does, so
// that the namespaces mounted in it appear in mount namespaces made later.
func prepareNetnsDir(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("netns dir: %w", err)
	}
	err := unix.Mount("", dir, "none", unix.MS_SHARED|unix.MS_REC, "")
	if errors.Is(err, unix.EINVAL) {
		// Not a mount point yet.
		if err = unix.Mount(dir, dir, "none", unix.MS_BIND|unix.MS_REC, ""); err == nil {
			err = unix.Mount("", dir, "none", unix.MS_SHARED|unix.MS_REC, "")
		}
	}
	if err != nil {
		return fmt.Errorf("netns dir %s: %w", dir, err)
	}
	return nil
}

// createNetns makes a new network namespace, mounts it at path (which must
// not exist) and runs setup inside it. On error nothing is left at path.
func createNetns(path string, setup func() error) error {
	if err := prepareNetnsDir(filepath.Dir(path)); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0)
	if err != nil {
		return fmt.Errorf("create netns: %w", err)
	}
	f.Close()
	cu := cleanup.Make(func() { _ = deleteNetns(path) })
	defer cu.Clean()
	err = netnsrun.InNew(func() error {
		if err := unix.Mount("/proc/thread-self/ns/net", path, "none", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("create netns: mount: %w", err)
		}
		if setup == nil {
			return nil
		}
		return setup()
	})
	if err == nil {
		cu.Release()
	}
	return err
}

// deleteNetns unmounts and removes a namespace mounted at path; a missing
// one is not an error. The namespace itself lives on while a process is in
// it.
func deleteNetns(path string) error {
	err := unix.Unmount(path, unix.MNT_DETACH)
	if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount netns %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove netns %s: %w", path, err)
	}
	return nil
}

// writeSysctl writes a /proc/sys file; path is relative to /proc/sys. Net
// sysctls act on the namespace of the calling thread.
func writeSysctl(path, value string) error {
	p := filepath.Join("/proc/sys", path)
	if err := os.WriteFile(p, []byte(value), 0o644); err != nil {
		return fmt.Errorf("sysctl %s=%s: %w", path, value, err)
	}
	return nil
}

func readSysctl(path string) (string, error) {
	b, err := os.ReadFile(filepath.Join("/proc/sys", path))
	if err != nil {
		return "", err
	}
	return string(trimNL(b)), nil
}

func trimNL(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return b
}
