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
		var prevNs uint64
		var prevAt time.Time
		timer := time.NewTimer(0)
		defer timer.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-d.ctx.Done():
				return
			case <-h.done:
				return
			case <-timer.C:
				timer.Reset(interval)
			}
			s, err := d.runsc.EventsStats(ctx, h.sandboxID)
			if err != nil {
				// A sample can fail while the sandbox starts or
				// ends; the stream stays open.
				h.logger.Trace("stats sample failed", "error", err)
				continue
			}
			now := time.Now()
			var percent float64
			if !prevAt.IsZero() && s.CPUTotalNs >= prevNs {
				percent = float64(s.CPUTotalNs-prevNs) / float64(now.Sub(prevAt).Nanoseconds()) * 100
			}
			prevNs, prevAt = s.CPUTotalNs, now
			usage := &cstructs.TaskResourceUsage{
				ResourceUsage: &cstructs.ResourceUsage{
					MemoryStats: &cstructs.MemoryStats{
						RSS:      s.MemoryUsage,
						Usage:    s.MemoryUsage,
						Measured: []string{"RSS", "Usage"},
					},
					CpuStats: &cstructs.CpuStats{
						Percent:    percent,
						TotalTicks: d.cpu.ticks(percent),
						Measured:   []string{"Percent", "Total Ticks"},
					},
				},
				Timestamp: now.UnixNano(),
			}
			select {
			case ch <- usage:
			case <-ctx.Done():
				return
			}
		}
	}()
	return ch, nil
}
