// Package image turns an OCI image reference into an unpacked, read-only
// root filesystem directory and the image's configuration, for the sandbox
// driver to run a task from.
//
// Images come from a registry ("registry/repo:tag", "registry/repo@sha256:…"),
// from an OCI image layout directory the task brought ("oci-layout:local/img")
// or from a tar of one ("oci-archive:local/img.tar"). Every manifest, config
// and layer is checked against its digest, and the unpacked tree is cached
// under Store.Dir by the digest of the image manifest, so sandboxes running
// the same image share one tree.
//
// Unpacking is a security boundary: layers are untrusted input. The
// extractor writes only inside the image's own directory (through os.Root),
// never follows a symlink that a layer created, refuses device nodes, strips
// setuid and setgid bits from files, and stops at a size and a file-count
// limit. A failed or interrupted pull leaves nothing in the cache.
package image

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Defaults for the Store's zero-valued limits.
const (
	DefaultMaxImageSize int64 = 8 << 30
	DefaultMaxFiles     int64 = 1 << 20
	DefaultPullTimeout        = 10 * time.Minute
	DefaultGCGrace            = 5 * time.Minute
)

// Config is the part of the image's configuration the driver uses.
type Config struct {
	Entrypoint []string
	Cmd        []string
	Env        []string
	WorkingDir string
	User       string
}

// Image is an unpacked image ready to be used as a sandbox's root.
type Image struct {
	Ref    string // as the task wrote it
	Digest string // manifest digest "sha256:..." the reference resolved to
	// IndexDigest is the digest of the image index the reference named,
	// when it named one and the manifest for this platform was chosen
	// from it; empty otherwise.
	IndexDigest string
	Rootfs      string // absolute path of the unpacked, read-only tree (shared; never modify)
	Config      Config
	Size        int64 // disk usage of the unpacked tree in bytes
	Pulled      bool  // false when it came from the cache
	PullTime    time.Duration
}

// Auth is a task's own registry credentials (the task's `auth {}` block).
// When any field is set it replaces the plugin's AuthConfig for that task.
type Auth struct {
	Username      string
	Password      string
	IdentityToken string
	RegistryToken string
}

func (a *Auth) empty() bool { return a == nil || *a == Auth{} }

// Policy is the operator's rules for which references a task may use.
type Policy struct {
	// RequireDigest refuses registry references without @sha256:.
	RequireDigest bool
	// AllowedRegistries, if non-empty, lists the only registry hosts
	// (host[:port]) tasks may pull from. "docker.io", "index.docker.io"
	// and "registry-1.docker.io" all name Docker Hub.
	AllowedRegistries []string
}

// Store is the image cache. Set its fields, then use it from any number of
// goroutines; Open (or the first Get or GC) prepares the directory.
// Several plugin processes may share one Dir: they coordinate with lock
// files.
type Store struct {
	// Dir is the cache root, e.g. /var/lib/nomad-sandbox/images. It must
	// be absolute; it is created with mode 0700.
	Dir string
	// AuthConfig is the path of a docker config.json ("auths",
	// "credHelpers", "credsStore"); empty means none. The plugin process's
	// own $HOME and $DOCKER_CONFIG are never consulted.
	AuthConfig string
	// PullTimeout bounds resolving, fetching and unpacking one image;
	// 0 means DefaultPullTimeout.
	PullTimeout time.Duration
	// MaxImageSize caps the total unpacked bytes of an image (the
	// uncompressed layer streams, and the file contents they declare);
	// 0 means DefaultMaxImageSize.
	MaxImageSize int64
	// MaxFiles caps the number of tar entries over all layers of an
	// image; 0 means DefaultMaxFiles.
	MaxFiles int64
	// Insecure reports whether plain HTTP is allowed to a registry
	// (host[:port]). nil allows it only for loopback registries
	// (localhost, 127.0.0.0/8, ::1).
	Insecure func(registry string) bool
	// GCGrace protects images from GC for this long after their last
	// Get, so that an image handed to a task that is still starting is
	// not removed under it; 0 means DefaultGCGrace, negative means none.
	GCGrace time.Duration
	Logger  hclog.Logger

	mu       sync.Mutex
	ready    bool
	resolves flightGroup
	pulls    flightGroup
}

func (s *Store) log() hclog.Logger {
	if s.Logger == nil {
		return hclog.NewNullLogger()
	}
	return s.Logger
}

func (s *Store) pullTimeout() time.Duration {
	if s.PullTimeout > 0 {
		return s.PullTimeout
	}
	return DefaultPullTimeout
}

func (s *Store) maxImageSize() int64 {
	if s.MaxImageSize > 0 {
		return s.MaxImageSize
	}
	return DefaultMaxImageSize
}

func (s *Store) maxFiles() int64 {
	if s.MaxFiles > 0 {
		return s.MaxFiles
	}
	return DefaultMaxFiles
}

func (s *Store) gcGrace() time.Duration {
	switch {
	case s.GCGrace < 0:
		return 0
	case s.GCGrace == 0:
		return DefaultGCGrace
	}
	return s.GCGrace
}

// Open prepares the cache directory and removes work directories that an
// interrupted pull left behind (ones no live process holds). Get and GC call
// it themselves; a driver may call it at start to clean up early.
func (s *Store) Open() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ready {
		return nil
	}
	if s.Dir == "" || !filepath.IsAbs(s.Dir) {
		return fmt.Errorf("image store: dir %q must be an absolute path", s.Dir)
	}
	if err := s.prepareDirs(); err != nil {
		return fmt.Errorf("image store: %w", err)
	}
	if err := s.cleanTemp(context.Background()); err != nil {
		return fmt.Errorf("image store: clean work directories: %w", err)
	}
	s.ready = true
	return nil
}

// Get returns the unpacked image that ref names, pulling and unpacking it
// unless it is cached. auth is the task's own credentials (nil for none),
// pol the operator's rules, and taskDir the task's directory, against which
// oci-layout: and oci-archive: paths are resolved (they must stay inside it).
func (s *Store) Get(ctx context.Context, ref string, auth *Auth, pol Policy, taskDir string) (*Image, error) {
	start := time.Now()
	img, err := s.get(ctx, ref, auth, pol, taskDir)
	if err != nil {
		return nil, capError(fmt.Errorf("image %q: %w", ref, err))
	}
	img.PullTime = time.Since(start)
	if img.Pulled {
		s.log().Info("image pulled", "ref", ref, "digest", img.Digest, "size", img.Size, "duration", img.PullTime)
	}
	return img, nil
}

func (s *Store) get(ctx context.Context, ref string, auth *Auth, pol Policy, taskDir string) (*Image, error) {
	if err := s.Open(); err != nil {
		return nil, err
	}
	r, err := parseReference(ref)
	if err != nil {
		return nil, err
	}
	if err := pol.check(r); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, s.pullTimeout())
	defer cancel()

	var t *target
	switch r.kind {
	case kindRegistry:
		t, err = s.resolveRemote(ctx, r, auth, pol)
	case kindLayout:
		t, err = openLayoutTarget(ctx, r, taskDir)
	case kindArchive:
		t, err = openArchiveTarget(ctx, r, taskDir)
	default:
		err = errors.New("unknown reference kind")
	}
	if err != nil {
		return nil, wrapTimeout(ctx, err)
	}
	defer t.release()

	m, pulled, err := s.obtain(ctx, t)
	if err != nil {
		return nil, wrapTimeout(ctx, err)
	}
	return &Image{
		Ref:         ref,
		Digest:      t.digest.String(),
		IndexDigest: t.indexDigest,
		Rootfs:      s.rootfsPath(t.digest.Hex),
		Config:      m.Config,
		Size:        m.Size,
		Pulled:      pulled,
	}, nil
}

// ErrPullTimeout is in the error of a pull that ran out of the Store's
// PullTimeout.
var ErrPullTimeout = errors.New("the pull ran out of time")

// wrapTimeout makes a pull that ran out of time say so. It reads the
// deadline rather than only ctx.Err(): a shared lookup (flightGroup) runs
// under a timer of its own for the same deadline, which may fire first.
func wrapTimeout(ctx context.Context, err error) error {
	dl, ok := ctx.Deadline()
	if errors.Is(ctx.Err(), context.DeadlineExceeded) || (ok && !time.Now().Before(dl)) {
		return fmt.Errorf("%w (%w)", err, ErrPullTimeout)
	}
	return err
}
