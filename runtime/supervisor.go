package runtime

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/audit"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/atomicfile"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/safeopen"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/trace"
)

// SupervisorArg is the first argument that turns the plugin binary into a
// task supervisor. The supervisor is the sandbox's parent: runsc keeps no
// exit status, so whoever outlives the plugin must wait for the sandbox and
// store its status on disk.
const SupervisorArg = "supervise"

// SupervisorSpec is what the plugin hands the supervisor.
type SupervisorSpec struct {
	ID     string  `json:"id"`
	Runsc  Runsc   `json:"runsc"`
	Run    RunOpts `json:"run"`
	Stdout string  `json:"stdout"`
	Stderr string  `json:"stderr"`
	// LogRoot is the allocation directory that holds Stdout and Stderr:
	// they are resolved beneath it without following links (see openLog).
	LogRoot string `json:"log_root,omitempty"`
	// Cgroup, when set, was created by the driver; the supervisor reads
	// its OOM record after the sandbox exits and then removes it.
	Cgroup *Cgroup `json:"cgroup,omitempty"`
	// Timeout, when set, is the task's wall-clock limit, counted from the
	// moment the sandbox runs. When it passes, the task gets SIGTERM and,
	// KillGrace later, SIGKILL.
	Timeout   time.Duration `json:"timeout,omitempty"`
	KillGrace time.Duration `json:"kill_grace,omitempty"`
	// AuditLog, when set, gets Audit completed with the task's end, written
	// by the supervisor the moment it sees it (the plugin may be down).
	AuditLog string        `json:"audit_log,omitempty"`
	Audit    *audit.Record `json:"audit,omitempty"`
	// Trace, when set, is the task's trail (trace_log): the supervisor
	// receives gVisor's points and writes them, so the trail outlives the
	// plugin; its summary goes into the exited audit record.
	Trace *trace.Config `json:"trace,omitempty"`
}

// ExitStatus is the task's end as the supervisor saw it.
type ExitStatus struct {
	ExitCode  int    `json:"exit_code"`
	Signal    int    `json:"signal"`
	OOMKilled bool   `json:"oom_killed"`
	TimedOut  bool   `json:"timed_out,omitempty"`
	Err       string `json:"error,omitempty"`
	// AuditErr says why the exit could not be recorded in the audit log.
	AuditErr string `json:"audit_error,omitempty"`
	// LogErr says why the task's output was dropped (a log path that is
	// not a FIFO).
	LogErr string `json:"log_error,omitempty"`
	// DiskFull says which disk limit the task's local/ had reached when
	// it ended (see DiskFull).
	DiskFull    string    `json:"disk_full,omitempty"`
	StartedAt   time.Time `json:"started_at"`
	CompletedAt time.Time `json:"completed_at"`
}

// ErrSupervisorLost is Wait's error when the supervisor ended without
// storing an exit status (it was killed): the task's exit code is lost.
var ErrSupervisorLost = errors.New("the task's supervisor was killed before the task ended, so its exit code is lost")

// Supervisor is the plugin's view of one task's supervisor process.
type Supervisor struct {
	// Dir is the task's state directory.
	Dir string
	// Exe is the binary to run as supervisor (the plugin's own).
	Exe string
}

// Start writes spec and launches a detached supervisor, returning once the
// sandbox runs or with the reason it could not start. The supervisor is in its
// own session so it survives the plugin and the Nomad agent.
func (s *Supervisor) Start(ctx context.Context, spec *SupervisorSpec) error {
	if err := atomicfile.WriteJSON(StateDir(s.Dir).SupervisorSpec(), spec, 0o600); err != nil {
		return err
	}
	rd, wr, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("start supervisor: %w", err)
	}
	defer rd.Close()
	logf, err := os.OpenFile(StateDir(s.Dir).SupervisorLog(), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		wr.Close()
		return fmt.Errorf("start supervisor: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(s.Exe, SupervisorArg, s.Dir)
	cmd.Env = runscEnv()
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.ExtraFiles = []*os.File{wr} // fd 3: the ready pipe
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.Dir = "/"
	if err := cmd.Start(); err != nil {
		wr.Close()
		return fmt.Errorf("start supervisor: %w", err)
	}
	wr.Close()
	// The supervisor is not our child to wait for in the long run; release
	// it, and reap it in the background if it ends while we are alive.
	go cmd.Wait()

	type result struct {
		line string
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		line, err := bufio.NewReader(rd).ReadString('\n')
		ch <- result{strings.TrimSpace(line), err}
	}()
	select {
	case <-ctx.Done():
		_ = cmd.Process.Kill()
		return fmt.Errorf("start supervisor: %w", ctx.Err())
	case r := <-ch:
		switch {
		case r.line == "ok":
			return nil
		case strings.HasPrefix(r.line, "error: "):
			return errors.New(strings.TrimPrefix(r.line, "error: "))
		default:
			return fmt.Errorf("supervisor ended before the sandbox started (see %s)", StateDir(s.Dir).SupervisorLog())
		}
	}
}

// Wait blocks until the task ends and returns its exit status. It works
// whether or not this process started the supervisor: the supervisor's socket
// closes when it is done, and the status is then on disk.
func (s *Supervisor) Wait(ctx context.Context) (*ExitStatus, error) {
	for {
		if err := s.waitClose(ctx); err != nil {
			return nil, err
		}
		st, err := s.ExitStatus()
		if err != nil {
			return nil, err
		}
		if st != nil {
			return st, nil
		}
		if !s.Alive() {
			return nil, ErrSupervisorLost
		}
		// The connection dropped while the supervisor still runs: it is
		// writing the status now, or the connection was lost. Wait again.
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// waitClose returns when the supervisor closes its side of a connection,
// or at once if it no longer listens.
func (s *Supervisor) waitClose(ctx context.Context) error {
	var d net.Dialer
	path, release, err := shortPath(StateDir(s.Dir).SupervisorSock())
	if err != nil {
		return err
	}
	conn, err := d.DialContext(ctx, "unix", path)
	release()
	if err != nil {
		return nil
	}
	defer conn.Close()
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-ctx.Done():
			conn.Close()
		case <-done:
		}
	}()
	_, _ = io.Copy(io.Discard, conn)
	return ctx.Err()
}

// Spec returns the spec the supervisor was started with.
func (s *Supervisor) Spec() (*SupervisorSpec, error) {
	var spec SupervisorSpec
	if err := atomicfile.ReadJSON(StateDir(s.Dir).SupervisorSpec(), &spec); err != nil {
		return nil, fmt.Errorf("supervisor spec: %w", err)
	}
	return &spec, nil
}

// ExitStatus returns the stored exit status, or nil while the task runs.
func (s *Supervisor) ExitStatus() (*ExitStatus, error) {
	var st ExitStatus
	err := atomicfile.ReadJSON(StateDir(s.Dir).Exit(), &st)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("exit status: %w", err)
	}
	return &st, nil
}

// Alive reports whether the supervisor process still runs.
func (s *Supervisor) Alive() bool {
	b, err := os.ReadFile(StateDir(s.Dir).SupervisorPid())
	if err != nil {
		return false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return false
	}
	// The pid might have been reused; the command line tells.
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	return strings.Contains(string(cmdline), s.Dir)
}

// Kill ends the supervisor (used only when cleaning up after a crash).
func (s *Supervisor) Kill() {
	if !s.Alive() {
		return
	}
	b, _ := os.ReadFile(StateDir(s.Dir).SupervisorPid())
	if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 {
		_ = unix.Kill(pid, unix.SIGKILL)
	}
}

// SupervisorMain is the supervisor process. It returns the process exit code.
func SupervisorMain(args []string) int {
	if len(args) != 1 {
		fmt.Fprintln(os.Stderr, "usage: supervise STATE_DIR")
		return 2
	}
	ready := os.NewFile(3, "ready")
	err := supervise(args[0], ready)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s supervisor: %v\n", time.Now().UTC().Format(time.RFC3339), err)
		return 1
	}
	return 0
}

func supervise(dir string, ready *os.File) (err error) {
	signalReady := func(msg string) {
		if ready != nil {
			_, _ = ready.WriteString(strings.ReplaceAll(msg, "\n", " ") + "\n")
			ready.Close()
			ready = nil
		}
	}
	defer func() {
		if err != nil {
			signalReady("error: " + err.Error())
		}
	}()

	var spec SupervisorSpec
	if err := atomicfile.ReadJSON(StateDir(dir).SupervisorSpec(), &spec); err != nil {
		return fmt.Errorf("spec: %w", err)
	}
	if err := os.WriteFile(StateDir(dir).SupervisorPid(), []byte(strconv.Itoa(os.Getpid())), 0o600); err != nil {
		return fmt.Errorf("write pid: %w", err)
	}
	// The sandbox is forked by `runsc create`, which then exits; as a
	// subreaper we inherit it and can wait for its exit status.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("become subreaper: %w", err)
	}
	// A plugin that died mid-write must not stop us, nor a closed log FIFO.
	signalIgnore()

	_ = os.Remove(StateDir(dir).SupervisorSock())
	sockPath, release, err := shortPath(StateDir(dir).SupervisorSock())
	if err != nil {
		return err
	}
	ln, err := net.Listen("unix", sockPath)
	release()
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	defer ln.Close()
	go acceptAndHold(ln)

	// The trail's receiver listens before runsc starts: runsc connects to
	// it while it creates the sandbox. A task whose trail cannot be kept
	// does not start.
	var trail *trace.Receiver
	stopTrail := func() *audit.Trail {
		if trail == nil {
			return nil
		}
		t := trail.Close(5 * time.Second)
		trail = nil
		return t
	}
	defer stopTrail()
	if spec.Trace != nil {
		if trail, err = trace.Listen(StateDir(dir).TraceSock(), StateDir(dir).TraceConfig(), *spec.Trace); err != nil {
			return fmt.Errorf("%w: the sandbox was not started without its trail", err)
		}
		spec.Run.PodInitConfig = trail.ConfigPath()
	}

	outR, outW, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("stdout pipe: %w", err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("stderr pipe: %w", err)
	}
	outDone := relay(outR, spec.LogRoot, spec.Stdout)
	errDone := relay(errR, spec.LogRoot, spec.Stderr)

	runsc := spec.Runsc
	started := time.Now().UTC()
	// No unaudited run: the start is on record before the task's first
	// instruction, or the task does not start.
	if spec.AuditLog != "" && spec.Audit != nil {
		r := *spec.Audit
		r.Event, r.StartedAt = audit.EventStarted, &started
		if err := (&audit.Log{Path: spec.AuditLog}).Write(&r, true); err != nil {
			outW.Close()
			errW.Close()
			waitRelays(outDone, errDone)
			return fmt.Errorf("%w: the sandbox was not started because its start could not be recorded", err)
		}
	}
	pid, err := runDetached(dir, &runsc, &spec, outW, errW)
	outW.Close()
	errW.Close()
	if err != nil {
		_ = runsc.Delete(context.Background(), spec.ID, DeleteOpts{Force: true})
		waitRelays(outDone, errDone)
		return err
	}
	signalReady("ok")

	var timedOut atomic.Bool
	if spec.Timeout > 0 {
		stop := enforceTimeout(&runsc, &spec, &timedOut)
		defer stop()
	}

	var ws unix.WaitStatus
	for {
		_, werr := unix.Wait4(pid, &ws, 0, nil)
		if werr == unix.EINTR {
			continue
		}
		if werr != nil {
			return fmt.Errorf("wait for sandbox %d: %w", pid, werr)
		}
		break
	}
	st := ExitStatus{StartedAt: started, CompletedAt: time.Now().UTC(), TimedOut: timedOut.Load()}
	switch {
	case ws.Signaled():
		// The sandbox itself was killed from the host (e.g. SIGKILL by
		// the kernel's OOM killer).
		st.Signal = int(ws.Signal())
		st.ExitCode = 128 + st.Signal
	default:
		st.ExitCode = ws.ExitStatus()
		// runsc reports a task killed by signal N as 128+N, the way a
		// shell does; a task that exits with such a code itself is
		// indistinguishable, and is reported the same way.
		if st.ExitCode > 128 && st.ExitCode <= 128+64 {
			st.Signal = st.ExitCode - 128
		}
	}
	trailSummary := stopTrail()
	waitRelays(outDone, errDone)
	if err := errors.Join(outDone.failure(), errDone.failure()); err != nil {
		st.LogErr = err.Error()
	}
	_ = runsc.Delete(context.Background(), spec.ID, DeleteOpts{Force: true})
	// The bundle's spec holds the task's environment (its secrets), as did
	// runsc's state that the delete removed; nothing needs it once the
	// sandbox is gone, so it does not wait for the plugin's DestroyTask,
	// which a crashed agent may never send.
	ScrubSecrets(dir)
	st.DiskFull = DiskFull(dir)
	if cg := spec.Cgroup; cg != nil {
		oom, err := cg.OOMKilled()
		if err != nil {
			st.Err = "cannot tell whether the task was OOM-killed: " + err.Error()
		}
		st.OOMKilled = oom
		if err := cg.Destroy(); err != nil {
			fmt.Fprintf(os.Stderr, "%s supervisor: %v\n", time.Now().UTC().Format(time.RFC3339), err)
		}
	}
	if spec.AuditLog != "" && spec.Audit != nil {
		rec := exitRecord(dir, spec.Audit, &st)
		rec.Trail = trailSummary
		if err := (&audit.Log{Path: spec.AuditLog}).Write(rec, true); err != nil {
			st.AuditErr = err.Error()
		}
	}
	return atomicfile.WriteJSON(StateDir(dir).Exit(), &st, 0o600)
}

// ScrubSecrets removes the files of a task's state directory that carry its
// environment: the bundle's spec and exec's process files (left by an exec
// cut short). The supervisor calls it when the sandbox has ended, the driver
// first thing when it removes a task, so that a crash half-way through
// leaves none behind.
func ScrubSecrets(dir string) {
	sd := StateDir(dir)
	_ = os.Remove(sd.BundleSpec())
	for _, f := range sd.ExecProcesses() {
		_ = os.Remove(f)
	}
}

// NetworkRecord, in StateDir.Network, is where the driver keeps a
// sandbox's network: what it needs to take the network back after a plugin
// restart, and what was denied, which the exit record carries.
type NetworkRecord struct {
	Egress     []string          `json:"egress"`
	Denials    map[string]uint64 `json:"egress_denials,omitempty"`
	RefusedDNS map[string]int    `json:"refused_dns,omitempty"`
}

func exitRecord(dir string, base *audit.Record, st *ExitStatus) *audit.Record {
	r := *base
	var n NetworkRecord
	if atomicfile.ReadJSON(StateDir(dir).Network(), &n) == nil {
		r.EgressDenials, r.RefusedDNS = n.Denials, n.RefusedDNS
	}
	r.Time = time.Time{}
	r.Event = audit.EventExited
	started, completed, code := st.StartedAt, st.CompletedAt, st.ExitCode
	r.StartedAt, r.CompletedAt, r.ExitCode = &started, &completed, &code
	r.Signal, r.OOMKilled, r.TimedOut, r.Error = st.Signal, st.OOMKilled, st.TimedOut, st.Err
	r.DiskLimitReached = st.DiskFull
	return &r
}

// runDetached starts the sandbox with `runsc run --detach`: one runsc
// process creates and starts it, then exits, and the sandbox is reparented
// to us (a subreaper) so that we can wait for its exit status.
func runDetached(dir string, r *Runsc, spec *SupervisorSpec, stdout, stderr *os.File) (int, error) {
	o := spec.Run
	o.PidFile = StateDir(dir).SandboxPid()
	pidPath := o.PidFile
	if err := r.Run(context.Background(), spec.ID, o, stdout, stderr); err != nil {
		return 0, fmt.Errorf("run sandbox: %w%s", err, logTail(spec.Run.LogFile))
	}
	b, err := os.ReadFile(pidPath)
	if err != nil {
		return 0, fmt.Errorf("run sandbox: read pid file: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, fmt.Errorf("run sandbox: bad pid file %q", b)
	}
	return pid, nil
}

// enforceTimeout ends the task when its time is up: SIGTERM to the task,
// then SIGKILL to everything in the sandbox after the grace period. It
// returns a function that cancels the timers.
func enforceTimeout(r *Runsc, spec *SupervisorSpec, timedOut *atomic.Bool) func() {
	grace := spec.KillGrace
	if grace <= 0 {
		grace = 5 * time.Second
	}
	done := make(chan struct{})
	kill := func(sig unix.Signal, o KillOpts) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = r.Kill(ctx, spec.ID, sig, o)
	}
	t := time.AfterFunc(spec.Timeout, func() {
		timedOut.Store(true)
		kill(unix.SIGTERM, KillOpts{})
		select {
		case <-time.After(grace):
			kill(unix.SIGKILL, KillOpts{All: true})
		case <-done:
		}
	})
	return func() {
		t.Stop()
		close(done)
	}
}

// logTail returns the last error lines of runsc's log, for error messages.
func logTail(path string) string {
	if path == "" {
		return ""
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	var picked []string
	for i := len(lines) - 1; i >= 0 && len(picked) < 3; i-- {
		l := lines[i]
		if strings.HasPrefix(l, "W") || strings.HasPrefix(l, "E") || strings.Contains(l, "rror") {
			picked = append([]string{strings.TrimSpace(l)}, picked...)
		}
	}
	if len(picked) == 0 {
		return ""
	}
	return ": " + strings.Join(picked, "; ")
}

// shortPath names path through /proc/self/fd/N/<base>, N a descriptor of
// its directory, so that a Unix socket in a deep state directory stays
// within the 108-byte sun_path limit.
func shortPath(path string) (string, func(), error) {
	dir, name := filepath.Dir(path), filepath.Base(path)
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", nil, fmt.Errorf("open %s: %w", dir, err)
	}
	return fmt.Sprintf("/proc/self/fd/%d/%s", fd, name), func() { unix.Close(fd) }, nil
}

func acceptAndHold(ln net.Listener) {
	// The connections stay referenced until the process exits: their
	// close is the signal, and an unreferenced one would be closed early
	// by the garbage collector's finalizer.
	var held []net.Conn
	for {
		c, err := ln.Accept()
		if err != nil {
			runtimeKeepAlive(held)
			return
		}
		held = append(held, c)
	}
}

// relay copies the sandbox's output from r to the log FIFO at path (relative
// to root, see openLog). runsc gets a pipe of its own, never the FIFO: runsc
// makes its descriptors non-blocking, and a FIFO whose reader restarts
// (Nomad's logmon after an agent restart) is reopened here instead of
// killing the task with EPIPE. When the log path is anything but a FIFO, the
// output is dropped and the reason kept in the relay's err.
func relay(r *os.File, root, path string) *relayed {
	rl := &relayed{done: make(chan struct{})}
	go func() {
		defer close(rl.done)
		defer r.Close()
		var w *os.File
		defer func() {
			if w != nil {
				w.Close()
			}
		}()
		open := func() *os.File {
			f, err := openLog(root, path, nil)
			if err != nil && rl.err == nil {
				rl.err = err
				fmt.Fprintf(os.Stderr, "%s supervisor: %v\n", time.Now().UTC().Format(time.RFC3339), err)
			}
			return f
		}
		// Open at once, not at the first output: Nomad's log collector
		// waits for a writer to come and go, and a quiet task would
		// otherwise leave it waiting when the task ends.
		if path != "" {
			w = open()
		}
		buf := make([]byte, 32*1024)
		for {
			n, rerr := r.Read(buf)
			data := buf[:n]
			for len(data) > 0 && path != "" && rl.err == nil {
				if w == nil {
					if w = open(); w == nil {
						break
					}
				}
				m, err := w.Write(data)
				data = data[m:]
				if err != nil {
					w.Close()
					w = nil
					if !errors.Is(err, unix.EPIPE) {
						data = nil
					}
				}
			}
			if rerr != nil {
				return
			}
		}
	}()
	return rl
}

// relayed is a running relay: done closes when it ends, and err (read after
// done) says why output was dropped, if it was.
type relayed struct {
	done chan struct{}
	err  error
}

// failure is why the relay dropped output, once it has ended; nil if it did
// not (or has not ended).
func (rl *relayed) failure() error {
	select {
	case <-rl.done:
		return rl.err
	default:
		return nil
	}
}

// ErrNotFIFO is returned by openLog for a log path that is not a FIFO.
var ErrNotFIFO = errors.New("not a FIFO")

// openLog opens the log FIFO path for writing. The directory it is in can be
// written by the task (alloc/logs) or the node's other users, so it is
// resolved beneath root (the allocation directory, or path's own directory
// when root is empty) without following any symbolic link, the type is read
// from the resolved descriptor, and only a FIFO is opened: never a regular
// file, a device, or a path that does not exist (nothing is created). With
// no reader yet (Nomad's logmon starting or restarting) the non-blocking
// open fails with ENXIO and is retried with backoff until stop closes,
// rather than opened blocking: a blocking open cannot be abandoned. The
// FIFO is not opened read-write to avoid that wait, as the supervisor would
// then be a reader too and never see logmon go away (EPIPE), nor could
// logmon see the writer's end.
func openLog(root, path string, stop <-chan struct{}) (*os.File, error) {
	rel := path
	if root == "" {
		root, rel = filepath.Dir(path), filepath.Base(path)
	} else if r, err := filepath.Rel(root, path); err == nil && filepath.IsLocal(r) {
		rel = r
	} else {
		return nil, fmt.Errorf("log %s is not inside %s", path, root)
	}
	h, err := safeopen.Resolve(root, rel, safeopen.NoSymlinks)
	if err != nil {
		return nil, fmt.Errorf("log %s: %w: output dropped", path, err)
	}
	defer h.Close()
	if h.Type() != unix.S_IFIFO {
		return nil, fmt.Errorf("log %s: %w (mode %#o): output dropped", path, ErrNotFIFO, h.Stat.Mode)
	}
	backoff := 5 * time.Millisecond
	for {
		fd, err := h.Open(unix.O_WRONLY | unix.O_NONBLOCK)
		if err == nil {
			// Non-blocking: Go's poller parks a writer on a full pipe.
			return os.NewFile(uintptr(fd), path), nil
		}
		if !errors.Is(err, unix.ENXIO) && !errors.Is(err, unix.EINTR) {
			return nil, fmt.Errorf("log %s: %w: output dropped", path, err)
		}
		select {
		case <-stop:
			return nil, fmt.Errorf("log %s: no reader: %w", path, err)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 500*time.Millisecond)
	}
}

func waitRelays(rls ...*relayed) {
	deadline := time.After(10 * time.Second)
	for _, rl := range rls {
		select {
		case <-rl.done:
		case <-deadline:
			return
		}
	}
}
