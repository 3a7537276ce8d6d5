package driver

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/client/allocdir"
	"github.com/hashicorp/nomad/helper/uuid"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"
	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/audit"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

// diskEnv is a driver whose disk images and audit log are the test's.
func diskEnv(t *testing.T, mutate func(*PluginConfig)) *testEnv {
	t.Helper()
	var dir string
	e := newTestEnv(t, func(pc *PluginConfig) {
		dir = filepath.Join(filepath.Dir(pc.StateDir), "disks")
		pc.DiskDir = dir
		pc.AuditLog = filepath.Join(filepath.Dir(pc.StateDir), "audit.log")
		pc.MaxDiskLimit = "64MiB"
		if mutate != nil {
			mutate(pc)
		}
	})
	// Registered after the env's own cleanup, so it runs before it: every
	// task is destroyed by then, and nothing of a disk may be left.
	t.Cleanup(func() { assertNoDiskLeft(t, filepath.Dir(dir)) })
	return e
}

// assertNoDiskLeft fails when a disk overlay, file system or loop device of
// the test's (whose files are all under dir) is still there.
func assertNoDiskLeft(t *testing.T, dir string) {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	must.NoError(t, err)
	for _, line := range strings.Split(string(b), "\n") {
		if strings.Contains(line, dir) && (strings.Contains(line, " - overlay ") || strings.Contains(line, " - ext4 ")) {
			t.Errorf("disk mount left behind: %s", line)
		}
	}
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, f := range files {
		if b, err := os.ReadFile(f); err == nil && strings.HasPrefix(string(b), dir) {
			t.Errorf("loop device left attached: %s -> %s", f, strings.TrimSpace(string(b)))
		}
	}
}

// exitRecords reads the sandbox_exited records of the audit log by task.
func exitRecords(t *testing.T, path string) map[string]audit.Record {
	t.Helper()
	f, err := os.Open(path)
	must.NoError(t, err)
	defer f.Close()
	out := map[string]audit.Record{}
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var r audit.Record
		must.NoError(t, json.Unmarshal(sc.Bytes(), &r))
		if r.Event == audit.EventExited {
			out[r.TaskID] = r
		}
	}
	return out
}

// A fast writer and a many-small-files writer each stop at their 16 MiB
// (ENOSPC), with the event and the audit record naming the limit: in local/
// (the task's disk), and in /alloc/data and /alloc/tmp (the allocation's).
// A neighbour allocation writes its 24 MiB meanwhile, and a write at the
// top of /alloc is refused (read-only).
func TestDisk_WritersStopAtTheLimit(t *testing.T) {
	for _, c := range []struct {
		name, big, small, full, inodes string
	}{
		{"local", "/local", "/local", "disk limit reached: local/ is full at 16MiB (disk_limit)", "inode limit reached: local/"},
		{"alloc", "/alloc/data", "/alloc/tmp", "disk limit reached: alloc/data and alloc/tmp are full at 16MiB (disk_limit)", "inode limit reached: alloc/data and alloc/tmp"},
	} {
		t.Run(c.name, func(t *testing.T) { testWritersStopAtTheLimit(t, c.big, c.small, c.full, c.inodes) })
	}
}

func testWritersStopAtTheLimit(t *testing.T, big, small, full, inodes string) {
	e := diskEnv(t, nil)
	sh := func(script string) TaskConfig {
		return readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", script}, DiskLimit: "16MiB"})
	}
	fastCfg, c1 := e.task(t, "fast", sh(fmt.Sprintf("dd if=/dev/zero of=%[1]s/big bs=1M count=64; echo dd=$?; wc -c < %[1]s/big", big)))
	defer c1()
	smallCfg, c2 := e.task(t, "small", sh(fmt.Sprintf("i=0; while echo x > %s/f$i; do i=$((i+1)); done; echo files=$i", small)))
	defer c2()
	nbTC := sh(fmt.Sprintf("i=0; while [ $i -lt 24 ]; do dd if=/dev/zero of=%s/n$i bs=1M count=1 2>/dev/null || exit 1; i=$((i+1)); done; echo neighbour-ok; echo x > /alloc/top; echo top=$?", big))
	nbTC.DiskLimit = "32MiB"
	nb, c3 := e.task(t, "neighbour", nbTC)
	defer c3()
	evFast, evSmall := e.events(t, fastCfg.ID), e.events(t, smallCfg.ID)
	for _, cfg := range []*drivers.TaskConfig{fastCfg, smallCfg, nb} {
		_, _, err := e.harness.StartTask(cfg)
		must.NoError(t, err)
		defer func(id string) { must.NoError(t, e.harness.DestroyTask(id, true)) }(cfg.ID)
	}
	for _, cfg := range []*drivers.TaskConfig{fastCfg, smallCfg, nb} {
		e.wait(cfg.ID, 60*time.Second)
	}

	out := waitLog(t, fastCfg, "stdout", has("dd="))
	waitLog(t, fastCfg, "stderr", has("No space left on device"))
	must.StrNotContains(t, out, "dd=0")
	size, err := strconv.Atoi(strings.TrimSpace(strings.SplitN(out, "\n", 2)[1]))
	must.NoError(t, err, must.Sprintf("stdout %q", out))
	must.Between(t, 8<<20, size, 16<<20)
	must.StrContains(t, evFast.waitFor(t, "Disk limit reached"), full)

	out = waitLog(t, smallCfg, "stdout", has("files="))
	n, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(out, "files=")))
	must.NoError(t, err)
	must.Between(t, 900, n, 1024)
	must.StrContains(t, evSmall.waitFor(t, "Disk limit reached"), inodes)

	out = waitLog(t, nb, "stdout", has("top="))
	must.StrContains(t, out, "neighbour-ok")
	must.StrNotContains(t, out, "top=0")
	waitLog(t, nb, "stderr", has("Read-only file system"))
	_, err = os.Lstat(filepath.Join(nb.AllocDir, "alloc", "top"))
	must.True(t, os.IsNotExist(err), must.Sprint("a write at the top of /alloc reached the host"))
	// Nomad reads what the task wrote on the host path while the
	// sandbox is there.
	host := filepath.Join(nb.TaskDir().Dir, strings.TrimPrefix(big, "/"))
	if big != "/local" {
		host = filepath.Join(nb.AllocDir, strings.TrimPrefix(big, "/"))
	}
	fi, err := os.Stat(filepath.Join(host, "n23"))
	must.NoError(t, err)
	must.Eq(t, int64(1<<20), fi.Size())

	recs := exitRecords(t, e.config.AuditLog)
	must.StrContains(t, recs[fastCfg.ID].DiskLimitReached, full)
	must.Eq(t, 16<<20, recs[fastCfg.ID].Policy.DiskLimit)
	must.Eq(t, 1024, recs[fastCfg.ID].Policy.DiskInodes)
	must.StrContains(t, recs[smallCfg.ID].DiskLimitReached, inodes)
	must.Eq(t, "", recs[nb.ID].DiskLimitReached)
}

func TestDisk_NomadFilesRestartAndCleanup(t *testing.T) {
	e := diskEnv(t, nil)
	tc := readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c",
		"cat /local/from-nomad; if [ -f /local/mine ]; then echo again >> /local/mine; else echo written > /local/mine; fi; echo ready; sleep 600"},
		DiskLimit: "16MiB"})
	cfg, cleanup := e.task(t, "keep", tc)
	defer cleanup()
	// What Nomad put in local/ before the start (an artifact, a template).
	must.NoError(t, os.WriteFile(filepath.Join(cfg.TaskDir().LocalDir, "from-nomad"), []byte("artifact\n"), 0o644))
	_, _, err := e.harness.StartTask(cfg)
	must.NoError(t, err)
	waitLog(t, cfg, "stdout", has("ready"))
	must.StrContains(t, readLog(cfg, "stdout"), "artifact")
	// Nomad (alloc fs) sees what the task wrote on the host path.
	b, err := os.ReadFile(filepath.Join(cfg.TaskDir().LocalDir, "mine"))
	must.NoError(t, err)
	must.Eq(t, "written\n", string(b))
	must.NoError(t, e.harness.DestroyTask(cfg.ID, true))
	// After the end, local/ on the host holds what the task wrote (Nomad
	// shows it), and the image is gone.
	b, err = os.ReadFile(filepath.Join(cfg.TaskDir().LocalDir, "mine"))
	must.NoError(t, err)
	must.Eq(t, "written\n", string(b))
	image := e.driver.diskImage(cfg)
	_, err = os.Stat(image)
	must.True(t, os.IsNotExist(err), must.Sprintf("image left after the task ended: %v", err))
	assertNoDiskLeft(t, filepath.Dir(e.config.DiskDir))

	// A restart: same allocation and task, a new task ID.
	first := cfg.ID
	cfg.ID = first + "-2"
	_, _, err = e.harness.StartTask(cfg)
	must.NoError(t, err)
	must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool {
		b, _ := os.ReadFile(filepath.Join(cfg.TaskDir().LocalDir, "mine"))
		return string(b) == "written\nagain\n"
	}), wait.Timeout(15*time.Second), wait.Gap(20*time.Millisecond)), must.Sprint("the restarted task did not see what it wrote before"))
	must.NoError(t, e.harness.DestroyTask(cfg.ID, true))
	b, err = os.ReadFile(filepath.Join(cfg.TaskDir().LocalDir, "mine"))
	must.NoError(t, err)
	must.Eq(t, "written\nagain\n", string(b))

	// An image whose copy failed is kept with its task directory; once
	// Nomad removes that, the sweep removes the image.
	must.NoError(t, os.WriteFile(image, nil, 0o600))
	must.NoError(t, runtime.WriteImageOwner(image, cfg.TaskDir().Dir))
	e.driver.sweep(t.Context(), false)
	_, err = os.Stat(image)
	must.NoError(t, err, must.Sprint("the sweep removed the image of a task directory that is still there"))
	cleanup()
	e.driver.sweep(t.Context(), false)
	_, err = os.Stat(image)
	must.True(t, os.IsNotExist(err), must.Sprintf("image left after its task directory went: %v", err))
}

// What the task leaves in local/ is copied back to the host when it ends,
// and the copy is no bigger on the node's disk than the task's disk: a 1
// TiB sparse file stays sparse, 200 hard links to one 4 MiB file stay one
// file; a link to a host file is copied as a link (never followed), set-id
// bits are dropped, FIFOs and devices left out, and restarts cannot add up
// past the limit.
func TestDisk_CopyBackIsBounded(t *testing.T) {
	e := diskEnv(t, nil)
	script := `cd /local
dd if=/dev/zero of=sparse bs=1 count=1 seek=1099511627775 2>/dev/null
dd if=/dev/zero of=big bs=1M count=4 2>/dev/null
i=0; while [ $i -lt 200 ]; do ln big l$i; i=$((i+1)); done
ln -s /etc/shadow shadow
echo x > suid; chmod 4755 suid
mkfifo fifo
echo done`
	cfg, cleanup := e.task(t, "bounded", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", script}, DiskLimit: "16MiB"}))
	defer cleanup()
	res := e.run(cfg)
	must.Eq(t, 0, res.ExitCode, must.Sprintf("stderr: %s", readLog(cfg, "stderr")))
	local := cfg.TaskDir().LocalDir
	used, _, err := runtime.DirUsage(local)
	must.NoError(t, err)
	must.Less(t, int64(16<<20), used, must.Sprint("the copy took more of the node's disk than the task's disk"))
	fi, err := os.Stat(filepath.Join(local, "sparse"))
	must.NoError(t, err)
	must.Eq(t, int64(1<<40), fi.Size())
	big, err := os.Stat(filepath.Join(local, "big"))
	must.NoError(t, err)
	l7, err := os.Stat(filepath.Join(local, "l7"))
	must.NoError(t, err)
	must.True(t, os.SameFile(big, l7), must.Sprint("hard links were copied as separate files"))
	to, err := os.Readlink(filepath.Join(local, "shadow"))
	must.NoError(t, err)
	must.Eq(t, "/etc/shadow", to)
	fi, err = os.Stat(filepath.Join(local, "suid"))
	must.NoError(t, err)
	must.Eq(t, os.FileMode(0o755), fi.Mode())
	_, err = os.Lstat(filepath.Join(local, "fifo"))
	must.True(t, os.IsNotExist(err))

	// A restart gets what is left of the limit: 8 MiB more does not fit.
	cfg.ID += "-2"
	tc := readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", "dd if=/dev/zero of=/local/more bs=1M count=12; echo dd=$? > /local/rc"}, DiskLimit: "16MiB", Rootfs: e.rootfs, Tmpfs: []string{"/tmp"}})
	must.NoError(t, cfg.EncodeConcreteDriverConfig(&tc))
	e.run(cfg)
	rc, err := os.ReadFile(filepath.Join(local, "rc"))
	must.NoError(t, err)
	must.StrNotContains(t, string(rc), "dd=0")
	used, _, err = runtime.DirUsage(local)
	must.NoError(t, err)
	must.Less(t, int64(16<<20), used, must.Sprint("restarts added up past the limit"))
}

func TestDisk_RefusedAboveMax(t *testing.T) {
	e := diskEnv(t, func(pc *PluginConfig) { pc.MaxDiskLimit = "32MiB" })
	for _, c := range []struct{ limit, want string }{
		{"64MiB", "max_disk_limit"},
		{"100", "not a size"},
		{"1MiB", "below the smallest disk"},
	} {
		cfg, cleanup := e.task(t, "big", readonlyDefault(TaskConfig{Command: "/bin/true", DiskLimit: c.limit}))
		_, _, err := e.harness.StartTask(cfg)
		must.ErrorContains(t, err, c.want)
		must.ErrorContains(t, err, "disk_limit")
		cleanup()
	}
	entries, _ := os.ReadDir(e.config.StateDir)
	must.SliceEmpty(t, entries)
	images, _ := filepath.Glob(filepath.Join(e.config.DiskDir, "*"))
	must.SliceEmpty(t, images)
}

// After a plugin crash (its task never recovered), the sweep removes the
// task's disk as it removes its sandbox: the overlay and the file system
// are unmounted, the loop device detached, what the task wrote is in the
// host's local/, and the image is gone.
func TestDisk_SweepAfterPluginCrash(t *testing.T) {
	e := diskEnv(t, nil)
	cfg, cleanup := e.task(t, "crash", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", "echo kept > /local/out; sleep 600"}, DiskLimit: "16MiB"}))
	defer cleanup()
	_, _, err := e.harness.StartTask(cfg)
	must.NoError(t, err)
	out := filepath.Join(cfg.TaskDir().LocalDir, "out")
	must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool {
		b, _ := os.ReadFile(out)
		return string(b) == "kept\n"
	}), wait.Timeout(15*time.Second), wait.Gap(20*time.Millisecond)))
	// The plugin goes away without destroying anything; a new one never
	// hears of the task again.
	e.driver.Shutdown()
	e.driver = e.newDriver()
	e.driver.sweep(t.Context(), true)
	assertNoDiskLeft(t, filepath.Dir(e.config.DiskDir))
	b, err := os.ReadFile(out)
	must.NoError(t, err)
	must.Eq(t, "kept\n", string(b))
	_, err = os.Stat(e.driver.diskImage(cfg))
	must.True(t, os.IsNotExist(err), must.Sprintf("image left: %v", err))
}

// sibling prepares another task of first's allocation (its task directory
// in the same allocation directory), without logs: the tests read what it
// writes in alloc/data.
func (e *testEnv) sibling(t *testing.T, first *drivers.TaskConfig, name string, tc TaskConfig) *drivers.TaskConfig {
	t.Helper()
	if tc.Rootfs == "" {
		tc.Rootfs = e.rootfs
	}
	if tc.Tmpfs == nil {
		tc.Tmpfs = []string{"/tmp"}
	}
	ad := allocdir.NewAllocDir(hclog.NewNullLogger(), filepath.Dir(first.AllocDir), first.AllocID)
	td := ad.NewTaskDir(name)
	must.NoError(t, td.Build(false, nil))
	// Build mounts a tmpfs on secrets/ and private/ (as root), which only
	// the harness's own task directory is unmounted of: plain directories
	// do here, and the allocation directory's removal takes them.
	for _, p := range []string{td.SecretsDir, td.PrivateDir} {
		must.NoError(t, unix.Unmount(p, unix.MNT_DETACH))
	}
	cfg := &drivers.TaskConfig{
		ID:        uuid.Generate(),
		AllocID:   first.AllocID,
		AllocDir:  first.AllocDir,
		Name:      name,
		JobName:   first.JobName,
		Resources: first.Resources,
	}
	must.NoError(t, cfg.EncodeConcreteDriverConfig(&tc))
	return cfg
}

// allocDiskLeft lists what of the allocation disks under the test's disk
// directory is left: images, records, locks, mount points, and holdings in
// state directories.
func allocDiskLeft(e *testEnv) []string {
	left, _ := filepath.Glob(filepath.Join(e.config.DiskDir, "alloc", "*"))
	holdings, _ := filepath.Glob(runtime.StateDir(filepath.Join(e.config.StateDir, "*")).AllocDisk())
	return append(left, holdings...)
}

// Two tasks of one allocation share alloc/data live, the second one's
// larger limit does not grow the disk (an event says so), the host path
// shows what they wrote while they run and after, the disk stays while one
// of them holds it, a restarted task sees what it wrote, and nothing of the
// disk is left when the last one is gone.
func TestAllocDisk_SharedRestartAndCleanup(t *testing.T) {
	e := diskEnv(t, nil)
	first, cleanup := e.task(t, "first", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c",
		"if [ -f /alloc/data/a ]; then echo again >> /alloc/data/a; else echo from-first > /alloc/data/a.tmp && mv /alloc/data/a.tmp /alloc/data/a; fi; while [ ! -e /alloc/data/b ]; do sleep 0.05; done; cat /alloc/data/b > /alloc/data/saw.tmp && mv /alloc/data/saw.tmp /alloc/data/first-saw; sleep 600"},
		DiskLimit: "16MiB"}))
	// Before the tasks' destroys are registered, so it runs after them
	// even when the test fails half-way.
	t.Cleanup(cleanup)
	// What Nomad put in alloc/data before (sticky data): the lower layer.
	data := filepath.Join(first.AllocDir, "alloc", "data")
	must.NoError(t, os.WriteFile(filepath.Join(data, "sticky"), []byte("sticky\n"), 0o644))
	second := e.sibling(t, first, "second", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c",
		"while [ ! -e /alloc/data/a ]; do sleep 0.05; done; cat /alloc/data/a /alloc/data/sticky > /alloc/data/b.tmp && mv /alloc/data/b.tmp /alloc/data/b; while [ ! -e /alloc/data/first-saw ]; do sleep 0.05; done; dd if=/dev/zero of=/alloc/data/big bs=1M count=24 2>/dev/null; echo dd=$? > /alloc/data/dd.rc; rm /alloc/data/big; sleep 600"},
		DiskLimit: "40MiB"}))
	evSecond := e.events(t, second.ID)
	for _, cfg := range []*drivers.TaskConfig{first, second} {
		_, _, err := e.harness.StartTask(cfg)
		must.NoError(t, err)
		t.Cleanup(func() { _ = e.harness.DestroyTask(cfg.ID, true) })
	}
	read := func(name string) string {
		b, _ := os.ReadFile(filepath.Join(data, name))
		return string(b)
	}
	waitFile := func(name, want string) {
		t.Helper()
		must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool { return read(name) == want }),
			wait.Timeout(30*time.Second), wait.Gap(20*time.Millisecond)), must.Func(func() string {
			entries, _ := os.ReadDir(data)
			var names []string
			for _, en := range entries {
				names = append(names, en.Name())
			}
			return fmt.Sprintf("alloc/data/%s is %q, not %q; alloc/data holds %v; the first's stderr: %q", name, read(name), want, names, readLog(first, "stderr"))
		}))
	}
	// Only then the second fills the disk (the first's write must not
	// meet a full disk).
	waitFile("first-saw", "from-first\nsticky\n")
	// 24 MiB do not fit in the allocation's 16 MiB, made by the first.
	waitFile("dd.rc", "dd=1\n")
	must.StrContains(t, evSecond.waitFor(t, "Allocation disk"), "disk of 16MiB, made by the task of the allocation that started first; it does not grow to this task's 40MiB")

	// The first ends; the second still holds the disk.
	must.NoError(t, e.harness.DestroyTask(first.ID, true))
	src, err := runtime.MountSource(data)
	must.NoError(t, err)
	must.StrHasPrefix(t, "nomad-sandbox-disk:alloc-", src, must.Sprint("the disk went while a task of the allocation held it"))
	must.NoError(t, e.harness.DestroyTask(second.ID, true))
	// Copied back: the host holds it all, nothing of the disk is left.
	must.Eq(t, "from-first\nsticky\n", read("b"))
	must.Eq(t, "sticky\n", read("sticky"))
	src, err = runtime.MountSource(data)
	must.NoError(t, err)
	must.Eq(t, "", src)
	must.Eq(t, []string(nil), allocDiskLeft(e))
	assertNoDiskLeft(t, filepath.Dir(e.config.DiskDir))

	// A restart of the first sees what it wrote.
	first.ID += "-2"
	_, _, err = e.harness.StartTask(first)
	must.NoError(t, err)
	waitFile("a", "from-first\nagain\n")
	must.NoError(t, e.harness.DestroyTask(first.ID, true))
	must.Eq(t, "from-first\nagain\n", read("a"))
	must.Eq(t, []string(nil), allocDiskLeft(e))
}

// A plugin killed (SIGKILL) in the middle of a task's removal leaves the
// allocation's disk mounted; the sweep of the plugin that replaces it
// copies alloc/data back and removes the disk, and when Nomad removed the
// allocation directory meanwhile, it only unmounts and removes it.
func TestAllocDisk_SweepAfterPluginCrash(t *testing.T) {
	e := diskEnv(t, nil)
	for _, gone := range []bool{false, true} {
		t.Run(fmt.Sprintf("alloc dir gone %v", gone), func(t *testing.T) {
			tc := readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", "echo kept > /alloc/data/out; sleep 600"}, DiskLimit: "16MiB", Rootfs: e.rootfs, Tmpfs: []string{"/tmp"}})
			cfg, cleanup := e.task(t, "crash", tc)
			defer cleanup()
			c := e.startChild(t, cfg, tc, crashMidDestroy, "destroy")
			c.handle(t)
			c.died(t)
			tr := e.tracesOf(t, cfg, false)
			out := filepath.Join(cfg.AllocDir, "alloc", "data", "out")
			must.NotEq(t, []string(nil), allocDiskLeft(e), must.Sprint("the crash left no disk: the test tests nothing"))
			if gone {
				gcAlloc(t, cfg)
			}
			e.driver.sweep(t.Context(), true)
			e.assertGone(t, tr)
			must.Eq(t, []string(nil), allocDiskLeft(e))
			assertNoDiskLeft(t, filepath.Dir(e.config.DiskDir))
			if !gone {
				b, err := os.ReadFile(out)
				must.NoError(t, err)
				must.Eq(t, "kept\n", string(b))
			}
		})
	}
}

// alloc/data or alloc/tmp replaced with a link to a host directory (Nomad
// makes alloc/ world-writable, so any local user can) refuses the start of
// a task with a limit, naming the directory: no overlay is mounted over
// the host directory, and nothing of a disk is left.
func TestAllocDisk_LinkedDirRefused(t *testing.T) {
	e := diskEnv(t, nil)
	for _, sub := range []string{"data", "tmp"} {
		cfg, cleanup := e.task(t, "linked", readonlyDefault(TaskConfig{Command: "/bin/true", DiskLimit: "16MiB"}))
		host := t.TempDir()
		p := filepath.Join(cfg.AllocDir, "alloc", sub)
		must.NoError(t, os.Rename(p, p+".aside"))
		must.NoError(t, os.Symlink(host, p))
		_, _, err := e.harness.StartTask(cfg)
		must.ErrorContains(t, err, "alloc/"+sub)
		src, merr := runtime.MountSource(host)
		must.NoError(t, merr)
		must.Eq(t, "", src, must.Sprint("something was mounted over the link's target"))
		must.Eq(t, []string(nil), allocDiskLeft(e))
		must.NoError(t, os.Remove(p))
		must.NoError(t, os.Rename(p+".aside", p))
		cleanup()
	}
}
