package driver

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/netpolicy"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

// The fault matrix of issue 18: a victim killed with SIGKILL at a moment of
// a task's life, through real runsc. "Nomad" is the test: it holds the
// handles StartTask returned, and a plugin that dies is replaced by the
// test's in-process driver (empty task store), as Nomad restarts a plugin.
// A plugin that must die mid-call runs as a child process (this test binary,
// crashChildArg) and is killed for real, by its crash hook or by the test.
// Every cell then checks that nothing of the task is left: state directory,
// runsc state, cgroups in every hierarchy, supervisor and runsc processes,
// network namespace, veth, nft objects, DNS listener and lease.
//
// | victims            | moment                                   | expected outcome                                              |
// |--------------------|------------------------------------------|---------------------------------------------------------------|
// | plugin             | StartTask, before the sandbox runs       | no handle; kept while Nomad may recover, swept after the grace |
// | plugin             | StartTask, sandbox runs, no handle yet   | same; the running sandbox and its supervisor are killed       |
// | supervisor         | task running                             | failure "supervisor was killed ... exit code lost" + event; sandbox stopped |
// | plugin+supervisor  | task running (egress network)            | RecoverTask works; the same failure and event                 |
// | runsc sandbox      | task running                             | exit 137, signal 9 (true: the sandbox was killed)             |
// | runsc gofer        | task running                             | the task ends (sandbox exits with its gofer); exit reported   |
// | plugin             | StopTask, after SIGTERM, before SIGKILL  | recovered; StopTask again escalates: signal 9                 |
// | plugin             | task exited, Nomad has not read the exit | recovered with the true exit code 7; no secret left on disk   |
// | plugin             | forced DestroyTask, half-way (egress)    | secrets already gone; the rest swept once the allocation goes |
//
// The agent's part (agent+plugin+supervisors killed at once, the agent
// restarted) is e2e/crash_test.go.

const crashChildArg = "crash-plugin"

// crashChild is what a child plugin process is told to do.
type crashChild struct {
	Plugin     PluginConfig
	Supervisor string
	NetPrefix  string
	NetTable   string
	Task       *drivers.TaskConfig
	Driver     TaskConfig
	// CrashAt is the crash point (Driver.crashHook) where the child
	// kills itself.
	CrashAt string
	// Then, once started: "stop" (StopTask with a long timeout), "destroy"
	// (a forced DestroyTask), or "" (nothing). The
	// child never exits by itself: it is killed.
	Then string
}

// crashChildMain is the child plugin: it starts the task, prints the handle
// as one JSON line, does Then and waits to be killed.
func crashChildMain(path string) int {
	fail := func(err error) int {
		fmt.Printf("error: %v\n", err)
		return 1
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return fail(err)
	}
	var c crashChild
	if err := json.Unmarshal(b, &c); err != nil {
		return fail(err)
	}
	d := New(hclog.New(&hclog.LoggerOptions{Name: "crash-child", Level: hclog.Debug, Output: os.Stderr}))
	d.SetSupervisorExe(c.Supervisor)
	d.netPrefix, d.netTable = c.NetPrefix, c.NetTable
	d.crashHook = func(point string) {
		if point == c.CrashAt {
			_ = unix.Kill(os.Getpid(), unix.SIGKILL)
			select {}
		}
	}
	var raw []byte
	if err := base.MsgPackEncode(&raw, &c.Plugin); err != nil {
		return fail(err)
	}
	if err := d.SetConfig(&base.Config{PluginConfig: raw}); err != nil {
		return fail(err)
	}
	if err := c.Task.EncodeConcreteDriverConfig(&c.Driver); err != nil {
		return fail(err)
	}
	h, _, err := d.StartTask(c.Task)
	if err != nil {
		return fail(err)
	}
	out, err := json.Marshal(h)
	if err != nil {
		return fail(err)
	}
	fmt.Printf("%s\n", out)
	switch c.Then {
	case "stop":
		_ = d.StopTask(c.Task.ID, time.Hour, "SIGTERM")
	case "destroy":
		_ = d.DestroyTask(c.Task.ID, true)
	}
	select {}
}

// child is a running child plugin.
type child struct {
	cmd    *exec.Cmd
	lines  chan string
	exited chan struct{}
}

// startChild runs a child plugin for cfg. It is killed when the test ends.
func (e *testEnv) startChild(t *testing.T, cfg *drivers.TaskConfig, tc TaskConfig, crashAt, then string) *child {
	t.Helper()
	spec := crashChild{Plugin: e.config, Supervisor: e.supervisorExe, NetPrefix: e.netPrefix, NetTable: "nsbx_test_" + e.netPrefix,
		Task: cfg, Driver: tc, CrashAt: crashAt, Then: then}
	b, err := json.Marshal(&spec)
	must.NoError(t, err)
	path := filepath.Join(t.TempDir(), "child.json")
	must.NoError(t, os.WriteFile(path, b, 0o600))
	cmd := exec.Command(e.supervisorExe, crashChildArg, path)
	cmd.Stderr = testWriter{t}
	stdout, err := cmd.StdoutPipe()
	must.NoError(t, err)
	must.NoError(t, cmd.Start())
	c := &child{cmd: cmd, lines: make(chan string, 4), exited: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
		_ = cmd.Wait()
		close(c.exited)
	}()
	t.Cleanup(func() { c.kill(t) })
	return c
}

// handle waits for the handle the child's StartTask returned.
func (c *child) handle(t *testing.T) *drivers.TaskHandle {
	t.Helper()
	select {
	case line := <-c.lines:
		var h drivers.TaskHandle
		must.NoError(t, json.Unmarshal([]byte(line), &h), must.Sprintf("child said %q", line))
		return &h
	case <-c.exited:
		t.Fatal("the child plugin died before StartTask returned")
	case <-time.After(60 * time.Second):
		t.Fatal("the child plugin's StartTask did not return")
	}
	return nil
}

// died waits for the child to have killed itself, and checks that Nomad
// never got a handle.
func (c *child) died(t *testing.T) {
	t.Helper()
	select {
	case <-c.exited:
	case <-time.After(60 * time.Second):
		t.Fatal("the child plugin did not crash")
	}
	select {
	case line := <-c.lines:
		t.Fatalf("StartTask returned before the crash: %q", line)
	default:
	}
	ws, ok := c.cmd.ProcessState.Sys().(syscall.WaitStatus)
	must.True(t, ok && ws.Signaled() && ws.Signal() == unix.SIGKILL, must.Sprintf("child ended with %v, not SIGKILL", c.cmd.ProcessState))
}

func (c *child) kill(t *testing.T) {
	_ = c.cmd.Process.Signal(unix.SIGKILL)
	select {
	case <-c.exited:
	case <-time.After(30 * time.Second):
		t.Error("child plugin did not end after SIGKILL")
	}
}

// traces is what a task leaves on the host, found before the crash so that
// its absence can be checked after.
type traces struct {
	id, stateDir string
	net          *netpolicy.Network
}

func (e *testEnv) tracesOf(t *testing.T, cfg *drivers.TaskConfig, egress bool) traces {
	t.Helper()
	id := sandboxID(cfg)
	tr := traces{id: id, stateDir: filepath.Join(e.config.StateDir, id)}
	if egress {
		sb, err := e.driver.net.Get(id)
		must.NoError(t, err, must.Sprint("the sandbox's network must exist before the crash"))
		tr.net = sb
	}
	return tr
}

// leftOf lists what of the task is still on the host.
func (e *testEnv) leftOf(tr traces) []string {
	var left []string
	if _, err := os.Lstat(tr.stateDir); err == nil {
		left = append(left, "state directory "+tr.stateDir)
	}
	if ok, err := e.driver.runsc.Exists(context.Background(), tr.id); err != nil || ok {
		left = append(left, fmt.Sprintf("runsc container (exists %v, error %v)", ok, err))
	}
	if dirs, _ := filepath.Glob(filepath.Join(runtime.CgroupRoot, "*", "nomad-sandbox", tr.id)); len(dirs) > 0 {
		left = append(left, fmt.Sprintf("cgroups %v", dirs))
	}
	root := filepath.Clean(e.config.RunscRoot)
	for _, p := range runtime.Processes(func(args []string) bool {
		return runtime.SupervisorOf(args) == tr.stateDir || runtime.ContainerOf(root, args) == tr.id
	}) {
		left = append(left, fmt.Sprintf("process %d %v", p.Pid, p.Args))
	}
	if mounts, _ := runtime.MountsUnder(tr.stateDir); len(mounts) > 0 {
		left = append(left, fmt.Sprintf("mounts %v", mounts))
	}
	if sb := tr.net; sb != nil {
		if _, err := e.driver.net.Get(tr.id); !errors.Is(err, netpolicy.ErrNotFound) {
			left = append(left, fmt.Sprintf("network lease (%v)", err))
		}
		if _, err := os.Lstat(sb.Netns); err == nil {
			left = append(left, "netns "+sb.Netns)
		}
		if _, err := netlink.LinkByName(sb.HostIf); err == nil {
			left = append(left, "veth "+sb.HostIf)
		}
		if out, err := exec.Command("nft", "list", "ruleset").CombinedOutput(); err != nil || strings.Contains(string(out), sb.HostIf) ||
			strings.Contains(string(out), strings.TrimPrefix(sb.HostIf, e.netPrefix)) {
			left = append(left, "nft objects of "+sb.HostIf)
		}
		if udpListening(sb.Gateway, 53) {
			left = append(left, "DNS listener on "+sb.Gateway.String())
		}
	}
	return left
}

// udpListening reports whether a UDP socket is bound to addr:port.
func udpListening(addr netip.Addr, port int) bool {
	b, err := os.ReadFile("/proc/net/udp")
	if err != nil || !addr.Is4() {
		return false
	}
	a4 := addr.As4()
	want := fmt.Sprintf("%08X:%04X", binary.LittleEndian.Uint32(a4[:]), port)
	for _, line := range strings.Split(string(b), "\n")[1:] {
		if f := strings.Fields(line); len(f) > 1 && f[1] == want {
			return true
		}
	}
	return false
}

func (e *testEnv) assertGone(t *testing.T, tr traces) {
	t.Helper()
	must.Eq(t, []string(nil), e.leftOf(tr), must.Sprint("left behind by the task"))
}

// assertKept checks that a task Nomad may still have was not touched.
func (e *testEnv) assertKept(t *testing.T, tr traces, running bool) {
	t.Helper()
	_, err := os.Stat(runtime.StateDir(tr.stateDir).TaskMeta())
	must.NoError(t, err, must.Sprint("the sweep removed a state directory during the recovery grace"))
	if running {
		ok, err := e.driver.runsc.Exists(context.Background(), tr.id)
		must.NoError(t, err)
		must.True(t, ok, must.Sprint("the sweep removed a running sandbox during the recovery grace"))
	}
}

// waitStopped waits until runsc no longer knows the sandbox: a task
// reported ended must not run on.
func (e *testEnv) waitStopped(t *testing.T, tr traces) {
	t.Helper()
	must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool {
		ok, err := e.driver.runsc.Exists(context.Background(), tr.id)
		return err == nil && !ok
	}), wait.Timeout(15*time.Second), wait.Gap(50*time.Millisecond)), must.Sprint("the sandbox still runs after its task was reported ended"))
}

func pidIn(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	must.NoError(t, err)
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	must.NoError(t, err)
	return pid
}

func killPid(t *testing.T, pid int) {
	t.Helper()
	must.NoError(t, unix.Kill(pid, unix.SIGKILL))
}

// gcAlloc does what Nomad's garbage collection of an allocation does to its
// directory.
func gcAlloc(t *testing.T, cfg *drivers.TaskConfig) {
	t.Helper()
	unmountUnder(t, cfg.AllocDir)
	must.NoError(t, os.RemoveAll(cfg.AllocDir))
}

func TestDriver_CrashMatrix(t *testing.T) {
	const (
		running   = `trap 'echo got-term' TERM; echo ready; while :; do sleep 0.05; done`
		exitLater = `echo ready; while [ ! -e /alloc/data/go ]; do sleep 0.05; done; exit 7`
	)
	secretEnv := map[string]string{"CRASH_SECRET": "s3cr3t-value-42"}
	egress := func(pc *PluginConfig) { pc.AllowedEgress = []string{"203.0.113.0/24"} }

	cells := []struct {
		name    string
		egress  bool
		script  string
		crashAt string // a child plugin that crashes in StartTask
		then    string // what a child plugin does after StartTask
		child   bool   // the task is started by a child plugin
		run     func(t *testing.T, e *testEnv, cfg *drivers.TaskConfig, tr traces, h *drivers.TaskHandle, ch *child)
	}{
		{
			name: "plugin during StartTask before the sandbox runs", script: running, crashAt: crashBeforeRun,
			run: func(t *testing.T, e *testEnv, cfg *drivers.TaskConfig, tr traces, _ *drivers.TaskHandle, ch *child) {
				e.driver.sweep(context.Background(), false)
				e.assertKept(t, tr, false)
				e.driver.sweep(context.Background(), true)
			},
		},
		{
			name: "plugin during StartTask after the sandbox runs", script: running, crashAt: crashBeforeHandle, egress: true,
			run: func(t *testing.T, e *testEnv, cfg *drivers.TaskConfig, tr traces, _ *drivers.TaskHandle, ch *child) {
				waitLog(t, cfg, "stdout", has("ready"))
				e.driver.sweep(context.Background(), false)
				e.assertKept(t, tr, true)
				e.driver.sweep(context.Background(), true)
			},
		},
		{
			name: "supervisor while the task runs", script: running,
			run: func(t *testing.T, e *testEnv, cfg *drivers.TaskConfig, tr traces, _ *drivers.TaskHandle, ch *child) {
				evs := e.events(t, cfg.ID)
				killPid(t, pidIn(t, runtime.StateDir(tr.stateDir).SupervisorPid()))
				res := e.wait(cfg.ID, 30*time.Second)
				// Through the plugin's gRPC the error is its text.
				must.ErrorContains(t, res.Err, runtime.ErrSupervisorLost.Error())
				must.False(t, res.Successful())
				evs.waitFor(t, "Sandbox lost")
				e.waitStopped(t, tr)
				must.NoError(t, e.driver.DestroyTask(cfg.ID, true))
			},
		},
		{
			name: "plugin and supervisor while the task runs", script: running, child: true, egress: true,
			run: func(t *testing.T, e *testEnv, cfg *drivers.TaskConfig, tr traces, h *drivers.TaskHandle, ch *child) {
				killPid(t, pidIn(t, runtime.StateDir(tr.stateDir).SupervisorPid()))
				evs := e.events(t, cfg.ID)
				must.NoError(t, e.driver.RecoverTask(h))
				res := e.wait(cfg.ID, 30*time.Second)
				must.ErrorContains(t, res.Err, runtime.ErrSupervisorLost.Error())
				evs.waitFor(t, "Sandbox lost")
				e.waitStopped(t, tr)
				must.NoError(t, e.driver.DestroyTask(cfg.ID, true))
			},
		},
		{
			name: "runsc sandbox process while the task runs", script: running,
			run: func(t *testing.T, e *testEnv, cfg *drivers.TaskConfig, tr traces, _ *drivers.TaskHandle, ch *child) {
				killPid(t, pidIn(t, runtime.StateDir(tr.stateDir).SandboxPid()))
				res := e.wait(cfg.ID, 30*time.Second)
				must.Eq(t, 9, res.Signal)
				must.Eq(t, 137, res.ExitCode)
				must.NoError(t, e.driver.DestroyTask(cfg.ID, true))
			},
		},
		{
			name: "runsc gofer while the task runs", script: running,
			run: func(t *testing.T, e *testEnv, cfg *drivers.TaskConfig, tr traces, _ *drivers.TaskHandle, ch *child) {
				root := filepath.Clean(e.config.RunscRoot)
				gofers := runtime.Processes(func(args []string) bool {
					return args[0] == "runsc-gofer" && runtime.ContainerOf(root, args) == tr.id
				})
				must.SliceLen(t, 1, gofers)
				killPid(t, gofers[0].Pid)
				res := e.wait(cfg.ID, 30*time.Second)
				// The sandbox cannot go on without its gofer: it is
				// killed, and the task ends as killed.
				must.Eq(t, 9, res.Signal)
				must.Eq(t, 137, res.ExitCode)
				must.NoError(t, e.driver.DestroyTask(cfg.ID, true))
			},
		},
		{
			name: "plugin during StopTask before SIGKILL", script: running, child: true, then: "stop",
			run: func(t *testing.T, e *testEnv, cfg *drivers.TaskConfig, tr traces, h *drivers.TaskHandle, ch *child) {
				// The child's StopTask has sent SIGTERM, which the task
				// ignores; the plugin dies while it waits to escalate.
				waitLog(t, cfg, "stdout", has("got-term"))
				must.NoError(t, e.driver.RecoverTask(h))
				must.NoError(t, e.driver.StopTask(cfg.ID, 100*time.Millisecond, "SIGTERM"))
				res := e.wait(cfg.ID, 30*time.Second)
				must.Eq(t, 9, res.Signal)
				must.NoError(t, e.driver.DestroyTask(cfg.ID, true))
			},
		},
		{
			name: "plugin after the task exited, before Nomad read the exit", script: exitLater, child: true,
			run: func(t *testing.T, e *testEnv, cfg *drivers.TaskConfig, tr traces, h *drivers.TaskHandle, ch *child) {
				must.NoError(t, os.WriteFile(filepath.Join(cfg.TaskDir().SharedAllocDir, "data", "go"), nil, 0o644))
				sup := &runtime.Supervisor{Dir: tr.stateDir}
				must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool {
					s, err := sup.ExitStatus()
					return err == nil && s != nil
				}), wait.Timeout(30*time.Second), wait.Gap(20*time.Millisecond)))
				assertNoSecret(t, tr.stateDir, secretEnv["CRASH_SECRET"])
				assertNoSecret(t, e.config.RunscRoot, secretEnv["CRASH_SECRET"])
				e.driver.sweep(context.Background(), false)
				must.NoError(t, e.driver.RecoverTask(h))
				res := e.wait(cfg.ID, 30*time.Second)
				must.Eq(t, 7, res.ExitCode)
				must.NoError(t, e.driver.DestroyTask(cfg.ID, true))
			},
		},
		{
			name: "plugin during DestroyTask", script: running, child: true, then: "destroy", egress: true,
			crashAt: crashMidDestroy,
			run: func(t *testing.T, e *testEnv, cfg *drivers.TaskConfig, tr traces, _ *drivers.TaskHandle, ch *child) {
				// The child crashes half-way through a forced DestroyTask
				// of the running task (its supervisor killed, so nothing
				// but the destroy itself scrubs the secrets).
				select {
				case <-ch.exited:
				case <-time.After(60 * time.Second):
					t.Fatal("the child plugin did not crash in DestroyTask")
				}
				_, err := os.Stat(tr.stateDir)
				must.NoError(t, err, must.Sprint("the crash must leave the state directory for the sweep"))
				assertNoSecret(t, tr.stateDir, secretEnv["CRASH_SECRET"])
				// Nomad does not destroy a task twice; the task is dead
				// in its state, so it is not recovered either.
				e.driver.sweep(context.Background(), false)
				e.assertKept(t, tr, false)
				gcAlloc(t, cfg)
				e.driver.sweep(context.Background(), false)
			},
		},
	}
	for _, c := range cells {
		t.Run(c.name, func(t *testing.T) {
			var mutate func(*PluginConfig)
			tc := readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", c.script}, Tmpfs: []string{"/tmp"}})
			if c.egress {
				mutate = egress
				tc.Egress = []string{"203.0.113.7:443"}
			}
			e := newTestEnv(t, mutate)
			tc.Rootfs = e.rootfs
			cfg, cleanup := e.task(t, "crash", tc)
			defer cleanup()
			// When a cell fails half-way: what the env's own cleanup
			// does not know of (cgroups of every hierarchy, processes).
			t.Cleanup(func() { e.forceRemove(sandboxID(cfg)) })
			cfg.Env = secretEnv
			var h *drivers.TaskHandle
			var ch *child
			switch {
			case c.crashAt == crashBeforeRun || c.crashAt == crashBeforeHandle:
				ch = e.startChild(t, cfg, tc, c.crashAt, c.then)
				ch.died(t)
			case c.child:
				ch = e.startChild(t, cfg, tc, c.crashAt, c.then)
				h = ch.handle(t)
				if c.then != "destroy" {
					waitLog(t, cfg, "stdout", has("ready"))
				}
			default:
				var err error
				h, _, err = e.harness.StartTask(cfg)
				must.NoError(t, err)
				waitLog(t, cfg, "stdout", has("ready"))
			}
			tr := e.tracesOf(t, cfg, c.egress)
			switch {
			case c.then == "stop":
				waitLog(t, cfg, "stdout", has("got-term"))
				ch.kill(t) // the plugin dies while StopTask waits
			case c.child && c.crashAt == "":
				ch.kill(t) // the plugin dies now
			}
			c.run(t, e, cfg, tr, h, ch)
			e.assertGone(t, tr)
		})
	}
}

// forceRemove removes what a task may have left, by its sandbox id, without
// the code under test's sweep.
func (e *testEnv) forceRemove(id string) {
	root := filepath.Clean(e.config.RunscRoot)
	dir := filepath.Join(e.config.StateDir, id)
	for _, p := range runtime.Processes(func(args []string) bool {
		return runtime.SupervisorOf(args) == dir || runtime.ContainerOf(root, args) == id
	}) {
		_ = unix.Kill(p.Pid, unix.SIGKILL)
	}
	_ = e.driver.runsc.Delete(context.Background(), id, runtime.DeleteOpts{Force: true})
	_, _ = runtime.RemoveCgroupEverywhere(taskCgroup(id).Path)
	_ = e.driver.net.Destroy(id)
	_ = runtime.UnmountDisk(dir)
	mounts, _ := runtime.MountsUnder(dir)
	for _, mp := range mounts {
		_ = unix.Unmount(mp, unix.MNT_DETACH)
	}
	_ = os.RemoveAll(dir)
}

// assertNoSecret fails if any file under dir holds secret.
func assertNoSecret(t *testing.T, dir, secret string) {
	t.Helper()
	err := filepath.WalkDir(dir, func(path string, de os.DirEntry, err error) error {
		if err != nil || !de.Type().IsRegular() {
			return err
		}
		b, err := os.ReadFile(path)
		if errors.Is(err, unix.EINVAL) {
			return nil // a namespace file bind-mounted there (runsc's null-netns)
		}
		if err != nil {
			return err
		}
		if strings.Contains(string(b), secret) {
			return fmt.Errorf("%s holds the task's secret", path)
		}
		return nil
	})
	must.NoError(t, err)
}
