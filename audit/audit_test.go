package audit

import (
	"bufio"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/shoenig/test/must"
)

func TestLog_ConcurrentWritersNeverInterleave(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := &Log{Path: path}
	const writers, each = 16, 50
	// Long lines make a torn or interleaved write visible.
	cmd := []string{strings.Repeat("x", 8192)}
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < each; i++ {
				must.NoError(t, l.Write(&Record{Event: EventStarted, Task: "t", AllocID: string(rune('a' + w)), Command: cmd}, i%10 == 0))
			}
		}(w)
	}
	wg.Wait()

	f, err := os.Open(path)
	must.NoError(t, err)
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 64*1024)
	lines := 0
	for sc.Scan() {
		var r Record
		must.NoError(t, json.Unmarshal(sc.Bytes(), &r), must.Sprintf("line %d is not a whole record", lines+1))
		must.Eq(t, EventStarted, r.Event)
		must.Eq(t, cmd, r.Command)
		must.False(t, r.Time.IsZero())
		lines++
	}
	must.NoError(t, sc.Err())
	must.Eq(t, writers*each, lines)
	fi, err := os.Stat(path)
	must.NoError(t, err)
	must.Eq(t, os.FileMode(0o600), fi.Mode().Perm())
}

func TestLog_RotationStartsANewFile(t *testing.T) {
	dir := t.TempDir()
	l := &Log{Path: filepath.Join(dir, "audit.log")}
	must.NoError(t, l.Write(&Record{Event: EventStarted}, true))
	must.NoError(t, os.Rename(l.Path, l.Path+".1"))
	must.NoError(t, l.Write(&Record{Event: EventExited}, true))
	old, err := os.ReadFile(l.Path + ".1")
	must.NoError(t, err)
	cur, err := os.ReadFile(l.Path)
	must.NoError(t, err)
	must.StrContains(t, string(old), EventStarted)
	must.StrContains(t, string(cur), EventExited)
	must.StrNotContains(t, string(cur), EventStarted)
}

func TestLog_UnwritableIsAnError(t *testing.T) {
	l := &Log{Path: filepath.Join(t.TempDir(), "missing-dir", "audit.log")}
	err := l.Write(&Record{Event: EventStarted}, false)
	must.Error(t, err)
	must.StrContains(t, err.Error(), "audit log ")
}

// A link or a FIFO at the log's path (a local user who can write to its
// directory) is refused: root never appends through the link, and the write
// never waits for a reader of the FIFO.
func TestLog_LinkAndFIFORefused(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "elsewhere")
	must.NoError(t, os.WriteFile(target, []byte("canary\n"), 0o600))
	link := filepath.Join(dir, "link.log")
	must.NoError(t, os.Symlink(target, link))
	must.Error(t, (&Log{Path: link}).Write(&Record{Event: EventStarted}, true))
	b, err := os.ReadFile(target)
	must.NoError(t, err)
	must.EqOp(t, "canary\n", string(b))

	fifo := filepath.Join(dir, "fifo.log")
	must.NoError(t, syscall.Mkfifo(fifo, 0o600))
	done := make(chan error, 1)
	go func() { done <- (&Log{Path: fifo}).Write(&Record{Event: EventStarted}, true) }()
	select {
	case err := <-done:
		// ENXIO with no reader, "not a regular file" with one.
		must.Error(t, err)
	case <-time.After(10 * time.Second):
		// Unblock the writer so the test can end.
		if f, err := os.OpenFile(fifo, os.O_RDONLY|syscall.O_NONBLOCK, 0); err == nil {
			f.Close()
		}
		t.Fatal("the write waited for a reader of the FIFO")
	}
}
