package driver

import (
	"fmt"
	"path/filepath"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/audit"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/trace"
)

// Bounds of a task's trail when the operator sets none: a sustained rate
// in lines a second (bursts of traceBurstSeconds of it) and a total per
// sandbox. What the sandbox sends takes at most 16 KiB of a line (argv,
// paths and names are capped), so the total bounds what one sandbox can
// add to the node's disk.
const (
	defaultTraceRate       = 100
	defaultTraceMaxRecords = 20000
	traceBurstSeconds      = 5
)

// validateTrace checks trace_log, trace_points, trace_rate and
// trace_max_records, filling the defaults.
func (c *PluginConfig) validateTrace() error {
	if c.TracePoints == nil {
		c.TracePoints = trace.DefaultPoints()
	}
	if c.TraceLog == "" {
		return nil
	}
	if !filepath.IsAbs(c.TraceLog) {
		return fmt.Errorf("trace_log %q must be an absolute path (unset, there is no trail)", c.TraceLog)
	}
	if err := trace.ValidatePoints(c.TracePoints); err != nil {
		return err
	}
	if c.TraceRate < 0 {
		return fmt.Errorf("trace_rate must not be negative: give the lines a second one sandbox may write, e.g. %d (0 means the default)", defaultTraceRate)
	}
	if c.TraceMaxRecords < 0 {
		return fmt.Errorf("trace_max_records must not be negative: give the most lines one sandbox may write, e.g. %d (0 means the default)", defaultTraceMaxRecords)
	}
	return nil
}

// traceConfig is a task's trail, or nil when trace_log is unset.
func (c *PluginConfig) traceConfig(rec *audit.Record) *trace.Config {
	if c.TraceLog == "" {
		return nil
	}
	rate, max := c.TraceRate, c.TraceMaxRecords
	if rate == 0 {
		rate = defaultTraceRate
	}
	if max == 0 {
		max = defaultTraceMaxRecords
	}
	return &trace.Config{
		Log:        c.TraceLog,
		Points:     c.TracePoints,
		Rate:       float64(rate),
		Burst:      int(rate) * traceBurstSeconds,
		MaxRecords: uint64(max),
		Identity:   trace.IdentityOf(rec),
	}
}
