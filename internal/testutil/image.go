package testutil

import (
	"archive/tar"
	"bytes"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	goruntime "runtime"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// tarUnix is the one modification time (Unix seconds) of every entry the
// tar builders write, so that the same tree gives the same bytes (and layer
// digest) on every call.
const tarUnix = 1700000000

// BusyboxImage is an OCI image whose first layer is BusyboxTar (the tree of
// MakeRootfs), then the extra layers, with cfg as its configuration.
func BusyboxImage(t testing.TB, cfg v1.Config, extra ...v1.Layer) v1.Image {
	t.Helper()
	return Image(t, cfg, append([]v1.Layer{Layer(t, BusyboxTar(t))}, extra...)...)
}

// BusyboxTar is MakeRootfs's busybox root filesystem as an uncompressed
// tar, followed by the extra entries (directories, for instance, whose
// owner a test checks after an unpack). The same extra gives the same bytes
// on every call.
func BusyboxTar(t testing.TB, extra ...*tar.Header) []byte {
	t.Helper()
	dir := MakeRootfs(t, filepath.Join(t.TempDir(), "rootfs"))
	b, err := tarDir(dir, extra...)
	if err != nil {
		t.Fatalf("tar the busybox rootfs: %v", err)
	}
	return b
}

// Image is an OCI image (OCI media types, linux on this machine's
// architecture) of layers, with cfg as its configuration.
func Image(t testing.TB, cfg v1.Config, layers ...v1.Layer) v1.Image {
	t.Helper()
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err := mutate.AppendLayers(img, layers...)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", goruntime.GOARCH
	cf.Config = cfg
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// Layer is a gzip-compressed OCI layer of the tar b; opts can change the
// compression and media type.
func Layer(t testing.TB, b []byte, opts ...tarball.LayerOption) v1.Layer {
	t.Helper()
	opts = append([]tarball.LayerOption{tarball.WithMediaType(types.OCILayer)}, opts...)
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// tarDir is a tar of dir's contents in name order, symbolic links kept as
// links, every entry owned by root and dated tarUnix, then the extra
// entries (which have no content).
func tarDir(dir string, extra ...*tar.Header) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil || rel == "." {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		link := ""
		if info.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(path); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(info, link)
		if err != nil {
			return err
		}
		hdr.Name = rel
		hdr.Uid, hdr.Gid, hdr.Uname, hdr.Gname = 0, 0, "", ""
		hdr.ModTime, hdr.AccessTime, hdr.ChangeTime = time.Unix(tarUnix, 0), time.Time{}, time.Time{}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if info.Mode().IsRegular() {
			f, err := os.Open(path)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = io.Copy(tw, f)
			return err
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	for _, hdr := range extra {
		h := *hdr
		if h.ModTime.IsZero() {
			h.ModTime = time.Unix(tarUnix, 0)
		}
		if err := tw.WriteHeader(&h); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
