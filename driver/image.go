package driver

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/image"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/atomicfile"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

// pullImage resolves the task's image to a read-only unpacked tree in the
// node's cache, pulling it if needed, and reports it in task events. Time
// spent here does not count against the task's timeout: the supervisor's
// clock starts when the sandbox runs.
func (d *Driver) pullImage(cfg *drivers.TaskConfig, tc *TaskConfig) (*image.Image, error) {
	var auth *image.Auth
	if a := tc.Auth; a.Username != "" || a.Password != "" {
		auth = &image.Auth{Username: a.Username, Password: a.Password}
	}
	pol := image.Policy{RequireDigest: d.config.RequireDigest, AllowedRegistries: d.config.AllowedRegistries}
	d.emitEvent(cfg, "Pulling image "+tc.Image, nil)
	// The store bounds the pull by image_pull_timeout (SetConfig gave it).
	img, err := d.images.Get(d.ctx, tc.Image, auth, pol, cfg.TaskDir().Dir)
	if errors.Is(err, image.ErrPullTimeout) {
		return nil, fmt.Errorf("%w: raise the plugin's image_pull_timeout if the image needs longer", err)
	}
	if errors.Is(err, image.ErrTooBig) {
		return nil, fmt.Errorf("%w: the plugin's image_max_size_mb is %d; use a smaller image or ask the operator to raise it", err, d.config.imageMaxSizeMB())
	}
	if err != nil {
		return nil, err
	}
	if img.Pulled {
		d.emitEvent(cfg, fmt.Sprintf("Pulled image %s in %s", img.Digest, img.PullTime.Round(time.Millisecond)), map[string]string{"image": tc.Image, "digest": img.Digest})
	} else {
		d.emitEvent(cfg, "Using cached image "+img.Digest, map[string]string{"image": tc.Image, "digest": img.Digest})
	}
	return img, nil
}

// collectImages removes cached images no state directory refers to, by age
// and then by size, as the plugin's image_gc says.
func (d *Driver) collectImages() {
	inUse := map[string]bool{}
	entries, _ := os.ReadDir(d.config.StateDir)
	for _, e := range entries {
		var m taskMeta
		if atomicfile.ReadJSON(runtime.StateDir(filepath.Join(d.config.StateDir, e.Name())).TaskMeta(), &m) == nil && m.ImageDigest != "" {
			inUse[m.ImageDigest] = true
		}
	}
	removed, err := d.images.GC(d.config.imageMaxAge, d.config.imageCacheMB()<<20, func(digest string) bool { return inUse[digest] })
	if err != nil {
		d.logger.Warn("image garbage collection failed", "error", err)
	}
	for _, digest := range removed {
		d.logger.Info("removed unused image", "digest", digest)
	}
}
