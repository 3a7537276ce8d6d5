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
// into a cgroup it did not create.
func (c *Cgroup) Create(r Resources) error {
	dir := c.memDir()
	if !c.Borrowed {
		if c.V2 {
			if err := enableControllers(c.Root, filepath.Dir(c.Path)); err != nil {
				return err
			}
		}
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

func enableControllers(root, parent string) error {
	// Each level from the root down must delegate the controllers.
	cur := root
	for _, part := range strings.Split(strings.Trim(parent, "/"), "/") {
		if part == "" {
			continue
		}
		if err := os.WriteFile(filepath.Join(cur, "cgroup.subtree_control"), []byte("+memory +pids +cpu"), 0); err != nil {
			return fmt.Errorf("cgroup %s: enable controllers: %w", cur, err)
		}
		cur = filepath.Join(cur, part)
		if err := os.MkdirAll(cur, 0o755); err != nil {
			return fmt.Errorf("create cgroup %s: %w", cur, err)
		}
	}
	if err := os.WriteFile(filepath.Join(cur, "cgroup.subtree_control"), []byte("+memory +pids +cpu"), 0); err != nil {
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
