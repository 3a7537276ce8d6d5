package driver

import (
	"bufio"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/audit"
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

func TestDisk_WritersStopAtTheLimit(t *testing.T) {
	e := diskEnv(t, nil)
	sh := func(script string) TaskConfig {
		return readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", script}, DiskLimit: "16MiB"})
	}
	// A fast writer, a many-small-files writer, and a neighbour that
	// writes 24 MiB at the same time (within its own 32 MiB).
	fast, c1 := e.task(t, "fast", sh("dd if=/dev/zero of=/local/big bs=1M count=64; echo dd=$?; wc -c < /local/big"))
	defer c1()
	small, c2 := e.task(t, "small", sh("i=0; while echo x > /local/f$i; do i=$((i+1)); done; echo files=$i"))
	defer c2()
	nbTC := sh("i=0; while [ $i -lt 24 ]; do dd if=/dev/zero of=/local/n$i bs=1M count=1 2>/dev/null || exit 1; i=$((i+1)); done; echo neighbour-ok")
	nbTC.DiskLimit = "32MiB"
	nb, c3 := e.task(t, "neighbour", nbTC)
	defer c3()
	evFast, evSmall := e.events(t, fast.ID), e.events(t, small.ID)
	for _, cfg := range []*drivers.TaskConfig{fast, small, nb} {
		_, _, err := e.harness.StartTask(cfg)
		must.NoError(t, err)
		defer func(id string) { must.NoError(t, e.harness.DestroyTask(id, true)) }(cfg.ID)
	}
	for _, cfg := range []*drivers.TaskConfig{fast, small, nb} {
		e.wait(cfg.ID, 60*time.Second)
	}

	out := waitLog(t, fast, "stdout", has("dd="))
	must.StrContains(t, readLog(fast, "stderr"), "No space left on device")
	must.StrNotContains(t, out, "dd=0")
	size, err := strconv.Atoi(strings.TrimSpace(strings.SplitN(out, "\n", 2)[1]))
	must.NoError(t, err, must.Sprintf("stdout %q", out))
	must.Between(t, 8<<20, size, 16<<20)
	must.StrContains(t, evFast.waitFor(t, "Disk limit reached"), "disk limit reached: local/ is full at 16MiB (disk_limit)")

	out = waitLog(t, small, "stdout", has("files="))
	n, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(out, "files=")))
	must.NoError(t, err)
	must.Between(t, 900, n, 1024)
	must.StrContains(t, evSmall.waitFor(t, "Disk limit reached"), "inode limit reached")

	waitLog(t, nb, "stdout", has("neighbour-ok"))

	recs := exitRecords(t, e.config.AuditLog)
	must.StrContains(t, recs[fast.ID].DiskLimitReached, "disk limit reached")
	must.StrContains(t, recs[small.ID].DiskLimitReached, "inode limit reached")
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
	image := e.driver.diskImage(cfg)
	_, err = os.Stat(image)
	must.NoError(t, err, must.Sprint("the image is kept for a restart"))
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

	// Nomad removes the allocation: the sweep removes the image.
	cleanup()
	_, err = os.Stat(cfg.TaskDir().Dir)
	must.True(t, os.IsNotExist(err))
	e.driver.sweep(t.Context(), false)
	_, err = os.Stat(image)
	must.True(t, os.IsNotExist(err), must.Sprintf("image left after its task directory went: %v", err))
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

func TestDiskLimits_Validate(t *testing.T) {
	pc := &PluginConfig{DefaultDiskLimit: "1GiB", MaxDiskLimit: "16GiB", MaxDiskInodes: 100000}
	for _, c := range []struct {
		tc            TaskConfig
		bytes, inodes int64
		err           string
	}{
		{TaskConfig{}, 1 << 30, 65536, ""},
		{TaskConfig{DiskLimit: "2GiB"}, 2 << 30, 100000, ""},
		{TaskConfig{DiskLimit: "2GiB", DiskInodes: 100001}, 0, 0, "max_disk_inodes"},
		{TaskConfig{DiskLimit: "500MB", DiskInodes: 5000}, 500e6, 5000, ""},
		{TaskConfig{DiskLimit: "17GiB"}, 0, 0, "max_disk_limit"},
		{TaskConfig{DiskLimit: "2 GiB"}, 2 << 30, 100000, ""},
		{TaskConfig{DiskLimit: "2G"}, 0, 0, "not a size"},
		{TaskConfig{DiskLimit: "16MiB", DiskInodes: 50000}, 0, 0, "more than a disk of 16MiB holds"},
		{TaskConfig{DiskInodes: -1}, 0, 0, "disk_inodes -1 must be positive"},
	} {
		var lim taskLimits
		err := c.tc.diskLimits(pc, &lim)
		if c.err != "" {
			must.ErrorContains(t, err, c.err, must.Sprintf("%+v", c.tc))
			continue
		}
		must.NoError(t, err)
		must.Eq(t, c.bytes, lim.diskBytes)
		must.Eq(t, c.inodes, lim.diskInodes)
	}
	var lim taskLimits
	must.NoError(t, (&TaskConfig{}).diskLimits(&PluginConfig{DefaultDiskLimit: "0"}, &lim))
	must.Eq(t, 0, lim.diskBytes)
	must.ErrorContains(t, (&TaskConfig{DiskInodes: 10}).diskLimits(&PluginConfig{}, &lim), "disk_inodes needs a disk_limit")
	must.ErrorContains(t, (&PluginConfig{DefaultDiskLimit: "2GiB", MaxDiskLimit: "1GiB"}).validateDisk(), "above max_disk_limit")
}
