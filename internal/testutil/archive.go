package testutil

import (
	"path/filepath"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
)

// TarDir is an uncompressed tar of dir's contents, symbolic links kept as
// links: what a root filesystem tarball for an artifact block looks like.
func TarDir(t testing.TB, dir string) []byte {
	t.Helper()
	b, err := tarDir(dir)
	if err != nil {
		t.Fatalf("tar %s: %v", dir, err)
	}
	return b
}

// OCIArchive is img as an oci-archive: an uncompressed tar of an OCI image
// layout holding it.
func OCIArchive(t testing.TB, img v1.Image) []byte {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "layout")
	lp, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatalf("oci layout: %v", err)
	}
	if err := lp.AppendImage(img); err != nil {
		t.Fatalf("oci layout: %v", err)
	}
	return TarDir(t, dir)
}
