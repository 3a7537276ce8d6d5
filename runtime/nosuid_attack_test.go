package runtime

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/shoenig/test/must"
	"golang.org/x/sys/unix"
)

// A node's other user renames local/ (world-writable task directory) away
// between its resolve and the bind, and makes a plain directory in its
// place: the bind would land on the directory moved away, and the sandbox
// (whose pin resolves local/ again) would write the plain one, where set-id
// bits are live. The cover refuses, and leaves nothing bound.
func TestCover_NameSwappedBeforeBind(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: mounts")
	}
	root := t.TempDir()
	local, moved := filepath.Join(root, "local"), filepath.Join(root, "moved")
	must.NoError(t, os.Mkdir(local, 0o777))
	t.Cleanup(func() {
		for _, p := range []string{local, moved} {
			for unix.Unmount(p, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW) == nil {
			}
		}
	})
	h, err := resolveDir(root, "local")
	must.NoError(t, err)
	defer h.Close()
	must.NoError(t, os.Rename(local, moved))
	must.NoError(t, os.Mkdir(local, 0o777))

	err = cover(h, root, "local", func() error { return nil })
	must.ErrorContains(t, err, "replaced")
	for _, p := range []string{local, moved} {
		var stx unix.Statx_t
		must.NoError(t, unix.Statx(unix.AT_FDCWD, p, unix.AT_SYMLINK_NOFOLLOW, unix.STATX_BASIC_STATS, &stx))
		must.Zero(t, stx.Attributes&unix.STATX_ATTR_MOUNT_ROOT, must.Sprintf("%s is left bound", p))
	}
}
