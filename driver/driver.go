// Package driver is the Nomad RPC glue of the sandbox driver: config specs,
// capabilities, fingerprint, the task store and handles. The work itself
// lives in runtime/.
package driver

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/drivers/shared/eventer"
	"github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/hashicorp/nomad/plugins/shared/hclspec"
	pstructs "github.com/hashicorp/nomad/plugins/shared/structs"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/audit"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/image"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/netpolicy"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

// Driver runs Nomad tasks in gVisor sandboxes.
type Driver struct {
	eventer *eventer.Eventer
	// config is the plugin configuration, validated and parsed once.
	config *Settings
	runsc  *runtime.Runsc
	tasks  *taskStore
	logger hclog.Logger

	// supervisorExe is the binary started as each task's supervisor; it
	// is the plugin's own executable unless a test sets it.
	supervisorExe string

	// cpu converts CPU time into the MHz "ticks" Nomad charts.
	cpu cpuInfo

	// admitMu guards starting, the sandboxes being started, which count
	// against max_sandboxes with the running ones.
	admitMu  sync.Mutex
	starting int

	versionMu sync.Mutex
	version   string

	// audit is the audit log (a no-op when audit_log is not set).
	audit *audit.Log

	// images is the node's image cache.
	images *image.Store

	// net makes sandboxes' network namespaces and host-side filters.
	net *netpolicy.Manager
	// netPrefix and netTable, when set (tests), name what this driver's
	// network manager creates, so that drivers side by side in one test
	// process never reconcile away each other's sandboxes.
	netPrefix, netTable string

	// sweepMu orders the leftover sweep against starts and recoveries:
	// launching holds the sandboxes being started, which the sweep must
	// not take for leftovers (see gc.go).
	sweepMu   sync.Mutex
	launching map[string]bool
	// crashHook, when set (tests), is called at the named points of a
	// start, where a test kills the plugin to see what a crash leaves.
	crashHook func(point string)

	ctx    context.Context
	cancel context.CancelFunc
}

// NewPlugin returns the driver; main serves it.
func NewPlugin(logger hclog.Logger) drivers.DriverPlugin {
	return New(logger)
}

// New returns a Driver that is not yet configured.
func New(logger hclog.Logger) *Driver {
	ctx, cancel := context.WithCancel(context.Background())
	logger = logger.Named(PluginName)
	return &Driver{
		eventer: eventer.NewEventer(ctx, logger),
		tasks:   newTaskStore(),
		logger:  logger,
		cpu:     readCPUInfo(),
		ctx:     ctx,
		cancel:  cancel,
	}
}

// SetSupervisorExe sets the binary that supervises tasks (tests use their
// own test binary).
func (d *Driver) SetSupervisorExe(path string) { d.supervisorExe = path }

func (d *Driver) PluginInfo() (*base.PluginInfoResponse, error) { return pluginInfo, nil }

func (d *Driver) ConfigSchema() (*hclspec.Spec, error) { return configSpec, nil }

func (d *Driver) SetConfig(cfg *base.Config) error {
	var pc PluginConfig
	if len(cfg.PluginConfig) != 0 {
		if err := base.MsgPackDecode(cfg.PluginConfig, &pc); err != nil {
			return fmt.Errorf("plugin config: %w", err)
		}
	}
	s, err := pc.Validate()
	if err != nil {
		return err
	}
	path, err := exec.LookPath(s.RunscPath)
	if err != nil {
		// Not fatal: the fingerprint reports the driver unhealthy with
		// this reason, and recovers once runsc is installed.
		path = s.RunscPath
	}
	for _, dir := range []string{s.RunscRoot, s.StateDir} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("plugin config: create %s: %w", dir, err)
		}
	}
	if d.supervisorExe == "" {
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("find plugin executable: %w", err)
		}
		d.supervisorExe = exe
	}
	for _, f := range []struct{ name, path string }{{"audit_log", s.AuditLog}, {"trace_log", s.TraceLog}} {
		if f.path == "" {
			continue
		}
		if err := os.MkdirAll(filepath.Dir(f.path), 0o700); err != nil {
			return fmt.Errorf("plugin config: %s: %w", f.name, err)
		}
	}
	d.images = &image.Store{Dir: s.ImageDir, AuthConfig: s.AuthConfig, MaxImageSize: s.imageMaxSizeMB() << 20, Logger: d.logger.Named("image")}
	if s.imagePullTimeout > 0 {
		d.images.PullTimeout = s.imagePullTimeout
	}
	if err := d.images.Open(); err != nil {
		return fmt.Errorf("plugin config: image_dir: %w", err)
	}
	d.configureNetwork(s)
	d.config = s
	d.audit = &audit.Log{Path: s.AuditLog}
	d.runsc = &runtime.Runsc{Path: path, Root: s.RunscRoot, Platform: s.platform}
	go d.collectGarbage(d.ctx)
	return nil
}

func (d *Driver) TaskConfigSchema() (*hclspec.Spec, error) { return taskConfigSpec, nil }

func (d *Driver) Capabilities() (*drivers.Capabilities, error) { return capabilities, nil }

func (d *Driver) Fingerprint(ctx context.Context) (<-chan *drivers.Fingerprint, error) {
	ch := make(chan *drivers.Fingerprint)
	go func() {
		defer close(ch)
		d.periodic(ctx, fingerprintPeriod, nil, func() bool {
			return send(ctx, d.ctx, ch, d.fingerprint(ctx))
		})
	}()
	return ch, nil
}

// periodic calls f at once and then every period until f returns false,
// ctx or the driver's context ends, or done (nil: never) closes: the
// streams Nomad reads (fingerprints, stats) end with either side.
func (d *Driver) periodic(ctx context.Context, period time.Duration, done <-chan struct{}, f func() bool) {
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-d.ctx.Done():
			return
		case <-done:
			return
		case <-timer.C:
			timer.Reset(period)
		}
		if !f() {
			return
		}
	}
}

// send hands v to a stream's reader; false when either context ended
// first.
func send[T any](ctx, driverCtx context.Context, ch chan<- T, v T) bool {
	select {
	case ch <- v:
		return true
	case <-ctx.Done():
		return false
	case <-driverCtx.Done():
		return false
	}
}

func (d *Driver) fingerprint(ctx context.Context) *drivers.Fingerprint {
	fp := &drivers.Fingerprint{
		Attributes: map[string]*pstructs.Attribute{
			"driver.sandbox.version": pstructs.NewStringAttribute(PluginVersion),
		},
		Health:            drivers.HealthStateHealthy,
		HealthDescription: drivers.DriverHealthy,
	}
	unhealthy := func(reason string) *drivers.Fingerprint {
		fp.Health = drivers.HealthStateUnhealthy
		fp.HealthDescription = reason
		return fp
	}
	if d.config == nil {
		return unhealthy("plugin is not configured")
	}
	if os.Geteuid() != 0 {
		return unhealthy("the sandbox driver must run as root")
	}
	fp.Attributes["driver.sandbox.platform"] = pstructs.NewStringAttribute(d.runsc.Platform.String())
	if d.runsc.Platform == runtime.PlatformKVM {
		if _, err := os.Stat("/dev/kvm"); err != nil {
			return unhealthy("platform \"kvm\" needs /dev/kvm: " + err.Error())
		}
	}
	vctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	v, err := d.runsc.Version(vctx)
	if err != nil {
		return unhealthy(fmt.Sprintf("runsc at %q does not work (set runsc_path): %v", d.runsc.Path, err))
	}
	fp.Attributes["driver.sandbox.runsc.version"] = pstructs.NewStringAttribute(v)
	d.versionMu.Lock()
	d.version = v
	d.versionMu.Unlock()
	fp.Attributes["driver.sandbox.runsc.path"] = pstructs.NewStringAttribute(d.runsc.Path)
	return fp
}

func (d *Driver) TaskEvents(ctx context.Context) (<-chan *drivers.TaskEvent, error) {
	return d.eventer.TaskEvents(ctx)
}

func (d *Driver) emitEvent(cfg *drivers.TaskConfig, msg string, annotations map[string]string) {
	if err := d.eventer.EmitEvent(&drivers.TaskEvent{
		TaskID:      cfg.ID,
		TaskName:    cfg.Name,
		AllocID:     cfg.AllocID,
		Timestamp:   time.Now(),
		Message:     msg,
		Annotations: annotations,
	}); err != nil {
		d.logger.Warn("failed to emit task event", "task_id", cfg.ID, "error", err)
	}
}

// Shutdown stops the plugin's background work; tasks keep running.
func (d *Driver) Shutdown() { d.cancel() }
