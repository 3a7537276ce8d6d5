package image

import (
	"bytes"
	"context"
	"crypto/sha256"
	hexenc "encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/atomicfile"
)

// Layout of Store.Dir:
//
//	images/sha256/<hex>/rootfs/     the unpacked tree of the image whose manifest digest is sha256:<hex>
//	images/sha256/<hex>/image.json  its configuration, size and layers (meta)
//	images/sha256/<hex>/last-used   mtime = last Get, for GC
//	locks/<hex>.lock                flock: shared to read an image, exclusive to create or remove it
//	locks/<hex>-<origin>.pull       flock: held while the image is pulled from one registry repository
//	tmp/                            work directories, each flocked by the process using it
//	tmp.lock                        flock: shared to create a work directory, exclusive to sweep them
const (
	metaFile    = "image.json"
	lastUseFile = "last-used"
	rootfsDir   = "rootfs"
)

type meta struct {
	Digest   string    `json:"digest"`
	Config   Config    `json:"config"`
	Size     int64     `json:"size"`
	Layers   []string  `json:"layers"`
	Unpacked time.Time `json:"unpacked"`
	// Origins are the registry repositories ("registry/repo") that served
	// every blob of the image; a task whose registry check there passes
	// may use the cached tree without fetching it again.
	Origins []string `json:"origins,omitempty"`
}

// maxOrigins bounds the origins one cache entry remembers; a source beyond
// them proves itself again on each use.
const maxOrigins = 32

func (s *Store) imagesDir() string            { return filepath.Join(s.Dir, "images", "sha256") }
func (s *Store) imageDir(hex string) string   { return filepath.Join(s.imagesDir(), hex) }
func (s *Store) rootfsPath(hex string) string { return filepath.Join(s.imageDir(hex), rootfsDir) }
func (s *Store) lockPath(hex string) string   { return filepath.Join(s.Dir, "locks", hex+".lock") }
func (s *Store) tmpDir() string               { return filepath.Join(s.Dir, "tmp") }

// pullLockPath is the lock of a pull of image hex from the registry
// repository origin (removed by its holder when the pull ends).
func (s *Store) pullLockPath(hex, origin string) string {
	sum := sha256.Sum256([]byte(origin))
	return filepath.Join(s.Dir, "locks", hex+"-"+hexenc.EncodeToString(sum[:8])+".pull")
}

func (s *Store) prepareDirs() error {
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return err
	}
	// The cache holds other tasks' images: only root looks inside.
	if err := os.Chmod(s.Dir, 0o700); err != nil {
		return err
	}
	for _, d := range []string{s.imagesDir(), filepath.Join(s.Dir, "locks"), s.tmpDir()} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	return nil
}

// fileLock is a held flock.
type fileLock struct{ f *os.File }

func (l *fileLock) unlock() {
	if l != nil && l.f != nil {
		_ = unix.Flock(int(l.f.Fd()), unix.LOCK_UN)
		_ = l.f.Close()
		l.f = nil
	}
}

// lockFile takes a flock on path, creating the file, and waits (polling, so
// that ctx can end the wait) while another holder has it. Lock files can be
// removed by their holder (GC does), so after locking it checks that the
// path still names the locked file and starts over if not.
func lockFile(ctx context.Context, path string, exclusive, wait bool) (*fileLock, error) {
	how := unix.LOCK_SH
	if exclusive {
		how = unix.LOCK_EX
	}
	for {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW, 0o600)
		if err != nil {
			return nil, err
		}
		for {
			err = unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
			if err == nil || !errors.Is(err, unix.EWOULDBLOCK) || !wait {
				break
			}
			select {
			case <-ctx.Done():
				f.Close()
				return nil, fmt.Errorf("waiting for lock %s: %w", filepath.Base(path), ctx.Err())
			case <-time.After(20 * time.Millisecond):
			}
		}
		if err != nil {
			f.Close()
			return nil, err
		}
		var held, now unix.Stat_t
		if err := unix.Fstat(int(f.Fd()), &held); err != nil {
			f.Close()
			return nil, err
		}
		if err := unix.Stat(path, &now); err == nil && now.Ino == held.Ino && now.Dev == held.Dev {
			return &fileLock{f: f}, nil
		}
		f.Close()
	}
}

func (s *Store) lockImage(ctx context.Context, hex string, exclusive bool) (*fileLock, error) {
	return lockFile(ctx, s.lockPath(hex), exclusive, true)
}

// workDir is a directory under tmp/ that this process is using; its flock
// tells a sweeping process to leave it alone.
type workDir struct {
	path string
	f    *os.File
}

func (s *Store) mkWork(ctx context.Context, prefix string) (*workDir, error) {
	gl, err := lockFile(ctx, filepath.Join(s.Dir, "tmp.lock"), false, true)
	if err != nil {
		return nil, err
	}
	defer gl.unlock()
	p, err := os.MkdirTemp(s.tmpDir(), prefix)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(p)
	if err == nil {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	}
	if err != nil {
		if f != nil {
			f.Close()
		}
		os.RemoveAll(p)
		return nil, err
	}
	return &workDir{path: p, f: f}, nil
}

// remove deletes the work directory (if it was not renamed into place) and
// lets go of it.
func (w *workDir) remove() {
	_ = os.RemoveAll(w.path)
	_ = w.f.Close()
}

// cleanTemp removes work directories that no process holds: left by a
// crashed or killed plugin, or by GC.
func (s *Store) cleanTemp(ctx context.Context) error {
	gl, err := lockFile(ctx, filepath.Join(s.Dir, "tmp.lock"), true, true)
	if err != nil {
		return err
	}
	entries, err := os.ReadDir(s.tmpDir())
	if err != nil {
		gl.unlock()
		return err
	}
	var stale []*os.File
	var paths []string
	for _, e := range entries {
		p := filepath.Join(s.tmpDir(), e.Name())
		f, err := os.OpenFile(p, os.O_RDONLY|unix.O_NOFOLLOW, 0)
		if err != nil {
			// A symlink or something unreadable: not ours to keep.
			paths = append(paths, p)
			continue
		}
		if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) != nil {
			f.Close() // in use by a live process
			continue
		}
		stale = append(stale, f)
		paths = append(paths, p)
	}
	gl.unlock()
	var errs []error
	for _, p := range paths {
		if err := os.RemoveAll(p); err != nil {
			errs = append(errs, err)
		} else {
			s.log().Debug("removed stale image work directory", "path", p)
		}
	}
	for _, f := range stale {
		f.Close()
	}
	return errors.Join(errs...)
}

func (s *Store) readMeta(hex string) (*meta, error) {
	var m meta
	if err := atomicfile.ReadJSON(filepath.Join(s.imageDir(hex), metaFile), &m); err != nil {
		return nil, fmt.Errorf("cache entry %s: %w", hex, err)
	}
	return &m, nil
}

// readEntry is readMeta for an entry whose tree is also there.
func (s *Store) readEntry(hex string) (*meta, error) {
	m, err := s.readMeta(hex)
	if err != nil {
		return nil, err
	}
	fi, err := os.Lstat(s.rootfsPath(hex))
	if err != nil {
		return nil, fmt.Errorf("cache entry %s: %w", hex, err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("cache entry %s: rootfs is not a directory", hex)
	}
	return m, nil
}

func touch(p string) error {
	now := time.Now()
	err := os.Chtimes(p, now, now)
	if errors.Is(err, fs.ErrNotExist) {
		err = os.WriteFile(p, nil, 0o600)
	}
	return err
}

// lookup returns the cached image's meta, or nil if it is not cached, and
// records the use.
func (s *Store) lookup(ctx context.Context, hex string) (*meta, error) {
	lk, err := s.lockImage(ctx, hex, false)
	if err != nil {
		return nil, err
	}
	defer lk.unlock()
	m, err := s.readEntry(hex)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			// Damaged: pull replaces it.
			s.log().Warn("damaged image cache entry; pulling it again", "digest", "sha256:"+hex, "error", err)
		}
		return nil, nil
	}
	if err := touch(filepath.Join(s.imageDir(hex), lastUseFile)); err != nil {
		return nil, fmt.Errorf("record image use: %w", err)
	}
	return m, nil
}

type pullResult struct {
	meta   *meta
	pulled bool
}

// obtain returns the image that t resolved to, from the cache or by pulling
// it, and whether this call pulled it. A tree this call did not unpack from
// t's own source is handed out only once t's source is shown to hold the
// image (authorize): knowing a digest is not access to the image.
func (s *Store) obtain(ctx context.Context, t *target) (*meta, bool, error) {
	m, pulled, err := s.obtainEntry(ctx, t)
	if err != nil || pulled {
		return m, pulled, err
	}
	if err := s.authorize(ctx, t, m); err != nil {
		return nil, false, err
	}
	return m, false, nil
}

// authorize checks that t's source could have supplied the cached image m:
// it is a registry repository that served it before (and has just answered
// the task's credentials for it), or it holds every blob, which is read and
// verified against its digest. A registry repository that passes is
// remembered.
func (s *Store) authorize(ctx context.Context, t *target, m *meta) error {
	if t.origin != "" && slices.Contains(m.Origins, t.origin) {
		return nil
	}
	if err := verifySource(ctx, t); err != nil {
		return fmt.Errorf("image %s is cached on this node, but the task's source does not hold all of it, and a cached image is only given to a task that could pull it: %w", t.digest, err)
	}
	if t.origin != "" && len(m.Origins) < maxOrigins {
		if err := s.addOrigin(ctx, t.digest.Hex, t.origin); err != nil {
			s.log().Warn("cannot record image origin", "digest", t.digest, "origin", t.origin, "error", err)
		}
	}
	return nil
}

// verifySource reads t's manifest, config and layers from its source and
// checks each against its size and digest, without unpacking anything.
func verifySource(ctx context.Context, t *target) error {
	raw := t.manifest
	if raw == nil {
		var err error
		if raw, err = t.src.manifest(ctx, v1.Descriptor{Digest: t.digest}); err != nil {
			return err
		}
	}
	if err := verifyDigest(raw, t.digest, "manifest "+t.digest.String()); err != nil {
		return err
	}
	man, err := v1.ParseManifest(bytes.NewReader(raw))
	if err != nil {
		return fmt.Errorf("manifest %s: %w", t.digest, err)
	}
	for _, d := range append([]v1.Descriptor{man.Config}, man.Layers...) {
		if err := verifyBlob(ctx, t.src, d); err != nil {
			return fmt.Errorf("blob %s: %w", d.Digest, err)
		}
	}
	return nil
}

func verifyBlob(ctx context.Context, src source, d v1.Descriptor) error {
	if d.Size < 0 {
		return fmt.Errorf("negative size %d in the manifest", d.Size)
	}
	rc, err := src.blob(ctx, d)
	if err != nil {
		return err
	}
	defer rc.Close()
	h := newHashingReader(io.LimitReader(rc, d.Size+1))
	if _, err := io.Copy(io.Discard, h); err != nil {
		return fmt.Errorf("read blob: %w", err)
	}
	return checkBlob(d, h)
}

// addOrigin records that origin served the image hex.
func (s *Store) addOrigin(ctx context.Context, hex, origin string) error {
	lk, err := s.lockImage(ctx, hex, true)
	if err != nil {
		return err
	}
	defer lk.unlock()
	m, err := s.readMeta(hex)
	if err != nil {
		return err
	}
	if slices.Contains(m.Origins, origin) || len(m.Origins) >= maxOrigins {
		return nil
	}
	m.Origins = append(m.Origins, origin)
	return atomicfile.WriteJSON(filepath.Join(s.imageDir(hex), metaFile), m, 0o600)
}

// obtainEntry finds or pulls the cache entry. One pull per image and
// registry repository at a time in this process (a flight group); pulls
// from different sources run side by side, and the image's lock file
// orders their installs (the first one wins).
//
// A pull that another task led failed from that task's source, which may
// be a repository or layout of its own made to fail (with text of its
// own): its error is not this task's, which tries again from its own.
func (s *Store) obtainEntry(ctx context.Context, t *target) (*meta, bool, error) {
	hex := t.digest.Hex
	for {
		if m, err := s.lookup(ctx, hex); err != nil || m != nil {
			return m, false, err
		}
		t.acquire()
		// Pulls of one image from one registry repository are made once;
		// a task's own layout or archive is pulled by that task alone.
		key := hex + "\x00" + t.origin
		if t.origin == "" {
			key = fmt.Sprintf("%s\x00%p", hex, t)
		}
		v, leader, err := s.pulls.do(ctx, key, func(ctx context.Context) (any, error) {
			defer t.release()
			return s.pull(ctx, t)
		})
		if !leader {
			t.release()
			if err != nil && ctx.Err() == nil {
				continue
			}
		}
		if err != nil {
			return nil, false, err
		}
		pr := v.(*pullResult)
		return pr.meta, leader && pr.pulled, nil
	}
}

func (s *Store) pull(ctx context.Context, t *target) (*pullResult, error) {
	hex := t.digest.Hex
	// The image is fetched and unpacked without the image's lock: a pull
	// from another source (another job's repository or layout, which may
	// be made slow on purpose) must not hold up this one. The lock is
	// taken to install the result. Pulls from one registry repository are
	// made once between processes too, under a lock of their own.
	if t.origin != "" {
		path := s.pullLockPath(hex, t.origin)
		pl, err := lockFile(ctx, path, true, true)
		if err != nil {
			return nil, err
		}
		defer func() {
			_ = os.Remove(path)
			pl.unlock()
		}()
		if m, err := s.lookup(ctx, hex); err != nil || m != nil {
			// Another process pulled it from here meanwhile.
			return &pullResult{meta: m}, err
		}
	}
	work, err := s.mkWork(ctx, "pull-"+hex[:12]+"-")
	if err != nil {
		return nil, fmt.Errorf("create work directory: %w", err)
	}
	defer work.remove()

	m, err := s.unpackImage(ctx, t, work.path)
	if err != nil {
		return nil, err
	}
	if t.origin != "" {
		m.Origins = []string{t.origin}
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(work.path, metaFile), b, 0o600); err != nil {
		return nil, err
	}
	if err := touch(filepath.Join(work.path, lastUseFile)); err != nil {
		return nil, err
	}
	// Make the tree durable before it becomes visible: after a crash the
	// cache holds either nothing or a whole image.
	if err := unix.Syncfs(int(work.f.Fd())); err != nil {
		return nil, fmt.Errorf("sync unpacked image: %w", err)
	}

	lk, err := s.lockImage(ctx, hex, true)
	if err != nil {
		return nil, err
	}
	final := s.imageDir(hex)
	if cur, err := s.readEntry(hex); err == nil {
		// Another pull installed it meanwhile. This one read and
		// verified every blob from t's source, so t may use it.
		err := touch(filepath.Join(final, lastUseFile))
		lk.unlock()
		if err != nil {
			return nil, err
		}
		if t.origin != "" && !slices.Contains(cur.Origins, t.origin) && len(cur.Origins) < maxOrigins {
			if err := s.addOrigin(ctx, hex, t.origin); err != nil {
				s.log().Warn("cannot record image origin", "digest", t.digest, "origin", t.origin, "error", err)
			}
		}
		return &pullResult{meta: cur, pulled: true}, nil
	}
	defer lk.unlock()
	if _, err := os.Lstat(final); err == nil {
		// A directory without readable meta or tree is not a cache
		// entry (it was damaged by hand): move it aside.
		if err := s.discard(ctx, final, hex); err != nil {
			return nil, fmt.Errorf("remove damaged cache entry: %w", err)
		}
	}
	if err := os.Rename(work.path, final); err != nil {
		return nil, fmt.Errorf("move unpacked image into the cache: %w", err)
	}
	return &pullResult{meta: m, pulled: true}, nil
}

// discard moves dir into tmp/ (so it vanishes from the cache at once) and
// removes it.
func (s *Store) discard(ctx context.Context, dir, hex string) error {
	trash, err := s.mkWork(ctx, "gc-"+hex[:12]+"-")
	if err != nil {
		return err
	}
	defer trash.remove()
	return os.Rename(dir, filepath.Join(trash.path, "x"))
}

// GC removes cached images that inUse does not claim: first those last used
// more than maxAge ago (maxAge <= 0: no age limit), then the least recently
// used ones until the cache is at most maxBytes (maxBytes <= 0: no size
// limit). Images handed out by Get within GCGrace are kept either way, as
// are images another Get is reading or pulling at that moment. It returns
// the digests it removed.
func (s *Store) GC(maxAge time.Duration, maxBytes int64, inUse func(digest string) bool) ([]string, error) {
	if err := s.Open(); err != nil {
		return nil, err
	}
	ctx := context.Background()
	if err := s.cleanTemp(ctx); err != nil {
		s.log().Warn("image GC: cleaning work directories", "error", err)
	}
	entries, err := os.ReadDir(s.imagesDir())
	if err != nil {
		return nil, err
	}
	type entry struct {
		hex  string
		size int64
		used time.Time
	}
	var all []entry
	var total int64
	for _, e := range entries {
		hex := e.Name()
		if !isHex64(hex) {
			continue
		}
		en := entry{hex: hex}
		if m, err := s.readMeta(hex); err == nil {
			en.size = m.Size
		}
		en.used = s.lastUse(hex)
		all = append(all, en)
		total += en.size
	}
	sort.Slice(all, func(i, j int) bool { return all[i].used.Before(all[j].used) })

	grace := s.gcGrace()
	var removed []string
	var errs []error
	done := map[string]bool{}
	try := func(en entry) {
		digest := "sha256:" + en.hex
		if inUse != nil && inUse(digest) {
			return
		}
		ok, err := s.removeImage(ctx, en.hex, en.used, grace)
		if err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", digest, err))
			return
		}
		if ok {
			done[en.hex] = true
			removed = append(removed, digest)
			total -= en.size
			s.log().Info("image removed from cache", "digest", digest, "size", en.size, "last_used", en.used)
		}
	}
	now := time.Now()
	if maxAge > 0 {
		for _, en := range all {
			if now.Sub(en.used) > maxAge {
				try(en)
			}
		}
	}
	if maxBytes > 0 {
		for _, en := range all {
			if total <= maxBytes {
				break
			}
			if !done[en.hex] {
				try(en)
			}
		}
	}
	return removed, errors.Join(errs...)
}

func (s *Store) lastUse(hex string) time.Time {
	if fi, err := os.Stat(filepath.Join(s.imageDir(hex), lastUseFile)); err == nil {
		return fi.ModTime()
	}
	if fi, err := os.Stat(s.imageDir(hex)); err == nil {
		return fi.ModTime()
	}
	return time.Time{}
}

// removeImage removes one image unless it is busy or was used since GC
// looked (or within the grace period).
func (s *Store) removeImage(ctx context.Context, hex string, seen time.Time, grace time.Duration) (bool, error) {
	lk, err := lockFile(ctx, s.lockPath(hex), true, false)
	if err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return false, nil
		}
		return false, err
	}
	defer lk.unlock()
	used := s.lastUse(hex)
	if used.After(seen) || time.Since(used) < grace {
		return false, nil
	}
	if err := s.discard(ctx, s.imageDir(hex), hex); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return false, nil
		}
		return false, err
	}
	// Removed while held: a waiter notices the path changed and retries.
	_ = os.Remove(s.lockPath(hex))
	return true, nil
}

func isHex64(s string) bool {
	if len(s) != 64 {
		return false
	}
	return strings.Trim(s, "0123456789abcdef") == ""
}
