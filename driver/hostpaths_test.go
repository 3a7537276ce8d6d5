package driver

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

// The task directory and the shared alloc directory are world-writable on
// the host (Nomad makes them 0777 so that a task of any user can write
// them), so a local user can replace local/, alloc/logs, a token in
// secrets/ or a rootfs under local/ with a link to a host file or
// directory, before the start or while it is under way. runsc would then
// bind what the link names into the sandbox (local/ writable). Neither a
// link there before the start nor a swap after the driver's checks may
// reach the sandbox: the start is refused, or the sandbox sees what was
// checked.
func TestHostile_TaskPathsSwappedForHostLinks(t *testing.T) {
	e := newTestEnv(t, nil)
	script := `for d in / /local /alloc/logs /local/rootfs; do echo x > $d/pwned; ls $d; done > /alloc/data/listing 2>&1; cat /secrets/nomad_token >> /alloc/data/listing`
	for _, tc := range []struct {
		name string
		rel  string // beneath the task directory
		// hostRootfs: the task's rootfs is the node's (allow_host_rootfs)
		// rather than local/rootfs, which the local/ swap would move.
		hostRootfs bool
		// late: swapped after the driver's checks (just before the
		// sandbox starts) rather than before StartTask.
		late bool
	}{
		{name: "local", rel: "local", hostRootfs: true},
		{name: "logs", rel: "../alloc/logs"},
		{name: "data", rel: "../alloc/data"},
		{name: "token", rel: "secrets/nomad_token"},
		{name: "local late", rel: "local", late: true, hostRootfs: true},
		{name: "logs late", rel: "../alloc/logs", late: true},
		{name: "token late", rel: "secrets/nomad_token", late: true},
		{name: "rootfs late", rel: "local/rootfs", late: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rootfs := "local/rootfs"
			if tc.hostRootfs {
				rootfs = e.rootfs
			}
			cfg, cleanup := e.taskWithLogs(t, "swap", readonlyDefault(TaskConfig{Rootfs: rootfs, Command: "/bin/sh", Args: []string{"-c", script}}), false)
			defer cleanup()
			td := cfg.TaskDir().Dir
			testutil.MakeRootfs(t, filepath.Join(td, "local", "rootfs"))
			must.NoError(t, os.WriteFile(filepath.Join(td, "secrets", "nomad_token"), []byte("token"), 0o600))
			must.NoError(t, os.MkdirAll(filepath.Join(cfg.AllocDir, "alloc", "logs"), 0o777))
			// A host directory with a file the task must not see, a
			// rootfs in it for the rootfs swap.
			host := t.TempDir()
			must.NoError(t, os.WriteFile(filepath.Join(host, "host-secret"), []byte("host-secret"), 0o600))
			hostRootfs := testutil.MakeRootfs(t, filepath.Join(host, "rootfs"))
			must.NoError(t, os.WriteFile(filepath.Join(hostRootfs, "host-secret"), []byte("host-secret"), 0o600))
			target := filepath.Join(td, tc.rel)
			link := host
			switch tc.rel {
			case "secrets/nomad_token":
				link = filepath.Join(host, "host-secret")
			case "local/rootfs":
				link = hostRootfs
			}
			aside := target + ".aside"
			swapped := errors.New("not swapped")
			do := func() {
				if swapped = os.Rename(target, aside); swapped == nil {
					swapped = os.Symlink(link, target)
				}
			}
			defer func() {
				if fi, err := os.Lstat(target); err == nil && fi.Mode()&os.ModeSymlink != 0 {
					_ = os.Remove(target)
					_ = os.Rename(aside, target)
				}
			}()
			if tc.late {
				e.driver.crashHook = func(point string) {
					if point == crashBeforeRun {
						do()
					}
				}
				defer func() { e.driver.crashHook = nil }()
			} else {
				do()
			}
			_, _, err := e.harness.StartTask(cfg)
			if tc.late && errors.Is(swapped, unix.EBUSY) {
				// local/ is a mount point by then (the driver's nosuid
				// bind, or a disk's overlay): nobody can move it.
				t.Logf("not swapped: %v", swapped)
			} else {
				must.NoError(t, swapped)
			}
			if err == nil {
				res := e.wait(cfg.ID, 60*time.Second)
				t.Logf("exit %d", res.ExitCode)
				must.NoError(t, e.harness.DestroyTask(cfg.ID, true))
			} else {
				t.Logf("refused: %v", err)
			}
			for _, d := range []string{host, hostRootfs} {
				_, err = os.Lstat(filepath.Join(d, "pwned"))
				must.True(t, os.IsNotExist(err), must.Sprint("the task wrote into a host directory through a swapped task path"))
			}
			listing, _ := os.ReadFile(filepath.Join(cfg.AllocDir, "alloc", "data", "listing"))
			must.StrNotContains(t, string(listing), "host-secret", must.Sprint("the task read a host file through a swapped task path"))
		})
	}
}

// The pins hold the task's paths only while runsc starts the sandbox: once
// it runs, the state directory holds none of them, and the sandbox still
// reads and writes the task's real directories.
func TestDriver_TaskPathsPinnedOnlyForTheStart(t *testing.T) {
	e := newTestEnv(t, nil)
	script := `while [ ! -e /local/go ]; do sleep 0.05; done; cat /local/go > /local/ok; cat /local/go > /alloc/data/ok; cat /secrets/nomad_token > /secrets/ok`
	cfg, cleanup := e.task(t, "pins", readonlyDefault(TaskConfig{Rootfs: "local/rootfs", Command: "/bin/sh", Args: []string{"-c", script}}))
	defer cleanup()
	td := cfg.TaskDir()
	testutil.MakeRootfs(t, filepath.Join(td.LocalDir, "rootfs"))
	must.NoError(t, os.WriteFile(filepath.Join(td.SecretsDir, "nomad_token"), []byte("token"), 0o600))
	_, _, err := e.harness.StartTask(cfg)
	must.NoError(t, err)
	defer func() { must.NoError(t, e.harness.DestroyTask(cfg.ID, true)) }()
	_, err = os.Lstat(runtime.StateDir(filepath.Join(e.config.StateDir, sandboxID(cfg))).Pins())
	must.True(t, os.IsNotExist(err), must.Sprint("pins left in the state directory of a running task"))
	must.NoError(t, os.WriteFile(filepath.Join(td.LocalDir, "go"), []byte("go"), 0o644))
	res := e.wait(cfg.ID, 60*time.Second)
	must.Eq(t, 0, res.ExitCode)
	for _, f := range []string{filepath.Join(td.LocalDir, "ok"), filepath.Join(td.SharedAllocDir, "data", "ok"), filepath.Join(td.SecretsDir, "ok")} {
		b, err := os.ReadFile(f)
		must.NoError(t, err)
		must.StrContains(t, "go token", string(b))
	}
}

// From Nomad 1.7 each named identity with file = true is written, as root and
// following links, to secrets/nomad_<name>.jwt at every start and renewal:
// those are pinned like nomad_token, and one that is a link is refused.
func TestPinnedFiles_NamedIdentities(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"nomad_token", "nomad_db.jwt", "nomad_vault_default.jwt", "own.jwt"} {
		must.NoError(t, os.WriteFile(filepath.Join(dir, f), []byte("t"), 0o600))
	}
	pinned, err := pinnedFiles(dir, "/secrets")
	must.NoError(t, err)
	var got []string
	for _, p := range pinned {
		must.True(t, p.Readonly)
		must.Eq(t, filepath.Join(dir, filepath.Base(p.TaskPath)), p.HostPath)
		got = append(got, p.TaskPath)
	}
	must.SliceContainsAll(t, []string{"/secrets/nomad_token", "/secrets/nomad_db.jwt", "/secrets/nomad_vault_default.jwt"}, got)

	must.NoError(t, os.Remove(filepath.Join(dir, "nomad_db.jwt")))
	must.NoError(t, os.Symlink("/etc/passwd", filepath.Join(dir, "nomad_db.jwt")))
	_, err = pinnedFiles(dir, "/secrets")
	must.ErrorContains(t, err, "nomad_db.jwt is not a regular file")
}

// A root filesystem that other tasks share (a host rootfs under
// allow_host_rootfs, an image in the cache) gains none of the mount points a
// job's volume destinations would need: runsc makes those in the host
// directory, so a job could create directories and files of its choice in
// it. A destination that is not there is refused; one that is works.
func TestHostile_SharedRootfsGetsNoMountPoints(t *testing.T) {
	e := newTestEnv(t, nil)
	vol := t.TempDir()
	existing := filepath.Join(e.rootfs, "zz_existing")
	must.NoError(t, os.Mkdir(existing, 0o755))
	defer os.Remove(existing)

	cfg, cleanup := e.task(t, "probe", readonlyDefault(TaskConfig{Command: "/bin/true"}))
	defer cleanup()
	cfg.Mounts = []*drivers.MountConfig{{TaskPath: "/zz_vol_probe/b", HostPath: vol}}
	_, _, err := e.harness.StartTask(cfg)
	if err == nil {
		e.wait(cfg.ID, 60*time.Second)
		must.NoError(t, e.harness.DestroyTask(cfg.ID, true))
	}
	_, statErr := os.Lstat(filepath.Join(e.rootfs, "zz_vol_probe"))
	must.True(t, os.IsNotExist(statErr), must.Sprint("runsc made /zz_vol_probe in the shared host rootfs"))
	must.ErrorContains(t, err, "volume_mount destination /zz_vol_probe/b is not in the root filesystem")

	cfg, cleanup2 := e.task(t, "existing", readonlyDefault(TaskConfig{Command: "/bin/true"}))
	defer cleanup2()
	cfg.Mounts = []*drivers.MountConfig{{TaskPath: "/zz_existing", HostPath: vol}}
	res := e.run(cfg)
	must.Eq(t, 0, res.ExitCode)
}
