package runtime

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
	"github.com/shoenig/test/must"
	"golang.org/x/sys/unix"
)

// These tests use the machine's real cgroup v1 hierarchies, under a parent
// of their own (never the driver's /nomad-sandbox, which a fresh machine
// does not have and other tests may be using).

// v1Cgroups skips on hosts without a v1 cpuset hierarchy and returns the
// root cpuset's CPUs and memory nodes.
func v1Cgroups(t *testing.T) (cpus, mems string) {
	t.Helper()
	testutil.RequireRoot(t)
	if NewCgroup("").V2 {
		t.Skip("cgroup v2 host: the v1 cpuset parent does not apply")
	}
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(CgroupRoot, "cpuset", name))
		if errors.Is(err, os.ErrNotExist) {
			t.Skip("no v1 cpuset hierarchy")
		}
		must.NoError(t, err)
		return strings.TrimSpace(string(b))
	}
	return read("cpuset.cpus"), read("cpuset.mems")
}

// testCgroupParent is a parent cgroup name of this test's own; everything
// below it, in every hierarchy, is removed when the test ends.
func testCgroupParent(t *testing.T) string {
	parent := fmt.Sprintf("/nomad-sandbox-test-%x", rand.Uint32())
	t.Cleanup(func() {
		hier, err := os.ReadDir(CgroupRoot)
		if err != nil {
			return
		}
		for _, h := range hier {
			top := filepath.Join(CgroupRoot, h.Name(), parent)
			kids, _ := os.ReadDir(top)
			for _, k := range kids {
				if k.IsDir() {
					_ = unix.Rmdir(filepath.Join(top, k.Name()))
				}
			}
			if err := unix.Rmdir(top); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENOTDIR) {
				t.Errorf("remove test cgroup %s: %v", top, err)
			}
		}
	})
	return parent
}

// TestCgroupV1_SandboxStartsWithAnyParent starts a sandbox pinned to the
// node's CPUs under a parent cpuset cgroup that does not exist, exists as a
// new cpuset cgroup is made (empty), or holds wrong values: the state of a
// fresh machine, of one where an earlier run made the parent by hand, and of
// one whose CPUs changed. runsc cannot give a task CPUs its parent lacks.
func TestCgroupV1_SandboxStartsWithAnyParent(t *testing.T) {
	rootCpus, rootMems := v1Cgroups(t)
	for _, tc := range []struct {
		name   string
		before func(t *testing.T, dir string)
	}{
		{"absent", nil},
		{"empty", func(t *testing.T, dir string) { must.NoError(t, os.Mkdir(dir, 0o755)) }},
		{"wrong", func(t *testing.T, dir string) {
			cpus, err := ParseCPUList(rootCpus)
			must.NoError(t, err)
			if len(cpus) < 2 {
				t.Skip("one CPU: no wrong value to repair")
			}
			must.NoError(t, os.Mkdir(dir, 0o755))
			must.NoError(t, os.WriteFile(filepath.Join(dir, "cpuset.mems"), []byte(rootMems), 0))
			must.NoError(t, os.WriteFile(filepath.Join(dir, "cpuset.cpus"), []byte(fmt.Sprint(cpus[0])), 0))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			parent := testCgroupParent(t)
			if tc.before != nil {
				tc.before(t, filepath.Join(CgroupRoot, "cpuset", parent))
			}
			cg := NewCgroup(parent + "/task")
			res := Resources{MemoryLimitBytes: 256 << 20, CpusetCpus: rootCpus}
			must.NoError(t, cg.Create(&res))
			t.Cleanup(func() { _ = cg.Destroy() })
			must.Eq(t, rootCpus, res.CpusetCpus)
			for name, want := range map[string]string{"cpuset.cpus": rootCpus, "cpuset.mems": rootMems} {
				b, err := os.ReadFile(filepath.Join(CgroupRoot, "cpuset", parent, name))
				must.NoError(t, err)
				must.Eq(t, want, strings.TrimSpace(string(b)), must.Sprintf("the parent's %s must be its own parent's", name))
			}
			run := runSandbox(t, func(c *BundleConfig) {
				c.CgroupsPath = cg.Path
				c.Resources = res
			}, "/bin/sh", "-c", "echo pinned")
			must.Eq(t, 0, run.status.ExitCode, must.Sprint(run.stderr, run.status.Err))
			must.Eq(t, "pinned\n", run.stdout)
		})
	}
}

// TestCgroupV1_CpusetNarrowedToParent: Nomad's cpuset is cut down to what
// the parent allows, and a cpuset with nothing left is refused by name.
func TestCgroupV1_CpusetNarrowedToParent(t *testing.T) {
	rootCpus, _ := v1Cgroups(t)
	parent := testCgroupParent(t)

	wide := Resources{CpusetCpus: "0-4095"}
	cg := NewCgroup(parent + "/wide")
	must.NoError(t, cg.Create(&wide))
	t.Cleanup(func() { _ = cg.Destroy() })
	must.Eq(t, rootCpus, wide.CpusetCpus)

	none := Resources{CpusetCpus: "4095"}
	err := NewCgroup(parent + "/none").Create(&none)
	must.ErrorContains(t, err, `cpuset "4095" has no CPU`)
	_, statErr := os.Stat(filepath.Join(CgroupRoot, "memory", parent, "none"))
	must.True(t, os.IsNotExist(statErr), must.Sprint("a refused cgroup must not be made"))
}

func TestCPUList(t *testing.T) {
	cpus, err := ParseCPUList("3,0-1,7-9,1\n")
	must.NoError(t, err)
	must.Eq(t, []int{0, 1, 3, 7, 8, 9}, cpus)
	must.Eq(t, "0-1,3,7-9", FormatCPUList(cpus))
	for _, bad := range []string{"a", "3-1", "-1", "1-"} {
		_, err := ParseCPUList(bad)
		must.Error(t, err, must.Sprint(bad))
	}
}
