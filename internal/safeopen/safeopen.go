// Package safeopen opens files in directories that untrusted code can write
// (a task's directories, its root filesystem) without following a link out
// of them, without hanging on a FIFO or a device, and without a gap between
// checking a file and using it: a path is resolved once into an O_PATH
// descriptor, its type is read from that descriptor, and only then is the
// same inode opened for I/O.
package safeopen

import (
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// Mode says how symbolic links on the way are treated.
type Mode uint64

const (
	// NoSymlinks refuses a path that has a symbolic link anywhere in it
	// and never leaves the directory (for paths that should hold none,
	// such as Nomad's log FIFOs).
	NoSymlinks = Mode(unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS)
	// InRoot resolves symbolic links as if the directory were "/" (as the
	// sandbox sees its root filesystem), so none leads out of it.
	InRoot = Mode(unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS)
)

// Handle is a resolved path: an O_PATH descriptor and what it is.
type Handle struct {
	fd   int
	name string
	Stat unix.Stat_t
}

// Resolve resolves rel beneath the directory dir (which is trusted: links
// in dir itself are followed) under mode, and describes what it found.
func Resolve(dir, rel string, mode Mode) (*Handle, error) {
	dfd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	defer unix.Close(dfd)
	fd, err := unix.Openat2(dfd, rel, &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_NOFOLLOW | unix.O_CLOEXEC,
		Resolve: uint64(mode),
	})
	for err == unix.EINTR || err == unix.EAGAIN {
		// EAGAIN: a rename raced the lookup; the kernel asks to retry.
		fd, err = unix.Openat2(dfd, rel, &unix.OpenHow{
			Flags:   unix.O_PATH | unix.O_NOFOLLOW | unix.O_CLOEXEC,
			Resolve: uint64(mode),
		})
	}
	name := dir + "/" + rel
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: name, Err: err}
	}
	h := &Handle{fd: fd, name: name}
	if err := unix.Fstat(fd, &h.Stat); err != nil {
		unix.Close(fd)
		return nil, &os.PathError{Op: "fstat", Path: name, Err: err}
	}
	return h, nil
}

// Type is the file type bits of the resolved file (unix.S_IFIFO, ...).
func (h *Handle) Type() uint32 { return h.Stat.Mode & unix.S_IFMT }

// Open opens the resolved inode itself for I/O with flags (O_CLOEXEC and
// O_NOCTTY are added), through its /proc/self/fd link: the path is not
// looked up again.
func (h *Handle) Open(flags int) (int, error) {
	fd, err := unix.Open("/proc/self/fd/"+strconv.Itoa(h.fd), flags|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: h.name, Err: err}
	}
	return fd, nil
}

// Close releases the O_PATH descriptor.
func (h *Handle) Close() error { return unix.Close(h.fd) }

// ProcPath names the resolved inode itself (its /proc/self/fd link), for
// calls that take a path, such as mount(2): the name is not looked up again.
// It is valid until Close.
func (h *Handle) ProcPath() string { return "/proc/self/fd/" + strconv.Itoa(h.fd) }

// ReadRegular opens rel beneath dir under mode for reading, only if it is a
// regular file: a FIFO, device or socket is refused before it is opened, so
// none can hang or disturb the caller.
func ReadRegular(dir, rel string, mode Mode) (*os.File, error) {
	h, err := Resolve(dir, rel, mode)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	if h.Type() != unix.S_IFREG {
		return nil, fmt.Errorf("%s is not a regular file", h.name)
	}
	fd, err := h.Open(unix.O_RDONLY | unix.O_NONBLOCK)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), h.name), nil
}
