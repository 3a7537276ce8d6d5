package runtime

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"

	"github.com/shoenig/test/must"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

func TestContainerOf(t *testing.T) {
	const root = "/run/nomad-sandbox/runsc"
	for _, c := range []struct {
		name string
		args []string
		want string
	}{
		{"sandbox", []string{"runsc-sandbox", "--root=" + root, "--network=none", "boot", "--bundle=/b", "--stdio-fds=9", "nomad-a-b"}, "nomad-a-b"},
		{"gofer", []string{"runsc-gofer", "--root=" + root, "gofer", "--bundle", "/b", "--io-fds=8", "nomad-a-b"}, "nomad-a-b"},
		{"run", []string{"/usr/bin/runsc", "--root", root, "run", "--detach", "--pid-file", "/p", "--bundle", "/b", "nomad-a-b"}, "nomad-a-b"},
		// A short-lived call's last argument is no container.
		{"kill", []string{"/usr/bin/runsc", "--root", root, "kill", "nomad-a-b", "15"}, ""},
		{"list", []string{"/usr/bin/runsc", "--root", root, "list", "--quiet"}, ""},
		{"another root", []string{"runsc-sandbox", "--root=/other", "boot", "nomad-a-b"}, ""},
		{"a root below ours", []string{"runsc-sandbox", "--root=" + root + "/x", "boot", "nomad-a-b"}, ""},
		{"not runsc", []string{"sleep", "600"}, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			must.Eq(t, c.want, ContainerOf(root, c.args))
		})
	}
}

func TestSupervisorOf(t *testing.T) {
	must.Eq(t, "/state/nomad-a-b", SupervisorOf([]string{"/plugins/sandbox", SupervisorArg, "/state/nomad-a-b"}))
	must.Eq(t, "", SupervisorOf([]string{"/plugins/sandbox"}))
	must.Eq(t, "", SupervisorOf([]string{"/bin/sh", "-c", "supervise /state/x"}))
}

func TestUnescapeMount(t *testing.T) {
	must.Eq(t, "/a b/c\td", unescapeMount(`/a\040b/c\011d`))
	must.Eq(t, `/plain\`, unescapeMount(`/plain\`))
	must.Eq(t, `/x\9`, unescapeMount(`/x\9`))
}

// TestRemoveCgroupEverywhere plays what a sandbox killed with its runsc
// leaves: its cgroup in every hierarchy, with a process still in one. All of
// it must go, the process too.
func TestRemoveCgroupEverywhere(t *testing.T) {
	testutil.RequireRoot(t)
	roots, err := cgroupMounts(CgroupRoot)
	must.NoError(t, err)
	must.SliceNotEmpty(t, roots)
	rel := fmt.Sprintf("/nomad-sandbox-lefttest-%d", os.Getpid())
	var made []string
	for _, r := range roots {
		dir := filepath.Join(r, rel)
		if err := os.Mkdir(dir, 0o755); err == nil {
			made = append(made, dir)
		}
	}
	t.Cleanup(func() {
		for _, dir := range made {
			_ = syscall.Rmdir(dir)
		}
	})
	must.SliceNotEmpty(t, made)

	proc := exec.Command("sleep", "600")
	must.NoError(t, proc.Start())
	t.Cleanup(func() { _ = proc.Process.Kill() })
	joined := ""
	for _, dir := range made {
		if os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(proc.Process.Pid)), 0) == nil {
			joined = dir
			break
		}
	}
	must.NotEq(t, "", joined, must.Sprint("the process joined no cgroup"))
	// Control: the cgroup cannot simply be removed while it holds it.
	must.ErrorIs(t, syscall.Rmdir(joined), syscall.EBUSY)

	removed, err := RemoveCgroupEverywhere(rel)
	must.NoError(t, err)
	must.SliceContainsAll(t, made, removed)
	for _, dir := range made {
		_, err := os.Lstat(dir)
		must.True(t, os.IsNotExist(err), must.Sprintf("%s is still there", dir))
	}
	err = proc.Wait()
	ws, _ := proc.ProcessState.Sys().(syscall.WaitStatus)
	must.True(t, ws.Signaled() && ws.Signal() == syscall.SIGKILL, must.Sprintf("the process in the cgroup ended with %v", err))

	_, err = RemoveCgroupEverywhere("../escape")
	must.Error(t, err)
}
