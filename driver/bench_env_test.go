package driver

// Benchmarks of the driver's start path against bare runsc, of its phases,
// of the memory a task costs and of a stats sample. `make bench` runs them
// as root:
//
//	go test -run '^$' -bench . -benchtime 10x ./driver
//
// Each benchmark prints a one-line "SUMMARY" with its result. This file
// holds the environment they share; each file bench_*_test.go holds what
// one kind of benchmark measures.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/nomad/structs"
	nbase "github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

// benchEnv is a configured *Driver whose supervisor is this test binary
// (TestMain dispatches runtime.SupervisorArg), a busybox rootfs under an
// allow_host_rootfs directory, a Nomad-shaped allocation directory, and a
// second runsc root with an equivalent bundle for the bare-runsc baseline.
// Everything it creates is removed when the benchmark ends, also on failure.
type benchEnv struct {
	d        *Driver
	exe      string // this test binary, the tasks' supervisor
	dir      string
	rootfs   string
	allocDir string
	allocID  string
	stateDir string
	runsc    runtime.Runsc // the driver's root

	bare       runtime.Runsc // the baseline's own root
	bareBundle string
	bareConfig *runtime.BundleConfig

	// wrapLog, when set, is where the runsc wrapper logs (see benchWrapper).
	wrapLog string

	started map[string]bool // task IDs not yet destroyed
	seq     int
}

// newBenchEnv sets up a driver; with wrap, its runsc_path is a wrapper that
// timestamps each runsc command (see BenchmarkStartTask_Phases).
func newBenchEnv(b *testing.B, wrap bool) *benchEnv {
	b.Helper()
	testutil.RequireRoot(b)
	dir := b.TempDir()
	e := &benchEnv{
		dir:      dir,
		allocDir: filepath.Join(dir, "alloc"),
		allocID:  fmt.Sprintf("b%07x-bench-alloc", os.Getpid()),
		stateDir: filepath.Join(dir, "state"),
		started:  map[string]bool{},
	}
	images := filepath.Join(dir, "images")
	e.rootfs = testutil.MakeRootfs(b, filepath.Join(images, "busybox"))
	runscPath := testutil.Runsc(b)
	e.runsc = runtime.Runsc{Path: runscPath, Root: filepath.Join(dir, "runsc-root")}
	e.bare = runtime.Runsc{Path: runscPath, Root: filepath.Join(dir, "bare-root")}
	// alloc/data and alloc/tmp as Nomad makes them: the driver binds both
	// (and puts the allocation's disk over them).
	for _, d := range []string{filepath.Join(e.allocDir, "alloc", "data"), filepath.Join(e.allocDir, "alloc", "tmp"), filepath.Join(dir, "logs"), e.bare.Root} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			b.Fatal(err)
		}
	}
	exe, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	e.exe = exe
	driverRunsc, supervisorExe := runscPath, exe
	if wrap {
		e.wrapLog = filepath.Join(dir, "calls.log")
		driverRunsc = filepath.Join(dir, "runsc-wrapper")
		supervisorExe = filepath.Join(dir, "supervisor-wrapper")
		for path, script := range map[string]string{
			driverRunsc:   fmt.Sprintf(benchWrapper, e.wrapLog, runscPath),
			supervisorExe: fmt.Sprintf(benchSupervisorWrapper, e.wrapLog, exe),
		} {
			if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
				b.Fatal(err)
			}
		}
	}

	e.d = New(hclog.NewNullLogger())
	e.d.SetSupervisorExe(supervisorExe)
	// Registered after TempDir, so it runs before the directories go.
	b.Cleanup(func() { e.cleanup(b) })
	pc := PluginConfig{
		RunscPath:       driverRunsc,
		RunscRoot:       e.runsc.Root,
		StateDir:        e.stateDir,
		Platform:        "systrap",
		AllowHostRootfs: []string{images},
		ImageDir:        filepath.Join(filepath.Dir(e.stateDir), "image-cache"),
	}
	var raw []byte
	if err := nbase.MsgPackEncode(&raw, &pc); err != nil {
		b.Fatal(err)
	}
	if err := e.d.SetConfig(&nbase.Config{PluginConfig: raw}); err != nil {
		b.Fatal(err)
	}
	e.bareBundle, e.bareConfig = e.writeBareBundle(b)
	return e
}

// writeBareBundle writes the baseline's bundle from the same spec input the
// driver builds for the benchmark's /bin/true task: read-only root, the
// task directories, /tmp tmpfs, resolv.conf and hosts.
func (e *benchEnv) writeBareBundle(b *testing.B) (string, *runtime.BundleConfig) {
	b.Helper()
	dir := filepath.Join(e.dir, "bare")
	bundle := runtime.StateDir(dir).Bundle()
	td := filepath.Join(dir, "task")
	dirs := runtime.TaskDirs{Alloc: filepath.Join(dir, "alloc"), Local: filepath.Join(td, "local"), Secrets: filepath.Join(td, "secrets")}
	for _, d := range []string{bundle, dirs.Alloc, dirs.Local, dirs.Secrets} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			b.Fatal(err)
		}
	}
	bc := &runtime.BundleConfig{
		Rootfs:         e.rootfs,
		ReadonlyRootfs: true,
		Args:           []string{"/bin/true"},
		Env:            []string{"NOMAD_TASK_NAME=true", "PATH=" + runtime.DefaultPath},
		Cwd:            "/",
		Hostname:       "true",
		Dirs:           dirs,
		Tmpfs:          []string{"/tmp"},
		ResolvConf:     filepath.Join(dir, "resolv.conf"),
		Hosts:          filepath.Join(dir, "hosts"),
	}
	if err := os.WriteFile(bc.ResolvConf, runtime.ResolvConf(nil, nil, nil), 0o644); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(bc.Hosts, runtime.HostsFile(bc.Hostname), 0o644); err != nil {
		b.Fatal(err)
	}
	if err := runtime.WriteBundle(bundle, bc); err != nil {
		b.Fatal(err)
	}
	return bundle, bc
}

func (e *benchEnv) cleanup(b *testing.B) {
	for id := range e.started {
		if err := e.d.DestroyTask(id, true); err != nil && !errors.Is(err, drivers.ErrTaskNotFound) {
			b.Errorf("destroy task %s: %v", id, err)
		}
	}
	e.d.Shutdown()
	// Whatever a failed start left: supervisors first, then sandboxes.
	if entries, err := os.ReadDir(e.stateDir); err == nil {
		for _, ent := range entries {
			(&runtime.Supervisor{Dir: filepath.Join(e.stateDir, ent.Name())}).Kill()
		}
	}
	for _, r := range []runtime.Runsc{e.runsc, e.bare} {
		if ids, err := r.List(context.Background()); err == nil {
			for _, id := range ids {
				_ = r.Delete(context.Background(), id, runtime.DeleteOpts{Force: true})
			}
		}
		if err := r.ReleaseRoot(); err != nil {
			b.Errorf("release runsc root %s: %v", r.Root, err)
		}
	}
	// The host cgroups the driver made for those leftovers (DestroyTask
	// removes a task's own).
	if entries, err := os.ReadDir(e.stateDir); err == nil {
		for _, ent := range entries {
			if err := benchRemoveCgroup(taskCgroup(ent.Name())); err != nil {
				b.Error(err)
			}
		}
	}
}

// taskConfig returns the TaskConfig of a new task named name running args,
// with task directories laid out as Nomad's allocdir does and stdout/stderr
// as regular files.
func (e *benchEnv) taskConfig(b *testing.B, name string, args ...string) *drivers.TaskConfig {
	b.Helper()
	return e.taskConfigWith(b, name, TaskConfig{Rootfs: e.rootfs, Command: args[0], Args: args[1:], ReadonlyRootfs: true, Tmpfs: []string{"/tmp"}})
}

// taskConfigWith is taskConfig with the driver config tc (rootfs or image,
// command, ...).
func (e *benchEnv) taskConfigWith(b *testing.B, name string, tc TaskConfig) *drivers.TaskConfig {
	b.Helper()
	e.seq++
	td := filepath.Join(e.allocDir, name)
	for _, d := range []string{filepath.Join(td, "local"), filepath.Join(td, "secrets")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			b.Fatal(err)
		}
	}
	cfg := &drivers.TaskConfig{
		ID:         fmt.Sprintf("%s/%s/%d", e.allocID, name, e.seq),
		AllocID:    e.allocID,
		Name:       name,
		AllocDir:   e.allocDir,
		Env:        map[string]string{"NOMAD_TASK_NAME": name},
		StdoutPath: filepath.Join(e.dir, "logs", fmt.Sprintf("%s-%d.stdout", name, e.seq)),
		StderrPath: filepath.Join(e.dir, "logs", fmt.Sprintf("%s-%d.stderr", name, e.seq)),
		// Nomad always sends the task's resources; the driver writes
		// the memory limit into the cgroup it creates for the task.
		Resources: &drivers.Resources{
			NomadResources: &structs.AllocatedTaskResources{},
			LinuxResources: &drivers.LinuxResources{CPUShares: 100, MemoryLimitBytes: 256 << 20},
		},
	}
	if err := cfg.EncodeConcreteDriverConfig(&tc); err != nil {
		b.Fatal(err)
	}
	return cfg
}

// stateDirOf returns the state directory of a started task.
func (e *benchEnv) stateDirOf(b *testing.B, taskID string) string {
	b.Helper()
	st, err := e.d.InspectTask(taskID)
	if err != nil {
		b.Fatalf("InspectTask: %v", err)
	}
	id := st.DriverAttributes["sandbox_id"]
	if id == "" {
		b.Fatalf("task %s has no sandbox_id attribute", taskID)
	}
	return filepath.Join(e.stateDir, id)
}

// benchRun is one /bin/true task's trip through the driver.
type benchRun struct {
	start   time.Duration // StartTask returned (`runsc start` succeeded)
	exit    time.Duration // StartTask called -> WaitTask's result
	destroy time.Duration // DestroyTask
	cpu     time.Duration // CPU of the supervisor tree, DestroyTask's runsc and this process
	// destroyAt is when DestroyTask was called.
	destroyAt time.Time
	// lostExit: WaitTask reported "supervisor is gone and left no exit
	// status" although the supervisor was still running (see runTrue);
	// exit is then too early and means nothing.
	lostExit bool
	phases   benchPhases // with the timestamping wrapper only
}

// benchMedians are the medians of some benchRuns' times.
type benchMedians struct {
	start, exit, destroy, cpu time.Duration
	cycle                     time.Duration // exit + destroy
}

func mediansOf(runs []benchRun) benchMedians {
	median := func(f func(benchRun) time.Duration) time.Duration {
		ds := make([]time.Duration, 0, len(runs))
		for _, r := range runs {
			ds = append(ds, f(r))
		}
		return testutil.Median(ds)
	}
	return benchMedians{
		start:   median(func(r benchRun) time.Duration { return r.start }),
		exit:    median(func(r benchRun) time.Duration { return r.exit }),
		destroy: median(func(r benchRun) time.Duration { return r.destroy }),
		cpu:     median(func(r benchRun) time.Duration { return r.cpu }),
		cycle:   median(func(r benchRun) time.Duration { return r.exit + r.destroy }),
	}
}

// report reports the start, exit and CPU medians in seconds, as
// prefix+"start-s", prefix+"exit-s" and prefix+"cpu-s".
func (m benchMedians) report(b *testing.B, prefix string) {
	b.ReportMetric(m.start.Seconds(), prefix+"start-s")
	b.ReportMetric(m.exit.Seconds(), prefix+"exit-s")
	b.ReportMetric(m.cpu.Seconds(), prefix+"cpu-s")
}

// runTrue runs /bin/true through StartTask, WaitTask and DestroyTask. The
// benchmark timer runs only across those calls.
func (e *benchEnv) runTrue(b *testing.B) benchRun {
	b.Helper()
	return e.runCycle(b, e.taskConfig(b, "true", "/bin/true"))
}

// runCycle is runTrue for a task config of the caller's (a task that exits
// 0 by itself).
func (e *benchEnv) runCycle(b *testing.B, cfg *drivers.TaskConfig) benchRun {
	b.Helper()
	if e.wrapLog != "" {
		_ = os.Truncate(e.wrapLog, 0)
	}
	var r benchRun
	cpu0 := benchCPU()
	t0 := time.Now()
	if _, _, err := e.d.StartTask(cfg); err != nil {
		b.Fatalf("StartTask: %v", err)
	}
	r.start = time.Since(t0)
	e.started[cfg.ID] = true
	ch, err := e.d.WaitTask(context.Background(), cfg.ID)
	if err != nil {
		b.Fatalf("WaitTask: %v", err)
	}
	var res *drivers.ExitResult
	select {
	case res = <-ch:
	case <-time.After(time.Minute):
		b.Fatal("task did not exit within a minute")
	}
	r.exit = time.Since(t0)

	b.StopTimer()
	sdir := e.stateDirOf(b, cfg.ID)
	supPid := benchReadPid(filepath.Join(sdir, "supervisor.pid"))
	if res != nil && res.Err != nil && strings.Contains(res.Err.Error(), "left no exit status") {
		// Seen here: the wait socket closed while the supervisor was still
		// writing exit.json (runtime.acceptAndHold keeps no reference to
		// the accepted connection, so a GC in the supervisor closes it).
		// Let the supervisor finish and check that the task itself was
		// fine; the benchmark reports how often this happens.
		benchWaitReaped(supPid, 10*time.Second)
		if st, _ := (&runtime.Supervisor{Dir: sdir}).ExitStatus(); st != nil && st.ExitCode == 0 {
			r.lostExit = true
			res = &drivers.ExitResult{}
		}
	}
	if res == nil || res.ExitCode != 0 || res.Err != nil {
		b.Fatalf("task result %+v%s", res, benchPostMortem(sdir))
	}
	st, _ := (&runtime.Supervisor{Dir: sdir}).ExitStatus()
	b.StartTimer()

	r.destroyAt = time.Now()
	if err := e.d.DestroyTask(cfg.ID, true); err != nil {
		b.Fatalf("DestroyTask: %v", err)
	}
	r.destroy = time.Since(r.destroyAt)
	delete(e.started, cfg.ID)

	b.StopTimer()
	// The driver reaps the supervisor in the background; the CPU of the
	// supervisor and of everything it reaped counts once it has.
	benchWaitReaped(supPid, 5*time.Second)
	r.cpu = benchCPU() - cpu0
	if e.wrapLog != "" && st != nil {
		r.phases = wrapperPhases(e.wrapLog, t0, r, st)
	}
	b.StartTimer()
	return r
}

// runBare runs the baseline: `runsc --root R --network=none run --bundle B
// ID`, then `runsc delete --force ID`.
func (e *benchEnv) runBare(b *testing.B) (total, cpu time.Duration) {
	b.Helper()
	e.seq++
	id := fmt.Sprintf("bench-bare-%d-%d", os.Getpid(), e.seq)
	cmd := exec.Command(e.bare.Path, "--root", e.bare.Root, "--network=none", "run", "--bundle", e.bareBundle, id)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	cmd.Dir = "/"
	cpu0 := benchCPU()
	t0 := time.Now()
	out, err := cmd.CombinedOutput()
	derr := e.bare.Delete(context.Background(), id, runtime.DeleteOpts{Force: true})
	total = time.Since(t0)
	cpu = benchCPU() - cpu0
	if err != nil {
		b.Fatalf("bare runsc run: %v: %s", err, out)
	}
	if derr != nil {
		b.Fatalf("bare runsc delete: %v", derr)
	}
	return total, cpu
}

// benchSummary logs line and prints it to stdout as "SUMMARY line", where
// a run of `make bench` is read from.
func benchSummary(b *testing.B, line string) {
	b.Helper()
	b.Log(line)
	fmt.Println("SUMMARY " + line)
}

// benchLost reports the runs left out of a benchmark's timings because
// WaitTask lost their exit status (why says how), and stops the benchmark
// when none is left. It returns lost, for the lost-exit metric.
func benchLost(b *testing.B, lost, total int, why string) int {
	b.Helper()
	if lost > 0 {
		benchSummary(b, fmt.Sprintf("WARNING: %d of %d %s; they are left out of the timings", lost, total, why))
	}
	if lost == total {
		b.Fatal("every run lost its exit status: no timing to report")
	}
	return lost
}
