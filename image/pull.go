package image

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/zstd"
)

var (
	gzipMagic = []byte{0x1f, 0x8b}
	zstdMagic = []byte{0x28, 0xb5, 0x2f, 0xfd}
)

// unpackImage fetches t's manifest, config and layers, verifies each, and
// unpacks the layers into work/rootfs.
func (s *Store) unpackImage(ctx context.Context, t *target, work string) (*meta, error) {
	raw := t.manifest
	if raw == nil {
		var err error
		if raw, err = t.src.manifest(ctx, v1.Descriptor{Digest: t.digest}); err != nil {
			return nil, err
		}
	}
	if err := verifyDigest(raw, t.digest, "manifest "+t.digest.String()); err != nil {
		return nil, err
	}
	man, err := v1.ParseManifest(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("manifest %s: %w", t.digest, err)
	}
	if mt := man.Config.MediaType; mt != types.OCIConfigJSON && mt != types.DockerConfigJSON {
		return nil, fmt.Errorf("manifest %s is not a container image (its config is %q)", t.digest, mt)
	}
	cfgRaw, err := readBlob(ctx, t.src, man.Config, maxConfigSize, "config")
	if err != nil {
		return nil, err
	}
	cfg, err := v1.ParseConfigFile(bytes.NewReader(cfgRaw))
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", man.Config.Digest, err)
	}
	if cfg.OS != "" && cfg.OS != "linux" {
		return nil, fmt.Errorf("image is for %s/%s, not linux", cfg.OS, cfg.Architecture)
	}
	if want := platform().Architecture; cfg.Architecture != "" && cfg.Architecture != want {
		s.log().Warn("image is built for another architecture", "digest", t.digest, "image_arch", cfg.Architecture, "host_arch", want)
	}
	if len(man.Layers) > maxLayers {
		return nil, fmt.Errorf("manifest %s has %d layers, more than the %d allowed", t.digest, len(man.Layers), maxLayers)
	}
	if len(cfg.RootFS.DiffIDs) != len(man.Layers) {
		return nil, fmt.Errorf("manifest %s lists %d layers but its config %d", t.digest, len(man.Layers), len(cfg.RootFS.DiffIDs))
	}

	rootfs := filepath.Join(work, rootfsDir)
	if err := os.Mkdir(rootfs, 0o755); err != nil {
		return nil, err
	}
	root, err := os.OpenRoot(rootfs)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	u := newUnpacker(root, s.maxImageSize(), s.maxFiles(), s.log())
	layers := make([]string, len(man.Layers))
	for i, l := range man.Layers {
		layers[i] = l.Digest.String()
		where := fmt.Sprintf("layer %d/%d %s", i+1, len(man.Layers), l.Digest)
		if err := s.applyLayer(ctx, u, t.src, l, cfg.RootFS.DiffIDs[i]); err != nil {
			return nil, fmt.Errorf("%s: %w", where, err)
		}
	}
	u.finish()
	size, err := diskUsage(rootfs)
	if err != nil {
		return nil, err
	}
	c := cfg.Config
	return &meta{
		Digest: t.digest.String(),
		Config: Config{
			Entrypoint: c.Entrypoint,
			Cmd:        c.Cmd,
			Env:        c.Env,
			WorkingDir: c.WorkingDir,
			User:       c.User,
		},
		Size:     size,
		Layers:   layers,
		Unpacked: time.Now().UTC(),
	}, nil
}

// readBlob reads a small blob whole and verifies it.
func readBlob(ctx context.Context, src source, d v1.Descriptor, max int64, what string) ([]byte, error) {
	what = what + " " + d.Digest.String()
	if d.Size < 0 || d.Size > max {
		return nil, fmt.Errorf("%s is %d bytes, more than the %d allowed", what, d.Size, max)
	}
	rc, err := src.blob(ctx, d)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, max+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if int64(len(b)) != d.Size {
		return nil, fmt.Errorf("%s: %d bytes where the manifest says %d", what, len(b), d.Size)
	}
	if err := verifyDigest(b, d.Digest, what); err != nil {
		return nil, err
	}
	return b, nil
}

// hashingReader hashes and counts what is read through it.
type hashingReader struct {
	r io.Reader
	h hash.Hash
	n int64
}

func newHashingReader(r io.Reader) *hashingReader { return &hashingReader{r: r, h: sha256.New()} }

func (h *hashingReader) Read(p []byte) (int, error) {
	n, err := h.r.Read(p)
	h.h.Write(p[:n])
	h.n += int64(n)
	return n, err
}

func (h *hashingReader) sum() string { return "sha256:" + hex.EncodeToString(h.h.Sum(nil)) }

// applyLayer streams one layer blob through digest checks and the
// decompressor into the unpacker. The compressed stream is checked against
// the manifest's digest and size, the uncompressed one against the
// config's diff ID; both are read to their end so that the checks happen.
func (s *Store) applyLayer(ctx context.Context, u *unpacker, src source, d v1.Descriptor, diffID v1.Hash) error {
	if strings.HasSuffix(string(d.MediaType), "+encrypted") {
		return fmt.Errorf("encrypted layers (%s) are not supported", d.MediaType)
	}
	if d.Size < 0 {
		return fmt.Errorf("negative size %d in the manifest", d.Size)
	}
	if d.Size > u.maxBytes {
		return fmt.Errorf("%w: compressed size %d is over the max image size of %d bytes", ErrTooBig, d.Size, u.maxBytes)
	}
	if d.Digest.Algorithm != "sha256" || diffID.Algorithm != "sha256" {
		return fmt.Errorf("only sha256 digests are supported")
	}
	rc, err := src.blob(ctx, d)
	if err != nil {
		return err
	}
	defer rc.Close()
	comp := newHashingReader(io.LimitReader(rc, d.Size+1))
	br := bufio.NewReaderSize(comp, 1<<16)
	magic, _ := br.Peek(4)

	var plain io.Reader
	switch {
	case bytes.HasPrefix(magic, gzipMagic):
		zr, err := gzip.NewReader(br)
		if err != nil {
			return s.layerErr(d, comp, br, fmt.Errorf("gzip: %w", err))
		}
		defer zr.Close()
		plain = zr
	case bytes.HasPrefix(magic, zstdMagic):
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(1<<30))
		if err != nil {
			return s.layerErr(d, comp, br, fmt.Errorf("zstd: %w", err))
		}
		defer zr.Close()
		plain = zr
	default:
		plain = br
	}
	un := newHashingReader(&budgetReader{r: plain, u: u})
	if err := u.apply(ctx, un, d.Digest.String()); err != nil {
		return s.layerErr(d, comp, br, err)
	}
	// The tar's end-of-archive blocks and any padding after them.
	if _, err := io.Copy(io.Discard, un); err != nil {
		return s.layerErr(d, comp, br, fmt.Errorf("after the end of the tar: %w", err))
	}
	_, rerr := io.Copy(io.Discard, br)
	if err := checkBlob(d, comp); err != nil {
		return err
	}
	if rerr != nil {
		return fmt.Errorf("read blob: %w", rerr)
	}
	if got := un.sum(); got != diffID.String() {
		return fmt.Errorf("uncompressed content is %s, but the image config says %s: the image is inconsistent or was tampered with", got, diffID)
	}
	return nil
}

func checkBlob(d v1.Descriptor, comp *hashingReader) error {
	if comp.n != d.Size {
		return fmt.Errorf("blob is %s bytes where the manifest says %d: the source is corrupt or was tampered with", sizeStr(comp.n, d.Size), d.Size)
	}
	if got := comp.sum(); got != d.Digest.String() {
		return fmt.Errorf("content does not match its digest (got %s): the source is corrupt or was tampered with", got)
	}
	return nil
}

func sizeStr(n, want int64) string {
	if n > want {
		return fmt.Sprintf("more than %d", want)
	}
	return fmt.Sprint(n)
}

// layerErr reports a failed layer. A blob that does not match its digest
// is reported as that rather than as whatever the corruption made the
// decompressor or the extractor trip over: the rest of the blob (bounded by
// its declared size) is read to find out. Limits and safety refusals are
// reported as they are.
func (s *Store) layerErr(d v1.Descriptor, comp *hashingReader, br *bufio.Reader, err error) error {
	var ee *entryError
	if errors.As(err, &ee) || errors.Is(err, ErrTooBig) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	// A source that verifies by itself (go-containerregistry's remote
	// reader does) fails the last read; what was read still counts.
	_, _ = io.Copy(io.Discard, br)
	if comp.n >= d.Size {
		if cerr := checkBlob(d, comp); cerr != nil {
			return cerr
		}
	}
	return err
}

// budgetReader charges every uncompressed byte to the unpacker's size
// budget, which stops decompression bombs.
type budgetReader struct {
	r io.Reader
	u *unpacker
}

func (b *budgetReader) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	b.u.streamBytes += int64(n)
	if b.u.streamBytes > b.u.maxBytes {
		return n, b.u.tooBig()
	}
	return n, err
}

// diskUsage is the space a tree takes, counting hard-linked files once.
func diskUsage(dir string) (int64, error) {
	type ino struct{ dev, ino uint64 }
	seen := map[ino]bool{}
	var total int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			total += fi.Size()
			return nil
		}
		if st.Nlink > 1 && !d.IsDir() {
			k := ino{uint64(st.Dev), st.Ino}
			if seen[k] {
				return nil
			}
			seen[k] = true
		}
		total += st.Blocks * 512
		return nil
	})
	return total, err
}
