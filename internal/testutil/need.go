package testutil

import (
	"os"
	"runtime"
	"testing"
)

// RequireRoot gates every test that needs root and with it runsc, network
// namespaces, nftables, mounts or cgroups. Under -short (`make unit`) it
// skips the test, so that the root-free tests run in seconds as any user.
// Otherwise it fails the test when not root: `make test` must never pass by
// skipping what it did not run.
func RequireRoot(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("needs root, runsc and the kernel: not run under -short (make unit)")
	}
	if runtime.GOOS != "linux" {
		t.Fatalf("needs Linux, this is %s: run with -short (make unit) for the tests that do not", runtime.GOOS)
	}
	if os.Geteuid() != 0 {
		t.Fatal("needs root: run as root, or with -short (make unit) for the tests that do not")
	}
}
