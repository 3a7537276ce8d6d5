package testutil

import (
	"io"
	"log"
	"maps"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// Registry is go-containerregistry's in-memory OCI registry on 127.0.0.1
// for one test. It counts every request it receives, also those its
// handler or its credentials turn away.
type Registry struct {
	Host       string
	user, pass string

	mu   sync.Mutex
	reqs map[string]int // "METHOD /path" -> count
}

// RegistryOption changes a Registry before it starts.
type RegistryOption func(*registryOptions)

type registryOptions struct {
	wrap       func(http.Handler) http.Handler
	user, pass string
}

// WithHandler puts wrap's handler in front of the registry: it sees every
// request (after the credentials are checked) and answers it itself or
// passes it on, to make a misbehaving registry.
func WithHandler(wrap func(http.Handler) http.Handler) RegistryOption {
	return func(o *registryOptions) { o.wrap = wrap }
}

// WithBasicAuth requires HTTP basic auth as user and pass for every
// request, pushes included (Push sends them).
func WithBasicAuth(user, pass string) RegistryOption {
	return func(o *registryOptions) { o.user, o.pass = user, pass }
}

// StartRegistry starts an in-memory registry on loopback, stopped when the
// test ends.
func StartRegistry(t testing.TB, opts ...RegistryOption) *Registry {
	t.Helper()
	var o registryOptions
	for _, opt := range opts {
		opt(&o)
	}
	r := &Registry{user: o.user, pass: o.pass, reqs: map[string]int{}}
	var h http.Handler = registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	if o.wrap != nil {
		h = o.wrap(h)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.mu.Lock()
		r.reqs[req.Method+" "+req.URL.Path]++
		r.mu.Unlock()
		if o.user != "" {
			if u, p, ok := req.BasicAuth(); !ok || u != o.user || p != o.pass {
				w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusUnauthorized)
				io.WriteString(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`)
				return
			}
		}
		h.ServeHTTP(w, req)
	}))
	t.Cleanup(srv.Close)
	r.Host = strings.TrimPrefix(srv.URL, "http://")
	return r
}

// Push writes img to repo:tag in the registry and returns the reference by
// tag and by digest.
func (r *Registry) Push(t testing.TB, repo, tag string, img v1.Image) (byTag, byDigest string) {
	t.Helper()
	ref, err := name.ParseReference(r.Host+"/"+repo+":"+tag, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	var opts []remote.Option
	if r.user != "" {
		opts = append(opts, remote.WithAuth(&authn.Basic{Username: r.user, Password: r.pass}))
	}
	if err := remote.Write(ref, img, opts...); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return ref.String(), r.Host + "/" + repo + "@" + d.String()
}

// Count sums the requests whose "METHOD /path" contains all of parts:
// Count("GET", "/manifests/") tells a pull from a cache hit.
func (r *Registry) Count(parts ...string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for k, v := range r.reqs {
		ok := true
		for _, p := range parts {
			if !strings.Contains(k, p) {
				ok = false
			}
		}
		if ok {
			n += v
		}
	}
	return n
}

// Requests is a copy of the counts so far, by "METHOD /path".
func (r *Registry) Requests() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.reqs)
}

// Reset forgets the requests counted so far (those of a test's own push,
// say).
func (r *Registry) Reset() {
	r.mu.Lock()
	defer r.mu.Unlock()
	clear(r.reqs)
}
