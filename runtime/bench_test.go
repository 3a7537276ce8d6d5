package runtime

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

// bareBench is a busybox bundle and a runsc root for timing runsc on its own,
// without the driver or the supervisor: the floor the driver is measured
// against.
type bareBench struct {
	runsc  Runsc
	bundle string
}

// newBareBench builds the rootfs and a bundle whose spec has the same mounts
// the driver writes (the task directories, /tmp tmpfs, resolv.conf, hosts),
// running args. Everything it creates is removed when b ends.
func newBareBench(b *testing.B, args ...string) *bareBench {
	b.Helper()
	testutil.RequireRoot(b)
	base := b.TempDir()
	cfg := busyboxBundle(b, base, "bench", args)
	bundle := StateDir(base).Bundle()
	runscRoot := filepath.Join(base, "runsc-root")
	if err := os.MkdirAll(bundle, 0o755); err != nil {
		b.Fatal(err)
	}
	if err := os.MkdirAll(runscRoot, 0o700); err != nil {
		b.Fatal(err)
	}
	r := Runsc{Path: testutil.Runsc(b), Root: runscRoot}
	// Registered after TempDir, so it runs before the directory is removed.
	b.Cleanup(func() {
		if ids, err := r.List(context.Background()); err == nil {
			for _, id := range ids {
				_ = r.Delete(context.Background(), id, DeleteOpts{Force: true})
			}
		}
		if err := r.ReleaseRoot(); err != nil {
			b.Errorf("release runsc root: %v", err)
		}
	})
	cfg.ResolvConf, cfg.Hosts = filepath.Join(base, "resolv.conf"), filepath.Join(base, "hosts")
	if err := os.WriteFile(cfg.ResolvConf, ResolvConf(nil, nil, nil), 0o644); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(cfg.Hosts, HostsFile(cfg.Hostname), 0o644); err != nil {
		b.Fatal(err)
	}
	if err := WriteBundle(bundle, cfg); err != nil {
		b.Fatal(err)
	}
	return &bareBench{runsc: r, bundle: bundle}
}

// runOnce runs `runsc --root R --network=none run --bundle B id`, then
// `runsc delete --force id`, and returns how long each took and the CPU time
// of the run (runsc, its sandbox and gofer: wait4 accounts reaped children).
func (bb *bareBench) runOnce(id string) (run, del, cpu time.Duration, err error) {
	cmd := exec.Command(bb.runsc.Path, "--root", bb.runsc.Root, "--network=none", "run", "--bundle", bb.bundle, id)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	cmd.Dir = "/"
	t0 := time.Now()
	out, rerr := cmd.CombinedOutput()
	run = time.Since(t0)
	if cmd.ProcessState != nil {
		cpu = cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	}
	t1 := time.Now()
	derr := bb.runsc.Delete(context.Background(), id, DeleteOpts{Force: true})
	del = time.Since(t1)
	switch {
	case rerr != nil:
		return run, del, cpu, fmt.Errorf("runsc run: %w: %s", rerr, out)
	case derr != nil:
		return run, del, cpu, derr
	}
	return run, del, cpu, nil
}

// BenchmarkBareRunsc times `runsc run` of a busybox /bin/true followed by
// `runsc delete --force`: the floor for the driver's start-to-exit path
// (driver.BenchmarkStartTask_True runs the same baseline interleaved with
// the driver and reports the ratio). ns/op is run+delete; the metrics are
// medians: s/run, s/delete, s/run+delete, and cpu-s/run, the CPU time of
// `runsc run` with its sandbox and gofer.
func BenchmarkBareRunsc(b *testing.B) {
	bb := newBareBench(b, "/bin/true")
	prefix := fmt.Sprintf("bench-bare-%d", os.Getpid())
	// One untimed run warms the page cache and creates the root's shared
	// null network namespace.
	if _, _, _, err := bb.runOnce(prefix + "-warm"); err != nil {
		b.Fatal(err)
	}
	var runs, dels, totals, cpus []time.Duration
	i := 0
	for b.Loop() {
		run, del, cpu, err := bb.runOnce(fmt.Sprintf("%s-%d", prefix, i))
		if err != nil {
			b.Fatal(err)
		}
		i++
		runs = append(runs, run)
		dels = append(dels, del)
		totals = append(totals, run+del)
		cpus = append(cpus, cpu)
	}
	b.ReportMetric(testutil.Median(runs).Seconds(), "s/run")
	b.ReportMetric(testutil.Median(dels).Seconds(), "s/delete")
	b.ReportMetric(testutil.Median(totals).Seconds(), "s/run+delete")
	b.ReportMetric(testutil.Median(cpus).Seconds(), "cpu-s/run")
	lo, hi := testutil.MinMax(totals)
	summary := fmt.Sprintf("bare runsc /bin/true: run %.3fs + delete %.3fs = %.3fs (min %.3fs, max %.3fs); CPU of the run %.3fs | medians of %d",
		testutil.Median(runs).Seconds(), testutil.Median(dels).Seconds(), testutil.Median(totals).Seconds(),
		lo.Seconds(), hi.Seconds(), testutil.Median(cpus).Seconds(), len(totals))
	b.Log(summary)
	fmt.Println("SUMMARY " + summary)
}
