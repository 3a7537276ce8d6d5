package runtime

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
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
	rootfs := testutil.MakeRootfs(b, filepath.Join(base, "rootfs"))
	dirs := TaskDirs{Alloc: filepath.Join(base, "alloc"), Local: filepath.Join(base, "local"), Secrets: filepath.Join(base, "secrets")}
	bundle := filepath.Join(base, BundleDir)
	runscRoot := filepath.Join(base, "runsc-root")
	for _, d := range []string{dirs.Alloc, dirs.Local, dirs.Secrets, bundle} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			b.Fatal(err)
		}
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
	cfg := &BundleConfig{
		Rootfs:         rootfs,
		ReadonlyRootfs: true,
		Args:           args,
		Env:            []string{"PATH=" + DefaultPath},
		Cwd:            "/",
		Hostname:       "bench",
		Dirs:           dirs,
		Tmpfs:          []string{"/tmp"},
		ResolvConf:     filepath.Join(base, "resolv.conf"),
		Hosts:          filepath.Join(base, "hosts"),
	}
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
	b.ReportMetric(benchMedian(runs).Seconds(), "s/run")
	b.ReportMetric(benchMedian(dels).Seconds(), "s/delete")
	b.ReportMetric(benchMedian(totals).Seconds(), "s/run+delete")
	b.ReportMetric(benchMedian(cpus).Seconds(), "cpu-s/run")
	summary := fmt.Sprintf("bare runsc /bin/true: run %.3fs + delete %.3fs = %.3fs (min %.3fs, max %.3fs); CPU of the run %.3fs | medians of %d",
		benchMedian(runs).Seconds(), benchMedian(dels).Seconds(), benchMedian(totals).Seconds(),
		benchMin(totals).Seconds(), benchMax(totals).Seconds(), benchMedian(cpus).Seconds(), len(totals))
	b.Log(summary)
	fmt.Println("SUMMARY " + summary)
}

func benchMedian(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func benchMin(ds []time.Duration) time.Duration {
	m := time.Duration(0)
	for i, d := range ds {
		if i == 0 || d < m {
			m = d
		}
	}
	return m
}

func benchMax(ds []time.Duration) time.Duration {
	var m time.Duration
	for _, d := range ds {
		if d > m {
			m = d
		}
	}
	return m
}
