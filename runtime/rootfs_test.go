package runtime

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/shoenig/test/must"
)

// A root filesystem as Nomad's artifact fetcher delivers it: the links of the
// archive turned into empty files.
func TestCheckCommand_EmptyFiles(t *testing.T) {
	root := t.TempDir()
	mk := func(rel string, data string) {
		p := filepath.Join(root, rel)
		must.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		must.NoError(t, os.WriteFile(p, []byte(data), 0o755))
	}
	mk("bin/busybox", "\x7fELF...")
	mk("bin/echo", "")
	mk("usr/bin/env", "")
	must.NoError(t, os.Symlink("busybox", filepath.Join(root, "bin/true")))
	// A link that points out of the root is resolved inside it, as the
	// sandbox would: the empty host file it names is never looked at.
	outside := filepath.Join(t.TempDir(), "empty")
	must.NoError(t, os.WriteFile(outside, nil, 0o755))
	must.NoError(t, os.Symlink(outside, filepath.Join(root, "bin/escape")))

	err := CheckCommand(root, "/bin/echo", nil)
	must.True(t, errors.Is(err, ErrEmptyExecutable))
	must.ErrorContains(t, err, "/bin/echo")
	must.ErrorContains(t, err, "oci-archive:")

	err = CheckCommand(root, "env", []string{"PATH=/usr/bin:/bin"})
	must.True(t, errors.Is(err, ErrEmptyExecutable), must.Sprint(err))
	must.ErrorContains(t, err, "/usr/bin/env")

	must.NoError(t, CheckCommand(root, "true", []string{"PATH=/bin"}))
	must.NoError(t, CheckCommand(root, "/bin/busybox", nil))
	must.NoError(t, CheckCommand(root, "/bin/escape", nil))
	must.NoError(t, CheckCommand(root, "missing", nil), must.Sprint("a missing program is the sandbox's to report"))

	// The shell is checked whatever the command.
	mk("bin/sh", "")
	err = CheckCommand(root, "/bin/busybox", nil)
	must.True(t, errors.Is(err, ErrEmptyExecutable))
	must.ErrorContains(t, err, "/bin/sh")
}
