package trace

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"path"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/audit"
)

// Identity is the task a trail belongs to; every line carries it.
type Identity struct {
	Namespace string `json:"namespace"`
	Job       string `json:"job"`
	ParentJob string `json:"parent_job,omitempty"`
	TaskGroup string `json:"task_group,omitempty"`
	Task      string `json:"task"`
	AllocID   string `json:"alloc_id"`
	Node      string `json:"node"`
	NodeID    string `json:"node_id,omitempty"`
	SandboxID string `json:"sandbox_id"`
}

// IdentityOf takes a task's identity from its audit record.
func IdentityOf(r *audit.Record) Identity {
	return Identity{
		Namespace: r.Namespace, Job: r.Job, ParentJob: r.ParentJob, TaskGroup: r.TaskGroup,
		Task: r.Task, AllocID: r.AllocID, Node: r.Node, NodeID: r.NodeID, SandboxID: r.SandboxID,
	}
}

// Record is one line of the trail.
type Record struct {
	Time time.Time `json:"time"`
	// Seq numbers a sandbox's lines from 1 without gaps: a missing number
	// is a lost line, and what the receiver dropped is in "dropped" lines.
	Seq   uint64 `json:"seq"`
	Point string `json:"point"`
	Identity

	// The process, as the sandbox's kernel knows it (pids are the
	// sandbox's own).
	PID     int32   `json:"pid,omitempty"`
	PPID    int32   `json:"ppid,omitempty"`
	TID     int32   `json:"tid,omitempty"`
	UID     *uint32 `json:"uid,omitempty"`
	GID     *uint32 `json:"gid,omitempty"`
	Cwd     string  `json:"cwd,omitempty"`
	Process string  `json:"process,omitempty"`

	// exec
	Path string   `json:"path,omitempty"`
	Argv []string `json:"argv,omitempty"`
	// ArgvDropped counts the arguments beyond the first 32 that were not
	// kept.
	ArgvDropped int    `json:"argv_dropped,omitempty"`
	SHA256      string `json:"sha256,omitempty"`

	// connect, bind
	Family   string `json:"family,omitempty"`
	Protocol string `json:"protocol,omitempty"`
	Address  string `json:"address,omitempty"`
	Port     *int   `json:"port,omitempty"`

	// open_write
	Flags string `json:"flags,omitempty"`

	// Result is what the call returned to the task: "ok", the errno's
	// name ("ECONNREFUSED", "ETIMEDOUT", ...), "interrupted" (a signal
	// came first), or "no_return" for a connect whose thread or sandbox
	// ended before it returned.
	Result string `json:"result,omitempty"`

	// exit
	ExitCode *int `json:"exit_code,omitempty"`
	Signal   int  `json:"signal,omitempty"`

	// dropped: counts so far, by reason ("rate", "total", "sandbox").
	Dropped map[string]uint64 `json:"dropped,omitempty"`
}

func (r *Record) setContext(c procContext) {
	if c.timeNs != 0 {
		r.Time = time.Unix(0, c.timeNs).UTC()
	}
	uid, gid := c.uid, c.gid
	r.PID, r.PPID, r.TID, r.UID, r.GID, r.Cwd, r.Process = c.pid, c.ppid, c.tid, &uid, &gid, c.cwd, c.process
}

func resultOf(ev *event) string {
	switch {
	case !ev.hasExit:
		return ""
	case ev.errno == 0:
		return "ok"
	case ev.errno >= 512 && ev.errno <= 516:
		// ERESTARTSYS and kin, the kernel's own: a signal came before
		// the call completed (a connect that hung until its program was
		// killed or timed out).
		return "interrupted"
	}
	if name := unix.ErrnoName(unix.Errno(ev.errno)); name != "" {
		return name
	}
	return fmt.Sprintf("errno %d", ev.errno)
}

// setSockaddr fills the destination from a struct sockaddr as the task
// passed it.
func (r *Record) setSockaddr(b []byte) {
	if len(b) < 2 {
		return
	}
	port := func() *int { p := int(binary.BigEndian.Uint16(b[2:4])); return &p }
	switch fam := binary.NativeEndian.Uint16(b); fam {
	case unix.AF_INET:
		r.Family = "inet"
		if len(b) >= 8 {
			r.Address, r.Port = netip.AddrFrom4([4]byte(b[4:8])).String(), port()
		}
	case unix.AF_INET6:
		r.Family = "inet6"
		if len(b) >= 24 {
			r.Address, r.Port = netip.AddrFrom16([16]byte(b[8:24])).String(), port()
		}
	case unix.AF_UNIX:
		r.Family = "unix"
		p := b[2:]
		if len(p) > 0 && p[0] == 0 {
			r.Address = "@" + strings.TrimRight(string(p[1:]), "\x00")
		} else {
			r.Address, _, _ = strings.Cut(string(p), "\x00")
		}
		r.Address = capString([]byte(r.Address), maxPath)
	default:
		r.Family = fmt.Sprintf("family %d", fam)
	}
}

// destination is how the exited record names where a connect went.
func (r *Record) destination() string {
	d := r.Address
	if r.Port != nil {
		d = net.JoinHostPort(r.Address, strconv.Itoa(*r.Port))
	}
	if r.Protocol != "" {
		d += "/" + r.Protocol
	}
	return d
}

func protocolOf(domain, typ, proto int32) string {
	inet := domain == unix.AF_INET || domain == unix.AF_INET6
	switch typ & 0xf {
	case unix.SOCK_STREAM:
		if inet {
			return "tcp"
		}
		return "stream"
	case unix.SOCK_DGRAM:
		switch {
		case inet && (proto == unix.IPPROTO_ICMP || proto == unix.IPPROTO_ICMPV6):
			return "icmp"
		case inet:
			return "udp"
		}
		return "dgram"
	case unix.SOCK_RAW:
		return "raw"
	case unix.SOCK_SEQPACKET:
		return "seqpacket"
	}
	return ""
}

func isWriteOpen(flags uint32) bool {
	return flags&unix.O_ACCMODE != unix.O_RDONLY || flags&(unix.O_CREAT|unix.O_TRUNC) != 0
}

func flagString(flags uint32) string {
	var parts []string
	switch flags & unix.O_ACCMODE {
	case unix.O_WRONLY:
		parts = append(parts, "O_WRONLY")
	case unix.O_RDWR:
		parts = append(parts, "O_RDWR")
	default:
		parts = append(parts, "O_RDONLY")
	}
	for _, f := range []struct {
		bit  uint32
		name string
	}{{unix.O_CREAT, "O_CREAT"}, {unix.O_TRUNC, "O_TRUNC"}, {unix.O_APPEND, "O_APPEND"}, {unix.O_EXCL, "O_EXCL"}} {
		if flags&f.bit != 0 {
			parts = append(parts, f.name)
		}
	}
	return strings.Join(parts, "|")
}

// openPath is the opened path as absolute as the point lets it be: a
// relative name is joined to the directory descriptor's path (openat) or
// the working directory.
func openPath(ev *event) string {
	p := ev.pathname
	if p == "" || path.IsAbs(p) {
		return p
	}
	dir := ev.ctx.cwd
	if ev.fdPath != "" && int32(ev.fd) != unix.AT_FDCWD {
		dir = ev.fdPath
	}
	if dir == "" {
		return p
	}
	return path.Join(dir, p)
}

func hexString(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	return hex.EncodeToString(b)
}

// maxLine bounds one line of the trail, whatever the sandbox sends: every
// string from it is cut before it is kept, counted as JSON writes it.
const maxLine = 16 << 10
