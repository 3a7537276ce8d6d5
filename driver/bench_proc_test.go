package driver

// What the benchmarks read of the processes, cgroups and CPU time of the
// tasks they run, and how they check that nothing of them is left.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

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
