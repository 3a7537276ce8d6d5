package driver

// Benchmarks of the driver's start path against bare runsc, and of the
// memory a task costs. `make bench` runs them as root:
//
//	go test -run '^$' -bench . -benchtime 10x ./driver
//
// Each benchmark prints a one-line "SUMMARY" with its result.
//
// BenchmarkStatsSample_Cgroup and BenchmarkStatsSample_RunscEvents compare
// the two ways the driver can take a stats sample of a running sandbox:
// reading its host cgroup, or a `runsc events --stats` process per sample.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	goruntime "runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/nomad/structs"
	nbase "github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/drivers"
	"golang.org/x/sys/unix"

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
	for _, d := range []string{filepath.Join(e.allocDir, "alloc"), filepath.Join(dir, "logs"), e.bare.Root} {
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
	bundle := filepath.Join(dir, runtime.BundleDir)
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

// BenchmarkStartTask_True runs /bin/true through the driver (StartTask,
// WaitTask's result, DestroyTask) and, interleaved with it on the same
// machine, bare `runsc run` + `delete --force` of an equivalent bundle.
// ns/op is the driver's whole cycle (the bare runs are off the clock); the
// metrics are medians over the iterations:
//
//	start-s        StartTask returned (`runsc start` succeeded)
//	exit-s         StartTask called -> exit result; it includes the
//	               supervisor's `runsc delete`, so it compares with bare-s
//	destroy-s      DestroyTask after the exit
//	bare-s         bare `runsc run` + `runsc delete --force`
//	ratio          exit-s / bare-s (target: at most 1.25)
//	ratio-paired   median of each interleaved pair's exit / bare
//	ratio+destroy  median(exit + destroy) / bare-s
//	cpu-s          CPU of the driver's cycle: supervisor, runsc, sandbox, this process
//	bare-cpu-s     CPU of bare run + delete
//	lost-exit      tasks whose exit status WaitTask lost (should be 0)
func BenchmarkStartTask_True(b *testing.B) {
	e := newBenchEnv(b, false)
	// Untimed warm-up of both paths: page cache, each root's null netns.
	e.runBare(b)
	e.runTrue(b)

	var runs []benchRun
	var bares, bareCPUs []time.Duration
	bare := func() {
		b.StopTimer()
		t, c := e.runBare(b)
		bares, bareCPUs = append(bares, t), append(bareCPUs, c)
		b.StartTimer()
	}
	i := 0
	for b.Loop() {
		// Alternate the order so that neither always runs second.
		if i%2 == 0 {
			bare()
		}
		runs = append(runs, e.runTrue(b))
		if i%2 == 1 {
			bare()
		}
		i++
	}
	b.StopTimer()

	// A run whose exit status was lost has no meaningful exit time: it is
	// left out, and counted.
	var good []benchRun
	var goodBares, pairs []float64
	for i, r := range runs {
		if !r.lostExit {
			good = append(good, r)
			goodBares = append(goodBares, bares[i].Seconds())
			pairs = append(pairs, r.exit.Seconds()/bares[i].Seconds())
		}
	}
	lost := len(runs) - len(good)
	if lost > 0 {
		msg := fmt.Sprintf("WARNING: %d of %d tasks: WaitTask returned \"task supervisor is gone and left no exit status\" while the supervisor was still running and writing exit.json (the task itself exited 0); those runs are left out of the timings", lost, len(runs))
		b.Log(msg)
		fmt.Println("SUMMARY " + msg)
	}
	if len(good) == 0 {
		b.Fatal("every task lost its exit status: no timing to report")
	}
	med := func(f func(benchRun) time.Duration) time.Duration {
		ds := make([]time.Duration, 0, len(good))
		for _, r := range good {
			ds = append(ds, f(r))
		}
		return benchMedian(ds)
	}
	start := med(func(r benchRun) time.Duration { return r.start })
	exit := med(func(r benchRun) time.Duration { return r.exit })
	destroy := med(func(r benchRun) time.Duration { return r.destroy })
	exitDestroy := med(func(r benchRun) time.Duration { return r.exit + r.destroy })
	cpu := med(func(r benchRun) time.Duration { return r.cpu })
	bareT, bareCPU := benchMedian(bares), benchMedian(bareCPUs)
	ratio := exit.Seconds() / bareT.Seconds()
	b.ReportMetric(start.Seconds(), "start-s")
	b.ReportMetric(exit.Seconds(), "exit-s")
	b.ReportMetric(destroy.Seconds(), "destroy-s")
	b.ReportMetric(bareT.Seconds(), "bare-s")
	b.ReportMetric(ratio, "ratio")
	b.ReportMetric(benchMedianF(pairs), "ratio-paired")
	b.ReportMetric(exitDestroy.Seconds()/bareT.Seconds(), "ratio+destroy")
	b.ReportMetric(cpu.Seconds(), "cpu-s")
	b.ReportMetric(bareCPU.Seconds(), "bare-cpu-s")
	b.ReportMetric(float64(lost), "lost-exit")

	verdict := "within"
	if ratio > 1.25 {
		verdict = "OVER"
	}
	summary := fmt.Sprintf("driver /bin/true: StartTask %.3fs, to exit result %.3fs, DestroyTask %.3fs | bare runsc run+delete %.3fs | ratio %.2f (%s the 1.25 target; paired %.2f), %.2f with DestroyTask | CPU %.3fs vs bare %.3fs | medians of %d interleaved pairs (bare over all %d), loadavg %s",
		start.Seconds(), exit.Seconds(), destroy.Seconds(), bareT.Seconds(), ratio, verdict, benchMedianF(pairs),
		exitDestroy.Seconds()/bareT.Seconds(), cpu.Seconds(), bareCPU.Seconds(), len(good), len(bares), benchLoadavg())
	b.Log(summary)
	fmt.Println("SUMMARY " + summary)
}

// benchCachedPairs is how many image/rootfs pairs one iteration of
// BenchmarkStartTask_CachedImage runs: a 10% bound needs more than the 10
// samples `make bench` gives each side with one pair per iteration on a
// loaded 2-core machine.
const benchCachedPairs = 3

// BenchmarkStartTask_CachedImage compares a task whose root is a cached
// image with one whose root is a local directory. The image (the same
// busybox tree as the benchmark's rootfs, one layer, empty config) is pushed
// to a registry on 127.0.0.1 and named by digest (`image =
// "127.0.0.1:PORT/bench/busybox@sha256:..."`); it is pulled and unpacked
// once before the loop, so every timed start of it is a cache hit. Each
// iteration runs benchCachedPairs pairs of /bin/true from the image and
// /bin/true from `rootfs = <dir under allow_host_rootfs>`, in alternating
// order, through StartTask, WaitTask's result and DestroyTask (ns/op is
// those pairs). Every image start is checked to be a cache hit, off the
// clock: the driver's "Using cached image <digest>" event and no "Pulled
// image", at most one manifest GET at the registry, and still exactly one
// tree in the cache.
// Metrics (medians):
//
//	image-start-s, rootfs-start-s  StartTask returned
//	image-exit-s, rootfs-exit-s    StartTask called -> exit result
//	image-cycle-s, rootfs-cycle-s  exit result + DestroyTask
//	ratio                          image-cycle-s / rootfs-cycle-s (target: at most 1.10)
//	ratio-paired                   median of each interleaved pair's image / rootfs cycle
//	ratio-start                    image-start-s / rootfs-start-s
//	image-cpu-s, rootfs-cpu-s      CPU of a cycle (see benchRun.cpu)
//	pull-s                         the one-time pull and unpack (image.Image.PullTime)
//	manifest-gets/start            registry manifest GETs per timed image start
//	lost-exit                      cycles whose exit status WaitTask lost (should be 0)
//
// After the loop, off the clock, it splits the image's extra work:
//
//	cached-get-ms      Driver.pullImage on the cached digest (what StartTask
//	                   does for an image instead of resolving a rootfs)
//	registry-check-ms  the registry part of it, done outside the driver the
//	                   same way (a new go-containerregistry Puller and a
//	                   HEAD of the digest over a kept transport)
//	resolve-rootfs-ms  Driver.resolveRootfs, what the rootfs task does instead
//
// The registry check is made on every start, cached or not (a ping of /v2/
// and a HEAD of the manifest; to a plain-HTTP loopback registry the ping
// first tries HTTPS), so on loopback it costs about a millisecond, but
// against a real registry each cached start pays those round trips.
func BenchmarkStartTask_CachedImage(b *testing.B) {
	var ids []string
	// Registered first, so it runs after every other cleanup and sees
	// what they left of the sandboxes.
	b.Cleanup(func() { benchCheckGone(b, ids) })
	// Before newBenchEnv: the registry stops after the driver's cleanup.
	reg := testutil.StartRegistry(b)
	e := newBenchEnv(b, false)
	e.d.config.AllowedRegistries = []string{reg.Host} // a loopback registry must be named
	ev := e.watchEvents(b)

	_, ref := reg.Push(b, "bench/busybox", "1", testutil.BusyboxImage(b, v1.Config{}))
	digest := ref[strings.LastIndex(ref, "@")+1:]
	imageTC := TaskConfig{Image: ref, Command: "/bin/true", ReadonlyRootfs: true, Tmpfs: []string{"/tmp"}}
	rootfsTC := TaskConfig{Rootfs: e.rootfs, Command: "/bin/true", ReadonlyRootfs: true, Tmpfs: []string{"/tmp"}}
	imageDir := e.d.config.ImageDir

	// The one pull, through the driver's own path.
	pullCfg := e.taskConfigWith(b, "true", imageTC)
	m0 := reg.Manifests.Load()
	img, err := e.d.pullImage(pullCfg, &imageTC)
	if err != nil {
		b.Fatalf("pull %s: %v", ref, err)
	}
	if !img.Pulled || img.Digest != digest {
		b.Fatalf("first Get of %s: pulled %v, digest %s: want a pull of %s", ref, img.Pulled, img.Digest, digest)
	}
	if reg.Manifests.Load() == m0 {
		b.Fatal("the first pull made no manifest GET at the registry")
	}
	if err := benchOneTree(imageDir); err != nil {
		b.Fatal(err)
	}
	if err := benchTreeDiff(img.Rootfs, e.rootfs); err != nil {
		b.Fatalf("the image's tree %s is not the rootfs %s: %v", img.Rootfs, e.rootfs, err)
	}
	pull := img.PullTime

	gets, maxGets := int64(0), int64(0)
	imageRun := func() benchRun {
		cfg := e.taskConfigWith(b, "true", imageTC)
		ids = append(ids, sandboxID(cfg))
		before := reg.Manifests.Load()
		r := e.runCycle(b, cfg)
		b.StopTimer()
		n := reg.Manifests.Load() - before
		gets += n
		maxGets = max(maxGets, n)
		if n > 1 {
			b.Fatalf("image start %s made %d manifest GETs at the registry: not a cache hit", cfg.ID, n)
		}
		if _, ok := ev.wait(cfg.ID, "Using cached image "+digest, 5*time.Second); !ok {
			b.Fatalf("image start %s: no \"Using cached image %s\" event; events: %q", cfg.ID, digest, ev.messages(cfg.ID))
		}
		if m, ok := ev.find(cfg.ID, "Pulled image"); ok {
			b.Fatalf("image start %s pulled the image again: %q", cfg.ID, m)
		}
		if err := benchOneTree(imageDir); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		return r
	}
	rootfsRun := func() benchRun {
		cfg := e.taskConfigWith(b, "true", rootfsTC)
		ids = append(ids, sandboxID(cfg))
		return e.runCycle(b, cfg)
	}

	// Untimed warm-up of both paths: page cache, the runsc root's null
	// netns, the registry connection. (b.Loop resets the timer.)
	imageRun()
	rootfsRun()
	gets, maxGets = 0, 0

	var imgs, roots []benchRun
	i := 0
	for b.Loop() {
		for k := 0; k < benchCachedPairs; k++ {
			// Alternate the order so that neither always runs second.
			if i%2 == 0 {
				imgs = append(imgs, imageRun())
				roots = append(roots, rootfsRun())
			} else {
				roots = append(roots, rootfsRun())
				imgs = append(imgs, imageRun())
			}
			i++
		}
	}
	b.StopTimer()

	// A pair with a lost exit status has no meaningful times: left out,
	// and counted.
	var gi, gr []benchRun
	var pairs []float64
	cycle := func(r benchRun) time.Duration { return r.exit + r.destroy }
	for i := range imgs {
		if imgs[i].lostExit || roots[i].lostExit {
			continue
		}
		gi, gr = append(gi, imgs[i]), append(gr, roots[i])
		pairs = append(pairs, cycle(imgs[i]).Seconds()/cycle(roots[i]).Seconds())
	}
	lost := len(imgs) - len(gi)
	if lost > 0 {
		msg := fmt.Sprintf("WARNING: %d of %d pairs had a task whose exit status WaitTask lost (\"left no exit status\"); they are left out of the timings", lost, len(imgs))
		b.Log(msg)
		fmt.Println("SUMMARY " + msg)
	}
	if len(gi) == 0 {
		b.Fatal("every pair lost an exit status: no timing to report")
	}
	med := func(rs []benchRun, f func(benchRun) time.Duration) time.Duration {
		ds := make([]time.Duration, 0, len(rs))
		for _, r := range rs {
			ds = append(ds, f(r))
		}
		return benchMedian(ds)
	}
	start := func(r benchRun) time.Duration { return r.start }
	exit := func(r benchRun) time.Duration { return r.exit }
	cpu := func(r benchRun) time.Duration { return r.cpu }
	iStart, rStart := med(gi, start), med(gr, start)
	iExit, rExit := med(gi, exit), med(gr, exit)
	iCycle, rCycle := med(gi, cycle), med(gr, cycle)
	iCPU, rCPU := med(gi, cpu), med(gr, cpu)
	ratio := iCycle.Seconds() / rCycle.Seconds()

	// Where the image's extra time can go, off the clock and interleaved:
	// the driver's whole cached Get, its registry round trips alone, and
	// what the rootfs task does instead.
	ctx := context.Background()
	tr := &benchCountingTransport{inner: remote.DefaultTransport.(*http.Transport).Clone()}
	var getT, headT, resolveT []time.Duration
	m1 := reg.Manifests.Load()
	const diagN = 21
	for j := 0; j < diagN; j++ {
		t0 := time.Now()
		im, err := e.d.pullImage(pullCfg, &imageTC)
		getT = append(getT, time.Since(t0))
		if err != nil || im.Pulled {
			b.Fatalf("cached Get of %s: pulled %v, %v", ref, im != nil && im.Pulled, err)
		}
		t0 = time.Now()
		err = benchRegistryHead(ctx, ref, tr)
		headT = append(headT, time.Since(t0))
		if err != nil {
			b.Fatalf("HEAD %s: %v", ref, err)
		}
		t0 = time.Now()
		if _, err := e.d.resolveRootfs(pullCfg, e.rootfs); err != nil {
			b.Fatalf("resolveRootfs: %v", err)
		}
		resolveT = append(resolveT, time.Since(t0))
	}
	diagGets := reg.Manifests.Load() - m1
	getMed, headMed, resolveMed := benchMedian(getT), benchMedian(headT), benchMedian(resolveT)
	reqs := tr.requests()
	perHead := float64(len(reqs)) / diagN
	if err := benchOneTree(imageDir); err != nil {
		b.Fatal(err)
	}

	ms := func(d time.Duration) float64 { return d.Seconds() * 1000 }
	b.ReportMetric(iStart.Seconds(), "image-start-s")
	b.ReportMetric(rStart.Seconds(), "rootfs-start-s")
	b.ReportMetric(iExit.Seconds(), "image-exit-s")
	b.ReportMetric(rExit.Seconds(), "rootfs-exit-s")
	b.ReportMetric(iCycle.Seconds(), "image-cycle-s")
	b.ReportMetric(rCycle.Seconds(), "rootfs-cycle-s")
	b.ReportMetric(ratio, "ratio")
	b.ReportMetric(benchMedianF(pairs), "ratio-paired")
	b.ReportMetric(iStart.Seconds()/rStart.Seconds(), "ratio-start")
	b.ReportMetric(iCPU.Seconds(), "image-cpu-s")
	b.ReportMetric(rCPU.Seconds(), "rootfs-cpu-s")
	b.ReportMetric(pull.Seconds(), "pull-s")
	b.ReportMetric(float64(gets)/float64(len(imgs)), "manifest-gets/start")
	b.ReportMetric(ms(getMed), "cached-get-ms")
	b.ReportMetric(ms(headMed), "registry-check-ms")
	b.ReportMetric(ms(resolveMed), "resolve-rootfs-ms")
	b.ReportMetric(float64(lost), "lost-exit")

	verdict := "within"
	if ratio > 1.10 {
		verdict = "OVER"
	}
	summary := fmt.Sprintf("cached image vs local rootfs, /bin/true: cycle (StartTask -> exit result -> DestroyTask) image %.3fs vs rootfs %.3fs, ratio %.3f (%s the 1.10 target; paired %.3f) | StartTask %.3fs vs %.3fs (%+.1f ms), to exit %.3fs vs %.3fs | CPU %.3fs vs %.3fs | one-time pull+unpack %.3fs (%.1f MiB tree) | cache hits checked: %d manifest GETs in %d timed image starts (at most %d in one), one tree in the cache | image's extra work, off the clock, median of %d: cached Get %.2f ms, of which the registry check (new Puller + HEAD: %.1f requests, %s) %.2f ms; rootfs resolve instead %.3f ms; %d manifest GETs in those Gets | medians of %d interleaved pairs, loadavg %s",
		iCycle.Seconds(), rCycle.Seconds(), ratio, verdict, benchMedianF(pairs),
		iStart.Seconds(), rStart.Seconds(), ms(iStart-rStart), iExit.Seconds(), rExit.Seconds(),
		iCPU.Seconds(), rCPU.Seconds(), pull.Seconds(), float64(img.Size)/(1<<20),
		gets, len(imgs), maxGets, diagN, ms(getMed), perHead, benchRequestKinds(reqs), ms(headMed), ms(resolveMed), diagGets,
		len(gi), benchLoadavg())
	b.Log(summary)
	fmt.Println("SUMMARY " + summary)
}

// benchEvents collects the driver's task events by task ID.
type benchEvents struct {
	mu   sync.Mutex
	msgs map[string][]string
}

// watchEvents subscribes to the driver's task events until the benchmark
// ends.
func (e *benchEnv) watchEvents(b *testing.B) *benchEvents {
	b.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	b.Cleanup(cancel)
	ch, err := e.d.TaskEvents(ctx)
	if err != nil {
		b.Fatal(err)
	}
	ev := &benchEvents{msgs: map[string][]string{}}
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case te, ok := <-ch:
				if !ok {
					return
				}
				ev.mu.Lock()
				ev.msgs[te.TaskID] = append(ev.msgs[te.TaskID], te.Message)
				ev.mu.Unlock()
			}
		}
	}()
	return ev
}

func (ev *benchEvents) messages(taskID string) []string {
	ev.mu.Lock()
	defer ev.mu.Unlock()
	return append([]string(nil), ev.msgs[taskID]...)
}

// find returns the first event of taskID containing s.
func (ev *benchEvents) find(taskID, s string) (string, bool) {
	for _, m := range ev.messages(taskID) {
		if strings.Contains(m, s) {
			return m, true
		}
	}
	return "", false
}

// wait is find, waiting up to timeout for the event to arrive.
func (ev *benchEvents) wait(taskID, s string, timeout time.Duration) (string, bool) {
	deadline := time.Now().Add(timeout)
	for {
		if m, ok := ev.find(taskID, s); ok || time.Now().After(deadline) {
			return m, ok
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// benchOneTree fails unless the image cache under dir holds exactly one
// unpacked image.
func benchOneTree(dir string) error {
	entries, err := os.ReadDir(filepath.Join(dir, "images", "sha256"))
	if err != nil {
		return fmt.Errorf("image cache: %w", err)
	}
	if len(entries) != 1 {
		var names []string
		for _, ent := range entries {
			names = append(names, ent.Name())
		}
		return fmt.Errorf("image cache holds %d trees, want 1: %v", len(entries), names)
	}
	return nil
}

// benchTreeDiff compares two directory trees by their entries' names,
// types, sizes of regular files and symlink targets.
func benchTreeDiff(a, b string) error {
	list := func(root string) (map[string]string, error) {
		out := map[string]string{}
		err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(root, p)
			fi, err := d.Info()
			if err != nil {
				return err
			}
			desc := fi.Mode().Type().String()
			switch {
			case fi.Mode().IsRegular():
				desc += fmt.Sprintf(" %d", fi.Size())
			case fi.Mode()&os.ModeSymlink != 0:
				t, err := os.Readlink(p)
				if err != nil {
					return err
				}
				desc += " -> " + t
			}
			out[rel] = desc
			return nil
		})
		return out, err
	}
	la, err := list(a)
	if err != nil {
		return err
	}
	lb, err := list(b)
	if err != nil {
		return err
	}
	var diffs []string
	for k, v := range la {
		if lb[k] != v {
			diffs = append(diffs, fmt.Sprintf("%s: %q vs %q", k, v, lb[k]))
		}
	}
	for k, v := range lb {
		if _, ok := la[k]; !ok {
			diffs = append(diffs, fmt.Sprintf("%s: missing vs %q", k, v))
		}
	}
	if len(diffs) > 0 {
		sort.Strings(diffs)
		if len(diffs) > 5 {
			diffs = append(diffs[:5], fmt.Sprintf("and %d more", len(diffs)-5))
		}
		return errors.New(strings.Join(diffs, "; "))
	}
	return nil
}

// benchCountingTransport records the requests it carries.
type benchCountingTransport struct {
	inner http.RoundTripper
	mu    sync.Mutex
	reqs  []string // "METHOD scheme://host/path"
}

func (t *benchCountingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	t.mu.Lock()
	t.reqs = append(t.reqs, req.Method+" "+req.URL.Scheme+"://"+req.URL.Host+req.URL.Path)
	t.mu.Unlock()
	return t.inner.RoundTrip(req)
}

func (t *benchCountingTransport) requests() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]string(nil), t.reqs...)
}

// benchRegistryHead checks a digest at the registry the way the image
// store does for every registry reference, cached or not: a new Puller (so
// a new ping of /v2/) and a HEAD of the manifest.
func benchRegistryHead(ctx context.Context, ref string, tr http.RoundTripper) error {
	r, err := name.ParseReference(ref)
	if err != nil {
		return err
	}
	p, err := remote.NewPuller(remote.WithTransport(tr), remote.WithUserAgent("nomad-driver-sandbox-bench"))
	if err != nil {
		return err
	}
	_, err = p.Head(ctx, r)
	return err
}

// benchRequestKinds sums requests up by method, scheme and path shape,
// e.g. "GET http /v2/ x21, HEAD http manifest x21".
func benchRequestKinds(reqs []string) string {
	n := map[string]int{}
	for _, r := range reqs {
		method, url, _ := strings.Cut(r, " ")
		scheme, rest, _ := strings.Cut(url, "://")
		path := "/"
		if i := strings.Index(rest, "/"); i >= 0 {
			path = rest[i:]
		}
		switch {
		case strings.Contains(path, "/manifests/"):
			path = "manifest"
		case strings.Contains(path, "/blobs/"):
			path = "blob"
		}
		n[method+" "+scheme+" "+path]++
	}
	var out []string
	for k, v := range n {
		out = append(out, fmt.Sprintf("%s x%d", k, v))
	}
	sort.Strings(out)
	return strings.Join(out, ", ")
}

// benchPhases split one driver cycle by timestamps the benchmark sees
// without touching the driver: a wrapper standing in for runsc logs when
// each runsc command begins and ends, and the supervisor's exit status has
// StartedAt (taken just before the sandbox's first runsc command) and
// CompletedAt (sandbox reaped, before the supervisor's `runsc delete`).
// The supervisor starts the sandbox either with `runsc create` and `runsc
// start`, or with a single `runsc run --detach` (detached: create holds
// that command, gap and start are 0).
type benchPhases struct {
	ok       bool
	lost     bool          // the exit status was lost: result is meaningless
	detached bool          // started by `runsc run --detach`
	prep     time.Duration // StartTask called -> `runsc create` began (the sum of the next three)
	plugin   time.Duration // StartTask called -> supervisor wrapper runs: decode, checks, task files, bundle, spec, fork/exec (and bash start)
	supInit  time.Duration // -> supervisor about to run `runsc create`: exec, Go init, spec, pid file, socket, pipes
	execCrt  time.Duration // -> `runsc create` began: exec of the runsc wrapper (bash)
	create   time.Duration // `runsc create` (detached: `runsc run --detach`)
	gap      time.Duration // create ended -> `runsc start` began
	start    time.Duration // `runsc start`
	ready    time.Duration // start (detached: run) ended -> StartTask returned (ready pipe)
	run      time.Duration // StartTask returned -> sandbox reaped by the supervisor
	toDelete time.Duration // sandbox reaped -> the supervisor's `runsc delete` began (output relays)
	delete   time.Duration // the supervisor's `runsc delete --force`
	result   time.Duration // that delete ended -> WaitTask's result (exit.json, socket, handle)
	// destroy lists the runsc commands DestroyTask ran; destroyRunsc is
	// their total time.
	destroy      []string
	destroyRunsc time.Duration
}

// BenchmarkStartTask_Phases is BenchmarkStartTask_True with runsc_path
// pointing at a bash wrapper that timestamps every runsc command, to show
// where the driver's time goes (metrics in ms, medians). The wrapper adds a
// bash start to each runsc command, so use BenchmarkStartTask_True for the
// ratio. It also times, outside the driver, two parts of "prep": executing
// the supervisor binary up to its first failure (exec and Go init), and
// runtime.WriteBundle.
func BenchmarkStartTask_Phases(b *testing.B) {
	e := newBenchEnv(b, true)
	e.runTrue(b)
	var ph []benchPhases
	lost := 0
	for b.Loop() {
		r := e.runTrue(b)
		if !r.phases.ok {
			raw, _ := os.ReadFile(e.wrapLog)
			b.Fatalf("could not split the cycle from the wrapper's log %s:\n%s", e.wrapLog, raw)
		}
		if r.lostExit {
			lost++
		}
		ph = append(ph, r.phases)
	}
	b.StopTimer()
	steps := []struct {
		name string
		f    func(benchPhases) time.Duration
	}{
		{"prep", func(p benchPhases) time.Duration { return p.prep }},
		{"prep-plugin", func(p benchPhases) time.Duration { return p.plugin }},
		{"prep-supervisor", func(p benchPhases) time.Duration { return p.supInit }},
		{"prep-exec-create", func(p benchPhases) time.Duration { return p.execCrt }},
		{"create", func(p benchPhases) time.Duration { return p.create }},
		{"gap", func(p benchPhases) time.Duration { return p.gap }},
		{"start", func(p benchPhases) time.Duration { return p.start }},
		{"ready", func(p benchPhases) time.Duration { return p.ready }},
		{"run", func(p benchPhases) time.Duration { return p.run }},
		{"to-delete", func(p benchPhases) time.Duration { return p.toDelete }},
		{"delete", func(p benchPhases) time.Duration { return p.delete }},
		{"result", func(p benchPhases) time.Duration { return p.result }},
		{"destroy-runsc", func(p benchPhases) time.Duration { return p.destroyRunsc }},
	}
	detached := 0
	for _, p := range ph {
		if p.detached {
			detached++
		}
	}
	if detached == len(ph) {
		// One `runsc run --detach`: report it under its own name, with
		// no separate start.
		var kept []struct {
			name string
			f    func(benchPhases) time.Duration
		}
		for _, s := range steps {
			switch s.name {
			case "create":
				s.name = "run-detach"
			case "gap", "start":
				continue
			case "prep-exec-create":
				s.name = "prep-exec-run"
			}
			kept = append(kept, s)
		}
		steps = kept
	}
	var parts []string
	for _, s := range steps {
		ds := make([]time.Duration, 0, len(ph))
		for _, p := range ph {
			if s.name == "result" && p.lost {
				continue
			}
			ds = append(ds, s.f(p))
		}
		if len(ds) == 0 {
			continue
		}
		v := benchMedian(ds).Seconds() * 1000
		b.ReportMetric(v, s.name+"-ms")
		parts = append(parts, fmt.Sprintf("%s %.1f", s.name, v))
	}

	supExec := e.timeSupervisorExec(b, e.exe)
	pluginExec := time.Duration(0)
	if plugin := benchPluginBinary(b); plugin != "" {
		pluginExec = e.timeSupervisorExec(b, plugin)
		b.ReportMetric(pluginExec.Seconds()*1000, "plugin-binary-supervisor-exec-ms")
	}
	bundleDir := filepath.Join(e.dir, "bundle-timing")
	if err := os.MkdirAll(bundleDir, 0o700); err != nil {
		b.Fatal(err)
	}
	var bw []time.Duration
	for i := 0; i < 5; i++ {
		t0 := time.Now()
		if err := runtime.WriteBundle(bundleDir, e.bareConfig); err != nil {
			b.Fatal(err)
		}
		bw = append(bw, time.Since(t0))
	}
	// The fixed cost of one runsc command: exec of the static binary and
	// its init, with no sandbox work (`list` of an empty root).
	var rx []time.Duration
	for i := 0; i < 5; i++ {
		t0 := time.Now()
		if _, err := e.bare.List(context.Background()); err != nil {
			b.Fatal(err)
		}
		rx = append(rx, time.Since(t0))
	}
	runscExec := benchMedian(rx)
	b.ReportMetric(runscExec.Seconds()*1000, "runsc-exec-ms")
	b.ReportMetric(supExec.Seconds()*1000, "supervisor-exec-ms")
	b.ReportMetric(benchMedian(bw).Seconds()*1000, "write-bundle-ms")

	seen := map[string]int{}
	for _, p := range ph {
		seen[strings.Join(p.destroy, "+")]++
	}
	var dc []string
	for c, n := range seen {
		dc = append(dc, fmt.Sprintf("[%s] x%d", c, n))
	}
	sort.Strings(dc)
	pluginNote := "bin/plugins/sandbox not built"
	if pluginExec > 0 {
		pluginNote = fmt.Sprintf("%.1f with bin/plugins/sandbox", pluginExec.Seconds()*1000)
	}
	startedBy := "runsc create + start"
	switch {
	case detached == len(ph):
		startedBy = "runsc run --detach"
	case detached > 0:
		startedBy = fmt.Sprintf("runsc run --detach in %d cycles (create = run there), create + start in the others", detached)
	}
	line := fmt.Sprintf("driver phases, median ms of %d (runsc and supervisor behind timestamping bash wrappers; sandbox started by %s): %s | outside the driver: supervisor exec+init %.1f (test binary; %s), WriteBundle %.1f, one runsc command's fixed cost (runsc list) %.1f | DestroyTask ran runsc: %s",
		len(ph), startedBy, strings.Join(parts, ", "), supExec.Seconds()*1000, pluginNote, benchMedian(bw).Seconds()*1000, runscExec.Seconds()*1000, strings.Join(dc, ", "))
	if lost > 0 {
		line += fmt.Sprintf(" | WARNING: %d cycles lost their exit status (left out of \"result\")", lost)
	}
	b.Log(line)
	fmt.Println("SUMMARY " + line)
}

// timeSupervisorExec times starting the supervisor binary the way
// Supervisor.Start does (ready pipe on fd 3, own session) on a state
// directory without a spec: exec, Go runtime and package init, the failed
// read, the error on the pipe, exit.
func (e *benchEnv) timeSupervisorExec(b *testing.B, exe string) time.Duration {
	b.Helper()
	var ds []time.Duration
	for i := 0; i < 5; i++ {
		rd, wr, err := os.Pipe()
		if err != nil {
			b.Fatal(err)
		}
		cmd := exec.Command(exe, runtime.SupervisorArg, filepath.Join(e.dir, "no-such-state-dir"))
		cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
		cmd.ExtraFiles = []*os.File{wr}
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		t0 := time.Now()
		err = cmd.Start()
		wr.Close()
		if err != nil {
			rd.Close()
			b.Fatal(err)
		}
		line, _ := bufio.NewReader(rd).ReadString('\n')
		ds = append(ds, time.Since(t0))
		rd.Close()
		_ = cmd.Wait()
		if !strings.HasPrefix(line, "error: ") {
			b.Fatalf("supervisor without a spec said %q", line)
		}
	}
	return benchMedian(ds)
}

// benchWrapper logs "B|E <epoch seconds> <pid> <verb> [status]" around each
// runsc command to the file %[1]q, and otherwise is runsc (%[2]q).
const benchWrapper = `#!/bin/bash
verb=
for a in "$@"; do
	case "$a" in create|start|run|delete|state|list|kill|events|exec|wait|--version) verb=$a; break;; esac
done
echo "B $EPOCHREALTIME $$ $verb" >> %[1]q
%[2]q "$@"
rc=$?
echo "E $EPOCHREALTIME $$ $verb $rc" >> %[1]q
exit $rc
`

// benchSupervisorWrapper logs "S <epoch seconds> <pid>" to the file %[1]q
// and becomes the supervisor (%[2]q), keeping its pid and arguments.
const benchSupervisorWrapper = `#!/bin/bash
echo "S $EPOCHREALTIME $$" >> %[1]q
exec %[2]q "$@"
`

type benchCall struct {
	verb       string
	begin, end time.Time
}

func readBenchCalls(path string) []benchCall {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	open := map[string]*benchCall{}
	var out []benchCall
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 {
			continue
		}
		sec, frac, _ := strings.Cut(f[1], ".")
		s, err1 := strconv.ParseInt(sec, 10, 64)
		us, err2 := strconv.ParseInt((frac + "000000")[:6], 10, 64)
		if err1 != nil || err2 != nil {
			continue
		}
		ts := time.Unix(s, us*1000)
		verb := ""
		if len(f) > 3 {
			verb = f[3]
		}
		switch f[0] {
		case "S":
			out = append(out, benchCall{verb: "supervisor", begin: ts, end: ts})
		case "B":
			open[f[2]] = &benchCall{verb: verb, begin: ts}
		case "E":
			if c := open[f[2]]; c != nil {
				c.end = ts
				out = append(out, *c)
				delete(open, f[2])
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].begin.Before(out[j].begin) })
	return out
}

func wrapperPhases(path string, t0 time.Time, r benchRun, st *runtime.ExitStatus) benchPhases {
	var p benchPhases
	startRet, exitRet := t0.Add(r.start), t0.Add(r.exit)
	var sup, create, start, run, del *benchCall
	calls := readBenchCalls(path)
	for i := range calls {
		c := &calls[i]
		switch {
		case c.verb == "supervisor":
			sup = c
		case !c.begin.Before(r.destroyAt):
			p.destroy = append(p.destroy, c.verb)
			p.destroyRunsc += c.end.Sub(c.begin)
		case c.verb == "create" && create == nil:
			create = c
		case c.verb == "start" && start == nil:
			start = c
		case c.verb == "run" && run == nil:
			run = c
		case c.verb == "delete" && del == nil:
			del = c
		}
	}
	if create == nil && start == nil && run != nil {
		// `runsc run --detach`: one command creates and starts.
		p.detached = true
		create, start = run, &benchCall{verb: "start", begin: run.end, end: run.end}
	}
	if sup == nil || create == nil || start == nil || del == nil {
		return p
	}
	p.prep = create.begin.Sub(t0)
	p.plugin = sup.begin.Sub(t0)
	p.supInit = st.StartedAt.Sub(sup.begin)
	p.execCrt = create.begin.Sub(st.StartedAt)
	p.create = create.end.Sub(create.begin)
	p.gap = start.begin.Sub(create.end)
	p.start = start.end.Sub(start.begin)
	p.ready = startRet.Sub(start.end)
	p.run = st.CompletedAt.Sub(startRet)
	p.toDelete = del.begin.Sub(st.CompletedAt)
	p.delete = del.end.Sub(del.begin)
	p.result = exitRet.Sub(del.end)
	p.lost = r.lostExit
	p.ok = true
	return p
}

// BenchmarkTaskMemory starts a `sleep` task per iteration, measures the
// resident memory of its sandbox and of its supervisor, and destroys it.
// After the loop it reports this process's own VmRSS as an approximation
// of the plugin's: it is the test binary (the driver plus the testing
// framework) after all the tasks this benchmark ran. Metrics (medians):
//
//	sandbox-RSS-MiB     sum of VmRSS of the sandbox's processes: those whose
//	                    command line names the sandbox (runsc-sandbox,
//	                    runsc-gofer) and their children (systrap stubs);
//	                    pages they share are counted once per process
//	sandbox-PSS-MiB     the same processes' proportional set size (shared
//	                    pages split between their users)
//	supervisor-RSS-MiB  the task's supervisor (this test binary re-executed;
//	                    the plugin binary in production)
//	plugin-RSS-MiB      VmRSS of this benchmark process, after GC
func BenchmarkTaskMemory(b *testing.B) {
	e := newBenchEnv(b, false)
	var sbRSS, sbPSS, supRSS []float64
	var procs []benchProc
	for b.Loop() {
		cfg := e.taskConfig(b, "sleep", "/bin/sleep", "60")
		if _, _, err := e.d.StartTask(cfg); err != nil {
			b.Fatalf("StartTask: %v", err)
		}
		e.started[cfg.ID] = true
		b.StopTimer()
		sdir := e.stateDirOf(b, cfg.ID)
		id := filepath.Base(sdir)
		// Let the sandbox settle after `runsc start` returned.
		time.Sleep(300 * time.Millisecond)
		supPid := benchReadPid(filepath.Join(sdir, "supervisor.pid"))
		procs = benchSandboxProcs(id, supPid)
		if len(procs) == 0 {
			b.Fatalf("no process found for sandbox %s%s", id, benchPostMortem(sdir))
		}
		var rss, pss float64
		for _, p := range procs {
			rss += p.rssKiB / 1024
			pss += p.pssKiB / 1024
		}
		sbRSS, sbPSS = append(sbRSS, rss), append(sbPSS, pss)
		supRSS = append(supRSS, benchProcField(fmt.Sprintf("/proc/%d/status", supPid), "VmRSS")/1024)
		b.StartTimer()
		if err := e.d.DestroyTask(cfg.ID, true); err != nil {
			b.Fatalf("DestroyTask: %v", err)
		}
		delete(e.started, cfg.ID)
	}
	b.StopTimer()
	goruntime.GC()
	plugin := benchProcField("/proc/self/status", "VmRSS") / 1024
	var ms goruntime.MemStats
	goruntime.ReadMemStats(&ms)
	b.ReportMetric(benchMedianF(sbRSS), "sandbox-RSS-MiB")
	b.ReportMetric(benchMedianF(sbPSS), "sandbox-PSS-MiB")
	b.ReportMetric(benchMedianF(supRSS), "supervisor-RSS-MiB")
	b.ReportMetric(plugin, "plugin-RSS-MiB")
	idleNote := "bin/plugins/sandbox not built (make build)"
	if idle := benchPluginIdleRSS(b, e.dir); idle > 0 {
		b.ReportMetric(idle, "plugin-binary-idle-RSS-MiB")
		idleNote = fmt.Sprintf("the real plugin binary idle after its handshake: VmRSS %.1f MiB", idle)
	}
	var names []string
	for _, p := range procs {
		names = append(names, fmt.Sprintf("%s %.1f", p.name, p.rssKiB/1024))
	}
	summary := fmt.Sprintf("memory per sleep task: sandbox RSS %.1f MiB (PSS %.1f MiB; last one's processes, RSS MiB: %s), supervisor RSS %.1f MiB | plugin, approximated by this test process after %d tasks: VmRSS %.1f MiB, Go heap in use %.1f MiB; %s | medians of %d",
		benchMedianF(sbRSS), benchMedianF(sbPSS), strings.Join(names, ", "), benchMedianF(supRSS),
		e.seq, plugin, float64(ms.HeapInuse)/(1<<20), idleNote, len(sbRSS))
	b.Log(summary)
	fmt.Println("SUMMARY " + summary)
}

// benchStatsSandboxes is how many running sandboxes the stats benchmarks
// sample in each round.
const benchStatsSandboxes = 8

// statsBench is benchStatsSandboxes `sleep 600` tasks started through the
// driver, kept running for one benchmark and destroyed in its cleanup.
type statsBench struct {
	e  *benchEnv
	hs []*taskHandle
}

// newStatsBench starts the sandboxes, lets them settle and checks that the
// driver's cgroup path reads real numbers from each: a sample must come from
// the cgroup (not runsc's fallback), with CPU time and at least 1 MiB of
// memory charged. Nothing of it is timed.
func newStatsBench(b *testing.B) *statsBench {
	b.Helper()
	var ids []string
	// Registered before newBenchEnv's cleanups, so it runs after them and
	// sees what they left of these sandboxes.
	b.Cleanup(func() { benchCheckGone(b, ids) })
	e := newBenchEnv(b, false)
	s := &statsBench{e: e}
	for i := 0; i < benchStatsSandboxes; i++ {
		cfg := e.taskConfig(b, fmt.Sprintf("sleep%d", i), "/bin/sleep", "600")
		ids = append(ids, sandboxID(cfg))
		if _, _, err := e.d.StartTask(cfg); err != nil {
			b.Fatalf("StartTask %s: %v", cfg.ID, err)
		}
		e.started[cfg.ID] = true
		h, ok := e.d.tasks.Get(cfg.ID)
		if !ok {
			b.Fatalf("task %s started but not in the driver's store", cfg.ID)
		}
		s.hs = append(s.hs, h)
	}
	// Let the sandboxes finish starting, so that their own CPU during the
	// rounds is what answering the samples costs them.
	time.Sleep(time.Second)
	ctx := context.Background()
	for _, h := range s.hs {
		smp, err := e.d.sample(ctx, h)
		if err != nil {
			b.Fatalf("sample %s: %v%s", h.sandboxID, err, benchPostMortem(h.stateDir))
		}
		if err := benchCheckCgroupSample(smp); err != nil {
			b.Fatalf("sandbox %s: %v (cgroup %+v)%s", h.sandboxID, err, h.spec.Cgroup, benchPostMortem(h.stateDir))
		}
	}
	return s
}

// benchCheckCgroupSample fails a sample that did not come from the cgroup
// or that reads as if nothing ran in it.
func benchCheckCgroupSample(s sample) error {
	switch {
	case !s.fromCgroup:
		return errors.New("the sample came from `runsc events`, not from the cgroup")
	case s.mem < 1<<20:
		return fmt.Errorf("cgroup memory usage %d bytes: nothing runs in it", s.mem)
	case s.cpuNs == 0:
		return errors.New("cgroup CPU time is 0: nothing runs in it")
	}
	return nil
}

// sandboxCPU is the CPU time charged to the sandboxes' cgroups so far.
func (s *statsBench) sandboxCPU(b *testing.B) time.Duration {
	b.Helper()
	var sum time.Duration
	for _, h := range s.hs {
		total, _, _, err := h.spec.Cgroup.CPUStats()
		if err != nil {
			b.Fatalf("cgroup CPU of %s: %v", h.sandboxID, err)
		}
		sum += time.Duration(total)
	}
	return sum
}

// statsCost is what a number of stats samples cost.
type statsCost struct {
	samples int
	wall    time.Duration
	self    time.Duration // this process (the plugin), user+system
	kids    time.Duration // the processes it started and reaped (runsc)
	sandbox time.Duration // charged to the sampled sandboxes' cgroups
}

// per returns d per sample in nanoseconds.
func (c statsCost) per(d time.Duration) float64 {
	if c.samples == 0 {
		return 0
	}
	return float64(d.Nanoseconds()) / float64(c.samples)
}

// cpu is the CPU the plugin spends: its own and its children's.
func (c statsCost) cpu() time.Duration { return c.self + c.kids }

func (c statsCost) report(b *testing.B) {
	b.ReportMetric(c.per(c.wall), "ns/sample")
	b.ReportMetric(c.per(c.cpu()), "cpu-ns/sample")
	b.ReportMetric(c.per(c.self), "self-cpu-ns/sample")
	b.ReportMetric(c.per(c.kids), "child-cpu-ns/sample")
	b.ReportMetric(c.per(c.sandbox), "sandbox-cpu-ns/sample")
}

// rounds samples every sandbox once per round while loop says so, and
// returns the cost. With b.Loop as loop, the rounds are what is timed.
func (s *statsBench) rounds(b *testing.B, loop func() bool, one func(*taskHandle) error) statsCost {
	b.Helper()
	sb0 := s.sandboxCPU(b)
	self0, kids0 := benchRusage()
	n := 0
	t0 := time.Now()
	for loop() {
		for _, h := range s.hs {
			if err := one(h); err != nil {
				b.Fatalf("sandbox %s: %v", h.sandboxID, err)
			}
		}
		n++
	}
	wall := time.Since(t0)
	self1, kids1 := benchRusage()
	// b.Loop has stopped the timer when it ends.
	c := statsCost{samples: n * len(s.hs), wall: wall, self: self1 - self0, kids: kids1 - kids0}
	c.sandbox = s.sandboxCPU(b) - sb0
	return c
}

// cgroupSample is one sample through the driver's own path (Driver.sample),
// which must read the cgroup and find it in use.
func (s *statsBench) cgroupSample(h *taskHandle) error {
	smp, err := s.e.d.sample(context.Background(), h)
	if err != nil {
		return err
	}
	return benchCheckCgroupSample(smp)
}

// runscSample is one `runsc events --stats` of the sandbox, as the driver
// runs it when the cgroup cannot be read.
func (s *statsBench) runscSample(h *taskHandle) error {
	st, err := s.e.d.runsc.EventsStats(context.Background(), h.sandboxID)
	if err != nil {
		return err
	}
	if st.MemoryUsage == 0 || st.Pids == 0 {
		return fmt.Errorf("runsc events reported %d bytes of memory and %d processes: nothing runs in it", st.MemoryUsage, st.Pids)
	}
	return nil
}

// benchStatsCgroup is BenchmarkStatsSample_Cgroup's result, for the ratio
// BenchmarkStatsSample_RunscEvents prints.
var benchStatsCgroup *statsCost

// BenchmarkStatsSample_Cgroup measures what TaskStats costs per sample on
// its normal path: Driver.sample reading the sandbox's host cgroup (CPU and
// memory files), no process started. One iteration is one round of samples
// over benchStatsSandboxes running `sleep 600` sandboxes, so ns/op is a
// round. Per sandbox-sample:
//
//	ns/sample              wall time
//	cpu-ns/sample          CPU of this process and its reaped children
//	                       (getrusage SELF + CHILDREN deltas)
//	self-cpu-ns/sample     this process's part
//	child-cpu-ns/sample    its children's part (none on this path)
//	sandbox-cpu-ns/sample  CPU charged to the sandboxes' cgroups during the
//	                       rounds (answering a sample, plus their idle noise)
//
// Every sample is checked to come from the cgroup and to show the sandbox's
// memory in use, so the benchmark cannot pass by reading nothing.
func BenchmarkStatsSample_Cgroup(b *testing.B) {
	s := newStatsBench(b)
	b.ReportAllocs()
	c := s.rounds(b, b.Loop, s.cgroupSample)
	c.report(b)
	benchStatsCgroup = &c
	line := fmt.Sprintf("stats via the cgroup (Driver.sample), %d samples over %d running sandboxes: %s | load %s",
		c.samples, len(s.hs), benchStatsCostText(c), benchLoadavg())
	b.Log(line)
	fmt.Println("SUMMARY " + line)
}

// BenchmarkStatsSample_RunscEvents measures the same rounds with `runsc
// events --stats` per sandbox (Runsc.EventsStats, the driver's fallback): a
// runsc process per sample, which also asks the sandbox over its control
// socket. Metrics as in BenchmarkStatsSample_Cgroup. Its SUMMARY gives the
// ratio runsc events / cgroup per sample, of wall time and of the plugin's
// CPU (self + children), against BenchmarkStatsSample_Cgroup's result, or,
// when that did not run (-bench filter), against 200 untimed cgroup rounds
// over this benchmark's own sandboxes.
func BenchmarkStatsSample_RunscEvents(b *testing.B) {
	s := newStatsBench(b)
	// Untimed warm-up: the runsc binary into the page cache, and a check
	// that every sandbox answers.
	for _, h := range s.hs {
		if err := s.runscSample(h); err != nil {
			b.Fatalf("runsc events %s: %v%s", h.sandboxID, err, benchPostMortem(h.stateDir))
		}
	}
	b.ReportAllocs()
	c := s.rounds(b, b.Loop, s.runscSample)
	c.report(b)

	ref, refNote := benchStatsCgroup, "BenchmarkStatsSample_Cgroup"
	if ref == nil {
		n := 0
		rc := s.rounds(b, func() bool { n++; return n <= 200 }, s.cgroupSample)
		ref, refNote = &rc, "200 untimed cgroup rounds over the same sandboxes"
	}
	ratio := func(x, y float64) string {
		if y <= 0 {
			return "n/a"
		}
		return fmt.Sprintf("%.0fx", x/y)
	}
	wallRatio := ratio(c.per(c.wall), ref.per(ref.wall))
	cpuRatio := ratio(c.per(c.cpu()), ref.per(ref.cpu()))
	if ref.per(ref.wall) > 0 {
		b.ReportMetric(c.per(c.wall)/ref.per(ref.wall), "wall-ratio")
	}
	if ref.per(ref.cpu()) > 0 {
		b.ReportMetric(c.per(c.cpu())/ref.per(ref.cpu()), "cpu-ratio")
	}
	line := fmt.Sprintf("stats per sample, runsc events --stats / cgroup: wall %s, CPU (self+children) %s | runsc events, %d samples over %d running sandboxes: %s | cgroup (%s): %s | load %s",
		wallRatio, cpuRatio, c.samples, len(s.hs), benchStatsCostText(c), refNote, benchStatsCostText(*ref), benchLoadavg())
	b.Log(line)
	fmt.Println("SUMMARY " + line)
}

func benchStatsCostText(c statsCost) string {
	us := func(d time.Duration) string { return fmt.Sprintf("%.1f", c.per(d)/1000) }
	return fmt.Sprintf("µs per sample: wall %s, CPU %s (self %s, children %s), sandbox-side %s",
		us(c.wall), us(c.cpu()), us(c.self), us(c.kids), us(c.sandbox))
}

// benchCgroupDirs returns the directories of c that exist: on cgroup v1, in
// every hierarchy (runsc makes its own in those it uses).
func benchCgroupDirs(c *runtime.Cgroup) []string {
	if c.V2 {
		dir := filepath.Join(c.Root, c.Path)
		if _, err := os.Stat(dir); err != nil {
			return nil
		}
		return []string{dir}
	}
	dirs, _ := filepath.Glob(filepath.Join(c.Root, "*", c.Path))
	return dirs
}

// benchRemoveCgroup removes what is left of c, waiting a little for the
// processes in it to be gone.
func benchRemoveCgroup(c *runtime.Cgroup) error {
	if c.Borrowed {
		return nil
	}
	var err error
	deadline := time.Now().Add(5 * time.Second)
	for {
		err = nil
		for _, dir := range benchCgroupDirs(c) {
			if rerr := unix.Rmdir(dir); rerr != nil && !errors.Is(rerr, unix.ENOENT) {
				err = fmt.Errorf("remove cgroup %s: %w", dir, rerr)
			}
		}
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// benchCheckGone fails the benchmark if a process or a host cgroup of one
// of the sandboxes ids is left after the cleanups, and removes it.
func benchCheckGone(b *testing.B, ids []string) {
	for _, id := range ids {
		for _, p := range benchSandboxProcs(id, 0) {
			b.Errorf("sandbox %s: process %d (%s) left behind", id, p.pid, p.name)
			_ = unix.Kill(p.pid, unix.SIGKILL)
		}
		c := taskCgroup(id)
		if dirs := benchCgroupDirs(c); len(dirs) > 0 {
			b.Errorf("sandbox %s: cgroups left behind: %v", id, dirs)
			if err := benchRemoveCgroup(c); err != nil {
				b.Error(err)
			}
		}
	}
}

// benchPluginBinary returns bin/plugins/sandbox (what `make build` makes
// and `make bench` builds first), or "" when it is not there.
func benchPluginBinary(b *testing.B) string {
	p := filepath.Join(filepath.Dir(testutil.Runsc(b)), "plugins", PluginName)
	if fi, err := os.Stat(p); err != nil || fi.IsDir() {
		return ""
	}
	return p
}

// benchPluginIdleRSS starts the real plugin binary as Nomad would (the
// go-plugin handshake cookie in its environment), waits for its handshake
// line, reads its VmRSS in MiB and kills it. It returns 0 when the binary
// is not built or does not answer.
func benchPluginIdleRSS(b *testing.B, dir string) float64 {
	b.Helper()
	exe := benchPluginBinary(b)
	if exe == "" {
		return 0
	}
	tmp := filepath.Join(dir, "plugin-tmp") // its go-plugin socket goes here
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command(exe)
	cmd.Env = []string{
		nbase.Handshake.MagicCookieKey + "=" + nbase.Handshake.MagicCookieValue,
		"TMPDIR=" + tmp,
		"PATH=/usr/sbin:/usr/bin:/sbin:/bin",
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Logf("start %s: %v", exe, err)
		return 0
	}
	defer func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}()
	got := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if strings.Contains(sc.Text(), "|grpc|") {
				got <- true
				return
			}
		}
		got <- false
	}()
	select {
	case ok := <-got:
		if !ok {
			return 0
		}
	case <-time.After(10 * time.Second):
		return 0
	}
	time.Sleep(200 * time.Millisecond)
	return benchProcField(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid), "VmRSS") / 1024
}

type benchProc struct {
	pid    int
	name   string
	rssKiB float64
	pssKiB float64
}

// benchSandboxProcs returns the processes of sandbox id, other than its
// supervisor (whose command line names the state directory, and so the
// ID): those whose command line names the sandbox, and their descendants.
func benchSandboxProcs(id string, supervisor int) []benchProc {
	entries, _ := os.ReadDir("/proc")
	parent := map[int]int{}
	in := map[int]bool{}
	for _, ent := range entries {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		parent[pid] = int(benchProcField(fmt.Sprintf("/proc/%d/status", pid), "PPid"))
		if pid == supervisor {
			continue
		}
		if cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil && bytes.Contains(cmdline, []byte(id)) {
			in[pid] = true
		}
	}
	for changed := true; changed; {
		changed = false
		for pid, pp := range parent {
			if !in[pid] && in[pp] && pid != supervisor {
				in[pid], changed = true, true
			}
		}
	}
	var out []benchProc
	for pid := range in {
		name := "stub"
		if cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); len(cmdline) > 0 {
			argv0, _, _ := bytes.Cut(cmdline, []byte{0})
			name = filepath.Base(string(argv0))
		}
		out = append(out, benchProc{
			pid:    pid,
			name:   name,
			rssKiB: benchProcField(fmt.Sprintf("/proc/%d/status", pid), "VmRSS"),
			pssKiB: benchProcField(fmt.Sprintf("/proc/%d/smaps_rollup", pid), "Pss"),
		})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].pid < out[j].pid })
	return out
}

// benchProcField returns the number after "field:" in a /proc file such as
// status or smaps_rollup (kB for memory), or 0.
func benchProcField(path, field string) float64 {
	f, err := os.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || k != field {
			continue
		}
		fs := strings.Fields(v)
		if len(fs) == 0 {
			return 0
		}
		n, _ := strconv.ParseFloat(fs[0], 64)
		return n
	}
	return 0
}

func benchReadPid(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// benchWaitReaped waits until pid is gone from /proc (a zombie stays until
// its parent reaps it).
func benchWaitReaped(pid int, timeout time.Duration) {
	if pid <= 0 {
		return
	}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err != nil {
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// benchPostMortem describes a task's state directory for a failure message.
func benchPostMortem(dir string) string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "\nstate dir %s:", dir)
	ents, _ := os.ReadDir(dir)
	for _, ent := range ents {
		sb.WriteString(" " + ent.Name())
	}
	if log, err := os.ReadFile(filepath.Join(dir, "supervisor.log")); err == nil && len(log) > 0 {
		fmt.Fprintf(&sb, "\nsupervisor.log: %s", bytes.TrimSpace(log))
	}
	if pid := benchReadPid(filepath.Join(dir, "supervisor.pid")); pid > 0 {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			stat = []byte("gone")
		}
		fmt.Fprintf(&sb, "\nsupervisor %d: %s", pid, bytes.TrimSpace(stat))
	}
	return sb.String()
}

// benchCPU is the CPU time of this process and of its reaped descendants
// (wait4 adds a child's own reaped children to it).
func benchCPU() time.Duration {
	self, kids := benchRusage()
	return self + kids
}

// benchRusage returns the user+system CPU time of this process
// (RUSAGE_SELF) and of its reaped descendants (RUSAGE_CHILDREN).
func benchRusage() (self, kids time.Duration) {
	var s, k syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &s)
	_ = syscall.Getrusage(syscall.RUSAGE_CHILDREN, &k)
	tv := func(t syscall.Timeval) time.Duration { return time.Duration(t.Nano()) }
	return tv(s.Utime) + tv(s.Stime), tv(k.Utime) + tv(k.Stime)
}

func benchLoadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func benchMedian(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func benchMedianF(fs []float64) float64 {
	if len(fs) == 0 {
		return 0
	}
	s := append([]float64(nil), fs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
