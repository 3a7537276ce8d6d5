//go:build e2e

package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"text/template"
	"time"

	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"
)

// dispatchTool is cmd/sandbox-dispatch, built once into the suite's
// directory.
var dispatchTool struct {
	once sync.Once
	path string
	err  error
}

func dispatchBin(t *testing.T) string {
	t.Helper()
	dispatchTool.once.Do(func() {
		p := filepath.Join(suite.tmp, "sandbox-dispatch")
		cmd := exec.Command("go", "build", "-o", p, "./cmd/sandbox-dispatch")
		cmd.Dir = suite.repo
		if out, err := cmd.CombinedOutput(); err != nil {
			dispatchTool.err = fmt.Errorf("go build ./cmd/sandbox-dispatch: %v\n%s", err, out)
			return
		}
		dispatchTool.path = p
	})
	must.NoError(t, dispatchTool.err)
	return dispatchTool.path
}

// paramJob is a parameterized batch job with one sandbox task, "check",
// shaped like example-jobs/ci-dispatch.nomad.hcl.
type paramJob struct {
	Name        string
	Rootfs      string
	Script      string // run with /bin/sh -c; write $var, never ${var}
	Timeout     string // the task config's timeout; empty: none
	MemoryMB    int    // 0: 128
	Restarts    int    // restart attempts (1s apart)
	Reschedules int    // reschedule attempts (5s apart)
}

var paramJobTemplate = template.Must(template.New("param").Funcs(template.FuncMap{"hcl": hclString}).Parse(`job {{hcl .Name}} {
  type        = "batch"
  datacenters = ["*"]

  parameterized {
    payload       = "optional"
    meta_required = ["git_ref"]
    meta_optional = ["repo_url"]
  }

  group "ci" {
    restart {
      attempts = {{.Restarts}}
      delay    = "1s"
      mode     = "fail"
    }

    reschedule {
{{- if .Reschedules}}
      attempts       = {{.Reschedules}}
      interval       = "1h"
      delay          = "5s"
      delay_function = "constant"
{{- else}}
      attempts = 0
{{- end}}
      unlimited = false
    }

    task "check" {
      driver       = "sandbox"
      kill_timeout = "20s"

      dispatch_payload {
        file = "input.json"
      }

      config {
        rootfs  = {{hcl .Rootfs}}
        command = "/bin/sh"
        args    = ["-c", {{hcl .Script}}]
{{- with .Timeout}}
        timeout = {{hcl .}}
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

// registerParamJob registers the job; its cleanup purges it and every job
// dispatched from it, and checks that the driver left nothing behind.
func registerParamJob(t *testing.T, j *paramJob) {
	t.Helper()
	if j.Name == "" {
		j.Name = jobName(t)
	}
	if j.Rootfs == "" {
		j.Rootfs = suite.rootfs
	}
	var b bytes.Buffer
	must.NoError(t, paramJobTemplate.Execute(&b, j))
	registerJobFile(t, j.Name, b.String())
}

// registerJobFile registers a jobspec with `nomad job run`, and purges the
// job and its dispatched children when the test ends.
func registerJobFile(t *testing.T, name, spec string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "job.nomad.hcl")
	must.NoError(t, os.WriteFile(path, []byte(spec), 0o600))
	res := nomadCLI(t, time.Minute, "", "job", "run", "-detach", path)
	must.Eq(t, 0, res.Code, must.Sprintf("nomad job run failed:\n%s\njob file:\n%s", res, spec))
	t.Cleanup(func() { purgeWithChildren(t, name) })
}

// purgeWithChildren purges a parent job and the jobs dispatched from it,
// then checks that every allocation they had ended and left nothing.
func purgeWithChildren(t *testing.T, parent string) {
	if suite.agentExited() {
		t.Errorf("agent is not running; cannot stop job %s", parent)
		return
	}
	var children []struct{ ID string }
	if err := apiGet("/v1/jobs?prefix="+url.QueryEscape(parent+"/"), &children); err != nil {
		t.Errorf("list the children of %s: %v", parent, err)
	}
	var allocIDs []string
	for _, c := range children {
		var allocs []allocation
		if err := apiGet("/v1/job/"+url.PathEscape(c.ID)+"/allocations", &allocs); err != nil {
			t.Errorf("allocations of %s: %v", c.ID, err)
		}
		for _, a := range allocs {
			allocIDs = append(allocIDs, a.ID)
			if err := suite.recordAlloc(a.ID); err != nil {
				t.Errorf("record allocation: %v", err)
			}
		}
		if out, err := runNomad(time.Minute, "job", "stop", "-purge", "-detach", c.ID); err != nil {
			t.Errorf("nomad job stop -purge %s: %v\n%s", c.ID, err, out)
		}
	}
	if out, err := runNomad(time.Minute, "job", "stop", "-purge", "-detach", parent); err != nil {
		t.Errorf("nomad job stop -purge %s: %v\n%s", parent, err, out)
	}
	for _, id := range allocIDs {
		var left []string
		err := wait.InitialSuccess(
			wait.ErrorFunc(func() error {
				a, err := getAlloc(id)
				if err != nil {
					return err
				}
				if !allocDone(a) {
					return fmt.Errorf("allocation %s is %s", a.ID, a.ClientStatus)
				}
				if left = suite.leftovers(sandboxPrefix(id)); len(left) > 0 {
					return fmt.Errorf("left behind: %v", left)
				}
				return nil
			}),
			wait.Timeout(60*time.Second),
			wait.Gap(250*time.Millisecond),
		).Run()
		if err != nil {
			t.Errorf("after purging the jobs dispatched from %s: %v", parent, err)
		}
	}
}

// dispatchResult is one run of sandbox-dispatch.
type dispatchResult struct {
	cliResult
	took time.Duration
}

// dispatch runs sandbox-dispatch against the suite's agent.
func dispatch(t *testing.T, stdin string, args ...string) dispatchResult {
	t.Helper()
	args = append([]string{"-address", suite.addr()}, args...)
	start := time.Now()
	res := runCmd(t, 4*time.Minute, stdin, dispatchBin(t), args...)
	r := dispatchResult{cliResult: res, took: time.Since(start)}
	t.Logf("sandbox-dispatch %s: exit %d in %s\nstdout:\n%s\nstderr:\n%s",
		strings.Join(args, " "), res.Code, r.took.Round(time.Millisecond), res.Stdout, res.Stderr)
	return r
}

// childOf is the dispatched job's ID, from the tool's stderr.
func childOf(t *testing.T, r dispatchResult) string {
	t.Helper()
	m := regexp.MustCompile(`dispatched job (\S+) `).FindStringSubmatch(r.Stderr)
	must.NotNil(t, m, must.Sprintf("the tool did not name the dispatched job:\n%s", r.Stderr))
	return m[1]
}

// The tool dispatches with a payload and meta, streams the task's stdout
// and stderr apart, exits with the task's verdict, and collects what the
// task left in /alloc/data.
func TestDispatch(t *testing.T) {
	defer catchPanic(t)

	t.Run("payload and meta", func(t *testing.T) {
		defer catchPanic(t)
		t.Parallel()
		j := &paramJob{Script: `
echo "payload: $(cat /local/input.json)"
echo "git_ref=$NOMAD_META_git_ref"
echo "GIT_REF=$NOMAD_META_GIT_REF"
echo "repo_url=$NOMAD_META_repo_url"
echo "job=$NOMAD_JOB_ID"
echo "to-stderr" >&2
echo '{"ok":true}' > /alloc/data/result.json
mkdir -p /alloc/data/reports
echo '<testsuite/>' > /alloc/data/reports/junit.xml
echo done
`}
		registerParamJob(t, j)
		out := t.TempDir()
		r := dispatch(t, `{"build":42}`, "-job", j.Name, "-meta", "git_ref=abc123",
			"-meta", "repo_url=https://git.example.com/app.git", "-payload", "-", "-collect", out, "-timeout", "2m")
		must.Eq(t, 0, r.Code, must.Sprint(r.Stderr))
		child := childOf(t, r)
		must.StrHasPrefix(t, j.Name+"/dispatch-", child)
		for _, want := range []string{
			`payload: {"build":42}`, "git_ref=abc123", "GIT_REF=abc123",
			"repo_url=https://git.example.com/app.git", "job=" + child, "done",
		} {
			must.Eq(t, 1, strings.Count(r.Stdout, want+"\n"), must.Sprintf("stdout should hold %q once:\n%s", want, r.Stdout))
		}
		// The streams are kept apart.
		must.StrNotContains(t, r.Stdout, "to-stderr")
		must.Eq(t, 1, strings.Count(r.Stderr, "to-stderr\n"))
		must.StrContains(t, r.Stderr, "verdict: exit 0")

		b, err := os.ReadFile(filepath.Join(out, "result.json"))
		must.NoError(t, err)
		must.Eq(t, "{\"ok\":true}\n", string(b))
		b, err = os.ReadFile(filepath.Join(out, "reports", "junit.xml"))
		must.NoError(t, err)
		must.Eq(t, "<testsuite/>\n", string(b))
	})

	t.Run("output in order, once", func(t *testing.T) {
		defer catchPanic(t)
		t.Parallel()
		// Bursts with pauses, so that some lines come through the live
		// stream and the last burst, right before the exit, through
		// the final read of the log files.
		j := &paramJob{Script: `
i=0
while [ $i -lt 12000 ]; do
  echo "line $i"
  echo "err $i" >&2
  i=$((i+1))
  if [ $((i % 4000)) -eq 0 ]; then sleep 1; fi
done
`}
		registerParamJob(t, j)
		r := dispatch(t, "", "-job", j.Name, "-meta", "git_ref=x", "-timeout", "2m")
		must.Eq(t, 0, r.Code, must.Sprint(r.Stderr))
		checkSequence(t, r.Stdout, "line", 12000)
		var errLines []string
		for _, l := range strings.SplitAfter(r.Stderr, "\n") {
			if strings.HasPrefix(l, "err ") {
				errLines = append(errLines, l)
			}
		}
		checkSequence(t, strings.Join(errLines, ""), "err", 12000)
	})

	t.Run("failing run", func(t *testing.T) {
		defer catchPanic(t)
		t.Parallel()
		j := &paramJob{Script: "echo about to fail; exit 3"}
		registerParamJob(t, j)
		r := dispatch(t, "", "-job", j.Name, "-meta", "git_ref=x", "-timeout", "2m")
		must.Eq(t, 3, r.Code, must.Sprint(r.Stderr))
		must.StrContains(t, r.Stdout, "about to fail\n")
		must.StrContains(t, r.Stderr, "verdict: exit 3: the task exited with code 3")
	})

	t.Run("time limit", func(t *testing.T) {
		defer catchPanic(t)
		t.Parallel()
		j := &paramJob{Script: "echo sleeping; sleep 60", Timeout: "2s"}
		registerParamJob(t, j)
		r := dispatch(t, "", "-job", j.Name, "-meta", "git_ref=x", "-timeout", "2m")
		must.Eq(t, 124, r.Code, must.Sprint(r.Stderr))
		must.StrContains(t, r.Stdout, "sleeping\n")
		must.RegexMatch(t, regexp.MustCompile(`verdict: exit 124: (Time limit exceeded: .*timeout is 2s|the task's timeout ended it: time limit of 2s exceeded)`), r.Stderr)
		must.Less(t, 45*time.Second, r.took, must.Sprint("the verdict came long after the time limit"))
	})

	t.Run("OOM killed", func(t *testing.T) {
		defer catchPanic(t)
		t.Parallel()
		j := &paramJob{Script: "echo filling; dd if=/dev/zero of=/tmp/x bs=1M count=512 2>&1; echo survived", MemoryMB: 64}
		registerParamJob(t, j)
		r := dispatch(t, "", "-job", j.Name, "-meta", "git_ref=x", "-timeout", "2m")
		must.Eq(t, 137, r.Code, must.Sprint(r.Stderr))
		must.StrContains(t, r.Stdout, "filling\n")
		must.StrNotContains(t, r.Stdout, "survived")
		must.StrContains(t, r.Stderr, "OOM killed")
	})

	t.Run("concurrent dispatches", func(t *testing.T) {
		defer catchPanic(t)
		t.Parallel()
		// Each dispatch exits with its own git_ref as its code, after the
		// others have started.
		j := &paramJob{Script: `echo "ref=$NOMAD_META_git_ref"; sleep 3; echo "end $NOMAD_META_git_ref"; exit $NOMAD_META_git_ref`}
		registerParamJob(t, j)
		refs := []int{0, 5, 9}
		results := make([]dispatchResult, len(refs))
		var wg sync.WaitGroup
		for i, ref := range refs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer catchPanic(t)
				results[i] = dispatch(t, "", "-job", j.Name, "-meta", "git_ref="+strconv.Itoa(ref), "-timeout", "2m")
			}()
		}
		wg.Wait()
		children := map[string]bool{}
		for i, ref := range refs {
			r := results[i]
			must.Eq(t, ref, r.Code, must.Sprintf("dispatch with git_ref=%d:\n%s", ref, r.Stderr))
			must.Eq(t, fmt.Sprintf("ref=%d\nend %d\n", ref, ref), r.Stdout)
			children[childOf(t, r)] = true
		}
		must.MapLen(t, len(refs), children, must.Sprint("the dispatches did not each get a job of their own"))
	})

	t.Run("restart: the last attempt counts", func(t *testing.T) {
		defer catchPanic(t)
		t.Parallel()
		j := &paramJob{Restarts: 1, Script: `
if [ -e /alloc/data/tried ]; then echo second attempt; exit 0; fi
touch /alloc/data/tried
echo first attempt
exit 7
`}
		registerParamJob(t, j)
		r := dispatch(t, "", "-job", j.Name, "-meta", "git_ref=x", "-timeout", "2m")
		must.Eq(t, 0, r.Code, must.Sprint(r.Stderr))
		must.Eq(t, "first attempt\nsecond attempt\n", r.Stdout)
	})

	t.Run("reschedule: the last allocation counts", func(t *testing.T) {
		defer catchPanic(t)
		t.Parallel()
		j := &paramJob{Reschedules: 1, Script: `echo "attempt in $NOMAD_ALLOC_ID"; exit 6`}
		registerParamJob(t, j)
		r := dispatch(t, "", "-job", j.Name, "-meta", "git_ref=x", "-timeout", "2m")
		must.Eq(t, 6, r.Code, must.Sprint(r.Stderr))
		ids := regexp.MustCompile(`attempt in (\S+)`).FindAllStringSubmatch(r.Stdout, -1)
		must.Len(t, 2, ids, must.Sprintf("want the output of two allocations:\n%s", r.Stdout))
		must.NotEq(t, ids[0][1], ids[1][1])
		must.StrContains(t, r.Stderr, "rescheduled it as "+ids[1][1])
	})

	t.Run("never ran", func(t *testing.T) {
		defer catchPanic(t)
		t.Parallel()
		j := &paramJob{Rootfs: filepath.Join(suite.rootfsDir, "no-such-rootfs"), Script: "echo should not run"}
		registerParamJob(t, j)
		r := dispatch(t, "", "-job", j.Name, "-meta", "git_ref=x", "-timeout", "2m")
		must.Eq(t, 125, r.Code, must.Sprint(r.Stderr))
		must.StrContains(t, r.Stderr, "no-such-rootfs")
		must.Eq(t, "", r.Stdout)
	})

	t.Run("dispatch refused", func(t *testing.T) {
		defer catchPanic(t)
		t.Parallel()
		j := &paramJob{Script: "echo should not run"}
		registerParamJob(t, j)
		for _, tc := range []struct {
			args []string
			want string
		}{
			{[]string{"-job", j.Name + "-missing", "-meta", "git_ref=x"}, "not found"},
			{[]string{"-job", j.Name}, "git_ref"},
			{[]string{"-job", j.Name, "-meta", "git_ref=x", "-meta", "unknown_key=1"}, "unknown_key"},
			{[]string{"-job", j.Name, "-meta", "git_ref=x", "-task", "nope"}, `no task "nope"`},
		} {
			r := dispatch(t, "", tc.args...)
			must.Eq(t, 126, r.Code, must.Sprintf("args %q: %s", tc.args, r.Stderr))
			must.StrContains(t, r.Stderr, tc.want)
			must.StrContains(t, r.Stderr, "verdict: exit 126")
		}
		// Nothing was dispatched.
		var children []struct{ ID string }
		must.NoError(t, apiGet("/v1/jobs?prefix="+url.QueryEscape(j.Name+"/"), &children))
		must.SliceEmpty(t, children)
	})

	t.Run("tool timeout stops the job", func(t *testing.T) {
		defer catchPanic(t)
		t.Parallel()
		j := &paramJob{Script: "echo started; sleep 120"}
		registerParamJob(t, j)
		r := dispatch(t, "", "-job", j.Name, "-meta", "git_ref=x", "-timeout", "8s")
		must.Eq(t, 124, r.Code, must.Sprint(r.Stderr))
		must.StrContains(t, r.Stderr, "-timeout 8s passed while the task ran")
		waitJobStopped(t, childOf(t, r))
	})

	t.Run("interrupt stops the job", func(t *testing.T) {
		defer catchPanic(t)
		t.Parallel()
		j := &paramJob{Script: "echo started; sleep 120"}
		registerParamJob(t, j)
		d := startDispatch(t, "-job", j.Name, "-meta", "git_ref=x")
		must.NoError(t, d.cmd.Process.Signal(syscall.SIGINT))
		code := d.exitCode(t, 60*time.Second)
		must.Eq(t, 130, code, must.Sprint(d.stderr.String()))
		r := dispatchResult{cliResult: cliResult{Stdout: d.stdout.String(), Stderr: d.stderr.String()}}
		waitJobStopped(t, childOf(t, r))
	})

	t.Run("example job", func(t *testing.T) {
		defer catchPanic(t)
		t.Parallel()
		// example-jobs/ci-dispatch.nomad.hcl as it is, with the suite's
		// rootfs and a job name of the test's own.
		b, err := os.ReadFile(filepath.Join(suite.repo, "example-jobs", "ci-dispatch.nomad.hcl"))
		must.NoError(t, err)
		spec := string(b)
		name := jobName(t)
		for old, new := range map[string]string{
			`job "ci-dispatch" {`:                               `job "` + name + `" {`,
			`rootfs  = "/var/lib/nomad-sandbox/rootfs/busybox"`: `rootfs  = "` + suite.rootfs + `"`,
		} {
			must.StrContains(t, spec, old)
			spec = strings.Replace(spec, old, new, 1)
		}
		registerJobFile(t, name, spec)
		out := t.TempDir()
		r := dispatch(t, `{"pipeline":"e2e"}`, "-job", name, "-meta", "git_ref=0123abcd",
			"-meta", "repo_url=https://git.example.com/app.git", "-payload", "-", "-collect", out, "-timeout", "2m")
		must.Eq(t, 0, r.Code, must.Sprint(r.Stderr))
		must.StrContains(t, r.Stdout, "ci: checking 0123abcd")
		must.StrContains(t, r.Stdout, "ci: repository https://git.example.com/app.git")
		must.StrContains(t, r.Stdout, `{"pipeline":"e2e"}`)
		b, err = os.ReadFile(filepath.Join(out, "result.json"))
		must.NoError(t, err)
		must.Eq(t, `{"git_ref":"0123abcd","status":"passed"}`+"\n", string(b))
	})
}

// The tool rides out a restart of the agent while the task runs: its API
// calls are retried, the log stream is followed again where it stopped, and
// the verdict and all the output arrive.
func TestDispatchAcrossAgentRestart(t *testing.T) {
	defer catchPanic(t)
	j := &paramJob{Script: waitForMarker}
	registerParamJob(t, j)
	d := startDispatch(t, "-job", j.Name, "-meta", "git_ref=x", "-timeout", "4m")
	child := childOf(t, dispatchResult{cliResult: cliResult{Stderr: d.stderr.String()}})
	var allocs []allocation
	must.NoError(t, apiGet("/v1/job/"+url.PathEscape(child)+"/allocations", &allocs))
	must.Len(t, 1, allocs)

	start := time.Now()
	must.NoError(t, suite.restartAgent(syscall.SIGINT))
	t.Logf("agent restarted in %s", time.Since(start).Round(time.Millisecond))
	marker := filepath.Join(suite.dataDir, "alloc", allocs[0].ID, "alloc", "data", "go")
	must.NoError(t, os.WriteFile(marker, nil, 0o644))

	code := d.exitCode(t, 3*time.Minute)
	t.Logf("stdout:\n%s\nstderr:\n%s", d.stdout.String(), d.stderr.String())
	must.Eq(t, 4, code, must.Sprint(d.stderr.String()))
	must.Eq(t, "started\nfinishing\n", d.stdout.String())
}

// runningDispatch is sandbox-dispatch running in the background.
type runningDispatch struct {
	cmd            *exec.Cmd
	stdout, stderr *syncBuffer
	done           chan error
}

// startDispatch starts sandbox-dispatch against the suite's agent with args
// and waits until the task has printed "started"; the tool is killed when
// the test ends.
func startDispatch(t *testing.T, args ...string) *runningDispatch {
	t.Helper()
	cmd := exec.Command(dispatchBin(t), append([]string{"-address", suite.addr()}, args...)...)
	cmd.Env = cleanEnv()
	d := &runningDispatch{cmd: cmd, stdout: &syncBuffer{}, stderr: &syncBuffer{}, done: make(chan error, 1)}
	cmd.Stdout, cmd.Stderr = d.stdout, d.stderr
	must.NoError(t, cmd.Start())
	go func() { d.done <- cmd.Wait() }()
	t.Cleanup(func() { _ = cmd.Process.Kill() })
	must.Wait(t, wait.InitialSuccess(
		wait.BoolFunc(func() bool { return strings.Contains(d.stdout.String(), "started") }),
		wait.Timeout(90*time.Second),
		wait.Gap(200*time.Millisecond),
	), must.Func(func() string { return "the task's output never came; stderr:\n" + d.stderr.String() }))
	return d
}

// exitCode waits up to timeout for the tool to end with a non-zero code
// and returns it.
func (d *runningDispatch) exitCode(t *testing.T, timeout time.Duration) int {
	t.Helper()
	var err error
	select {
	case err = <-d.done:
	case <-time.After(timeout):
		t.Fatalf("the tool did not end; stderr:\n%s", d.stderr.String())
	}
	var ee *exec.ExitError
	must.True(t, errors.As(err, &ee), must.Sprintf("exit: %v", err))
	return ee.ExitCode()
}

// checkSequence checks that out is exactly "<word> 0\n" to "<word> n-1\n".
func checkSequence(t *testing.T, out, word string, n int) {
	t.Helper()
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if len(lines) != n {
		t.Errorf("%d %q lines, want %d", len(lines), word, n)
	}
	for i, l := range lines {
		if want := fmt.Sprintf("%s %d", word, i); l != want {
			t.Fatalf("line %d is %q, want %q (lines lost, doubled or out of order)", i, l, want)
		}
	}
}

// waitJobStopped waits until the job is marked stopped and its allocations
// have ended.
func waitJobStopped(t *testing.T, id string) {
	t.Helper()
	must.Wait(t, wait.InitialSuccess(
		wait.ErrorFunc(func() error {
			var job struct{ Stop bool }
			if err := apiGet("/v1/job/"+url.PathEscape(id), &job); err != nil {
				return err
			}
			if !job.Stop {
				return errors.New("the job is not stopped")
			}
			var allocs []allocation
			if err := apiGet("/v1/job/"+url.PathEscape(id)+"/allocations", &allocs); err != nil {
				return err
			}
			for _, a := range allocs {
				if !allocDone(&a) {
					return fmt.Errorf("allocation %s is %s", a.ID, a.ClientStatus)
				}
			}
			return nil
		}),
		wait.Timeout(60*time.Second),
		wait.Gap(250*time.Millisecond),
	), must.Sprintf("job %s was not stopped", id))
}
