package driver

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	goruntime "runtime"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

// treeDigest lists every name, type, mode, link target and content digest
// under dir: any change a task could make to a root filesystem changes it.
func treeDigest(t *testing.T, dir string) string {
	t.Helper()
	var lines []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		line := fmt.Sprintf("%s %v", rel, fi.Mode())
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			line += " -> " + target
		case fi.Mode().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(b)
			line += " " + hex.EncodeToString(sum[:])
		}
		lines = append(lines, line)
		return nil
	})
	must.NoError(t, err)
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// rewriteScript tries to change the root filesystem through the root itself
// and through every other path it is visible under (alias), prints WROTE
// for each attempt that worked, and checks that the writable mount around
// the alias still takes writes (so the test does not pass because
// everything is read-only).
func rewriteScript(alias, writable string) string {
	return fmt.Sprintf(`exec > /local/result 2>&1
try() { if sh -c "$1" 2>/dev/null; then echo "WROTE: $1"; else echo "refused: $1"; fi; }
try 'echo x >> /etc/passwd'
try 'echo x >> %[1]s/etc/passwd'
try 'echo x >> /alloc/..%[1]s/etc/passwd'
try 'echo x > %[1]s/etc/new'
try 'rm %[1]s/bin/ls'
try 'ln -sf /tmp/evil %[1]s/bin/cat'
try 'chmod 777 %[1]s/etc/group'
try 'touch %[1]s/etc/group && [ %[1]s/etc/group -nt %[1]s/etc/passwd ]'
try 'mv %[1]s %[2]s/moved-aside'
try 'mv %[1]s/etc %[2]s/etc-aside'
try 'ln %[1]s/etc/passwd %[2]s/hardlink && echo x >> %[2]s/hardlink'
try 'echo x > %[2]s/f && ln %[2]s/f %[1]s/etc/f'
echo x > %[2]s/probe && echo "writable mount still writable"
echo done
`, alias, writable)
}

// A rootfs inside the task directory, or a host rootfs that a writable
// volume also shows, is read-only at every path the sandbox sees it under,
// and a restarted task starts from the same bytes.
func TestHostile_RootfsReadOnlyEverywhere(t *testing.T) {
	e := newTestEnv(t, nil)

	check := func(t *testing.T, e *testEnv, cfg *drivers.TaskConfig, rootfs string) {
		// runsc makes the mount points of the binds it is given, empty,
		// where the rootfs lacks them; made here, they are part of what
		// must not change.
		for _, d := range []string{"alloc", "local", "secrets", "vol"} {
			must.NoError(t, os.MkdirAll(filepath.Join(rootfs, d), 0o755))
		}
		for _, f := range []string{"etc/hosts", "etc/resolv.conf"} {
			must.NoError(t, os.WriteFile(filepath.Join(rootfs, f), nil, 0o644))
		}
		before := treeDigest(t, rootfs)
		for run := 1; run <= 2; run++ {
			res := e.run(cfg)
			// Read from the task's own file: the harness's log
			// collector ends with the first run.
			b, _ := os.ReadFile(filepath.Join(cfg.TaskDir().LocalDir, "result"))
			out := string(b)
			must.Eq(t, 0, res.ExitCode, must.Sprint(out, readLog(cfg, "stderr")))
			must.StrContains(t, out, "done")
			must.StrNotContains(t, out, "WROTE", must.Sprintf("run %d", run))
			must.StrContains(t, out, "writable mount still writable")
			must.Eq(t, before, treeDigest(t, rootfs), must.Sprintf("run %d changed the root filesystem:\n%s", run, out))
		}
	}

	t.Run("local/rootfs", func(t *testing.T) {
		cfg, cleanup := e.task(t, "rootfs-local", readonlyDefault(TaskConfig{
			Rootfs:  "local/rootfs",
			Command: "/bin/sh",
			Args:    []string{"-c", rewriteScript("/local/rootfs", "/local")},
		}))
		defer cleanup()
		rootfs := testutil.MakeRootfs(t, filepath.Join(cfg.TaskDir().LocalDir, "rootfs"))
		check(t, e, cfg, rootfs)
	})

	t.Run("local/rootfs under a disk limit", func(t *testing.T) {
		// local/ is then an overlay whose writes are copied back into
		// the task directory when the task ends.
		ed := newTestEnv(t, func(pc *PluginConfig) { pc.DefaultDiskLimit = "256MiB" })
		cfg, cleanup := ed.task(t, "rootfs-disk", readonlyDefault(TaskConfig{
			Rootfs:  "local/rootfs",
			Command: "/bin/sh",
			Args:    []string{"-c", rewriteScript("/local/rootfs", "/local")},
		}))
		defer cleanup()
		rootfs := testutil.MakeRootfs(t, filepath.Join(cfg.TaskDir().LocalDir, "rootfs"))
		check(t, ed, cfg, rootfs)
	})

	t.Run("host rootfs in a writable volume", func(t *testing.T) {
		cfg, cleanup := e.task(t, "rootfs-vol", readonlyDefault(TaskConfig{
			Rootfs:  e.rootfs,
			Command: "/bin/sh",
			Args:    []string{"-c", rewriteScript("/vol/busybox", "/vol")},
		}))
		defer cleanup()
		cfg.Mounts = []*drivers.MountConfig{{TaskPath: "/vol", HostPath: filepath.Dir(e.rootfs)}}
		check(t, e, cfg, e.rootfs)
	})
}

// A rootfs path in the task directory that goes through a symbolic link is
// refused: the task could repoint the link for its next start.
func TestHostile_RootfsThroughSymlinkRefused(t *testing.T) {
	e := newTestEnv(t, nil)
	cfg, cleanup := e.task(t, "rootfs-link", readonlyDefault(TaskConfig{Rootfs: "local/rootfs", Command: "/bin/true"}))
	defer cleanup()
	testutil.MakeRootfs(t, filepath.Join(cfg.TaskDir().LocalDir, "real"))
	must.NoError(t, os.Symlink("real", filepath.Join(cfg.TaskDir().LocalDir, "rootfs")))
	_, _, err := e.harness.StartTask(cfg)
	must.Error(t, err)
	must.StrContains(t, err.Error(), "symbolic link")
}

// Nothing in the sandbox can create, remove, rename or replace anything in
// alloc/logs, while the logs stay readable there.
func TestHostile_AllocLogsReadOnly(t *testing.T) {
	e := newTestEnv(t, nil)
	script := `
echo first-line
try() { if sh -c "$1" 2>/dev/null; then echo "WROTE: $1"; else echo "refused: $1"; fi; }
f=/alloc/logs/.logs.stdout.fifo
try "rm $f"
try "mv $f /alloc/data/x"
try "ln -s /etc/passwd /alloc/logs/new"
try "echo x > /alloc/logs/new-file"
try "echo x > /alloc/logs/logs.stderr.0"
try "mv /alloc/logs /alloc/data/logs-aside"
try "rm -rf /alloc/logs"
n=0; until grep -q first-line /alloc/logs/logs.stdout.0 || [ $n -ge 400 ]; do sleep 0.05; n=$((n+1)); done
grep -q first-line /alloc/logs/logs.stdout.0 && echo "log readable"
echo done
`
	cfg, cleanup := e.task(t, "logs", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", script}}))
	defer cleanup()
	logDir := cfg.TaskDir().LogDir
	res := e.run(cfg)
	out := waitLog(t, cfg, "stdout", has("done"))
	must.Eq(t, 0, res.ExitCode, must.Sprint(out, readLog(cfg, "stderr")))
	must.StrNotContains(t, out, "WROTE")
	must.StrContains(t, out, "log readable")
	fi, err := os.Lstat(filepath.Join(logDir, ".logs.stdout.fifo"))
	must.NoError(t, err)
	must.True(t, fi.Mode()&fs.ModeNamedPipe != 0, must.Sprintf("the stdout FIFO is now %v", fi.Mode()))
	_, err = os.Lstat(filepath.Join(logDir, "new"))
	must.True(t, os.IsNotExist(err))
}

// ExecTask keeps at most ExecOutputLimit of each stream of a command that
// prints far more, and the plugin allocates nowhere near what was printed.
func TestHostile_ExecOutputBounded(t *testing.T) {
	e := newTestEnv(t, nil)
	cfg, cleanup := e.task(t, "exec-flood", readonlyDefault(TaskConfig{Command: "/bin/sleep", Args: []string{"300"}}))
	defer cleanup()
	_, _, err := e.harness.StartTask(cfg)
	must.NoError(t, err)
	defer func() { must.NoError(t, e.harness.DestroyTask(cfg.ID, true)) }()

	const printed = 128 << 20 // per stream
	var before, after goruntime.MemStats
	goruntime.GC()
	goruntime.ReadMemStats(&before)
	// Called on the driver itself, as the plugin process serves it (the
	// harness's gRPC hop would cap a large reply on its own).
	res, err := e.driver.ExecTask(cfg.ID, []string{"/bin/sh", "-c",
		fmt.Sprintf("head -c %d /dev/zero >&2 & head -c %d /dev/zero; wait", printed, printed)}, 2*time.Minute)
	goruntime.ReadMemStats(&after)
	allocated := after.TotalAlloc - before.TotalAlloc
	t.Logf("printed %d MiB on each stream; the plugin allocated %.1f MiB meanwhile", printed>>20, float64(allocated)/(1<<20))
	must.NoError(t, err)
	must.Eq(t, 0, res.ExitResult.ExitCode)
	must.Eq(t, ExecOutputLimit, len(res.Stdout))
	must.Eq(t, ExecOutputLimit, len(res.Stderr))
	must.Less(t, uint64(32<<20), allocated, must.Sprint("the plugin must not hold what an exec prints"))
}

// A NUL byte anywhere the job sets a string, or a control character in a
// path, is refused naming the field, before any state, cgroup or sandbox
// exists.
func TestHostile_BadBytesRefusedBeforeAnything(t *testing.T) {
	e := newTestEnv(t, nil)
	cases := []struct {
		name   string
		tc     TaskConfig
		mutate func(*drivers.TaskConfig)
		field  string
	}{
		{"args", TaskConfig{Command: "/bin/echo", Args: []string{"ok", "a\x00b"}}, nil, "args[1]"},
		{"command", TaskConfig{Command: "/bin/ec\x00ho"}, nil, "command"},
		{"entrypoint", TaskConfig{Entrypoint: []string{"/bin/sh\x00"}}, nil, "entrypoint[0]"},
		{"work_dir", TaskConfig{Command: "/bin/true", WorkDir: "/tmp\x00x"}, nil, "work_dir"},
		{"work_dir control", TaskConfig{Command: "/bin/true", WorkDir: "/tmp\nx"}, nil, "work_dir"},
		{"tmpfs", TaskConfig{Command: "/bin/true", Tmpfs: []string{"/scratch\x00"}}, nil, "tmpfs[0]"},
		{"hostname", TaskConfig{Command: "/bin/true", Hostname: "a\x00b"}, nil, "hostname"},
		{"rootfs", TaskConfig{Command: "/bin/true", Rootfs: "local/root\x00fs"}, nil, "rootfs"},
		{"env value", TaskConfig{Command: "/bin/true"}, func(c *drivers.TaskConfig) { c.Env = map[string]string{"GOOD": "x", "BAD": "a\x00b"} }, `env "BAD"`},
		{"env name", TaskConfig{Command: "/bin/true"}, func(c *drivers.TaskConfig) { c.Env = map[string]string{"B\x00AD": "x"} }, "env name"},
		{"user", TaskConfig{Command: "/bin/true"}, func(c *drivers.TaskConfig) { c.User = "app\x00" }, "user"},
		{"volume destination", TaskConfig{Command: "/bin/true"}, func(c *drivers.TaskConfig) {
			c.Mounts = []*drivers.MountConfig{{TaskPath: "/data\x00", HostPath: t.TempDir()}}
		}, "volume_mount destination"},
		{"volume destination control", TaskConfig{Command: "/bin/true"}, func(c *drivers.TaskConfig) {
			c.Mounts = []*drivers.MountConfig{{TaskPath: "/data\x1b[2J", HostPath: t.TempDir()}}
		}, "volume_mount destination"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg, cleanup := e.taskWithLogs(t, "bad-bytes", readonlyDefault(tc.tc), false)
			defer cleanup()
			if tc.mutate != nil {
				tc.mutate(cfg)
			}
			_, _, err := e.harness.StartTask(cfg)
			must.Error(t, err)
			must.StrContains(t, err.Error(), tc.field)
			entries, err := os.ReadDir(e.config.StateDir)
			if err == nil {
				must.SliceEmpty(t, entries, must.Sprint("a refused task must leave no state"))
			}
			id := sandboxID(cfg)
			cgs, _ := filepath.Glob("/sys/fs/cgroup/*/nomad-sandbox/" + id)
			unified, _ := filepath.Glob("/sys/fs/cgroup/nomad-sandbox/" + id)
			must.SliceEmpty(t, append(cgs, unified...), must.Sprint("a refused task must leave no cgroup"))
			ids, err := e.driver.runsc.List(t.Context())
			must.NoError(t, err)
			must.SliceNotContains(t, ids, id)
		})
	}
}

// The tokens Nomad writes into secrets/ as root at every start (following
// links) cannot be written, removed or swapped for a link by the task,
// which still reads them and still writes the rest of /secrets.
func TestHostile_SecretsTokensPinned(t *testing.T) {
	e := newTestEnv(t, nil)
	script := `
try() { if sh -c "$1" 2>/dev/null; then echo "WROTE: $1"; else echo "refused: $1"; fi; }
for f in /secrets/nomad_token /secrets/vault_token; do
  try "rm -f $f"
  try "mv $f /secrets/aside"
  try "ln -sf /etc/passwd $f"
  try "echo x >> $f"
done
cat /secrets/nomad_token; echo
echo x > /secrets/own && echo "secrets still writable"
echo done
`
	cfg, cleanup := e.task(t, "tokens", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", script}}))
	defer cleanup()
	secrets := cfg.TaskDir().SecretsDir
	for _, f := range []string{"nomad_token", "vault_token"} {
		must.NoError(t, os.WriteFile(filepath.Join(secrets, f), []byte("token-"+f), 0o600))
	}
	res := e.run(cfg)
	out := waitLog(t, cfg, "stdout", has("done"))
	must.Eq(t, 0, res.ExitCode, must.Sprint(out, readLog(cfg, "stderr")))
	must.StrNotContains(t, out, "WROTE")
	must.StrContains(t, out, "token-nomad_token")
	must.StrContains(t, out, "secrets still writable")
	for _, f := range []string{"nomad_token", "vault_token"} {
		fi, err := os.Lstat(filepath.Join(secrets, f))
		must.NoError(t, err)
		must.True(t, fi.Mode().IsRegular(), must.Sprintf("secrets/%s is now %v", f, fi.Mode()))
		b, err := os.ReadFile(filepath.Join(secrets, f))
		must.NoError(t, err)
		must.Eq(t, "token-"+f, string(b))
	}
}

// runsc makes the mount points of the driver's binds (/etc/hosts,
// /etc/resolv.conf, /alloc, /local, /secrets) in the root filesystem when it
// lacks them; a job-supplied rootfs whose etc is a link to a host directory
// must not get them made there.
func TestHostile_MountPointsStayInRootfs(t *testing.T) {
	e := newTestEnv(t, nil)
	cfg, cleanup := e.task(t, "mountpoints", readonlyDefault(TaskConfig{Rootfs: "local/rootfs", Command: "/bin/true"}))
	defer cleanup()
	rootfs := testutil.MakeRootfs(t, filepath.Join(cfg.TaskDir().LocalDir, "rootfs"))
	hostDir := t.TempDir()
	must.NoError(t, os.RemoveAll(filepath.Join(rootfs, "etc")))
	must.NoError(t, os.Symlink(hostDir, filepath.Join(rootfs, "etc")))
	res := e.run(cfg)
	must.Eq(t, 0, res.ExitCode, must.Sprint(res.Err))
	entries, err := os.ReadDir(hostDir)
	must.NoError(t, err)
	must.SliceEmpty(t, entries, must.Sprint("runsc made files in a host directory through the rootfs's etc link"))
}
