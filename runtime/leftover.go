package runtime

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// What a crash leaves behind is found here by name: a cgroup path in every
// hierarchy, processes by their command line, mounts by their mount point.
// Each function touches only what its caller names, so that plugins (and
// tests) sharing the /nomad-sandbox cgroup parent never remove each other's.

// mountEntry is one line of /proc/self/mountinfo: where and what.
type mountEntry struct{ point, fstype string }

// mounts lists this process's mounts in mount order.
func mounts() ([]mountEntry, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []mountEntry
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		fields, fs := strings.Fields(pre), strings.Fields(post)
		if !ok || len(fields) < 5 || len(fs) < 1 {
			continue
		}
		out = append(out, mountEntry{point: unescapeMount(fields[4]), fstype: fs[0]})
	}
	return out, sc.Err()
}

// cgroupMounts lists the cgroup hierarchies mounted under root.
func cgroupMounts(root string) ([]string, error) {
	ms, err := mounts()
	if err != nil {
		return nil, err
	}
	var dirs []string
	for _, m := range ms {
		if (m.fstype == "cgroup" || m.fstype == "cgroup2") && (m.point == root || strings.HasPrefix(m.point, root+"/")) {
			dirs = append(dirs, m.point)
		}
	}
	return dirs, nil
}

// RemoveCgroupEverywhere removes the cgroup rel (e.g. "/nomad-sandbox/ID")
// from every hierarchy: the driver makes the memory one, runsc the others,
// and a sandbox killed with its runsc leaves runsc's behind. Processes still
// in it (a sandbox or gofer whose runsc state is gone) are killed first. It
// returns what it removed.
func RemoveCgroupEverywhere(rel string) ([]string, error) {
	if !filepath.IsAbs(rel) || filepath.Clean(rel) != rel || rel == "/" {
		return nil, fmt.Errorf("remove cgroup %q: not a clean absolute cgroup path", rel)
	}
	roots, err := cgroupMounts(CgroupRoot)
	if err != nil {
		return nil, fmt.Errorf("remove cgroup %s: %w", rel, err)
	}
	var removed []string
	var errs []error
	for _, root := range roots {
		dir := filepath.Join(root, rel)
		if _, err := os.Lstat(dir); errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err := removeCgroupDir(dir); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, dir)
	}
	return removed, errors.Join(errs...)
}

// removeCgroupDir kills what is in dir and removes it once the kernel has
// let the processes go (rmdir fails with EBUSY until then).
func removeCgroupDir(dir string) error {
	deadline := time.Now().Add(10 * time.Second)
	backoff := 5 * time.Millisecond
	for {
		for _, pid := range cgroupPids(dir) {
			_ = unix.Kill(pid, unix.SIGKILL)
		}
		err := unix.Rmdir(dir)
		if err == nil || errors.Is(err, unix.ENOENT) {
			return nil
		}
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			return fmt.Errorf("remove cgroup %s: %w", dir, err)
		}
		time.Sleep(backoff)
		backoff = min(2*backoff, 200*time.Millisecond)
	}
}

func cgroupPids(dir string) []int {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil && pid > 0 {
			pids = append(pids, pid)
		}
	}
	return pids
}

// Process is a running process, its argv and its effective uid.
type Process struct {
	Pid  int
	Args []string
	// Uid matters because anyone can make a process with any argv: only
	// root's processes can be the driver's.
	Uid uint32
}

// Processes lists the processes for which match is true (a process that
// ends while being read is skipped).
func Processes(match func(args []string) bool) []Process {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	self := os.Getpid()
	var out []Process
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(b) == 0 {
			continue
		}
		args := strings.Split(string(bytes.TrimRight(b, "\x00")), "\x00")
		if !match(args) {
			continue
		}
		var st unix.Stat_t
		if unix.Stat(filepath.Join("/proc", e.Name()), &st) != nil {
			continue
		}
		out = append(out, Process{Pid: pid, Args: args, Uid: st.Uid})
	}
	return out
}

// Kill sends the process SIGKILL and waits, up to timeout, until it has
// ended (a zombie counts as ended: it holds nothing but its exit status),
// so that whoever removes what it used finds it gone.
func (p Process) Kill(timeout time.Duration) error {
	if err := unix.Kill(p.Pid, unix.SIGKILL); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil
		}
		return fmt.Errorf("kill %d: %w", p.Pid, err)
	}
	deadline := time.Now().Add(timeout)
	backoff := time.Millisecond
	for {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p.Pid))
		if err != nil || len(b) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("process %d did not end within %s of SIGKILL", p.Pid, timeout)
		}
		time.Sleep(backoff)
		backoff = min(2*backoff, 100*time.Millisecond)
	}
}

// SupervisorOf returns the state directory a supervisor's argv names, or ""
// when args is not a supervisor's.
func SupervisorOf(args []string) string {
	if len(args) != 3 || args[1] != SupervisorArg {
		return ""
	}
	return args[2]
}

// ContainerOf returns the container that a sandbox, gofer or `runsc run`
// process under root works for (each ends its argv with it), or "" when
// args is no such process. Short-lived runsc calls (kill, state, list) are
// not matched: their last argument need not be a container.
func ContainerOf(root string, args []string) string {
	if len(args) < 3 {
		return ""
	}
	under, verb := false, false
	for i, a := range args[1 : len(args)-1] {
		switch {
		case a == "--root="+root || (a == "--root" && args[i+2] == root):
			under = true
		case a == "boot" || a == "gofer" || a == "run":
			verb = true
		}
	}
	if !under || !verb {
		return ""
	}
	return args[len(args)-1]
}

// MountsUnder lists the mount points at or below dir, deepest first, so
// that they can be detached before dir is removed: removing a directory
// tree that has a mount in it would delete what is mounted there.
func MountsUnder(dir string) ([]string, error) {
	ms, err := mounts()
	if err != nil {
		return nil, err
	}
	var out []string
	// Later entries are mounted on top of earlier ones.
	for i := len(ms) - 1; i >= 0; i-- {
		if p := ms[i].point; p == dir || strings.HasPrefix(p, dir+"/") {
			out = append(out, p)
		}
	}
	return out, nil
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
