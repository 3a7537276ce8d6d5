package runtime

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"
	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/audit"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/trace"
)

// readTrail returns the trail's lines in order (none if there is no file).
func readTrail(t *testing.T, path string) []trace.Record {
	t.Helper()
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil
	}
	must.NoError(t, err)
	var recs []trace.Record
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var r trace.Record
		must.NoError(t, json.Unmarshal(sc.Bytes(), &r), must.Sprint(sc.Text()))
		recs = append(recs, r)
	}
	must.NoError(t, sc.Err())
	return recs
}

func traceIdentity(id string) trace.Identity {
	return trace.Identity{Namespace: "ns", Job: "job", ParentJob: "parent", TaskGroup: "group", Task: "task", AllocID: "alloc", Node: "node", NodeID: "node-id", SandboxID: id}
}

// withTrail gives the sandbox a trail into log, with the identity of
// traceIdentity, and an audit log.
func withTrail(log, auditLog string, rate float64, burst int, max uint64) func(*SupervisorSpec) {
	return func(s *SupervisorSpec) {
		s.Trace = &trace.Config{Log: log, Points: trace.DefaultPoints(), Rate: rate, Burst: burst, MaxRecords: max, Identity: traceIdentity(s.ID)}
		s.AuditLog = auditLog
		s.Audit = &audit.Record{Namespace: "ns", Job: "job", Task: "task", SandboxID: s.ID}
	}
}

func lastAudit(t *testing.T, path string) audit.Record {
	t.Helper()
	b, err := os.ReadFile(path)
	must.NoError(t, err)
	lines := bytes.Split(bytes.TrimSpace(b), []byte("\n"))
	var r audit.Record
	must.NoError(t, json.Unmarshal(lines[len(lines)-1], &r))
	return r
}

// checkSeq fails unless the lines are numbered 1..n in order: no gap, no
// duplicate.
func checkSeq(t *testing.T, recs []trace.Record) {
	t.Helper()
	for i, r := range recs {
		must.Eq(t, uint64(i+1), r.Seq, must.Sprintf("line %d of the trail", i+1))
	}
}

func byPoint(recs []trace.Record, point string) []trace.Record {
	var out []trace.Record
	for _, r := range recs {
		if r.Point == point {
			out = append(out, r)
		}
	}
	return out
}

// The trail of a shell that execs three known programs and connects to a
// listening and a closed port: exactly those execs, those two connects with
// what the task got back, the exits, every line with the task's identity
// and numbered without gaps; the exited audit record sums it up.
func TestTrail_ExecConnectExit(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	log, auditLog := filepath.Join(dir, "trail.jsonl"), filepath.Join(dir, "audit.jsonl")
	// The listener's readiness is read from /proc with shell builtins
	// only, so that the wait adds no exec to the trail.
	script := `
nc -l -p 8080 </dev/null >/dev/null &
ready() { while read -r _ l _ st _; do [ "$l" != "${l%:1F90}" ] && [ "$st" = 0A ] && return 0; done < /proc/net/tcp6; return 1; }
until ready; do :; done
/bin/true
/bin/echo hello
/bin/uname -s
nc 127.0.0.1 8080 </dev/null
nc 127.0.0.1 8081 </dev/null
wait
exit 3
`
	res := runSandboxSpec(t, nil, withTrail(log, auditLog, 0, 0, 0), "/bin/sh", "-c", script)
	must.Eq(t, 3, res.status.ExitCode, must.Sprint(res.stderr))
	recs := readTrail(t, log)
	checkSeq(t, recs)
	id := "rt-testtrail_execconnectexit"
	for _, r := range recs {
		must.Eq(t, traceIdentity(id), r.Identity)
		must.False(t, r.Time.IsZero())
	}

	bb, err := os.ReadFile(testutil.BusyboxPath)
	must.NoError(t, err)
	sum := sha256.Sum256(bb)
	var argvs []string
	for _, r := range byPoint(recs, trace.PointExec) {
		argvs = append(argvs, strings.Join(r.Argv, " "))
		must.Eq(t, "/bin/busybox", r.Path)
		must.Eq(t, hex.EncodeToString(sum[:]), r.SHA256)
		must.Eq(t, 1, r.PPID)
		must.Eq(t, 0, *r.UID)
		must.Eq(t, "/", r.Cwd)
	}
	slices.Sort(argvs)
	must.Eq(t, []string{"/bin/echo hello", "/bin/true", "/bin/uname -s", "nc -l -p 8080", "nc 127.0.0.1 8080", "nc 127.0.0.1 8081"}, argvs)

	conns := byPoint(recs, trace.PointConnect)
	must.Len(t, 2, conns, must.Sprint(conns))
	for i, want := range []struct {
		port   int
		result string
	}{{8080, "ok"}, {8081, "ECONNREFUSED"}} {
		c := conns[i]
		must.Eq(t, "127.0.0.1", c.Address)
		must.Eq(t, want.port, *c.Port)
		must.Eq(t, "tcp", c.Protocol)
		must.Eq(t, want.result, c.Result)
		must.Eq(t, "nc", c.Process)
	}

	exits := byPoint(recs, trace.PointExit)
	must.Len(t, 7, exits, must.Sprint("six programs and the shell"))
	last := exits[len(exits)-1]
	must.Eq(t, 1, last.PID)
	must.Eq(t, 3, *last.ExitCode)
	must.Len(t, 6+2+7, recs, must.Sprint("nothing else, and nothing dropped"))

	rec := lastAudit(t, auditLog)
	must.Eq(t, audit.EventExited, rec.Event)
	must.NotNil(t, rec.Trail)
	must.Eq(t, map[string]uint64{"exec": 6, "connect": 2, "exit": 7}, rec.Trail.Counts)
	must.Eq(t, uint64(len(recs)), rec.Trail.Written)
	must.Eq(t, []string{"/bin/busybox"}, rec.Trail.Executables)
	must.Eq(t, []string{"127.0.0.1:8080/tcp", "127.0.0.1:8081/tcp"}, rec.Trail.Destinations)
	must.MapEmpty(t, rec.Trail.Dropped)
}

// An exec loop cannot write more than the bounds let it: at most
// max_records lines of points, no more than the rate allows, and what was
// dropped is counted in a last "dropped" line and the exited record.
func TestTrail_VolumeBound(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	log, auditLog := filepath.Join(dir, "trail.jsonl"), filepath.Join(dir, "audit.jsonl")
	const execs, rate, burst, max = 300, 10, 20, 50
	script := `i=0; while [ $i -lt 300 ]; do /bin/true; i=$((i+1)); done`
	res := runSandboxSpec(t, nil, withTrail(log, auditLog, rate, burst, max), "/bin/sh", "-c", script)
	must.Eq(t, 0, res.status.ExitCode, must.Sprint(res.stderr))
	recs := readTrail(t, log)
	checkSeq(t, recs)
	points := len(recs) - len(byPoint(recs, "dropped"))
	must.LessEq(t, max, points)
	elapsed := res.status.CompletedAt.Sub(res.status.StartedAt).Seconds()
	must.LessEq(t, float64(burst)+rate*elapsed+1, float64(points), must.Sprint("the rate bound"))

	final := recs[len(recs)-1]
	must.Eq(t, "dropped", final.Point)
	tr := lastAudit(t, auditLog).Trail
	must.NotNil(t, tr)
	must.Eq(t, tr.Dropped, final.Dropped)
	var seen uint64
	for _, n := range tr.Counts {
		seen += n
	}
	must.Eq(t, seen, uint64(points)+tr.Dropped["rate"]+tr.Dropped["total"], must.Sprint("every point seen is written or counted as dropped"))
	must.GreaterEq(t, execs, tr.Counts["exec"]+tr.Dropped["sandbox"])
	must.Positive(t, tr.Dropped["rate"]+tr.Dropped["total"])
}

// With no trail, runsc gets no --pod-init-config (the sandbox process's
// flags show none), the bundle's spec names none, and no trail file or
// socket is made; with a trail, the same checks see it (so they can fail).
func TestTrail_UnsetMeansNoSession(t *testing.T) {
	testutil.RequireRoot(t)
	for _, on := range []bool{false, true} {
		t.Run(map[bool]string{false: "unset", true: "set"}[on], func(t *testing.T) {
			tsb := newTestSandbox(t, nil, "/bin/sh", "-c", "until [ -e /local/go ]; do :; done")
			dir := t.TempDir()
			log := filepath.Join(dir, "trail.jsonl")
			if on {
				withTrail(log, filepath.Join(dir, "audit.jsonl"), 0, 0, 0)(tsb.spec)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			must.NoError(t, tsb.sup.Start(ctx, tsb.spec))
			pid, err := os.ReadFile(StateDir(tsb.stateDir).SandboxPid())
			must.NoError(t, err)
			cmdline, err := os.ReadFile("/proc/" + strings.TrimSpace(string(pid)) + "/cmdline")
			must.NoError(t, err)
			must.Eq(t, on, bytes.Contains(cmdline, []byte("--pod-init-config")), must.Sprintf("the sandbox's flags: %q", cmdline))
			bundle, err := os.ReadFile(StateDir(tsb.stateDir).BundleSpec())
			must.NoError(t, err)
			must.StrNotContains(t, string(bundle), "pod-init-config")
			must.StrNotContains(t, string(bundle), "dev.gvisor.flag")
			_, err = os.Stat(StateDir(tsb.stateDir).TraceConfig())
			must.Eq(t, on, err == nil, must.Sprint("the trace session's config"))

			must.NoError(t, os.WriteFile(filepath.Join(tsb.dirs.Local, "go"), nil, 0o644))
			st, err := tsb.sup.Wait(ctx)
			must.NoError(t, err)
			must.Eq(t, 0, st.ExitCode)
			_, err = os.Stat(StateDir(tsb.stateDir).TraceSock())
			must.True(t, os.IsNotExist(err), must.Sprint("no trail socket is left"))
			must.Eq(t, on, len(readTrail(t, log)) > 0)
		})
	}
}

// trailChildEnv names the spec file of TestTrailPluginChild, which plays
// the plugin: it starts the supervisor and then waits to be killed.
const trailChildEnv = "SANDBOX_TRAIL_CHILD_SPEC"

func TestTrailPluginChild(t *testing.T) {
	path := os.Getenv(trailChildEnv)
	if path == "" {
		t.Skip("run by TestTrail_SurvivesPluginKill")
	}
	var in struct {
		Dir  string
		Spec SupervisorSpec
	}
	b, err := os.ReadFile(path)
	must.NoError(t, err)
	must.NoError(t, json.Unmarshal(b, &in))
	exe, err := os.Executable()
	must.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	must.NoError(t, (&Supervisor{Dir: in.Dir, Exe: exe}).Start(ctx, &in.Spec))
	os.Stdout.WriteString("started\n")
	select {} // until SIGKILL
}

// The trail belongs to the supervisor: a plugin killed with SIGKILL while
// the task runs loses none of it, and the lines after the kill continue the
// same numbering without gap or repeat.
func TestTrail_SurvivesPluginKill(t *testing.T) {
	testutil.RequireRoot(t)
	script := `/bin/echo before; until [ -e /local/go ]; do :; done; /bin/echo after; exit 0`
	tsb := newTestSandbox(t, nil, "/bin/sh", "-c", script)
	dir := t.TempDir()
	log, auditLog := filepath.Join(dir, "trail.jsonl"), filepath.Join(dir, "audit.jsonl")
	withTrail(log, auditLog, 0, 0, 0)(tsb.spec)
	specPath := filepath.Join(dir, "child.json")
	b, err := json.Marshal(map[string]any{"Dir": tsb.stateDir, "Spec": tsb.spec})
	must.NoError(t, err)
	must.NoError(t, os.WriteFile(specPath, b, 0o600))

	child := exec.Command(os.Args[0], "-test.run=^TestTrailPluginChild$", "-test.count=1")
	child.Env = append(os.Environ(), trailChildEnv+"="+specPath)
	out, err := child.StdoutPipe()
	must.NoError(t, err)
	must.NoError(t, child.Start())
	t.Cleanup(func() { _ = child.Process.Kill(); _ = child.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	must.NoError(t, err)
	must.Eq(t, "started\n", line)

	// The task is in its wait loop once "before" is on the trail.
	must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool {
		return slices.ContainsFunc(readTrail(t, log), func(r trace.Record) bool {
			return r.Point == trace.PointExit && r.Process == "echo"
		})
	}), wait.Timeout(30*time.Second), wait.Gap(20*time.Millisecond)))
	must.NoError(t, child.Process.Signal(unix.SIGKILL))
	_ = child.Wait()
	must.True(t, tsb.sup.Alive(), must.Sprint("the supervisor outlives the plugin"))

	must.NoError(t, os.WriteFile(filepath.Join(tsb.dirs.Local, "go"), nil, 0o644))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	st, err := tsb.sup.Wait(ctx)
	must.NoError(t, err)
	must.Eq(t, 0, st.ExitCode)

	recs := readTrail(t, log)
	checkSeq(t, recs)
	var argvs []string
	for _, r := range byPoint(recs, trace.PointExec) {
		argvs = append(argvs, strings.Join(r.Argv, " "))
	}
	must.Eq(t, []string{"/bin/echo before", "/bin/echo after"}, argvs)
	must.Len(t, 2+3, recs, must.Sprint("two execs, their exits and the shell's"))
	must.Eq(t, map[string]uint64{"exec": 2, "exit": 3}, lastAudit(t, auditLog).Trail.Counts)
}

// open_write and bind through real runsc: a file created for writing is on
// the trail, one only read is not; the listener's bind is, with its port.
func TestTrail_OpenWriteBind(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	log := filepath.Join(dir, "trail.jsonl")
	script := `
echo x > /tmp/out
read -r line < /etc/passwd
nc -l -p 9000 </dev/null >/dev/null &
ready() { while read -r _ l _ st _; do [ "$l" != "${l%:2328}" ] && [ "$st" = 0A ] && return 0; done < /proc/net/tcp6; return 1; }
until ready; do :; done
nc 127.0.0.1 9000 </dev/null
wait
`
	res := runSandboxSpec(t, nil, func(s *SupervisorSpec) {
		withTrail(log, filepath.Join(dir, "audit.jsonl"), 0, 0, 0)(s)
		// Every point at once: connect and bind share gVisor's socket
		// point, which the session must name only once.
		s.Trace.Points = []string{trace.PointExec, trace.PointConnect, trace.PointExit, trace.PointOpenWrite, trace.PointBind}
	}, "/bin/sh", "-c", script)
	must.Eq(t, 0, res.status.ExitCode, must.Sprint(res.stderr))
	recs := readTrail(t, log)
	checkSeq(t, recs)
	var opened []string
	for _, r := range byPoint(recs, trace.PointOpenWrite) {
		opened = append(opened, r.Path+" "+r.Flags+" "+r.Result)
	}
	must.SliceContains(t, opened, "/tmp/out O_WRONLY|O_CREAT|O_TRUNC ok")
	must.False(t, slices.ContainsFunc(opened, func(s string) bool { return strings.HasPrefix(s, "/etc/passwd") }), must.Sprint(opened))
	binds := byPoint(recs, trace.PointBind)
	must.Len(t, 1, binds, must.Sprint(recs))
	must.Eq(t, 9000, *binds[0].Port)
	must.Eq(t, "tcp", binds[0].Protocol)
	must.Eq(t, "ok", binds[0].Result)
	must.Eq(t, "nc", binds[0].Process)
}
