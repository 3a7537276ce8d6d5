package driver

import (
	"os"
	"testing"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

// TestMain lets the test binary act as the task supervisor, as the plugin
// binary does in production.
func TestMain(m *testing.M) {
	if len(os.Args) > 2 && os.Args[1] == runtime.SupervisorArg {
		os.Exit(runtime.SupervisorMain(os.Args[2:]))
	}
	os.Exit(m.Run())
}
