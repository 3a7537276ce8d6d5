//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"
	"text/template"
	"time"

	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"
)

// The parts of Nomad's HTTP API objects the tests read.

type nodeStub struct {
	ID      string
	Status  string
	Drivers map[string]*driverInfo
}

type driverInfo struct {
	Detected          bool
	Healthy           bool
	HealthDescription string
}

type allocation struct {
	ID            string
	JobID         string
	ClientStatus  string
	DesiredStatus string
	TaskStates    map[string]*taskState
}

type taskState struct {
	State    string
	Failed   bool
	Restarts uint64
	Events   []*taskEvent
}

type taskEvent struct {
	Type            string
	Time            int64
	Message         string
	DisplayMessage  string
	Details         map[string]string
	DriverError     string
	DriverMessage   string
	ValidationError string
	SetupError      string
	KillError       string
	ExitCode        int
	Signal          int
	FailsTask       bool
}

func (e *taskEvent) text() string {
	parts := []string{e.Type, e.Message, e.DisplayMessage, e.DriverMessage, e.DriverError, e.ValidationError, e.SetupError, e.KillError}
	for k, v := range e.Details {
		parts = append(parts, k+"="+v)
	}
	return strings.Join(parts, " | ")
}

// events returns the events of type typ.
func (ts *taskState) events(typ string) []*taskEvent {
	var out []*taskEvent
	for _, e := range ts.Events {
		if e.Type == typ {
			out = append(out, e)
		}
	}
	return out
}

func (ts *taskState) String() string {
	if ts == nil {
		return "<no task state>"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "state=%s failed=%v restarts=%d events:", ts.State, ts.Failed, ts.Restarts)
	for _, e := range ts.Events {
		fmt.Fprintf(&b, "\n  %s: %q exit=%d signal=%d driver_error=%q validation_error=%q setup_error=%q",
			e.Type, e.DisplayMessage, e.ExitCode, e.Signal, e.DriverError, e.ValidationError, e.SetupError)
	}
	return b.String()
}

func allocDone(a *allocation) bool {
	switch a.ClientStatus {
	case "complete", "failed", "lost":
	default:
		return false
	}
	for _, ts := range a.TaskStates {
		if ts.State != "dead" {
			return false
		}
	}
	return true
}

var httpClient = &http.Client{Timeout: 15 * time.Second}

// apiGet reads a JSON object from the agent's HTTP API.
func apiGet(path string, out any) error {
	resp, err := httpClient.Get(suite.addr() + path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %s", path, resp.Status, bytes.TrimSpace(body))
	}
	return json.Unmarshal(body, out)
}

func getAlloc(id string) (*allocation, error) {
	var a allocation
	if err := apiGet("/v1/allocation/"+url.PathEscape(id), &a); err != nil {
		return nil, err
	}
	return &a, nil
}

// runNomad runs the nomad CLI against the suite's agent and returns its
// combined output (for teardown, which has no *testing.T).
func runNomad(timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, suite.nomadBin, args...)
	cmd.Env = cleanEnv()
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// cliResult is what a nomad CLI call printed and how it ended.
type cliResult struct {
	Stdout, Stderr string
	Code           int
}

func (r cliResult) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.Code, r.Stdout, r.Stderr)
}

// nomadCLI runs bin/nomad with args and stdin; it fails the test only if
// the command could not run or ran past timeout.
func nomadCLI(t *testing.T, timeout time.Duration, stdin string, args ...string) cliResult {
	t.Helper()
	return runCmd(t, timeout, stdin, suite.nomadBin, args...)
}

func runCmd(t *testing.T, timeout time.Duration, stdin string, name string, args ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = cleanEnv()
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	err := cmd.Run()
	res := cliResult{Stdout: stdout.String(), Stderr: stderr.String()}
	if ctx.Err() != nil {
		t.Fatalf("%s %s: no result within %s\n%s", filepath.Base(name), strings.Join(args, " "), timeout, res)
	}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		res.Code = ee.ExitCode()
	default:
		t.Fatalf("%s %s: %v", filepath.Base(name), strings.Join(args, " "), err)
	}
	return res
}

// catchPanic, deferred first thing in every test and subtest, turns a panic
// in the test's goroutine into a failure of that test, so that the other
// tests and the suite's teardown still run.
func catchPanic(t *testing.T) {
	if r := recover(); r != nil {
		t.Errorf("panic: %v\n%s", r, debug.Stack())
	}
}

// jobSpec is one sandbox task in a job of its own.
type jobSpec struct {
	Name        string
	Type        string // "batch" or "service"
	Task        string
	User        string
	Rootfs      string // empty: no rootfs attribute at all
	Command     string
	Args        []string
	ExtraConfig []string // raw HCL lines added to the task's config block
	KillSignal  string
	KillTimeout string
	MemoryMB    int // resources.memory; 0: 128
	// Group and TaskBlocks are raw HCL lines added to the group block
	// before the task (network, service) and to the task block before its
	// config (identity, env).
	Group      []string
	TaskBlocks []string
}

var jobTemplate = template.Must(template.New("job").Funcs(template.FuncMap{
	"hcl":     hclString,
	"hcllist": hclList,
}).Parse(`job {{hcl .Name}} {
  type        = {{hcl .Type}}
  datacenters = ["*"]

  group "g" {
    restart {
      attempts = 0
      mode     = "fail"
    }

    reschedule {
      attempts  = 0
      unlimited = false
    }
{{- range .Group}}
    {{.}}
{{- end}}

    task {{hcl .Task}} {
      driver = "sandbox"
{{- with .User}}
      user   = {{hcl .}}
{{- end}}
{{- with .KillSignal}}
      kill_signal = {{hcl .}}
{{- end}}
      kill_timeout = {{hcl .KillTimeout}}
{{- range .TaskBlocks}}
      {{.}}
{{- end}}

      config {
{{- with .Rootfs}}
        rootfs  = {{hcl .}}
{{- end}}
        command = {{hcl .Command}}
        args    = {{hcllist .Args}}
{{- range .ExtraConfig}}
        {{.}}
{{- end}}
      }

      resources {
        cpu    = 100
        memory = {{if .MemoryMB}}{{.MemoryMB}}{{else}}128{{end}}
      }
    }
  }
}
`))

// hclString quotes s as an HCL string literal; ${ and %{ are escaped so a
// shell script passes through HCL's template syntax untouched.
func hclString(s string) string {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(s)
	out := strings.TrimSpace(b.String())
	out = strings.ReplaceAll(out, "${", "$${")
	return strings.ReplaceAll(out, "%{", "%%{")
}

func hclList(l []string) string {
	q := make([]string, len(l))
	for i, s := range l {
		q[i] = hclString(s)
	}
	return "[" + strings.Join(q, ", ") + "]"
}

// shellJob is a job whose task runs script with /bin/sh -c in the suite's
// busybox rootfs.
func shellJob(t *testing.T, typ, script string) *jobSpec {
	return &jobSpec{
		Name:        jobName(t),
		Type:        typ,
		Task:        "main",
		Rootfs:      suite.rootfs,
		Command:     "/bin/sh",
		Args:        []string{"-c", script},
		KillTimeout: "20s",
	}
}

func jobName(t *testing.T) string {
	var b [3]byte
	_, _ = rand.Read(b[:])
	var s strings.Builder
	for _, r := range strings.ToLower(t.Name()) {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' {
			s.WriteRune(r)
		} else {
			s.WriteRune('-')
		}
	}
	name := s.String()
	if len(name) > 40 {
		name = name[:40]
	}
	return "e2e-" + name + "-" + hex.EncodeToString(b[:])
}

// runningJob is a submitted job; its cleanup purges it and checks that the
// driver removed everything of its allocations.
type runningJob struct {
	spec    *jobSpec
	allocID string
	purged  bool
}

// runJob writes the job from the template and submits it with
// `nomad job run -detach`, then waits for its allocation to exist.
func runJob(t *testing.T, spec *jobSpec) *runningJob {
	t.Helper()
	var b bytes.Buffer
	must.NoError(t, jobTemplate.Execute(&b, spec))
	path := filepath.Join(t.TempDir(), spec.Name+".nomad.hcl")
	must.NoError(t, os.WriteFile(path, b.Bytes(), 0o600))
	res := nomadCLI(t, time.Minute, "", "job", "run", "-detach", path)
	must.Eq(t, 0, res.Code, must.Sprintf("nomad job run failed:\n%s\njob file:\n%s", res, b.String()))

	j := &runningJob{spec: spec}
	t.Cleanup(func() { j.purge(t) })
	j.allocID = waitOneAlloc(t, spec.Name)
	t.Logf("job %s: allocation %s", spec.Name, j.allocID)
	return j
}

// sandboxPrefix is how the driver's sandbox IDs (and state directory names)
// for this allocation begin.
func (j *runningJob) sandboxPrefix() string {
	return sandboxPrefix(j.allocID)
}

// allocDir is the allocation's directory on the host.
func (j *runningJob) allocDir() string {
	return filepath.Join(suite.dataDir, "alloc", j.allocID)
}

func (j *runningJob) purge(t *testing.T) {
	if j.purged {
		return
	}
	j.purged = true
	if suite.agentExited() {
		t.Errorf("agent is not running; cannot stop job %s", j.spec.Name)
		return
	}
	if out, err := runNomad(time.Minute, "job", "stop", "-purge", "-detach", j.spec.Name); err != nil {
		t.Errorf("nomad job stop -purge %s: %v\n%s", j.spec.Name, err, out)
		return
	}
	if j.allocID == "" {
		return
	}
	// Once its allocation has stopped, the driver must have removed the
	// sandbox, its supervisor and its state, and the sandbox's network
	// (the driver's and Nomad's group network) must be gone.
	var left []string
	err := wait.InitialSuccess(
		wait.ErrorFunc(func() error {
			a, err := getAlloc(j.allocID)
			if err != nil {
				return err
			}
			if !allocDone(a) {
				return fmt.Errorf("allocation %s is %s", a.ID, a.ClientStatus)
			}
			left = suite.leftovers(j.sandboxPrefix())
			if len(left) > 0 {
				return fmt.Errorf("left behind: %v", left)
			}
			sandboxes := sandboxIDsOf(a)
			if err := suite.recordSandboxes(sandboxes); err != nil {
				return err
			}
			left = netLeftovers([]string{j.allocID}, sandboxes)
			if len(left) > 0 {
				return fmt.Errorf("network left behind: %v", left)
			}
			return nil
		}),
		wait.Timeout(30*time.Second),
		wait.Gap(250*time.Millisecond),
	).Run()
	if err != nil {
		t.Errorf("after stopping job %s: %v", j.spec.Name, err)
	}
}

// waitAlloc polls the allocation until cond accepts it.
func (j *runningJob) waitAlloc(t *testing.T, timeout time.Duration, what string, cond func(*allocation) error) *allocation {
	t.Helper()
	var last *allocation
	must.Wait(t, wait.InitialSuccess(
		wait.ErrorFunc(func() error {
			a, err := getAlloc(j.allocID)
			if err != nil {
				return err
			}
			last = a
			return cond(a)
		}),
		wait.Timeout(timeout),
		wait.Gap(200*time.Millisecond),
	), must.Func(func() string {
		return fmt.Sprintf("allocation %s: %s; task: %s", j.allocID, what, j.taskStateOf(last))
	}))
	return last
}

func (j *runningJob) taskStateOf(a *allocation) *taskState {
	if a == nil {
		return nil
	}
	return a.TaskStates[j.spec.Task]
}

// waitRunning waits until the task runs.
func (j *runningJob) waitRunning(t *testing.T) *allocation {
	t.Helper()
	return j.waitAlloc(t, 90*time.Second, "task running", func(a *allocation) error {
		ts := a.TaskStates[j.spec.Task]
		if ts == nil || ts.State != "running" {
			return fmt.Errorf("client status %s, task %s", a.ClientStatus, ts)
		}
		return nil
	})
}

// waitDone waits until the allocation has finished.
func (j *runningJob) waitDone(t *testing.T) (*allocation, *taskState) {
	t.Helper()
	a := j.waitAlloc(t, 90*time.Second, "allocation finished", func(a *allocation) error {
		if !allocDone(a) {
			return fmt.Errorf("client status %s", a.ClientStatus)
		}
		return nil
	})
	ts := a.TaskStates[j.spec.Task]
	must.NotNil(t, ts, must.Sprintf("no state for task %s", j.spec.Task))
	return a, ts
}

// logs returns what `nomad alloc logs` prints for the task's stdout or
// stderr.
func (j *runningJob) logs(t *testing.T, stderr bool) string {
	t.Helper()
	args := []string{"alloc", "logs"}
	if stderr {
		args = append(args, "-stderr")
	}
	args = append(args, j.allocID, j.spec.Task)
	res := nomadCLI(t, 30*time.Second, "", args...)
	if res.Code != 0 {
		return ""
	}
	return res.Stdout
}

// waitLogs waits until the task's stdout (or stderr) contains want and
// returns all of it.
func (j *runningJob) waitLogs(t *testing.T, stderr bool, want string) string {
	t.Helper()
	var out string
	must.Wait(t, wait.InitialSuccess(
		wait.BoolFunc(func() bool {
			out = j.logs(t, stderr)
			return strings.Contains(out, want)
		}),
		wait.Timeout(30*time.Second),
		wait.Gap(250*time.Millisecond),
	), must.Func(func() string {
		return fmt.Sprintf("task log (stderr=%v) never contained %q; it holds:\n%s", stderr, want, out)
	}))
	return out
}

// exitCodeOf is the exit code of the task's one "Terminated" event.
func exitCodeOf(t *testing.T, ts *taskState) int {
	t.Helper()
	term := ts.events("Terminated")
	must.Len(t, 1, term, must.Sprintf("want one Terminated event; task: %s", ts))
	return term[0].ExitCode
}
