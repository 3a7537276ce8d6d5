package runtime

import (
	"path/filepath"
)

// StateDir is one task's state directory, state_dir/<sandbox id>/, root's
// alone. It is the only place that spells the names of the files in it: a
// plugin upgraded in place recovers the tasks an older one started from
// these files, so a name, once used, never changes.
type StateDir string

// The entries of a task's state directory, as they are on disk.
const (
	taskMetaName       = "task.json"
	bundleName         = "bundle"
	bundleSpecName     = "config.json" // inside bundleName, as OCI names it
	supervisorSpecName = "supervisor.json"
	supervisorPidName  = "supervisor.pid"
	supervisorSockName = "supervisor.sock"
	supervisorLogName  = "supervisor.log"
	sandboxPidName     = "sandbox.pid"
	exitName           = "exit.json"
	runscLogName       = "runsc.log"
	runscPanicLogName  = "runsc-panic.log"
	resolvConfName     = "resolv.conf"
	hostsName          = "hosts"
	networkName        = "network.json"
	diskName           = "disk.json"
	diskMountName      = "disk"
	allocDiskName      = "allocdisk.json"
	noSuidName         = "nosuid.json"
	pinsName           = "pins"
	traceSockName      = "trace.sock"
	traceConfigName    = "trace.json"
	execProcessPattern = "exec-*.json"
)

// StateFile describes one entry of a task's state directory.
type StateFile struct {
	// Name is the entry's name in the state directory (a glob for the
	// exec process files).
	Name string
	// Writer is who makes it, Holds what it is for.
	Writer, Holds string
}

// StateFiles lists every entry of a task's state directory, for the
// documentation (docs/ARCHITECTURE.md is checked against it) and for anyone
// looking for the room of a new file.
func StateFiles() []StateFile {
	return []StateFile{
		{taskMetaName, "driver (launch)", "which Nomad task, allocation and image the directory belongs to; the sweep and the image GC read it"},
		{bundleName + "/" + bundleSpecName, "runtime (WritePinnedBundle, from launch)", "the OCI bundle's spec; carries the task's environment and is removed when the sandbox ends (ScrubSecrets)"},
		{resolvConfName, "driver (launch)", "the sandbox's /etc/resolv.conf"},
		{hostsName, "driver (launch)", "the sandbox's /etc/hosts"},
		{pinsName, "runtime (PinPaths)", "the task's host paths pinned for runsc until the sandbox runs (UnpinPaths)"},
		{networkName, "driver (setupNetwork, the DNS service)", "the sandbox's egress list, its denials and refused names (NetworkRecord)"},
		{diskName, "runtime (Disk.Mount)", "the task's mounted disk image (DiskRecord)"},
		{diskMountName, "runtime (Disk.Mount)", "where the disk image is mounted"},
		{allocDiskName, "runtime (JoinAllocDisk)", "that the task holds its allocation's disk for alloc/data and alloc/tmp (allocHolder)"},
		{noSuidName, "runtime (CoverTaskDirs)", "the task's own directories bound nosuid over themselves, for the removal's strip of set-id bits (noSuidRecord)"},
		{supervisorSpecName, "runtime (Supervisor.Start)", "what the supervisor runs (SupervisorSpec)"},
		{supervisorPidName, "supervisor", "the supervisor's pid (Supervisor.Alive)"},
		{supervisorSockName, "supervisor", "closes when the supervisor is done (Supervisor.Wait)"},
		{supervisorLogName, "supervisor", "the supervisor's own errors"},
		{sandboxPidName, "runsc run --pid-file", "the sandbox's pid, the supervisor's child to wait for"},
		{runscLogName, "runsc (--log)", "runsc's log"},
		{runscPanicLogName, "runsc (--panic-log)", "the sandbox's Go runtime messages"},
		{traceSockName, "supervisor (trace.Listen)", "where gVisor sends the trail's points"},
		{traceConfigName, "supervisor (trace.Listen)", "runsc's --pod-init-config for the trail"},
		{exitName, "supervisor", "the task's exit status (ExitStatus); Nomad learns how a task ended from it after any restart"},
		{execProcessPattern, "driver (ExecTask)", "an exec's OCI process, removed when the exec ends"},
	}
}

// Path is the directory itself.
func (d StateDir) Path() string { return string(d) }

func (d StateDir) join(name string) string { return filepath.Join(string(d), name) }

// TaskMeta is the driver's record of the Nomad task the directory is for.
func (d StateDir) TaskMeta() string { return d.join(taskMetaName) }

// Bundle is the sandbox's OCI bundle directory.
func (d StateDir) Bundle() string { return d.join(bundleName) }

// BundleSpec is the bundle's config.json.
func (d StateDir) BundleSpec() string { return bundleSpec(d.Bundle()) }

// bundleSpec is the spec file of the OCI bundle in dir.
func bundleSpec(bundle string) string { return filepath.Join(bundle, bundleSpecName) }

// SupervisorSpec is the SupervisorSpec the supervisor runs.
func (d StateDir) SupervisorSpec() string { return d.join(supervisorSpecName) }

// SupervisorPid holds the supervisor's pid.
func (d StateDir) SupervisorPid() string { return d.join(supervisorPidName) }

// SupervisorSock is the supervisor's socket.
func (d StateDir) SupervisorSock() string { return d.join(supervisorSockName) }

// SupervisorLog is the supervisor's stdout and stderr.
func (d StateDir) SupervisorLog() string { return d.join(supervisorLogName) }

// SandboxPid is runsc's --pid-file: the sandbox's pid.
func (d StateDir) SandboxPid() string { return d.join(sandboxPidName) }

// Exit is the task's stored ExitStatus.
func (d StateDir) Exit() string { return d.join(exitName) }

// RunscLog is runsc's --log.
func (d StateDir) RunscLog() string { return d.join(runscLogName) }

// RunscPanicLog is runsc's --panic-log.
func (d StateDir) RunscPanicLog() string { return d.join(runscPanicLogName) }

// ResolvConf is the sandbox's /etc/resolv.conf.
func (d StateDir) ResolvConf() string { return d.join(resolvConfName) }

// Hosts is the sandbox's /etc/hosts.
func (d StateDir) Hosts() string { return d.join(hostsName) }

// Network is the sandbox's NetworkRecord.
func (d StateDir) Network() string { return d.join(networkName) }

// Disk is the task's DiskRecord.
func (d StateDir) Disk() string { return d.join(diskName) }

// DiskMount is where the task's disk image is mounted.
func (d StateDir) DiskMount() string { return d.join(diskMountName) }

// AllocDisk records that the task holds its allocation's disk (see
// JoinAllocDisk).
func (d StateDir) AllocDisk() string { return d.join(allocDiskName) }

// NoSuid lists the task's directories bound nosuid (see CoverTaskDirs).
func (d StateDir) NoSuid() string { return d.join(noSuidName) }

// Pins holds the task's pinned host paths (see PinPaths).
func (d StateDir) Pins() string { return d.join(pinsName) }

// TraceSock is the trail's socket.
func (d StateDir) TraceSock() string { return d.join(traceSockName) }

// TraceConfig is the trail's --pod-init-config.
func (d StateDir) TraceConfig() string { return d.join(traceConfigName) }

// ExecProcessPattern is the os.CreateTemp pattern of an exec's process file
// in the directory.
func (d StateDir) ExecProcessPattern() string { return execProcessPattern }

// ExecProcesses are the exec process files present.
func (d StateDir) ExecProcesses() []string {
	files, _ := filepath.Glob(d.join(execProcessPattern))
	return files
}
