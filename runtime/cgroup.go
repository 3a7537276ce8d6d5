package runtime

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// CgroupRoot is where the cgroup hierarchies are mounted.
const CgroupRoot = "/sys/fs/cgroup"

// Cgroup is a task's memory cgroup on the host. The driver creates and
// configures it itself, because a cgroup runsc creates is removed with the
// sandbox and takes the evidence of an OOM kill with it, and a cgroup that
// already exists is only joined by runsc, with no limits written.
type Cgroup struct {
	// Path is relative to each hierarchy, e.g. "/nomad-sandbox/<id>"; it
	// is what the OCI spec's cgroupsPath says.
	Path string `json:"path"`
	// V2 is true on a unified (cgroup v2 only) host.
	V2 bool `json:"v2"`
	// Root is the hierarchy mount point (CgroupRoot unless a test says).
	Root string `json:"root"`
	// Borrowed marks a cgroup that Nomad made for the task (newer clients
	// on cgroup v2 pass it as CpusetCgroupPath): the driver writes its
	// limits and reads it, but never removes it.
	Borrowed bool `json:"borrowed,omitempty"`
}

// BorrowCgroup describes the v2 cgroup at the absolute path abs, made by
// Nomad for the task. ok is false when abs is not a usable v2 cgroup.
func BorrowCgroup(abs string) (c *Cgroup, ok bool) {
	c = NewCgroup("")
	rel, err := filepath.Rel(c.Root, filepath.Clean(abs))
	if !c.V2 || err != nil || rel == "." || strings.HasPrefix(rel, "..") {
		return nil, false
	}
	if _, err := os.Stat(filepath.Join(abs, "cgroup.procs")); err != nil {
		return nil, false
	}
	c.Path, c.Borrowed = "/"+rel, true
	return c, true
}

// NewCgroup describes the cgroup at path on this host; it creates nothing.
func NewCgroup(path string) *Cgroup {
	_, err := os.Stat(filepath.Join(CgroupRoot, "cgroup.controllers"))
	return &Cgroup{Path: path, V2: err == nil, Root: CgroupRoot}
}

// memDir is the directory holding the memory controller's files.
func (c *Cgroup) memDir() string {
	if c.V2 {
		return filepath.Join(c.Root, c.Path)
	}
	return filepath.Join(c.Root, "memory", c.Path)
}

// Create makes the cgroup and writes the limits that runsc will not write
// into a cgroup it did not create. It narrows r.CpusetCpus to the CPUs that
// the hierarchy gives the sandbox's parent, and fails, naming the cpuset,
// when none of the requested CPUs is left.
func (c *Cgroup) Create(r *Resources) error {
	dir := c.memDir()
	if !c.Borrowed {
		cpus, err := c.prepareParents(r.CpusetCpus)
		if err != nil {
			return err
		}
		r.CpusetCpus = cpus
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("create cgroup %s: %w", dir, err)
		}
	}
	writes := map[string]string{}
	if c.V2 {
		if r.MemoryLimitBytes > 0 {
			writes["memory.max"] = strconv.FormatInt(r.MemoryLimitBytes, 10)
			writes["memory.swap.max"] = "0"
		}
		if r.CPUShares > 0 {
			// The v1 shares range [2, 262144] maps onto weight [1, 10000].
			writes["cpu.weight"] = strconv.FormatUint(1+((r.CPUShares-2)*9999)/262142, 10)
		}
		// runsc only joins a cgroup that exists, so the cpuset is ours
		// to write; Nomad keeps a borrowed cgroup's cpuset itself.
		if r.CpusetCpus != "" && !c.Borrowed {
			writes["cpuset.cpus"] = r.CpusetCpus
		}
	} else if r.MemoryLimitBytes > 0 {
		writes["memory.limit_in_bytes"] = strconv.FormatInt(r.MemoryLimitBytes, 10)
	}
	for name, val := range writes {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(val), 0); err != nil {
			if name == "memory.swap.max" && errors.Is(err, os.ErrNotExist) {
				continue // no swap accounting on this host
			}
			_ = c.Destroy()
			return fmt.Errorf("cgroup %s: write %s: %w", dir, name, err)
		}
	}
	if !c.V2 && r.MemoryLimitBytes > 0 {
		// Without this, swap would let a task exceed its memory.
		_ = os.WriteFile(filepath.Join(dir, "memory.memsw.limit_in_bytes"), []byte(strconv.FormatInt(r.MemoryLimitBytes, 10)), 0)
	}
	return nil
}

// prepareParents creates and repairs every cgroup between the hierarchy's
// root and the task's cgroup, so that a machine where they never existed,
// or where they were left empty or wrong, works like any other. It returns
// the requested cpuset narrowed to what the parent allows.
func (c *Cgroup) prepareParents(cpus string) (string, error) {
	parent := filepath.Dir(c.Path)
	if c.V2 {
		if err := enableControllers(c.Root, parent, cpus != ""); err != nil {
			return "", err
		}
		return fitCpuset(cpus, filepath.Join(c.Root, parent, "cpuset.cpus.effective"))
	}
	// On v1 runsc creates the task's cpuset cgroup and writes the spec's
	// CPUs into it, which the kernel refuses while the parent's cpuset is
	// empty, as a cpuset cgroup is when it is made: copy it down.
	top := filepath.Join(c.Root, "cpuset")
	if _, err := os.Stat(filepath.Join(top, "cpuset.cpus")); err != nil {
		return cpus, nil // no cpuset hierarchy on this host
	}
	cur := top
	for _, part := range strings.Split(strings.Trim(parent, "/"), "/") {
		if part == "" {
			continue
		}
		next := filepath.Join(cur, part)
		if err := os.Mkdir(next, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return "", fmt.Errorf("create cgroup %s: %w", next, err)
		}
		for _, name := range []string{"cpuset.cpus", "cpuset.mems"} {
			want, err := os.ReadFile(filepath.Join(cur, name))
			if err != nil {
				return "", fmt.Errorf("cgroup %s: read %s: %w", cur, name, err)
			}
			have, err := os.ReadFile(filepath.Join(next, name))
			if err != nil {
				return "", fmt.Errorf("cgroup %s: read %s: %w", next, name, err)
			}
			if strings.TrimSpace(string(have)) == strings.TrimSpace(string(want)) {
				continue
			}
			if err := os.WriteFile(filepath.Join(next, name), []byte(strings.TrimSpace(string(want))), 0); err != nil {
				return "", fmt.Errorf("cgroup %s: copy %s from its parent: %w", next, name, err)
			}
		}
		cur = next
	}
	return fitCpuset(cpus, filepath.Join(cur, "cpuset.cpus"))
}

// CpusetCpus is the CPU list in the cpuset.cpus of the cgroup directory dir,
// an absolute path (Nomad's cpuset for a task, CpusetCgroupPath: its
// reserved cores, else the cores Nomad shares among tasks), or "" when there
// is none to read.
func CpusetCpus(dir string) string {
	b, err := os.ReadFile(filepath.Join(dir, "cpuset.cpus"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// fitCpuset narrows the CPU list want to the CPUs listed in the file
// allowedFile; an empty want, or a host without that file, leaves it as is.
func fitCpuset(want, allowedFile string) (string, error) {
	if want == "" {
		return "", nil
	}
	b, err := os.ReadFile(allowedFile)
	if errors.Is(err, os.ErrNotExist) {
		return want, nil
	}
	if err != nil {
		return "", fmt.Errorf("read %s: %w", allowedFile, err)
	}
	allowed := strings.TrimSpace(string(b))
	w, err := ParseCPUList(want)
	if err != nil {
		return "", fmt.Errorf("cpuset %q: %w", want, err)
	}
	a, err := ParseCPUList(allowed)
	if err != nil {
		return "", fmt.Errorf("%s: %w", allowedFile, err)
	}
	var both []int
	for _, cpu := range w {
		if slices.Contains(a, cpu) {
			both = append(both, cpu)
		}
	}
	if len(both) == 0 {
		return "", fmt.Errorf("cpuset %q has no CPU among the %q this node gives sandboxes (%s): reserve cores the client has", want, allowed, allowedFile)
	}
	return FormatCPUList(both), nil
}

// ParseCPUList reads a kernel CPU list such as "0-3,6" into sorted CPU
// numbers.
func ParseCPUList(s string) ([]int, error) {
	var cpus []int
	for _, part := range strings.Split(strings.TrimSpace(s), ",") {
		if part == "" {
			continue
		}
		lo, hi, isRange := strings.Cut(part, "-")
		a, err := strconv.Atoi(lo)
		if err != nil || a < 0 {
			return nil, fmt.Errorf("bad CPU list %q", s)
		}
		b := a
		if isRange {
			if b, err = strconv.Atoi(hi); err != nil || b < a || b-a > 1<<16 {
				return nil, fmt.Errorf("bad CPU list %q", s)
			}
		}
		for i := a; i <= b; i++ {
			cpus = append(cpus, i)
		}
	}
	slices.Sort(cpus)
	return slices.Compact(cpus), nil
}

// FormatCPUList writes sorted CPU numbers in the kernel's list form.
func FormatCPUList(cpus []int) string {
	var parts []string
	for i := 0; i < len(cpus); {
		j := i
		for j+1 < len(cpus) && cpus[j+1] == cpus[j]+1 {
			j++
		}
		if i == j {
			parts = append(parts, strconv.Itoa(cpus[i]))
		} else {
			parts = append(parts, fmt.Sprintf("%d-%d", cpus[i], cpus[j]))
		}
		i = j + 1
	}
	return strings.Join(parts, ",")
}

func enableControllers(root, parent string, cpuset bool) error {
	ctrl := "+memory +pids +cpu"
	if b, err := os.ReadFile(filepath.Join(root, "cgroup.controllers")); cpuset && err == nil && slices.Contains(strings.Fields(string(b)), "cpuset") {
		ctrl += " +cpuset"
	}
	// Each level from the root down must delegate the controllers.
	cur := root
	for _, part := range strings.Split(strings.Trim(parent, "/"), "/") {
		if part == "" {
			continue
		}
		if err := os.WriteFile(filepath.Join(cur, "cgroup.subtree_control"), []byte(ctrl), 0); err != nil {
			return fmt.Errorf("cgroup %s: enable controllers: %w", cur, err)
		}
		cur = filepath.Join(cur, part)
		if err := os.MkdirAll(cur, 0o755); err != nil {
			return fmt.Errorf("create cgroup %s: %w", cur, err)
		}
	}
	if err := os.WriteFile(filepath.Join(cur, "cgroup.subtree_control"), []byte(ctrl), 0); err != nil {
		return fmt.Errorf("cgroup %s: enable controllers: %w", cur, err)
	}
	return nil
}

// OOMKilled reports whether the kernel's OOM killer acted in the cgroup.
func (c *Cgroup) OOMKilled() (bool, error) {
	name := "memory.oom_control"
	if c.V2 {
		name = "memory.events"
	}
	b, err := os.ReadFile(filepath.Join(c.memDir(), name))
	if err != nil {
		return false, fmt.Errorf("read %s: %w", name, err)
	}
	n, err := keyedValue(b, "oom_kill")
	if err != nil {
		return false, fmt.Errorf("read %s: %w", name, err)
	}
	return n > 0, nil
}

// MemoryStats reads the cgroup's memory usage, peak and RSS in bytes.
func (c *Cgroup) MemoryStats() (usage, peak, rss uint64, err error) {
	dir := c.memDir()
	files := [3]string{"memory.usage_in_bytes", "memory.max_usage_in_bytes", "memory.stat"}
	rssKey := "total_rss"
	if c.V2 {
		files = [3]string{"memory.current", "memory.peak", "memory.stat"}
		rssKey = "anon"
	}
	if usage, err = readUint(filepath.Join(dir, files[0])); err != nil {
		return 0, 0, 0, err
	}
	peak, _ = readUint(filepath.Join(dir, files[1])) // memory.peak is kernel 5.19+
	b, err := os.ReadFile(filepath.Join(dir, files[2]))
	if err != nil {
		return 0, 0, 0, err
	}
	rss, err = keyedValue(b, rssKey)
	return usage, peak, rss, err
}

// CPUStats reads the CPU time used in the cgroup, in nanoseconds: total,
// user and system. On v1 it reads cpuacct, which runsc creates at the same
// path as the memory cgroup.
func (c *Cgroup) CPUStats() (total, user, system uint64, err error) {
	if c.V2 {
		b, err := os.ReadFile(filepath.Join(c.Root, c.Path, "cpu.stat"))
		if err != nil {
			return 0, 0, 0, err
		}
		total, err = keyedValue(b, "usage_usec")
		if err != nil {
			return 0, 0, 0, err
		}
		user, _ = keyedValue(b, "user_usec")
		system, _ = keyedValue(b, "system_usec")
		return total * 1000, user * 1000, system * 1000, nil
	}
	dir := filepath.Join(c.Root, "cpuacct", c.Path)
	if total, err = readUint(filepath.Join(dir, "cpuacct.usage")); err != nil {
		return 0, 0, 0, err
	}
	if b, err := os.ReadFile(filepath.Join(dir, "cpuacct.stat")); err == nil {
		// cpuacct.stat counts in USER_HZ, 100 per second on Linux.
		u, _ := keyedValue(b, "user")
		s, _ := keyedValue(b, "system")
		user, system = u*10_000_000, s*10_000_000
	}
	return total, user, system, nil
}

// Destroy removes the cgroup; it is gone already if nothing is there.
func (c *Cgroup) Destroy() error {
	if c.Borrowed {
		return nil
	}
	err := unix.Rmdir(c.memDir())
	if err == nil || errors.Is(err, unix.ENOENT) {
		return nil
	}
	return fmt.Errorf("remove cgroup %s: %w", c.memDir(), err)
}

func readUint(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
}

// keyedValue finds "key N" in a flat-keyed cgroup file.
func keyedValue(b []byte, key string) (uint64, error) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), " ")
		if ok && k == key {
			return strconv.ParseUint(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, fmt.Errorf("no %q entry", key)
}
