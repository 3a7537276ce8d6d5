package runtime

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
	"github.com/shoenig/test/must"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	if len(os.Args) > 2 && os.Args[1] == SupervisorArg {
		os.Exit(SupervisorMain(os.Args[2:]))
	}
	os.Exit(m.Run())
}

type sandboxRun struct {
	stdout, stderr string
	status         *ExitStatus
}

// runSandbox runs args in a fresh sandbox through the real supervisor and
// runsc, and removes everything it made.
func runSandbox(t *testing.T, mutate func(*BundleConfig), args ...string) sandboxRun {
	t.Helper()
	return runSandboxSpec(t, mutate, nil, args...)
}

// runSandboxSpec is runSandbox with a last say on the supervisor's spec.
func runSandboxSpec(t *testing.T, mutate func(*BundleConfig), mutateSpec func(*SupervisorSpec), args ...string) sandboxRun {
	t.Helper()
	tsb := newTestSandbox(t, mutate, args...)
	base, r, id, sup := tsb.base, tsb.runsc, tsb.spec.ID, tsb.sup
	stdout, stderr := filepath.Join(base, "stdout"), filepath.Join(base, "stderr")
	outCh, errCh := readFIFO(t, stdout), readFIFO(t, stderr)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	spec := tsb.spec
	spec.Stdout, spec.Stderr = stdout, stderr
	if mutateSpec != nil {
		mutateSpec(spec)
	}
	must.NoError(t, sup.Start(ctx, spec))
	st, err := sup.Wait(ctx)
	must.NoError(t, err)
	out, errb := recvFIFO(t, outCh), recvFIFO(t, errCh)
	exists, err := r.Exists(context.Background(), id)
	must.NoError(t, err)
	must.False(t, exists, must.Sprint("the supervisor must delete the container when it ends"))
	return sandboxRun{stdout: string(out), stderr: string(errb), status: st}
}

// testSandbox is a sandbox made ready to start: its bundle is written, and
// the supervisor, runsc's root and the container go at cleanup.
type testSandbox struct {
	base, stateDir string
	dirs           TaskDirs
	runsc          Runsc
	sup            *Supervisor
	spec           *SupervisorSpec
}

func newTestSandbox(t testing.TB, mutate func(*BundleConfig), args ...string) *testSandbox {
	t.Helper()
	testutil.RequireRoot(t)
	base := t.TempDir()
	cfg := busyboxBundle(t, base, "sandbox-test", args)
	dirs := cfg.Dirs
	stateDir := filepath.Join(base, "state")
	for _, d := range []string{stateDir, StateDir(stateDir).Bundle()} {
		must.NoError(t, os.MkdirAll(d, 0o755))
	}
	runscRoot := filepath.Join(base, "runsc-root")
	must.NoError(t, os.MkdirAll(runscRoot, 0o700))
	r := Runsc{Path: testutil.Runsc(t), Root: runscRoot, Platform: PlatformSystrap}
	id := "rt-" + strings.ReplaceAll(strings.ToLower(t.Name()), "/", "-")
	if mutate != nil {
		mutate(cfg)
	}
	must.NoError(t, WriteBundle(StateDir(stateDir).Bundle(), cfg))
	exe, err := os.Executable()
	must.NoError(t, err)
	sup := &Supervisor{Dir: stateDir, Exe: exe}
	t.Cleanup(func() {
		_ = r.Delete(context.Background(), id, DeleteOpts{Force: true})
		sup.Kill()
		must.NoError(t, r.ReleaseRoot())
	})
	spec := &SupervisorSpec{
		ID:      id,
		Runsc:   r,
		Run:     RunOpts{Bundle: StateDir(stateDir).Bundle(), Network: "none", Overlay: "none", LogFile: StateDir(stateDir).RunscLog()},
		LogRoot: base,
	}
	return &testSandbox{base: base, stateDir: stateDir, dirs: dirs, runsc: r, sup: sup, spec: spec}
}

func TestSandbox_ExitCodeAndStreams(t *testing.T) {
	res := runSandbox(t, nil, "/bin/sh", "-c", "echo to-out; echo to-err >&2; exit 3")
	must.Eq(t, 3, res.status.ExitCode)
	must.Eq(t, 0, res.status.Signal)
	must.Eq(t, "to-out\n", res.stdout)
	must.Eq(t, "to-err\n", res.stderr)
}

func TestSandbox_Hardening(t *testing.T) {
	script := `
if touch /rootfs-write 2>/dev/null; then echo ROOT_WRITABLE; fi
grep CapEff /proc/self/status
uname -a
grep NoNewPrivs /proc/self/status
for d in /alloc /local /secrets /tmp; do touch $d/probe 2>/dev/null && echo "$d writable"; done
`
	res := runSandbox(t, nil, "/bin/sh", "-c", script)
	must.Eq(t, 0, res.status.ExitCode, must.Sprint(res.stderr))
	must.StrNotContains(t, res.stdout, "ROOT_WRITABLE")
	must.StrContains(t, res.stdout, "CapEff:\t0000000000000000")
	must.StrContains(t, res.stdout, "NoNewPrivs:\t1")
	// gVisor's kernel names itself (4.19.0-gvisor here), never the host's.
	var host unix.Utsname
	must.NoError(t, unix.Uname(&host))
	must.StrContains(t, res.stdout, "-gvisor ")
	must.StrNotContains(t, res.stdout, unix.ByteSliceToString(host.Release[:]))
	for _, d := range []string{"/local", "/secrets", "/tmp"} {
		must.StrContains(t, res.stdout, d+" writable")
	}
	// The task's share of alloc/ is its data/ and tmp/ (see AllocDisk).
	must.StrNotContains(t, res.stdout, "/alloc writable")
}

func TestSandbox_PidsLimitContainsForkBomb(t *testing.T) {
	// A fork bomb, bounded so that a broken limit ends the test instead of
	// the machine (each level forks twice, at most 12 deep); then as many
	// sleeps as the limit lets start, counted with shell builtins only
	// (no fork is left to spare once they run).
	script := `
bomb() { [ "$1" -gt 12 ] && return; bomb $(($1+1)) & bomb $(($1+1)) & wait; }
( bomb 0 ) 2>/dev/null
echo "bomb done"
# Levels that could not fork exit and orphan their children; wait, with
# builtins only, until the shell is alone again.
n=0; while set -- /proc/[0-9]*; [ $# -gt 1 ] && [ $n -lt 200000 ]; do n=$((n+1)); done
( i=0; while [ $i -lt 200 ]; do sleep 30 & echo $! >> /tmp/pids; i=$((i+1)); echo $i > /tmp/count; done ) 2>/dev/null
read n < /tmp/count
echo "started $n"
while read p; do kill $p; done < /tmp/pids
`
	res := runSandbox(t, func(c *BundleConfig) { c.Resources.PidsLimit = 64 }, "/bin/sh", "-c", script)
	must.StrContains(t, res.stdout, "bomb done", must.Sprint(res.stdout, res.stderr, res.status))
	var started int
	i := strings.Index(res.stdout, "started ")
	must.Positive(t, i+1, must.Sprint(res.stdout, res.stderr, res.status))
	_, err := fmt.Sscanf(res.stdout[i:], "started %d", &started)
	must.NoError(t, err)
	must.Less(t, 64, started, must.Sprint("no more than pids_limit processes may run"))
	must.Greater(t, 30, started, must.Sprint("the limit must not stop ordinary forking"))
	must.Eq(t, 0, res.status.ExitCode, must.Sprint(res.stderr))
}
