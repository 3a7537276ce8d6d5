// Package testutil builds what the tests need from real components: a
// busybox root filesystem and OCI images of it, a registry on loopback, the
// runsc binary's location, test network hosts, and the one gate for tests
// that need root (RequireRoot).
package testutil

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// BusyboxPath is where Debian's busybox-static installs its binary.
const BusyboxPath = "/usr/bin/busybox"

// MakeRootfs creates a minimal root filesystem in dir: a static busybox with
// its applet links, /etc/passwd and /etc/group with root, nobody and app
// (uid 1000), and nothing else.
func MakeRootfs(t testing.TB, dir string) string {
	t.Helper()
	if err := BuildRootfs(dir); err != nil {
		t.Fatalf("build rootfs: %v", err)
	}
	return dir
}

// BuildRootfs is MakeRootfs without a testing.TB, for the demo and benches.
func BuildRootfs(dir string) error {
	for _, d := range []string{"bin", "etc", "tmp", "usr/bin", "sbin", "usr/sbin"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return err
		}
	}
	bb, err := os.ReadFile(BusyboxPath)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "bin/busybox"), bb, 0o755); err != nil {
		return err
	}
	out, err := exec.Command(BusyboxPath, "--list").Output()
	if err != nil {
		return err
	}
	for _, applet := range strings.Fields(string(out)) {
		if applet == "busybox" {
			continue
		}
		link := filepath.Join(dir, "bin", applet)
		if err := os.Symlink("busybox", link); err != nil && !os.IsExist(err) {
			return err
		}
	}
	files := map[string]string{
		"etc/passwd": "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
		"etc/group":  "root:x:0:\napp:x:1000:\nwheel:x:10:app\nnogroup:x:65534:\n",
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			return err
		}
	}
	// A sticky /tmp, as on a real system (os.Chmod takes the bit as
	// os.ModeSticky, not as 0o1000).
	return os.Chmod(filepath.Join(dir, "tmp"), os.ModeSticky|0o777)
}

// Runsc returns the runsc binary the project built, failing the test when it
// is missing: functional tests never fall back to a fake. Like RequireRoot,
// it skips the test under -short.
func Runsc(t testing.TB) string {
	t.Helper()
	RequireRoot(t)
	if p := os.Getenv("SANDBOX_RUNSC"); p != "" {
		return p
	}
	_, file, _, _ := runtime.Caller(0)
	p := filepath.Join(filepath.Dir(file), "..", "..", "bin", "runsc")
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("runsc not found at %s: run `make deps` first", p)
	}
	abs, _ := filepath.Abs(p)
	return abs
}
