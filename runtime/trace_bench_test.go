package runtime

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/trace"
)

// BenchmarkTrail is the cost of the trail, side by side with none in one
// run: each iteration starts the same task once without and once with a
// trail (alternating, so that the load of a shared machine falls on both
// alike), through the supervisor. "start" is the time until the sandbox
// runs (a task of /bin/true); "exec200" the time from start to exit of a
// shell that forks and execs /bin/true 200 times. The trail has the default
// points and the driver's default bounds.
func BenchmarkTrail(b *testing.B) {
	const loop = `i=0; while [ $i -lt 200 ]; do /bin/true; i=$((i+1)); done`
	for _, c := range []struct {
		name   string
		script string
		start  bool // measure until the sandbox runs, not until it ends
	}{{"start", "/bin/true", true}, {"exec200", loop, false}} {
		b.Run(c.name, func(b *testing.B) {
			var took [2]time.Duration
			for i := 0; i < b.N; i++ {
				for on := range 2 {
					took[on] += timeTrailRun(b, c.script, on == 1, c.start)
				}
			}
			off, on := took[0].Seconds()*1000/float64(b.N), took[1].Seconds()*1000/float64(b.N)
			b.ReportMetric(off, "off-ms")
			b.ReportMetric(on, "on-ms")
			b.ReportMetric((on/off-1)*100, "overhead-%")
		})
	}
}

func timeTrailRun(b *testing.B, script string, trail, startOnly bool) time.Duration {
	b.StopTimer()
	defer b.StopTimer()
	tsb := newTestSandbox(b, nil, "/bin/sh", "-c", script)
	if trail {
		tsb.spec.Trace = &trace.Config{
			Log: filepath.Join(b.TempDir(), "trail.jsonl"), Points: trace.DefaultPoints(),
			Rate: 100, Burst: 500, MaxRecords: 20000, Identity: traceIdentity(tsb.spec.ID),
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	b.StartTimer()
	t0 := time.Now()
	if err := tsb.sup.Start(ctx, tsb.spec); err != nil {
		b.Fatal(err)
	}
	started := time.Since(t0)
	if _, err := tsb.sup.Wait(ctx); err != nil {
		b.Fatal(err)
	}
	if startOnly {
		return started
	}
	return time.Since(t0)
}
