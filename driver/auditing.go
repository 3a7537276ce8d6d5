package driver

import (
	"fmt"

	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/audit"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/netpolicy"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

// auditRecord starts a task's audit record with who and where.
func (d *Driver) auditRecord(cfg *drivers.TaskConfig) *audit.Record {
	parent := cfg.ParentJobID
	if parent == "" {
		// The 1.6 plugin protocol does not carry the parent job; the
		// task environment does, for dispatched and periodic jobs.
		parent = cfg.Env["NOMAD_JOB_PARENT_ID"]
	}
	return &audit.Record{
		RunscVersion: d.runscVersion(),
		Platform:     d.runsc.Platform.String(),
		Namespace:    cfg.Namespace,
		Job:          cfg.JobID,
		ParentJob:    parent,
		AllocID:      cfg.AllocID,
		TaskGroup:    cfg.TaskGroupName,
		Task:         cfg.Name,
		TaskID:       cfg.ID,
		Node:         cfg.NodeName,
		NodeID:       cfg.NodeID,
		User:         cfg.User,
	}
}

// auditPolicy adds what will run and under which policy.
func auditPolicy(rec *audit.Record, id string, bc *runtime.BundleConfig, lim taskLimits) {
	rec.SandboxID = id
	rec.Rootfs = bc.Rootfs
	rec.Command = bc.Args
	name := rec.User
	switch {
	case name != "":
	case bc.User.UID == 0:
		name = "root"
	default:
		name = fmt.Sprintf("uid %d", bc.User.UID)
	}
	rec.User = fmt.Sprintf("%s (uid %d, gid %d)", name, bc.User.UID, bc.User.GID)
	p := &audit.Policy{
		Capabilities:   append([]string{}, bc.Caps...),
		ReadonlyRootfs: bc.ReadonlyRootfs,
		Tmpfs:          bc.Tmpfs,
		MemoryBytes:    bc.Resources.MemoryLimitBytes,
		CPUShares:      bc.Resources.CPUShares,
		Cpuset:         bc.Resources.CpusetCpus,
		PidsLimit:      lim.pids,
		DiskLimit:      lim.diskBytes,
		DiskInodes:     lim.diskInodes,
		Network:        "none", // launch sets what the sandbox got
		Egress:         egressStrings(lim.egress),
		Mounts: []audit.Mount{
			{Source: bc.Dirs.Alloc, Destination: "/alloc"},
			{Source: bc.Dirs.Local, Destination: "/local"},
			{Source: bc.Dirs.Secrets, Destination: "/secrets"},
		},
	}
	for _, m := range bc.Mounts {
		p.Mounts = append(p.Mounts, audit.Mount{Source: m.HostPath, Destination: m.TaskPath, Readonly: m.Readonly})
	}
	if lim.timeout > 0 {
		p.Timeout = lim.timeout.String()
	}
	rec.Policy = p
}

// refuse reports a task that is not started: an event for the operator and
// an audit record, and returns err for Nomad.
func (d *Driver) refuse(cfg *drivers.TaskConfig, rec *audit.Record, err error) error {
	d.emitEvent(cfg, "Sandbox refused: "+err.Error(), nil)
	rec.Event, rec.Error = audit.EventRefused, err.Error()
	if aerr := d.audit.Write(rec, true); aerr != nil {
		d.logger.Error("audit record not written", "task_id", cfg.ID, "error", aerr)
		d.emitEvent(cfg, "Audit record not written: "+aerr.Error(), nil)
	}
	return err
}

func egressStrings(es []netpolicy.Entry) []string {
	var out []string
	for _, e := range es {
		out = append(out, e.String())
	}
	return out
}
