// Package runtime turns a Nomad task into an OCI bundle, drives the runsc
// binary, and supervises one sandbox per task.
package runtime

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// runscEnv is the whole environment of runsc and of the supervisor: nothing
// of the plugin's own reaches them.
func runscEnv() []string { return []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"} }

// Runsc is the runsc binary and the global flags every verb shares. It holds
// no mutable state, so one value serves concurrent callers.
type Runsc struct {
	// Path is the runsc executable.
	Path string
	// Root is runsc's state directory (--root); it should be on tmpfs.
	Root string
	// Platform is the gVisor platform (--platform).
	Platform Platform
}

// ExitError is returned when runsc ran and exited non-zero. Stderr carries
// what runsc said, so callers never have to log it separately.
type ExitError struct {
	Verb   string
	Code   int
	Stderr string
}

func (e *ExitError) Error() string {
	msg := strings.TrimSpace(e.Stderr)
	if msg == "" {
		msg = "no output"
	}
	return fmt.Sprintf("runsc %s: exit status %d: %s", e.Verb, e.Code, msg)
}

// ErrNotExist is wrapped by errors for a container runsc does not know.
var ErrNotExist = errors.New("container does not exist")

func (r *Runsc) globalArgs() []string {
	args := []string{"--root", r.Root}
	if r.Platform != "" {
		args = append(args, "--platform", r.Platform.String())
	}
	return args
}

// command builds the exec.Cmd of every runsc call: the global flags, then
// global (a verb's own flags that runsc reads only before the verb), the
// verb and its arguments. It is the only place that makes a runsc argv.
func (r *Runsc) command(ctx context.Context, global []string, verb string, args []string) *exec.Cmd {
	argv := append(r.globalArgs(), global...)
	argv = append(argv, verb)
	argv = append(argv, args...)
	cmd := exec.CommandContext(ctx, r.Path, argv...)
	// runsc must never inherit the plugin's environment: the sandbox's
	// environment comes from the spec alone.
	cmd.Env = runscEnv()
	return cmd
}

func (r *Runsc) run(ctx context.Context, verb string, args []string, stdin io.Reader) ([]byte, error) {
	cmd := r.command(ctx, nil, verb, args)
	var stdout, stderr bytes.Buffer
	cmd.Stdin = stdin
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			xe := &ExitError{Verb: verb, Code: ee.ExitCode(), Stderr: stderr.String()}
			if isNotExist(xe.Stderr) {
				return nil, fmt.Errorf("%w: %w", xe, ErrNotExist)
			}
			return nil, xe
		}
		return nil, fmt.Errorf("runsc %s: %w", verb, err)
	}
	return stdout.Bytes(), nil
}

func isNotExist(stderr string) bool {
	return strings.Contains(stderr, "does not exist") ||
		strings.Contains(stderr, "no such file or directory") ||
		strings.Contains(stderr, "not found")
}

// Version returns the first line of `runsc --version`.
func (r *Runsc) Version(ctx context.Context) (string, error) {
	out, err := r.run(ctx, "--version", nil, nil)
	if err != nil {
		return "", err
	}
	line, _, _ := strings.Cut(string(out), "\n")
	v := strings.TrimSpace(strings.TrimPrefix(line, "runsc version"))
	if v == "" {
		return "", fmt.Errorf("runsc --version: unexpected output %q", out)
	}
	return v, nil
}

// RunOpts are the options of `runsc run`. They are part of the supervisor's
// spec: the driver chooses them, the supervisor runs them.
type RunOpts struct {
	Bundle string
	// Network is --network: "none", "sandbox" or "host".
	Network string
	// Overlay is --overlay2, e.g. "none" or "root:memory".
	Overlay string
	// HostUDS is --host-uds; empty keeps runsc's default ("none").
	HostUDS string
	// NetRaw is --net-raw: raw sockets for a task that holds CAP_NET_RAW
	// (gVisor gives none without it, whatever the capability set says).
	NetRaw bool
	// LogFile receives runsc's own log (--log).
	LogFile string
	// PanicLog receives Go runtime messages of the sandbox (--panic-log).
	PanicLog string
	// PodInitConfig is --pod-init-config: the trail's trace session. The
	// supervisor sets it when the task has a trail; empty, runsc starts
	// no trace session.
	PodInitConfig string
	// PidFile receives the sandbox's pid (--pid-file). The supervisor sets
	// it: the sandbox is its child to wait for.
	PidFile string `json:",omitempty"`
}

// args returns the global-position flags and the verb flags of a detached
// `run`. Flags such as --network and --overlay2 are global in runsc and must
// come before the verb.
func (o RunOpts) args(id string) (global, verb []string) {
	if o.Network != "" {
		global = append(global, "--network", o.Network)
	}
	if o.Overlay != "" {
		global = append(global, "--overlay2", o.Overlay)
	}
	if o.HostUDS != "" {
		global = append(global, "--host-uds", o.HostUDS)
	}
	if o.NetRaw {
		global = append(global, "--net-raw")
	}
	if o.LogFile != "" {
		global = append(global, "--log", o.LogFile, "--log-format", "text")
	}
	if o.PanicLog != "" {
		global = append(global, "--panic-log", o.PanicLog)
	}
	if o.PodInitConfig != "" {
		global = append(global, "--pod-init-config", o.PodInitConfig)
	}
	verb = []string{"--detach"}
	if o.PidFile != "" {
		verb = append(verb, "--pid-file", o.PidFile)
	}
	verb = append(verb, "--bundle", o.Bundle, id)
	return global, verb
}

// Run runs the container detached (`runsc run --detach`): one runsc process
// creates and starts the sandbox, writes its pid to o.PidFile and exits, and
// the sandbox is reparented to the nearest subreaper. The sandbox's stdin is
// /dev/null, its stdout and stderr are the files given. The error is
// exec's, for the caller to add runsc's log to.
func (r *Runsc) Run(ctx context.Context, id string, o RunOpts, stdout, stderr *os.File) error {
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return err
	}
	defer devnull.Close()
	global, verb := o.args(id)
	cmd := r.command(ctx, global, "run", verb)
	cmd.Stdin = devnull
	cmd.Stdout = stdout
	cmd.Stderr = stderr
	cmd.Dir = "/"
	return cmd.Run()
}

// KillOpts are the options of `runsc kill`.
type KillOpts struct {
	// All signals every process in the container, not just its init.
	All bool
}

func (o KillOpts) args(id string, sig syscall.Signal) []string {
	var a []string
	if o.All {
		a = append(a, "--all")
	}
	return append(a, id, strconv.Itoa(int(sig)))
}

// Kill sends sig to the container.
func (r *Runsc) Kill(ctx context.Context, id string, sig syscall.Signal, o KillOpts) error {
	_, err := r.run(ctx, "kill", o.args(id, sig), nil)
	return err
}

// DeleteOpts are the options of `runsc delete`.
type DeleteOpts struct {
	Force bool
}

func (o DeleteOpts) args(id string) []string {
	if o.Force {
		return []string{"--force", id}
	}
	return []string{id}
}

// Delete removes the container's state and, with Force, kills it first.
func (r *Runsc) Delete(ctx context.Context, id string, o DeleteOpts) error {
	_, err := r.run(ctx, "delete", o.args(id), nil)
	return err
}

// State is the part of `runsc state` the driver uses.
type State struct {
	ID      string `json:"id"`
	Pid     int    `json:"pid"`
	Status  string `json:"status"`
	Bundle  string `json:"bundle"`
	Created string `json:"created"`
}

// State returns the container's state.
func (r *Runsc) State(ctx context.Context, id string) (*State, error) {
	out, err := r.run(ctx, "state", []string{id}, nil)
	if err != nil {
		return nil, err
	}
	var s State
	if err := json.Unmarshal(out, &s); err != nil {
		return nil, fmt.Errorf("runsc state %s: decode: %w", id, err)
	}
	return &s, nil
}

// List returns the IDs of every container under Root.
func (r *Runsc) List(ctx context.Context) ([]string, error) {
	out, err := r.run(ctx, "list", []string{"--quiet"}, nil)
	if err != nil {
		return nil, err
	}
	return strings.Fields(string(out)), nil
}

// Stats is what `runsc events --stats` reports that the driver uses.
type Stats struct {
	CPUTotalNs  uint64
	MemoryUsage uint64
	Pids        uint64
}

// EventsStats returns one sample of `runsc events --stats`.
func (r *Runsc) EventsStats(ctx context.Context, id string) (*Stats, error) {
	out, err := r.run(ctx, "events", []string{"--stats", id}, nil)
	if err != nil {
		return nil, err
	}
	var ev struct {
		Data struct {
			CPU struct {
				Usage struct {
					Total uint64 `json:"total"`
				} `json:"usage"`
			} `json:"cpu"`
			Memory struct {
				Usage struct {
					Usage uint64 `json:"usage"`
				} `json:"usage"`
			} `json:"memory"`
			Pids struct {
				Current uint64 `json:"current"`
			} `json:"pids"`
		} `json:"data"`
	}
	if err := json.Unmarshal(out, &ev); err != nil {
		return nil, fmt.Errorf("runsc events %s: decode: %w", id, err)
	}
	return &Stats{
		CPUTotalNs:  ev.Data.CPU.Usage.Total,
		MemoryUsage: ev.Data.Memory.Usage.Usage,
		Pids:        ev.Data.Pids.Current,
	}, nil
}

// ExecOpts are the options of `runsc exec`.
type ExecOpts struct {
	// ProcessFile is a JSON OCI process; it carries argv, env, cwd, user and
	// capabilities so nothing of the job reaches runsc as a flag.
	ProcessFile string
}

func (o ExecOpts) args(id string) []string {
	return []string{"--process", o.ProcessFile, id}
}

// ExecCommand returns `runsc exec`, unstarted, for the caller to wire stdio.
func (r *Runsc) ExecCommand(ctx context.Context, id string, o ExecOpts) *exec.Cmd {
	return r.command(ctx, nil, "exec", o.args(id))
}

// Exists reports whether runsc knows the container.
func (r *Runsc) Exists(ctx context.Context, id string) (bool, error) {
	_, err := r.State(ctx, id)
	if err == nil {
		return true, nil
	}
	if errors.Is(err, ErrNotExist) {
		return false, nil
	}
	if _, statErr := os.Stat(r.Root); errors.Is(statErr, os.ErrNotExist) {
		return false, nil
	}
	return false, err
}

// ReleaseRoot unmounts what runsc keeps mounted under its root between
// sandboxes (the shared empty network namespace of --network=none) and
// removes the root if nothing else is left in it. It is for tests and for
// tearing a root down; a live plugin keeps its root.
func (r *Runsc) ReleaseRoot() error {
	nullNS := filepath.Join(r.Root, "null-netns")
	// Sandboxes started at the same moment can each mount it, stacking
	// mounts: unmount until nothing is mounted there.
	for i := 0; ; i++ {
		err := unix.Unmount(nullNS, unix.MNT_DETACH)
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			break
		}
		if err != nil || i == 64 {
			return fmt.Errorf("unmount %s: %w", nullNS, err)
		}
	}
	_ = os.Remove(nullNS)
	_ = os.Remove(r.Root)
	return nil
}
