package driver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"github.com/creack/pty"
	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

// execProcess writes the process file for `runsc exec`: the task's own user,
// environment, working directory and capabilities with a different argv, so
// an exec never has more privilege than the task.
func (d *Driver) execProcess(h *taskHandle, cmd []string, tty bool) (string, func(), error) {
	if len(cmd) == 0 {
		return "", nil, errors.New("exec: command is empty")
	}
	spec, err := runtime.ReadBundle(runtime.StateDir(h.stateDir).Bundle())
	if err != nil {
		return "", nil, fmt.Errorf("exec: %w", err)
	}
	p := *spec.Process
	p.Args = cmd
	p.Terminal = tty
	if tty {
		p.Env = append(append([]string{}, p.Env...), "TERM=xterm")
	}
	f, err := os.CreateTemp(h.stateDir, runtime.StateDir(h.stateDir).ExecProcessPattern())
	if err != nil {
		return "", nil, fmt.Errorf("exec: %w", err)
	}
	remove := func() { _ = os.Remove(f.Name()) }
	if err := runtime.EncodeProcess(f, &p); err != nil {
		f.Close()
		remove()
		return "", nil, fmt.Errorf("exec: %w", err)
	}
	if err := f.Close(); err != nil {
		remove()
		return "", nil, fmt.Errorf("exec: %w", err)
	}
	return f.Name(), remove, nil
}

// ExecTask runs a command in the sandbox and collects its output; script
// checks use it.
func (d *Driver) ExecTask(taskID string, cmd []string, timeout time.Duration) (*drivers.ExecTaskResult, error) {
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return nil, drivers.ErrTaskNotFound
	}
	procFile, remove, err := d.execProcess(h, cmd, false)
	if err != nil {
		return nil, err
	}
	defer remove()
	ctx, cancel := context.WithTimeout(d.ctx, timeout)
	defer cancel()
	c := d.runsc.ExecCommand(ctx, h.sandboxID, runtime.ExecOpts{ProcessFile: procFile})
	stdout, stderr := &headWriter{max: ExecOutputLimit}, &headWriter{max: ExecOutputLimit}
	c.Stdout = stdout
	c.Stderr = stderr
	err = c.Run()
	res := &drivers.ExecTaskResult{Stdout: stdout.buf, Stderr: stderr.buf, ExitResult: &drivers.ExitResult{}}
	if err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			return nil, fmt.Errorf("exec in sandbox %s: %w", h.sandboxID, err)
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("exec in sandbox %s: timed out after %s", h.sandboxID, timeout)
		}
		res.ExitResult.ExitCode = ee.ExitCode()
	}
	return res, nil
}

// ExecOutputLimit is how much of each of stdout and stderr ExecTask keeps
// (script checks): the rest is read and discarded, so that a command that
// prints without end neither grows the plugin nor blocks on a full pipe.
const ExecOutputLimit = 64 << 10

// headWriter keeps the first max bytes written to it and discards the rest.
type headWriter struct {
	buf []byte
	max int
}

func (w *headWriter) Write(p []byte) (int, error) {
	if room := w.max - len(w.buf); room > 0 {
		w.buf = append(w.buf, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

// ExecTaskStreaming serves `nomad alloc exec`, with or without a TTY.
func (d *Driver) ExecTaskStreaming(ctx context.Context, taskID string, opts *drivers.ExecOptions) (*drivers.ExitResult, error) {
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return nil, drivers.ErrTaskNotFound
	}
	procFile, remove, err := d.execProcess(h, opts.Command, opts.Tty)
	if err != nil {
		return nil, err
	}
	defer remove()
	c := d.runsc.ExecCommand(ctx, h.sandboxID, runtime.ExecOpts{ProcessFile: procFile})
	if opts.Tty {
		return execTTY(ctx, c, opts)
	}
	return execPipes(c, opts)
}

func execPipes(c *exec.Cmd, opts *drivers.ExecOptions) (*drivers.ExitResult, error) {
	stdin, err := c.StdinPipe()
	if err != nil {
		return nil, err
	}
	c.Stdout = opts.Stdout
	c.Stderr = opts.Stderr
	if err := c.Start(); err != nil {
		return nil, fmt.Errorf("exec: %w", err)
	}
	go func() {
		_, _ = io.Copy(stdin, opts.Stdin)
		stdin.Close()
	}()
	return exitFromWait(c.Wait())
}

func execTTY(ctx context.Context, c *exec.Cmd, opts *drivers.ExecOptions) (*drivers.ExitResult, error) {
	ptmx, tty, err := pty.Open()
	if err != nil {
		return nil, fmt.Errorf("exec: open pty: %w", err)
	}
	defer ptmx.Close()
	c.Stdin, c.Stdout, c.Stderr = tty, tty, tty
	c.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	if err := c.Start(); err != nil {
		tty.Close()
		return nil, fmt.Errorf("exec: %w", err)
	}
	tty.Close()

	resizeCtx, stopResize := context.WithCancel(ctx)
	defer stopResize()
	go func() {
		for {
			select {
			case <-resizeCtx.Done():
				return
			case sz, ok := <-opts.ResizeCh:
				if !ok {
					return
				}
				_ = pty.Setsize(ptmx, &pty.Winsize{Rows: uint16(sz.Height), Cols: uint16(sz.Width)})
			}
		}
	}()
	go func() { _, _ = io.Copy(ptmx, opts.Stdin) }()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		// EIO on the master means the last replica closed: output done.
		_, _ = io.Copy(opts.Stdout, ptmx)
	}()
	res, err := exitFromWait(c.Wait())
	waitTimeout(&wg, 5*time.Second)
	return res, err
}

func exitFromWait(err error) (*drivers.ExitResult, error) {
	if err == nil {
		return &drivers.ExitResult{}, nil
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return &drivers.ExitResult{ExitCode: ee.ExitCode()}, nil
	}
	return nil, fmt.Errorf("exec: %w", err)
}

func waitTimeout(wg *sync.WaitGroup, d time.Duration) {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
	}
}
