package trace

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/audit"
)

// Config is a task's trail as the supervisor gets it.
type Config struct {
	// Log is the JSON-lines file the trail is appended to.
	Log    string   `json:"log"`
	Points []string `json:"points"`
	// Rate (lines per second, sustained), Burst and MaxRecords bound what
	// one sandbox can write; what is over is counted and reported.
	Rate       float64  `json:"rate"`
	Burst      int      `json:"burst"`
	MaxRecords uint64   `json:"max_records"`
	Identity   Identity `json:"identity"`
}

// Summary sizes: the exited record keeps this many distinct executables and
// destinations.
const summaryDistinct = 5

// bufSize is the largest message kept; gVisor caps an execve's argv at
// 32 KiB and the rest of a message is small.
const bufSize = 256 << 10

// maxPendingConnects bounds the connects remembered between their enter and
// exit points (one per thread at most).
const maxPendingConnects = 1024

// maxSockets bounds the descriptors whose protocol is remembered.
const maxSockets = 4096

// Receiver takes one sandbox's points and writes its trail.
type Receiver struct {
	cfg     Config
	sock    string // the socket's path
	config  string // the pod init config's path
	dirFD   int    // the socket's directory
	ln      *net.UnixListener
	done    chan struct{}
	mu      sync.Mutex
	conn    *net.UnixConn
	closing bool

	// Owned by serve until done closes.
	seq         uint64
	tokens      float64
	last        time.Time
	counts      map[string]uint64
	written     uint64
	dropped     map[string]uint64
	reported    map[string]uint64 // dropped as of the last "dropped" line
	sandboxDrop uint32
	execs       []string
	dests       []string
	pending     map[int32]*Record // connects entered, keyed by thread
	sockets     map[[2]int32]string
	err         error
}

// Listen makes the receiver's socket at sock and runsc's pod init config at
// config (both in the task's state directory, which only root can enter)
// and waits for the sandbox in the background. The caller starts runsc with
// --pod-init-config ConfigPath() and calls Close once the sandbox has exited.
func Listen(sock, config string, cfg Config) (*Receiver, error) {
	if err := ValidatePoints(cfg.Points); err != nil {
		return nil, err
	}
	// The socket path must fit sun_path (108 bytes), and the state
	// directory can be deeper: runsc reaches it through this process's
	// descriptor of the directory, /proc/PID/fd/N/trace.sock.
	dir := filepath.Dir(sock)
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("trace: open %s: %w", dir, err)
	}
	r := newReceiver(cfg)
	r.sock, r.config, r.dirFD = sock, config, fd
	_ = os.Remove(sock)
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: r.endpoint(), Net: "unixpacket"})
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("trace: listen: %w", err)
	}
	ln.SetUnlinkOnClose(false)
	r.ln = ln
	if err := os.Chmod(sock, 0o600); err != nil {
		r.closeListener()
		return nil, fmt.Errorf("trace: %w", err)
	}
	pic, err := PodInitConfig(r.endpoint(), cfg.Points)
	if err == nil {
		err = os.WriteFile(r.ConfigPath(), pic, 0o600)
	}
	if err != nil {
		r.closeListener()
		return nil, fmt.Errorf("trace: write pod init config: %w", err)
	}
	go r.serve()
	return r, nil
}

// newReceiver is a receiver's state before it listens.
func newReceiver(cfg Config) *Receiver {
	return &Receiver{
		cfg: cfg, done: make(chan struct{}),
		tokens: float64(cfg.Burst), counts: map[string]uint64{}, dropped: map[string]uint64{},
		reported: map[string]uint64{}, pending: map[int32]*Record{}, sockets: map[[2]int32]string{},
	}
}

// ConfigPath is the file to pass to runsc's --pod-init-config.
func (r *Receiver) ConfigPath() string { return r.config }

func (r *Receiver) endpoint() string {
	return fmt.Sprintf("/proc/%d/fd/%d/%s", os.Getpid(), r.dirFD, filepath.Base(r.sock))
}

func (r *Receiver) closeListener() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ln == nil {
		return
	}
	r.ln.Close()
	r.ln = nil
	_ = os.Remove(r.sock)
	unix.Close(r.dirFD)
}

// serve accepts the sandbox's one connection (runsc connects while it
// creates the sandbox and hands the socket to it), then reads points until
// the sandbox closes it.
func (r *Receiver) serve() {
	defer close(r.done)
	conn, err := r.accept()
	if err != nil {
		r.mu.Lock()
		closing := r.closing
		r.mu.Unlock()
		if !closing {
			r.err = err
		}
		return
	}
	defer conn.Close()
	if err := handshake(conn); err != nil {
		r.err = err
		return
	}
	buf := make([]byte, bufSize)
	for {
		n, err := conn.Read(buf)
		if err != nil || n == 0 {
			return
		}
		if n == len(buf) {
			r.dropped["oversize"]++
			continue
		}
		r.handle(buf[:n])
	}
}

// accept takes the first connection from root: runsc runs as root, and the
// socket is reachable by root only; anything else is closed. The listener
// goes at once, so nothing can join the trail later.
func (r *Receiver) accept() (*net.UnixConn, error) {
	r.mu.Lock()
	ln := r.ln
	r.mu.Unlock()
	if ln == nil {
		return nil, errors.New("trace: receiver closed before the sandbox connected")
	}
	for {
		conn, err := ln.AcceptUnix()
		if err != nil {
			return nil, fmt.Errorf("trace: the sandbox never connected: %w", err)
		}
		if uid, err := peerUID(conn); err != nil || uid != 0 {
			conn.Close()
			continue
		}
		r.closeListener()
		r.mu.Lock()
		defer r.mu.Unlock()
		if r.closing {
			conn.Close()
			return nil, errors.New("trace: receiver closed")
		}
		r.conn = conn
		return conn, nil
	}
}

func peerUID(conn *net.UnixConn) (uint32, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		return 0, err
	}
	if cerr != nil {
		return 0, cerr
	}
	return cred.Uid, nil
}

// handshake answers runsc's Handshake message (field 1: version) with
// version 1, the only wire version there is.
func handshake(conn *net.UnixConn) error {
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	defer conn.SetDeadline(time.Time{})
	buf := make([]byte, 10240)
	n, err := conn.Read(buf)
	if err != nil {
		return fmt.Errorf("trace: handshake: %w", err)
	}
	var version uint64
	if err := fields(buf[:n], func(num protowire.Number, v uint64, _ []byte) {
		if num == 1 {
			version = v
		}
	}); err != nil || version < 1 {
		return fmt.Errorf("trace: handshake: sandbox speaks version %d (%v), this receiver 1", version, err)
	}
	if _, err := conn.Write([]byte{0x08, 0x01}); err != nil {
		return fmt.Errorf("trace: handshake: %w", err)
	}
	return nil
}

// Close waits up to wait for the sandbox to close its end (it has exited,
// so that is at once unless a child of it still holds the socket), stops
// the receiver, writes what remains (connects that never returned, the
// final drop counts) and returns the summary for the exited record.
func (r *Receiver) Close(wait time.Duration) *audit.Trail {
	r.mu.Lock()
	r.closing = true
	r.mu.Unlock()
	r.closeListener()
	select {
	case <-r.done:
	case <-time.After(wait):
		r.mu.Lock()
		if r.conn != nil {
			r.conn.Close()
		}
		r.mu.Unlock()
		<-r.done
	}
	_ = os.Remove(r.ConfigPath())
	tids := make([]int32, 0, len(r.pending))
	for tid := range r.pending {
		tids = append(tids, tid)
	}
	slices.Sort(tids)
	for _, tid := range tids {
		rec := r.pending[tid]
		rec.Result = "no_return"
		r.emit(rec, PointConnect)
	}
	r.reportDropped()
	t := &audit.Trail{
		Log: r.cfg.Log, Counts: r.counts, Written: r.written, Executables: r.execs, Destinations: r.dests,
	}
	if len(r.dropped) > 0 {
		t.Dropped = r.dropped
	}
	if r.err != nil {
		t.Error = r.err.Error()
	}
	return t
}

func (r *Receiver) handle(msg []byte) {
	h, payload, err := parseHeader(msg)
	if err != nil {
		r.dropped["malformed"]++
		return
	}
	// The sandbox counts, wrapping, what it could not send (the socket
	// was full): add what is new since the last message. A count that
	// goes back (more than half the range) is not believed, only taken
	// as the new base.
	if d := h.dropped - r.sandboxDrop; d > 0 && d < 1<<31 {
		r.dropped["sandbox"] += uint64(d)
	}
	r.sandboxDrop = h.dropped
	ev, err := decode(h.msgType, payload)
	if err != nil {
		r.dropped["malformed"]++
		return
	}
	rec := &Record{}
	rec.setContext(ev.ctx)
	switch ev.msgType {
	case msgExec:
		rec.Path, rec.Argv, rec.SHA256 = ev.path, ev.argv, hexString(ev.sha256)
		rec.ArgvDropped = ev.argc - len(ev.argv)
		if len(r.execs) < summaryDistinct && !slices.Contains(r.execs, ev.path) {
			r.execs = append(r.execs, ev.path)
		}
		r.emit(rec, PointExec)
	case msgTaskExit:
		// A thread that exits inside connect (killed while the egress
		// filter drops its packets, say) never returns from it.
		if p, ok := r.pending[ev.ctx.tid]; ok {
			delete(r.pending, ev.ctx.tid)
			p.Result = "no_return"
			r.emit(p, PointConnect)
		}
		// Every thread's exit is a point; a process ends with its leader.
		if ev.ctx.tid != ev.ctx.pid {
			return
		}
		if ws := unix.WaitStatus(ev.status); ws.Signaled() {
			rec.Signal = int(ws.Signal())
		} else {
			code := ws.ExitStatus()
			rec.ExitCode = &code
		}
		r.emit(rec, PointExit)
	case msgSocket:
		if ev.hasExit && ev.errno == 0 {
			if len(r.sockets) >= maxSockets {
				clear(r.sockets)
			}
			r.sockets[[2]int32{ev.ctx.pid, int32(ev.result)}] = protocolOf(ev.domain, ev.sockType, ev.protocol)
		}
	case msgConnect:
		r.connect(ev, rec)
	case msgBind:
		rec.setSockaddr(ev.address)
		rec.Protocol = r.sockets[[2]int32{ev.ctx.pid, int32(ev.fd)}]
		rec.Result = resultOf(ev)
		r.emit(rec, PointBind)
	case msgOpen:
		if !isWriteOpen(ev.flags) {
			return
		}
		rec.Path, rec.Flags, rec.Result = openPath(ev), flagString(ev.flags), resultOf(ev)
		r.emit(rec, PointOpenWrite)
	}
}

// connect pairs a connect's enter point with its exit (same thread), so
// that one line says where it went and what the task got back; a connect
// that never returns is written at Close.
func (r *Receiver) connect(ev *event, rec *Record) {
	tid := ev.ctx.tid
	if !ev.hasExit {
		rec.setSockaddr(ev.address)
		rec.Protocol = r.sockets[[2]int32{ev.ctx.pid, int32(ev.fd)}]
		if len(r.pending) >= maxPendingConnects {
			rec.Result = "unknown"
			r.emit(rec, PointConnect)
			return
		}
		r.pending[tid] = rec
		return
	}
	if p, ok := r.pending[tid]; ok {
		delete(r.pending, tid)
		rec.Time = p.Time
	}
	rec.setSockaddr(ev.address)
	rec.Protocol = r.sockets[[2]int32{ev.ctx.pid, int32(ev.fd)}]
	rec.Result = resultOf(ev)
	r.emit(rec, PointConnect)
}

// emit counts a point and writes it if the bounds allow.
func (r *Receiver) emit(rec *Record, point string) {
	r.counts[point]++
	if point == PointConnect && rec.Address != "" {
		if d := rec.destination(); len(r.dests) < summaryDistinct && !slices.Contains(r.dests, d) {
			r.dests = append(r.dests, d)
		}
	}
	if r.cfg.MaxRecords > 0 && r.written >= r.cfg.MaxRecords {
		r.dropped["total"]++
		return
	}
	if !r.allow(time.Now()) {
		r.dropped["rate"]++
		return
	}
	r.reportDropped()
	rec.Point = point
	r.write(rec)
}

// allow is a token bucket: Burst lines at once, Rate a second after that.
func (r *Receiver) allow(now time.Time) bool {
	if r.cfg.Rate <= 0 {
		return true
	}
	if !r.last.IsZero() {
		r.tokens = min(float64(r.cfg.Burst), r.tokens+now.Sub(r.last).Seconds()*r.cfg.Rate)
	}
	r.last = now
	if r.tokens < 1 {
		return false
	}
	r.tokens--
	return true
}

// reportDropped writes a "dropped" line with the counts so far when they
// changed since the last one: before the next line that gets through, and
// once at the end, past every bound, so the count is never lost.
func (r *Receiver) reportDropped() {
	changed := false
	for k, v := range r.dropped {
		if r.reported[k] != v {
			changed = true
		}
	}
	if !changed {
		return
	}
	snap := make(map[string]uint64, len(r.dropped))
	for k, v := range r.dropped {
		snap[k] = v
		r.reported[k] = v
	}
	r.write(&Record{Point: "dropped", Dropped: snap})
}

// write appends one line with a single write on an O_APPEND descriptor (so
// that the lines of concurrent sandboxes never interleave), opening the file
// each time so that it can be rotated.
func (r *Receiver) write(rec *Record) {
	r.seq++
	rec.Seq = r.seq
	rec.Identity = r.cfg.Identity
	if rec.Time.IsZero() {
		rec.Time = time.Now().UTC()
	}
	b, err := json.Marshal(rec)
	if err != nil {
		r.err = fmt.Errorf("trace: encode: %w", err)
		return
	}
	b = append(b, '\n')
	// Non-blocking, and a regular file only: a FIFO left at the path (by
	// a local user who can write to its directory) would otherwise hold
	// the open, the receiver, and with it the supervisor's Close and the
	// task's exit status, for as long as nobody reads it.
	f, err := os.OpenFile(r.cfg.Log, os.O_WRONLY|os.O_APPEND|os.O_CREATE|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0o600)
	if err == nil {
		var fi os.FileInfo
		if fi, err = f.Stat(); err == nil && !fi.Mode().IsRegular() {
			err = fmt.Errorf("not a regular file (%s)", fi.Mode().Type())
		}
		if err == nil {
			_, err = f.Write(b)
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err != nil {
		if r.err == nil {
			r.err = fmt.Errorf("trace log %s: %w", r.cfg.Log, err)
		}
		return
	}
	r.written++
}
