package driver

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

// benchWriteScript is the write-heavy workload: 256 MiB written
// sequentially to /alloc/data (fsync'd), then 5,000 small files in /local.
const benchWriteScript = `dd if=/dev/zero of=/alloc/data/seq bs=1M count=256 conv=fsync 2>/dev/null || exit 1
mkdir /local/small && i=0 && while [ $i -lt 5000 ]; do echo $i > /local/small/f$i || exit 2; i=$((i+1)); done; sync`

// BenchmarkDiskLimit shows what a disk_limit costs, side by side with no
// limit in the same run (the four kinds interleave, the order alternating
// each iteration). Each task is a fresh one: with the limit, its local/
// disk and its allocation's disk (alloc/data, alloc/tmp) are made,
// formatted and mounted at its start, and copied back and removed by its
// DestroyTask. Metrics are medians:
//
//	start-s / start-limit-s       StartTask of /bin/true, without / with a 1 GiB limit
//	cycle-s / cycle-limit-s       its whole cycle: start, exit, DestroyTask
//	write-s / write-limit-s       start to exit of the write-heavy task (benchWriteScript)
//	destroy-s / destroy-limit-s   its DestroyTask (with the limit: the copy back of 256 MiB and 5,000 files)
func BenchmarkDiskLimit(b *testing.B) {
	e := newBenchEnv(b, false)
	kinds := []struct {
		name, script string
		limit        string
	}{
		{"true", "true", ""},
		{"true", "true", "1GiB"},
		{"write", benchWriteScript, ""},
		{"write", benchWriteScript, "1GiB"},
	}
	starts := make([][]time.Duration, len(kinds))
	exits := make([][]time.Duration, len(kinds))
	destroys := make([][]time.Duration, len(kinds))
	cycles := make([][]time.Duration, len(kinds))
	data := filepath.Join(e.allocDir, "alloc", "data")
	one := func(k int) {
		kind := kinds[k]
		cfg := e.taskConfigWith(b, fmt.Sprintf("%s-%d-%d", kind.name, k, e.seq), TaskConfig{
			Rootfs: e.rootfs, Command: "/bin/sh", Args: []string{"-c", kind.script},
			ReadonlyRootfs: true, Tmpfs: []string{"/tmp"}, DiskLimit: kind.limit,
		})
		r := e.runCycle(b, cfg)
		starts[k] = append(starts[k], r.start)
		exits[k] = append(exits[k], r.exit)
		destroys[k] = append(destroys[k], r.destroy)
		cycles[k] = append(cycles[k], r.exit+r.destroy)
		b.StopTimer()
		// Every run starts from an empty alloc/data (what it holds
		// counts against the next allocation disk) and a node disk
		// without the last run's files.
		benchNoErr(b, os.RemoveAll(data))
		benchNoErr(b, os.Mkdir(data, 0o777))
		benchNoErr(b, os.RemoveAll(cfg.TaskDir().Dir))
		if kind.limit != "" {
			benchNoErr(b, runtime.RemoveImage(e.d.diskImage(cfg)))
		}
		b.StartTimer()
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
		if k < 2 {
			b.ReportMetric(testutil.Median(starts[k]).Seconds(), "start"+name+"-s")
			b.ReportMetric(testutil.Median(cycles[k]).Seconds(), "cycle"+name+"-s")
			continue
		}
		b.ReportMetric(testutil.Median(exits[k]).Seconds(), "write"+name+"-s")
		b.ReportMetric(testutil.Median(destroys[k]).Seconds(), "destroy"+name+"-s")
	}
}

func benchNoErr(b *testing.B, err error) {
	b.Helper()
	if err != nil {
		b.Fatal(err)
	}
}
