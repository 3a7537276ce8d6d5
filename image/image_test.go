package image

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	goruntime "runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/compression"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

// checkBusyboxRootfs checks the unpacked base layer and runs its busybox.
func checkBusyboxRootfs(t *testing.T, img *Image) {
	t.Helper()
	if !filepath.IsAbs(img.Rootfs) {
		t.Errorf("rootfs %q is not absolute", img.Rootfs)
	}
	if l, err := os.Readlink(filepath.Join(img.Rootfs, "bin/sh")); err != nil || l != "busybox" {
		t.Errorf("bin/sh: %q %v", l, err)
	}
	out, err := exec.Command(filepath.Join(img.Rootfs, "bin/busybox"), "echo", "unpacked").Output()
	if err != nil || string(out) != "unpacked\n" {
		t.Errorf("running the unpacked busybox: %q %v", out, err)
	}
	fi, err := os.Stat(filepath.Join(img.Rootfs, "tmp"))
	if err != nil || fi.Mode()&fs.ModeSticky == 0 || fi.Mode().Perm() != 0o777 {
		t.Errorf("tmp: %v %v (want sticky 0777)", fi.Mode(), err)
	}
	fi, err = os.Stat(filepath.Join(img.Rootfs, "home/app"))
	if err != nil {
		t.Fatal(err)
	}
	if st := fi.Sys().(*syscall.Stat_t); st.Uid != 1000 || st.Gid != 1000 || fi.Mode().Perm() != 0o750 {
		t.Errorf("home/app: owner %d:%d mode %v, want 1000:1000 0750", st.Uid, st.Gid, fi.Mode())
	}
	want := Config{Entrypoint: testConfig.Entrypoint, Cmd: testConfig.Cmd, Env: testConfig.Env, WorkingDir: testConfig.WorkingDir, User: testConfig.User}
	if fmt.Sprint(img.Config) != fmt.Sprint(want) {
		t.Errorf("config %+v, want %+v", img.Config, want)
	}
	if img.Size <= 0 {
		t.Errorf("size %d", img.Size)
	}
}

func TestRegistryPullByTagAndDigest(t *testing.T) {
	e := newEnv(t)
	reg := testutil.StartRegistry(t)
	img := busyboxImage(t)
	want := digestOf(t, img)
	push(t, reg.Host+"/tools/busybox:1.36", img)
	ctx := ctxT(t)

	got, err := e.store.Get(ctx, reg.Host+"/tools/busybox:1.36", nil, registryPolicy(reg), e.taskDir)
	if err != nil {
		t.Fatal(err)
	}
	if got.Digest != want || !got.Pulled || got.Ref != reg.Host+"/tools/busybox:1.36" || got.IndexDigest != "" {
		t.Errorf("first get: %+v, want digest %s pulled", got, want)
	}
	if got.Rootfs != filepath.Join(e.store.Dir, "images", "sha256", strings.TrimPrefix(want, "sha256:"), "rootfs") {
		t.Errorf("rootfs %s", got.Rootfs)
	}
	checkBusyboxRootfs(t, got)

	reg.Reset()
	again, err := e.store.Get(ctx, reg.Host+"/tools/busybox:1.36", nil, registryPolicy(reg), e.taskDir)
	if err != nil {
		t.Fatal(err)
	}
	if again.Pulled || again.Digest != want || again.Rootfs != got.Rootfs {
		t.Errorf("second get: %+v, want a cache hit", again)
	}
	if n := reg.Count("GET", "/blobs/"); n != 0 {
		t.Errorf("cache hit fetched %d blobs", n)
	}

	byDigest, err := e.store.Get(ctx, reg.Host+"/tools/busybox@"+want, nil, Policy{RequireDigest: true, AllowedRegistries: []string{reg.Host}}, e.taskDir)
	if err != nil {
		t.Fatal(err)
	}
	if byDigest.Pulled || byDigest.Digest != want {
		t.Errorf("by digest: %+v, want the cached image", byDigest)
	}

	// A store of its own pulls by digest from scratch.
	fresh := e.newStore(filepath.Join(e.parent, "cache2"))
	fromScratch, err := fresh.Get(ctx, reg.Host+"/tools/busybox@"+want, nil, Policy{RequireDigest: true, AllowedRegistries: []string{reg.Host}}, e.taskDir)
	if err != nil {
		t.Fatal(err)
	}
	if !fromScratch.Pulled || fromScratch.Digest != want {
		t.Errorf("by digest, fresh store: %+v", fromScratch)
	}
	checkBusyboxRootfs(t, fromScratch)
}

func TestRegistryIndexPicksPlatform(t *testing.T) {
	e := newEnv(t)
	reg := testutil.StartRegistry(t)
	mine := busyboxImage(t)
	other := busyboxImage(t, testutil.Layer(t, tarBytes(t, file("arch", "other", 0o644))))
	idx := mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex),
		mutate.IndexAddendum{Add: other, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "s390x"}}},
		mutate.IndexAddendum{Add: mine, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: goruntime.GOARCH}}},
	)
	pushIndex(t, reg.Host+"/multi:latest", idx)
	idxDigest, err := idx.Digest()
	if err != nil {
		t.Fatal(err)
	}
	got, err := e.store.Get(ctxT(t), reg.Host+"/multi", nil, registryPolicy(reg), e.taskDir)
	if err != nil {
		t.Fatal(err)
	}
	if got.Digest != digestOf(t, mine) || got.IndexDigest != idxDigest.String() {
		t.Errorf("got %s (index %s), want %s from index %s", got.Digest, got.IndexDigest, digestOf(t, mine), idxDigest)
	}
	if _, err := os.Lstat(filepath.Join(got.Rootfs, "arch")); err == nil {
		t.Error("unpacked the other platform's image")
	}
}

func TestConcurrentGetsPullOnce(t *testing.T) {
	e := newEnv(t)
	reg := testutil.StartRegistry(t)
	img := busyboxImage(t)
	push(t, reg.Host+"/busybox:latest", img)
	reg.Reset()
	ref := reg.Host + "/busybox:latest"
	ctx := ctxT(t)

	// Two goroutines of one store, and a second store on the same
	// directory standing in for a second plugin process.
	other := e.newStore(e.store.Dir)
	stores := []*Store{e.store, e.store, other, other}
	results := make([]*Image, len(stores))
	errs := make([]error, len(stores))
	var wg sync.WaitGroup
	for i, s := range stores {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i], errs[i] = s.Get(ctx, ref, nil, registryPolicy(reg), e.taskDir)
		}()
	}
	wg.Wait()
	pulled := 0
	for i := range stores {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if results[i].Rootfs != results[0].Rootfs || results[i].Digest != digestOf(t, img) {
			t.Errorf("get %d: %+v", i, results[i])
		}
		if results[i].Pulled {
			pulled++
		}
	}
	if pulled != 1 {
		t.Errorf("%d gets report a pull, want 1", pulled)
	}
	layers, _ := img.Layers()
	for _, l := range layers {
		d, _ := l.Digest()
		if n := reg.Count("GET", "/blobs/"+d.String()); n != 1 {
			t.Errorf("layer %s fetched %d times, want 1", d, n)
		}
	}
	cfg, _ := img.ConfigName()
	if n := reg.Count("GET", "/blobs/"+cfg.String()); n != 1 {
		t.Errorf("config fetched %d times, want 1", n)
	}
	if n := reg.Count("GET", "/manifests/"); n != 1 {
		t.Errorf("manifest fetched %d times, want 1", n)
	}
	checkBusyboxRootfs(t, results[0])
}

func TestLayoutAndArchive(t *testing.T) {
	e := newEnv(t)
	ctx := ctxT(t)
	v1img := busyboxImage(t)
	v2img := busyboxImage(t, testutil.Layer(t, tarBytes(t, file("etc/version", "2\n", 0o644))))
	writeLayout(t, e.taskDir, "local/img", map[string]v1.Image{"v1": v1img, "docker.io/library/busybox:v2": v2img})

	got, err := e.store.Get(ctx, "oci-layout:local/img:v1", nil, Policy{RequireDigest: true}, e.taskDir)
	if err != nil {
		t.Fatal(err)
	}
	if got.Digest != digestOf(t, v1img) || !got.Pulled {
		t.Errorf("layout :v1: %+v", got)
	}
	checkBusyboxRootfs(t, got)

	got2, err := e.store.Get(ctx, "oci-layout:local/img:v2", nil, Policy{}, e.taskDir)
	if err != nil {
		t.Fatal(err)
	}
	if got2.Digest != digestOf(t, v2img) {
		t.Errorf("layout :v2 (full reference in the annotation): %s", got2.Digest)
	}
	if b, err := os.ReadFile(filepath.Join(got2.Rootfs, "etc/version")); err != nil || string(b) != "2\n" {
		t.Errorf("second layer: %q %v", b, err)
	}

	byDigest, err := e.store.Get(ctx, "oci-layout:local/img@"+digestOf(t, v2img), nil, Policy{}, e.taskDir)
	if err != nil {
		t.Fatal(err)
	}
	if byDigest.Digest != digestOf(t, v2img) || byDigest.Pulled {
		t.Errorf("layout by digest: %+v", byDigest)
	}

	_, err = e.store.Get(ctx, "oci-layout:local/img", nil, Policy{}, e.taskDir)
	mustContain(t, err, "holds 2 manifests", "v1")
	_, err = e.store.Get(ctx, "oci-layout:local/img:v3", nil, Policy{}, e.taskDir)
	mustContain(t, err, `no manifest named "v3"`)

	// A layout holding one image needs no selector.
	writeLayout(t, e.taskDir, "local/single", map[string]v1.Image{"": v1img})
	single, err := e.store.Get(ctx, "oci-layout:local/single", nil, Policy{}, e.taskDir)
	if err != nil {
		t.Fatal(err)
	}
	if single.Digest != digestOf(t, v1img) || single.Pulled {
		t.Errorf("single-image layout: %+v", single)
	}

	// The archive of the layout gives the same images; a fresh store
	// unpacks from it.
	tarDir(t, filepath.Join(e.taskDir, "local/img"), filepath.Join(e.taskDir, "local/img.tar"))
	fresh := e.newStore(filepath.Join(e.parent, "cache2"))
	fromTar, err := fresh.Get(ctx, "oci-archive:local/img.tar:v1", nil, Policy{}, e.taskDir)
	if err != nil {
		t.Fatal(err)
	}
	if fromTar.Digest != digestOf(t, v1img) || !fromTar.Pulled {
		t.Errorf("archive: %+v", fromTar)
	}
	checkBusyboxRootfs(t, fromTar)
	fromTar2, err := fresh.Get(ctx, "oci-archive:local/img.tar@"+digestOf(t, v2img), nil, Policy{}, e.taskDir)
	if err != nil || fromTar2.Digest != digestOf(t, v2img) {
		t.Fatalf("archive by digest: %+v %v", fromTar2, err)
	}
}

func TestLocalPathsStayInTaskDir(t *testing.T) {
	e := newEnv(t)
	ctx := ctxT(t)
	img := busyboxImage(t)
	writeLayout(t, e.parent, "outside-layout", map[string]v1.Image{"": img})
	if err := os.Symlink(filepath.Join(e.parent, "outside-layout"), filepath.Join(e.taskDir, "local/link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../../outside-layout", filepath.Join(e.taskDir, "local/rel")); err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{"oci-layout:local/link", "oci-layout:local/rel", "oci-layout:../outside-layout", "oci-archive:../x.tar"} {
		_, err := e.store.Get(ctx, ref, nil, Policy{}, e.taskDir)
		mustContain(t, err, "leads outside the task directory")
	}
	_, err := e.store.Get(ctx, "oci-layout:/etc", nil, Policy{}, e.taskDir)
	mustContain(t, err, "must be relative to the task directory")

	// A blob in the layout that is a symlink out of it is not read.
	lay := writeLayout(t, e.taskDir, "local/sneaky", map[string]v1.Image{"": img})
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()
	blob := filepath.Join(lay, "blobs/sha256", ld.Hex)
	if err := os.Remove(blob); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(e.sentinel, "secret"), blob); err != nil {
		t.Fatal(err)
	}
	_, err = e.store.Get(ctx, "oci-layout:local/sneaky", nil, Policy{}, e.taskDir)
	mustContain(t, err, ld.String())
	assertCacheEmpty(t, e.store)
}

func TestLayoutBlobTamperedIsRefused(t *testing.T) {
	e := newEnv(t)
	img := busyboxImage(t)
	lay := writeLayout(t, e.taskDir, "local/img", map[string]v1.Image{"": img})
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()
	// Replace the layer blob with another valid gzip tar of the same
	// name: it unpacks fine but is not what the digest names.
	evil, err := testutil.Layer(t, tarBytes(t, file("bin/busybox", "#!/bin/sh\necho pwned\n", 0o755))).Compressed()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(evil)
	if err := os.WriteFile(filepath.Join(lay, "blobs/sha256", ld.Hex), b, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = e.store.Get(ctxT(t), "oci-layout:local/img", nil, Policy{}, e.taskDir)
	mustContain(t, err, "layer 1/1 "+ld.String())
	assertCacheEmpty(t, e.store)
}

func TestZstdAndUncompressedLayers(t *testing.T) {
	e := newEnv(t)
	zl := testutil.Layer(t, tarBytes(t, file("etc/zstd", "z\n", 0o644)), tarball.WithCompression(compression.ZStd), tarball.WithMediaType(types.OCILayerZStd))
	// An uncompressed layer: its blob is the tar itself.
	plain := static.NewLayer(tarBytes(t, file("etc/plain", "p\n", 0o644)), types.OCIUncompressedLayer)
	img := busyboxImage(t, zl, plain)
	writeLayout(t, e.taskDir, "local/img", map[string]v1.Image{"": img})
	got, err := e.store.Get(ctxT(t), "oci-layout:local/img", nil, Policy{}, e.taskDir)
	if err != nil {
		t.Fatal(err)
	}
	for f, want := range map[string]string{"etc/zstd": "z\n", "etc/plain": "p\n"} {
		if b, err := os.ReadFile(filepath.Join(got.Rootfs, f)); err != nil || string(b) != want {
			t.Errorf("%s: %q %v", f, b, err)
		}
	}
}

func TestRegistryErrorsLeaveNothing(t *testing.T) {
	e := newEnv(t)
	img := busyboxImage(t)
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()
	want := digestOf(t, img)

	var tamper struct {
		sync.Mutex
		blob, manifest bool
	}
	reg := testutil.StartRegistry(t, testutil.WithHandler(func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			tamper.Lock()
			tb, tm := tamper.blob, tamper.manifest
			tamper.Unlock()
			switch {
			case tb && r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+ld.String()):
				rec := &recorder{header: http.Header{}}
				h.ServeHTTP(rec, r)
				b := rec.body.Bytes()
				b[len(b)/2] ^= 0xff
				w.WriteHeader(rec.code)
				w.Write(b)
			case tm && r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/manifests/"):
				rec := &recorder{header: http.Header{}}
				h.ServeHTTP(rec, r)
				for k, v := range rec.header {
					if k != "Content-Length" {
						w.Header()[k] = v
					}
				}
				w.WriteHeader(rec.code)
				w.Write(append(rec.body.Bytes(), ' '))
			default:
				h.ServeHTTP(w, r)
			}
		})
	}))
	push(t, reg.Host+"/busybox:latest", img)
	ctx := ctxT(t)

	cases := []struct {
		name  string
		ref   string
		pol   Policy
		setup func()
		want  []string
	}{
		{name: "unknown digest", ref: reg.Host + "/busybox@sha256:" + strings.Repeat("ab", 32),
			want: []string{"not found in registry " + reg.Host, "repo busybox"}},
		{name: "missing image", ref: reg.Host + "/nothere:latest", want: []string{"not found in registry " + reg.Host, "repo nothere"}},
		{name: "missing tag", ref: reg.Host + "/busybox:nope", want: []string{"not found"}},
		{name: "registry not allowed", ref: reg.Host + "/busybox:latest", pol: Policy{AllowedRegistries: []string{"registry.example.com", "docker.io"}},
			want: []string{"registry " + reg.Host + " is not allowed", "allowed_registries"}},
		{name: "tag where a digest is required", ref: reg.Host + "/busybox:latest", pol: Policy{RequireDigest: true},
			want: []string{"require_digest", reg.Host + "/busybox@sha256:<digest>"}},
		{name: "tampered layer", ref: reg.Host + "/busybox:latest", setup: func() { tamper.Lock(); tamper.blob = true; tamper.Unlock() },
			want: []string{"layer 1/1 " + ld.String(), "does not match its digest"}},
		{name: "tampered manifest by digest", ref: reg.Host + "/busybox@" + want,
			setup: func() { tamper.Lock(); tamper.blob, tamper.manifest = false, true; tamper.Unlock() },
			want:  []string{"does not match"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if c.setup != nil {
				c.setup()
			}
			pol := c.pol
			if pol.AllowedRegistries == nil {
				pol.AllowedRegistries = []string{reg.Host}
			}
			_, err := e.store.Get(ctx, c.ref, nil, pol, e.taskDir)
			mustContain(t, err, c.want...)
			t.Log(err)
			assertCacheEmpty(t, e.store)
		})
	}

	// A store that allows no plain HTTP refuses even loopback.
	strict := e.newStore(filepath.Join(e.parent, "strict"))
	strict.Insecure = func(string) bool { return false }
	tamper.Lock()
	tamper.manifest = false
	tamper.Unlock()
	_, err := strict.Get(ctx, reg.Host+"/busybox:latest", nil, registryPolicy(reg), e.taskDir)
	mustContain(t, err, "plain HTTP to "+reg.Host+" refused")
	assertCacheEmpty(t, strict)

	// After all that, the image still pulls.
	if _, err := e.store.Get(ctx, reg.Host+"/busybox:latest", nil, registryPolicy(reg), e.taskDir); err != nil {
		t.Fatal(err)
	}
}

// recorder is a minimal ResponseWriter that keeps the response.
type recorder struct {
	header http.Header
	body   bytes.Buffer
	code   int
}

func (r *recorder) Header() http.Header { return r.header }
func (r *recorder) Write(b []byte) (int, error) {
	if r.code == 0 {
		r.code = http.StatusOK
	}
	return r.body.Write(b)
}
func (r *recorder) WriteHeader(c int) { r.code = c }

func TestRegistryAuth(t *testing.T) {
	e := newEnv(t)
	reg := testutil.StartRegistry(t, testutil.WithBasicAuth("alice", "s3cret"))
	img := busyboxImage(t)
	push(t, reg.Host+"/private/app:1", img, basic("alice", "s3cret"))
	ref := reg.Host + "/private/app:1"
	ctx := ctxT(t)

	_, err := e.store.Get(ctx, ref, &Auth{Username: "alice", Password: "wrong"}, registryPolicy(reg), e.taskDir)
	mustContain(t, err, "registry "+reg.Host+" refused the credentials for repo private/app", "the task's auth")
	assertCacheEmpty(t, e.store)

	_, err = e.store.Get(ctx, ref, nil, registryPolicy(reg), e.taskDir)
	mustContain(t, err, "registry "+reg.Host+" requires credentials for repo private/app")
	assertCacheEmpty(t, e.store)

	got, err := e.store.Get(ctx, ref, &Auth{Username: "alice", Password: "s3cret"}, registryPolicy(reg), e.taskDir)
	if err != nil {
		t.Fatal(err)
	}
	if got.Digest != digestOf(t, img) {
		t.Errorf("digest %s", got.Digest)
	}
	// The cached image is not handed to a task that cannot read it.
	_, err = e.store.Get(ctx, reg.Host+"/private/app@"+got.Digest, &Auth{Username: "alice", Password: "wrong"}, registryPolicy(reg), e.taskDir)
	mustContain(t, err, "refused the credentials")

	// The plugin's docker config: auths, then a credential helper.
	cfgDir := t.TempDir()
	cfgPath := filepath.Join(cfgDir, "config.json")
	writeCfg := func(s string) {
		if err := os.WriteFile(cfgPath, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	withCfg := e.newStore(filepath.Join(e.parent, "cache-cfg"))
	withCfg.AuthConfig = cfgPath
	auth := base64.StdEncoding.EncodeToString([]byte("alice:s3cret"))
	writeCfg(fmt.Sprintf(`{"auths":{%q:{"auth":%q}}}`, reg.Host, auth))
	if got, err := withCfg.Get(ctx, ref, nil, registryPolicy(reg), e.taskDir); err != nil || !got.Pulled {
		t.Fatalf("auth config: %+v %v", got, err)
	}
	// The task's own auth wins over the config.
	_, err = withCfg.Get(ctx, ref, &Auth{Username: "bob", Password: "x"}, registryPolicy(reg), e.taskDir)
	mustContain(t, err, "refused the credentials", "the task's auth")

	writeCfg(fmt.Sprintf(`{"auths":{%q:{"auth":%q}}}`, reg.Host, base64.StdEncoding.EncodeToString([]byte("alice:nope"))))
	_, err = withCfg.Get(ctx, ref, nil, registryPolicy(reg), e.taskDir)
	mustContain(t, err, "refused the credentials for repo private/app", "auth config "+cfgPath)

	binDir := t.TempDir()
	helper := "#!/bin/sh\nread server\n" +
		`echo "{\"ServerURL\":\"$server\",\"Username\":\"alice\",\"Secret\":\"s3cret\"}"` + "\n"
	if err := os.WriteFile(filepath.Join(binDir, "docker-credential-sandboxtest"), []byte(helper), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", binDir+":"+os.Getenv("PATH"))
	writeCfg(fmt.Sprintf(`{"credHelpers":{%q:"sandboxtest"}}`, reg.Host))
	helped := e.newStore(filepath.Join(e.parent, "cache-helper"))
	helped.AuthConfig = cfgPath
	if got, err := helped.Get(ctx, ref, nil, registryPolicy(reg), e.taskDir); err != nil || !got.Pulled {
		t.Fatalf("credential helper: %+v %v", got, err)
	}
}

func TestPullTimeoutLeavesNothing(t *testing.T) {
	e := newEnv(t)
	img := busyboxImage(t)
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()
	release := make(chan struct{})
	reg := testutil.StartRegistry(t, testutil.WithHandler(func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+ld.String()) {
				// Send part of the layer, then stall.
				rec := &recorder{header: http.Header{}}
				h.ServeHTTP(rec, r)
				w.Header().Set("Content-Length", fmt.Sprint(rec.body.Len()))
				w.WriteHeader(http.StatusOK)
				w.Write(rec.body.Bytes()[:rec.body.Len()/2])
				w.(http.Flusher).Flush()
				select {
				case <-release:
				case <-r.Context().Done():
				}
				return
			}
			h.ServeHTTP(w, r)
		})
	}))
	defer close(release)
	push(t, reg.Host+"/slow:1", img)
	e.store.PullTimeout = 500 * time.Millisecond
	start := time.Now()
	_, err := e.store.Get(context.Background(), reg.Host+"/slow:1", nil, registryPolicy(reg), e.taskDir)
	mustContain(t, err, "layer 1/1 "+ld.String())
	if time.Since(start) > 10*time.Second {
		t.Errorf("timed-out pull took %v", time.Since(start))
	}
	assertCacheEmpty(t, e.store)
}

func TestOpenRemovesStaleWorkDirs(t *testing.T) {
	e := newEnv(t)
	tmp := filepath.Join(e.store.Dir, "tmp")
	stale := filepath.Join(tmp, "pull-0123456789ab-1")
	if err := os.MkdirAll(filepath.Join(stale, "rootfs/bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	// One held by a live process (this one, via another Store) stays.
	other := e.newStore(e.store.Dir)
	if err := other.Open(); err != nil {
		t.Fatal(err)
	}
	held, err := other.mkWork(context.Background(), "pull-held-")
	if err != nil {
		t.Fatal(err)
	}
	defer held.remove()
	if err := os.MkdirAll(stale, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := e.store.Open(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Errorf("stale work directory survived: %v", err)
	}
	if _, err := os.Stat(held.path); err != nil {
		t.Errorf("a work directory in use was removed: %v", err)
	}
}

func TestGC(t *testing.T) {
	e := newEnv(t)
	e.store.GCGrace = -1
	ctx := ctxT(t)
	imgs := map[string]v1.Image{}
	digests := map[string]string{}
	for _, n := range []string{"a", "b", "c"} {
		imgs[n] = busyboxImage(t, testutil.Layer(t, tarBytes(t, file("name", n, 0o644))))
		digests[n] = digestOf(t, imgs[n])
	}
	writeLayout(t, e.taskDir, "local/imgs", imgs)
	sizes := map[string]int64{}
	for _, n := range []string{"a", "b", "c"} {
		got, err := e.store.Get(ctx, "oci-layout:local/imgs:"+n, nil, Policy{}, e.taskDir)
		if err != nil {
			t.Fatal(err)
		}
		sizes[n] = got.Size
	}
	age := func(n string, d time.Duration) {
		p := filepath.Join(e.store.imageDir(strings.TrimPrefix(digests[n], "sha256:")), lastUseFile)
		when := time.Now().Add(-d)
		if err := os.Chtimes(p, when, when); err != nil {
			t.Fatal(err)
		}
	}
	age("a", 3*time.Hour)
	age("b", 2*time.Hour)
	age("c", time.Hour)
	exists := func(n string) bool {
		_, err := os.Stat(filepath.Join(e.store.imageDir(strings.TrimPrefix(digests[n], "sha256:")), "rootfs"))
		return err == nil
	}

	// By age: a is in use, c is young enough; b goes.
	removed, err := e.store.GC(90*time.Minute, 0, func(d string) bool { return d == digests["a"] })
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(removed, []string{digests["b"]}) || exists("b") || !exists("a") || !exists("c") {
		t.Errorf("GC by age removed %v", removed)
	}

	// By size: the oldest goes first, until a and c fit.
	removed, err = e.store.GC(0, sizes["c"], nil)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(removed, []string{digests["a"]}) || exists("a") || !exists("c") {
		t.Errorf("GC by size removed %v", removed)
	}

	// A Get just now protects the image for the grace period.
	e.store.GCGrace = time.Hour
	if _, err := e.store.Get(ctx, "oci-layout:local/imgs:c", nil, Policy{}, e.taskDir); err != nil {
		t.Fatal(err)
	}
	removed, err = e.store.GC(time.Nanosecond, 1, nil)
	if err != nil || len(removed) != 0 || !exists("c") {
		t.Errorf("GC within the grace period removed %v (%v)", removed, err)
	}

	// A removed image is pulled again on the next Get.
	again, err := e.store.Get(ctx, "oci-layout:local/imgs:a", nil, Policy{}, e.taskDir)
	if err != nil || !again.Pulled {
		t.Fatalf("get after GC: %+v %v", again, err)
	}
	if b, err := os.ReadFile(filepath.Join(again.Rootfs, "name")); err != nil || string(b) != "a" {
		t.Errorf("re-pulled image: %q %v", b, err)
	}
	if entries, _ := os.ReadDir(e.store.tmpDir()); len(entries) != 0 {
		t.Errorf("GC left work directories: %v", entries)
	}
}

func TestParseReferenceAndPolicy(t *testing.T) {
	for _, c := range []struct {
		ref      string
		kind     refKind
		path     string
		tag      string
		hasDigst bool
	}{
		{"oci-layout:local/img", kindLayout, "local/img", "", false},
		{"oci-layout:local/img:v1", kindLayout, "local/img", "v1", false},
		{"oci-layout:./local/my:dir/img", kindLayout, "local/my:dir/img", "", false},
		{"oci-layout:local/img@sha256:" + strings.Repeat("0", 64), kindLayout, "local/img", "", true},
		{"oci-archive:local/img.tar", kindArchive, "local/img.tar", "", false},
		{"busybox", kindRegistry, "", "", false},
	} {
		r, err := parseReference(c.ref)
		if err != nil {
			t.Errorf("%s: %v", c.ref, err)
			continue
		}
		if r.kind != c.kind || r.path != c.path || r.tag != c.tag || (r.digest != nil) != c.hasDigst {
			t.Errorf("%s: %+v", c.ref, r)
		}
	}
	for _, bad := range []string{"", "oci-layout:", "oci-layout:/abs", "oci-layout:a/../../x", "oci-layout:x@sha256:12", "UPPER/Case:x"} {
		if _, err := parseReference(bad); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
	hub, _ := parseReference("busybox:1.36")
	for _, allowed := range []string{"docker.io", "index.docker.io", "registry-1.docker.io", "Docker.IO"} {
		if err := (Policy{AllowedRegistries: []string{allowed}}).check(hub); err != nil {
			t.Errorf("docker hub with allowed %q: %v", allowed, err)
		}
	}
	err := (Policy{AllowedRegistries: []string{"ghcr.io"}}).check(hub)
	mustContain(t, err, "registry index.docker.io is not allowed", "allowed_registries")
	local, _ := parseReference("oci-layout:local/img")
	if err := (Policy{RequireDigest: true, AllowedRegistries: []string{"ghcr.io"}}).check(local); err != nil {
		t.Errorf("policy applied to a local layout: %v", err)
	}
	if isLoopback("10.0.0.1:5000") || !isLoopback("127.0.0.1:5000") || !isLoopback("[::1]:80") || !isLoopback("localhost") {
		t.Error("isLoopback")
	}
}

func TestDamagedCacheEntryIsPulledAgain(t *testing.T) {
	e := newEnv(t)
	writeLayout(t, e.taskDir, "local/img", map[string]v1.Image{"": busyboxImage(t)})
	ctx := ctxT(t)
	first, err := e.store.Get(ctx, "oci-layout:local/img", nil, Policy{}, e.taskDir)
	if err != nil {
		t.Fatal(err)
	}
	entry := filepath.Dir(first.Rootfs)
	for _, damage := range []func(){
		func() { os.WriteFile(filepath.Join(entry, metaFile), []byte("{not json"), 0o600) },
		func() { os.RemoveAll(first.Rootfs) },
	} {
		damage()
		again, err := e.store.Get(ctx, "oci-layout:local/img", nil, Policy{}, e.taskDir)
		if err != nil {
			t.Fatal(err)
		}
		if !again.Pulled || again.Rootfs != first.Rootfs {
			t.Errorf("after damage: %+v", again)
		}
		checkBusyboxRootfs(t, again)
	}
	if entries, _ := os.ReadDir(e.store.tmpDir()); len(entries) != 0 {
		t.Errorf("work directories left: %v", entries)
	}
}
