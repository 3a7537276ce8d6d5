package netnsrun

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// TestInNewThenIn: InNew runs in a namespace that is not the caller's, In
// runs in the namespace at the path, and neither moves the caller.
func TestInNewThenIn(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (unshare, setns, mount)")
	}
	path := filepath.Join(t.TempDir(), "ns")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	own := inode(t, "/proc/self/ns/net")
	var created uint64
	err := InNew(func() error {
		created = inode(t, "/proc/thread-self/ns/net")
		return unix.Mount("/proc/thread-self/ns/net", path, "none", unix.MS_BIND, "")
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(path, unix.MNT_DETACH); err != nil {
			t.Errorf("cleanup: unmount %s: %v", path, err)
		}
	})
	if created == own {
		t.Fatalf("InNew ran in the caller's namespace (inode %d)", own)
	}
	var inside uint64
	if err := In(path, func() error {
		inside = inode(t, "/proc/thread-self/ns/net")
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if inside != created {
		t.Errorf("In ran in namespace %d, want %d", inside, created)
	}
	if now := inode(t, "/proc/thread-self/ns/net"); now != own {
		t.Errorf("the caller is in namespace %d afterwards, want %d", now, own)
	}
	if err := In(filepath.Join(t.TempDir(), "missing"), func() error { return nil }); err == nil {
		t.Error("In a missing path: no error")
	}
}

// TestThreadsComeBack: after In and InNew, also when fn fails, every thread
// of the process is in the process's own namespace again: a thread left in
// a foreign one would run any later goroutine there (a listener of the
// plugin opened inside a sandbox's namespace, or a netlink call aimed at
// the host changing the sandbox's).
func TestThreadsComeBack(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (unshare, setns)")
	}
	own := inode(t, "/proc/self/ns/net")
	fail := errors.New("fn failed")
	for i := 0; i < 20; i++ {
		if err := InNew(func() error { return fail }); !errors.Is(err, fail) {
			t.Fatalf("InNew: %v, want %v", err, fail)
		}
		if err := In("/proc/self/ns/net", func() error { return fail }); !errors.Is(err, fail) {
			t.Fatalf("In: %v, want %v", err, fail)
		}
		if err := InNew(func() error { return nil }); err != nil {
			t.Fatal(err)
		}
	}
	// Every thread the runtime has, not only the ones the loop happened
	// to reuse.
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	for _, task := range tasks {
		var st unix.Stat_t
		path := filepath.Join("/proc/self/task", task.Name(), "ns", "net")
		if err := unix.Stat(path, &st); err != nil {
			continue // the thread ended
		}
		if st.Ino != own {
			t.Errorf("thread %s is in namespace %d, want %d", task.Name(), st.Ino, own)
		}
	}
}
