package image

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	goruntime "runtime"
	"strings"
	"sync/atomic"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

const (
	maxManifestSize = 4 << 20
	maxConfigSize   = 16 << 20
	maxIndexDepth   = 4
	// maxLayers is far above what builders make (overlay-based runtimes
	// stop near 128) and bounds the requests one manifest can cause.
	maxLayers = 500
)

// source is where an image's manifests and blobs come from: a registry
// repository, a layout directory or a layout archive.
type source interface {
	// manifest returns the raw manifest or index d names, verified
	// against d.Digest.
	manifest(ctx context.Context, d v1.Descriptor) ([]byte, error)
	// blob opens the blob d names. Callers verify its size and digest.
	blob(ctx context.Context, d v1.Descriptor) (io.ReadCloser, error)
}

// target is a reference resolved to an image manifest.
type target struct {
	digest      v1.Hash // of the image manifest
	indexDigest string  // of the index it was chosen from, if any
	manifest    []byte  // raw manifest if already fetched (verified)
	src         source
	// origin is "registry/repo" for a registry source, whose answer to
	// the task's credentials authorizes a cached image it served before;
	// empty for the task's own files.
	origin string

	refs   atomic.Int32
	closer func()
}

func newTarget(res *resolved, src source, closer func()) *target {
	t := &target{digest: res.digest, indexDigest: res.indexDigest, manifest: res.raw, src: src, closer: closer}
	t.refs.Store(1)
	return t
}

func (t *target) acquire() { t.refs.Add(1) }

func (t *target) release() {
	if t.refs.Add(-1) == 0 && t.closer != nil {
		t.closer()
	}
}

type resolved struct {
	digest      v1.Hash
	indexDigest string
	raw         []byte
}

type manifestKind int

const (
	kindUnknown manifestKind = iota
	kindImage
	kindIndex
	kindSchema1
)

// kindOf tells an image manifest from an index by media type, or, when that
// is missing, by the document's shape.
func kindOf(mt types.MediaType, raw []byte) manifestKind {
	switch {
	case mt.IsIndex():
		return kindIndex
	case mt.IsSchema1():
		return kindSchema1
	case mt == types.OCIManifestSchema1 || mt == types.DockerManifestSchema2:
		return kindImage
	}
	if raw == nil {
		return kindUnknown
	}
	var doc struct {
		SchemaVersion int             `json:"schemaVersion"`
		MediaType     types.MediaType `json:"mediaType"`
		Manifests     json.RawMessage `json:"manifests"`
		Config        json.RawMessage `json:"config"`
		Layers        json.RawMessage `json:"layers"`
	}
	if json.Unmarshal(raw, &doc) != nil {
		return kindUnknown
	}
	if doc.MediaType != "" && doc.MediaType != mt {
		return kindOf(doc.MediaType, nil)
	}
	switch {
	case doc.SchemaVersion == 1:
		return kindSchema1
	case doc.Manifests != nil:
		return kindIndex
	case doc.Config != nil && doc.Layers != nil:
		return kindImage
	}
	return kindUnknown
}

// pickManifest follows d (whose raw document may already be at hand) down
// through image indexes to the image manifest for this platform.
func pickManifest(ctx context.Context, src source, d v1.Descriptor, raw []byte) (*resolved, error) {
	res := &resolved{}
	for depth := 0; ; depth++ {
		k := kindOf(d.MediaType, raw)
		if k == kindUnknown && raw == nil {
			var err error
			if raw, err = src.manifest(ctx, d); err != nil {
				return nil, err
			}
			k = kindOf(d.MediaType, raw)
		}
		switch k {
		case kindImage:
			res.digest, res.raw = d.Digest, raw
			return res, nil
		case kindSchema1:
			return nil, fmt.Errorf("%s is a Docker schema 1 manifest, which is not supported: push the image again with a current tool", d.Digest)
		case kindUnknown:
			return nil, fmt.Errorf("%s is not a container image manifest or index (media type %q)", d.Digest, d.MediaType)
		}
		if depth >= maxIndexDepth {
			return nil, fmt.Errorf("image indexes nested more than %d deep", maxIndexDepth)
		}
		if raw == nil {
			var err error
			if raw, err = src.manifest(ctx, d); err != nil {
				return nil, err
			}
		}
		if res.indexDigest == "" {
			res.indexDigest = d.Digest.String()
		}
		ix, err := v1.ParseIndexManifest(bytes.NewReader(raw))
		if err != nil {
			return nil, fmt.Errorf("image index %s: %w", d.Digest, err)
		}
		next, err := choosePlatform(ix, d.Digest)
		if err != nil {
			return nil, err
		}
		d, raw = next, nil
	}
}

// platform is the one images are chosen for: the plugin's own.
func platform() v1.Platform {
	p := v1.Platform{OS: "linux", Architecture: goruntime.GOARCH}
	if p.Architecture == "arm" {
		p.Variant = "v7"
	}
	return p
}

// choosePlatform picks this platform's manifest from an index. An index
// whose entries carry no platform at all and hold a single manifest yields
// that one.
func choosePlatform(ix *v1.IndexManifest, from v1.Hash) (v1.Descriptor, error) {
	want := platform()
	var found []string
	var noPlatform []v1.Descriptor
	var pick *v1.Descriptor
	for i := range ix.Manifests {
		m := &ix.Manifests[i]
		if k := kindOf(m.MediaType, nil); k != kindImage && k != kindIndex {
			continue
		}
		if m.Platform == nil {
			noPlatform = append(noPlatform, *m)
			continue
		}
		found = append(found, m.Platform.String())
		if m.Platform.OS != want.OS || m.Platform.Architecture != want.Architecture {
			continue
		}
		if want.Variant != "" && m.Platform.Variant != "" && m.Platform.Variant != want.Variant {
			continue
		}
		if pick == nil {
			pick = m
		}
	}
	switch {
	case pick != nil:
		return *pick, nil
	case len(found) == 0 && len(noPlatform) == 1:
		return noPlatform[0], nil
	}
	return v1.Descriptor{}, fmt.Errorf("image index %s has no manifest for %s (it has: %s)", from, want.String(), strings.Join(found, ", "))
}

// verifyDigest checks that b is the content d names.
func verifyDigest(b []byte, want v1.Hash, what string) error {
	if want.Algorithm != "sha256" {
		return fmt.Errorf("%s: digest algorithm %q is not supported (sha256 only)", what, want.Algorithm)
	}
	sum := sha256.Sum256(b)
	if got := hex.EncodeToString(sum[:]); got != want.Hex {
		return fmt.Errorf("%s: content does not match its digest %s (got sha256:%s): the source is corrupt or was tampered with", what, want, got)
	}
	return nil
}
