//go:build e2e

package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"
)

// hostSecretVar is set in this process before TestMain starts the agent,
// which inherits it (startAgent passes cleanEnv(), this process's
// environment), and so does the plugin Nomad starts. No sandbox may see it.
const hostSecretVar = "SANDBOX_E2E_HOST_SECRET"

var hostSecretValue = func() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return "leak-" + hex.EncodeToString(b[:])
}()

func init() {
	// init runs before TestMain, so before the agent starts.
	os.Setenv(hostSecretVar, hostSecretValue)
}

// idJob is one sandbox task, "main", in the suite's busybox rootfs (or
// Rootfs), with an identity block and an env block as the test asks.
type idJob struct {
	Name     string
	Type     string // "batch" (default) or "service"
	Rootfs   string // empty: the suite's rootfs
	Script   string // run with /bin/sh -c; write $var, never ${var}
	Identity []string
	Env      map[string]string
	User     string
}

// runIDJob submits the job and waits for its allocation, like runJob; the
// returned job's cleanup purges it and checks that nothing is left.
func runIDJob(t *testing.T, spec *idJob) *runningJob {
	t.Helper()
	if spec.Name == "" {
		spec.Name = jobName(t)
	}
	if spec.Type == "" {
		spec.Type = "batch"
	}
	js := shellJob(t, spec.Type, spec.Script)
	js.Name, js.User = spec.Name, spec.User
	if spec.Rootfs != "" {
		js.Rootfs = spec.Rootfs
	}
	if len(spec.Identity) > 0 {
		js.TaskBlocks = append(append([]string{"identity {"}, spec.Identity...), "}")
	}
	if len(spec.Env) > 0 {
		js.TaskBlocks = append(js.TaskBlocks, "env {")
		for _, k := range slices.Sorted(maps.Keys(spec.Env)) {
			js.TaskBlocks = append(js.TaskBlocks, k+" = "+hclString(spec.Env[k]))
		}
		js.TaskBlocks = append(js.TaskBlocks, "}")
	}
	return runJob(t, js)
}

// waitOneAlloc waits until the job has its one allocation, records it for
// the suite's leftover checks and returns its ID.
func waitOneAlloc(t *testing.T, job string) string {
	t.Helper()
	var id string
	must.Wait(t, wait.InitialSuccess(
		wait.ErrorFunc(func() error {
			var allocs []allocation
			if err := apiGet("/v1/job/"+url.PathEscape(job)+"/allocations", &allocs); err != nil {
				return err
			}
			if len(allocs) != 1 {
				return fmt.Errorf("%d allocations, want 1", len(allocs))
			}
			id = allocs[0].ID
			return suite.recordAlloc(id)
		}),
		wait.Timeout(60*time.Second),
		wait.Gap(200*time.Millisecond),
	), must.Sprintf("job %s was not placed", job))
	return id
}

// secretsDir is the task's secrets directory on the host.
func (j *runningJob) secretsDir() string {
	return filepath.Join(j.allocDir(), j.spec.Task, "secrets")
}

// jwtClaims decodes the claims (the middle part) of a JWT.
func jwtClaims(t *testing.T, token string) map[string]any {
	t.Helper()
	parts := strings.Split(strings.TrimSpace(token), ".")
	must.Len(t, 3, parts, must.Sprintf("not a JWT (want header.claims.signature): %q", token))
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	must.NoError(t, err, must.Sprintf("JWT claims are not base64url: %q", parts[1]))
	var claims map[string]any
	must.NoError(t, json.Unmarshal(b, &claims), must.Sprintf("JWT claims are not JSON: %s", b))
	return claims
}

// checkIdentityClaims checks that token is the workload identity of the
// job's task "main" in its allocation.
func checkIdentityClaims(t *testing.T, j *runningJob, token string) {
	t.Helper()
	c := jwtClaims(t, token)
	t.Logf("identity claims: %v", c)
	must.Eq[any](t, "default", c["nomad_namespace"], must.Sprintf("claims %v", c))
	must.Eq[any](t, j.spec.Name, c["nomad_job_id"], must.Sprintf("claims %v", c))
	must.Eq[any](t, j.spec.Task, c["nomad_task"], must.Sprintf("claims %v", c))
	must.Eq[any](t, j.allocID, c["nomad_allocation_id"], must.Sprintf("claims %v", c))
}

// A job with `identity { file = true }` reads its workload identity from
// /secrets/nomad_token: the JWT the client wrote, naming its job, task and
// allocation, and not in its environment. When the token file is rewritten
// on the host while the task runs (in place, as Nomad 1.6's identity hook
// writes it, and by rename, as an atomic writer would), the task reads the
// new token next: /secrets is the task's directory, not a copy. Nomad 1.6
// does not renew the default identity, so the test rewrites the file
// itself.
func TestWorkloadIdentityFile(t *testing.T) {
	defer catchPanic(t)
	script := `
echo "TOKEN=$(cat /secrets/nomad_token)"
echo "ENV_TOKENS=$(env | grep -c '^NOMAD_TOKEN')"
i=1
while [ $i -le 2 ]; do
  n=0
  while [ ! -e /alloc/data/rewritten-$i ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done
  echo "TOKEN$i=$(cat /secrets/nomad_token)"
  i=$((i+1))
done
echo DONE
`
	j := runIDJob(t, &idJob{Script: script, Identity: []string{"file = true"}})
	out := j.waitLogs(t, false, "ENV_TOKENS=")

	token := lineValue(t, out, "TOKEN=")
	checkIdentityClaims(t, j, token)
	onHost, err := os.ReadFile(filepath.Join(j.secretsDir(), "nomad_token"))
	must.NoError(t, err)
	must.Eq(t, strings.TrimSpace(string(onHost)), token, must.Sprint("the task read another token than the client wrote"))
	must.Eq(t, "0", lineValue(t, out, "ENV_TOKENS="), must.Sprint("identity { file = true } alone put NOMAD_TOKEN in the task's environment"))

	// Rewritten in place (same inode, truncated).
	tokenPath := filepath.Join(j.secretsDir(), "nomad_token")
	inPlace := "rewritten.in-place." + hex.EncodeToString([]byte(j.allocID[:8]))
	must.NoError(t, os.WriteFile(tokenPath, []byte(inPlace), 0o600))
	must.NoError(t, os.WriteFile(filepath.Join(j.allocDir(), "alloc", "data", "rewritten-1"), nil, 0o644))
	out = j.waitLogs(t, false, "TOKEN1=")
	must.Eq(t, inPlace, lineValue(t, out, "TOKEN1="), must.Sprint("the task did not see the token rewritten in place"))

	// Replaced by rename (a new inode under the same name).
	renamed := "rewritten.by-rename." + hex.EncodeToString([]byte(j.allocID[:8]))
	tmp := tokenPath + ".tmp"
	must.NoError(t, os.WriteFile(tmp, []byte(renamed), 0o600))
	must.NoError(t, os.Rename(tmp, tokenPath))
	must.NoError(t, os.WriteFile(filepath.Join(j.allocDir(), "alloc", "data", "rewritten-2"), nil, 0o644))
	out = j.waitLogs(t, false, "DONE")
	must.Eq(t, renamed, lineValue(t, out, "TOKEN2="), must.Sprint("the task did not see the token replaced by rename"))

	a, ts := j.waitDone(t)
	must.Eq(t, "complete", a.ClientStatus, must.Sprintf("task: %s", ts))
}

// `identity { env = true }` puts the workload identity in NOMAD_TOKEN, which
// the driver passes on by default; a node with deny_env_identity = true
// refuses such a job before anything starts, with an event naming the
// setting, and still runs jobs that take the token as a file.
func TestWorkloadIdentityEnv(t *testing.T) {
	defer catchPanic(t)
	envScript := `echo "FILE=$(if [ -e /secrets/nomad_token ]; then echo present; else echo absent; fi)"; echo "NOMAD_TOKEN=$NOMAD_TOKEN"; echo DONE`

	t.Run("allowed by default", func(t *testing.T) {
		defer catchPanic(t)
		j := runIDJob(t, &idJob{Script: envScript, Identity: []string{"env = true"}})
		a, ts := j.waitDone(t)
		must.Eq(t, "complete", a.ClientStatus, must.Sprintf("task: %s", ts))
		out := j.waitLogs(t, false, "DONE")
		t.Logf("stdout:\n%s", out)
		token := lineValue(t, out, "NOMAD_TOKEN=")
		must.NotEq(t, "", token, must.Sprint("identity { env = true }: NOMAD_TOKEN is empty in the sandbox"))
		checkIdentityClaims(t, j, token)
	})

	t.Run("refused with deny_env_identity", func(t *testing.T) {
		defer catchPanic(t)
		suite.withPluginConfig(t, append(append([]string{}, suitePluginConfig...), "deny_env_identity = true")...)

		refused := runIDJob(t, &idJob{Script: envScript, Identity: []string{"env = true"}})
		// A file token is still fine on such a node.
		fileJob := runIDJob(t, &idJob{Script: `echo "TOKEN=$(cat /secrets/nomad_token)"`, Identity: []string{"file = true"}})

		a := refused.waitAlloc(t, 30*time.Second, "the task refused", func(a *allocation) error {
			if !allocDone(a) {
				return fmt.Errorf("client status %s", a.ClientStatus)
			}
			return nil
		})
		ts := refused.taskStateOf(a)
		t.Logf("refused task: %s", ts)
		must.Eq(t, "failed", a.ClientStatus, must.Sprintf("task: %s", ts))
		must.NotNil(t, eventWith(ts, "Driver Failure", "deny_env_identity"),
			must.Sprintf("no Driver Failure event names deny_env_identity; task: %s", ts))
		must.Len(t, 0, ts.events("Started"), must.Sprintf("task: %s", ts))
		must.Nil(t, eventWith(ts, "", "Sandbox started"), must.Sprintf("task: %s", ts))
		must.SliceEmpty(t, suite.leftovers(refused.sandboxPrefix()))
		must.Eq(t, "", refused.logs(t, false), must.Sprint("the refused task wrote output"))

		fa, fts := fileJob.waitDone(t)
		must.Eq(t, "complete", fa.ClientStatus, must.Sprintf("a file-identity job failed on a deny_env_identity node: %s", fts))
		checkIdentityClaims(t, fileJob, lineValue(t, fileJob.waitLogs(t, false, "TOKEN="), "TOKEN="))
	})
}

// taskAPIClient is a small program the test builds (static, no cgo) and
// runs inside the sandbox: it connects to Nomad's Task API socket and asks
// for path with the task's workload identity.
const taskAPIClient = `package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"
)

const sock = "/secrets/api.sock"

func main() {
	path := "/v1/agent/health"
	if len(os.Args) > 1 {
		path = os.Args[1]
	}
	c, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		fmt.Printf("TASKAPI_DIAL_ERROR=%v\n", err)
		os.Exit(3)
	}
	c.Close()
	fmt.Println("TASKAPI_DIAL=ok")
	tok, err := os.ReadFile("/secrets/nomad_token")
	if err != nil {
		fmt.Printf("TASKAPI_TOKEN_ERROR=%v\n", err)
		os.Exit(4)
	}
	client := &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}},
	}
	req, _ := http.NewRequest("GET", "http://task-api"+path, nil)
	req.Header.Set("X-Nomad-Token", strings.TrimSpace(string(tok)))
	resp, err := client.Do(req)
	if err != nil {
		fmt.Printf("TASKAPI_HTTP_ERROR=%v\n", err)
		os.Exit(5)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	fmt.Printf("TASKAPI_STATUS=%d\n", resp.StatusCode)
	fmt.Printf("TASKAPI_BODY=%s\n", strings.ReplaceAll(string(body), "\n", " "))
}
`

// taskAPIRootfsOnce is a copy of the suite's busybox rootfs with the Task
// API client as /bin/taskapi, under the suite's allowed rootfs parent (the
// suite's teardown removes it with everything else).
var taskAPIRootfsOnce struct {
	once sync.Once
	path string
	err  error
}

func taskAPIRootfs(t *testing.T) string {
	t.Helper()
	taskAPIRootfsOnce.once.Do(func() {
		taskAPIRootfsOnce.path, taskAPIRootfsOnce.err = buildTaskAPIRootfs()
	})
	must.NoError(t, taskAPIRootfsOnce.err)
	return taskAPIRootfsOnce.path
}

func buildTaskAPIRootfs() (string, error) {
	src, err := os.MkdirTemp(suite.tmp, "taskapi-src-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(src)
	if err := os.WriteFile(filepath.Join(src, "go.mod"), []byte("module taskapi\n\ngo 1.21\n"), 0o644); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(src, "main.go"), []byte(taskAPIClient), 0o644); err != nil {
		return "", err
	}
	dst := filepath.Join(suite.rootfsDir, "taskapi")
	cp := exec.Command("cp", "-a", suite.rootfs+"/.", dst+"/")
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return "", err
	}
	if out, err := cp.CombinedOutput(); err != nil {
		return "", fmt.Errorf("copy the rootfs: %v\n%s", err, out)
	}
	build := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(dst, "bin", "taskapi"), ".")
	build.Dir = src
	build.Env = append(cleanEnv(), "CGO_ENABLED=0", "GOWORK=off", "GOFLAGS=")
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build the Task API client: %v\n%s", err, out)
	}
	return dst, nil
}

// getTaskAPI asks the Task API through the socket at sock (a host path)
// with token, as a process on the host would.
func getTaskAPI(sock, token, path string) (int, string, error) {
	client := &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}},
	}
	req, err := http.NewRequest("GET", "http://task-api"+path, nil)
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("X-Nomad-Token", token)
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	return resp.StatusCode, string(body), nil
}

// Nomad's Task API socket, /secrets/api.sock, is in the sandbox but cannot
// be connected to (runsc --host-uds=none) unless the node sets
// allow_task_api = true; then the task reaches the agent through it with
// its workload identity.
func TestTaskAPISocket(t *testing.T) {
	defer catchPanic(t)
	rootfs := taskAPIRootfs(t)
	script := `
if [ -S /secrets/api.sock ]; then echo SOCKET=present; else echo "SOCKET=absent: $(ls -l /secrets/api.sock 2>&1)"; fi
/bin/taskapi /v1/agent/health
echo "TASKAPI_EXIT=$?"
n=0
while [ ! -e /alloc/data/done ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done
echo DONE
`
	// run starts the job, returns the client's output once it has run
	// (the task then waits for the test), and checks from the host that
	// the socket itself answers the token while the task runs.
	run := func(t *testing.T) (*runningJob, string) {
		j := runIDJob(t, &idJob{Rootfs: rootfs, Script: script, Identity: []string{"file = true"}})
		out := j.waitLogs(t, false, "TASKAPI_EXIT=")
		t.Logf("task stdout:\n%s", out)
		tok, err := os.ReadFile(filepath.Join(j.secretsDir(), "nomad_token"))
		must.NoError(t, err)
		code, body, err := getTaskAPI(filepath.Join(j.secretsDir(), "api.sock"), strings.TrimSpace(string(tok)), "/v1/agent/health")
		must.NoError(t, err, must.Sprint("the Task API socket does not answer on the host"))
		must.Eq(t, 200, code, must.Sprintf("the Task API socket answered on the host: %s", body))
		must.NoError(t, os.WriteFile(filepath.Join(j.allocDir(), "alloc", "data", "done"), nil, 0o644))
		a, ts := j.waitDone(t)
		must.Eq(t, "complete", a.ClientStatus, must.Sprintf("task: %s", ts))
		must.Eq(t, "present", lineValue(t, out, "SOCKET="), must.Sprint("the socket is not in the sandbox's /secrets, so this test proves nothing"))
		return j, out
	}

	t.Run("closed by default", func(t *testing.T) {
		defer catchPanic(t)
		_, out := run(t)
		must.StrNotContains(t, out, "TASKAPI_STATUS=", must.Sprint("the task reached Nomad's Task API without allow_task_api"))
		must.StrNotContains(t, out, "TASKAPI_DIAL=ok", must.Sprint("the task connected to the host's Task API socket without allow_task_api"))
		must.StrContains(t, out, "TASKAPI_DIAL_ERROR=")
		must.Eq(t, "3", lineValue(t, out, "TASKAPI_EXIT="))
	})

	t.Run("open with allow_task_api", func(t *testing.T) {
		defer catchPanic(t)
		suite.withPluginConfig(t, append(append([]string{}, suitePluginConfig...), "allow_task_api = true")...)
		_, out := run(t)
		must.Eq(t, "200", lineValue(t, out, "TASKAPI_STATUS="), must.Sprint("the task did not reach Nomad's Task API with allow_task_api = true"))
		must.StrContains(t, lineValue(t, out, "TASKAPI_BODY="), `"ok":true`)
		must.Eq(t, "0", lineValue(t, out, "TASKAPI_EXIT="))
	})
}

// environOf returns the environment of process pid.
func environOf(t *testing.T, pid int) []string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	must.NoError(t, err)
	return strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
}

func hasEnv(env []string, kv string) bool {
	for _, e := range env {
		if e == kv {
			return true
		}
	}
	return false
}

// The agent's (and so the plugin's) environment never reaches a sandbox,
// neither the task nor a command run with `nomad alloc exec`; the job's own
// env block does.
func TestHostEnvNotInherited(t *testing.T) {
	defer catchPanic(t)
	secret := hostSecretVar + "=" + hostSecretValue

	// The variable is where a leak would come from: the agent and the
	// plugin it started.
	suite.mu.Lock()
	agentPid := suite.agent.Process.Pid
	suite.mu.Unlock()
	must.True(t, hasEnv(environOf(t, agentPid), secret), must.Sprintf("the agent (pid %d) does not have %s, so this test proves nothing", agentPid, secret))
	plugins := suite.pluginProcs()
	must.SliceNotEmpty(t, plugins, must.Sprint("no plugin process"))
	for _, p := range plugins {
		must.True(t, hasEnv(environOf(t, p.pid), secret), must.Sprintf("the plugin (pid %d) does not have %s, so this test proves nothing", p.pid, secret))
	}

	script := `
echo ENV-BEGIN
env | sort
echo ENV-END
n=0
while [ ! -e /alloc/data/done ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done
echo DONE
`
	j := runIDJob(t, &idJob{Script: script, Env: map[string]string{"FOO": "bar", "E2E_JOB_VAR": "from-the-job"}})
	out := j.waitLogs(t, false, "ENV-END")
	begin, end := strings.Index(out, "ENV-BEGIN\n"), strings.Index(out, "ENV-END")
	must.True(t, begin >= 0 && end > begin, must.Sprintf("stdout:\n%s", out))
	taskEnv := strings.Split(strings.TrimSpace(out[begin+len("ENV-BEGIN\n"):end]), "\n")
	t.Logf("the task's environment:\n%s", strings.Join(taskEnv, "\n"))

	exec := nomadCLI(t, time.Minute, "", "alloc", "exec", "-i=false", "-t=false", j.allocID, "/bin/env")
	must.Eq(t, 0, exec.Code, must.Sprintf("nomad alloc exec env: %s", exec))
	execEnv := strings.Split(strings.TrimSpace(exec.Stdout), "\n")

	for what, env := range map[string][]string{"the task": taskEnv, "nomad alloc exec": execEnv} {
		must.True(t, hasEnv(env, "FOO=bar"), must.Sprintf("%s lacks the job's FOO=bar: %q", what, env))
		must.True(t, hasEnv(env, "E2E_JOB_VAR=from-the-job"), must.Sprintf("%s lacks the job's E2E_JOB_VAR: %q", what, env))
		must.True(t, hasEnv(env, "NOMAD_ALLOC_ID="+j.allocID), must.Sprintf("%s lacks NOMAD_ALLOC_ID: %q", what, env))
		for _, kv := range env {
			must.StrNotContains(t, kv, hostSecretVar, must.Sprintf("the agent's environment reached %s", what))
			must.StrNotContains(t, kv, hostSecretValue, must.Sprintf("the agent's environment reached %s", what))
		}
	}
	// Beyond the one marked variable: nothing but Nomad's NOMAD_*, the
	// job's own, PATH (the driver's default) and what runsc and the shell
	// set themselves.
	ownVars := map[string]bool{"FOO": true, "E2E_JOB_VAR": true, "PATH": true, "HOME": true, "PWD": true, "SHLVL": true, "TERM": true, "HOSTNAME": true}
	for what, env := range map[string][]string{"the task": taskEnv, "nomad alloc exec": execEnv} {
		for _, kv := range env {
			k, _, _ := strings.Cut(kv, "=")
			if !strings.HasPrefix(k, "NOMAD_") && !ownVars[k] {
				t.Errorf("%s has %q, which is neither Nomad's, the job's nor the sandbox's own", what, kv)
			}
		}
	}
	must.StrNotContains(t, out, hostSecretValue)
	must.StrNotContains(t, exec.Stdout+exec.Stderr, hostSecretValue)

	must.NoError(t, os.WriteFile(filepath.Join(j.allocDir(), "alloc", "data", "done"), nil, 0o644))
	a, ts := j.waitDone(t)
	must.Eq(t, "complete", a.ClientStatus, must.Sprintf("task: %s", ts))
}

// auditLine is an audit log line as README's "Audit log" documents it; the
// test reads the JSON names itself rather than the driver's types.
type auditLine struct {
	Time         *time.Time `json:"time"`
	Event        string     `json:"event"`
	Namespace    string     `json:"namespace"`
	Job          string     `json:"job"`
	ParentJob    string     `json:"parent_job"`
	AllocID      string     `json:"alloc_id"`
	Task         string     `json:"task"`
	TaskID       string     `json:"task_id"`
	Node         string     `json:"node"`
	NodeID       string     `json:"node_id"`
	SandboxID    string     `json:"sandbox_id"`
	RunscVersion string     `json:"runsc_version"`
	Platform     string     `json:"platform"`
	Rootfs       string     `json:"rootfs"`
	Command      []string   `json:"command"`
	User         string     `json:"user"`
	Policy       *struct {
		Capabilities   []string `json:"capabilities"`
		ReadonlyRootfs *bool    `json:"readonly_rootfs"`
		Mounts         []struct {
			Source      string `json:"source"`
			Destination string `json:"destination"`
			Readonly    bool   `json:"readonly"`
		} `json:"mounts"`
		Tmpfs       []string `json:"tmpfs"`
		MemoryBytes int64    `json:"memory_bytes"`
		CPUShares   uint64   `json:"cpu_shares"`
		PidsLimit   int64    `json:"pids_limit"`
		Timeout     string   `json:"timeout"`
		Network     string   `json:"network"`
	} `json:"policy"`
	StartedAt   *time.Time `json:"started_at"`
	CompletedAt *time.Time `json:"completed_at"`
	ExitCode    *int       `json:"exit_code"`
	Signal      int        `json:"signal"`
	OOMKilled   bool       `json:"oom_killed"`
	TimedOut    bool       `json:"time_limit_exceeded"`
	Error       string     `json:"error"`

	raw string
}

// readAuditLog parses every line of the log; any line that is not a
// complete JSON object fails the test.
func readAuditLog(t *testing.T, path string) []*auditLine {
	t.Helper()
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	must.NoError(t, err)
	if len(b) > 0 && b[len(b)-1] != '\n' {
		// A writer may be between lines; only a complete line counts.
		b = b[:bytes.LastIndexByte(b, '\n')+1]
	}
	var out []*auditLine
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		var obj map[string]any
		must.NoError(t, json.Unmarshal([]byte(line), &obj), must.Sprintf("audit log line %d is not a JSON object: %q", n, line))
		var l auditLine
		must.NoError(t, json.Unmarshal([]byte(line), &l), must.Sprintf("audit log line %d: %q", n, line))
		l.raw = line
		out = append(out, &l)
	}
	must.NoError(t, sc.Err())
	return out
}

// byAlloc groups the lines of one allocation, in order.
func byAlloc(lines []*auditLine, allocID string) []*auditLine {
	var out []*auditLine
	for _, l := range lines {
		if l.AllocID == allocID {
			out = append(out, l)
		}
	}
	return out
}

func events(lines []*auditLine) []string {
	var out []string
	for _, l := range lines {
		out = append(out, l.Event)
	}
	return out
}

// allocNode is the node of an allocation, as the API names it.
func allocNode(t *testing.T, allocID string) (id, name string) {
	t.Helper()
	var a struct{ NodeID, NodeName string }
	must.NoError(t, apiGet("/v1/allocation/"+url.PathEscape(allocID), &a))
	return a.NodeID, a.NodeName
}

// With audit_log set, the real agent's tasks leave JSON lines: a batch task
// sandbox_started then sandbox_exited, a task the node refuses
// sandbox_refused only, a dispatched child both with its parent job; each
// line names the namespace, job, allocation, task, node, sandbox, runsc,
// command, user and policy, and the end adds the exit code.
func TestAuditLog(t *testing.T) {
	defer catchPanic(t)
	logPath := filepath.Join(t.TempDir(), "audit.log")
	suite.withPluginConfig(t, append(append([]string{}, suitePluginConfig...), fmt.Sprintf("audit_log = %q", logPath))...)
	version := runscVersion(t)

	// (a) A batch task.
	normalScript := "echo audited; exit 0"
	normal := shellJob(t, "batch", normalScript)
	normal.User = "app"
	normal.ExtraConfig = []string{"pids_limit = 77", `timeout = "2m"`}
	nj := runJob(t, normal)

	// (b) A task the node refuses.
	refused := shellJob(t, "batch", "echo should not run")
	refused.ExtraConfig = []string{`cap_add = ["NET_ADMIN"]`}
	rj := runJob(t, refused)

	// (c) A dispatched child of a parameterized job; it exits 5.
	childScript := "echo dispatched; exit 5"
	parent := &paramJob{Script: childScript}
	registerParamJob(t, parent)
	res := nomadCLI(t, time.Minute, "", "job", "dispatch", "-detach", "-meta", "git_ref=e2e", parent.Name)
	must.Eq(t, 0, res.Code, must.Sprintf("nomad job dispatch: %s", res))
	m := regexp.MustCompile(`Dispatched Job ID\s*=\s*(\S+)`).FindStringSubmatch(res.Stdout)
	must.NotNil(t, m, must.Sprintf("no dispatched job ID in: %s", res))
	childJob := m[1]
	cj := &runningJob{spec: &jobSpec{Name: childJob, Task: "check"}}
	cj.allocID = waitOneAlloc(t, childJob)
	t.Logf("dispatched %s: allocation %s", childJob, cj.allocID)

	na, nts := nj.waitDone(t)
	must.Eq(t, "complete", na.ClientStatus, must.Sprintf("task: %s", nts))
	ra, rts := rj.waitDone(t)
	must.Eq(t, "failed", ra.ClientStatus, must.Sprintf("task: %s", rts))
	must.Len(t, 0, rts.events("Started"), must.Sprintf("task: %s", rts))
	ca, cts := cj.waitDone(t)
	must.Eq(t, "failed", ca.ClientStatus, must.Sprintf("task: %s", cts))
	must.Eq(t, 5, exitCodeOf(t, cts))

	// The ends are recorded by the supervisors, at the moment the tasks
	// end; wait for the complete sets.
	want := map[string][]string{
		nj.allocID: {"sandbox_started", "sandbox_exited"},
		rj.allocID: {"sandbox_refused"},
		cj.allocID: {"sandbox_started", "sandbox_exited"},
	}
	var lines []*auditLine
	must.Wait(t, wait.InitialSuccess(
		wait.ErrorFunc(func() error {
			lines = readAuditLog(t, logPath)
			for id, evs := range want {
				// In any order here; the order is checked below.
				got := events(byAlloc(lines, id))
				sort.Strings(got)
				if strings.Join(got, ",") != strings.Join(sorted(evs), ",") {
					return fmt.Errorf("allocation %s: events %q, want %q", id, got, evs)
				}
			}
			return nil
		}),
		wait.Timeout(30*time.Second),
		wait.Gap(250*time.Millisecond),
	), must.Func(func() string {
		var raw []string
		for _, l := range lines {
			raw = append(raw, l.raw)
		}
		return "the audit log does not hold one complete record set per task; it holds:\n" + strings.Join(raw, "\n")
	}))
	for _, l := range lines {
		t.Logf("audit: %s", l.raw)
	}
	fi, err := os.Stat(logPath)
	must.NoError(t, err)
	must.Eq(t, os.FileMode(0o600), fi.Mode().Perm(), must.Sprint("the audit log is readable by others"))
	b, err := os.ReadFile(logPath)
	must.NoError(t, err)
	must.True(t, len(b) > 0 && b[len(b)-1] == '\n', must.Sprint("the audit log does not end with a complete line"))

	// common checks what every line of an allocation says about who and
	// where.
	common := func(t *testing.T, l *auditLine, job, parentJob, allocID, task string) {
		t.Helper()
		nodeID, nodeName := allocNode(t, allocID)
		must.NotNil(t, l.Time, must.Sprintf("no time: %s", l.raw))
		must.Eq(t, "default", l.Namespace, must.Sprint(l.raw))
		must.Eq(t, job, l.Job, must.Sprint(l.raw))
		must.Eq(t, parentJob, l.ParentJob, must.Sprint(l.raw))
		must.Eq(t, allocID, l.AllocID, must.Sprint(l.raw))
		must.Eq(t, task, l.Task, must.Sprint(l.raw))
		must.StrHasPrefix(t, allocID+"/"+task+"/", l.TaskID, must.Sprint(l.raw))
		must.Eq(t, nodeName, l.Node, must.Sprint(l.raw))
		must.Eq(t, nodeID, l.NodeID, must.Sprint(l.raw))
	}
	// ran checks a started/exited pair.
	ran := func(t *testing.T, allocID, job, parentJob, task string, command []string, user string, pids int64, timeout string, exitCode int, term *taskEvent) {
		t.Helper()
		set := byAlloc(lines, allocID)
		for _, l := range set {
			common(t, l, job, parentJob, allocID, task)
			must.StrHasPrefix(t, sandboxPrefix(allocID), l.SandboxID, must.Sprint(l.raw))
			must.Eq(t, version, l.RunscVersion, must.Sprint(l.raw))
			must.Eq(t, "systrap", l.Platform, must.Sprint(l.raw))
			must.Eq(t, suite.rootfs, l.Rootfs, must.Sprint(l.raw))
			must.Eq(t, command, l.Command, must.Sprint(l.raw))
			must.Eq(t, user, l.User, must.Sprint(l.raw))
			p := l.Policy
			must.NotNil(t, p, must.Sprintf("no policy: %s", l.raw))
			must.NotNil(t, p.Capabilities, must.Sprintf("the policy does not list capabilities: %s", l.raw))
			must.SliceEmpty(t, p.Capabilities, must.Sprint(l.raw))
			must.NotNil(t, p.ReadonlyRootfs, must.Sprint(l.raw))
			must.True(t, *p.ReadonlyRootfs, must.Sprint(l.raw))
			mounts := map[string]string{}
			for _, mt := range p.Mounts {
				mounts[mt.Destination] = mt.Source
			}
			allocDir := filepath.Join(suite.dataDir, "alloc", allocID)
			must.Eq(t, filepath.Join(allocDir, "alloc"), mounts["/alloc"], must.Sprint(l.raw))
			must.Eq(t, filepath.Join(allocDir, task, "local"), mounts["/local"], must.Sprint(l.raw))
			must.Eq(t, filepath.Join(allocDir, task, "secrets"), mounts["/secrets"], must.Sprint(l.raw))
			must.Eq(t, []string{"/tmp"}, p.Tmpfs, must.Sprint(l.raw))
			must.Eq(t, int64(128<<20), p.MemoryBytes, must.Sprint(l.raw))
			must.Eq(t, uint64(100), p.CPUShares, must.Sprint(l.raw))
			must.Eq(t, pids, p.PidsLimit, must.Sprint(l.raw))
			must.Eq(t, timeout, p.Timeout, must.Sprint(l.raw))
			must.Eq(t, "none", p.Network, must.Sprint(l.raw))
		}
		// The two lines are about the same sandbox under the same
		// policy.
		started, exited := set[0], set[1]
		if started.Event != "sandbox_started" {
			started, exited = exited, started
		}
		must.Eq(t, started.SandboxID, exited.SandboxID)
		p0, _ := json.Marshal(started.Policy)
		p1, _ := json.Marshal(exited.Policy)
		must.Eq(t, string(p0), string(p1), must.Sprint("the start and the end name different policies"))

		must.NotNil(t, started.StartedAt, must.Sprint(started.raw))
		must.Nil(t, started.ExitCode, must.Sprintf("the start line has an exit code: %s", started.raw))
		must.NotNil(t, exited.StartedAt, must.Sprint(exited.raw))
		must.NotNil(t, exited.CompletedAt, must.Sprint(exited.raw))
		must.False(t, exited.CompletedAt.Before(*exited.StartedAt), must.Sprint(exited.raw))
		must.NotNil(t, exited.ExitCode, must.Sprintf("the end has no exit code: %s", exited.raw))
		must.Eq(t, exitCode, *exited.ExitCode, must.Sprint(exited.raw))
		must.Eq(t, 0, exited.Signal, must.Sprint(exited.raw))
		must.False(t, exited.OOMKilled, must.Sprint(exited.raw))
		must.False(t, exited.TimedOut, must.Sprint(exited.raw))
		// Nomad saw the same end, after the supervisor recorded it.
		must.NotNil(t, term)
		must.Eq(t, term.ExitCode, *exited.ExitCode)
		must.False(t, exited.Time.After(time.Unix(0, term.Time).Add(time.Second)),
			must.Sprintf("the end was recorded at %s, after Nomad's Terminated event at %s", exited.Time, time.Unix(0, term.Time)))

		// The start is recorded before the task runs ("No unaudited
		// run"), so before its end, and names the start the end names.
		auditGap(t, strictAuditStart, set[0] == started,
			"the sandbox_exited line precedes the sandbox_started line of allocation %s:\n%s\n%s", allocID, set[0].raw, set[1].raw)
		if started.StartedAt != nil && exited.StartedAt != nil {
			d := started.StartedAt.Sub(*exited.StartedAt)
			auditGap(t, strictAuditStart, d > -10*time.Millisecond && d < 10*time.Millisecond,
				"allocation %s: the sandbox_started line says started_at %s, the sandbox_exited line %s (%s apart)",
				allocID, started.StartedAt.Format(time.RFC3339Nano), exited.StartedAt.Format(time.RFC3339Nano), d)
			if exited.CompletedAt != nil {
				auditGap(t, strictAuditStart, !started.Time.After(*exited.CompletedAt),
					"allocation %s: the start was recorded at %s, after the task had ended at %s",
					allocID, started.Time.Format(time.RFC3339Nano), exited.CompletedAt.Format(time.RFC3339Nano))
			}
		}
	}
	terminated := func(ts *taskState) *taskEvent {
		if evs := ts.events("Terminated"); len(evs) == 1 {
			return evs[0]
		}
		return nil
	}

	t.Run("batch task", func(t *testing.T) {
		defer catchPanic(t)
		ran(t, nj.allocID, normal.Name, "", "main", []string{"/bin/sh", "-c", normalScript},
			"app (uid 1000, gid 1000)", 77, "2m0s", 0, terminated(nts))
	})

	t.Run("refused task", func(t *testing.T) {
		defer catchPanic(t)
		set := byAlloc(lines, rj.allocID)
		l := set[0]
		common(t, l, refused.Name, "", rj.allocID, "main")
		must.StrContains(t, l.Error, "NET_ADMIN", must.Sprint(l.raw))
		must.StrContains(t, l.Error, "allow_caps", must.Sprint(l.raw))
		must.Nil(t, l.ExitCode, must.Sprint(l.raw))
		must.Nil(t, l.StartedAt, must.Sprint(l.raw))
		// README: "Every line names ... runsc version and platform, the
		// rootfs (and image), the command, the user".
		var missing []string
		for name, v := range map[string]string{"runsc_version": l.RunscVersion, "platform": l.Platform, "rootfs": l.Rootfs, "command": strings.Join(l.Command, " ")} {
			if v == "" {
				missing = append(missing, name)
			}
		}
		sort.Strings(missing)
		auditGap(t, strictAuditRefused, len(missing) == 0, "the sandbox_refused line lacks %v, which README says every line names: %s", missing, l.raw)
	})

	t.Run("dispatched child", func(t *testing.T) {
		defer catchPanic(t)
		// No task user: root. The name is checked apart (auditGap).
		set := byAlloc(lines, cj.allocID)
		ran(t, cj.allocID, childJob, parent.Name, "check", []string{"/bin/sh", "-c", childScript},
			set[0].User, 1024, "10m0s", 5, terminated(cts))
		for _, l := range set {
			must.StrHasSuffix(t, " (uid 0, gid 0)", l.User, must.Sprint(l.raw))
			name := strings.TrimSuffix(l.User, " (uid 0, gid 0)")
			auditGap(t, strictAuditUser, name != "" && strings.TrimSpace(name) == name,
				"a task without `user` is recorded as user %q: the name is missing (want e.g. \"root (uid 0, gid 0)\")", l.User)
		}
	})

	// Only the three tasks' lines, and nothing about other allocations.
	var others []string
	for _, l := range lines {
		if _, ok := want[l.AllocID]; !ok {
			others = append(others, l.raw)
		}
	}
	sort.Strings(others)
	must.SliceEmpty(t, others, must.Sprint("audit lines about allocations the test did not start"))
}

// Known gaps of the driver's audit records. TestAuditLog logs them as
// KNOWN DRIVER BUG instead of failing while the constant is false; set it to
// true once the driver is fixed.
const (
	// strictAuditStart: driver/task.go launch() writes the
	// sandbox_started line only after sup.Start has returned, that is
	// after `runsc run --detach` has started the task, while the task's
	// supervisor writes sandbox_exited on its own the moment the task
	// ends. So the task runs before its start is recorded (README: "No
	// unaudited run"), the started line's started_at is the plugin's
	// clock after the start rather than the supervisor's start time
	// that the exited line carries (0.1-0.4 s apart here), and a short
	// task's sandbox_exited line can come first in the file (seen: a
	// task that ended at .809 had its exit written at .833 and its start
	// at .837, with started_at .837).
	strictAuditStart = true
	// strictAuditRefused: a sandbox_refused line names only who and
	// where (namespace, job, allocation, task, node) and the error: no
	// runsc version, platform, rootfs or command, although README's
	// "Audit log" says every line names them (driver.refuse writes the
	// record that auditRecord started, before auditPolicy fills it).
	strictAuditRefused = true
	// strictAuditUser: a task without a `user` is recorded as
	// " (uid 0, gid 0)": auditPolicy formats cfg.User, which is empty,
	// instead of the resolved user's name.
	strictAuditUser = true
)

func sorted(l []string) []string {
	out := append([]string{}, l...)
	sort.Strings(out)
	return out
}

func auditGap(t *testing.T, strict, ok bool, format string, args ...any) {
	t.Helper()
	if ok {
		return
	}
	msg := fmt.Sprintf(format, args...)
	if strict {
		t.Error(msg)
	} else {
		t.Logf("KNOWN DRIVER BUG (not failing the test; see the strictAudit* constants): %s", msg)
	}
}
