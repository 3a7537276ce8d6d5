package driver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"
	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/audit"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/image"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/atomicfile"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/cleanup"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

const (
	startTimeout = 2 * time.Minute
	// timeoutKillGrace is how long a task whose time is up has between
	// SIGTERM and SIGKILL. Nomad 1.6 does not tell a driver the job's
	// kill_timeout before it stops the task itself.
	timeoutKillGrace = 5 * time.Second
)

// taskMeta, in runtime.StateDir.TaskMeta, records which Nomad task a state
// directory belongs to, so leftovers can be matched after a crash.
type taskMeta struct {
	TaskID    string `json:"task_id"`
	AllocID   string `json:"alloc_id"`
	TaskName  string `json:"task_name"`
	TaskDir   string `json:"task_dir"`
	SandboxID string `json:"sandbox_id"`
	// ImageDigest is the cached image the sandbox's root is, if any; the
	// image GC keeps it while this state directory exists.
	ImageDigest string `json:"image_digest,omitempty"`
}

func (d *Driver) StartTask(cfg *drivers.TaskConfig) (*drivers.TaskHandle, *drivers.DriverNetwork, error) {
	if d.config == nil {
		return nil, nil, errors.New("sandbox driver is not configured")
	}
	if _, ok := d.tasks.Get(cfg.ID); ok {
		return nil, nil, fmt.Errorf("task %q is already started", cfg.ID)
	}
	rec := d.auditRecord(cfg)
	var tc TaskConfig
	if err := cfg.DecodeDriverConfig(&tc); err != nil {
		return nil, nil, d.refuse(cfg, rec, fmt.Errorf("task config: %w", err))
	}
	// What the task asked for, so that even a refusal says what would
	// have run; the start record replaces it with what did.
	rec.Rootfs, rec.Image = tc.Rootfs, tc.Image
	rec.Command = taskArgs(&tc, image.Config{})
	lim, err := d.validateTask(cfg, &tc)
	if err != nil {
		return nil, nil, d.refuse(cfg, rec, err)
	}
	release, err := d.admit()
	if err != nil {
		return nil, nil, d.refuse(cfg, rec, err)
	}
	defer release()
	var img *image.Image
	if tc.Image != "" {
		if img, err = d.pullImage(cfg, &tc); err != nil {
			return nil, nil, d.refuse(cfg, rec, err)
		}
		rec.ImageDigest = img.Digest
	}
	bc, err := d.bundleFor(cfg, &tc, img, lim)
	if err != nil {
		return nil, nil, d.refuse(cfg, rec, err)
	}

	id := sandboxID(cfg)
	// Until the handle is in the task store, the sweep keeps off.
	defer d.beginLaunch(id)()
	auditPolicy(rec, id, bc, lim)
	h, handle, err := d.launch(cfg, id, bc, lim, rec)
	if err != nil {
		d.emitEvent(cfg, "Sandbox failed to start: "+err.Error(), nil)
		rec.Event, rec.Error = audit.EventStartFailed, err.Error()
		if aerr := d.audit.Write(rec, true); aerr != nil {
			d.logger.Error("audit record not written", "task_id", cfg.ID, "error", aerr)
		}
		return nil, nil, fmt.Errorf("start sandbox: %w", err)
	}
	d.tasks.Set(cfg.ID, h)
	go d.reportExit(h)

	d.emitEvent(cfg, fmt.Sprintf("Sandbox started: runsc %s, platform %s", rec.RunscVersion, rec.Platform), map[string]string{
		"sandbox_id":    id,
		"platform":      rec.Platform,
		"runsc_version": rec.RunscVersion,
	})
	pinned := cfg.Resources != nil && cfg.Resources.LinuxResources != nil && cfg.Resources.LinuxResources.CpusetCpus != ""
	d.emitEvent(cfg, "Limits applied: "+limitsSummary(bc.Resources, lim, pinned), nil)
	if v6 := ipv6Entries(lim.egress); len(v6) > 0 {
		d.emitEvent(cfg, "Egress entries without effect: "+strings.Join(v6, ", ")+" (sandboxes have IPv4 only; IPv6 is dropped)", nil)
	}
	return handle, nil, nil
}

// launch creates the sandbox's state, cgroup and bundle and starts its
// supervisor. On failure it removes everything it made.
func (d *Driver) launch(cfg *drivers.TaskConfig, id string, bc *runtime.BundleConfig, lim taskLimits, rec *audit.Record) (*taskHandle, *drivers.TaskHandle, error) {
	sd := runtime.StateDir(filepath.Join(d.config.StateDir, id))
	dir := sd.Path()
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, nil, fmt.Errorf("create task state: %w", err)
	}
	cu := cleanup.Make(func() {
		// Never down into a task path still pinned there.
		if runtime.UnpinPaths(dir) == nil {
			_ = os.RemoveAll(dir)
		}
	})
	defer cu.Clean()

	bundle := sd.Bundle()
	if err := os.Mkdir(bundle, 0o700); err != nil {
		return nil, nil, fmt.Errorf("create bundle: %w", err)
	}
	meta := taskMeta{TaskID: cfg.ID, AllocID: cfg.AllocID, TaskName: cfg.Name, TaskDir: cfg.TaskDir().Dir, SandboxID: id, ImageDigest: rec.ImageDigest}
	if err := atomicfile.WriteJSON(sd.TaskMeta(), meta, 0o600); err != nil {
		return nil, nil, err
	}
	bc.ResolvConf = sd.ResolvConf()
	bc.Hosts = sd.Hosts()
	if err := os.WriteFile(bc.Hosts, runtime.HostsFile(bc.Hostname), 0o644); err != nil {
		return nil, nil, fmt.Errorf("write hosts: %w", err)
	}
	// Before the sandbox exists: runsc binds local/, alloc/data and
	// alloc/tmp with the disks' overlays on them.
	cu.Add(func() {
		_ = runtime.UnmountDisk(dir)
		_ = runtime.UncoverTaskDirs(dir)
		_ = runtime.LeaveAllocDisk(dir)
	})
	if err := d.mountDisk(d.ctx, cfg, dir, lim); err != nil {
		return nil, nil, fmt.Errorf("disk_limit: %w", err)
	}
	cg := taskCgroup(id)
	if r := cfg.Resources; r != nil && r.LinuxResources != nil && r.LinuxResources.CpusetCgroupPath != "" {
		if borrowed, ok := runtime.BorrowCgroup(r.LinuxResources.CpusetCgroupPath); ok {
			cg = borrowed
		}
	}
	if err := cg.Create(&bc.Resources); err != nil {
		return nil, nil, err
	}
	cu.Add(func() { _ = cg.Destroy() })
	bc.CgroupsPath = cg.Path
	network := "none"
	var tn *taskNet
	if lim.net == netHost {
		network, bc.HostNetwork = "host", true
	} else if lim.net == netGroup || len(lim.egress) > 0 {
		var err error
		if tn, err = d.setupNetwork(cfg, id, dir, lim); err != nil {
			return nil, nil, err
		}
	}
	if tn != nil {
		cu.Add(func() {
			tn.stop()
			_ = d.net.Destroy(id)
		})
		network, bc.NetnsPath = "sandbox", tn.nw.Netns
	}
	switch {
	case bc.HostNetwork:
		rec.Policy.Network = "host (allow_host_network)"
	case tn != nil && tn.nw.Attached:
		rec.Policy.Network = "sandbox in the group network, default deny"
	case tn != nil:
		rec.Policy.Network = "sandbox, default deny"
	}
	var dns, search, opts []string
	if cfg.DNS != nil {
		dns, search, opts = cfg.DNS.Servers, cfg.DNS.Searches, cfg.DNS.Options
	}
	if tn != nil {
		// The sandbox's only resolver is its own DNS service.
		dns, opts = []string{tn.nw.Gateway.String()}, []string{"ndots:1"}
	}
	if err := os.WriteFile(bc.ResolvConf, runtime.ResolvConf(dns, search, opts), 0o644); err != nil {
		return nil, nil, fmt.Errorf("write resolv.conf: %w", err)
	}
	// runsc is to open exactly the task paths checked here, whatever
	// the node's other users do to them meanwhile.
	cu.Add(func() { _ = runtime.UnpinPaths(dir) })
	if err := runtime.WritePinnedBundle(bundle, bc, realPath(cfg.AllocDir), dir); err != nil {
		return nil, nil, err
	}

	overlay := "none"
	if !bc.ReadonlyRootfs {
		// Writes to the root go to memory and vanish with the sandbox;
		// the host directory is never modified.
		overlay = "root:memory"
	}
	hostUDS := "none"
	if d.config.AllowTaskAPI {
		// Lets the task connect to Unix sockets in its own mounts:
		// Nomad's Task API at /secrets/api.sock.
		hostUDS = "open"
	}
	spec := &runtime.SupervisorSpec{
		ID:    id,
		Runsc: *d.runsc,
		Run: runtime.RunOpts{
			Bundle:  bundle,
			Network: network,
			Overlay: overlay,
			HostUDS: hostUDS,
			// cap_add = ["net_raw"], which allow_caps must permit.
			NetRaw:   slices.Contains(bc.Caps, "CAP_NET_RAW"),
			LogFile:  sd.RunscLog(),
			PanicLog: sd.RunscPanicLog(),
		},
		Stdout:    cfg.StdoutPath,
		Stderr:    cfg.StderrPath,
		LogRoot:   cfg.AllocDir,
		Cgroup:    cg,
		Timeout:   lim.timeout,
		KillGrace: timeoutKillGrace,
		AuditLog:  d.config.AuditLog,
		Audit:     rec,
		Trace:     d.config.traceConfig(rec),
	}
	sup := &runtime.Supervisor{Dir: dir, Exe: d.supervisorExe}
	cu.Add(func() {
		sup.Kill()
		_ = d.runsc.Delete(context.Background(), id, runtime.DeleteOpts{Force: true})
	})
	d.crashPoint(crashBeforeRun)
	ctx, cancel := context.WithTimeout(d.ctx, startTimeout)
	defer cancel()
	if err := sup.Start(ctx, spec); err != nil {
		return nil, nil, err
	}
	// runsc has bound the task's paths into the sandbox: the pins have
	// done their work, and the state directory holds none of the task's
	// directories from here on (what fails here, removeSandbox retries).
	if err := runtime.UnpinPaths(dir); err != nil {
		d.logger.Warn("failed to remove the task's path pins", "sandbox_id", id, "error", err)
	}
	d.crashPoint(crashBeforeHandle)
	st := taskState{SandboxID: id, StateDir: dir, StartedAt: time.Now().UTC()}

	handle := drivers.NewTaskHandle(taskHandleVersion)
	handle.Config = cfg
	if err := handle.SetDriverState(&st); err != nil {
		return nil, nil, fmt.Errorf("encode task state: %w", err)
	}
	cu.Release()
	h := newTaskHandle(cfg, st, sup, spec, d.logger.With("task_id", cfg.ID, "sandbox_id", id))
	h.net = tn
	return h, handle, nil
}

func sandboxID(cfg *drivers.TaskConfig) string {
	sum := sha256.Sum256([]byte(cfg.ID))
	alloc := cfg.AllocID
	if len(alloc) > 8 {
		alloc = alloc[:8]
	}
	name := sanitize(cfg.Name, 40)
	return fmt.Sprintf("nomad-%s-%s-%s", sanitize(alloc, 8), name, hex.EncodeToString(sum[:4]))
}

func sanitize(s string, max int) string {
	var b strings.Builder
	for _, r := range strings.ToLower(s) {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' {
			b.WriteRune(r)
		} else {
			b.WriteRune('-')
		}
		if b.Len() >= max {
			break
		}
	}
	if b.Len() == 0 {
		return "task"
	}
	return b.String()
}

func defaultHostname(task string) string {
	h := strings.Trim(sanitize(task, 63), "-")
	if h == "" {
		return "sandbox"
	}
	return h
}

func (d *Driver) RecoverTask(handle *drivers.TaskHandle) error {
	if handle == nil {
		return errors.New("recover task: nil handle")
	}
	if _, ok := d.tasks.Get(handle.Config.ID); ok {
		return nil
	}
	if d.config == nil {
		return errors.New("recover task: sandbox driver is not configured")
	}
	var st taskState
	if err := handle.GetDriverState(&st); err != nil {
		return fmt.Errorf("recover task: decode state: %w", err)
	}
	if st.StateDir == "" || filepath.Dir(st.StateDir) != filepath.Clean(d.config.StateDir) {
		return fmt.Errorf("recover task: state directory %q is not under state_dir %q", st.StateDir, d.config.StateDir)
	}
	// Not while a sweep decides whether this state is a leftover.
	d.sweepMu.Lock()
	defer d.sweepMu.Unlock()
	sup := &runtime.Supervisor{Dir: st.StateDir, Exe: d.supervisorExe}
	// A supervisor that is gone without an exit status was killed: the
	// task is recovered all the same, and its reportExit reports the loss
	// (runtime.ErrSupervisorLost) and stops what is left of the sandbox.
	if _, err := sup.ExitStatus(); err != nil {
		return fmt.Errorf("recover task: %w", err)
	}
	spec, err := sup.Spec()
	if err != nil {
		return fmt.Errorf("recover task: %w", err)
	}
	h := newTaskHandle(handle.Config, st, sup, spec, d.logger.With("task_id", handle.Config.ID, "sandbox_id", st.SandboxID))
	if sup.Alive() {
		// The DNS service and the denial collector lived in the old
		// plugin process; the namespace and filter are still there.
		tn, err := d.loadNetwork(st.StateDir, st.SandboxID)
		if err != nil {
			return fmt.Errorf("recover task: network: %w", err)
		}
		if tn != nil {
			if err := d.startNetwork(handle.Config, tn); err != nil {
				return fmt.Errorf("recover task: %w", err)
			}
			h.net = tn
		}
	}
	d.tasks.Set(handle.Config.ID, h)
	go d.reportExit(h)
	d.logger.Info("recovered task", "task_id", handle.Config.ID, "sandbox_id", st.SandboxID)
	return nil
}

func (d *Driver) WaitTask(ctx context.Context, taskID string) (<-chan *drivers.ExitResult, error) {
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return nil, drivers.ErrTaskNotFound
	}
	ch := make(chan *drivers.ExitResult, 1)
	go func() {
		defer close(ch)
		select {
		case <-h.done:
			ch <- h.result()
		case <-ctx.Done():
		case <-d.ctx.Done():
		}
	}()
	return ch, nil
}

func (d *Driver) StopTask(taskID string, timeout time.Duration, signal string) error {
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return drivers.ErrTaskNotFound
	}
	if !h.running() {
		return nil
	}
	sig := unix.SIGTERM
	if signal != "" {
		s, err := parseSignal(signal)
		if err != nil {
			return err
		}
		sig = s
	}
	ctx := context.Background()
	if err := d.runsc.Kill(ctx, h.sandboxID, sig, runtime.KillOpts{}); err != nil && h.running() {
		h.logger.Warn("stop signal failed; killing", "signal", sig, "error", err)
	}
	select {
	case <-h.done:
		return nil
	case <-time.After(timeout):
	}
	return d.kill(h)
}

// kill sends SIGKILL to every process of the sandbox and waits for it to
// end.
func (d *Driver) kill(h *taskHandle) error {
	// The kill can fail because the sandbox is ending on its own; what
	// counts is that it ends.
	killErr := d.runsc.Kill(context.Background(), h.sandboxID, unix.SIGKILL, runtime.KillOpts{All: true})
	select {
	case <-h.done:
		return nil
	case <-time.After(30 * time.Second):
		if killErr != nil {
			return fmt.Errorf("kill sandbox %s: %w", h.sandboxID, killErr)
		}
		return fmt.Errorf("sandbox %s did not exit after SIGKILL", h.sandboxID)
	}
}

func (d *Driver) DestroyTask(taskID string, force bool) error {
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return drivers.ErrTaskNotFound
	}
	if h.running() {
		if !force {
			return errors.New("cannot destroy a running task without force")
		}
		if err := d.kill(h); err != nil {
			h.logger.Warn("failed to stop task on destroy", "error", err)
		}
	}
	h.net.stop()
	err := d.removeSandbox(h.sandboxID, h.sup)
	// Nomad does not ask twice: what could not be removed now is the
	// sweep's to finish, which it does only for tasks not in the store.
	d.tasks.Delete(taskID)
	return err
}

// removeSandbox deletes a sandbox and everything of it: supervisor, runsc
// container and processes, cgroups, network, mounts and state directory. It
// is safe to call for a sandbox that is partly or wholly gone (a crash can
// stop it anywhere: it starts with what must not outlive the task, the
// secrets, and removes the state directory, through which the sweep finds
// the rest, last).
func (d *Driver) removeSandbox(id string, sup *runtime.Supervisor) error {
	runtime.ScrubSecrets(sup.Dir)
	// A supervisor that stored an exit status has deleted the container
	// already; asking runsc again would only cost a process.
	if st, _ := sup.ExitStatus(); st == nil || sup.Alive() {
		sup.Kill()
		d.killStrays(func(sid string) bool { return sid == id })
		err := d.runsc.Delete(context.Background(), id, runtime.DeleteOpts{Force: true})
		if err != nil && !errors.Is(err, runtime.ErrNotExist) {
			if exists, xerr := d.runsc.Exists(context.Background(), id); xerr != nil || exists {
				return fmt.Errorf("delete sandbox %s: %w", id, err)
			}
		}
	}
	d.crashPoint(crashMidDestroy)
	if _, err := runtime.RemoveCgroupEverywhere(taskCgroup(id).Path); err != nil {
		return err
	}
	if err := d.net.Destroy(id); err != nil {
		return fmt.Errorf("remove sandbox network: %w", err)
	}
	if err := runtime.UnpinPaths(sup.Dir); err != nil {
		return fmt.Errorf("remove task state: %w", err)
	}
	if err := runtime.UnmountDisk(sup.Dir); err != nil {
		return fmt.Errorf("remove task disk: %w", err)
	}
	if err := runtime.UncoverTaskDirs(sup.Dir); err != nil {
		return fmt.Errorf("remove the task's nosuid binds: %w", err)
	}
	if err := runtime.LeaveAllocDisk(sup.Dir); err != nil {
		return fmt.Errorf("remove allocation disk: %w", err)
	}
	if err := detachMounts(sup.Dir); err != nil {
		return fmt.Errorf("remove task state: %w", err)
	}
	if err := os.RemoveAll(sup.Dir); err != nil {
		return fmt.Errorf("remove task state: %w", err)
	}
	return nil
}

// taskCgroup is the host cgroup of a sandbox, named after it so that a
// restarted plugin finds it from the sandbox ID alone.
func taskCgroup(id string) *runtime.Cgroup {
	return runtime.NewCgroup("/nomad-sandbox/" + id)
}

func (d *Driver) InspectTask(taskID string) (*drivers.TaskStatus, error) {
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return nil, drivers.ErrTaskNotFound
	}
	return h.status(), nil
}

func (d *Driver) SignalTask(taskID string, signal string) error {
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return drivers.ErrTaskNotFound
	}
	sig, err := parseSignal(signal)
	if err != nil {
		return err
	}
	return d.runsc.Kill(context.Background(), h.sandboxID, sig, runtime.KillOpts{})
}

func parseSignal(s string) (syscall.Signal, error) {
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	sig := unix.SignalNum(name)
	if sig == 0 {
		return 0, fmt.Errorf("unknown signal %q", s)
	}
	return sig, nil
}
