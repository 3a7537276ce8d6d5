// Command sandbox-dispatch dispatches a parameterized Nomad job, follows the
// one allocation the dispatch created, streams its task's stdout and stderr,
// and exits with the task's verdict. It is meant for CI: a pipeline step runs
//
//	sandbox-dispatch -job ci -meta git_ref=$SHA -payload build.json
//
// and passes or fails with the task, without parsing any CLI output. It talks
// to Nomad only through the HTTP API (github.com/hashicorp/nomad/api).
//
// # What it follows
//
// Only the child job that its own dispatch returned: two dispatches of the
// same job, at the same time, each follow their own child job, allocation and
// logs. In that child job it follows one task: the one named by -task, or
// the job's only main task (a task without a lifecycle block). The task's
// group must have count = 1.
//
// Restarts inside the allocation are followed (the logs continue, the
// verdict is the last attempt's). If the allocation fails and Nomad
// reschedules it (the group's reschedule policy allows it), the tool follows
// the replacement allocation and reports the last one. For CI, a job with
// restart attempts 0 and rescheduling off fails fast and is simplest to read
// (see example-jobs/ci-dispatch.nomad.hcl).
//
// # Exit codes
//
//	0-255  the task's own exit code (128+N when the task was ended by signal N)
//	124    time limit: the task's timeout ended it (the driver's "Time limit
//	       exceeded"), or -timeout passed while the task ran (the tool then
//	       stops the dispatched job)
//	125    the task did not run to its end: it never started (driver failure,
//	       refused task config, setup failure, not placed before -timeout),
//	       Nomad stopped its allocation, the allocation was lost, or Nomad
//	       marked the task failed although it exited 0
//	126    the dispatch itself failed: bad flags, unknown or not parameterized
//	       job, missing meta, payload too large, API unreachable or refused
//	137    OOM killed: the sandbox reached its memory limit
//	130    interrupted (SIGINT; 143 for SIGTERM): the tool stopped the
//	       dispatched job before exiting
//
// A task can itself exit with 124, 125, 126 or 137; the last line the tool
// writes to stderr ("sandbox-dispatch: ... verdict: ...") always says which
// outcome it was.
//
// # Output
//
// The task's stdout goes to the tool's stdout and the task's stderr to the
// tool's stderr, as the task wrote them. The tool's own lines go to stderr and
// start with "sandbox-dispatch: ".
//
// With -collect DIR, once the task has ended (passed or failed), the files
// the task wrote to /alloc/data (the allocation's alloc/data directory) are
// copied into DIR: reports, test results, build outputs. Only regular files
// and directories are copied; a failure to copy is reported on stderr and
// does not change the exit code.
//
// # ACL
//
// The token needs dispatch-job, read-job and read-logs in the job's namespace,
// and submit-job to stop the job on -timeout or interruption.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"
)

// Exit codes for outcomes that are not the task's own exit code.
const (
	exitTimeLimit      = 124
	exitDidNotRun      = 125
	exitDispatchFailed = 126
	exitOOMKilled      = 137
)

const usageText = `Usage: sandbox-dispatch -job JOB [options]

Dispatch the parameterized Nomad job JOB, stream its task's stdout and stderr,
and exit with the task's exit code.

Options:
  -job JOB          the parameterized job to dispatch (required)
  -meta KEY=VALUE   dispatch meta; repeat for several keys
  -payload FILE     the dispatch payload, read from FILE ("-": stdin);
                    the job's dispatch_payload block says where it lands
  -task NAME        the task to follow (default: the job's only main task)
  -collect DIR      when the task has ended, copy the allocation's alloc/data
                    directory (what the task wrote to /alloc/data) into DIR
  -address URL      Nomad's HTTP API (default $NOMAD_ADDR, else
                    http://127.0.0.1:4646)
  -token TOKEN      ACL token (default $NOMAD_TOKEN)
  -namespace NS     the job's namespace (default $NOMAD_NAMESPACE, else
                    "default")
  -timeout D        limit on the whole run, from dispatch to verdict, as a Go
                    duration ("30m", "2h"); 0: no limit (default 1h)
  -h                show this help

Exit codes:
  0-255  the task's own exit code (128+N when ended by signal N)
  124    time limit: the task's timeout ended it, or -timeout passed while
         it ran (the tool then stops the dispatched job)
  125    the task did not run to its end: it never started (driver failure,
         refused config, setup failure, not placed before -timeout), its
         allocation was stopped or lost, or Nomad marked it failed
  126    the dispatch failed: bad flags, unknown or not parameterized job,
         missing meta, payload too large, API unreachable or refused
  137    OOM killed: the task reached its memory limit
  130    interrupted (143 on SIGTERM); the dispatched job is stopped

The task can exit with 124-126 or 137 itself: the tool's last stderr line
("sandbox-dispatch: ... verdict: ...") says which outcome it was.

Example:
  sandbox-dispatch -job ci -meta git_ref=$(git rev-parse HEAD) \
      -meta repo_url=https://git.example.com/app.git -payload ci.json
`

// options are the parsed command line.
type options struct {
	job       string
	meta      map[string]string
	payload   string // file name, "-" for stdin, "" for none
	task      string
	collect   string
	address   string
	token     string
	namespace string
	timeout   time.Duration
}

// metaFlag collects repeated -meta KEY=VALUE flags.
type metaFlag map[string]string

func (m metaFlag) String() string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = k + "=" + m[k]
	}
	return strings.Join(parts, ",")
}

func (m metaFlag) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || strings.TrimSpace(k) == "" {
		return fmt.Errorf("%q is not KEY=VALUE", s)
	}
	if _, dup := m[k]; dup {
		return fmt.Errorf("meta key %q is given twice", k)
	}
	m[k] = v
	return nil
}

// errHelp is returned by parseArgs for -h.
var errHelp = flag.ErrHelp

// parseArgs parses the command line; environment defaults are applied by
// the caller through getenv.
func parseArgs(args []string, getenv func(string) string) (*options, error) {
	o := &options{meta: map[string]string{}}
	fs := flag.NewFlagSet("sandbox-dispatch", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&o.job, "job", "", "")
	fs.Var(metaFlag(o.meta), "meta", "")
	fs.StringVar(&o.payload, "payload", "", "")
	fs.StringVar(&o.task, "task", "", "")
	fs.StringVar(&o.collect, "collect", "", "")
	fs.StringVar(&o.address, "address", "", "")
	fs.StringVar(&o.token, "token", "", "")
	fs.StringVar(&o.namespace, "namespace", "", "")
	fs.DurationVar(&o.timeout, "timeout", time.Hour, "")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q: every option is a flag (-job JOB)", fs.Arg(0))
	}
	if o.job == "" {
		return nil, errors.New("-job is required")
	}
	if o.timeout < 0 {
		return nil, errors.New("-timeout must not be negative (0: no limit)")
	}
	if o.address == "" {
		o.address = getenv("NOMAD_ADDR")
	}
	if o.address == "" {
		o.address = "http://127.0.0.1:4646"
	}
	if o.token == "" {
		o.token = getenv("NOMAD_TOKEN")
	}
	if o.namespace == "" {
		o.namespace = getenv("NOMAD_NAMESPACE")
	}
	return o, nil
}

// readPayload reads the -payload file ("-": stdin).
func readPayload(name string, stdin io.Reader) ([]byte, error) {
	switch name {
	case "":
		return nil, nil
	case "-":
		b, err := io.ReadAll(stdin)
		if err != nil {
			return nil, fmt.Errorf("read the payload from stdin: %w", err)
		}
		return b, nil
	default:
		b, err := os.ReadFile(name)
		if err != nil {
			return nil, fmt.Errorf("read the payload: %w", err)
		}
		return b, nil
	}
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	o, err := parseArgs(args, os.Getenv)
	if errors.Is(err, errHelp) {
		fmt.Fprint(stdout, usageText)
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "sandbox-dispatch: %v (see sandbox-dispatch -h)\n", err)
		return exitDispatchFailed
	}
	payload, err := readPayload(o.payload, stdin)
	if err != nil {
		fmt.Fprintf(stderr, "sandbox-dispatch: %v\n", err)
		return exitDispatchFailed
	}

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)

	r, err := newRunner(o, stdout, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "sandbox-dispatch: %v\n", err)
		return exitDispatchFailed
	}
	return r.run(payload, sigs)
}
