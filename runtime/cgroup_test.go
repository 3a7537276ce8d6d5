package runtime

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/shoenig/test/must"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

// These tests check the files the driver writes and reads on a cgroup v2
// host against a directory laid out like one: this machine runs cgroup v1,
// where the functional tests (OOM, stats) use the real kernel.

func TestCgroupV2_CreateWritesLimits(t *testing.T) {
	// Create writes its files with mode 0 (they exist on cgroupfs and must
	// never be created readable): in a plain directory only root can write
	// and read them again.
	testutil.RequireRoot(t)
	root := t.TempDir()
	c := &Cgroup{Path: "/nomad-sandbox/task-1", V2: true, Root: root}
	must.NoError(t, c.Create(&Resources{MemoryLimitBytes: 64 << 20, CPUShares: 1024, PidsLimit: 64}))
	read := func(rel string) string {
		b, err := os.ReadFile(filepath.Join(root, rel))
		must.NoError(t, err)
		return string(b)
	}
	must.Eq(t, "+memory +pids +cpu", read("cgroup.subtree_control"))
	must.Eq(t, "+memory +pids +cpu", read("nomad-sandbox/cgroup.subtree_control"))
	must.Eq(t, "67108864", read("nomad-sandbox/task-1/memory.max"))
	must.Eq(t, "0", read("nomad-sandbox/task-1/memory.swap.max"))
	// shares 1024 is weight 39 in the kernel's own mapping.
	must.Eq(t, "39", read("nomad-sandbox/task-1/cpu.weight"))
	_, err := os.Stat(filepath.Join(root, "nomad-sandbox/task-1/pids.max"))
	must.True(t, os.IsNotExist(err), must.Sprint("the pids limit lives inside gVisor, not on the host cgroup"))
}

func TestCgroupV2_BorrowedIsNotCreatedNorRemoved(t *testing.T) {
	// Create writes its files with mode 0 (they exist on cgroupfs and must
	// never be created readable): in a plain directory only root can write
	// and read them again.
	testutil.RequireRoot(t)
	root := t.TempDir()
	dir := filepath.Join(root, "nomad.slice", "alloc.task.scope")
	must.NoError(t, os.MkdirAll(dir, 0o755))
	c := &Cgroup{Path: "/nomad.slice/alloc.task.scope", V2: true, Root: root, Borrowed: true}
	must.NoError(t, c.Create(&Resources{MemoryLimitBytes: 32 << 20}))
	b, err := os.ReadFile(filepath.Join(dir, "memory.max"))
	must.NoError(t, err)
	must.Eq(t, "33554432", string(b))
	_, err = os.Stat(filepath.Join(root, "cgroup.subtree_control"))
	must.True(t, os.IsNotExist(err), must.Sprint("a borrowed cgroup's parents are Nomad's to configure"))
	must.NoError(t, c.Destroy())
	_, err = os.Stat(dir)
	must.NoError(t, err)
}

func TestCgroupV2_ReadsOOMAndStats(t *testing.T) {
	root := t.TempDir()
	c := &Cgroup{Path: "/t", V2: true, Root: root}
	dir := filepath.Join(root, "t")
	must.NoError(t, os.MkdirAll(dir, 0o755))
	write := func(name, content string) {
		must.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644))
	}
	write("memory.events", "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n")
	write("cpu.stat", "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\nnr_periods 0\n")
	write("memory.current", "1048576\n")
	write("memory.peak", "2097152\n")
	write("memory.stat", "anon 524288\nfile 0\n")

	oom, err := c.OOMKilled()
	must.NoError(t, err)
	must.True(t, oom)
	total, user, sys, err := c.CPUStats()
	must.NoError(t, err)
	must.Eq(t, []uint64{2_500_000, 2_000_000, 500_000}, []uint64{total, user, sys})
	usage, peak, rss, err := c.MemoryStats()
	must.NoError(t, err)
	must.Eq(t, []uint64{1048576, 2097152, 524288}, []uint64{usage, peak, rss})

	write("memory.events", "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")
	oom, err = c.OOMKilled()
	must.NoError(t, err)
	must.False(t, oom)
}

// Nomad's cpuset for a task is read from its cgroup directory; a directory
// without one gives no cpuset rather than an error.
func TestCpusetCpus(t *testing.T) {
	dir := t.TempDir()
	must.Eq(t, "", CpusetCpus(dir))
	must.NoError(t, os.WriteFile(filepath.Join(dir, "cpuset.cpus"), []byte("0-1,3\n"), 0o644))
	must.Eq(t, "0-1,3", CpusetCpus(dir))
}
