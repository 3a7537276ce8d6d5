// Package audit writes the sandbox audit log: one JSON line per event of a
// sandbox's life, with enough detail for an incident responder to tell what
// ran, under which policy, and how it ended.
package audit

import (
	"encoding/json"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Events in the audit log.
const (
	EventRefused     = "sandbox_refused"
	EventStartFailed = "sandbox_start_failed"
	EventStarted     = "sandbox_started"
	EventExited      = "sandbox_exited"
)

// Record is one line of the audit log. Every record carries the task's
// identity, so each line stands on its own.
type Record struct {
	Time  time.Time `json:"time"`
	Event string    `json:"event"`

	Namespace string `json:"namespace"`
	Job       string `json:"job"`
	ParentJob string `json:"parent_job,omitempty"`
	AllocID   string `json:"alloc_id"`
	TaskGroup string `json:"task_group,omitempty"`
	Task      string `json:"task"`
	TaskID    string `json:"task_id"`
	Node      string `json:"node"`
	NodeID    string `json:"node_id"`

	SandboxID    string `json:"sandbox_id,omitempty"`
	RunscVersion string `json:"runsc_version,omitempty"`
	Platform     string `json:"platform,omitempty"`

	Image       string   `json:"image,omitempty"`
	ImageDigest string   `json:"image_digest,omitempty"`
	Rootfs      string   `json:"rootfs,omitempty"`
	Command     []string `json:"command,omitempty"`
	User        string   `json:"user,omitempty"`

	Policy *Policy `json:"policy,omitempty"`

	StartedAt   *time.Time `json:"started_at,omitempty"`
	CompletedAt *time.Time `json:"completed_at,omitempty"`
	ExitCode    *int       `json:"exit_code,omitempty"`
	Signal      int        `json:"signal,omitempty"`
	OOMKilled   bool       `json:"oom_killed,omitempty"`
	TimedOut    bool       `json:"time_limit_exceeded,omitempty"`
	// DiskLimitReached says which disk limit (disk_limit, disk_inodes)
	// the task's local/ had reached when it ended.
	DiskLimitReached string `json:"disk_limit_reached,omitempty"`
	Error            string `json:"error,omitempty"`

	// Network observations; filled once the sandbox has a network.
	EgressDenials map[string]uint64 `json:"egress_denials,omitempty"`
	RefusedDNS    map[string]int    `json:"refused_dns,omitempty"`

	// Trail sums up the task's trail (trace_log), when it had one.
	Trail *Trail `json:"trail,omitempty"`
}

// Trail is the shape of a run as its trail saw it, for the exited record:
// how many of each point were seen, what was dropped, and the first few
// distinct programs and destinations.
type Trail struct {
	Log          string            `json:"log"`
	Counts       map[string]uint64 `json:"counts"`
	Written      uint64            `json:"written"`
	Dropped      map[string]uint64 `json:"dropped,omitempty"`
	Executables  []string          `json:"executables,omitempty"`
	Destinations []string          `json:"destinations,omitempty"`
	Error        string            `json:"error,omitempty"`
}

// Policy is the effective policy a sandbox ran under.
type Policy struct {
	Capabilities   []string `json:"capabilities"`
	ReadonlyRootfs bool     `json:"readonly_rootfs"`
	Mounts         []Mount  `json:"mounts"`
	Tmpfs          []string `json:"tmpfs,omitempty"`
	MemoryBytes    int64    `json:"memory_bytes,omitempty"`
	CPUShares      uint64   `json:"cpu_shares,omitempty"`
	Cpuset         string   `json:"cpuset,omitempty"`
	PidsLimit      int64    `json:"pids_limit,omitempty"`
	DiskLimit      int64    `json:"disk_limit_bytes,omitempty"`
	DiskInodes     int64    `json:"disk_inodes,omitempty"`
	Timeout        string   `json:"timeout,omitempty"`
	Network        string   `json:"network"`
	Egress         []string `json:"egress,omitempty"`
}

// Mount is one bind mount into the sandbox.
type Mount struct {
	Source      string `json:"source"`
	Destination string `json:"destination"`
	Readonly    bool   `json:"readonly"`
}

// Log appends records to a file. It opens the file for each record, so an
// operator can rotate it at any time (move it away, or SIGHUP after a copy)
// and the next record lands in a new file; it holds no state and is safe
// for concurrent use by any number of processes.
type Log struct {
	Path string
}

// Write appends r as one line. The line goes out in a single write on an
// O_APPEND descriptor, so lines from concurrent writers never interleave.
// With sync, the record is on disk when Write returns.
func (l *Log) Write(r *Record, sync bool) error {
	if l == nil || l.Path == "" {
		return nil
	}
	if r.Time.IsZero() {
		r.Time = time.Now().UTC()
	}
	b, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("audit log: encode: %w", err)
	}
	b = append(b, '\n')
	// Never through a link, never blocking, a regular file only: a link or
	// a FIFO left at the path (by a local user who can write to its
	// directory) would otherwise have root append elsewhere, or hold the
	// supervisor (and with it the task's exit status) for as long as
	// nobody reads the FIFO.
	f, err := os.OpenFile(l.Path, os.O_WRONLY|os.O_APPEND|os.O_CREATE|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("audit log %s: %w", l.Path, err)
	}
	var n int
	fi, err := f.Stat()
	if err == nil && !fi.Mode().IsRegular() {
		err = fmt.Errorf("not a regular file (%s)", fi.Mode().Type())
	}
	if err == nil {
		n, err = f.Write(b)
	}
	if err == nil && n != len(b) {
		err = fmt.Errorf("short write (%d of %d bytes)", n, len(b))
	}
	if err == nil && sync {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("audit log %s: %w", l.Path, err)
	}
	return nil
}
