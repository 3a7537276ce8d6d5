package main

import (
	"context"
	"io"
	"regexp"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/nomad/api"
)

// logStream copies one of a task's log streams (stdout or stderr) to out,
// each byte once, through Nomad's logs API only (the read-logs capability):
// live through a follow stream while the task runs, and at the end by
// reading the log once more from the start and writing only what was not
// written yet.
//
// Nomad keeps a stream in files <task>.<type>.N (N counts rotations), and
// every frame it sends names its file. A read from the start goes through
// the files in order from offset 0, so counting the bytes of each file as
// they come gives their offsets; file and pos record how far out has got.
type logStream struct {
	c     *api.Client
	alloc *api.Allocation
	task  string
	typ   string // "stdout" or "stderr"
	out   io.Writer

	mu       sync.Mutex
	file     string // the file of the last byte written ("" before the first)
	pos      int64  // bytes of file written
	seenFile string // the file the current read is in
	seen     int64  // bytes of seenFile the current read has gone through
	lastData time.Time

	cancel chan struct{}
	done   chan struct{}
	err    error // why the follow stream ended by itself
}

func newLogStream(c *api.Client, alloc *api.Allocation, task, typ string, out io.Writer) *logStream {
	return &logStream{c: c, alloc: alloc, task: task, typ: typ, out: out}
}

// open starts a read from the start of the log.
func (s *logStream) open(ctx context.Context, follow bool, cancel chan struct{}) (<-chan *api.StreamFrame, <-chan error) {
	s.mu.Lock()
	s.seenFile, s.seen = "", 0
	s.mu.Unlock()
	q := (&api.QueryOptions{}).WithContext(ctx)
	return s.c.AllocFS().Logs(s.alloc, follow, s.task, s.typ, "start", 0, cancel, q)
}

// consume writes the part of a frame that was not written yet and returns
// how many bytes that was.
func (s *logStream) consume(f *api.StreamFrame) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(f.Data) == 0 {
		return 0
	}
	if f.File != s.seenFile {
		s.seenFile, s.seen = f.File, 0
	}
	start := s.seen
	s.seen += int64(len(f.Data))
	data := f.Data
	if s.file != "" {
		cur, idx := logIndex(s.file), logIndex(f.File)
		switch {
		case idx < cur:
			return 0
		case idx == cur:
			if s.seen <= s.pos {
				return 0
			}
			if start < s.pos {
				data = data[s.pos-start:]
			}
		}
	}
	n, _ := s.out.Write(data)
	s.file, s.pos = f.File, s.seen
	s.lastData = time.Now()
	return n
}

// follow starts copying the stream live.
func (s *logStream) follow(ctx context.Context) {
	cancel := make(chan struct{})
	done := make(chan struct{})
	s.mu.Lock()
	s.cancel, s.done, s.err = cancel, done, nil
	s.mu.Unlock()
	frames, errs := s.open(ctx, true, cancel)
	go func() {
		defer close(done)
		for {
			select {
			case <-cancel:
				// The API client's reader notices at its next frame or
				// heartbeat; keep its channel drained until then.
				go func() {
					for range frames {
					}
				}()
				return
			case err := <-errs:
				s.setErr(err)
				return
			case f, ok := <-frames:
				if !ok {
					s.setErr(io.ErrUnexpectedEOF)
					return
				}
				s.consume(f)
			}
		}
	}()
}

func (s *logStream) setErr(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.err = err
}

// following reports whether the follow stream runs; if it ended by itself,
// it also returns why.
func (s *logStream) following() (bool, error) {
	s.mu.Lock()
	done, err := s.done, s.err
	s.mu.Unlock()
	if done == nil {
		return false, nil
	}
	select {
	case <-done:
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		return false, err
	default:
		return true, nil
	}
}

// stop ends the follow stream; once it returns, the stream writes nothing
// more by itself.
func (s *logStream) stop() {
	s.mu.Lock()
	cancel, done := s.cancel, s.done
	s.cancel = nil
	s.mu.Unlock()
	if cancel == nil {
		return
	}
	close(cancel)
	<-done
}

// readAll reads the log from the start to its current end and writes what
// was not written yet; it returns how many bytes that was.
func (s *logStream) readAll(ctx context.Context) (int64, error) {
	cancel := make(chan struct{})
	defer close(cancel)
	frames, errs := s.open(ctx, false, cancel)
	var total int64
	for {
		select {
		case <-ctx.Done():
			return total, ctx.Err()
		case err := <-errs:
			return total, err
		case f, ok := <-frames:
			if !ok {
				return total, nil
			}
			total += int64(s.consume(f))
		}
	}
}

// logIndex is the rotation index at the end of a log file's name, -1 if
// it has none.
func logIndex(file string) int {
	m := logIndexRe.FindStringSubmatch(file)
	if m == nil {
		return -1
	}
	i, _ := strconv.Atoi(m[1])
	return i
}

var logIndexRe = regexp.MustCompile(`\.(\d+)$`)

// taskLogs are a task's stdout and stderr.
type taskLogs struct {
	streams  []*logStream
	warned   bool
	restarts time.Time // when broken follow streams were last started again
}

func newTaskLogs(c *api.Client, alloc *api.Allocation, task string, stdout, stderr io.Writer) *taskLogs {
	return &taskLogs{streams: []*logStream{
		newLogStream(c, alloc, task, "stdout", stdout),
		newLogStream(c, alloc, task, "stderr", stderr),
	}}
}

func (l *taskLogs) follow(ctx context.Context) {
	for _, s := range l.streams {
		s.follow(ctx)
	}
}

// repair starts again the follow streams that broke (the API connection
// dropped, an agent restarted), at most once a second; they go on where
// the output stopped. It reports whether any stream was broken.
func (l *taskLogs) repair(ctx context.Context, logf func(string, ...any)) bool {
	broken := false
	for _, s := range l.streams {
		live, err := s.following()
		if live || err == nil {
			continue
		}
		broken = true
		if !l.warned {
			logf("following the task's %s stopped (%v); following again", s.typ, err)
			l.warned = true
		}
		if time.Since(l.restarts) < time.Second {
			continue
		}
		s.stop()
		s.follow(ctx)
	}
	if broken && time.Since(l.restarts) >= time.Second {
		l.restarts = time.Now()
	}
	return broken
}

// stop ends the follow streams.
func (l *taskLogs) stop() {
	for _, s := range l.streams {
		s.stop()
	}
}

// finish copies the rest of the output once the task has ended. Nomad's log
// collector may write the task's last bytes shortly after the task is
// reported dead, so the live streams run on until they (and the task) have
// been quiet for a second; then the log is read once more from the start
// for anything they did not bring.
func (l *taskLogs) finish(ctx context.Context, logf func(string, ...any)) {
	const quiet = time.Second
	ended := time.Now()
	for time.Since(ended) < 10*quiet {
		calm := true
		for _, s := range l.streams {
			s.mu.Lock()
			last := s.lastData
			s.mu.Unlock()
			if last.Before(ended) {
				last = ended
			}
			if time.Since(last) < quiet {
				calm = false
			}
		}
		if calm {
			break
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(100 * time.Millisecond):
		}
	}
	l.stop()
	for _, s := range l.streams {
		for i := 0; i < 5; i++ {
			n, err := s.readAll(ctx)
			if err != nil {
				if ctx.Err() == nil {
					logf("reading the task's %s: %v; its last output may be missing", s.typ, err)
				}
				break
			}
			if n == 0 {
				break
			}
			// Late output: read again shortly, until none comes.
			select {
			case <-ctx.Done():
				return
			case <-time.After(500 * time.Millisecond):
			}
		}
	}
}
