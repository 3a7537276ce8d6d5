package driver

import (
	"os"
	"testing"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

// TestMain lets the test binary act as the task supervisor, as the plugin
// binary does in production. The drivers under test turn IPv4 forwarding on
// with their first sandbox network, as in production; the machine gets back
// the value it had, so that no later run depends on this one.
func TestMain(m *testing.M) {
	if len(os.Args) > 2 && os.Args[1] == runtime.SupervisorArg {
		os.Exit(runtime.SupervisorMain(os.Args[2:]))
	}
	if len(os.Args) == 3 && os.Args[1] == crashChildArg {
		os.Exit(crashChildMain(os.Args[2]))
	}
	const fwd = "/proc/sys/net/ipv4/ip_forward"
	before, err := os.ReadFile(fwd)
	code := m.Run()
	// Under -short (make unit) no sandbox network was made: writing the
	// value read before would undo another test process's forwarding.
	if err == nil && os.Geteuid() == 0 && !testing.Short() {
		_ = testutil.RestoreIPForward(before)
	}
	os.Exit(code)
}
