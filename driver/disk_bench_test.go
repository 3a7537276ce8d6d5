package driver

import (
	"fmt"
	"testing"
	"time"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

// BenchmarkDiskLimit shows what a disk_limit costs, side by side with no
// limit in the same run (the four kinds interleave, the order alternating
// each iteration). Each task is a fresh one (its disk image is made,
// formatted and mounted at its start); metrics are medians:
//
//	start-s / start-limit-s   StartTask of /bin/true, without / with a 256 MiB limit
//	cycle-s / cycle-limit-s   its whole cycle: start, exit, DestroyTask
//	write-s / write-limit-s   cycle of a task writing 64 MiB to /local with fsync
func BenchmarkDiskLimit(b *testing.B) {
	e := newBenchEnv(b, false)
	kinds := []struct {
		name, script string
		limit        string
	}{
		{"true", "true", ""},
		{"true", "true", "256MiB"},
		{"write", "dd if=/dev/zero of=/local/w bs=1M count=64 conv=fsync 2>/dev/null", ""},
		{"write", "dd if=/dev/zero of=/local/w bs=1M count=64 conv=fsync 2>/dev/null", "256MiB"},
	}
	starts := make([][]time.Duration, len(kinds))
	cycles := make([][]time.Duration, len(kinds))
	one := func(k int) {
		kind := kinds[k]
		cfg := e.taskConfigWith(b, fmt.Sprintf("%s-%d-%d", kind.name, k, e.seq), TaskConfig{
			Rootfs: e.rootfs, Command: "/bin/sh", Args: []string{"-c", kind.script},
			ReadonlyRootfs: true, Tmpfs: []string{"/tmp"}, DiskLimit: kind.limit,
		})
		var lim taskLimits
		var tc TaskConfig
		benchNoErr(b, cfg.DecodeDriverConfig(&tc))
		benchNoErr(b, tc.diskLimits(e.d.config, &lim))
		r := e.runCycle(b, cfg)
		starts[k] = append(starts[k], r.start)
		cycles[k] = append(cycles[k], r.exit+r.destroy)
		if lim.diskBytes > 0 {
			b.StopTimer()
			benchNoErr(b, runtime.RemoveImage(e.d.diskImage(cfg)))
			b.StartTimer()
		}
	}
	i := 0
	for b.Loop() {
		for j := range kinds {
			k := j
			if i%2 == 1 {
				k = len(kinds) - 1 - j
			}
			one(k)
		}
		i++
	}
	b.StopTimer()
	for k, name := range []string{"", "-limit", "", "-limit"} {
		metric := "cycle"
		if k >= 2 {
			metric = "write"
		} else {
			b.ReportMetric(benchMedian(starts[k]).Seconds(), "start"+name+"-s")
		}
		b.ReportMetric(benchMedian(cycles[k]).Seconds(), metric+name+"-s")
	}
}

func benchNoErr(b *testing.B, err error) {
	b.Helper()
	if err != nil {
		b.Fatal(err)
	}
}
