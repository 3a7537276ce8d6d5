package trace

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/audit"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

func TestValidatePoints(t *testing.T) {
	must.NoError(t, ValidatePoints(DefaultPoints()))
	must.NoError(t, ValidatePoints([]string{"exec", "connect", "exit", "open_write", "bind"}))
	for _, bad := range [][]string{{}, {"exec", "exec"}, {"execve"}} {
		err := ValidatePoints(bad)
		must.ErrorContains(t, err, "trace_points")
	}
}

func TestPodInitConfig(t *testing.T) {
	b, err := PodInitConfig("/proc/1/fd/3/trace.sock", DefaultPoints())
	must.NoError(t, err)
	var c struct {
		TraceSession sessionConfig `json:"trace_session"`
	}
	must.NoError(t, json.Unmarshal(b, &c))
	var names []string
	for _, p := range c.TraceSession.Points {
		names = append(names, p.Name)
	}
	must.Eq(t, []string{"sentry/execve", "syscall/connect/enter", "syscall/connect/exit", "syscall/socket/exit", "sentry/task_exit"}, names)
	must.Eq(t, "Default", c.TraceSession.Name)
	must.Eq(t, []sinkConfig{{Name: "remote", Config: map[string]any{"endpoint": "/proc/1/fd/3/trace.sock"}}}, c.TraceSession.Sinks)
	b, err = PodInitConfig("/x", []string{"connect", "bind"})
	must.NoError(t, err)
	must.Eq(t, 1, strings.Count(string(b), "syscall/socket/exit"))
	_, err = PodInitConfig("/x", []string{"nope"})
	must.Error(t, err)
}

// msg builds a remote-sink message: header, then the protobuf fields.
type msg struct{ b []byte }

func (m *msg) varint(num protowire.Number, v uint64) *msg {
	m.b = protowire.AppendTag(m.b, num, protowire.VarintType)
	m.b = protowire.AppendVarint(m.b, v)
	return m
}

func (m *msg) bytes(num protowire.Number, v []byte) *msg {
	m.b = protowire.AppendTag(m.b, num, protowire.BytesType)
	m.b = protowire.AppendBytes(m.b, v)
	return m
}

func ctxMsg(tid, pid int32, cwd, process string) []byte {
	cred := (&msg{}).varint(2, 1000).varint(5, 1000).b
	return (&msg{}).varint(1, uint64(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC).UnixNano())).
		varint(2, uint64(tid)).varint(4, uint64(pid)).bytes(7, cred).bytes(8, []byte(cwd)).
		bytes(9, []byte(process)).varint(10, 1).b
}

func frame(msgType uint16, dropped uint32, payload []byte) []byte {
	h := make([]byte, headerSize)
	binary.LittleEndian.PutUint16(h[0:], headerSize)
	binary.LittleEndian.PutUint16(h[2:], msgType)
	binary.LittleEndian.PutUint32(h[4:], dropped)
	return append(h, payload...)
}

func sockaddrIn(ip [4]byte, port uint16) []byte {
	b := make([]byte, 16)
	binary.NativeEndian.PutUint16(b, unix.AF_INET)
	binary.BigEndian.PutUint16(b[2:], port)
	copy(b[4:], ip[:])
	return b
}

func readLines(t *testing.T, path string) []Record {
	t.Helper()
	b, err := os.ReadFile(path)
	must.NoError(t, err)
	var out []Record
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		var r Record
		must.NoError(t, json.Unmarshal(sc.Bytes(), &r))
		out = append(out, r)
	}
	return out
}

// The receiver's decoding of each point, fed the wire format directly.
func TestReceiver_Points(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(dir, "trail.jsonl")
	r, err := Listen(filepath.Join(dir, "trace.sock"), filepath.Join(dir, "trace.json"), Config{Log: log, Points: []string{"exec", "connect", "exit", "open_write"}, Identity: Identity{Job: "j", SandboxID: "sb"}})
	must.NoError(t, err)

	exec := (&msg{}).bytes(1, ctxMsg(7, 7, "/w", "sh")).bytes(2, []byte("/bin/busybox"))
	for i := range 40 {
		exec.bytes(3, []byte("arg"+strconv.Itoa(i)))
	}
	exec.bytes(8, bytes.Repeat([]byte{0xab}, 32))
	r.handle(frame(msgExec, 0, exec.b))
	// socket() = 3 (TCP), then a refused connect on it, then one that
	// never returns.
	r.handle(frame(msgSocket, 0, (&msg{}).bytes(1, ctxMsg(7, 7, "/w", "nc")).bytes(2, (&msg{}).varint(1, 3).b).
		varint(4, unix.AF_INET).varint(5, unix.SOCK_STREAM).b))
	addr := sockaddrIn([4]byte{10, 0, 0, 1}, 443)
	enter := (&msg{}).bytes(1, ctxMsg(7, 7, "/w", "nc")).varint(4, 3).bytes(6, addr).b
	r.handle(frame(msgConnect, 0, enter))
	r.handle(frame(msgConnect, 0, (&msg{}).bytes(1, ctxMsg(7, 7, "/w", "nc")).bytes(2, (&msg{}).varint(1, ^uint64(0)).varint(2, uint64(unix.ECONNREFUSED)).b).varint(4, 3).bytes(6, addr).b))
	r.handle(frame(msgConnect, 0, (&msg{}).bytes(1, ctxMsg(8, 7, "/w", "nc")).varint(4, 3).bytes(6, sockaddrIn([4]byte{10, 0, 0, 2}, 80)).b))
	// A read-only open is not written; a relative create is, made absolute.
	r.handle(frame(msgOpen, 0, (&msg{}).bytes(1, ctxMsg(7, 7, "/w", "sh")).bytes(2, []byte{}).bytes(6, []byte("ro")).varint(7, unix.O_RDONLY).b))
	r.handle(frame(msgOpen, 0, (&msg{}).bytes(1, ctxMsg(7, 7, "/w", "sh")).bytes(2, []byte{}).varint(4, uint64(0xffffffffffffff9c)).bytes(6, []byte("out.txt")).varint(7, unix.O_WRONLY|unix.O_CREAT).b))
	// A thread's exit is not the process's; the leader's, by signal 9, is.
	r.handle(frame(msgTaskExit, 0, (&msg{}).bytes(1, ctxMsg(8, 7, "/w", "nc")).b))
	r.handle(frame(msgTaskExit, 5, (&msg{}).bytes(1, ctxMsg(7, 7, "/w", "nc")).varint(2, 9).b))
	// A connect still blocked when the sandbox ends is written at Close.
	r.handle(frame(msgConnect, 0, (&msg{}).bytes(1, ctxMsg(9, 9, "/w", "nc")).varint(4, 4).bytes(6, sockaddrIn([4]byte{10, 0, 0, 3}, 22)).b))
	r.handle([]byte{1, 2})
	sum := r.Close(0)

	recs := readLines(t, log)
	must.Len(t, 8, recs, must.Sprint(recs))
	ex := recs[0]
	must.Eq(t, "exec", ex.Point)
	must.Eq(t, Identity{Job: "j", SandboxID: "sb"}, ex.Identity)
	must.Eq(t, "/bin/busybox", ex.Path)
	must.Len(t, maxArgs, ex.Argv)
	must.Eq(t, 40-maxArgs, ex.ArgvDropped)
	must.Eq(t, strings.Repeat("ab", 32), ex.SHA256)
	must.Eq(t, int32(7), ex.PID)
	must.Eq(t, int32(1), ex.PPID)
	must.Eq(t, uint32(1000), *ex.UID)
	must.Eq(t, "/w", ex.Cwd)
	must.Eq(t, time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), ex.Time)

	c := recs[1]
	must.Eq(t, "connect", c.Point)
	must.Eq(t, "10.0.0.1", c.Address)
	must.Eq(t, 443, *c.Port)
	must.Eq(t, "tcp", c.Protocol)
	must.Eq(t, "ECONNREFUSED", c.Result)

	o := recs[2]
	must.Eq(t, "open_write", o.Point)
	must.Eq(t, "/w/out.txt", o.Path)
	must.Eq(t, "O_WRONLY|O_CREAT", o.Flags)
	must.Eq(t, "ok", o.Result)

	// Thread 8 exited inside its connect.
	nr := recs[3]
	must.Eq(t, "connect", nr.Point)
	must.Eq(t, "10.0.0.2", nr.Address)
	must.Eq(t, "no_return", nr.Result)
	must.Eq(t, int32(8), nr.TID)

	d := recs[4]
	must.Eq(t, "dropped", d.Point)
	must.Eq(t, map[string]uint64{"sandbox": 5}, d.Dropped)
	e := recs[5]
	must.Eq(t, "exit", e.Point)
	must.Eq(t, 9, e.Signal)
	must.Nil(t, e.ExitCode)

	must.Eq(t, map[string]uint64{"sandbox": 5, "malformed": 1}, recs[6].Dropped)
	must.Eq(t, "10.0.0.3", recs[7].Address)
	must.Eq(t, "no_return", recs[7].Result)
	for i, rec := range recs {
		must.Eq(t, uint64(i+1), rec.Seq)
	}
	must.Eq(t, map[string]uint64{"exec": 1, "connect": 3, "open_write": 1, "exit": 1}, sum.Counts)
	must.Eq(t, map[string]uint64{"sandbox": 5, "malformed": 1}, sum.Dropped)
	must.Eq(t, []string{"10.0.0.1:443/tcp", "10.0.0.2:80/tcp", "10.0.0.3:22"}, sum.Destinations)
	must.Eq(t, "", sum.Error)
	_, err = os.Stat(r.sock)
	must.True(t, os.IsNotExist(err))
}

// A total of 3: the fourth and later points are counted, not written, and
// the count is the last line.
func TestReceiver_Total(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(dir, "trail.jsonl")
	r, err := Listen(filepath.Join(dir, "trace.sock"), filepath.Join(dir, "trace.json"), Config{Log: log, Points: DefaultPoints(), MaxRecords: 3})
	must.NoError(t, err)
	for range 10 {
		r.handle(frame(msgExec, 0, (&msg{}).bytes(1, ctxMsg(2, 2, "/", "sh")).bytes(2, []byte("/bin/true")).b))
	}
	sum := r.Close(0)
	recs := readLines(t, log)
	must.Len(t, 4, recs)
	must.Eq(t, "dropped", recs[3].Point)
	must.Eq(t, map[string]uint64{"total": 7}, recs[3].Dropped)
	must.Eq(t, uint64(10), sum.Counts["exec"])
}

// The socket: only root may connect (mode 0600 in a root-only directory),
// the first (root) connection is the trail's, and the
// listener is gone from then on, so nothing can join or feed the trail
// later.
func TestReceiver_OneConnection(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	log := filepath.Join(dir, "trail.jsonl")
	r, err := Listen(filepath.Join(dir, "trace.sock"), filepath.Join(dir, "trace.json"), Config{Log: log, Points: DefaultPoints()})
	must.NoError(t, err)
	fi, err := os.Stat(r.sock)
	must.NoError(t, err)
	must.Eq(t, os.FileMode(0o600), fi.Mode().Perm())
	pic, err := os.ReadFile(r.ConfigPath())
	must.NoError(t, err)
	must.StrContains(t, string(pic), r.endpoint())

	conn, err := net.Dial("unixpacket", r.endpoint())
	must.NoError(t, err)
	defer conn.Close()
	_, err = conn.Write((&msg{}).varint(1, 1).b)
	must.NoError(t, err)
	reply := make([]byte, 64)
	n, err := conn.Read(reply)
	must.NoError(t, err)
	must.Eq(t, []byte{0x08, 0x01}, reply[:n])
	must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool {
		_, err := os.Stat(r.sock)
		return os.IsNotExist(err)
	}), wait.Timeout(5*time.Second), wait.Gap(10*time.Millisecond)))
	_, err = net.Dial("unixpacket", r.sock)
	must.Error(t, err, must.Sprint("a second connection after the sandbox's"))

	_, err = conn.Write(frame(msgExec, 0, (&msg{}).bytes(1, ctxMsg(2, 2, "/", "sh")).bytes(2, []byte("/bin/id")).b))
	must.NoError(t, err)
	conn.Close()
	sum := r.Close(5 * time.Second)
	must.Eq(t, uint64(1), sum.Counts["exec"])
	recs := readLines(t, log)
	must.Len(t, 1, recs)
	must.Eq(t, "/bin/id", recs[0].Path)
	_, err = os.Stat(r.ConfigPath())
	must.True(t, os.IsNotExist(err), must.Sprint("the session file goes at Close"))
}

// A Sentry the task escaped into sends strings as long as a message (256
// KiB) and bytes that JSON writes six times over (controls, invalid UTF-8,
// <, >, &): every line stays within maxLine, and the connects kept between
// enter and exit keep no more than their capped strings.
func TestReceiver_HostileStrings(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(dir, "trail.jsonl")
	r := newReceiver(Config{Log: log, Points: knownPoints()})
	huge := bytes.Repeat([]byte{0x1b}, 200<<10)
	esc := []byte(strings.Repeat("\x1b[31m<&>\xff", 200))
	ctxOf := func(tid int32, s []byte) []byte {
		return (&msg{}).varint(2, uint64(tid)).varint(4, 7).bytes(8, s).bytes(9, s).b
	}
	ctx := func(tid int32) []byte { return ctxOf(tid, huge) }
	exec := (&msg{}).bytes(1, ctx(7)).bytes(2, esc)
	for range 40 {
		exec.bytes(3, esc)
	}
	exec.bytes(8, huge)
	r.handle(frame(msgExec, 0, exec.b))
	unixAddr := append(binaryFamily(unix.AF_UNIX), esc...)
	r.handle(frame(msgConnect, 0, (&msg{}).bytes(1, ctx(7)).bytes(2, []byte{}).varint(4, 3).bytes(6, unixAddr).b))
	r.handle(frame(msgOpen, 0, (&msg{}).bytes(1, ctx(7)).bytes(2, []byte{}).varint(4, 5).bytes(5, esc).bytes(6, esc).varint(7, unix.O_WRONLY).b))
	for tid := range int32(maxPendingConnects) {
		r.handle(frame(msgConnect, 0, (&msg{}).bytes(1, ctxOf(100+tid, huge[:16<<10])).varint(4, 3).bytes(6, huge[:16<<10]).b))
	}
	var kept int
	for _, p := range r.pending {
		kept += len(p.Cwd) + len(p.Process) + len(p.Address)
	}
	must.Less(t, 4<<20, kept, must.Sprint("bytes the pending connects keep"))
	close(r.done)
	sum := r.Close(0)
	must.Eq(t, "", sum.Error)
	b, err := os.ReadFile(log)
	must.NoError(t, err)
	must.False(t, bytes.ContainsRune(b, 0x1b), must.Sprint("a raw escape in the trail"))
	lines := 0
	for line := range bytes.Lines(b) {
		lines++
		must.LessEq(t, maxLine, len(line), must.Sprintf("line %d", lines))
		var rec Record
		must.NoError(t, json.Unmarshal(line, &rec))
	}
	must.Eq(t, 3+maxPendingConnects, lines)
	recs := readLines(t, log)
	must.Eq(t, "", recs[0].SHA256, must.Sprint("a digest that is not 32 bytes is not one"))
	must.Len(t, maxArgs, recs[0].Argv)
	must.Eq(t, 40-maxArgs, recs[0].ArgvDropped)
}

// A FIFO at the trail's path (a local user's, in a directory they can write
// to) is refused at once: an open that waited for a reader would hold the
// receiver, and with it Close and the task's exit status, for ever.
func TestReceiver_LogFIFO(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(dir, "trail.jsonl")
	must.NoError(t, unix.Mkfifo(log, 0o666))
	r := newReceiver(Config{Log: log, Points: DefaultPoints()})
	handled := make(chan struct{})
	go func() {
		defer close(handled)
		r.handle(frame(msgExec, 0, (&msg{}).bytes(1, ctxMsg(2, 2, "/", "sh")).bytes(2, []byte("/bin/true")).b))
	}()
	t.Cleanup(func() {
		// Without the fix the write waits for a reader: give it one,
		// so that nothing is left blocked.
		if fd, err := unix.Open(log, unix.O_RDONLY|unix.O_NONBLOCK, 0); err == nil {
			<-handled
			unix.Close(fd)
		}
	})
	must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool {
		select {
		case <-handled:
			return true
		default:
			return false
		}
	}), wait.Timeout(5*time.Second), wait.Gap(10*time.Millisecond)), must.Sprint("the write waits for a reader of the FIFO"))
	close(r.done)
	sum := r.Close(0)
	must.StrContains(t, sum.Error, "trace log")
	must.Eq(t, uint64(0), sum.Written)

	// With a reader there (the local user's), nothing is written either.
	fd, err := unix.Open(log, unix.O_RDONLY|unix.O_NONBLOCK, 0)
	must.NoError(t, err)
	defer unix.Close(fd)
	r = newReceiver(Config{Log: log, Points: DefaultPoints()})
	r.handle(frame(msgExec, 0, (&msg{}).bytes(1, ctxMsg(2, 2, "/", "sh")).bytes(2, []byte("/bin/true")).b))
	must.StrContains(t, r.err.Error(), "not a regular file")
	n, err := unix.Read(fd, make([]byte, 1024))
	must.True(t, n <= 0, must.Sprintf("read %d bytes of the trail from the FIFO (%v)", n, err))
}

// A sender that never closes its end, and floods while the task ends, holds
// Close no longer than its wait: the supervisor goes on to write the exit
// status, and a connect still pending is on record as no_return.
func TestReceiver_SenderNeverCloses(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	log := filepath.Join(dir, "trail.jsonl")
	r, err := Listen(filepath.Join(dir, "trace.sock"), filepath.Join(dir, "trace.json"), Config{Log: log, Points: DefaultPoints(), Rate: 10, Burst: 10, MaxRecords: 100})
	must.NoError(t, err)
	closed := false
	defer func() {
		if !closed {
			r.Close(0)
		}
	}()
	conn, err := net.Dial("unixpacket", r.endpoint())
	must.NoError(t, err)
	defer conn.Close()
	_, err = conn.Write((&msg{}).varint(1, 1).b)
	must.NoError(t, err)
	_, err = conn.Read(make([]byte, 64))
	must.NoError(t, err)
	_, err = conn.Write(frame(msgConnect, 0, (&msg{}).bytes(1, ctxMsg(9, 9, "/", "nc")).varint(4, 3).bytes(6, sockaddrIn([4]byte{10, 0, 0, 3}, 22)).b))
	must.NoError(t, err)
	exec := frame(msgExec, 0, (&msg{}).bytes(1, ctxMsg(2, 2, "/", "sh")).bytes(2, []byte("/bin/true")).b)
	_, err = conn.Write(exec)
	must.NoError(t, err)
	must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool {
		b, _ := os.ReadFile(log)
		return bytes.Contains(b, []byte("/bin/true"))
	}), wait.Timeout(5*time.Second), wait.Gap(10*time.Millisecond)))

	flooded := make(chan struct{})
	go func() {
		defer close(flooded)
		for {
			if _, err := conn.Write(exec); err != nil {
				return
			}
		}
	}()
	defer func() { conn.Close(); <-flooded }()
	var sum atomic.Pointer[audit.Trail]
	go func() { sum.Store(r.Close(200 * time.Millisecond)) }()
	closed = true
	must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool { return sum.Load() != nil }),
		wait.Timeout(5*time.Second), wait.Gap(10*time.Millisecond)), must.Sprint("Close held by the sender"))
	s := sum.Load()
	must.Eq(t, "", s.Error)
	must.LessEq(t, 100, s.Written)
	// The flood spent the rate: the connect is counted, not written.
	must.Eq(t, uint64(1), s.Counts["connect"])
	must.Eq(t, []string{"10.0.0.3:22"}, s.Destinations)
	recs := readLines(t, log)
	must.Eq(t, "dropped", recs[len(recs)-1].Point)
}

// connectAs connects to a SEQPACKET socket from a thread running as uid
// (the thread is dropped afterwards, never reused): what another local user
// can do. It returns the descriptor or the error.
func connectAs(uid int, path string) (int, error) {
	type result struct {
		fd  int
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// No UnlockOSThread: the thread, whose ids are changed, ends
		// with the goroutine.
		runtime.LockOSThread()
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESGID, uintptr(uid), uintptr(uid), ^uintptr(0)); e != 0 {
			ch <- result{-1, e}
			return
		}
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, uintptr(uid), uintptr(uid), ^uintptr(0)); e != 0 {
			ch <- result{-1, e}
			return
		}
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
		if err == nil {
			if err = unix.Connect(fd, &unix.SockaddrUnix{Name: path}); err != nil {
				unix.Close(fd)
				fd = -1
			}
		}
		ch <- result{fd, err}
	}()
	r := <-ch
	return r.fd, r.err
}

// Another local user cannot reach the socket (its directory is root's
// only), and, given the way in (a directory opened to all), is turned away
// without taking the trail's place: root's connection after it is the
// trail's.
func TestReceiver_OtherUser(t *testing.T) {
	testutil.RequireRoot(t)
	dir, err := os.MkdirTemp("", "trace-peer-")
	must.NoError(t, err)
	defer os.RemoveAll(dir)
	must.NoError(t, os.Chmod(dir, 0o700))
	log := filepath.Join(dir, "trail.jsonl")
	r, err := Listen(filepath.Join(dir, "trace.sock"), filepath.Join(dir, "trace.json"), Config{Log: log, Points: DefaultPoints()})
	must.NoError(t, err)
	defer r.Close(0)

	_, err = connectAs(65534, r.sock)
	must.ErrorIs(t, err, unix.EACCES)

	must.NoError(t, os.Chmod(dir, 0o755))
	must.NoError(t, os.Chmod(r.sock, 0o777))
	fd, err := connectAs(65534, r.sock)
	must.NoError(t, err)
	defer unix.Close(fd)
	// Closed at once: the handshake fails to go out, or gets no answer.
	n := 0
	if _, err = unix.Write(fd, (&msg{}).varint(1, 1).b); err == nil {
		n, err = unix.Read(fd, make([]byte, 64))
	}
	must.True(t, n <= 0, must.Sprintf("the other user's connection got %d bytes of answer (%v)", n, err))

	conn, err := net.Dial("unixpacket", r.endpoint())
	must.NoError(t, err)
	defer conn.Close()
	_, err = conn.Write((&msg{}).varint(1, 1).b)
	must.NoError(t, err)
	reply := make([]byte, 64)
	n, err = conn.Read(reply)
	must.NoError(t, err)
	must.Eq(t, []byte{0x08, 0x01}, reply[:n])
}

// A sender that connects and never says its version holds Close no longer
// than its wait either (the handshake's own deadline is 30 s), and one that
// speaks version 0 gets no answer and no trail.
func TestReceiver_SilentOrBadHandshake(t *testing.T) {
	testutil.RequireRoot(t)
	for _, hello := range [][]byte{nil, (&msg{}).varint(1, 0).b} {
		dir := t.TempDir()
		r, err := Listen(filepath.Join(dir, "trace.sock"), filepath.Join(dir, "trace.json"), Config{Log: filepath.Join(dir, "trail.jsonl"), Points: DefaultPoints()})
		must.NoError(t, err)
		sock := filepath.Join(dir, "trace.sock")
		conn, err := net.Dial("unixpacket", r.endpoint())
		must.NoError(t, err)
		defer conn.Close()
		// The receiver has taken the connection (it removes the socket
		// then): a Close before that is a sandbox that never connected.
		must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool {
			_, err := os.Lstat(sock)
			return errors.Is(err, os.ErrNotExist)
		}), wait.Timeout(5*time.Second), wait.Gap(5*time.Millisecond)), must.Sprint("the receiver never took the connection"))
		if hello != nil {
			_, err = conn.Write(hello)
			must.NoError(t, err)
			n, err := conn.Read(make([]byte, 64))
			must.True(t, n <= 0 && err != nil, must.Sprintf("version 0 answered with %d bytes", n))
		}
		var sum atomic.Pointer[audit.Trail]
		go func() { sum.Store(r.Close(100 * time.Millisecond)) }()
		must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool { return sum.Load() != nil }),
			wait.Timeout(5*time.Second), wait.Gap(10*time.Millisecond)), must.Sprint("Close held by a silent sender"))
		must.StrContains(t, sum.Load().Error, "handshake")
	}
}
