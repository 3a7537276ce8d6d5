package driver

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"time"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

const (
	gcInterval = 5 * time.Minute
	// gcMinAge keeps the collector away from a task that StartTask is
	// still creating.
	gcMinAge = time.Minute
)

// collectGarbage removes what crashed plugins or agents left behind, at
// start and then periodically. A state directory is kept while Nomad may
// still recover its task: its supervisor runs, or it holds an exit status
// and its allocation's task directory still exists.
func (d *Driver) collectGarbage(ctx context.Context) {
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			d.sweep(ctx, gcMinAge)
			d.collectImages()
			t.Reset(gcInterval)
		}
	}
}

// sweep removes leftover sandboxes and state directories older than minAge.
func (d *Driver) sweep(ctx context.Context, minAge time.Duration) {
	live := d.tasks.SandboxIDs()
	entries, err := os.ReadDir(d.config.StateDir)
	if err != nil {
		d.logger.Warn("cannot read state_dir", "path", d.config.StateDir, "error", err)
		return
	}
	known := map[string]bool{}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		id := e.Name()
		known[id] = true
		if live[id] {
			continue
		}
		info, err := e.Info()
		if err != nil || time.Since(info.ModTime()) < minAge {
			continue
		}
		dir := filepath.Join(d.config.StateDir, id)
		sup := &runtime.Supervisor{Dir: dir, Exe: d.supervisorExe}
		if !orphaned(dir, sup) {
			continue
		}
		if err := d.removeSandbox(id, sup); err != nil {
			d.logger.Warn("failed to remove leftover sandbox", "sandbox_id", id, "error", err)
			continue
		}
		d.logger.Info("removed leftover sandbox", "sandbox_id", id)
	}
	// Networks of sandboxes whose state directory is gone.
	present := map[string]bool{}
	if entries, err := os.ReadDir(d.config.StateDir); err == nil {
		for _, e := range entries {
			present[e.Name()] = true
		}
	}
	if err := d.net.Reconcile(present); err != nil {
		d.logger.Warn("failed to remove leftover sandbox networks", "error", err)
	}
	// Sandboxes runsc knows but whose state directory is gone.
	ids, err := d.runsc.List(ctx)
	if err != nil {
		return
	}
	for _, id := range ids {
		if known[id] || live[id] {
			continue
		}
		if err := d.runsc.Delete(ctx, id, runtime.DeleteOpts{Force: true}); err != nil && !errors.Is(err, runtime.ErrNotExist) {
			d.logger.Warn("failed to delete leftover runsc container", "sandbox_id", id, "error", err)
		}
	}
}

func orphaned(dir string, sup *runtime.Supervisor) bool {
	b, err := os.ReadFile(filepath.Join(dir, metaFile))
	if err != nil {
		return true // crashed before the task was described
	}
	var m taskMeta
	if err := json.Unmarshal(b, &m); err != nil {
		return true
	}
	if _, err := os.Stat(m.TaskDir); errors.Is(err, os.ErrNotExist) {
		return true // Nomad has garbage-collected the allocation
	}
	if sup.Alive() {
		return false
	}
	st, err := sup.ExitStatus()
	return err != nil || st == nil
}
