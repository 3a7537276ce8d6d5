//go:build e2e

package e2e

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
)

// proc is a process as /proc shows it.
type proc struct {
	pid  int
	argv []string
}

func listProcs() []proc {
	entries, _ := os.ReadDir("/proc")
	self := os.Getpid()
	var out []proc
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || len(b) == 0 {
			continue
		}
		argv := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		out = append(out, proc{pid: pid, argv: argv})
	}
	return out
}

func under(p, dir string) bool {
	p = strings.TrimSuffix(p, " (deleted)")
	return p == dir || strings.HasPrefix(p, dir+"/")
}

// procsUsing lists the processes whose executable, working directory, an
// argument or an open file is inside dir.
func procsUsing(dir string) []proc {
	var out []proc
	for _, p := range listProcs() {
		if usesDir(p, dir) {
			out = append(out, p)
		}
	}
	return out
}

func usesDir(p proc, dir string) bool {
	for _, a := range p.argv {
		if strings.Contains(a, dir) {
			return true
		}
	}
	for _, l := range []string{"exe", "cwd"} {
		if t, err := os.Readlink(fmt.Sprintf("/proc/%d/%s", p.pid, l)); err == nil && under(t, dir) {
			return true
		}
	}
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.pid))
	for _, fd := range fds {
		if t, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", p.pid, fd.Name())); err == nil && under(t, dir) {
			return true
		}
	}
	return false
}

// mountsUnder lists the mount points at or below dir, deepest first.
func mountsUnder(dir string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		if under(mp, dir) {
			out = append(out, mp)
		}
	}
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// unmountUnder unmounts everything at or below dir, deepest first, lazily if
// a mount is busy.
func unmountUnder(dir string) {
	for pass := 0; pass < 5; pass++ {
		mps := mountsUnder(dir)
		if len(mps) == 0 {
			return
		}
		for _, mp := range mps {
			if err := syscall.Unmount(mp, 0); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
				_ = syscall.Unmount(mp, syscall.MNT_DETACH)
			}
		}
	}
}

// removeCgroups removes the cgroup named parent (and its children) from
// every hierarchy under /sys/fs/cgroup.
func removeCgroups(parent string) {
	if parent == "" || parent == "/" {
		return
	}
	var roots []string
	if entries, err := os.ReadDir("/sys/fs/cgroup"); err == nil {
		for _, e := range entries {
			if e.IsDir() {
				roots = append(roots, filepath.Join("/sys/fs/cgroup", e.Name()))
			}
		}
	}
	roots = append(roots, "/sys/fs/cgroup")
	for _, r := range roots {
		removeCgroupTree(filepath.Join(r, parent))
	}
}

// removeCgroupTree removes the cgroup directory base and its children.
func removeCgroupTree(base string) {
	if _, err := os.Stat(base); err != nil {
		return
	}
	var dirs []string
	_ = filepath.WalkDir(base, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := syscall.Rmdir(dirs[i]); err != nil && !errors.Is(err, syscall.ENOENT) {
			fmt.Fprintf(os.Stderr, "e2e: remove cgroup %s: %v\n", dirs[i], err)
		}
	}
}
