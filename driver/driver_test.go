package driver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/helper/uuid"
	"github.com/hashicorp/nomad/nomad/structs"
	"github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/drivers"
	dtestutil "github.com/hashicorp/nomad/plugins/drivers/testutils"
	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"
	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

// testEnv is one configured driver with its own state, runsc root and host
// rootfs, all removed when the test ends.
type testEnv struct {
	t             *testing.T
	base          string
	rootfs        string
	config        PluginConfig
	driver        *Driver
	harness       *dtestutil.DriverHarness
	supervisorExe string
	// netPrefix names this env's network namespaces, veths and nft
	// objects, apart from every other env's.
	netPrefix string
}

// netPrefixFor is a short name, unique per test directory, for netpolicy.
func netPrefixFor(base string) string {
	sum := sha256.Sum256([]byte(base))
	return "t" + hex.EncodeToString(sum[:2])
}

func newTestEnv(t *testing.T, mutate func(*PluginConfig)) *testEnv {
	t.Helper()
	testutil.RequireRoot(t)
	base := t.TempDir()
	rootfsParent := filepath.Join(base, "images")
	rootfs := testutil.MakeRootfs(t, filepath.Join(rootfsParent, "busybox"))
	pc := PluginConfig{
		RunscPath:       testutil.Runsc(t),
		RunscRoot:       filepath.Join(base, "runsc"),
		StateDir:        filepath.Join(base, "state"),
		Platform:        "systrap",
		AllowHostRootfs: []string{rootfsParent},
		ImageDir:        filepath.Join(base, "image-cache"),
		DiskDir:         filepath.Join(base, "disks"),
	}
	if mutate != nil {
		mutate(&pc)
	}
	exe, err := os.Executable()
	must.NoError(t, err)
	e := &testEnv{t: t, base: base, rootfs: rootfs, config: pc, supervisorExe: exe, netPrefix: netPrefixFor(base)}
	e.driver = e.newDriver()
	e.harness = dtestutil.NewDriverHarness(t, e.driver)
	t.Cleanup(func() {
		e.driver.Shutdown()
		e.assertNothingLeft()
	})
	return e
}

func (e *testEnv) newDriver() *Driver {
	d := New(hclog.New(&hclog.LoggerOptions{Name: e.t.Name(), Level: hclog.Debug, Output: testWriter{e.t}}))
	d.SetSupervisorExe(e.supervisorExe)
	d.netPrefix, d.netTable = e.netPrefix, "nsbx_test_"+e.netPrefix
	var raw []byte
	must.NoError(e.t, base.MsgPackEncode(&raw, &e.config))
	must.NoError(e.t, d.SetConfig(&base.Config{PluginConfig: raw}))
	return d
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// assertNothingLeft fails the test if a sandbox, supervisor or state
// directory survived, then removes whatever it found.
func (e *testEnv) assertNothingLeft() {
	t := e.t
	r := e.driver.runsc
	ids, err := r.List(context.Background())
	if err == nil && len(ids) > 0 {
		t.Errorf("runsc containers left behind: %v", ids)
		for _, id := range ids {
			_ = r.Delete(context.Background(), id, runtime.DeleteOpts{Force: true})
		}
	}
	entries, _ := os.ReadDir(e.config.StateDir)
	for _, en := range entries {
		t.Errorf("task state left behind: %s", en.Name())
		sup := &runtime.Supervisor{Dir: filepath.Join(e.config.StateDir, en.Name())}
		sup.Kill()
		if err := taskCgroup(en.Name()).Destroy(); err != nil {
			t.Errorf("remove leftover cgroup: %v", err)
		}
	}
	if err := r.ReleaseRoot(); err != nil {
		t.Errorf("release runsc root: %v", err)
	}
	// With no sandbox left, the network manager drops its nft tables.
	if err := e.driver.net.Reconcile(map[string]bool{}); err != nil {
		t.Errorf("reconcile networks: %v", err)
	}
	if out, err := exec.Command("nft", "list", "tables").CombinedOutput(); err == nil && strings.Contains(string(out), e.netPrefix) {
		t.Errorf("nft tables left behind: %s", out)
	}
}

// task prepares a task's alloc dir with a real logmon. Each task gets a
// harness of its own, bound to t: the harness's cleanup closes its client.
func (e *testEnv) task(t *testing.T, name string, tc TaskConfig) (*drivers.TaskConfig, func()) {
	t.Helper()
	return e.taskWithLogs(t, name, tc, true)
}

func (e *testEnv) taskWithLogs(t *testing.T, name string, tc TaskConfig, withLogs bool) (*drivers.TaskConfig, func()) {
	t.Helper()
	if tc.Rootfs == "" && tc.Image == "" {
		tc.Rootfs = e.rootfs
	}
	if tc.Tmpfs == nil {
		tc.Tmpfs = []string{"/tmp"}
	}
	cfg := &drivers.TaskConfig{
		ID:        uuid.Generate(),
		AllocID:   uuid.Generate(),
		Name:      name,
		JobName:   "test",
		Resources: &drivers.Resources{NomadResources: &structs.AllocatedTaskResources{}, LinuxResources: &drivers.LinuxResources{CPUShares: 100, MemoryLimitBytes: 256 << 20}},
	}
	must.NoError(t, cfg.EncodeConcreteDriverConfig(&tc))
	e.harness = dtestutil.NewDriverHarness(t, e.driver)
	cleanup := e.harness.MkAllocDir(cfg, withLogs)
	return cfg, func() {
		cleanup()
		// What a test left mounted in the allocation directory (a
		// task's nosuid binds when the test removed its state
		// directory, or one that failed half-way) goes too: the
		// harness's removal stops at a mount point.
		if mounts, err := runtime.MountsUnder(cfg.AllocDir); err == nil && len(mounts) > 0 {
			t.Logf("unmounting what the test left in its allocation directory: %v", mounts)
			for _, mp := range mounts {
				_ = unix.Unmount(mp, unix.MNT_DETACH)
			}
			_ = os.RemoveAll(cfg.AllocDir)
		}
		// The harness removes the alloc dir but not the temporary
		// directory it made around it.
		_ = os.Remove(filepath.Dir(cfg.AllocDir))
	}
}

func readonlyDefault(tc TaskConfig) TaskConfig { tc.ReadonlyRootfs = true; return tc }

// run starts cfg, waits for its end and destroys it.
func (e *testEnv) run(cfg *drivers.TaskConfig) *drivers.ExitResult {
	e.t.Helper()
	_, _, err := e.harness.StartTask(cfg)
	must.NoError(e.t, err)
	defer func() { must.NoError(e.t, e.harness.DestroyTask(cfg.ID, true)) }()
	return e.wait(cfg.ID, 60*time.Second)
}

func (e *testEnv) wait(id string, d time.Duration) *drivers.ExitResult {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	ch, err := e.harness.WaitTask(ctx, id)
	must.NoError(e.t, err)
	select {
	case res := <-ch:
		must.NotNil(e.t, res, must.Sprint("wait ended without a result"))
		return res
	case <-ctx.Done():
		e.t.Fatalf("task %s did not exit within %s", id, d)
		return nil
	}
}

func readLog(cfg *drivers.TaskConfig, stream string) string {
	b, _ := os.ReadFile(filepath.Join(cfg.TaskDir().LogDir, cfg.Name+"."+stream+".0"))
	return string(b)
}

// waitLog waits until logmon has written everything the test expects of
// the task's stdout or stderr (logmon writes asynchronously), and returns it.
func waitLog(t *testing.T, cfg *drivers.TaskConfig, stream string, done func(string) bool) string {
	t.Helper()
	var out string
	err := wait.InitialSuccess(wait.BoolFunc(func() bool {
		out = readLog(cfg, stream)
		return done(out)
	}), wait.Timeout(15*time.Second), wait.Gap(20*time.Millisecond)).Run()
	if err != nil {
		t.Fatalf("%s of task %s never matched; it was %q", stream, cfg.Name, out)
	}
	return out
}

func has(s string) func(string) bool {
	return func(out string) bool { return strings.Contains(out, s) }
}
func equals(s string) func(string) bool { return func(out string) bool { return out == s } }

func TestDriver_BatchExitCodeAndStreams(t *testing.T) {
	e := newTestEnv(t, nil)
	cfg, cleanup := e.task(t, "streams", readonlyDefault(TaskConfig{
		Command: "/bin/sh",
		Args:    []string{"-c", "echo to-stdout; echo to-stderr >&2; exit 7"},
	}))
	defer cleanup()
	res := e.run(cfg)
	must.Eq(t, 7, res.ExitCode)
	must.NoError(t, res.Err)
	must.False(t, res.OOMKilled)
	waitLog(t, cfg, "stdout", equals("to-stdout\n"))
	waitLog(t, cfg, "stderr", equals("to-stderr\n"))
}

func TestDriver_InsideTheSandbox(t *testing.T) {
	e := newTestEnv(t, nil)
	script := `
touch /probe 2>/dev/null && echo ROOT_WRITABLE
grep CapEff /proc/self/status
grep NoNewPrivs /proc/self/status
echo "kernel $(uname -r)"
echo "uid $(id -u) gid $(id -g) groups $(id -G)"
echo "secrets_env $NOMAD_SECRETS_DIR alloc_env $NOMAD_ALLOC_DIR task_env $NOMAD_TASK_DIR"
for d in /alloc/data /local /secrets /tmp; do touch $d/probe && echo "$d writable"; done
echo "host $(hostname)"
echo "leaked $(env | grep -c HOST_ONLY_VAR)"
`
	cfg, cleanup := e.task(t, "inside", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", script}, Hostname: "ci-box"}))
	defer cleanup()
	cfg.User = "app"
	t.Setenv("HOST_ONLY_VAR", "leak")
	res := e.run(cfg)
	out := waitLog(t, cfg, "stdout", has("leaked "))
	must.Eq(t, 0, res.ExitCode, must.Sprint(out), must.Sprint(readLog(cfg, "stderr")))
	must.StrContains(t, out, "leaked 0")
	must.StrNotContains(t, out, "ROOT_WRITABLE")
	must.StrContains(t, out, "CapEff:\t0000000000000000")
	must.StrContains(t, out, "NoNewPrivs:\t1")
	hostRel, err := os.ReadFile("/proc/sys/kernel/osrelease")
	must.NoError(t, err)
	must.StrNotContains(t, out, "kernel "+strings.TrimSpace(string(hostRel)))
	must.StrContains(t, out, "uid 1000 gid 1000 groups 1000 10")
	must.StrContains(t, out, "secrets_env /secrets alloc_env /alloc task_env /local")
	for _, d := range []string{"/alloc/data", "/local", "/secrets", "/tmp"} {
		must.StrContains(t, out, d+" writable")
	}
	must.StrContains(t, out, "host ci-box")
	// What the task wrote to /local is on the host in the task dir.
	_, err = os.Stat(filepath.Join(cfg.TaskDir().LocalDir, "probe"))
	must.NoError(t, err)
}

func TestDriver_WritableRootfsGoesToMemory(t *testing.T) {
	e := newTestEnv(t, func(pc *PluginConfig) { pc.AllowWritableRootfs = true })
	cfg, cleanup := e.task(t, "writable", TaskConfig{Command: "/bin/sh", Args: []string{"-c", "echo x > /etc/new-file && cat /etc/new-file"}})
	defer cleanup()
	res := e.run(cfg)
	must.Eq(t, 0, res.ExitCode, must.Sprint(readLog(cfg, "stderr")))
	_, err := os.Stat(filepath.Join(e.rootfs, "etc/new-file"))
	must.True(t, os.IsNotExist(err), must.Sprint("a write to the sandbox root must never reach the host directory"))
}

func TestDriver_StopSendsKillSignalThenSIGKILL(t *testing.T) {
	e := newTestEnv(t, nil)
	cases := []struct {
		name     string
		script   string
		signal   string
		wantCode int
		wantLog  string
	}{
		{"trapped", `trap 'echo got-INT; exit 0' INT; echo ready; while true; do sleep 0.1; done`, "SIGINT", 0, "got-INT"},
		{"ignored", `trap '' TERM; echo ready; while true; do sleep 0.1; done`, "SIGTERM", 137, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg, cleanup := e.task(t, "stop-"+tc.name, readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", tc.script}}))
			defer cleanup()
			_, _, err := e.harness.StartTask(cfg)
			must.NoError(t, err)
			defer func() { must.NoError(t, e.harness.DestroyTask(cfg.ID, true)) }()
			waitLog(t, cfg, "stdout", has("ready"))
			must.NoError(t, e.harness.StopTask(cfg.ID, 2*time.Second, tc.signal))
			res := e.wait(cfg.ID, 30*time.Second)
			must.Eq(t, tc.wantCode, res.ExitCode)
			if tc.wantLog != "" {
				waitLog(t, cfg, "stdout", has(tc.wantLog))
			} else {
				must.Eq(t, 9, res.Signal)
			}
		})
	}
}

// TestDriver_RecoverAfterPluginRestart replaces the plugin with a fresh
// driver (empty task store), as when Nomad restarts a killed plugin.
func TestDriver_RecoverAfterPluginRestart(t *testing.T) {
	e := newTestEnv(t, nil)
	script := `echo waiting; while [ ! -e /alloc/data/go ]; do sleep 0.05; done; echo finishing; exit 5`

	t.Run("still running", func(t *testing.T) {
		cfg, cleanup := e.task(t, "recover-running", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", script}}))
		defer cleanup()
		handle, _, err := e.harness.StartTask(cfg)
		must.NoError(t, err)
		waitLog(t, cfg, "stdout", has("waiting"))

		e.driver.Shutdown() // the old plugin stops watching; the task lives on
		fresh := e.newDriver()
		e.driver = fresh // shut down by the env's cleanup
		must.NoError(t, fresh.RecoverTask(handle))
		status, err := fresh.InspectTask(cfg.ID)
		must.NoError(t, err)
		must.Eq(t, drivers.TaskStateRunning, status.State)

		ch, err := fresh.WaitTask(context.Background(), cfg.ID)
		must.NoError(t, err)
		must.NoError(t, os.WriteFile(filepath.Join(cfg.TaskDir().SharedAllocDir, "data", "go"), nil, 0o644))
		select {
		case res := <-ch:
			must.Eq(t, 5, res.ExitCode)
		case <-time.After(30 * time.Second):
			t.Fatal("recovered task did not report its exit")
		}
		waitLog(t, cfg, "stdout", has("finishing"))
		must.NoError(t, fresh.DestroyTask(cfg.ID, true))
	})

	t.Run("ended while down", func(t *testing.T) {
		cfg, cleanup := e.task(t, "recover-ended", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", script}}))
		defer cleanup()
		handle, _, err := e.harness.StartTask(cfg)
		must.NoError(t, err)
		waitLog(t, cfg, "stdout", has("waiting"))
		var st taskState
		must.NoError(t, handle.GetDriverState(&st))

		e.driver.Shutdown()
		must.NoError(t, os.WriteFile(filepath.Join(cfg.TaskDir().SharedAllocDir, "data", "go"), nil, 0o644))
		sup := &runtime.Supervisor{Dir: st.StateDir}
		must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool {
			s, err := sup.ExitStatus()
			return err == nil && s != nil && !sup.Alive()
		}), wait.Timeout(30*time.Second), wait.Gap(20*time.Millisecond)))

		fresh := e.newDriver()
		e.driver = fresh
		must.NoError(t, fresh.RecoverTask(handle))
		ch, err := fresh.WaitTask(context.Background(), cfg.ID)
		must.NoError(t, err)
		select {
		case res := <-ch:
			must.Eq(t, 5, res.ExitCode)
		case <-time.After(10 * time.Second):
			t.Fatal("recovered task did not report its exit")
		}
		must.NoError(t, fresh.DestroyTask(cfg.ID, true))
	})
}

func TestDriver_BadConfigCreatesNothing(t *testing.T) {
	e := newTestEnv(t, func(pc *PluginConfig) {
		pc.AllowCaps = []string{"CAP_NET_BIND_SERVICE"}
		pc.MaxTimeout = "1m"
		pc.DefaultPidsLimit, pc.MaxPidsLimit = 50, 100
	})
	outside := t.TempDir()
	must.NoError(t, os.Symlink("/", filepath.Join(outside, "to-root")))
	// A rootfs as Nomad's artifact fetcher unpacks one: links made empty.
	flattened := testutil.MakeRootfs(t, filepath.Join(filepath.Dir(e.rootfs), "flattened"))
	must.NoError(t, os.Remove(filepath.Join(flattened, "bin/sh")))
	must.NoError(t, os.WriteFile(filepath.Join(flattened, "bin/sh"), nil, 0o777))
	cases := []struct {
		name string
		tc   TaskConfig
		user string
		want string
	}{
		{"cap not allowed", TaskConfig{Command: "/bin/true", CapAdd: []string{"NET_ADMIN"}}, "", "cap_add: CAP_NET_ADMIN is not allowed"},
		{"unknown cap", TaskConfig{Command: "/bin/true", CapAdd: []string{"CAP_FLY"}}, "", `unknown capability "CAP_FLY"`},
		{"missing rootfs", TaskConfig{Command: "/bin/true", Rootfs: filepath.Join(filepath.Dir(e.rootfs), "nope")}, "", "no such file or directory"},
		{"rootfs outside allowlist", TaskConfig{Command: "/bin/true", Rootfs: outside}, "", "allow_host_rootfs"},
		{"relative rootfs escapes", TaskConfig{Command: "/bin/true", Rootfs: "../../../../../../"}, "", "leads outside the task directory"},
		{"writable root not allowed", TaskConfig{Command: "/bin/true"}, "", "allow_writable_rootfs"},
		{"no command", TaskConfig{}, "", "command is required"},
		{"relative work_dir", TaskConfig{Command: "/bin/true", WorkDir: "src"}, "", "work_dir"},
		{"tmpfs over secrets", TaskConfig{Command: "/bin/true", Tmpfs: []string{"/secrets"}}, "", "tmpfs"},
		{"unknown user", TaskConfig{Command: "/bin/true"}, "mallory", `no such user`},
		{"timeout above max_timeout", TaskConfig{Command: "/bin/true", Timeout: "2m"}, "", "timeout 2m0s is above this node's ceiling of 1m0s (the plugin's max_timeout)"},
		{"empty shell in rootfs", TaskConfig{Command: "/bin/sh", Rootfs: flattened}, "", "rootfs: the command /bin/sh (/bin/sh) is an empty file: Nomad's artifact fetcher"},
		{"pids above max_pids_limit", TaskConfig{Command: "/bin/true", PidsLimit: 1000}, "", "pids_limit 1000 is above this node's ceiling of 100"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			in := tc.tc
			if tc.name != "writable root not allowed" {
				in.ReadonlyRootfs = true
			}
			// No logmon: nothing starts, and logmon would wait for a writer.
			cfg, cleanup := e.taskWithLogs(t, "bad", in, false)
			defer cleanup()
			cfg.User = tc.user
			_, _, err := e.harness.StartTask(cfg)
			must.Error(t, err)
			must.StrContains(t, err.Error(), tc.want)
			entries, _ := os.ReadDir(e.config.StateDir)
			must.SliceEmpty(t, entries)
			ids, err := e.driver.runsc.List(context.Background())
			must.NoError(t, err)
			must.SliceEmpty(t, ids)
		})
	}
}

func TestDriver_Exec(t *testing.T) {
	e := newTestEnv(t, nil)
	cfg, cleanup := e.task(t, "exec", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", "echo ready; sleep 600"}}))
	defer cleanup()
	cfg.User = "app"
	_, _, err := e.harness.StartTask(cfg)
	must.NoError(t, err)
	defer func() { must.NoError(t, e.harness.DestroyTask(cfg.ID, true)) }()
	waitLog(t, cfg, "stdout", has("ready"))

	res, err := e.harness.ExecTask(cfg.ID, []string{"/bin/sh", "-c", "id -u; grep CapEff /proc/self/status; echo oops >&2; exit 3"}, 30*time.Second)
	must.NoError(t, err)
	must.Eq(t, 3, res.ExitResult.ExitCode)
	must.StrContains(t, string(res.Stdout), "1000\n")
	must.StrContains(t, string(res.Stdout), "CapEff:\t0000000000000000")
	must.Eq(t, "oops\n", string(res.Stderr))

	// gVisor gives the exec a host-backed terminal, which has no /dev/pts
	// name; isatty and the window size are what a shell relies on.
	code, stdout, _ := dtestutil.ExecTask(t, e.harness, cfg.ID, "[ -t 0 ] && [ -t 1 ] && echo is-a-tty; stty size", true, "")
	must.Eq(t, 0, code)
	must.StrContains(t, stdout, "is-a-tty")
	must.StrContains(t, stdout, "100 100")

	code, stdout, _ = dtestutil.ExecTask(t, e.harness, cfg.ID, "cat", false, "piped-in")
	must.Eq(t, 0, code)
	must.Eq(t, "piped-in", stdout)
}

func TestDriver_Fingerprint(t *testing.T) {
	e := newTestEnv(t, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch, err := e.harness.Fingerprint(ctx)
	must.NoError(t, err)
	fp := <-ch
	must.Eq(t, drivers.HealthStateHealthy, fp.Health, must.Sprint(fp.HealthDescription))
	v, ok := fp.Attributes["driver.sandbox.runsc.version"].GetString()
	must.True(t, ok)
	must.StrContains(t, v, "0.0.0-")
	p, _ := fp.Attributes["driver.sandbox.platform"].GetString()
	must.Eq(t, "systrap", p)

	bad := newTestEnv(t, func(pc *PluginConfig) { pc.RunscPath = "/nonexistent/runsc" })
	ch, err = bad.harness.Fingerprint(ctx)
	must.NoError(t, err)
	fp = <-ch
	must.Eq(t, drivers.HealthStateUnhealthy, fp.Health)
	must.StrContains(t, fp.HealthDescription, "runsc_path")
}

func TestDriver_MemoryLimitOOM(t *testing.T) {
	e := newTestEnv(t, nil)
	cfg, cleanup := e.task(t, "oom", readonlyDefault(TaskConfig{
		Command: "/bin/sh",
		// /tmp is memory inside the sandbox: filling it charges the host
		// cgroup until the kernel kills the sandbox.
		Args: []string{"-c", "echo filling; dd if=/dev/zero of=/tmp/fill bs=1M count=512; echo survived"},
	}))
	defer cleanup()
	cfg.Resources.LinuxResources.MemoryLimitBytes = 64 << 20
	ev := e.events(t, cfg.ID)
	res := e.run(cfg)
	must.True(t, res.OOMKilled, must.Sprintf("exit %d signal %d", res.ExitCode, res.Signal))
	must.Error(t, res.Err)
	ev.waitFor(t, "Limits applied: memory 64 MiB")
	ev.waitFor(t, "OOM killed: the sandbox reached its memory limit of 64 MiB")
	must.NonZero(t, res.ExitCode)
	must.StrNotContains(t, readLog(cfg, "stdout"), "survived")
	_, err := os.Stat(filepath.Join(runtime.CgroupRoot, "memory", "nomad-sandbox", sandboxID(cfg)))
	must.True(t, os.IsNotExist(err), must.Sprint("the task's cgroup must be removed after its OOM was read"))
}

// A task config without resources (as some callers send) must still run.
func TestDriver_NoResources(t *testing.T) {
	e := newTestEnv(t, nil)
	cfg, cleanup := e.task(t, "nores", readonlyDefault(TaskConfig{Command: "/bin/true"}))
	defer cleanup()
	cfg.Resources = nil
	res := e.run(cfg)
	must.Eq(t, 0, res.ExitCode)
	must.NoError(t, res.Err)
}
