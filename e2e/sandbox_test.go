//go:build e2e

package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/creack/pty"
	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"
	"golang.org/x/sys/unix"
)

// A batch task sees the gVisor kernel, a read-only root, no capabilities,
// writable task directories and the job's user; its stdout and stderr reach
// Nomad separately and the allocation completes.
func TestBatchTask(t *testing.T) {
	defer catchPanic(t)
	script := `
echo "KERNEL=$(uname -r)"
echo "SYSNAME=$(uname -s)"
dmesg 2>&1 | head -n 5 | sed 's/^/DMESG: /'
if touch /e2e-probe 2>/dev/null; then echo ROOT=writable; else echo ROOT=readonly; fi
grep CapEff /proc/self/status
for d in /alloc /alloc/data /alloc/tmp /local /secrets; do
  if echo probe > $d/e2e-probe; then echo "WRITE $d=ok"; else echo "WRITE $d=fail"; fi
done
echo "SECRETS_DIR=$NOMAD_SECRETS_DIR"
echo "UID=$(id -u)"
echo "stderr-marker" >&2
echo DONE
`
	spec := shellJob(t, "batch", script)
	spec.User = "app"
	j := runJob(t, spec)

	a, ts := j.waitDone(t)
	must.Eq(t, "complete", a.ClientStatus, must.Sprintf("task: %s", ts))
	must.False(t, ts.Failed, must.Sprintf("task: %s", ts))
	must.Eq(t, 0, exitCodeOf(t, ts))

	stdout := j.waitLogs(t, false, "DONE")
	stderr := j.waitLogs(t, true, "stderr-marker")
	t.Logf("stdout:\n%s", stdout)

	// The streams are kept apart.
	must.StrNotContains(t, stdout, "stderr-marker")
	must.StrNotContains(t, stderr, "KERNEL=")
	must.StrNotContains(t, stderr, "DONE")

	// gVisor's kernel, not the host's.
	var uts unix.Utsname
	must.NoError(t, unix.Uname(&uts))
	hostRelease := unix.ByteSliceToString(uts.Release[:])
	kernel := lineValue(t, stdout, "KERNEL=")
	must.NotEq(t, "", kernel)
	must.NotEq(t, hostRelease, kernel, must.Sprint("the task saw the host kernel's release"))
	must.Eq(t, "Linux", lineValue(t, stdout, "SYSNAME="))
	must.StrContains(t, stdout, "DMESG: ")
	must.StrContains(t, stdout, "gVisor", must.Sprint("dmesg does not show gVisor's boot messages"))

	// Read-only root: the write failed and nothing reached the host.
	must.StrContains(t, stdout, "ROOT=readonly\n")
	_, err := os.Lstat(filepath.Join(suite.rootfs, "e2e-probe"))
	must.True(t, os.IsNotExist(err), must.Sprint("the task wrote into the host rootfs"))

	// No capabilities.
	must.StrContains(t, stdout, "CapEff:\t0000000000000000\n")

	// Task directories are writable and are Nomad's; /alloc itself is
	// not (only its data/ and tmp/, which the allocation's disk bounds).
	for _, d := range []string{"/alloc/data", "/alloc/tmp", "/local", "/secrets"} {
		must.StrContains(t, stdout, "WRITE "+d+"=ok\n")
	}
	must.StrContains(t, stdout, "WRITE /alloc=fail\n")
	_, err = os.Lstat(filepath.Join(j.allocDir(), "alloc", "e2e-probe"))
	must.True(t, os.IsNotExist(err), must.Sprint("the task wrote at the top of the host's alloc/"))
	for _, p := range []string{
		filepath.Join(j.allocDir(), "alloc", "data", "e2e-probe"),
		filepath.Join(j.allocDir(), "alloc", "tmp", "e2e-probe"),
		filepath.Join(j.allocDir(), spec.Task, "local", "e2e-probe"),
		filepath.Join(j.allocDir(), spec.Task, "secrets", "e2e-probe"),
	} {
		b, err := os.ReadFile(p)
		must.NoError(t, err, must.Sprintf("the task's write did not reach %s", p))
		must.Eq(t, "probe\n", string(b))
	}
	must.Eq(t, "/secrets", lineValue(t, stdout, "SECRETS_DIR="))

	// The task's user.
	must.Eq(t, "1000", lineValue(t, stdout, "UID="))
}

// A task that exits 3 fails its allocation, and Nomad records exit code 3.
func TestExitCodeFailsAllocation(t *testing.T) {
	defer catchPanic(t)
	j := runJob(t, shellJob(t, "batch", "echo about to fail; exit 3"))
	a, ts := j.waitDone(t)
	must.Eq(t, "failed", a.ClientStatus, must.Sprintf("task: %s", ts))
	must.True(t, ts.Failed, must.Sprintf("task: %s", ts))
	must.Eq(t, 3, exitCodeOf(t, ts), must.Sprintf("task: %s", ts))
	must.StrContains(t, j.waitLogs(t, false, "about to fail"), "about to fail")
}

// A task that writes nothing is reported finished as promptly as one that
// writes: Nomad's log collector opens both output FIFOs for reading and, when
// the task ends, waits (2s per step) for a writer that never opened one.
func TestQuietTaskEndsPromptly(t *testing.T) {
	defer catchPanic(t)
	j := runJob(t, shellJob(t, "batch", "exit 0"))
	var seen time.Time
	a := j.waitAlloc(t, 90*time.Second, "allocation finished", func(a *allocation) error {
		if !allocDone(a) {
			return fmt.Errorf("client status %s", a.ClientStatus)
		}
		seen = time.Now()
		return nil
	})
	ts := a.TaskStates[j.spec.Task]
	must.Eq(t, "complete", a.ClientStatus, must.Sprintf("task: %s", ts))
	term := ts.events("Terminated")
	must.Len(t, 1, term, must.Sprintf("task: %s", ts))
	lag := seen.Sub(time.Unix(0, term[0].Time))
	t.Logf("allocation reported complete %s after the task exited", lag.Round(time.Millisecond))
	must.Less(t, 2500*time.Millisecond, lag, must.Sprintf(
		"the allocation was reported complete %s after its task exited; agent log lines for it:\n%s",
		lag, suite.agentLogLines(j.allocID, "logmon")))
}

// `nomad job stop` sends the job's kill_signal, and a task that handles it
// ends cleanly.
func TestKillSignal(t *testing.T) {
	defer catchPanic(t)
	script := `
trap 'echo got SIGINT; exit 0' INT
trap 'echo got SIGTERM; exit 9' TERM
echo ready
while :; do sleep 1; done
`
	spec := shellJob(t, "service", script)
	spec.KillSignal = "SIGINT"
	spec.KillTimeout = "30s"
	j := runJob(t, spec)
	j.waitRunning(t)
	j.waitLogs(t, false, "ready")

	start := time.Now()
	res := nomadCLI(t, 2*time.Minute, "", "job", "stop", "-detach", spec.Name)
	must.Eq(t, 0, res.Code, must.Sprintf("nomad job stop: %s", res))
	a, ts := j.waitDone(t)
	took := time.Since(start)

	out := j.waitLogs(t, false, "got SIGINT")
	must.StrNotContains(t, out, "got SIGTERM")
	must.Eq(t, "complete", a.ClientStatus, must.Sprintf("task: %s", ts))
	term := ts.events("Terminated")
	must.Len(t, 1, term, must.Sprintf("task: %s", ts))
	must.Eq(t, 0, term[0].ExitCode, must.Sprintf("task: %s", ts))
	must.Eq(t, 0, term[0].Signal, must.Sprintf("task: %s", ts))
	// Not killed after the 30s kill_timeout.
	must.Less(t, 25*time.Second, took, must.Sprint("the task ended only after kill_timeout"))
}

// waitForMarker is a task that runs until /alloc/data/go exists, then exits 4.
const waitForMarker = `
echo started
while [ ! -e /alloc/data/go ]; do sleep 0.2; done
echo finishing
exit 4
`

// A task survives a SIGKILL of the plugin: Nomad starts the plugin again,
// which recovers the task, and the task's own exit code is reported later.
func TestPluginKilled(t *testing.T) {
	defer catchPanic(t)
	j := runJob(t, shellJob(t, "batch", waitForMarker))
	j.waitRunning(t)
	j.waitLogs(t, false, "started")

	sup := supervisorOf(t, j)
	plugins := suite.pluginProcs()
	must.Len(t, 1, plugins, must.Sprintf("plugin processes: %v", plugins))
	old := plugins[0].pid
	t.Logf("killing plugin %d; task supervisor %d", old, sup)
	must.NoError(t, syscall.Kill(old, syscall.SIGKILL))

	must.Wait(t, wait.InitialSuccess(
		wait.ErrorFunc(func() error {
			ps := suite.pluginProcs()
			if len(ps) != 1 || ps[0].pid == old {
				return fmt.Errorf("plugin processes: %v", ps)
			}
			return nil
		}),
		wait.Timeout(60*time.Second),
		wait.Gap(200*time.Millisecond),
	), must.Sprint("Nomad did not start the plugin again"))

	// The task went on: same supervisor and sandbox, no restart.
	j.checkStillRunning(t, sup)

	// The new plugin knows the task: exec reaches it.
	j.waitExec(t, "recovered")
	res := nomadCLI(t, time.Minute, "", "alloc", "exec", "-i=false", "-t=false", j.allocID, "/bin/touch", "/alloc/data/go")
	must.Eq(t, 0, res.Code, must.Sprintf("exec touch: %s", res))

	j.checkExit4(t)
}

// A task survives a restart of the whole agent (graceful, and a crash), and
// its exit code is reported after the restart.
func TestAgentRestart(t *testing.T) {
	defer catchPanic(t)
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGKILL} {
		t.Run(unix.SignalName(sig), func(t *testing.T) {
			defer catchPanic(t)
			j := runJob(t, shellJob(t, "batch", waitForMarker))
			j.waitRunning(t)
			j.waitLogs(t, false, "started")
			sup := supervisorOf(t, j)

			start := time.Now()
			must.NoError(t, suite.restartAgent(sig))
			t.Logf("agent restarted after %s in %s", unix.SignalName(sig), time.Since(start).Round(time.Millisecond))

			j.checkStillRunning(t, sup)
			j.waitExec(t, "recovered")

			// The marker is created from the host, in the alloc dir.
			marker := filepath.Join(j.allocDir(), "alloc", "data", "go")
			must.NoError(t, os.WriteFile(marker, nil, 0o644))
			j.checkExit4(t)
		})
	}
}

// supervisorOf returns the PID of the job's one supervisor process.
func supervisorOf(t *testing.T, j *runningJob) int {
	t.Helper()
	var pids []int
	for _, p := range suite.supervisors() {
		if strings.HasPrefix(filepath.Base(p.argv[2]), j.sandboxPrefix()) {
			pids = append(pids, p.pid)
		}
	}
	must.Len(t, 1, pids, must.Sprintf("supervisors for %s", j.sandboxPrefix()))
	return pids[0]
}

// checkStillRunning asserts that the task runs in its first sandbox, under
// the same supervisor, and was never restarted.
func (j *runningJob) checkStillRunning(t *testing.T, sup int) {
	t.Helper()
	a := j.waitRunning(t)
	ts := a.TaskStates[j.spec.Task]
	must.Eq(t, "running", a.ClientStatus)
	must.Eq(t, uint64(0), ts.Restarts, must.Sprintf("task: %s", ts))
	must.Len(t, 1, ts.events("Started"), must.Sprintf("task: %s", ts))
	must.Len(t, 0, ts.events("Terminated"), must.Sprintf("task: %s", ts))
	must.Eq(t, sup, supervisorOf(t, j), must.Sprint("the supervisor changed"))
	ids, err := suite.runscList()
	must.NoError(t, err)
	var found []string
	for _, id := range ids {
		if strings.HasPrefix(id, j.sandboxPrefix()) {
			found = append(found, id)
		}
	}
	must.Len(t, 1, found, must.Sprintf("runsc sandboxes: %v", ids))
}

// waitExec waits until `nomad alloc exec` reaches the task (the driver has
// recovered it).
func (j *runningJob) waitExec(t *testing.T, word string) {
	t.Helper()
	var last cliResult
	must.Wait(t, wait.InitialSuccess(
		wait.BoolFunc(func() bool {
			last = nomadCLI(t, time.Minute, "", "alloc", "exec", "-i=false", "-t=false", j.allocID, "/bin/echo", word)
			return last.Code == 0 && strings.TrimSpace(last.Stdout) == word
		}),
		wait.Timeout(60*time.Second),
		wait.Gap(500*time.Millisecond),
	), must.Func(func() string { return fmt.Sprintf("exec never reached the task: %s", last) }))
}

// checkExit4 waits for the marker task to end and checks that it ended once,
// by itself, with exit code 4.
func (j *runningJob) checkExit4(t *testing.T) {
	t.Helper()
	a, ts := j.waitDone(t)
	must.Eq(t, "failed", a.ClientStatus, must.Sprintf("task: %s", ts))
	must.Eq(t, 4, exitCodeOf(t, ts), must.Sprintf("task: %s", ts))
	must.Eq(t, uint64(0), ts.Restarts, must.Sprintf("task: %s", ts))
	must.Len(t, 1, ts.events("Started"), must.Sprintf("task: %s", ts))
	must.StrContains(t, j.waitLogs(t, false, "finishing"), "started\n")
}

// A task config the driver must refuse fails the allocation with an event
// that names the problem, and leaves no sandbox or state behind.
func TestBadTaskConfig(t *testing.T) {
	defer catchPanic(t)
	cases := []struct {
		name   string
		modify func(*jobSpec)
		want   []string
	}{
		{
			name:   "unknown field",
			modify: func(s *jobSpec) { s.ExtraConfig = []string{`bogus_field = "x"`} },
			want:   []string{"bogus_field"},
		},
		{
			name:   "capability not allowed",
			modify: func(s *jobSpec) { s.ExtraConfig = []string{`cap_add = ["NET_ADMIN"]`} },
			want:   []string{"NET_ADMIN", "allow_caps"},
		},
		{
			name:   "missing rootfs",
			modify: func(s *jobSpec) { s.Rootfs = "" },
			want:   []string{"rootfs"},
		},
		{
			name:   "rootfs outside allow_host_rootfs",
			modify: func(s *jobSpec) { s.Rootfs = "/usr" },
			want:   []string{`"/usr"`, "allow_host_rootfs"},
		},
		{
			name:   "rootfs does not exist",
			modify: func(s *jobSpec) { s.Rootfs = filepath.Join(suite.rootfsDir, "no-such-rootfs") },
			want:   []string{"no-such-rootfs", "no such file or directory"},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			defer catchPanic(t)
			t.Parallel()
			spec := shellJob(t, "batch", "echo should not run")
			tc.modify(spec)
			j := runJob(t, spec)
			a, ts := j.waitDone(t)
			must.Eq(t, "failed", a.ClientStatus, must.Sprintf("task: %s", ts))
			must.Len(t, 0, ts.events("Started"), must.Sprintf("task: %s", ts))

			var texts []string
			for _, e := range ts.Events {
				texts = append(texts, e.text())
			}
			all := strings.Join(texts, "\n")
			t.Logf("events:\n%s", all)
			var named bool
			for _, e := range ts.Events {
				ok := true
				for _, w := range tc.want {
					ok = ok && strings.Contains(e.text(), w)
				}
				named = named || ok
			}
			must.True(t, named, must.Sprintf("no event names the problem (%q); events:\n%s", tc.want, all))

			// Nothing was created for it, or it was all removed.
			must.SliceEmpty(t, suite.leftovers(j.sandboxPrefix()))
		})
	}
}

// `nomad alloc exec` runs a command in the task's sandbox with the task's
// user and no capabilities, passes stdin, stdout, stderr and the exit code,
// and can give the command a terminal.
func TestAllocExec(t *testing.T) {
	defer catchPanic(t)
	spec := shellJob(t, "service", "echo ready; while :; do sleep 1; done")
	spec.User = "app"
	j := runJob(t, spec)
	j.waitRunning(t)
	j.waitLogs(t, false, "ready")
	exec := func(stdin string, args ...string) cliResult {
		return nomadCLI(t, time.Minute, stdin, append([]string{"alloc", "exec"}, args...)...)
	}

	t.Run("no tty", func(t *testing.T) {
		defer catchPanic(t)
		res := exec("", "-i=false", "-t=false", j.allocID, "/bin/cat", "/proc/self/status")
		must.Eq(t, 0, res.Code, must.Sprint(res))
		must.StrContains(t, res.Stdout, "Name:\tcat\n")
		must.StrContains(t, res.Stdout, "CapEff:\t0000000000000000\n")
		must.RegexMatch(t, regexpMust(`(?m)^Uid:\s+1000\s`), res.Stdout)
	})

	t.Run("exit code and stderr", func(t *testing.T) {
		defer catchPanic(t)
		res := exec("", "-i=false", "-t=false", j.allocID, "/bin/sh", "-c", "echo to-out; echo to-err >&2; exit 7")
		must.Eq(t, 7, res.Code, must.Sprint(res))
		must.StrContains(t, res.Stdout, "to-out")
		must.StrNotContains(t, res.Stdout, "to-err")
		must.StrContains(t, res.Stderr, "to-err")
	})

	t.Run("stdin", func(t *testing.T) {
		defer catchPanic(t)
		res := exec("line one\nline two\n", "-i=true", "-t=false", j.allocID, "/bin/cat")
		must.Eq(t, 0, res.Code, must.Sprint(res))
		must.Eq(t, "line one\nline two\n", res.Stdout)
	})

	t.Run("tty", func(t *testing.T) {
		defer catchPanic(t)
		testExecTTY(t, j)
	})
}

// testExecTTY runs `nomad alloc exec -t` on a terminal of the test's own,
// as an interactive user would: the command gets a terminal with the
// user's window size, which follows resizes, and its exit code comes back.
func testExecTTY(t *testing.T, j *runningJob) {
	script := `test -t 0 && echo STDIN-IS-TTY
test -t 1 && echo STDOUT-IS-TTY
echo "TTYNAME=$(tty)"
echo TERM=$TERM
echo "SIZE=$(stty size)"
while read line; do
  [ "$line" = quit ] && break
  echo "SIZE=$(stty size)"
done
exit 5
`
	cmd := exec.Command(suite.nomadBin, "alloc", "exec", "-i=true", "-t=true", j.allocID, "/bin/sh", "-c", script)
	cmd.Env = cleanEnv()
	ptmx, err := pty.StartWithSize(cmd, &pty.Winsize{Rows: 33, Cols: 111})
	must.NoError(t, err)
	defer ptmx.Close()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})
	out := &syncBuffer{}
	go func() { _, _ = io.Copy(out, ptmx) }()

	firstSize := regexp.MustCompile(`SIZE=.*\n`)
	must.Wait(t, wait.InitialSuccess(
		wait.BoolFunc(func() bool { return firstSize.MatchString(out.String()) }),
		wait.Timeout(30*time.Second),
		wait.Gap(100*time.Millisecond),
	), must.Func(func() string {
		return fmt.Sprintf("the command's output never arrived; the terminal shows %q", out.String())
	}))
	first := out.String()
	must.StrContains(t, first, "STDIN-IS-TTY")
	must.StrContains(t, first, "STDOUT-IS-TTY")
	must.StrContains(t, first, "TERM=xterm")
	must.StrContains(t, first, "SIZE=33 111\r\n", must.Sprintf("the sandbox's terminal does not have the user's size; output %q", first))
	// gVisor hands an exec'd process the host terminal's descriptor: it is
	// a terminal, but has no /dev/pts name inside the sandbox.
	t.Logf("tty(1) in the sandbox: %q", lineValue(t, strings.ReplaceAll(first, "\r", ""), "TTYNAME="))

	// A resize reaches the command.
	must.NoError(t, pty.Setsize(ptmx, &pty.Winsize{Rows: 44, Cols: 120}))
	must.Wait(t, wait.InitialSuccess(
		wait.BoolFunc(func() bool {
			_, _ = ptmx.Write([]byte("\n"))
			return strings.Contains(out.String(), "SIZE=44 120")
		}),
		wait.Timeout(30*time.Second),
		wait.Gap(500*time.Millisecond),
	), must.Func(func() string { return fmt.Sprintf("the resize never reached the sandbox; output %q", out.String()) }))

	_, err = ptmx.Write([]byte("quit\n"))
	must.NoError(t, err)
	select {
	case err = <-exited:
	case <-time.After(30 * time.Second):
		t.Fatalf("nomad alloc exec -t did not end; output %q", out.String())
	}
	exited <- err // for the cleanup
	var ee *exec.ExitError
	must.True(t, errors.As(err, &ee), must.Sprintf("exit: %v; output %q", err, out.String()))
	must.Eq(t, 5, ee.ExitCode(), must.Sprintf("output %q", out.String()))
}

// syncBuffer is a bytes.Buffer safe for one writer and concurrent readers.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// lineValue returns what follows prefix on the first line that starts with it.
func lineValue(t *testing.T, out, prefix string) string {
	t.Helper()
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, prefix) {
			return strings.TrimSpace(strings.TrimPrefix(l, prefix))
		}
	}
	t.Fatalf("no line starting with %q in:\n%s", prefix, out)
	return ""
}

func regexpMust(expr string) *regexp.Regexp { return regexp.MustCompile(expr) }
