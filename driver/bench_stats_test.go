package driver

// BenchmarkStatsSample_Cgroup and BenchmarkStatsSample_RunscEvents compare
// the two ways the driver can take a stats sample of a running sandbox:
// reading its host cgroup, or a `runsc events --stats` process per sample.

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"
)

// benchStatsSandboxes is how many running sandboxes the stats benchmarks
// sample in each round.
const benchStatsSandboxes = 8

// statsBench is benchStatsSandboxes `sleep 600` tasks started through the
// driver, kept running for one benchmark and destroyed in its cleanup.
type statsBench struct {
	e  *benchEnv
	hs []*taskHandle
}

// newStatsBench starts the sandboxes, lets them settle and checks that the
// driver's cgroup path reads real numbers from each: a sample must come from
// the cgroup (not runsc's fallback), with CPU time and at least 1 MiB of
// memory charged. Nothing of it is timed.
func newStatsBench(b *testing.B) *statsBench {
	b.Helper()
	var ids []string
	// Registered before newBenchEnv's cleanups, so it runs after them and
	// sees what they left of these sandboxes.
	b.Cleanup(func() { benchCheckGone(b, ids) })
	e := newBenchEnv(b, false)
	s := &statsBench{e: e}
	for i := 0; i < benchStatsSandboxes; i++ {
		cfg := e.taskConfig(b, fmt.Sprintf("sleep%d", i), "/bin/sleep", "600")
		ids = append(ids, sandboxID(cfg))
		if _, _, err := e.d.StartTask(cfg); err != nil {
			b.Fatalf("StartTask %s: %v", cfg.ID, err)
		}
		e.started[cfg.ID] = true
		h, ok := e.d.tasks.Get(cfg.ID)
		if !ok {
			b.Fatalf("task %s started but not in the driver's store", cfg.ID)
		}
		s.hs = append(s.hs, h)
	}
	// Let the sandboxes finish starting, so that their own CPU during the
	// rounds is what answering the samples costs them.
	time.Sleep(time.Second)
	ctx := context.Background()
	for _, h := range s.hs {
		smp, err := e.d.sample(ctx, h)
		if err != nil {
			b.Fatalf("sample %s: %v%s", h.sandboxID, err, benchPostMortem(h.stateDir))
		}
		if err := benchCheckCgroupSample(smp); err != nil {
			b.Fatalf("sandbox %s: %v (cgroup %+v)%s", h.sandboxID, err, h.spec.Cgroup, benchPostMortem(h.stateDir))
		}
	}
	return s
}

// benchCheckCgroupSample fails a sample that did not come from the cgroup
// or that reads as if nothing ran in it.
func benchCheckCgroupSample(s sample) error {
	switch {
	case !s.fromCgroup:
		return errors.New("the sample came from `runsc events`, not from the cgroup")
	case s.mem < 1<<20:
		return fmt.Errorf("cgroup memory usage %d bytes: nothing runs in it", s.mem)
	case s.cpuNs == 0:
		return errors.New("cgroup CPU time is 0: nothing runs in it")
	}
	return nil
}

// sandboxCPU is the CPU time charged to the sandboxes' cgroups so far.
func (s *statsBench) sandboxCPU(b *testing.B) time.Duration {
	b.Helper()
	var sum time.Duration
	for _, h := range s.hs {
		total, _, _, err := h.spec.Cgroup.CPUStats()
		if err != nil {
			b.Fatalf("cgroup CPU of %s: %v", h.sandboxID, err)
		}
		sum += time.Duration(total)
	}
	return sum
}

// statsCost is what a number of stats samples cost.
type statsCost struct {
	samples int
	wall    time.Duration
	self    time.Duration // this process (the plugin), user+system
	kids    time.Duration // the processes it started and reaped (runsc)
	sandbox time.Duration // charged to the sampled sandboxes' cgroups
}

// per returns d per sample in nanoseconds.
func (c statsCost) per(d time.Duration) float64 {
	if c.samples == 0 {
		return 0
	}
	return float64(d.Nanoseconds()) / float64(c.samples)
}

// cpu is the CPU the plugin spends: its own and its children's.
func (c statsCost) cpu() time.Duration { return c.self + c.kids }

func (c statsCost) report(b *testing.B) {
	b.ReportMetric(c.per(c.wall), "ns/sample")
	b.ReportMetric(c.per(c.cpu()), "cpu-ns/sample")
	b.ReportMetric(c.per(c.self), "self-cpu-ns/sample")
	b.ReportMetric(c.per(c.kids), "child-cpu-ns/sample")
	b.ReportMetric(c.per(c.sandbox), "sandbox-cpu-ns/sample")
}

// rounds samples every sandbox once per round while loop says so, and
// returns the cost. With b.Loop as loop, the rounds are what is timed.
func (s *statsBench) rounds(b *testing.B, loop func() bool, one func(*taskHandle) error) statsCost {
	b.Helper()
	sb0 := s.sandboxCPU(b)
	self0, kids0 := benchRusage()
	n := 0
	t0 := time.Now()
	for loop() {
		for _, h := range s.hs {
			if err := one(h); err != nil {
				b.Fatalf("sandbox %s: %v", h.sandboxID, err)
			}
		}
		n++
	}
	wall := time.Since(t0)
	self1, kids1 := benchRusage()
	// b.Loop has stopped the timer when it ends.
	c := statsCost{samples: n * len(s.hs), wall: wall, self: self1 - self0, kids: kids1 - kids0}
	c.sandbox = s.sandboxCPU(b) - sb0
	return c
}

// cgroupSample is one sample through the driver's own path (Driver.sample),
// which must read the cgroup and find it in use.
func (s *statsBench) cgroupSample(h *taskHandle) error {
	smp, err := s.e.d.sample(context.Background(), h)
	if err != nil {
		return err
	}
	return benchCheckCgroupSample(smp)
}

// runscSample is one `runsc events --stats` of the sandbox, as the driver
// runs it when the cgroup cannot be read.
func (s *statsBench) runscSample(h *taskHandle) error {
	st, err := s.e.d.runsc.EventsStats(context.Background(), h.sandboxID)
	if err != nil {
		return err
	}
	if st.MemoryUsage == 0 || st.Pids == 0 {
		return fmt.Errorf("runsc events reported %d bytes of memory and %d processes: nothing runs in it", st.MemoryUsage, st.Pids)
	}
	return nil
}

// benchStatsCgroup is BenchmarkStatsSample_Cgroup's result, for the ratio
// BenchmarkStatsSample_RunscEvents prints.
var benchStatsCgroup *statsCost

// BenchmarkStatsSample_Cgroup measures what TaskStats costs per sample on
// its normal path: Driver.sample reading the sandbox's host cgroup (CPU and
// memory files), no process started. One iteration is one round of samples
// over benchStatsSandboxes running `sleep 600` sandboxes, so ns/op is a
// round. Per sandbox-sample:
//
//	ns/sample              wall time
//	cpu-ns/sample          CPU of this process and its reaped children
//	                       (getrusage SELF + CHILDREN deltas)
//	self-cpu-ns/sample     this process's part
//	child-cpu-ns/sample    its children's part (none on this path)
//	sandbox-cpu-ns/sample  CPU charged to the sandboxes' cgroups during the
//	                       rounds (answering a sample, plus their idle noise)
//
// Every sample is checked to come from the cgroup and to show the sandbox's
// memory in use, so the benchmark cannot pass by reading nothing.
func BenchmarkStatsSample_Cgroup(b *testing.B) {
	s := newStatsBench(b)
	b.ReportAllocs()
	c := s.rounds(b, b.Loop, s.cgroupSample)
	c.report(b)
	benchStatsCgroup = &c
	line := fmt.Sprintf("stats via the cgroup (Driver.sample), %d samples over %d running sandboxes: %s | load %s",
		c.samples, len(s.hs), benchStatsCostText(c), benchLoadavg())
	benchSummary(b, line)
}

// BenchmarkStatsSample_RunscEvents measures the same rounds with `runsc
// events --stats` per sandbox (Runsc.EventsStats, the driver's fallback): a
// runsc process per sample, which also asks the sandbox over its control
// socket. Metrics as in BenchmarkStatsSample_Cgroup. Its SUMMARY gives the
// ratio runsc events / cgroup per sample, of wall time and of the plugin's
// CPU (self + children), against BenchmarkStatsSample_Cgroup's result, or,
// when that did not run (-bench filter), against 200 untimed cgroup rounds
// over this benchmark's own sandboxes.
func BenchmarkStatsSample_RunscEvents(b *testing.B) {
	s := newStatsBench(b)
	// Untimed warm-up: the runsc binary into the page cache, and a check
	// that every sandbox answers.
	for _, h := range s.hs {
		if err := s.runscSample(h); err != nil {
			b.Fatalf("runsc events %s: %v%s", h.sandboxID, err, benchPostMortem(h.stateDir))
		}
	}
	b.ReportAllocs()
	c := s.rounds(b, b.Loop, s.runscSample)
	c.report(b)

	ref, refNote := benchStatsCgroup, "BenchmarkStatsSample_Cgroup"
	if ref == nil {
		n := 0
		rc := s.rounds(b, func() bool { n++; return n <= 200 }, s.cgroupSample)
		ref, refNote = &rc, "200 untimed cgroup rounds over the same sandboxes"
	}
	ratio := func(x, y float64) string {
		if y <= 0 {
			return "n/a"
		}
		return fmt.Sprintf("%.0fx", x/y)
	}
	wallRatio := ratio(c.per(c.wall), ref.per(ref.wall))
	cpuRatio := ratio(c.per(c.cpu()), ref.per(ref.cpu()))
	if ref.per(ref.wall) > 0 {
		b.ReportMetric(c.per(c.wall)/ref.per(ref.wall), "wall-ratio")
	}
	if ref.per(ref.cpu()) > 0 {
		b.ReportMetric(c.per(c.cpu())/ref.per(ref.cpu()), "cpu-ratio")
	}
	line := fmt.Sprintf("stats per sample, runsc events --stats / cgroup: wall %s, CPU (self+children) %s | runsc events, %d samples over %d running sandboxes: %s | cgroup (%s): %s | load %s",
		wallRatio, cpuRatio, c.samples, len(s.hs), benchStatsCostText(c), refNote, benchStatsCostText(*ref), benchLoadavg())
	benchSummary(b, line)
}

func benchStatsCostText(c statsCost) string {
	us := func(d time.Duration) string { return fmt.Sprintf("%.1f", c.per(d)/1000) }
	return fmt.Sprintf("µs per sample: wall %s, CPU %s (self %s, children %s), sandbox-side %s",
		us(c.wall), us(c.cpu()), us(c.self), us(c.kids), us(c.sandbox))
}
