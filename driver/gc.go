package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/atomicfile"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

const (
	// gcInterval is how often the sweep looks for leftovers.
	gcInterval = time.Minute
	// recoverGrace is how long after the plugin starts Nomad has to hand
	// back (RecoverTask) the tasks it still has. A client calls RecoverTask
	// for each task it restores as soon as it has the plugin (at agent
	// start, and when a plugin that died is started again), so a task that
	// was not recovered by then is no task of Nomad's.
	recoverGrace = 2 * time.Minute
)

// Crash points of a start, for Driver.crashHook.
const (
	// crashBeforeRun: the state directory, cgroup, network and bundle
	// exist, the sandbox does not run yet.
	crashBeforeRun = "before-run"
	// crashBeforeHandle: the sandbox runs; Nomad has no handle for it yet.
	crashBeforeHandle = "before-handle"
	// crashMidDestroy: DestroyTask has scrubbed the secrets and stopped
	// the sandbox; its cgroups, network and state directory remain.
	crashMidDestroy = "mid-destroy"
)

// collectGarbage owns recovery from crashes: at start and then every
// gcInterval it removes what no task of Nomad's owns (see sweep).
func (d *Driver) collectGarbage(ctx context.Context) {
	start := time.Now()
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			graceOver := time.Since(start) >= recoverGrace
			d.sweep(ctx, graceOver)
			d.collectImages()
			next := gcInterval
			if left := recoverGrace - time.Since(start); !graceOver && left < next {
				// Sweep again the moment the grace ends.
				next = left
			}
			t.Reset(next)
		}
	}
}

// beginLaunch marks id as being started, so that the sweep leaves its state,
// cgroup, network and sandbox alone until the start has put it in the task
// store (or failed and removed them itself). Call the returned function then.
func (d *Driver) beginLaunch(id string) func() {
	d.sweepMu.Lock()
	defer d.sweepMu.Unlock()
	if d.launching == nil {
		d.launching = map[string]bool{}
	}
	d.launching[id] = true
	return func() {
		d.sweepMu.Lock()
		defer d.sweepMu.Unlock()
		delete(d.launching, id)
	}
}

// sweep removes everything of this driver that belongs to no task Nomad
// still has: state directories (with their sandbox, supervisor, cgroups,
// network and mounts), runsc containers, networks and supervisor or runsc
// processes that no state directory accounts for. A state directory is kept
// while its task is in the task store or being started; otherwise while its
// allocation's task directory exists and graceOver is false (Nomad may still
// recover it). Each removal is logged once, with its reason.
func (d *Driver) sweep(ctx context.Context, graceOver bool) {
	d.sweepMu.Lock()
	defer d.sweepMu.Unlock()
	keep := d.tasks.SandboxIDs()
	for id := range d.launching {
		keep[id] = true
	}
	entries, err := os.ReadDir(d.config.StateDir)
	if err != nil {
		d.logger.Warn("cannot read state_dir", "path", d.config.StateDir, "error", err)
		return
	}
	for _, e := range entries {
		id := e.Name()
		if keep[id] || !e.IsDir() {
			continue
		}
		dir := filepath.Join(d.config.StateDir, id)
		meta, why := leftover(dir, graceOver)
		if why == "" {
			keep[id] = true
			continue
		}
		if err := d.removeSandbox(id, &runtime.Supervisor{Dir: dir, Exe: d.supervisorExe}); err != nil {
			// Kept for the next sweep, its network too.
			keep[id] = true
			d.logger.Warn("failed to remove leftover sandbox", "sandbox_id", id, "reason", why, "error", err)
			continue
		}
		d.logger.Info("removed leftover sandbox", "sandbox_id", id, "reason", why,
			"task_id", meta.TaskID, "alloc_id", meta.AllocID, "task", meta.TaskName)
	}
	// Networks of no state directory kept (netpolicy logs each removal).
	if err := d.net.Reconcile(keep); err != nil {
		d.logger.Warn("failed to remove leftover sandbox networks", "error", err)
	}
	// Sandboxes runsc knows whose state directory is gone.
	ids, err := d.runsc.List(ctx)
	if err != nil && !errors.Is(err, runtime.ErrNotExist) {
		d.logger.Warn("cannot list runsc containers", "runsc_root", d.config.RunscRoot, "error", err)
	}
	for _, id := range ids {
		if keep[id] {
			continue
		}
		if err := d.runsc.Delete(ctx, id, runtime.DeleteOpts{Force: true}); err != nil && !errors.Is(err, runtime.ErrNotExist) {
			d.logger.Warn("failed to delete leftover runsc container", "sandbox_id", id, "error", err)
			continue
		}
		d.removeCgroups(id)
		d.logger.Info("removed leftover runsc container", "sandbox_id", id, "reason", "no state directory")
	}
	d.killStrays(func(id string) bool { return !keep[id] })
	d.sweepDisks()
}

// leftover reads a state directory's task record and says why the
// directory is no task's that Nomad may still have; why is "" when it may.
func leftover(dir string, graceOver bool) (meta taskMeta, why string) {
	var pathErr *fs.PathError
	switch err := atomicfile.ReadJSON(runtime.StateDir(dir).TaskMeta(), &meta); {
	case errors.As(err, &pathErr):
		// Written before anything else a start makes and removed last: a
		// start or a removal was cut short.
		return meta, "no task record (a start or removal was cut short)"
	case err != nil:
		return meta, "unreadable task record"
	}
	if _, err := os.Lstat(meta.TaskDir); errors.Is(err, os.ErrNotExist) {
		return meta, "Nomad removed the allocation"
	}
	if !graceOver {
		return meta, ""
	}
	return meta, fmt.Sprintf("Nomad did not recover the task within %s of the plugin's start", recoverGrace)
}

// killStrays kills supervisors of this state_dir and runsc processes of this
// runsc_root whose sandbox id is stray: a supervisor killed before it wrote
// its pid file, a runsc whose supervisor died mid-create, a sandbox or gofer
// whose runsc state is gone.
func (d *Driver) killStrays(stray func(id string) bool) {
	stateDir, root := filepath.Clean(d.config.StateDir), filepath.Clean(d.config.RunscRoot)
	ids := map[string]bool{}
	for _, p := range runtime.Processes(func(args []string) bool {
		if dir := runtime.SupervisorOf(args); dir != "" {
			return filepath.Dir(dir) == stateDir && stray(filepath.Base(dir))
		}
		id := runtime.ContainerOf(root, args)
		return id != "" && stray(id)
	}) {
		if p.Uid != 0 {
			// Another user's process dressed as ours: killing it, or
			// the cgroups its argv names, is not for its argv to decide.
			continue
		}
		if err := p.Kill(10 * time.Second); err != nil {
			d.logger.Warn("failed to kill leftover process", "pid", p.Pid, "args", p.Args, "error", err)
			continue
		}
		d.logger.Info("killed leftover process", "pid", p.Pid, "args", p.Args)
		id := runtime.ContainerOf(root, p.Args)
		if id == "" {
			id = filepath.Base(runtime.SupervisorOf(p.Args))
		}
		ids[id] = true
	}
	// Their sandbox's cgroups, which nothing else names any more.
	for id := range ids {
		d.removeCgroups(id)
	}
}

// removeCgroups removes a sandbox's cgroup from every hierarchy.
func (d *Driver) removeCgroups(id string) {
	removed, err := runtime.RemoveCgroupEverywhere(taskCgroup(id).Path)
	if err != nil {
		d.logger.Warn("failed to remove leftover cgroup", "sandbox_id", id, "error", err)
	}
	for _, dir := range removed {
		d.logger.Debug("removed cgroup", "sandbox_id", id, "path", dir)
	}
}

// detachMounts unmounts whatever is mounted in a state directory before it
// is removed: removing the tree would otherwise delete what is mounted.
func detachMounts(dir string) error {
	mounts, err := runtime.MountsUnder(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, mp := range mounts {
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
		}
	}
	return errors.Join(errs...)
}

// crashPoint calls the test's crash hook, if any.
func (d *Driver) crashPoint(point string) {
	if d.crashHook != nil {
		d.crashHook(point)
	}
}

// supervisorLost stops what is left of a sandbox whose supervisor was
// killed: the sandbox may still run, with nobody to wait for it, relay its
// output or enforce its time limit. The task has already ended as a failure
// (runtime.ErrSupervisorLost); the event says what was lost.
func (d *Driver) supervisorLost(h *taskHandle) {
	err := d.runsc.Delete(context.Background(), h.sandboxID, runtime.DeleteOpts{Force: true})
	if err != nil && !errors.Is(err, runtime.ErrNotExist) {
		h.logger.Warn("failed to stop a sandbox whose supervisor was killed", "error", err)
	}
	h.logger.Error("task supervisor was killed; sandbox stopped, exit code lost")
	d.emitEvent(h.taskConfig, "Sandbox lost: its supervisor was killed, so the task's exit code (and any output after that) is lost; the sandbox was stopped", nil)
}
