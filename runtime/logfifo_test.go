package runtime

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/shoenig/test/must"
	"golang.org/x/sys/unix"
)

// readFIFO makes a FIFO at path, as Nomad's logmon does, and reads it
// until the last writer closes; the channel gets what was read.
func readFIFO(t *testing.T, path string) <-chan []byte {
	t.Helper()
	must.NoError(t, unix.Mkfifo(path, 0o600))
	ch := make(chan []byte, 1)
	go func() {
		// A blocking open: it returns when the writer comes.
		f, err := os.OpenFile(path, os.O_RDONLY, 0)
		if err != nil {
			ch <- nil
			return
		}
		defer f.Close()
		b, _ := io.ReadAll(f)
		ch <- b
	}()
	return ch
}

func recvFIFO(t *testing.T, ch <-chan []byte) []byte {
	t.Helper()
	select {
	case b := <-ch:
		return b
	case <-time.After(30 * time.Second):
		t.Fatal("the log FIFO's writer never closed")
		return nil
	}
}

// openLog writes only to a FIFO reached without a symbolic link: a link to
// a host file, a regular file, a missing path and a link in a parent
// directory are refused with nothing written or created.
func TestOpenLog_RefusesAnythingButAFIFO(t *testing.T) {
	base := t.TempDir()
	logs := filepath.Join(base, "alloc", "logs")
	must.NoError(t, os.MkdirAll(logs, 0o755))
	canary := filepath.Join(t.TempDir(), "canary")
	must.NoError(t, os.WriteFile(canary, []byte("host secret\n"), 0o600))
	canaryDir := filepath.Dir(canary)
	fifo := filepath.Join(t.TempDir(), "real.fifo")
	must.NoError(t, unix.Mkfifo(fifo, 0o600))

	must.NoError(t, os.Symlink(canary, filepath.Join(logs, "link.fifo")))
	must.NoError(t, os.Symlink(fifo, filepath.Join(logs, "link-to-fifo.fifo")))
	must.NoError(t, os.WriteFile(filepath.Join(logs, "regular.fifo"), []byte("x"), 0o600))
	must.NoError(t, os.Symlink(canaryDir, filepath.Join(base, "alloc", "linkdir")))

	stop := make(chan struct{})
	close(stop)
	for _, name := range []string{
		"alloc/logs/link.fifo",
		"alloc/logs/link-to-fifo.fifo",
		"alloc/logs/regular.fifo",
		"alloc/logs/missing.fifo",
		"alloc/linkdir/canary",
	} {
		t.Run(filepath.Base(name), func(t *testing.T) {
			f, err := openLog(base, filepath.Join(base, name), stop)
			if f != nil {
				f.Close()
			}
			must.Error(t, err)
			must.StrContains(t, err.Error(), "output dropped")
		})
	}
	b, err := os.ReadFile(canary)
	must.NoError(t, err)
	must.Eq(t, "host secret\n", string(b))
	b, err = os.ReadFile(filepath.Join(logs, "regular.fifo"))
	must.NoError(t, err)
	must.Eq(t, "x", string(b))
	_, err = os.Lstat(filepath.Join(logs, "missing.fifo"))
	must.True(t, errors.Is(err, os.ErrNotExist), must.Sprint("openLog must not create a missing log"))
}

// openLog on a FIFO waits for its reader without blocking in open, gives up
// when told to, and writes once the reader is there.
func TestOpenLog_FIFOWaitsForReader(t *testing.T) {
	base := t.TempDir()
	path := filepath.Join(base, "alloc", "logs", ".t.stdout.fifo")
	must.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
	must.NoError(t, unix.Mkfifo(path, 0o600))

	// No reader, and told to stop: it returns instead of hanging.
	stop := make(chan struct{})
	close(stop)
	_, err := openLog(base, path, stop)
	must.ErrorIs(t, err, unix.ENXIO)

	// The reader comes after the open began.
	type opened struct {
		f   *os.File
		err error
	}
	ch := make(chan opened, 1)
	go func() {
		f, err := openLog(base, path, nil)
		ch <- opened{f, err}
	}()
	r, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK, 0)
	must.NoError(t, err)
	defer r.Close()
	var o opened
	select {
	case o = <-ch:
	case <-time.After(30 * time.Second):
		t.Fatal("openLog did not open a FIFO that has a reader")
	}
	must.NoError(t, o.err)
	_, err = o.f.Write([]byte("line\n"))
	must.NoError(t, err)
	must.NoError(t, o.f.Close())
	b, err := io.ReadAll(r)
	must.NoError(t, err)
	must.Eq(t, "line\n", string(b))
}
