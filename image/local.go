package image

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"
	"syscall"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// refNameAnnotation names a manifest in an OCI layout's index.json.
const refNameAnnotation = "org.opencontainers.image.ref.name"

// maxArchiveEntries bounds the scan of an oci-archive.
const maxArchiveEntries = 1 << 20

// layoutStore is an OCI image layout: index.json plus blobs/sha256/<hex>.
type layoutStore interface {
	index() ([]byte, error)
	open(h v1.Hash) (io.ReadCloser, int64, error)
}

// localSource reads manifests and blobs from a layout the task brought,
// verifying every one (a layout is untrusted: its contents must not become
// the cache entry of a digest they do not match).
type localSource struct {
	store layoutStore
	what  string // "oci-layout local/img", for errors
}

func (l *localSource) manifest(_ context.Context, d v1.Descriptor) ([]byte, error) {
	what := fmt.Sprintf("%s: manifest %s", l.what, d.Digest)
	rc, size, err := l.store.open(d.Digest)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	defer rc.Close()
	if size > maxManifestSize {
		return nil, fmt.Errorf("%s is larger than %d bytes", what, maxManifestSize)
	}
	b, err := io.ReadAll(io.LimitReader(rc, maxManifestSize+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if err := verifyDigest(b, d.Digest, what); err != nil {
		return nil, err
	}
	return b, nil
}

func (l *localSource) blob(_ context.Context, d v1.Descriptor) (io.ReadCloser, error) {
	rc, _, err := l.store.open(d.Digest)
	if err != nil {
		return nil, fmt.Errorf("%s: blob %s: %w", l.what, d.Digest, err)
	}
	return rc, nil
}

// resolveLayout picks the manifest a local reference selects: by digest,
// by the ref.name annotation in index.json, or the only one there is.
func resolveLayout(ctx context.Context, r *reference, src *localSource) (*resolved, error) {
	raw, err := src.store.index()
	if err != nil {
		return nil, fmt.Errorf("%s: index.json: %w", src.what, err)
	}
	ix, err := v1.ParseIndexManifest(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("%s: index.json: %w", src.what, err)
	}
	var d *v1.Descriptor
	var names []string
	for i := range ix.Manifests {
		m := &ix.Manifests[i]
		n := m.Annotations[refNameAnnotation]
		if n != "" {
			names = append(names, n)
		}
		switch {
		case r.digest != nil:
			if m.Digest == *r.digest {
				d = m
			}
		case r.tag != "":
			// Tools write either the bare tag or a whole reference.
			if d == nil && (n == r.tag || strings.HasSuffix(n, ":"+r.tag)) {
				d = m
			}
		}
	}
	switch {
	case d != nil:
	case r.digest != nil:
		// Not listed in index.json; it may still be a blob of the
		// layout (a platform manifest of a listed index, say).
		d = &v1.Descriptor{Digest: *r.digest}
	case r.tag != "":
		return nil, fmt.Errorf("%s has no manifest named %q (index.json names: %s)", src.what, r.tag, listOrNone(names))
	case len(ix.Manifests) == 1:
		d = &ix.Manifests[0]
	case len(ix.Manifests) == 0:
		return nil, fmt.Errorf("%s: index.json lists no manifests", src.what)
	default:
		return nil, fmt.Errorf("%s holds %d manifests: select one with :<name> or @sha256:<digest> (index.json names: %s)", src.what, len(ix.Manifests), listOrNone(names))
	}
	m, err := src.manifest(ctx, *d)
	if err != nil {
		return nil, err
	}
	return pickManifest(ctx, src, *d, m)
}

func listOrNone(names []string) string {
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ", ")
}

// openTaskPath opens the task directory as a root, so that a path in it
// cannot lead out of it through ".." or symlinks.
func openTaskDir(taskDir string) (*os.Root, error) {
	if taskDir == "" {
		return nil, errors.New("no task directory to find local images in")
	}
	root, err := os.OpenRoot(taskDir)
	if err != nil {
		return nil, fmt.Errorf("task directory: %w", err)
	}
	return root, nil
}

func escapeErr(p string, err error) error {
	if strings.Contains(err.Error(), "escapes from parent") || strings.Contains(err.Error(), "path escapes") {
		return fmt.Errorf("path %q leads outside the task directory", p)
	}
	return fmt.Errorf("path %q: %w", p, err)
}

// dirLayout is a layout directory, read through an os.Root so that
// symlinks in it cannot lead anywhere else.
type dirLayout struct{ root *os.Root }

func openLayoutTarget(ctx context.Context, r *reference, taskDir string) (*target, error) {
	td, err := openTaskDir(taskDir)
	if err != nil {
		return nil, err
	}
	defer td.Close()
	root, err := td.OpenRoot(r.path)
	if err != nil {
		return nil, fmt.Errorf("oci-layout: %w", escapeErr(r.path, err))
	}
	src := &localSource{store: &dirLayout{root: root}, what: "oci-layout " + r.path}
	res, err := resolveLayout(ctx, r, src)
	if err != nil {
		root.Close()
		return nil, err
	}
	return newTarget(res, src, func() { root.Close() }), nil
}

func (l *dirLayout) index() ([]byte, error) {
	rc, _, err := l.openRegular("index.json", maxManifestSize)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	return io.ReadAll(rc)
}

func (l *dirLayout) open(h v1.Hash) (io.ReadCloser, int64, error) {
	if h.Algorithm != "sha256" || !isHex64(h.Hex) {
		return nil, 0, fmt.Errorf("unsupported digest %s", h)
	}
	return l.openRegular(path.Join("blobs", h.Algorithm, h.Hex), -1)
}

// openRegular opens a regular file of the layout. O_NONBLOCK keeps a FIFO
// planted in the layout from blocking the open.
func (l *dirLayout) openRegular(name string, max int64) (io.ReadCloser, int64, error) {
	f, err := l.root.OpenFile(name, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, 0, fmt.Errorf("%s is missing", name)
		}
		return nil, 0, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, err
	}
	if !fi.Mode().IsRegular() {
		f.Close()
		return nil, 0, fmt.Errorf("%s is not a regular file", name)
	}
	if max >= 0 && fi.Size() > max {
		f.Close()
		return nil, 0, fmt.Errorf("%s is larger than %d bytes", name, max)
	}
	return f, fi.Size(), nil
}

// tarLayout is a layout inside an uncompressed tar: the blobs are read in
// place, at the offsets a scan of the tar found.
type tarLayout struct {
	f     *os.File
	idx   []byte
	spans map[string]span // by digest hex
}

type span struct{ off, size int64 }

func openArchiveTarget(ctx context.Context, r *reference, taskDir string) (*target, error) {
	td, err := openTaskDir(taskDir)
	if err != nil {
		return nil, err
	}
	defer td.Close()
	f, err := td.OpenFile(r.path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("oci-archive: %w", escapeErr(r.path, err))
	}
	what := "oci-archive " + r.path
	tl, err := scanArchive(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	src := &localSource{store: tl, what: what}
	res, err := resolveLayout(ctx, r, src)
	if err != nil {
		f.Close()
		return nil, err
	}
	return newTarget(res, src, func() { f.Close() }), nil
}

// offsetReader reads a file from an offset it keeps. Because it can seek,
// archive/tar skips file contents instead of reading them, and the offset
// after Next is where the entry's content starts.
type offsetReader struct {
	f   *os.File
	off int64
}

func (o *offsetReader) Read(p []byte) (int, error) {
	n, err := o.f.ReadAt(p, o.off)
	o.off += int64(n)
	if err == io.EOF && n > 0 {
		err = nil
	}
	return n, err
}

func (o *offsetReader) Seek(offset int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
		o.off = offset
	case io.SeekCurrent:
		o.off += offset
	default:
		fi, err := o.f.Stat()
		if err != nil {
			return 0, err
		}
		o.off = fi.Size() + offset
	}
	return o.off, nil
}

func scanArchive(f *os.File) (*tarLayout, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, errors.New("not a regular file")
	}
	var magic [4]byte
	if n, _ := f.ReadAt(magic[:], 0); n >= 2 && (magic[0] == 0x1f && magic[1] == 0x8b || n == 4 && bytes.Equal(magic[:], zstdMagic)) {
		return nil, errors.New("the archive is compressed: give an uncompressed tar of the OCI layout")
	}
	tl := &tarLayout{f: f, spans: map[string]span{}}
	or := &offsetReader{f: f}
	tr := tar.NewReader(or)
	for n := 0; ; n++ {
		if n > maxArchiveEntries {
			return nil, fmt.Errorf("more than %d entries", maxArchiveEntries)
		}
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("read tar: %w", err)
		}
		if hdr.Typeflag != tar.TypeReg {
			continue
		}
		name := path.Clean(strings.TrimPrefix(hdr.Name, "./"))
		switch {
		case name == "index.json":
			if hdr.Size > maxManifestSize {
				return nil, fmt.Errorf("index.json is larger than %d bytes", maxManifestSize)
			}
			if tl.idx, err = io.ReadAll(tr); err != nil {
				return nil, fmt.Errorf("read index.json: %w", err)
			}
		case strings.HasPrefix(name, "blobs/sha256/") && isHex64(strings.TrimPrefix(name, "blobs/sha256/")):
			if hdr.Size > fi.Size()-or.off {
				return nil, fmt.Errorf("%s runs past the end of the archive", name)
			}
			tl.spans[strings.TrimPrefix(name, "blobs/sha256/")] = span{off: or.off, size: hdr.Size}
		}
	}
	if tl.idx == nil {
		return nil, errors.New("no index.json: is this a tar of an OCI image layout?")
	}
	return tl, nil
}

func (t *tarLayout) index() ([]byte, error) { return t.idx, nil }

func (t *tarLayout) open(h v1.Hash) (io.ReadCloser, int64, error) {
	sp, ok := t.spans[h.Hex]
	if h.Algorithm != "sha256" || !ok {
		return nil, 0, fmt.Errorf("blobs/%s/%s is missing", h.Algorithm, h.Hex)
	}
	return io.NopCloser(io.NewSectionReader(t.f, sp.off, sp.size)), sp.size, nil
}
