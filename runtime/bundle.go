package runtime

import (
	"encoding/json"
	"fmt"
	"io"
	"path/filepath"
	"sort"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/atomicfile"
)

// DefaultPath is the PATH a task gets when neither the job nor the image sets one.
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// TaskDirs are the host directories Nomad made for a task; they appear inside
// the sandbox at /alloc (read-only), /local and /secrets.
type TaskDirs struct {
	Alloc   string
	Local   string
	Secrets string
	// Data and Tmp, when set, are the allocation's alloc/data and
	// alloc/tmp, bound writable over the read-only /alloc: the task's
	// share of alloc/, which the allocation's disk bounds (AllocDisk).
	Data, Tmp string
	// Logs, when set, is the allocation's log directory (alloc/logs, where
	// Nomad's log FIFOs and files are): it is bound read-only, so that
	// nothing in the sandbox can replace a FIFO or a log file with a link
	// that root would then write through.
	Logs string
}

// Resources are the limits written into the spec's linux.resources.
type Resources struct {
	MemoryLimitBytes int64
	CPUShares        uint64
	CpusetCpus       string
	PidsLimit        int64
}

// HostMount is an extra bind mount from the host (Nomad volume_mount).
type HostMount struct {
	HostPath string
	TaskPath string
	Readonly bool
}

// BundleConfig is everything that goes into a task's OCI spec. It is built by
// the driver from validated input; nothing here comes from the job unchecked.
type BundleConfig struct {
	Rootfs         string
	ReadonlyRootfs bool
	Args           []string
	Env            []string
	Cwd            string
	User           specs.User
	Caps           []string
	Hostname       string
	Dirs           TaskDirs
	Tmpfs          []string
	Mounts         []HostMount
	// Pinned are files that Nomad writes as root into the task's
	// directories again at every restart, following links (the workload
	// identity and Vault tokens in secrets/): each is bound read-only over
	// itself, so that the task can neither write them nor swap them for a
	// link to a host file.
	Pinned      []HostMount
	Resources   Resources
	CgroupsPath string
	// NetnsPath, when set, is the network namespace the sandbox runs in
	// (runsc --network=sandbox takes over its interface); empty means a
	// namespace of its own with loopback only.
	NetnsPath string
	// HostNetwork leaves the sandbox in the node's network namespace (runsc
	// --network=host): only where the operator allows host networking.
	HostNetwork bool
	// ResolvConf and Hosts are host files bound read-only at /etc/resolv.conf
	// and /etc/hosts.
	ResolvConf string
	Hosts      string
}

// Spec returns the OCI runtime spec for c.
func (c *BundleConfig) Spec() *specs.Spec {
	caps := append([]string(nil), c.Caps...)
	sort.Strings(caps)
	if caps == nil {
		caps = []string{}
	}
	s := &specs.Spec{
		Version:  specs.Version,
		Hostname: c.Hostname,
		Root:     &specs.Root{Path: c.Rootfs, Readonly: c.ReadonlyRootfs},
		Process: &specs.Process{
			Args: c.Args,
			Env:  c.Env,
			Cwd:  c.Cwd,
			User: c.User,
			Capabilities: &specs.LinuxCapabilities{
				Bounding:    caps,
				Effective:   caps,
				Permitted:   caps,
				Inheritable: []string{},
				Ambient:     []string{},
			},
			NoNewPrivileges: true,
			Rlimits:         c.rlimits(),
		},
		Mounts: c.mounts(),
		Linux: &specs.Linux{
			Namespaces:  c.namespaces(),
			CgroupsPath: c.CgroupsPath,
			Resources:   c.resources(),
		},
	}
	return s
}

func (c *BundleConfig) namespaces() []specs.LinuxNamespace {
	ns := []specs.LinuxNamespace{
		{Type: specs.PIDNamespace},
		{Type: specs.IPCNamespace},
		{Type: specs.UTSNamespace},
		{Type: specs.MountNamespace},
	}
	if !c.HostNetwork {
		ns = append(ns, specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: c.NetnsPath})
	}
	return ns
}

func (c *BundleConfig) resources() *specs.LinuxResources {
	r := &specs.LinuxResources{}
	if c.Resources.MemoryLimitBytes > 0 {
		l := c.Resources.MemoryLimitBytes
		r.Memory = &specs.LinuxMemory{Limit: &l}
	}
	if c.Resources.CPUShares > 0 || c.Resources.CpusetCpus != "" {
		r.CPU = &specs.LinuxCPU{Cpus: c.Resources.CpusetCpus}
		if c.Resources.CPUShares > 0 {
			sh := c.Resources.CPUShares
			r.CPU.Shares = &sh
		}
	}
	return r
}

// rlimits are the task's resource limits inside the sandbox. The pids limit
// is RLIMIT_NPROC, enforced by gVisor's kernel: a host pids cgroup would
// count the sandbox's own threads, not the task's processes, which gVisor
// runs as goroutines. Soft and hard are equal so the task cannot raise it,
// and without CAP_SYS_ADMIN or CAP_SYS_RESOURCE it cannot bypass it.
func (c *BundleConfig) rlimits() []specs.POSIXRlimit {
	rl := []specs.POSIXRlimit{
		{Type: "RLIMIT_NOFILE", Soft: 4096, Hard: 65536},
		{Type: "RLIMIT_CORE", Soft: 0, Hard: 0},
	}
	if n := c.Resources.PidsLimit; n > 0 {
		rl = append(rl, specs.POSIXRlimit{Type: "RLIMIT_NPROC", Soft: uint64(n), Hard: uint64(n)})
	}
	return rl
}

func (c *BundleConfig) mounts() []specs.Mount {
	ms := []specs.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
		{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
		{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"}},
		{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
		{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
	}
	for _, p := range c.Tmpfs {
		ms = append(ms, specs.Mount{Destination: p, Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "nodev", "mode=1777"}})
	}
	bind := func(src, dst string, ro bool) specs.Mount {
		opts := []string{"rbind", "nosuid", "nodev"}
		if ro {
			opts = append(opts, "ro")
		} else {
			opts = append(opts, "rw")
		}
		return specs.Mount{Destination: dst, Type: "bind", Source: src, Options: opts}
	}
	// alloc/ itself is read-only: the task writes its share of it only in
	// alloc/data and alloc/tmp, where the allocation's disk (when it has
	// one, see AllocDisk) bounds it; a write beside them (/alloc/x) would
	// go to the node's disk unbounded, and a rename of data/ or tmp/ would
	// move them out from under the disk's overlays.
	binds := []HostMount{{HostPath: c.Dirs.Alloc, TaskPath: "/alloc", Readonly: true}}
	if c.Dirs.Data != "" {
		binds = append(binds, HostMount{HostPath: c.Dirs.Data, TaskPath: "/alloc/data"})
	}
	if c.Dirs.Tmp != "" {
		binds = append(binds, HostMount{HostPath: c.Dirs.Tmp, TaskPath: "/alloc/tmp"})
	}
	binds = append(append(binds,
		HostMount{HostPath: c.Dirs.Local, TaskPath: "/local"},
		HostMount{HostPath: c.Dirs.Secrets, TaskPath: "/secrets"},
	), c.Mounts...)
	var aliases []HostMount
	for _, m := range binds {
		a, whole := rootfsAlias(c.Rootfs, m)
		if whole {
			m.Readonly = true
		}
		if a != nil {
			aliases = append(aliases, *a)
		}
		ms = append(ms, bind(m.HostPath, m.TaskPath, m.Readonly))
		if m.TaskPath == "/alloc" && c.Dirs.Logs != "" {
			ms = append(ms, bind(c.Dirs.Logs, "/alloc/logs", true))
		}
	}
	// After every writable mount, so that none covers them.
	for _, a := range append(c.Pinned, aliases...) {
		ms = append(ms, bind(a.HostPath, a.TaskPath, true))
	}
	if c.ResolvConf != "" {
		ms = append(ms, bind(c.ResolvConf, "/etc/resolv.conf", true))
	}
	if c.Hosts != "" {
		ms = append(ms, bind(c.Hosts, "/etc/hosts", true))
	}
	return ms
}

// rootfsAlias finds where the root filesystem is visible a second time, under
// a writable bind mount m (a rootfs unpacked into local/, or a host rootfs
// inside a volume): the topmost directory of m that holds it, to be bound
// read-only over itself. Binding that directory rather than the rootfs alone
// also pins the path to the rootfs: a mount point cannot be renamed, so the
// task cannot move the rootfs aside and leave another in its place for the
// next start. whole is true when the rootfs is m's source itself, which must
// then be mounted read-only. Both paths must be free of symbolic links.
func rootfsAlias(rootfs string, m HostMount) (alias *HostMount, whole bool) {
	if m.Readonly || rootfs == "" || m.HostPath == "" {
		return nil, false
	}
	rel, err := filepath.Rel(m.HostPath, rootfs)
	if err != nil || !filepath.IsLocal(rel) {
		return nil, false
	}
	if rel == "." {
		return nil, true
	}
	top, _, _ := strings.Cut(rel, string(filepath.Separator))
	return &HostMount{
		HostPath: filepath.Join(m.HostPath, top),
		TaskPath: filepath.Join(m.TaskPath, top),
		Readonly: true,
	}, false
}

// WriteBundle writes config.json for c into dir, which must exist.
func WriteBundle(dir string, c *BundleConfig) error {
	return atomicfile.WriteJSON(bundleSpec(dir), c.Spec(), 0o600)
}

// HostsFile renders /etc/hosts for a sandbox with only loopback and its own name.
func HostsFile(hostname string) []byte {
	return []byte(fmt.Sprintf("127.0.0.1 localhost %[1]s\n::1 localhost ip6-localhost ip6-loopback %[1]s\n", hostname))
}

// ReadBundle reads the spec of the bundle in dir.
func ReadBundle(dir string) (*specs.Spec, error) {
	var s specs.Spec
	if err := atomicfile.ReadJSON(bundleSpec(dir), &s); err != nil {
		return nil, fmt.Errorf("read bundle: %w", err)
	}
	if s.Process == nil {
		return nil, fmt.Errorf("bundle %s has no process", dir)
	}
	return &s, nil
}

// EncodeProcess writes p as the JSON process file `runsc exec --process` reads.
func EncodeProcess(w io.Writer, p *specs.Process) error {
	return json.NewEncoder(w).Encode(p)
}
