package driver

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/audit"
)

func readAudit(t *testing.T, path string) map[string][]audit.Record {
	t.Helper()
	f, err := os.Open(path)
	must.NoError(t, err)
	defer f.Close()
	byTask := map[string][]audit.Record{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var r audit.Record
		must.NoError(t, json.Unmarshal(sc.Bytes(), &r), must.Sprintf("not a whole record: %q", sc.Text()))
		byTask[r.TaskID] = append(byTask[r.TaskID], r)
	}
	must.NoError(t, sc.Err())
	return byTask
}

func eventNames(recs []audit.Record) []string {
	var out []string
	for _, r := range recs {
		out = append(out, r.Event)
	}
	return out
}

func TestDriver_AuditLog(t *testing.T) {
	logPath := filepath.Join(t.TempDir(), "audit", "sandbox.log")
	e := newTestEnv(t, func(pc *PluginConfig) { pc.AuditLog = logPath; pc.AllowCaps = []string{"CAP_NET_BIND_SERVICE"} })

	// Three tasks at once, each ending differently.
	type run struct {
		name string
		tc   TaskConfig
		mem  int64
		cfg  *drivers.TaskConfig
	}
	runs := []*run{
		{name: "exit3", tc: TaskConfig{Command: "/bin/sh", Args: []string{"-c", "exit 3"}, CapAdd: []string{"NET_BIND_SERVICE"}}},
		{name: "timeout", tc: TaskConfig{Command: "/bin/sleep", Args: []string{"60"}, Timeout: "1s"}},
		{name: "oom", tc: TaskConfig{Command: "/bin/sh", Args: []string{"-c", "dd if=/dev/zero of=/tmp/f bs=1M count=512"}}, mem: 64 << 20},
	}
	for _, r := range runs {
		cfg, cleanup := e.task(t, r.name, readonlyDefault(r.tc))
		defer cleanup()
		if r.mem > 0 {
			cfg.Resources.LinuxResources.MemoryLimitBytes = r.mem
		}
		cfg.JobID, cfg.Namespace, cfg.NodeName = "ci", "default", "node-1"
		cfg.Env["NOMAD_JOB_PARENT_ID"] = "ci-parent"
		r.cfg = cfg
	}
	var wg sync.WaitGroup
	results := make([]*drivers.ExitResult, len(runs))
	errs := make([]error, len(runs))
	for i, r := range runs {
		wg.Add(1)
		go func(i int, r *run) {
			defer wg.Done()
			results[i], errs[i] = e.runConcurrently(r.cfg)
		}(i, r)
	}
	wg.Wait()
	for i := range runs {
		must.NoError(t, errs[i], must.Sprintf("task %s", runs[i].name))
	}

	// And one the node refuses.
	bad, cleanupBad := e.taskWithLogs(t, "refused", readonlyDefault(TaskConfig{Command: "/bin/true", CapAdd: []string{"SYS_ADMIN"}}), false)
	defer cleanupBad()
	_, _, err := e.harness.StartTask(bad)
	must.Error(t, err)

	byTask := readAudit(t, logPath)
	for i, r := range runs {
		recs := byTask[r.cfg.ID]
		must.Eq(t, []string{audit.EventStarted, audit.EventExited}, eventNames(recs), must.Sprintf("task %s", r.name))
		start, end := recs[0], recs[1]
		for _, rec := range recs {
			must.Eq(t, "ci", rec.Job)
			must.Eq(t, "ci-parent", rec.ParentJob)
			must.Eq(t, "default", rec.Namespace)
			must.Eq(t, "node-1", rec.Node)
			must.Eq(t, r.cfg.AllocID, rec.AllocID)
			must.Eq(t, r.name, rec.Task)
			must.Eq(t, sandboxID(r.cfg), rec.SandboxID)
			must.StrContains(t, rec.RunscVersion, "0.0.0-")
			must.Eq(t, "systrap", rec.Platform)
			must.Eq(t, e.rootfs, rec.Rootfs)
			must.NotNil(t, rec.Policy)
			must.True(t, rec.Policy.ReadonlyRootfs)
			must.Eq(t, "none", rec.Policy.Network)
			must.Len(t, 3, rec.Policy.Mounts)
		}
		must.NotNil(t, start.StartedAt)
		must.NotNil(t, end.ExitCode)
		must.Eq(t, results[i].ExitCode, *end.ExitCode)
		must.NotNil(t, end.CompletedAt)
		switch r.name {
		case "exit3":
			must.Eq(t, 3, *end.ExitCode)
			must.Eq(t, []string{"CAP_NET_BIND_SERVICE"}, start.Policy.Capabilities)
			must.Eq(t, []string{"/bin/sh", "-c", "exit 3"}, start.Command)
		case "timeout":
			must.True(t, end.TimedOut)
			must.Eq(t, "1s", end.Policy.Timeout)
		case "oom":
			must.True(t, end.OOMKilled)
			must.Eq(t, int64(64<<20), end.Policy.MemoryBytes)
		}
	}
	refused := byTask[bad.ID]
	must.Eq(t, []string{audit.EventRefused}, eventNames(refused))
	must.StrContains(t, refused[0].Error, "CAP_SYS_ADMIN is not allowed")
}

func TestDriver_AuditLogUnwritableRefusesToRun(t *testing.T) {
	dir := t.TempDir()
	logPath := filepath.Join(dir, "is-a-directory")
	must.NoError(t, os.Mkdir(logPath, 0o700))
	e := newTestEnv(t, func(pc *PluginConfig) { pc.AuditLog = logPath })
	cfg, cleanup := e.task(t, "unaudited", readonlyDefault(TaskConfig{Command: "/bin/sleep", Args: []string{"60"}}))
	defer cleanup()
	_, _, err := e.harness.StartTask(cfg)
	must.Error(t, err)
	must.StrContains(t, err.Error(), "could not be recorded")
	entries, _ := os.ReadDir(e.config.StateDir)
	must.SliceEmpty(t, entries)
}

func TestDriver_DenyEnvIdentity(t *testing.T) {
	e := newTestEnv(t, func(pc *PluginConfig) { pc.DenyEnvIdentity = true })
	cfg, cleanup := e.taskWithLogs(t, "envtoken", readonlyDefault(TaskConfig{Command: "/bin/true"}), false)
	defer cleanup()
	cfg.Env["NOMAD_TOKEN"] = "secret-jwt"
	_, _, err := e.harness.StartTask(cfg)
	must.Error(t, err)
	must.StrContains(t, err.Error(), "deny_env_identity")

	allowed := newTestEnv(t, nil)
	cfg2, cleanup2 := allowed.task(t, "envtoken-ok", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", `[ "$NOMAD_TOKEN" = secret-jwt ]`}}))
	defer cleanup2()
	cfg2.Env["NOMAD_TOKEN"] = "secret-jwt"
	must.Eq(t, 0, allowed.run(cfg2).ExitCode)
}

// runConcurrently is run for goroutines other than the test's own: it
// reports failures instead of stopping the test.
func (e *testEnv) runConcurrently(cfg *drivers.TaskConfig) (*drivers.ExitResult, error) {
	if _, _, err := e.driver.StartTask(cfg); err != nil {
		return nil, err
	}
	defer e.driver.DestroyTask(cfg.ID, true)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ch, err := e.driver.WaitTask(ctx, cfg.ID)
	if err != nil {
		return nil, err
	}
	select {
	case res := <-ch:
		if res == nil {
			return nil, fmt.Errorf("task %s: wait ended without a result", cfg.Name)
		}
		return res, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("task %s did not exit in time", cfg.Name)
	}
}
