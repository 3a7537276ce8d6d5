package driver

import (
	"bufio"
	"context"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	cstructs "github.com/hashicorp/nomad/client/structs"
	"github.com/hashicorp/nomad/plugins/drivers"
)

// cpuInfo converts CPU time into Nomad's MHz "ticks".
type cpuInfo struct {
	totalMHz float64
	numCPU   int
}

// readCPUInfo sums the cores' clock rates from /proc/cpuinfo, as Nomad's
// client does; the UI's CPU chart is drawn from ticks, not percent.
func readCPUInfo() cpuInfo {
	ci := cpuInfo{numCPU: runtime.NumCPU()}
	f, err := os.Open("/proc/cpuinfo")
	if err == nil {
		defer f.Close()
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			k, v, ok := strings.Cut(sc.Text(), ":")
			if ok && strings.TrimSpace(k) == "cpu MHz" {
				if mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64); err == nil {
					ci.totalMHz += mhz
				}
			}
		}
	}
	if ci.totalMHz == 0 {
		// No clock rate published (some VMs): assume 1 GHz per core
		// so the chart is proportional rather than empty.
		ci.totalMHz = 1000 * float64(ci.numCPU)
	}
	return ci
}

// ticks converts a percentage of one core into MHz consumed.
func (c cpuInfo) ticks(percent float64) float64 {
	return percent / 100 * c.totalMHz / float64(c.numCPU)
}

func (d *Driver) TaskStats(ctx context.Context, taskID string, interval time.Duration) (<-chan *cstructs.TaskResourceUsage, error) {
	h, ok := d.tasks.Get(taskID)
	if !ok {
		return nil, drivers.ErrTaskNotFound
	}
	ch := make(chan *cstructs.TaskResourceUsage)
	go func() {
		defer close(ch)
		var prev sample
		d.periodic(ctx, interval, h.done, func() bool {
			cur, err := d.sample(ctx, h)
			if err != nil {
				// A sample can fail while the sandbox starts or
				// ends; the stream stays open.
				h.logger.Trace("stats sample failed", "error", err)
				return true
			}
			usage := d.usage(prev, cur)
			prev = cur
			return send(ctx, d.ctx, ch, usage)
		})
	}()
	return ch, nil
}

// sample is one reading of a sandbox's resource use.
type sample struct {
	at                   time.Time
	cpuNs, userNs, sysNs uint64
	mem, maxMem, rss     uint64
	fromCgroup           bool
}

// sample reads the sandbox's host cgroup: a few small files, no process
// started. runsc's own report (a fork and exec per sample) is the fallback.
func (d *Driver) sample(ctx context.Context, h *taskHandle) (sample, error) {
	s := sample{at: time.Now()}
	if cg := h.spec.Cgroup; cg != nil {
		total, user, sys, err1 := cg.CPUStats()
		mem, maxMem, rss, err2 := cg.MemoryStats()
		if err1 == nil && err2 == nil {
			s.cpuNs, s.userNs, s.sysNs = total, user, sys
			s.mem, s.maxMem, s.rss = mem, maxMem, rss
			s.fromCgroup = true
			return s, nil
		}
	}
	st, err := d.runsc.EventsStats(ctx, h.sandboxID)
	if err != nil {
		return s, err
	}
	s.cpuNs, s.mem = st.CPUTotalNs, st.MemoryUsage
	return s, nil
}

func (d *Driver) usage(prev, cur sample) *cstructs.TaskResourceUsage {
	pct := func(a, b uint64) float64 {
		if prev.at.IsZero() || b < a {
			return 0
		}
		return float64(b-a) / float64(cur.at.Sub(prev.at).Nanoseconds()) * 100
	}
	percent := pct(prev.cpuNs, cur.cpuNs)
	cpu := &cstructs.CpuStats{
		Percent:    percent,
		TotalTicks: d.cpu.ticks(percent),
		// Total Ticks is filled but not listed: Nomad's CLI prints one
		// column per listed name and has no column for it.
		Measured: []string{"Percent"},
	}
	mem := &cstructs.MemoryStats{Usage: cur.mem, Measured: []string{"Usage"}}
	if cur.fromCgroup {
		cpu.UserMode = pct(prev.userNs, cur.userNs)
		cpu.SystemMode = pct(prev.sysNs, cur.sysNs)
		cpu.Measured = append(cpu.Measured, "User Mode", "System Mode")
		mem.RSS, mem.MaxUsage = cur.rss, cur.maxMem
		mem.Measured = append(mem.Measured, "RSS", "Max Usage")
	}
	return &cstructs.TaskResourceUsage{
		ResourceUsage: &cstructs.ResourceUsage{MemoryStats: mem, CpuStats: cpu},
		Timestamp:     cur.at.UnixNano(),
	}
}
