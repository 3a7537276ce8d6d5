package runtime

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

// busyboxBundle is the bundle input the tests and benchmarks run: a busybox
// rootfs at base/rootfs and task directories base/alloc, base/local and
// base/secrets (all made here), a read-only root, /tmp on tmpfs, running
// args as root in /.
func busyboxBundle(tb testing.TB, base, hostname string, args []string) *BundleConfig {
	tb.Helper()
	dirs := TaskDirs{Alloc: filepath.Join(base, "alloc"), Local: filepath.Join(base, "local"), Secrets: filepath.Join(base, "secrets")}
	for _, d := range []string{dirs.Alloc, dirs.Local, dirs.Secrets} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			tb.Fatal(err)
		}
	}
	return &BundleConfig{
		Rootfs:         testutil.MakeRootfs(tb, filepath.Join(base, "rootfs")),
		ReadonlyRootfs: true,
		Args:           args,
		Env:            []string{"PATH=" + DefaultPath},
		Cwd:            "/",
		Hostname:       hostname,
		Dirs:           dirs,
		Tmpfs:          []string{"/tmp"},
	}
}
