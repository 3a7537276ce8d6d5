package driver

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

// admit reserves a sandbox slot under max_sandboxes, failing at once when
// none is free: a task beyond the limit must fail fast, not queue. The
// returned release ends the reservation once the task is in the store (or
// has failed to start).
func (d *Driver) admit() (release func(), err error) {
	d.admitMu.Lock()
	defer d.admitMu.Unlock()
	if max := d.config.MaxSandboxes; max > 0 {
		if n := d.tasks.Running() + d.starting; n >= max {
			return nil, fmt.Errorf("this node already runs %d sandboxes, its limit (the plugin's max_sandboxes = %d): run the task on another node or raise the limit", n, max)
		}
	}
	d.starting++
	return func() {
		d.admitMu.Lock()
		defer d.admitMu.Unlock()
		d.starting--
	}, nil
}

// reportExit follows a task to its end and reports how it ended as task events.
func (d *Driver) reportExit(h *taskHandle) {
	st := h.awaitExit(d.ctx)
	if st == nil {
		return
	}
	cfg := h.taskConfig
	if r := h.result(); r != nil && errors.Is(r.Err, runtime.ErrSupervisorLost) {
		d.supervisorLost(h)
	}
	if st.AuditErr != "" {
		h.logger.Error("audit record of the task's end not written", "error", st.AuditErr)
		d.emitEvent(cfg, "Audit record not written: "+st.AuditErr, nil)
	}
	if st.LogErr != "" {
		h.logger.Error("task output dropped", "error", st.LogErr)
		d.emitEvent(cfg, "Task output dropped: "+st.LogErr, nil)
	}
	if st.TimedOut {
		ran := st.CompletedAt.Sub(st.StartedAt).Round(100 * time.Millisecond)
		d.emitEvent(cfg, fmt.Sprintf("Time limit exceeded: ran %s, timeout is %s; stopped with SIGTERM (SIGKILL %s later if needed). Raise the task's timeout, up to the node's max_timeout.", ran, h.spec.Timeout, timeoutKillGrace), map[string]string{
			"timeout": h.spec.Timeout.String(),
		})
	}
	if st.DiskFull != "" {
		d.emitEvent(cfg, "Disk limit reached: "+st.DiskFull+"; writes failed with ENOSPC. Raise the task's disk_limit (or disk_inodes), up to the node's max_disk_limit.", nil)
	}
	if st.OOMKilled {
		limit := "its memory limit"
		if r := cfg.Resources; r != nil && r.LinuxResources != nil && r.LinuxResources.MemoryLimitBytes > 0 {
			limit = fmt.Sprintf("its memory limit of %d MiB", r.LinuxResources.MemoryLimitBytes>>20)
		}
		d.emitEvent(cfg, fmt.Sprintf("OOM killed: the sandbox reached %s; raise resources.memory (or memory_max).", limit), nil)
	}
}

// limitsSummary is the "Limits applied" event's text.
func limitsSummary(r runtime.Resources, lim taskLimits, pinned bool) string {
	var parts []string
	if r.MemoryLimitBytes > 0 {
		parts = append(parts, fmt.Sprintf("memory %d MiB", r.MemoryLimitBytes>>20))
	} else {
		parts = append(parts, "memory unlimited")
	}
	if r.CPUShares > 0 {
		parts = append(parts, fmt.Sprintf("cpu shares %d", r.CPUShares))
	}
	if pinned && r.CpusetCpus != "" {
		parts = append(parts, "reserved cores "+r.CpusetCpus)
	}
	if lim.pids > 0 {
		parts = append(parts, fmt.Sprintf("pids %d", lim.pids))
	} else {
		parts = append(parts, "pids unlimited")
	}
	if lim.diskBytes > 0 {
		parts = append(parts, fmt.Sprintf("disk %s, %d inodes", runtime.FormatSize(lim.diskBytes), lim.diskInodes))
	} else {
		parts = append(parts, "disk unlimited")
	}
	if lim.timeout > 0 {
		parts = append(parts, "timeout "+lim.timeout.String())
	} else {
		parts = append(parts, "no timeout")
	}
	return strings.Join(parts, ", ")
}

// runscVersion is the version the fingerprint found, asked for once if the
// fingerprint has not run yet.
func (d *Driver) runscVersion() string {
	d.versionMu.Lock()
	defer d.versionMu.Unlock()
	if d.version == "" {
		ctx, cancel := context.WithTimeout(d.ctx, 10*time.Second)
		defer cancel()
		if v, err := d.runsc.Version(ctx); err == nil {
			d.version = v
		}
	}
	return d.version
}
