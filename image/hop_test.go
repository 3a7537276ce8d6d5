package image

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

// foreignHost is a server on another loopback port standing in for a
// service on the node (Consul, a metadata endpoint) that a registry tries
// to make the plugin call. It counts what reaches it.
type foreignHost struct {
	srv  *httptest.Server
	host string
	hits atomic.Int64
}

func startForeign(t *testing.T, h http.HandlerFunc) *foreignHost {
	t.Helper()
	f := &foreignHost{}
	f.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.hits.Add(1)
		if h != nil {
			h(w, r)
			return
		}
		w.Write([]byte(`{"token":"x"}`))
	}))
	t.Cleanup(f.srv.Close)
	f.host = strings.TrimPrefix(f.srv.URL, "http://")
	return f
}

// TestHopsAreHeldToTheRegistryRules: redirects and token realms that lead
// to another host, and names that resolve to the node itself, are refused
// before any request reaches them, and nothing is left in the cache.
func TestHopsAreHeldToTheRegistryRules(t *testing.T) {
	img := busyboxImage(t)
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()

	cases := []struct {
		name string
		// hook answers a request instead of the registry, or returns false.
		hook func(f *foreignHost, w http.ResponseWriter, r *http.Request) bool
		ref  func(reg *testutil.Registry) string
		pol  func(reg *testutil.Registry) Policy
		want []string
	}{
		{
			name: "manifest redirect to another loopback port",
			hook: func(f *foreignHost, w http.ResponseWriter, r *http.Request) bool {
				if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/manifests/") {
					http.Redirect(w, r, f.srv.URL+"/v1/kv/secret", http.StatusTemporaryRedirect)
					return true
				}
				return false
			},
			want: []string{"request to 127.0.0.1:", "not in the plugin's allowed_registries"},
		},
		{
			name: "blob redirect to another loopback port",
			hook: func(f *foreignHost, w http.ResponseWriter, r *http.Request) bool {
				if strings.HasSuffix(r.URL.Path, "/blobs/"+ld.String()) {
					http.Redirect(w, r, f.srv.URL+"/blob", http.StatusFound)
					return true
				}
				return false
			},
			want: []string{"not in the plugin's allowed_registries"},
		},
		{
			name: "token realm on another host",
			hook: func(f *foreignHost, w http.ResponseWriter, r *http.Request) bool {
				if r.Method != http.MethodPut && r.Method != http.MethodPost && r.Method != http.MethodPatch {
					w.Header().Set("WWW-Authenticate", `Bearer realm="`+f.srv.URL+`/token",service="x"`)
					w.WriteHeader(http.StatusUnauthorized)
					return true
				}
				return false
			},
			want: []string{"not in the plugin's allowed_registries"},
		},
		{
			name: "registry name resolving to loopback, allowed_registries empty",
			ref: func(reg *testutil.Registry) string {
				_, port, _ := strings.Cut(reg.Host, ":")
				return "localhost:" + port + "/busybox:latest"
			},
			pol:  func(*testutil.Registry) Policy { return Policy{} },
			want: []string{"(127.0.0.1) refused", "non-public address", "allowed_registries"},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t)
			f := startForeign(t, nil)
			var armed atomic.Bool
			reg := testutil.StartRegistry(t, testutil.WithHandler(func(h http.Handler) http.Handler {
				return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					if armed.Load() && c.hook != nil && c.hook(f, w, r) {
						return
					}
					h.ServeHTTP(w, r)
				})
			}))
			push(t, reg.Host+"/busybox:latest", img)
			armed.Store(true)
			reg.Reset()
			ref, pol := reg.Host+"/busybox:latest", registryPolicy(reg)
			if c.ref != nil {
				ref = c.ref(reg)
			}
			if c.pol != nil {
				pol = c.pol(reg)
			}
			_, err := e.store.Get(ctxT(t), ref, nil, pol, e.taskDir)
			mustContain(t, err, c.want...)
			t.Log(err)
			if n := f.hits.Load(); n != 0 {
				t.Errorf("the other host got %d requests", n)
			}
			if reqs := reg.Requests(); c.ref != nil && len(reqs) != 0 {
				t.Errorf("the registry on loopback got requests: %v", reqs)
			}
			assertCacheEmpty(t, e.store)
		})
	}
}

// TestEndlessBodiesAreBounded: a registry that never stops sending a
// manifest or an error body fails the pull with a clear error instead of
// growing the plugin, and the error text stays short.
func TestEndlessBodiesAreBounded(t *testing.T) {
	endless := func(w http.ResponseWriter, r *http.Request, code int) {
		w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
		w.WriteHeader(code)
		chunk := []byte(strings.Repeat("A", 64<<10))
		for r.Context().Err() == nil {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	}
	cases := []struct {
		name string
		code int
		want []string
	}{
		{"manifest", http.StatusOK, []string{"is larger than 4194304 bytes"}},
		{"error body", http.StatusBadRequest, []string{"400", "(truncated)"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t)
			var armed atomic.Bool
			reg := testutil.StartRegistry(t, testutil.WithHandler(func(h http.Handler) http.Handler {
				return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					if armed.Load() && strings.Contains(r.URL.Path, "/manifests/") {
						if r.Method == http.MethodHead {
							w.WriteHeader(http.StatusMethodNotAllowed)
							return
						}
						endless(w, r, c.code)
						return
					}
					h.ServeHTTP(w, r)
				})
			}))
			push(t, reg.Host+"/busybox:latest", busyboxImage(t))
			armed.Store(true)
			_, err := e.store.Get(ctxT(t), reg.Host+"/busybox:latest", nil, registryPolicy(reg), e.taskDir)
			mustContain(t, err, c.want...)
			if n := len(err.Error()); n > maxErrorText+100 {
				t.Errorf("error text is %d bytes", n)
			}
			assertCacheEmpty(t, e.store)
		})
	}
}

// TestForeignErrorBodyIsNotReported: a blob server the operator allows
// answers with an error whose body must not reach the task's events; the
// registry's own error text may.
func TestForeignErrorBodyIsNotReported(t *testing.T) {
	e := newEnv(t)
	img := busyboxImage(t)
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()
	const secret = "FOREIGN-SECRET-7f3a"
	f := startForeign(t, func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusForbidden)
		w.Write([]byte(`{"errors":[{"code":"UNKNOWN","message":"` + secret + `"}]} ` + secret))
	})
	var armed atomic.Bool
	reg := testutil.StartRegistry(t, testutil.WithHandler(func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if armed.Load() && strings.HasSuffix(r.URL.Path, "/blobs/"+ld.String()) {
				http.Redirect(w, r, f.srv.URL+"/blob", http.StatusTemporaryRedirect)
				return
			}
			h.ServeHTTP(w, r)
		})
	}))
	push(t, reg.Host+"/busybox:latest", img)
	armed.Store(true)
	pol := Policy{AllowedRegistries: []string{reg.Host, f.host}}
	_, err := e.store.Get(ctxT(t), reg.Host+"/busybox:latest", nil, pol, e.taskDir)
	mustContain(t, err, "layer 1/1", "403")
	if strings.Contains(err.Error(), secret) {
		t.Errorf("the other host's body reached the error: %v", err)
	}
	if f.hits.Load() == 0 {
		t.Error("the allowed blob host was never asked: the test proves nothing")
	}
	assertCacheEmpty(t, e.store)
}

func TestNonPublic(t *testing.T) {
	for s, want := range map[string]bool{
		"127.0.0.1": true, "10.1.2.3": true, "172.20.0.1": true, "192.168.1.1": true,
		"169.254.169.254": true, "100.64.0.1": true, "0.0.0.0": true, "224.0.0.1": true,
		"::1": true, "::": true, "fe80::1": true, "fd00::1": true,
		"::ffff:127.0.0.1": true, "2002:7f00:1::": true, "64:ff9b::a9fe:a9fe": true,
		"::1%lo": true, "fe80::1%eth0": true, "fd00::1%2": true,
		"8.8.8.8": false, "2606:4700::1111": false, "2002:0808:0808::": false, "64:ff9b::808:808": false,
	} {
		if got := nonPublic(netip.MustParseAddr(s)); got != want {
			t.Errorf("nonPublic(%s) = %v, want %v", s, got, want)
		}
	}
	p := newHopPolicy("reg.example:5000", Policy{AllowedRegistries: []string{"reg.example:5000", "Auth.Example"}}, isLoopback)
	for hp, want := range map[string]bool{"reg.example:5000": true, "auth.example:443": true, "auth.example": true, "auth.example:8443": false, "reg.example:443": false, "other:443": false} {
		if got := names(p.listed, hp); got != want {
			t.Errorf("listed(%s) = %v, want %v", hp, got, want)
		}
	}
}

// TestCachedImageNeedsItsBlobs: a task that knows a private image's
// manifest (its bytes, in an oci-layout of its own) does not get the cached
// image; one that brings every blob does, as does the registry repository
// that served it.
func TestCachedImageNeedsItsBlobs(t *testing.T) {
	e := newEnv(t)
	reg := testutil.StartRegistry(t, testutil.WithBasicAuth("alice", "s3cret"))
	img := busyboxImage(t)
	push(t, reg.Host+"/private/app:1", img, basic("alice", "s3cret"))
	ctx := ctxT(t)
	alice := &Auth{Username: "alice", Password: "s3cret"}
	if _, err := e.store.Get(ctx, reg.Host+"/private/app:1", alice, registryPolicy(reg), e.taskDir); err != nil {
		t.Fatal(err)
	}
	digest := digestOf(t, img)

	// The thief's layout: index.json and the manifest, no config or layers.
	dir := writeLayout(t, e.taskDir, "local/stolen", map[string]v1.Image{"": img})
	man, _ := img.Manifest()
	keep := strings.TrimPrefix(digest, "sha256:")
	blobs := filepath.Join(dir, "blobs", "sha256")
	for _, d := range append([]v1.Descriptor{man.Config}, man.Layers...) {
		if err := os.Remove(filepath.Join(blobs, d.Digest.Hex)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat(filepath.Join(blobs, keep)); err != nil {
		t.Fatal(err)
	}
	_, err := e.store.Get(ctx, "oci-layout:local/stolen", nil, Policy{}, e.taskDir)
	mustContain(t, err, "cached on this node", "does not hold all of it", "is missing")
	// The same as a tar.
	tarDir(t, dir, filepath.Join(e.taskDir, "local", "stolen.tar"))
	_, err = e.store.Get(ctx, "oci-archive:local/stolen.tar", nil, Policy{}, e.taskDir)
	mustContain(t, err, "cached on this node", "does not hold all of it", "is missing")

	// A layout whose blobs are there but one is not what it claims.
	tampered := writeLayout(t, e.taskDir, "local/tampered", map[string]v1.Image{"": img})
	if err := os.WriteFile(filepath.Join(tampered, "blobs", "sha256", man.Layers[0].Digest.Hex), []byte("not the layer"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = e.store.Get(ctx, "oci-layout:local/tampered", nil, Policy{}, e.taskDir)
	mustContain(t, err, "cached on this node", "blob "+man.Layers[0].Digest.String())

	// Whole layouts and the origin repository get the cached tree.
	writeLayout(t, e.taskDir, "local/whole", map[string]v1.Image{"": img})
	got, err := e.store.Get(ctx, "oci-layout:local/whole", nil, Policy{}, e.taskDir)
	if err != nil {
		t.Fatal(err)
	}
	if got.Pulled || got.Digest != digest {
		t.Errorf("whole layout: pulled %v digest %s", got.Pulled, got.Digest)
	}
	reg.Reset()
	if got, err := e.store.Get(ctx, reg.Host+"/private/app@"+digest, alice, registryPolicy(reg), e.taskDir); err != nil || got.Pulled {
		t.Fatalf("origin repository: %+v %v", got, err)
	}
	if n := reg.Count("GET", "/blobs/"); n != 0 {
		t.Errorf("the origin repository's blobs were fetched again (%d requests)", n)
	}
}

// TestCachedImageFromAnotherRepoNeedsItsBlobs: a repository that claims a
// cached digest (here: it serves the manifest bytes, but has no blobs) does
// not get the image.
func TestCachedImageFromAnotherRepoNeedsItsBlobs(t *testing.T) {
	e := newEnv(t)
	img := busyboxImage(t)
	raw, _ := img.RawManifest()
	digest := digestOf(t, img)
	reg := testutil.StartRegistry(t, testutil.WithHandler(func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if strings.HasPrefix(r.URL.Path, "/v2/evil/app/blobs/") {
				// A registry links blobs to repositories.
				w.WriteHeader(http.StatusNotFound)
				return
			}
			if strings.HasPrefix(r.URL.Path, "/v2/evil/app/manifests/") {
				w.Header().Set("Content-Type", string(mustMediaType(t, img)))
				w.Header().Set("Docker-Content-Digest", digest)
				w.Write(raw)
				return
			}
			h.ServeHTTP(w, r)
		})
	}))
	push(t, reg.Host+"/private/app:1", img)
	ctx := ctxT(t)
	if _, err := e.store.Get(ctx, reg.Host+"/private/app:1", nil, registryPolicy(reg), e.taskDir); err != nil {
		t.Fatal(err)
	}
	_, err := e.store.Get(ctx, reg.Host+"/evil/app@"+digest, nil, registryPolicy(reg), e.taskDir)
	mustContain(t, err, "cached on this node", "not found in registry "+reg.Host+" repo evil/app")
}

func mustMediaType(t *testing.T, img v1.Image) string {
	t.Helper()
	mt, err := img.MediaType()
	if err != nil {
		t.Fatal(err)
	}
	return string(mt)
}

// TestDialRefusesZonedAndNodeAddresses: with allowed_registries empty, a
// hop (a redirect or a token realm from a registry the job chose) may not
// reach the node through an IPv6 address written with a zone
// ([::1%lo]: the zone hides it from a prefix match, the kernel ignores it
// for loopback), nor through an address the node owns that is not in a
// private range (here one the test adds to lo). Neither
// listener may see a connection.
func TestDialRefusesZonedAndNodeAddresses(t *testing.T) {
	node := netip.MustParseAddr("198.51.100.77")
	addNodeAddr(t, node)
	var hits atomic.Int64
	listen := func(addr string) string {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				hits.Add(1)
				c.Close()
			}
		}()
		_, port, _ := net.SplitHostPort(ln.Addr().String())
		return port
	}
	p := newHopPolicy("registry.example", Policy{}, isLoopback)
	for _, target := range []string{
		"[::1%lo]:" + listen("[::1]:0"),
		"[::1%1]:" + listen("[::1]:0"),
		net.JoinHostPort(node.String(), listen(net.JoinHostPort(node.String(), "0"))),
	} {
		c, err := p.dial(ctxT(t), "tcp", target)
		if err == nil {
			c.Close()
			t.Errorf("dial %s: connected", target)
			continue
		}
		mustContain(t, err, "refused", "allowed_registries")
	}
	if n := hits.Load(); n != 0 {
		t.Errorf("the node's listeners accepted %d connections", n)
	}
	// A route lookup only, nothing is sent: a public address is not the
	// node's.
	if node, err := nodeAddr(netip.MustParseAddr("8.8.8.8")); err != nil {
		t.Logf("no route to a public address on this machine: %v", err)
	} else if node {
		t.Error("8.8.8.8 taken for an address of the node")
	}
	// The operator may still name such a host.
	listed := newHopPolicy("registry.example", Policy{AllowedRegistries: []string{node.String() + ":" + "1"}}, isLoopback)
	if err := listed.checkAddr(node.String()+":1", node); err != nil {
		t.Errorf("listed node address refused: %v", err)
	}
}

// addNodeAddr gives the node addr on its loopback interface for the test's
// lifetime: an address of the node that no private range covers.
func addNodeAddr(t *testing.T, addr netip.Addr) {
	t.Helper()
	testutil.RequireRoot(t) // to add an address
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	a := &netlink.Addr{IPNet: &net.IPNet{IP: addr.AsSlice(), Mask: net.CIDRMask(addr.BitLen(), addr.BitLen())}}
	if err := netlink.AddrAdd(lo, a); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := netlink.AddrDel(lo, a); err != nil {
			t.Errorf("remove %s from lo: %v", addr, err)
		}
	})
}

// TestErrorTextHasNoControlCharacters: a registry's error body reaches the
// task's events, which the operator reads in a terminal (`nomad alloc
// status`). Terminal escapes (clearing the screen, writing the clipboard
// with OSC 52), C1 controls, newlines that forge further lines and
// bidirectional overrides are shown escaped, not passed through.
func TestErrorTextHasNoControlCharacters(t *testing.T) {
	const evil = "\x1b[2J\x1b]52;c;ZXZpbA==\x07 line\nforged \u009b31m \u202egnp.exe\r"
	for name, body := range map[string]string{
		"raw body":  evil,
		"json body": `{"errors":[{"code":"DENIED","message":` + strconv.Quote(evil) + `}]}`,
	} {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t)
			var armed atomic.Bool
			reg := testutil.StartRegistry(t, testutil.WithHandler(func(h http.Handler) http.Handler {
				return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					if armed.Load() && strings.Contains(r.URL.Path, "/manifests/") {
						w.Header().Set("Content-Type", "application/json")
						w.WriteHeader(http.StatusBadRequest)
						if r.Method != http.MethodHead {
							w.Write([]byte(body))
						}
						return
					}
					h.ServeHTTP(w, r)
				})
			}))
			push(t, reg.Host+"/busybox:latest", busyboxImage(t))
			armed.Store(true)
			_, err := e.store.Get(ctxT(t), reg.Host+"/busybox:latest", nil, registryPolicy(reg), e.taskDir)
			mustContain(t, err, "400", "ZXZpbA==")
			for _, r := range err.Error() {
				if unicode.IsControl(r) || unicode.Is(unicode.Bidi_Control, r) {
					t.Fatalf("control character %U in the error text: %q", r, err.Error())
				}
			}
		})
	}
}

// TestTokenAnswerIsBounded: go-containerregistry reads a token answer
// whole. A registry whose token realm has "/blobs/" in its path (here its
// own host) must not have that answer taken for a blob's, which is bounded
// only by its descriptor: it is cut at the 4 MiB of any answer.
func TestTokenAnswerIsBounded(t *testing.T) {
	e := newEnv(t)
	var armed atomic.Bool
	var reg *testutil.Registry
	reg = testutil.StartRegistry(t, testutil.WithHandler(func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if !armed.Load() {
				h.ServeHTTP(w, r)
				return
			}
			if r.URL.Path == "/v2/token/blobs/sha256:"+strings.Repeat("0", 64) {
				// 16 MiB of a token answer: finite, so that an
				// uncapped read ends too.
				w.Header().Set("Content-Type", "application/json")
				chunk := []byte(strings.Repeat("A", 64<<10))
				for i := 0; i < 256; i++ {
					if _, err := w.Write(chunk); err != nil {
						return
					}
				}
				return
			}
			if r.Header.Get("Authorization") == "" {
				w.Header().Set("WWW-Authenticate", `Bearer realm="http://`+reg.Host+`/v2/token/blobs/sha256:`+strings.Repeat("0", 64)+`",service="x"`)
				w.WriteHeader(http.StatusUnauthorized)
				return
			}
			h.ServeHTTP(w, r)
		})
	}))
	push(t, reg.Host+"/busybox:latest", busyboxImage(t))
	armed.Store(true)
	_, err := e.store.Get(ctxT(t), reg.Host+"/busybox:latest", nil, registryPolicy(reg), e.taskDir)
	mustContain(t, err, "is larger than 4194304 bytes")
	assertCacheEmpty(t, e.store)
}

// TestLargeBlobIsNotCapped: a layer larger than the 4 MiB every other
// answer is held to is read to its descriptor's size, also when the blob
// request is redirected.
func TestLargeBlobIsNotCapped(t *testing.T) {
	e := newEnv(t)
	img, err := random.Image(6<<20, 1)
	if err != nil {
		t.Fatal(err)
	}
	layers, _ := img.Layers()
	size, _ := layers[0].Size()
	if size <= maxResponseSize {
		t.Fatalf("the test layer is %d bytes, not above %d", size, maxResponseSize)
	}
	var armed atomic.Bool
	reg := testutil.StartRegistry(t, testutil.WithHandler(func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if armed.Load() && strings.Contains(r.URL.Path, "/blobs/") && r.URL.Query().Get("moved") == "" {
				http.Redirect(w, r, r.URL.Path+"?moved=1", http.StatusTemporaryRedirect)
				return
			}
			h.ServeHTTP(w, r)
		})
	}))
	push(t, reg.Host+"/big:1", img)
	armed.Store(true)
	got, err := e.store.Get(ctxT(t), reg.Host+"/big:1", nil, registryPolicy(reg), e.taskDir)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Pulled {
		t.Error("not pulled")
	}
	if n := reg.Count("GET", "/blobs/"); n < 2 {
		t.Errorf("%d blob requests: the redirect was not taken", n)
	}
}

// TestFailedPullOfAnotherTaskIsNotShared: a task whose start joins a pull
// of the same image that another task leads (from that task's source: a
// repository or layout of its own that fails, with its own error text) does
// not get that task's failure or its text: it pulls from its own source.
// The other task's pull (of the same repository) is stood in for by a
// call in the store's flight group that fails once the second task waits
// on it.
func TestFailedPullOfAnotherTaskIsNotShared(t *testing.T) {
	e := newEnv(t)
	img := busyboxImage(t)
	digest := digestOf(t, img)
	hex := strings.TrimPrefix(digest, "sha256:")
	reg := testutil.StartRegistry(t)
	push(t, reg.Host+"/good/app:1", img)
	ctx := ctxT(t)

	const planted = "PLANTED-BY-ANOTHER-JOB"
	// The flight of pulls of this image from good/app (another task's,
	// with credentials of its own, say).
	key := hex + "\x00" + canonicalRegistry(reg.Host) + "/good/app"
	release := make(chan struct{})
	var releaseOnce sync.Once
	free := func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(free)
	leaderErr := make(chan error, 1)
	started := make(chan struct{})
	go func() {
		_, _, err := e.store.pulls.do(ctx, key, func(context.Context) (any, error) {
			close(started)
			<-release
			return nil, errors.New(planted)
		})
		leaderErr <- err
	}()
	<-started
	goodErr := make(chan error, 1)
	go func() {
		_, err := e.store.Get(ctx, reg.Host+"/good/app@"+digest, nil, registryPolicy(reg), e.taskDir)
		goodErr <- err
	}()
	// Wait until the second task waits on the first one's pull.
	must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool {
		e.store.pulls.mu.Lock()
		defer e.store.pulls.mu.Unlock()
		f := e.store.pulls.m[key]
		return f != nil && f.waiters == 2
	}), wait.Timeout(30*time.Second), wait.Gap(10*time.Millisecond)))
	free()
	mustContain(t, <-leaderErr, planted)
	if err := <-goodErr; err != nil {
		t.Fatalf("the second task got the first one's failure: %v", err)
	}
}

// TestSlowPullOfAnotherSourceDoesNotHoldUpTheImage: a job can pull any
// image whose manifest it knows (a public one, say) from a repository of
// its own that sends the layers as slowly as it likes. Another task's pull
// of that image from its own registry must not wait for it.
func TestSlowPullOfAnotherSourceDoesNotHoldUpTheImage(t *testing.T) {
	e := newEnv(t)
	img := busyboxImage(t)
	digest := digestOf(t, img)
	var armed atomic.Bool
	blocked := make(chan struct{})
	release := make(chan struct{})
	var once, releaseOnce sync.Once
	free := func() { releaseOnce.Do(func() { close(release) }) }
	reg := testutil.StartRegistry(t, testutil.WithHandler(func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if armed.Load() && strings.HasPrefix(r.URL.Path, "/v2/slow/app/blobs/") {
				once.Do(func() { close(blocked) })
				select {
				case <-release:
				case <-r.Context().Done():
				}
				w.WriteHeader(http.StatusServiceUnavailable)
				return
			}
			h.ServeHTTP(w, r)
		})
	}))
	t.Cleanup(free) // runs before the registry's Close
	push(t, reg.Host+"/slow/app:1", img)
	push(t, reg.Host+"/good/app:1", img)
	armed.Store(true)
	ctx := ctxT(t)

	slowErr := make(chan error, 1)
	go func() {
		_, err := e.store.Get(ctx, reg.Host+"/slow/app@"+digest, nil, registryPolicy(reg), e.taskDir)
		slowErr <- err
	}()
	select {
	case <-blocked:
	case <-ctx.Done():
		t.Fatal("the slow pull never asked for a blob")
	}
	goodErr := make(chan error, 1)
	go func() {
		_, err := e.store.Get(ctx, reg.Host+"/good/app@"+digest, nil, registryPolicy(reg), e.taskDir)
		goodErr <- err
	}()
	select {
	case err := <-goodErr:
		if err != nil {
			t.Fatalf("pull from the task's own repository: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the pull from the task's own repository waited for the slow one")
	}
	free()
	// The slow one's source never supplied the blobs, but the image is
	// now cached: it gets it only if its source holds every blob.
	if err := <-slowErr; err == nil {
		t.Error("the slow source got the image without supplying its blobs")
	}
}

// TestLocalLayoutSpecialFiles: a task's oci-layout whose index.json or a
// blob is a FIFO (no writer: an open without O_NONBLOCK would hang the
// start for good) or a link to a host file, and an oci-archive that is a
// FIFO, fail at once with an error naming the file.
func TestLocalLayoutSpecialFiles(t *testing.T) {
	e := newEnv(t)
	img := busyboxImage(t)
	man, _ := img.Manifest()
	cases := map[string]struct {
		ref  string
		prep func(t *testing.T) error
		want string
	}{
		"index.json is a FIFO": {"oci-layout:local/fifo-index", func(t *testing.T) error {
			dir := writeLayout(t, e.taskDir, "local/fifo-index", map[string]v1.Image{"": img})
			os.Remove(filepath.Join(dir, "index.json"))
			return unix.Mkfifo(filepath.Join(dir, "index.json"), 0o644)
		}, "index.json is not a regular file"},
		"index.json links to /etc/shadow": {"oci-layout:local/shadow-index", func(t *testing.T) error {
			dir := writeLayout(t, e.taskDir, "local/shadow-index", map[string]v1.Image{"": img})
			os.Remove(filepath.Join(dir, "index.json"))
			return os.Symlink("/etc/shadow", filepath.Join(dir, "index.json"))
		}, "path escapes"},
		"a layer is a FIFO": {"oci-layout:local/fifo-blob", func(t *testing.T) error {
			dir := writeLayout(t, e.taskDir, "local/fifo-blob", map[string]v1.Image{"": img})
			blob := filepath.Join(dir, "blobs", "sha256", man.Layers[0].Digest.Hex)
			os.Remove(blob)
			return unix.Mkfifo(blob, 0o644)
		}, "is not a regular file"},
		"the archive is a FIFO": {"oci-archive:local/fifo.tar", func(t *testing.T) error {
			return unix.Mkfifo(filepath.Join(e.taskDir, "local", "fifo.tar"), 0o644)
		}, "not a regular file"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			if err := c.prep(t); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() {
				_, err := e.store.Get(ctxT(t), c.ref, nil, Policy{}, e.taskDir)
				done <- err
			}()
			select {
			case err := <-done:
				mustContain(t, err, c.want)
				t.Log(err)
				if strings.Contains(err.Error(), "root:") {
					t.Errorf("a host file's content reached the error: %v", err)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("the start hangs on the special file")
			}
			assertCacheEmpty(t, e.store)
		})
	}
}
