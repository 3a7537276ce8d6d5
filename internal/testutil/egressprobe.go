package testutil

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	goruntime "runtime"
	"testing"
	"time"
)

// BuildEgressProbe builds the egress probe (internal/testutil/egressprobe),
// static so that it runs in any rootfs, at path. The go build cache makes
// every build after the first one quick.
func BuildEgressProbe(t testing.TB, path string) {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(goruntime.GOROOT(), "bin", "go")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goBin, "build", "-o", path,
		"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil/egressprobe")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the egress probe: %v: %s", err, out)
	}
}
