package trace

import (
	"bytes"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// seedMessages are messages of every point the receiver decodes, built as
// gVisor's remote sink frames them (the ones TestReceiver_Points feeds).
func seedMessages() [][]byte {
	addr := sockaddrIn([4]byte{10, 0, 0, 1}, 443)
	exec := (&msg{}).bytes(1, ctxMsg(7, 7, "/w", "sh")).bytes(2, []byte("/bin/busybox"))
	for _, a := range []string{"sh", "-c", "echo hi"} {
		exec.bytes(3, []byte(a))
	}
	exec.bytes(8, bytes.Repeat([]byte{0xab}, 32))
	unixAddr := append(binaryFamily(unix.AF_UNIX), []byte("/run/x.sock\x00")...)
	return [][]byte{
		frame(msgExec, 0, exec.b),
		frame(msgSocket, 0, (&msg{}).bytes(1, ctxMsg(7, 7, "/w", "nc")).bytes(2, (&msg{}).varint(1, 3).b).
			varint(4, unix.AF_INET).varint(5, unix.SOCK_STREAM).b),
		frame(msgConnect, 0, (&msg{}).bytes(1, ctxMsg(7, 7, "/w", "nc")).varint(4, 3).bytes(6, addr).b),
		frame(msgConnect, 0, (&msg{}).bytes(1, ctxMsg(7, 7, "/w", "nc")).bytes(2, (&msg{}).varint(1, ^uint64(0)).varint(2, uint64(unix.ECONNREFUSED)).b).varint(4, 3).bytes(6, addr).b),
		frame(msgConnect, 3, (&msg{}).bytes(1, ctxMsg(8, 7, "/w", "nc")).varint(4, 3).bytes(6, unixAddr).b),
		frame(msgBind, 0, (&msg{}).bytes(1, ctxMsg(7, 7, "/w", "nc")).bytes(2, []byte{}).varint(4, 3).bytes(6, addr).b),
		frame(msgOpen, 0, (&msg{}).bytes(1, ctxMsg(7, 7, "/w", "sh")).bytes(2, []byte{}).varint(4, uint64(0xffffffffffffff9c)).bytes(5, []byte("/d")).bytes(6, []byte("out.txt")).varint(7, unix.O_WRONLY|unix.O_CREAT).b),
		frame(msgTaskExit, 0, (&msg{}).bytes(1, ctxMsg(8, 7, "/w", "nc")).b),
		frame(msgTaskExit, 5, (&msg{}).bytes(1, ctxMsg(7, 7, "/w", "nc")).varint(2, 9).b),
		// A hostile Sentry's: strings longer than any cap, of bytes
		// that JSON writes six times over.
		frame(msgExec, 0, (&msg{}).bytes(1, ctxMsg(7, 7, strings.Repeat("\x1b<", 1500), strings.Repeat("\xff", 200))).
			bytes(2, bytes.Repeat([]byte{0}, 512)).bytes(3, bytes.Repeat([]byte{'&'}, 512)).b),
	}
}

func binaryFamily(fam uint16) []byte {
	b := make([]byte, 2)
	b[0], b[1] = byte(fam), byte(fam>>8)
	return b
}

// The receiver fed whatever a sandbox's Sentry could send (it is the
// attacker's once code escapes into it): no panic, and every line it writes
// is one JSON object of at most maxLine bytes.
func FuzzDecode(f *testing.F) {
	for _, m := range seedMessages() {
		f.Add(m)
	}
	log := filepath.Join(f.TempDir(), "trail.jsonl")
	r := newReceiver(Config{Log: log, Points: knownPoints()})
	f.Fuzz(func(t *testing.T, b []byte) {
		var off int64
		if fi, err := os.Stat(log); err == nil {
			off = fi.Size()
			if off > 1<<20 {
				if err := os.Truncate(log, 0); err != nil {
					t.Fatal(err)
				}
				off = 0
			}
		}
		r.handle(b)
		if r.err != nil {
			t.Fatalf("receiver error: %v", r.err)
		}
		f, err := os.Open(log)
		if os.IsNotExist(err) {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.Seek(off, io.SeekStart); err != nil {
			t.Fatal(err)
		}
		out, err := io.ReadAll(f)
		if err != nil {
			t.Fatal(err)
		}
		for line := range bytes.Lines(out) {
			if len(line) > maxLine {
				t.Fatalf("a line of %d bytes, more than %d", len(line), maxLine)
			}
			var rec Record
			if err := json.Unmarshal(line, &rec); err != nil {
				t.Fatalf("line %q: %v", line, err)
			}
		}
		for _, p := range r.pending {
			if n := len(p.Cwd) + len(p.Process) + len(p.Path) + len(p.Address); n > maxLine {
				t.Fatalf("a pending connect keeps %d bytes of strings", n)
			}
		}
	})
}
