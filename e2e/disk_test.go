//go:build e2e

package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"
)

// diskLeft lists the disk mounts (overlay or file system) and loop devices
// of an allocation that are still there.
func diskLeft(allocID string) []string {
	var left []string
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if strings.Contains(line, "nomad-sandbox-disk:"+sandboxPrefix(allocID)) || strings.Contains(line, "/alloc/"+allocID+"/") && strings.Contains(line, " - overlay ") {
				left = append(left, line)
			}
		}
	}
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, f := range files {
		if b, err := os.ReadFile(f); err == nil && strings.Contains(filepath.Base(string(b)), allocID) {
			left = append(left, f+" -> "+strings.TrimSpace(string(b)))
		}
	}
	return left
}

// purgeWithoutDisks purges the jobs and waits until nothing of their disks
// is left.
func purgeWithoutDisks(t *testing.T, jobs ...*runningJob) {
	t.Helper()
	for _, j := range jobs {
		j.purge(t)
		var left []string
		must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool {
			left = diskLeft(j.allocID)
			return len(left) == 0
		}), wait.Timeout(30*time.Second), wait.Gap(250*time.Millisecond)), must.Func(func() string {
			return "disk left behind: " + strings.Join(left, "\n")
		}))
	}
}

// A task's disk_limit holds through the real agent: a fast writer and a
// many-small-files writer each stop at their 16 MiB (ENOSPC) with an event
// naming the limit, while a task of another allocation writes its 24 MiB at
// the same time; `nomad alloc fs` shows what a running task wrote; a limit above
// max_disk_limit is refused before anything starts; and nothing of the
// disks (overlay, file system, loop device) is left once the jobs stop.
func TestDiskLimit(t *testing.T) {
	defer catchPanic(t)
	job := func(script, limit string) *runningJob {
		spec := shellJob(t, "batch", script)
		spec.ExtraConfig = []string{`disk_limit = "` + limit + `"`}
		return runJob(t, spec)
	}
	fast := job("dd if=/dev/zero of=/local/big bs=1M count=64; echo dd=$?", "16MiB")
	small := job("i=0; while echo x > /local/f$i; do i=$((i+1)); done; echo files=$i", "16MiB")
	neighbour := job("i=0; while [ $i -lt 24 ]; do dd if=/dev/zero of=/local/n$i bs=1M count=1 2>/dev/null || exit 1; i=$((i+1)); done; echo neighbour-ok; while [ ! -e /alloc/data/stop ]; do sleep 0.2; done", "32MiB")
	refused := job("echo should not run", "32GiB")

	_, ts := fast.waitEnd(t, "Driver", "Disk limit reached")
	must.StrContains(t, eventWith(ts, "Driver", "Disk limit reached").text(), "16MiB (disk_limit)")
	must.NotNil(t, eventWith(ts, "Driver", "Limits applied", "disk 16MiB"), must.Sprintf("task: %s", ts))
	must.StrContains(t, fast.waitLogs(t, true, "No space left on device"), "No space left on device")
	must.StrNotContains(t, fast.waitLogs(t, false, "dd="), "dd=0")

	_, ts = small.waitEnd(t, "Driver", "inode limit reached")
	must.StrContains(t, eventWith(ts, "Driver", "inode limit reached").text(), "disk_inodes")

	neighbour.waitLogs(t, false, "neighbour-ok")
	// Nomad reads the task's local/ on the host: while the task runs, it
	// is the disk.
	res := nomadCLI(t, 30*time.Second, "", "alloc", "fs", "-stat", neighbour.allocID, "main/local/n23")
	must.Eq(t, 0, res.Code, must.Sprintf("nomad alloc fs: %s", res))
	must.StrContains(t, res.Stdout, "1.0 MiB")
	must.NoError(t, os.WriteFile(filepath.Join(neighbour.allocDir(), "alloc", "data", "stop"), nil, 0o644))
	a, ts := neighbour.waitDone(t)
	must.Eq(t, "complete", a.ClientStatus, must.Sprintf("task: %s", ts))

	a, ts = refused.waitDone(t)
	must.Eq(t, "failed", a.ClientStatus, must.Sprintf("task: %s", ts))
	must.Len(t, 0, ts.events("Started"), must.Sprintf("task: %s", ts))
	must.NotNil(t, eventWith(ts, "", "disk_limit", "max_disk_limit"), must.Sprintf("no event names max_disk_limit; task: %s", ts))

	purgeWithoutDisks(t, fast, small, neighbour, refused)
}

// The allocation's share of alloc/ holds through the real agent: a task
// writing /alloc/data as fast as it can stops at its 16 MiB with an event
// naming alloc/data and the limit, a write at the top of /alloc is refused,
// `nomad alloc fs` shows alloc/data while a task runs and after it ended,
// and nothing of the disk is left once the job is purged.
func TestAllocDiskLimit(t *testing.T) {
	defer catchPanic(t)
	spec := shellJob(t, "batch", "dd if=/dev/zero of=/alloc/data/big bs=1M count=64; echo dd=$?; if echo x > /alloc/top; then echo top-written; else echo top-refused; fi; echo kept > /alloc/data/kept")
	spec.ExtraConfig = []string{`disk_limit = "16MiB"`}
	fast := runJob(t, spec)
	spec = shellJob(t, "batch", "echo running > /alloc/data/running; while [ ! -e /alloc/data/stop ]; do sleep 0.2; done")
	spec.ExtraConfig = []string{`disk_limit = "16MiB"`}
	running := runJob(t, spec)

	_, ts := fast.waitEnd(t, "Driver", "Disk limit reached")
	must.StrContains(t, eventWith(ts, "Driver", "Disk limit reached").text(), "alloc/data and alloc/tmp are full at 16MiB (disk_limit)")
	must.StrContains(t, fast.waitLogs(t, true, "No space left on device"), "No space left on device")
	out := fast.waitLogs(t, false, "top-")
	must.StrNotContains(t, out, "dd=0")
	must.StrContains(t, out, "top-refused")
	// After the end: alloc/data on the host holds what the task wrote.
	var res cliResult
	must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool {
		res = nomadCLI(t, 30*time.Second, "", "alloc", "fs", fast.allocID, "alloc/data")
		return res.Code == 0 && strings.Contains(res.Stdout, "kept") && strings.Contains(res.Stdout, "big")
	}), wait.Timeout(30*time.Second), wait.Gap(250*time.Millisecond)), must.Func(func() string {
		return fmt.Sprintf("nomad alloc fs alloc/data: %s", res)
	}))

	// While a task runs, alloc/data is its allocation's disk.
	must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool {
		res = nomadCLI(t, 30*time.Second, "", "alloc", "fs", running.allocID, "alloc/data/running")
		return res.Code == 0 && strings.Contains(res.Stdout, "running")
	}), wait.Timeout(60*time.Second), wait.Gap(250*time.Millisecond)), must.Func(func() string {
		return fmt.Sprintf("nomad alloc fs alloc/data/running: %s", res)
	}))
	must.True(t, len(diskLeft(running.allocID)) > 0, must.Sprint("a task with a disk_limit runs without its allocation's disk"))
	must.NoError(t, os.WriteFile(filepath.Join(running.allocDir(), "alloc", "data", "stop"), nil, 0o644))
	a, ts := running.waitDone(t)
	must.Eq(t, "complete", a.ClientStatus, must.Sprintf("task: %s", ts))

	purgeWithoutDisks(t, fast, running)
}
