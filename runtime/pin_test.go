package runtime

import (
	"os"
	"path/filepath"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/shoenig/test/must"
	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

// PinPaths binds what it resolved, refuses links and special files on the
// way, leaves paths outside root alone, and UnpinPaths leaves nothing.
func TestPinPaths(t *testing.T) {
	testutil.RequireRoot(t)
	root, state, host := t.TempDir(), t.TempDir(), t.TempDir()
	must.NoError(t, os.MkdirAll(filepath.Join(root, "task", "local"), 0o777))
	must.NoError(t, os.WriteFile(filepath.Join(root, "task", "local", "mark"), []byte("local"), 0o644))
	must.NoError(t, os.WriteFile(filepath.Join(root, "token"), []byte("token"), 0o600))
	must.NoError(t, os.WriteFile(filepath.Join(host, "mark"), []byte("host"), 0o644))
	defer func() { must.NoError(t, UnpinPaths(state)) }()

	spec := &specs.Spec{
		Root: &specs.Root{Path: filepath.Join(root, "task", "local")},
		Mounts: []specs.Mount{
			{Destination: "/local", Type: "bind", Source: filepath.Join(root, "task", "local")},
			{Destination: "/secrets/token", Type: "bind", Source: filepath.Join(root, "token")},
			{Destination: "/etc/hosts", Type: "bind", Source: filepath.Join(host, "mark")},
			{Destination: "/tmp", Type: "tmpfs", Source: filepath.Join(root, "task")},
		},
	}
	must.NoError(t, PinPaths(spec, root, state))
	pins := StateDir(state).Pins()
	for _, p := range []string{spec.Root.Path, spec.Mounts[0].Source, spec.Mounts[1].Source} {
		must.StrHasPrefix(t, pins+"/", p)
	}
	must.Eq(t, filepath.Join(host, "mark"), spec.Mounts[2].Source)
	must.Eq(t, filepath.Join(root, "task"), spec.Mounts[3].Source)
	// The pin is what was resolved, whatever the name now leads to.
	must.NoError(t, os.Rename(filepath.Join(root, "task", "local"), filepath.Join(root, "task", "aside")))
	must.NoError(t, os.Symlink(host, filepath.Join(root, "task", "local")))
	b, err := os.ReadFile(filepath.Join(spec.Mounts[0].Source, "mark"))
	must.NoError(t, err)
	must.Eq(t, "local", string(b))

	for name, setup := range map[string]func(p string) error{
		"link":      func(p string) error { return nil }, // task/local is a link now
		"component": func(p string) error { return os.Symlink(host, filepath.Join(root, "via")) },
		"fifo":      func(p string) error { return unix.Mkfifo(filepath.Join(root, "fifo"), 0o600) },
	} {
		src := map[string]string{
			"link":      filepath.Join(root, "task", "local"),
			"component": filepath.Join(root, "via", "mark"),
			"fifo":      filepath.Join(root, "fifo"),
		}[name]
		must.NoError(t, setup(src))
		err := PinPaths(&specs.Spec{Mounts: []specs.Mount{{Destination: "/x", Type: "bind", Source: src}}}, root, state)
		must.Error(t, err, must.Sprint(name))
	}

	must.NoError(t, UnpinPaths(state))
	_, err = os.Lstat(pins)
	must.True(t, os.IsNotExist(err))
	ms, err := MountsUnder(state)
	must.NoError(t, err)
	must.SliceEmpty(t, ms)
	// Removing the state directory now cannot reach the task's files.
	must.NoError(t, os.RemoveAll(state))
	b, err = os.ReadFile(filepath.Join(root, "task", "aside", "mark"))
	must.NoError(t, err)
	must.Eq(t, "local", string(b))
}
