//go:build e2e

// Package e2e drives a real Nomad agent (bin/nomad) that loads the sandbox
// driver plugin, through the nomad CLI and the agent's HTTP API on loopback.
// Run it as root:
//
//	go test -count=1 -tags e2e -timeout 30m ./e2e/...
//
// Set E2E_AGENT_LOG=FILE to keep a copy of the agent's log.
//
// TestMain builds the plugin and a busybox root filesystem into a temporary
// directory, writes an agent configuration and starts the agent. Teardown
// stops every job and the agent, then fails the suite if any sandbox,
// supervisor or task state is left, before removing it all by force.
package e2e

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"text/template"
	"time"
)

// tmpPrefix names the suite's temporary directories, so that a later run can
// find and remove what a killed run left behind.
const tmpPrefix = "nomad-sandbox-e2e-"

// ownerFile in the temporary directory records the test process that owns it.
const ownerFile = "owner"

// suite is the one agent the tests run against.
var suite *harness

// harness is a Nomad agent with the sandbox plugin and its directories.
type harness struct {
	repo      string // repository root
	nomadBin  string // bin/nomad
	runscBin  string // bin/runsc
	tmp       string // everything the suite creates lives here
	pluginDir string
	pluginBin string // the plugin, <tmp>/plugins/sandbox
	rootfsDir string // allowed parent of the rootfs (allow_host_rootfs)
	rootfs    string // the busybox rootfs the jobs use
	runscRoot string
	stateDir  string
	dataDir   string
	cfgPath   string
	logPath   string
	cgroup    string // the client's cgroup_parent, unique to this run
	netID     string // in the names of the suite's bridge and test host
	bridge    string // the client's bridge_network_name, unique to this run

	// pluginConfig holds the extra lines of the plugin's config block
	// that the agent runs with (suitePluginConfig unless a test changed
	// it for a while; see withPluginConfig).
	pluginConfig []string

	httpPort, rpcPort, serfPort int

	mu        sync.Mutex
	agent     *exec.Cmd
	agentDone chan struct{}

	teardownOnce sync.Once
	problems     []string
}

func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(runSuite(m))
}

func runSuite(m *testing.M) (code int) {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "e2e: the suite must run as root (the driver creates sandboxes and mounts)")
		return 1
	}
	cleanStaleRuns()

	h, err := newHarness()
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: setup: %v\n", err)
		return 1
	}
	suite = h
	// Teardown runs on a normal return, on a panic in this goroutine, on
	// SIGINT/SIGTERM, and shortly before the -timeout panic would kill
	// the process (which would skip deferred calls).
	defer func() {
		if r := recover(); r != nil {
			fmt.Fprintf(os.Stderr, "e2e: panic: %v\n", r)
			code = 2
		}
		if !h.teardown() && code == 0 {
			code = 1
		}
	}()
	h.watchSignals()
	h.watchDeadline()

	start := time.Now()
	if err := h.setup(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: setup: %v\n", err)
		h.dumpAgentLog(80)
		return 1
	}
	fmt.Fprintf(os.Stderr, "e2e: agent ready in %s (http 127.0.0.1:%d, dir %s)\n",
		time.Since(start).Round(time.Millisecond), h.httpPort, h.tmp)
	code = m.Run()
	if code != 0 {
		h.dumpAgentLog(60)
	}
	return code
}

func newHarness() (*harness, error) {
	repo, err := repoRoot()
	if err != nil {
		return nil, err
	}
	h := &harness{
		repo:     repo,
		nomadBin: filepath.Join(repo, "bin", "nomad"),
		runscBin: filepath.Join(repo, "bin", "runsc"),
	}
	for _, b := range []string{h.nomadBin, h.runscBin} {
		if fi, err := os.Stat(b); err != nil || fi.Mode()&0o111 == 0 {
			return nil, fmt.Errorf("%s is missing: run `make deps`", b)
		}
	}
	tmp, err := os.MkdirTemp("", tmpPrefix)
	if err != nil {
		return nil, err
	}
	if err := writeOwner(tmp); err != nil {
		_ = os.RemoveAll(tmp)
		return nil, err
	}
	h.setPaths(tmp)
	h.pluginConfig = suitePluginConfig
	return h, nil
}

// setPaths derives every path from the temporary directory, so that a stale
// run's directory can be cleaned with the same code.
func (h *harness) setPaths(tmp string) {
	h.tmp = tmp
	h.pluginDir = filepath.Join(tmp, "plugins")
	h.pluginBin = filepath.Join(h.pluginDir, "sandbox")
	h.rootfsDir = filepath.Join(tmp, "rootfs-parent")
	h.rootfs = filepath.Join(h.rootfsDir, "busybox")
	h.runscRoot = filepath.Join(tmp, "runsc")
	h.stateDir = filepath.Join(tmp, "state")
	h.dataDir = filepath.Join(tmp, "data")
	h.cfgPath = filepath.Join(tmp, "agent.hcl")
	h.logPath = filepath.Join(tmp, "agent.log")
	h.cgroup = "/" + filepath.Base(tmp)
	h.netID = suiteNetID(tmp)
	h.bridge = "sbxe2e" + h.netID
}

func (h *harness) setup() error {
	t0 := time.Now()
	build := exec.Command("go", "build", "-o", h.pluginBin, ".")
	build.Dir = h.repo
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("build plugin: %v\n%s", err, out)
	}
	mk := exec.Command(filepath.Join(h.repo, "scripts", "mkrootfs.sh"), h.rootfs)
	if out, err := mk.CombinedOutput(); err != nil {
		return fmt.Errorf("build rootfs: %v\n%s", err, out)
	}
	fmt.Fprintf(os.Stderr, "e2e: plugin and rootfs built in %s\n", time.Since(t0).Round(time.Millisecond))

	ports, err := freePorts(3)
	if err != nil {
		return err
	}
	h.httpPort, h.rpcPort, h.serfPort = ports[0], ports[1], ports[2]
	// Before the agent exists: what teardown removes is what appears
	// after this.
	if err := h.prepareNetwork(); err != nil {
		return err
	}
	if err := h.writeAgentConfig(); err != nil {
		return err
	}
	os.Setenv("NOMAD_ADDR", h.addr())
	for _, v := range []string{"NOMAD_TOKEN", "NOMAD_NAMESPACE", "NOMAD_REGION", "NOMAD_CACERT", "NOMAD_CLIENT_CERT", "NOMAD_CLIENT_KEY"} {
		os.Unsetenv(v)
	}
	if err := h.startAgent(); err != nil {
		return err
	}
	return h.waitReady(90 * time.Second)
}

func (h *harness) addr() string { return fmt.Sprintf("http://127.0.0.1:%d", h.httpPort) }

// suitePluginConfig are the limits the suite's agent runs with: a ceiling on
// task timeouts (TestTimeout asks for more; every other task gets it as its
// timeout, far above what a test needs), and a sandbox limit far above what
// the tests run at once, parallel subtests included (TestMaxSandboxes sets
// a low one for itself).
var suitePluginConfig = []string{
	`max_timeout   = "10m"`,
	`max_sandboxes = 64`,
	// The examples' package-mirror allowlist; the sandboxes' DNS service
	// forwards to a discard port on loopback, so no query leaves the node.
	`allowed_egress = ["deb.debian.org:443"]`,
	`dns_servers    = ["127.0.0.1:9"]`,
}

// The agent is a full (not -dev) server and client: a -dev agent keeps its
// server and client state in memory and destroys every allocation when it
// stops, so tasks could not outlive an agent restart. The data dir, plugin
// dir and bind address are given on the command line.
var agentConfig = template.Must(template.New("agent").Parse(`
log_level            = "DEBUG"
disable_update_check = true

ports {
  http = {{.HTTP}}
  rpc  = {{.RPC}}
  serf = {{.Serf}}
}

advertise {
  http = "127.0.0.1"
  rpc  = "127.0.0.1"
  serf = "127.0.0.1"
}

server {
  enabled          = true
  bootstrap_expect = 1
}

client {
  enabled           = true
  network_interface = "lo"
  cgroup_parent     = "{{.Cgroup}}"

  # Group networking (network { mode = "bridge" }): the Debian CNI plugins
  # and a bridge of the suite's own. Mapped ports are on the address of
  # network_interface, 127.0.0.1.
  cni_path              = "{{.CNIPath}}"
  bridge_network_name   = "{{.Bridge}}"
  bridge_network_subnet = "{{.BridgeSubnet}}"

  options {
    # Cloud fingerprinters probe 169.254.169.254: keep all traffic on loopback.
    "fingerprint.denylist" = "env_aws,env_gce,env_azure,env_digitalocean"
  }
}

consul {
  auto_advertise   = false
  server_auto_join = false
  client_auto_join = false
}

vault {
  enabled = false
}

plugin "sandbox" {
  config {
    runsc_path        = "{{.Runsc}}"
    runsc_root        = "{{.RunscRoot}}"
    state_dir         = "{{.StateDir}}"
    allow_host_rootfs = ["{{.RootfsParent}}"]
{{- range .PluginConfig}}
    {{.}}
{{- end}}
  }
}
`))

func (h *harness) writeAgentConfig() error {
	h.mu.Lock()
	pluginConfig := h.pluginConfig
	h.mu.Unlock()
	var b bytes.Buffer
	err := agentConfig.Execute(&b, map[string]any{
		"HTTP": h.httpPort, "RPC": h.rpcPort, "Serf": h.serfPort,
		"Cgroup": h.cgroup, "Runsc": h.runscBin, "RunscRoot": h.runscRoot,
		"StateDir": h.stateDir, "RootfsParent": h.rootfsDir,
		"PluginConfig": pluginConfig,
		"CNIPath":      cniPath, "Bridge": h.bridge, "BridgeSubnet": bridgeSubnet,
	})
	if err != nil {
		return err
	}
	return os.WriteFile(h.cfgPath, b.Bytes(), 0o600)
}

func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// startAgent starts the agent with the suite's configuration and data dir.
func (h *harness) startAgent() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.agent != nil {
		return errors.New("agent already running")
	}
	logf, err := os.OpenFile(h.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	fmt.Fprintf(logf, "\n==== e2e: starting agent at %s ====\n", time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(h.nomadBin, "agent", "-bind", "127.0.0.1",
		"-data-dir", h.dataDir, "-plugin-dir", h.pluginDir, "-config", h.cfgPath)
	cmd.Dir = h.tmp
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.Env = cleanEnv()
	// Its own process group: a ^C meant for `go test` must not reach it
	// before teardown has stopped the jobs.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start agent: %w", err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	h.agent, h.agentDone = cmd, done
	return nil
}

// stopAgent signals the agent and waits for it to exit, killing it after
// timeout. It returns an error if the agent had to be killed.
func (h *harness) stopAgent(sig syscall.Signal, timeout time.Duration) error {
	h.mu.Lock()
	cmd, done := h.agent, h.agentDone
	h.mu.Unlock()
	if cmd == nil {
		return nil
	}
	_ = cmd.Process.Signal(sig)
	var err error
	select {
	case <-done:
	case <-time.After(timeout):
		err = fmt.Errorf("agent did not exit within %s of %s; killed it", timeout, sig)
		_ = cmd.Process.Kill()
		<-done
	}
	h.mu.Lock()
	h.agent, h.agentDone = nil, nil
	h.mu.Unlock()
	return err
}

func (h *harness) agentExited() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.agentDone == nil {
		return true
	}
	select {
	case <-h.agentDone:
		return true
	default:
		return false
	}
}

// waitReady waits for a leader and for this node to be ready with the
// sandbox driver detected and healthy.
func (h *harness) waitReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		if h.agentExited() {
			return errors.New("the agent exited while starting (see its log)")
		}
		if last = h.nodeReady(); last == nil {
			return nil
		}
		time.Sleep(250 * time.Millisecond)
	}
	return fmt.Errorf("agent not ready after %s: %v", timeout, last)
}

func (h *harness) nodeReady() error {
	var leader string
	if err := apiGet("/v1/status/leader", &leader); err != nil {
		return err
	}
	if leader == "" {
		return errors.New("no leader yet")
	}
	var nodes []nodeStub
	if err := apiGet("/v1/nodes", &nodes); err != nil {
		return err
	}
	if len(nodes) != 1 {
		return fmt.Errorf("%d nodes registered, want 1", len(nodes))
	}
	n := nodes[0]
	if n.Status != "ready" {
		return fmt.Errorf("node %s is %q", n.ID, n.Status)
	}
	d, ok := n.Drivers["sandbox"]
	if !ok || !d.Detected || !d.Healthy {
		return fmt.Errorf("driver sandbox not healthy: %+v", d)
	}
	return nil
}

// restartAgent stops the agent with sig (SIGINT: graceful; SIGKILL: a
// crash) and starts it again with the same data dir and configuration.
func (h *harness) restartAgent(sig syscall.Signal) error {
	if err := h.stopAgent(sig, 60*time.Second); err != nil {
		return err
	}
	if err := h.startAgent(); err != nil {
		return err
	}
	return h.waitReady(90 * time.Second)
}

// withPluginConfig restarts the agent with lines in place of the suite's
// plugin config lines, for the rest of the test; the test's cleanup, which
// runs after that of any job the test starts later, restarts it with the
// suite's lines again. The test must not run in parallel with others.
func (h *harness) withPluginConfig(t *testing.T, lines ...string) {
	t.Helper()
	start := time.Now()
	if err := h.reconfigure(lines); err != nil {
		t.Fatalf("restart the agent with plugin config %q: %v", lines, err)
	}
	t.Logf("agent restarted with plugin config %q in %s", lines, time.Since(start).Round(time.Millisecond))
	t.Cleanup(func() {
		start := time.Now()
		if err := h.reconfigure(suitePluginConfig); err != nil {
			t.Errorf("restart the agent with the suite's plugin config again: %v", err)
			return
		}
		t.Logf("agent restarted with the suite's plugin config in %s", time.Since(start).Round(time.Millisecond))
	})
}

// reconfigure restarts the agent gracefully with lines in the plugin's
// config block; the plugin is started anew and reads them.
func (h *harness) reconfigure(lines []string) error {
	h.mu.Lock()
	h.pluginConfig = lines
	h.mu.Unlock()
	if err := h.writeAgentConfig(); err != nil {
		return err
	}
	return h.restartAgent(syscall.SIGINT)
}

func (h *harness) problem(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	fmt.Fprintf(os.Stderr, "e2e: teardown: FAIL: %s\n", msg)
	h.problems = append(h.problems, msg)
}

// teardown stops all jobs and the agent, checks that the driver left
// nothing behind, then removes everything by force. It returns false if
// anything was left or could not be removed.
func (h *harness) teardown() (ok bool) {
	ok = true
	h.teardownOnce.Do(func() {
		start := time.Now()
		if !h.agentExited() {
			h.stopAllJobs()
			h.recordAllSandboxes()
			// The driver destroys each task once it has exited; give
			// it time, then everything must be gone.
			var left []string
			deadline := time.Now().Add(60 * time.Second)
			for {
				left = append(h.leftovers(""), h.suiteNetLeftovers()...)
				if len(left) == 0 || time.Now().After(deadline) {
					break
				}
				time.Sleep(250 * time.Millisecond)
			}
			for _, l := range left {
				h.problem("left behind after all jobs were stopped: %s", l)
			}
			if err := h.stopAgent(syscall.SIGINT, 60*time.Second); err != nil {
				h.problem("%v", err)
			}
		}
		for _, l := range append(h.leftovers(""), h.suiteNetLeftovers()...) {
			h.problem("left behind after the agent stopped: %s", l)
		}
		for _, p := range procsUsing(h.tmp) {
			fmt.Fprintf(os.Stderr, "e2e: teardown: note: process %d still runs after the agent stopped: %s\n", p.pid, strings.Join(p.argv, " "))
		}
		if dst := os.Getenv("E2E_AGENT_LOG"); dst != "" {
			if b, err := os.ReadFile(h.logPath); err == nil {
				_ = os.WriteFile(dst, b, 0o600)
			}
		}
		forceClean(h)
		fmt.Fprintf(os.Stderr, "e2e: teardown took %s\n", time.Since(start).Round(time.Millisecond))
		ok = len(h.problems) == 0
	})
	return ok && len(h.problems) == 0
}

// stopAllJobs runs `nomad job stop -purge` for every job and waits for their
// allocations to finish.
func (h *harness) stopAllJobs() {
	var jobs []struct{ ID string }
	if err := apiGet("/v1/jobs", &jobs); err != nil {
		h.problem("list jobs: %v", err)
		return
	}
	for _, j := range jobs {
		if out, err := runNomad(2*time.Minute, "job", "stop", "-purge", "-detach", j.ID); err != nil {
			h.problem("nomad job stop -purge %s: %v\n%s", j.ID, err, out)
		}
	}
	deadline := time.Now().Add(90 * time.Second)
	for {
		var allocs []allocation
		err := apiGet("/v1/allocations", &allocs)
		running := []string{}
		for _, a := range allocs {
			if !allocDone(&a) {
				running = append(running, a.ID+" ("+a.ClientStatus+")")
			}
		}
		if err == nil && len(running) == 0 {
			return
		}
		if time.Now().After(deadline) {
			h.problem("allocations still running 90s after their jobs were stopped: %v %v", running, err)
			return
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// leftovers lists the sandboxes, supervisors and task state directories
// that exist, restricted to sandbox IDs starting with prefix if it is set.
func (h *harness) leftovers(prefix string) []string {
	var out []string
	ids, err := h.runscList()
	if err != nil {
		out = append(out, fmt.Sprintf("runsc list failed: %v", err))
	}
	for _, id := range ids {
		if strings.HasPrefix(id, prefix) {
			out = append(out, "runsc sandbox "+id)
		}
	}
	for _, p := range h.supervisors() {
		if strings.HasPrefix(filepath.Base(p.argv[2]), prefix) {
			out = append(out, fmt.Sprintf("supervisor process %d (%s)", p.pid, strings.Join(p.argv, " ")))
		}
	}
	for _, p := range h.runscProcs() {
		for _, a := range p.argv[1:] {
			if strings.HasPrefix(a, prefix) {
				out = append(out, fmt.Sprintf("runsc process %d (%s)", p.pid, strings.Join(p.argv, " ")))
				break
			}
		}
	}
	entries, _ := os.ReadDir(h.stateDir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			out = append(out, "state_dir entry "+filepath.Join(h.stateDir, e.Name()))
		}
	}
	for _, cg := range h.sandboxCgroups(prefix) {
		out = append(out, "cgroup "+cg)
	}
	// A task's disk (disk_limit): the overlay over its local/ is named
	// after its sandbox (only the suite's own: driver tests may run
	// meanwhile).
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if strings.Contains(line, " nomad-sandbox-disk:"+prefix) && strings.Contains(line, " "+h.dataDir+"/") {
				out = append(out, "disk overlay "+line)
			}
		}
	}
	return out
}

// sandboxCgroups lists the cgroups of the suite's sandboxes whose IDs start
// with prefix (all of them if it is empty). The driver's cgroups live in a
// hierarchy shared with every other user of the driver on this host, so
// only the suite's own allocations are looked at.
func (h *harness) sandboxCgroups(prefix string) []string {
	var out []string
	for _, p := range h.allocPrefixes() {
		if !strings.HasPrefix(p, prefix) && !strings.HasPrefix(prefix, p) {
			continue
		}
		for _, pat := range []string{"/sys/fs/cgroup/*/nomad-sandbox/" + p + "*", "/sys/fs/cgroup/nomad-sandbox/" + p + "*"} {
			matches, _ := filepath.Glob(pat)
			for _, m := range matches {
				if strings.HasPrefix(filepath.Base(m), prefix) {
					out = append(out, m)
				}
			}
		}
	}
	return out
}

// allocsFile lists, one a line, the allocations the suite's jobs got.
const allocsFile = "allocs"

func (h *harness) recordAlloc(id string) error {
	f, err := os.OpenFile(filepath.Join(h.tmp, allocsFile), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = fmt.Fprintln(f, id)
	return err
}

// allocPrefixes are the sandbox ID prefixes of the recorded allocations.
func (h *harness) allocPrefixes() []string {
	b, _ := os.ReadFile(filepath.Join(h.tmp, allocsFile))
	var out []string
	for _, id := range strings.Fields(string(b)) {
		if len(id) >= 8 {
			out = append(out, sandboxPrefix(id))
		}
	}
	return out
}

// sandboxPrefix is how the driver's sandbox IDs, state directory and cgroup
// names for an allocation begin.
func sandboxPrefix(allocID string) string {
	return "nomad-" + allocID[:8] + "-"
}

// runscList returns the container IDs in the suite's runsc root.
func (h *harness) runscList() ([]string, error) {
	if _, err := os.Stat(h.runscRoot); errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	cmd := exec.Command(h.runscBin, "--root", h.runscRoot, "list", "-quiet")
	cmd.Env = cleanEnv()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%v: %s", err, strings.TrimSpace(stderr.String()))
	}
	return strings.Fields(string(out)), nil
}

// supervisors are the `sandbox supervise DIR` processes for the suite's
// state_dir.
func (h *harness) supervisors() []proc {
	var out []proc
	for _, p := range listProcs() {
		if len(p.argv) >= 3 && p.argv[1] == "supervise" && strings.HasPrefix(p.argv[2], h.stateDir+"/") {
			out = append(out, p)
		}
	}
	return out
}

// runscProcs are the runsc, sandbox and gofer processes that use the
// suite's runsc root.
func (h *harness) runscProcs() []proc {
	var out []proc
	for _, p := range listProcs() {
		for i, a := range p.argv {
			v, ok := strings.CutPrefix(a, "--root=")
			if !ok && a == "--root" && i+1 < len(p.argv) {
				v, ok = p.argv[i+1], true
			}
			if ok && under(v, h.runscRoot) {
				out = append(out, p)
				break
			}
		}
	}
	return out
}

// pluginProcs are the plugin processes Nomad runs from the suite's
// plugin_dir (the same binary run as `supervise` is not one).
func (h *harness) pluginProcs() []proc {
	var out []proc
	for _, p := range listProcs() {
		if len(p.argv) == 0 || p.argv[0] != h.pluginBin {
			continue
		}
		if len(p.argv) > 1 && p.argv[1] == "supervise" {
			continue
		}
		out = append(out, p)
	}
	return out
}

// forceClean removes whatever is left of a run in h.tmp: supervisors,
// sandboxes, processes using the directory, mounts, cgroups, files.
func forceClean(h *harness) {
	for _, p := range h.supervisors() {
		_ = syscall.Kill(p.pid, syscall.SIGKILL)
	}
	h.deleteSandboxes()
	// Anything still running from or inside the directory: plugins,
	// logmon, sandbox and gofer processes.
	deadline := time.Now().Add(15 * time.Second)
	for {
		ps := procsUsing(h.tmp)
		if len(ps) == 0 {
			break
		}
		if time.Now().After(deadline) {
			for _, p := range ps {
				fmt.Fprintf(os.Stderr, "e2e: teardown: process %d (%s) does not die\n", p.pid, strings.Join(p.argv, " "))
			}
			break
		}
		for _, p := range ps {
			_ = syscall.Kill(p.pid, syscall.SIGKILL)
		}
		time.Sleep(100 * time.Millisecond)
	}
	h.deleteSandboxes()
	for _, cg := range h.sandboxCgroups("") {
		removeCgroupTree(cg)
	}
	h.cleanNetwork(func(kind reportKind, format string, args ...any) {
		msg := fmt.Sprintf(format, args...)
		if kind == failed && suite == h {
			h.problem("%s", msg)
			return
		}
		fmt.Fprintf(os.Stderr, "e2e: network cleanup: %s\n", msg)
	})
	unmountUnder(h.tmp)
	removeCgroups(h.cgroup)
	if mps := mountsUnder(h.tmp); len(mps) > 0 {
		msg := fmt.Sprintf("still mounted, not removing %s: %v", h.tmp, mps)
		if suite == h {
			h.problem("%s", msg)
		} else {
			fmt.Fprintln(os.Stderr, "e2e: "+msg)
		}
		return
	}
	if err := os.RemoveAll(h.tmp); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: remove %s: %v\n", h.tmp, err)
	}
}

func (h *harness) deleteSandboxes() {
	ids, _ := h.runscList()
	for _, id := range ids {
		for _, args := range [][]string{{"kill", "--all", id, "KILL"}, {"delete", "--force", id}} {
			cmd := exec.Command(h.runscBin, append([]string{"--root", h.runscRoot}, args...)...)
			cmd.Env = cleanEnv()
			_ = cmd.Run()
		}
	}
}

// cleanStaleRuns removes the directories of earlier runs whose test process
// is gone (killed by a timeout or a signal before its teardown).
func cleanStaleRuns() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), tmpPrefix+"*"))
	for _, d := range dirs {
		if ownerAlive(d) {
			continue
		}
		fmt.Fprintf(os.Stderr, "e2e: removing the leftovers of an earlier run in %s\n", d)
		h := &harness{runscBin: suiteRunsc()}
		h.setPaths(d)
		forceClean(h)
	}
}

func suiteRunsc() string {
	repo, _ := repoRoot()
	return filepath.Join(repo, "bin", "runsc")
}

// repoRoot is the repository root: `go test` runs the test binary in the
// package's directory, e2e/.
func repoRoot() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	repo := filepath.Dir(wd)
	if _, err := os.Stat(filepath.Join(repo, "go.mod")); err != nil {
		return "", fmt.Errorf("%s is not the repository root (run the suite with go test ./e2e/...): %w", repo, err)
	}
	return repo, nil
}

func writeOwner(dir string) error {
	st, err := procStartTime(os.Getpid())
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, ownerFile), []byte(fmt.Sprintf("%d %s\n", os.Getpid(), st)), 0o600)
}

func ownerAlive(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, ownerFile))
	if err != nil {
		// Just created by a run that has not written it yet, or
		// not ours: leave it unless it is old.
		fi, serr := os.Stat(dir)
		return serr != nil || time.Since(fi.ModTime()) < 10*time.Minute
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return false
	}
	pid, err := strconv.Atoi(f[0])
	if err != nil {
		return false
	}
	st, err := procStartTime(pid)
	return err == nil && st == f[1]
}

// procStartTime is field 22 of /proc/PID/stat, which tells a process from a
// later one with the same PID.
func procStartTime(pid int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return "", errors.New("bad stat")
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 {
		return "", errors.New("bad stat")
	}
	return f[19], nil
}

// watchSignals tears down and exits on SIGINT/SIGTERM.
func (h *harness) watchSignals() {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		sig := <-ch
		fmt.Fprintf(os.Stderr, "e2e: got %s, tearing down\n", sig)
		h.teardown()
		os.Exit(1)
	}()
}

// watchDeadline tears down shortly before `go test -timeout` would panic and
// end the process without running deferred teardown.
func (h *harness) watchDeadline() {
	f := flag.Lookup("test.timeout")
	if f == nil {
		return
	}
	d, err := time.ParseDuration(f.Value.String())
	if err != nil || d <= 0 {
		return
	}
	margin := 90 * time.Second
	if d < 3*margin {
		margin = d / 3
	}
	time.AfterFunc(d-margin, func() {
		fmt.Fprintf(os.Stderr, "e2e: the suite is about to hit -timeout %s; goroutines:\n", d)
		_ = pprof.Lookup("goroutine").WriteTo(os.Stderr, 2)
		h.dumpAgentLog(80)
		h.teardown()
		os.Exit(1)
	})
}

// agentLogLines returns the agent log's lines that contain every one of
// words.
func (h *harness) agentLogLines(words ...string) string {
	b, err := os.ReadFile(h.logPath)
	if err != nil {
		return err.Error()
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		ok := true
		for _, w := range words {
			ok = ok && strings.Contains(l, w)
		}
		if ok {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func (h *harness) dumpAgentLog(n int) {
	b, err := os.ReadFile(h.logPath)
	if err != nil {
		return
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	fmt.Fprintf(os.Stderr, "e2e: last %d lines of the agent log %s:\n%s\n", len(lines), h.logPath, strings.Join(lines, "\n"))
}

// cleanEnv is this process's environment without Nomad client settings other
// than NOMAD_ADDR.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "NOMAD_") && !strings.HasPrefix(kv, "NOMAD_ADDR=") {
			continue
		}
		env = append(env, kv)
	}
	return env
}
