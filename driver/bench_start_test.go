package driver

import (
	"fmt"
	"testing"
	"time"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

// BenchmarkStartTask_True runs /bin/true through the driver (StartTask,
// WaitTask's result, DestroyTask) and, interleaved with it on the same
// machine, bare `runsc run` + `delete --force` of an equivalent bundle.
// ns/op is the driver's whole cycle (the bare runs are off the clock); the
// metrics are medians over the iterations:
//
//	start-s        StartTask returned (`runsc start` succeeded)
//	exit-s         StartTask called -> exit result; it includes the
//	               supervisor's `runsc delete`, so it compares with bare-s
//	destroy-s      DestroyTask after the exit
//	bare-s         bare `runsc run` + `runsc delete --force`
//	ratio          exit-s / bare-s (target: at most 1.25)
//	ratio-paired   median of each interleaved pair's exit / bare
//	ratio+destroy  median(exit + destroy) / bare-s
//	cpu-s          CPU of the driver's cycle: supervisor, runsc, sandbox, this process
//	bare-cpu-s     CPU of bare run + delete
//	lost-exit      tasks whose exit status WaitTask lost (should be 0)
func BenchmarkStartTask_True(b *testing.B) {
	e := newBenchEnv(b, false)
	// Untimed warm-up of both paths: page cache, each root's null netns.
	e.runBare(b)
	e.runTrue(b)

	var runs []benchRun
	var bares, bareCPUs []time.Duration
	bare := func() {
		b.StopTimer()
		t, c := e.runBare(b)
		bares, bareCPUs = append(bares, t), append(bareCPUs, c)
		b.StartTimer()
	}
	i := 0
	for b.Loop() {
		// Alternate the order so that neither always runs second.
		if i%2 == 0 {
			bare()
		}
		runs = append(runs, e.runTrue(b))
		if i%2 == 1 {
			bare()
		}
		i++
	}
	b.StopTimer()

	// A run whose exit status was lost has no meaningful exit time: it is
	// left out, and counted.
	var good []benchRun
	var goodBares, pairs []float64
	for i, r := range runs {
		if !r.lostExit {
			good = append(good, r)
			goodBares = append(goodBares, bares[i].Seconds())
			pairs = append(pairs, r.exit.Seconds()/bares[i].Seconds())
		}
	}
	lost := benchLost(b, len(runs)-len(good), len(runs), "tasks: WaitTask returned \"task supervisor is gone and left no exit status\" while the supervisor was still running and writing exit.json (the task itself exited 0)")
	m := mediansOf(good)
	start, exit, destroy, exitDestroy, cpu := m.start, m.exit, m.destroy, m.cycle, m.cpu
	bareT, bareCPU := testutil.Median(bares), testutil.Median(bareCPUs)
	ratio := exit.Seconds() / bareT.Seconds()
	m.report(b, "")
	b.ReportMetric(destroy.Seconds(), "destroy-s")
	b.ReportMetric(bareT.Seconds(), "bare-s")
	b.ReportMetric(ratio, "ratio")
	b.ReportMetric(testutil.Median(pairs), "ratio-paired")
	b.ReportMetric(exitDestroy.Seconds()/bareT.Seconds(), "ratio+destroy")
	b.ReportMetric(bareCPU.Seconds(), "bare-cpu-s")
	b.ReportMetric(float64(lost), "lost-exit")

	verdict := "within"
	if ratio > 1.25 {
		verdict = "OVER"
	}
	summary := fmt.Sprintf("driver /bin/true: StartTask %.3fs, to exit result %.3fs, DestroyTask %.3fs | bare runsc run+delete %.3fs | ratio %.2f (%s the 1.25 target; paired %.2f), %.2f with DestroyTask | CPU %.3fs vs bare %.3fs | medians of %d interleaved pairs (bare over all %d), loadavg %s",
		start.Seconds(), exit.Seconds(), destroy.Seconds(), bareT.Seconds(), ratio, verdict, testutil.Median(pairs),
		exitDestroy.Seconds()/bareT.Seconds(), cpu.Seconds(), bareCPU.Seconds(), len(good), len(bares), benchLoadavg())
	benchSummary(b, summary)
}
