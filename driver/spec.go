package driver

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/hashicorp/nomad/plugins/drivers"
	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/image"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/safeopen"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

// bundleFor turns a checked task, and its image when it has one, into the
// sandbox's spec input. The image's entrypoint, cmd, env, working directory
// and user are defaults that the task's own settings override.
func (d *Driver) bundleFor(cfg *drivers.TaskConfig, tc *TaskConfig, img *image.Image, lim taskLimits) (*runtime.BundleConfig, error) {
	var rootfs string
	var ic image.Config
	if img != nil {
		rootfs, ic = img.Rootfs, img.Config
	} else {
		var err error
		if rootfs, err = d.resolveRootfs(cfg, tc.Rootfs); err != nil {
			return nil, err
		}
	}
	userName := cfg.User
	if userName == "" {
		userName = ic.User
	}
	user, err := runtime.ResolveUser(rootfs, userName)
	if err != nil {
		return nil, fmt.Errorf("task user: %w", err)
	}
	args := taskArgs(tc, ic)
	if len(args) == 0 {
		return nil, fmt.Errorf("image %s has no entrypoint or cmd: set command in the task config", tc.Image)
	}
	env := taskEnv(cfg, ic.Env)
	if err := runtime.CheckCommand(rootfs, args[0], env); err != nil {
		return nil, err
	}
	if img != nil || filepath.IsAbs(tc.Rootfs) {
		// A shared rootfs: runsc must not make the job's mount points in it.
		var dests []string
		for _, m := range cfg.Mounts {
			dests = append(dests, m.TaskPath)
		}
		if err := runtime.CheckMountPoints(rootfs, dests); err != nil {
			return nil, err
		}
	}
	cwd := tc.WorkDir
	if cwd == "" {
		cwd = ic.WorkingDir
	}
	if cwd == "" {
		cwd = "/"
	}
	hostname := tc.Hostname
	if hostname == "" {
		hostname = defaultHostname(cfg.Name)
	}
	var mounts []runtime.HostMount
	for _, m := range cfg.Mounts {
		mounts = append(mounts, runtime.HostMount{HostPath: realPath(m.HostPath), TaskPath: filepath.Clean(m.TaskPath), Readonly: m.Readonly})
	}
	td := cfg.TaskDir()
	bc := &runtime.BundleConfig{
		Rootfs:         rootfs,
		ReadonlyRootfs: tc.ReadonlyRootfs,
		Args:           args,
		Env:            env,
		Cwd:            cwd,
		User:           user,
		Caps:           tc.CapAdd,
		Hostname:       hostname,
		Dirs:           runtime.TaskDirs{Alloc: allocPath(cfg, td.SharedAllocDir), Local: allocPath(cfg, td.LocalDir), Secrets: allocPath(cfg, td.SecretsDir), Logs: logDir(cfg, td.LogDir), Data: allocPath(cfg, filepath.Join(td.SharedAllocDir, "data")), Tmp: allocPath(cfg, filepath.Join(td.SharedAllocDir, "tmp"))},
		Tmpfs:          tc.Tmpfs,
		Mounts:         mounts,
	}
	if bc.Pinned, err = pinnedFiles(allocPath(cfg, td.SecretsDir), "/secrets"); err != nil {
		return nil, err
	}
	bc.Resources.PidsLimit = lim.pids
	if r := cfg.Resources; r != nil && r.LinuxResources != nil {
		lr := r.LinuxResources
		bc.Resources.MemoryLimitBytes = lr.MemoryLimitBytes
		if lr.CPUShares > 0 {
			bc.Resources.CPUShares = uint64(lr.CPUShares)
		}
		// Reserved cores (resources.cores) come as a cpuset; otherwise
		// the sandbox takes the shared cpuset Nomad keeps for tasks.
		bc.Resources.CpusetCpus = lr.CpusetCpus
		if bc.Resources.CpusetCpus == "" && lr.CpusetCgroupPath != "" {
			bc.Resources.CpusetCpus = runtime.CpusetCpus(lr.CpusetCgroupPath)
		}
	}
	return bc, nil
}

// taskArgs is the process's argv: the entrypoint (the task's, else the
// image's) followed by the command (the task's command and args, else its
// args, else the image's cmd unless the task replaced the entrypoint, as a
// container runtime does).
func taskArgs(tc *TaskConfig, ic image.Config) []string {
	ep := tc.Entrypoint
	if len(ep) == 0 {
		ep = ic.Entrypoint
	}
	var cmd []string
	switch {
	case tc.Command != "":
		cmd = append([]string{tc.Command}, tc.Args...)
	case len(tc.Args) > 0:
		cmd = tc.Args
	case len(tc.Entrypoint) == 0:
		cmd = ic.Cmd
	}
	return append(append([]string{}, ep...), cmd...)
}

// taskEnv is the task's environment: the image's variables, then exactly
// what Nomad computed (job env, NOMAD_* variables with the sandbox's paths)
// over them, plus a PATH when neither sets one. Nothing of the plugin's or
// the agent's own environment is added.
func taskEnv(cfg *drivers.TaskConfig, imageEnv []string) []string {
	nomad := cfg.EnvList()
	for k, v := range cfg.DeviceEnv {
		nomad = append(nomad, k+"="+v)
	}
	env := mergeEnv(imageEnv, nomad)
	for _, kv := range env {
		if strings.HasPrefix(kv, "PATH=") {
			return env
		}
	}
	return append(env, "PATH="+runtime.DefaultPath)
}

// mergeEnv returns base with over's variables added or replacing.
func mergeEnv(base, over []string) []string {
	idx := map[string]int{}
	out := make([]string, 0, len(base)+len(over))
	for _, list := range [][]string{base, over} {
		for _, kv := range list {
			k, _, _ := strings.Cut(kv, "=")
			if i, ok := idx[k]; ok {
				out[i] = kv
				continue
			}
			idx[k] = len(out)
			out = append(out, kv)
		}
	}
	return out
}

// resolveRootfs finds the task's root filesystem on the host. A relative
// path lives in the task directory (an artifact unpacked into local/), which
// the task can write: it must not go through a symbolic link at all, or the
// task could point the link elsewhere for its next start. An absolute one
// must be under an operator-allowed directory; its links are resolved before
// the check, so a link cannot lead out of it.
func (d *Driver) resolveRootfs(cfg *drivers.TaskConfig, rootfs string) (string, error) {
	if !filepath.IsAbs(rootfs) {
		return resolveTaskRootfs(cfg.TaskDir().Dir, rootfs)
	}
	if len(d.config.AllowHostRootfs) == 0 {
		return "", fmt.Errorf("rootfs %q: host directories are not allowed on this node: use a path inside the task directory (e.g. local/rootfs from an artifact), or the operator must list a parent in allow_host_rootfs", rootfs)
	}
	real, err := filepath.EvalSymlinks(filepath.Clean(rootfs))
	if errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("rootfs %q: no such file or directory on this node: fix the path, or fetch the root filesystem into the task directory first (an artifact unpacked into local/)", rootfs)
	}
	if err != nil {
		return "", fmt.Errorf("rootfs %q: %w", rootfs, err)
	}
	fi, err := os.Stat(real)
	if err != nil {
		return "", fmt.Errorf("rootfs %q: %w", rootfs, err)
	}
	if !fi.IsDir() {
		return "", fmt.Errorf("rootfs %q is not a directory", rootfs)
	}
	for _, b := range d.config.AllowHostRootfs {
		rb, err := filepath.EvalSymlinks(b)
		if err != nil {
			continue
		}
		if real != rb && strings.HasPrefix(real, rb+string(filepath.Separator)) {
			return real, nil
		}
	}
	return "", fmt.Errorf("rootfs %q is not under a directory in the plugin's allow_host_rootfs %v", rootfs, d.config.AllowHostRootfs)
}

// resolveTaskRootfs resolves a relative rootfs beneath the task directory,
// following no symbolic link, and returns its symlink-free host path.
func resolveTaskRootfs(taskDir, rootfs string) (string, error) {
	rel := filepath.Clean(rootfs)
	if !filepath.IsLocal(rel) || rel == "." {
		return "", fmt.Errorf("rootfs %q leads outside the task directory: use a directory inside it, such as local/rootfs", rootfs)
	}
	h, err := safeopen.Resolve(taskDir, rel, safeopen.NoSymlinks)
	if err == nil && h.Type() == unix.S_IFLNK {
		h.Close()
		err = unix.ELOOP
	}
	switch {
	case errors.Is(err, unix.ELOOP) || errors.Is(err, unix.EXDEV):
		return "", fmt.Errorf("rootfs %q goes through a symbolic link: unpack the root filesystem to a plain directory inside the task directory (e.g. local/rootfs) and name that", rootfs)
	case errors.Is(err, os.ErrNotExist):
		return "", fmt.Errorf("rootfs %q: no such file or directory on this node: fix the path, or fetch the root filesystem into the task directory first (an artifact unpacked into local/)", rootfs)
	case err != nil:
		return "", fmt.Errorf("rootfs %q: %w", rootfs, err)
	}
	defer h.Close()
	if h.Type() != unix.S_IFDIR {
		return "", fmt.Errorf("rootfs %q is not a directory", rootfs)
	}
	return filepath.Join(realPath(taskDir), rel), nil
}

// pinnedFiles are the files in secrets/ (dir, bound at taskPath) that Nomad
// writes as root at every start of the task (and at every renewal while it
// runs) with os.WriteFile, which follows a link: the workload identity token
// (identity { file = true }), from Nomad 1.7 each named identity's
// nomad_<name>.jwt, and the Vault token. Those present are to be bound
// read-only over themselves. One that is there but not a regular file was put
// there by someone else than Nomad: the start is refused.
func pinnedFiles(dir, taskPath string) ([]runtime.HostMount, error) {
	var pinned []runtime.HostMount
	names := []string{"nomad_token", "vault_token"}
	if jwts, err := filepath.Glob(filepath.Join(dir, "nomad_*.jwt")); err == nil {
		for _, j := range jwts {
			names = append(names, filepath.Base(j))
		}
	}
	for _, name := range names {
		fi, err := os.Lstat(filepath.Join(dir, name))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("secrets/%s: %w", name, err)
		}
		if !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("secrets/%s is not a regular file (%v): Nomad writes its token there; remove what replaced it", name, fi.Mode().Type())
		}
		pinned = append(pinned, runtime.HostMount{HostPath: filepath.Join(dir, name), TaskPath: taskPath + "/" + name, Readonly: true})
	}
	return pinned, nil
}

// logDir is the allocation's log directory, to be bound read-only, or ""
// when Nomad made none (it always does when it collects logs).
func logDir(cfg *drivers.TaskConfig, p string) string {
	if fi, err := os.Lstat(p); err != nil || !fi.IsDir() {
		return ""
	}
	return allocPath(cfg, p)
}

// allocPath is p, a path inside the allocation directory, as the
// allocation directory's real path joined with p's own components, which are
// not resolved: the node's other users can replace them (Nomad makes the task
// and shared alloc directories world-writable), so they are resolved, without
// following links, only when they are pinned (runtime.PinPaths).
func allocPath(cfg *drivers.TaskConfig, p string) string {
	rel, err := filepath.Rel(cfg.AllocDir, p)
	if err != nil || !filepath.IsLocal(rel) {
		return realPath(p)
	}
	return filepath.Join(realPath(cfg.AllocDir), rel)
}

// realPath is p with the symbolic links in it resolved (p itself when that
// fails). It is for the node's own paths (Nomad's data directory, volumes),
// so that a rootfs is recognised under whichever name a mount gives it.
func realPath(p string) string {
	if r, err := filepath.EvalSymlinks(p); err == nil {
		return r
	}
	return p
}
