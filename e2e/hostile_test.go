//go:build e2e

package e2e

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/shoenig/test/must"
)

// A task that swaps its log FIFOs for links to a host file and fails, so
// that Nomad restarts it, gets nothing of that file: the file (root's, 0600,
// outside the allocation) is unchanged afterwards, and its content is in
// neither of the task's logs. Nomad's log collector and the task's
// supervisor both run as root and open those paths on the restart.
func TestLogFIFOSymlinkAttack(t *testing.T) {
	defer catchPanic(t)
	var b [8]byte
	_, _ = rand.Read(b[:])
	secret := "canary-" + hex.EncodeToString(b[:]) + "\n"
	canary := filepath.Join(t.TempDir(), "canary")
	must.NoError(t, os.WriteFile(canary, []byte(secret), 0o600))

	script := `echo "run started"
for s in stdout stderr; do
  f=/alloc/logs/.main.$s.fifo
  if rm -f $f && ln -s ` + canary + ` $f; then echo "swapped $s"; else echo "swap of $s refused"; fi
done
echo "payload after the swap"
echo "payload after the swap" >&2
exit 1`
	spec := shellJob(t, "batch", script)
	// Restarted once: the second run is when root reopens the paths.
	spec.TaskBlocks = []string{
		`restart {`,
		`  attempts = 1`,
		`  interval = "1h"`,
		`  delay    = "1s"`,
		`  mode     = "fail"`,
		`}`,
	}
	j := runJob(t, spec)
	a, ts := j.waitDone(t)
	must.Eq(t, "failed", a.ClientStatus, must.Sprint(ts))
	must.Eq(t, uint64(1), ts.Restarts, must.Sprintf("the task must have been restarted once; task: %s", ts))

	got, err := os.ReadFile(canary)
	must.NoError(t, err)
	must.Eq(t, secret, string(got), must.Sprint("the host file behind the link was written"))
	fi, err := os.Stat(canary)
	must.NoError(t, err)
	must.Eq(t, os.FileMode(0o600), fi.Mode().Perm())

	stdout := j.waitLogs(t, false, "payload after the swap")
	stderr := j.logs(t, true)
	token := strings.TrimSpace(secret)
	must.StrNotContains(t, stdout, token, must.Sprint("the host file's content reached the task's stdout log"))
	must.StrNotContains(t, stderr, token, must.Sprint("the host file's content reached the task's stderr log"))
	// Both runs wrote through the FIFOs, and neither could swap them.
	must.Eq(t, 2, strings.Count(stdout, "run started"), must.Sprint(stdout))
	must.StrNotContains(t, stdout, "swapped", must.Sprint(stdout))
}
