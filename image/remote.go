package image

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

const userAgent = "nomad-driver-sandbox"

// remoteSource reads one repository of a registry.
type remoteSource struct {
	puller   *remote.Puller
	repo     name.Repository
	credFrom string // where the credentials came from; empty for none
}

// resolveRemote turns a registry reference into a target. It always asks
// the registry, with the task's credentials, even for a digest the cache
// holds: a tag may have moved, and a task must not use a private image it
// has no access to just because another task pulled it.
// Every request of the pull goes through a transport of its own that holds
// it to the node's rules (see hopPolicy).
func (s *Store) resolveRemote(ctx context.Context, r *reference, a *Auth, pol Policy) (*target, error) {
	ref := r.name
	if reg := r.registry(); !isLoopback(reg) && s.insecureAllowed(reg) {
		// Let go-containerregistry try plain HTTP for this registry.
		var err error
		if ref, err = name.ParseReference(r.raw, name.Insecure); err != nil {
			return nil, err
		}
	}
	au, from, err := s.credentials(ref.Context(), a)
	if err != nil {
		return nil, err
	}
	tr := newHopTransport(newHopPolicy(r.registry(), pol, s.insecureAllowed))
	p, err := remote.NewPuller(remote.WithAuth(au), remote.WithTransport(tr), remote.WithUserAgent(userAgent))
	if err != nil {
		return nil, err
	}
	src := &remoteSource{puller: p, repo: ref.Context(), credFrom: from}
	// Callers with the same reference and credentials share one lookup.
	v, _, err := s.resolves.do(ctx, ref.Name()+"\x00"+authKey(au), func(ctx context.Context) (any, error) {
		return src.resolve(ctx, ref)
	})
	if err != nil {
		tr.close()
		return nil, err
	}
	t := newTarget(v.(*resolved), src, tr.close)
	t.origin = canonicalRegistry(src.repo.RegistryStr()) + "/" + src.repo.RepositoryStr()
	return t, nil
}

// authKey identifies credentials without keeping them.
func authKey(au authn.Authenticator) string {
	if au == authn.Anonymous {
		return "anonymous"
	}
	cfg, err := au.Authorization()
	if err != nil {
		return fmt.Sprintf("unshared-%p", au)
	}
	b, _ := json.Marshal(cfg)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func (r *remoteSource) resolve(ctx context.Context, ref name.Reference) (*resolved, error) {
	var raw []byte
	what := "tag " + ref.Identifier()
	if _, ok := ref.(name.Digest); ok {
		what = "manifest " + ref.Identifier()
	}
	d, err := r.puller.Head(ctx, ref)
	if err != nil {
		if code := statusCode(err); code == http.StatusUnauthorized || code == http.StatusForbidden || code == http.StatusNotFound {
			return nil, r.explain(err, what)
		}
		// Some registries answer HEAD badly; GET tells.
		full, gerr := r.puller.Get(ctx, ref)
		if gerr != nil {
			return nil, r.explain(gerr, what)
		}
		d, raw = &full.Descriptor, full.Manifest
	}
	if dg, ok := ref.(name.Digest); ok && d.Digest.String() != dg.DigestStr() {
		return nil, fmt.Errorf("registry %s answered %s with manifest digest %s: refusing it", r.repo.RegistryStr(), dg.DigestStr(), d.Digest)
	}
	return pickManifest(ctx, r, *d, raw)
}

func (r *remoteSource) manifest(ctx context.Context, d v1.Descriptor) ([]byte, error) {
	what := "manifest " + d.Digest.String()
	full, err := r.puller.Get(ctx, r.repo.Digest(d.Digest.String()))
	if err != nil {
		return nil, r.explain(err, what)
	}
	if len(full.Manifest) > maxManifestSize {
		return nil, fmt.Errorf("%s is larger than %d bytes", what, maxManifestSize)
	}
	if err := verifyDigest(full.Manifest, d.Digest, what); err != nil {
		return nil, err
	}
	return full.Manifest, nil
}

func (r *remoteSource) blob(ctx context.Context, d v1.Descriptor) (io.ReadCloser, error) {
	what := "blob " + d.Digest.String()
	l, err := r.puller.Layer(withBlob(ctx, d), r.repo.Digest(d.Digest.String()))
	if err != nil {
		return nil, r.explain(err, what)
	}
	rc, err := l.Compressed()
	if err != nil {
		return nil, r.explain(err, what)
	}
	return rc, nil
}

func statusCode(err error) int {
	var te *transport.Error
	if errors.As(err, &te) {
		return te.StatusCode
	}
	return 0
}

func hasCode(err error, codes ...transport.ErrorCode) bool {
	var te *transport.Error
	if !errors.As(err, &te) {
		return false
	}
	for _, d := range te.Errors {
		if slices.Contains(codes, d.Code) {
			return true
		}
	}
	return false
}

// explain turns a registry error into one that says what to do.
func (r *remoteSource) explain(err error, what string) error {
	reg, repo := r.repo.RegistryStr(), r.repo.RepositoryStr()
	code := statusCode(err)
	switch {
	case code == http.StatusUnauthorized || hasCode(err, transport.UnauthorizedErrorCode):
		if r.credFrom == "" {
			return fmt.Errorf("registry %s requires credentials for repo %s, and none were given (set auth in the task, or the plugin's docker auth config): %w", reg, repo, err)
		}
		return fmt.Errorf("registry %s refused the credentials for repo %s (from %s): %w", reg, repo, r.credFrom, err)
	case code == http.StatusForbidden || hasCode(err, transport.DeniedErrorCode):
		who := "anonymous pulls"
		if r.credFrom != "" {
			who = "the credentials from " + r.credFrom
		}
		return fmt.Errorf("registry %s denied %s access to repo %s: %w", reg, who, repo, err)
	case code == http.StatusNotFound || hasCode(err, transport.ManifestUnknownErrorCode, transport.NameUnknownErrorCode, transport.BlobUnknownErrorCode):
		return fmt.Errorf("%s not found in registry %s repo %s: %w", what, reg, repo, err)
	case code == http.StatusTooManyRequests:
		return fmt.Errorf("registry %s is limiting the rate of pulls: %w", reg, err)
	}
	return fmt.Errorf("%s from registry %s repo %s: %w", what, reg, repo, err)
}
