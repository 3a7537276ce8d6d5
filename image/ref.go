package image

import (
	"fmt"
	"path"
	"slices"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
)

type refKind int

const (
	kindRegistry refKind = iota + 1
	kindLayout
	kindArchive
)

const (
	layoutPrefix  = "oci-layout:"
	archivePrefix = "oci-archive:"
)

// reference is a parsed image reference.
type reference struct {
	kind refKind
	raw  string

	// Registry references.
	name name.Reference

	// Local references: a path relative to the task directory, and
	// optionally the tag or digest selecting a manifest in its index.
	path   string
	tag    string
	digest *v1.Hash
}

func parseReference(s string) (*reference, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, fmt.Errorf("empty image reference")
	}
	switch {
	case strings.HasPrefix(s, layoutPrefix):
		return parseLocal(kindLayout, s, strings.TrimPrefix(s, layoutPrefix))
	case strings.HasPrefix(s, archivePrefix):
		return parseLocal(kindArchive, s, strings.TrimPrefix(s, archivePrefix))
	}
	n, err := name.ParseReference(s)
	if err != nil {
		return nil, fmt.Errorf("not a valid image reference (registry/repo:tag, registry/repo@sha256:<digest>, %s<dir> or %s<file.tar>): %w", layoutPrefix, archivePrefix, err)
	}
	return &reference{kind: kindRegistry, raw: s, name: n}, nil
}

// parseLocal splits "dir[:tag|@sha256:hex]". A tag is a colon in the last
// path element, so "local/img:v1" has tag v1 and "local/my:dir/img" none.
func parseLocal(kind refKind, raw, rest string) (*reference, error) {
	r := &reference{kind: kind, raw: raw}
	p := rest
	if i := strings.LastIndex(p, "@"); i >= 0 {
		h, err := v1.NewHash(p[i+1:])
		if err != nil {
			return nil, fmt.Errorf("digest %q: %w", p[i+1:], err)
		}
		r.digest = &h
		p = p[:i]
	} else if i := strings.LastIndex(p, ":"); i > strings.LastIndex(p, "/") {
		r.tag = p[i+1:]
		p = p[:i]
		if r.tag == "" {
			return nil, fmt.Errorf("empty tag after ':'")
		}
	}
	if p == "" {
		return nil, fmt.Errorf("no path after %q", strings.SplitN(raw, ":", 2)[0]+":")
	}
	if path.IsAbs(p) {
		return nil, fmt.Errorf("path %q must be relative to the task directory (e.g. local/image)", p)
	}
	clean := path.Clean(p)
	if clean == ".." || strings.HasPrefix(clean, "../") {
		return nil, fmt.Errorf("path %q leads outside the task directory", p)
	}
	r.path = clean
	return r, nil
}

// registry is the host[:port] of a registry reference.
func (r *reference) registry() string { return r.name.Context().RegistryStr() }

func (r *reference) isDigest() bool {
	_, ok := r.name.(name.Digest)
	return ok
}

// canonicalRegistry makes registry hosts comparable: lower case, no scheme,
// and one name for Docker Hub.
func canonicalRegistry(h string) string {
	h = strings.ToLower(strings.TrimSpace(h))
	h = strings.TrimPrefix(h, "https://")
	h = strings.TrimPrefix(h, "http://")
	h = strings.TrimSuffix(h, "/")
	switch h {
	case "docker.io", "index.docker.io", "registry-1.docker.io":
		return "docker.io"
	}
	return h
}

func (p Policy) check(r *reference) error {
	if r.kind != kindRegistry {
		// Layouts and archives are files the task brought; their
		// digests are still verified and reported.
		return nil
	}
	if len(p.AllowedRegistries) > 0 {
		reg := canonicalRegistry(r.registry())
		ok := slices.ContainsFunc(p.AllowedRegistries, func(a string) bool { return canonicalRegistry(a) == reg })
		if !ok {
			return fmt.Errorf("registry %s is not allowed on this node: the plugin's allowed_registries is %v", r.registry(), p.AllowedRegistries)
		}
	}
	if p.RequireDigest && !r.isDigest() {
		return fmt.Errorf("this node requires images by digest (require_digest): write the reference as %s@sha256:<digest>", r.name.Context().Name())
	}
	return nil
}
