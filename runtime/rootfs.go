package runtime

import (
	"errors"
	"fmt"
	"path"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/safeopen"
)

// ErrEmptyExecutable says that the program a task would run, or its shell, is
// an empty file in the root filesystem. Nomad's artifact fetcher makes such
// files of every symbolic link in an archive it unpacks, so a root
// filesystem delivered that way fails with a bare "exec format error".
var ErrEmptyExecutable = errors.New(`is an empty file: Nomad's artifact fetcher turns every symbolic link in an archive into an empty file; deliver the root filesystem as an image instead (image = "oci-archive:local/<file>.tar" from an artifact with options { archive = "false" }, or "oci-layout:local/<dir>")`)

// CheckCommand looks, inside rootfs as the sandbox will see it (symbolic
// links resolved within it, never out of it), for the program argv0 (an
// absolute path, or a name searched in the PATH of env) and for /bin/sh, and
// fails with ErrEmptyExecutable when either is an empty regular file. A
// program it cannot find is left for the sandbox to report.
func CheckCommand(rootfs, argv0 string, env []string) error {
	var candidates []string
	switch {
	case strings.HasPrefix(argv0, "/"):
		candidates = []string{argv0}
	case strings.Contains(argv0, "/"):
		// Relative to the working directory: the sandbox resolves it.
	case argv0 != "":
		searchPath := DefaultPath
		for _, kv := range env {
			if v, ok := strings.CutPrefix(kv, "PATH="); ok {
				searchPath = v
			}
		}
		for _, dir := range strings.Split(searchPath, ":") {
			if strings.HasPrefix(dir, "/") {
				candidates = append(candidates, path.Join(dir, argv0))
			}
		}
	}
	for _, c := range candidates {
		empty, ok := emptyRegular(rootfs, c)
		if empty {
			return fmt.Errorf("rootfs: the command %s (%s) %w", argv0, c, ErrEmptyExecutable)
		}
		if ok {
			break // the first match on PATH is what runs
		}
	}
	if empty, _ := emptyRegular(rootfs, "/bin/sh"); empty {
		return fmt.Errorf("rootfs: /bin/sh %w", ErrEmptyExecutable)
	}
	return nil
}

// emptyRegular reports whether name, inside rootfs, is an empty regular
// file (empty), and whether it is there at all (ok).
func emptyRegular(rootfs, name string) (empty, ok bool) {
	h, err := safeopen.Resolve(rootfs, strings.TrimPrefix(name, "/"), safeopen.InRoot)
	if err != nil {
		return false, false
	}
	defer h.Close()
	return h.Type() == unix.S_IFREG && h.Stat.Size == 0, true
}

// CheckMountPoints fails unless every destination in dests is already there
// in rootfs (resolved inside it, never out of it). runsc makes a missing
// mount point in the root filesystem's host directory itself, so a job
// choosing volume destinations on a root filesystem that other tasks share
// (a host rootfs, an image in the cache) could otherwise create directories
// and files of its choice in it.
func CheckMountPoints(rootfs string, dests []string) error {
	for _, d := range dests {
		h, err := safeopen.Resolve(rootfs, strings.TrimPrefix(path.Clean("/"+d), "/"), safeopen.InRoot)
		if err != nil {
			return fmt.Errorf("volume_mount destination %s is not in the root filesystem, which other tasks share, and runsc would create it there: use a destination the root filesystem has (or add it to the image), or a rootfs of the task's own", d)
		}
		h.Close()
	}
	return nil
}
