package driver

import (
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/shoenig/test/must"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/image"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

func imageConfig() v1.Config {
	return v1.Config{
		Entrypoint: []string{"/bin/sh", "-c"},
		Cmd:        []string{`echo "from-image pwd=$(pwd) uid=$(id -u) var=$IMG_VAR task=$NOMAD_TASK_DIR"`},
		Env:        []string{"IMG_VAR=from-image", "PATH=/bin"},
		WorkingDir: "/tmp",
		User:       "app",
	}
}

// allowRegistry names a test registry (on loopback, which only an operator
// may allow) in allowed_registries, then applies mutate.
func allowRegistry(host string, mutate func(*PluginConfig)) func(*PluginConfig) {
	return func(pc *PluginConfig) {
		pc.AllowedRegistries = []string{host}
		if mutate != nil {
			mutate(pc)
		}
	}
}

func cachedTrees(t *testing.T, dir string) int {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(dir, "images", "sha256"))
	if os.IsNotExist(err) {
		return 0
	}
	must.NoError(t, err)
	return len(entries)
}

func TestDriver_ImageFromRegistry(t *testing.T) {
	reg := testutil.StartRegistry(t)
	byTag, byDigest := reg.Push(t, "ci/busybox", "1.0", testutil.BusyboxImage(t, imageConfig()))
	e := newTestEnv(t, allowRegistry(reg.Host, nil))

	// The image's configuration is the default.
	cfg, cleanup := e.task(t, "image", TaskConfig{Image: byTag, ReadonlyRootfs: true})
	defer cleanup()
	ev := e.events(t, cfg.ID)
	res := e.run(cfg)
	must.Eq(t, 0, res.ExitCode, must.Sprint(readLog(cfg, "stderr")))
	waitLog(t, cfg, "stdout", has("from-image pwd=/tmp uid=1000 var=from-image task=/local"))
	ev.waitFor(t, "Pulling image "+byTag)
	digest := byDigest[strings.Index(byDigest, "@")+1:]
	ev.waitFor(t, "Pulled image "+digest+" in ")
	must.Eq(t, 1, cachedTrees(t, e.config.ImageDir))
	pulls := reg.Count("GET", "/manifests/")

	// The task's settings win; the second start uses the cache.
	cfg2, cleanup2 := e.task(t, "override", TaskConfig{
		Image:          byDigest,
		ReadonlyRootfs: true,
		// As with Docker, args replace the image's cmd and keep its
		// entrypoint (here /bin/sh -c).
		Args:    []string{`echo "override pwd=$(pwd) var=$IMG_VAR"; touch /probe || echo read-only`},
		WorkDir: "/local",
	})
	defer cleanup2()
	cfg2.User = "0"
	ev2 := e.events(t, cfg2.ID)
	res = e.run(cfg2)
	must.Eq(t, 0, res.ExitCode)
	waitLog(t, cfg2, "stdout", has("override pwd=/local var=from-image"))
	waitLog(t, cfg2, "stdout", has("read-only"))
	ev2.waitFor(t, "Using cached image "+digest)
	must.Eq(t, 1, cachedTrees(t, e.config.ImageDir), must.Sprint("one unpacked tree serves every task of the image"))
	must.LessEq(t, pulls+1, reg.Count("GET", "/manifests/"), must.Sprint("a cached digest costs at most one manifest check"))
}

func TestDriver_ImagePolicy(t *testing.T) {
	reg := testutil.StartRegistry(t)
	byTag, byDigest := reg.Push(t, "ci/busybox", "1.0", testutil.BusyboxImage(t, imageConfig()))

	cases := []struct {
		name   string
		mutate func(*PluginConfig)
		ref    string
		want   string
	}{
		{"digest required", func(pc *PluginConfig) { pc.RequireDigest = true }, byTag, "digest"},
		{"registry not allowed", func(pc *PluginConfig) { pc.AllowedRegistries = []string{"registry.example.com"} }, byDigest, "allowed_registries"},
		// The cause, not the reference (which every image error names).
		{"missing image", nil, reg.Host + "/ci/nothing:1.0", "tag 1.0 not found in registry"},
		{"wrong digest", nil, reg.Host + "/ci/busybox@sha256:" + strings.Repeat("0", 64), "manifest sha256:" + strings.Repeat("0", 64) + " not found"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newTestEnv(t, allowRegistry(reg.Host, tc.mutate))
			cfg, cleanup := e.taskWithLogs(t, "policy", TaskConfig{Image: tc.ref, ReadonlyRootfs: true}, false)
			defer cleanup()
			ev := e.events(t, cfg.ID)
			_, _, err := e.harness.StartTask(cfg)
			must.Error(t, err)
			must.StrContains(t, err.Error(), tc.want)
			ev.waitFor(t, "Sandbox refused: ")
			must.Eq(t, 0, cachedTrees(t, e.config.ImageDir))
			entries, _ := os.ReadDir(e.config.StateDir)
			must.SliceEmpty(t, entries)
		})
	}
	t.Run("digest required accepts a digest", func(t *testing.T) {
		e := newTestEnv(t, func(pc *PluginConfig) { pc.RequireDigest = true; pc.AllowedRegistries = []string{reg.Host} })
		cfg, cleanup := e.task(t, "pinned", TaskConfig{Image: byDigest, ReadonlyRootfs: true})
		defer cleanup()
		must.Eq(t, 0, e.run(cfg).ExitCode)
	})
}

func TestTaskArgs(t *testing.T) {
	ic := image.Config{Entrypoint: []string{"/bin/sh", "-c"}, Cmd: []string{"default-cmd"}}
	cases := []struct {
		name string
		tc   TaskConfig
		want []string
	}{
		{"image defaults", TaskConfig{}, []string{"/bin/sh", "-c", "default-cmd"}},
		{"args replace cmd", TaskConfig{Args: []string{"a"}}, []string{"/bin/sh", "-c", "a"}},
		{"command replaces cmd", TaskConfig{Command: "/bin/echo", Args: []string{"x"}}, []string{"/bin/sh", "-c", "/bin/echo", "x"}},
		{"entrypoint drops image cmd", TaskConfig{Entrypoint: []string{"/bin/env"}}, []string{"/bin/env"}},
		{"entrypoint and command", TaskConfig{Entrypoint: []string{"/bin/env"}, Command: "ls"}, []string{"/bin/env", "ls"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			must.Eq(t, c.want, taskArgs(&c.tc, ic))
		})
	}
}

// An image the job brought itself (an artifact unpacked into local/), for
// air-gapped CI: no registry involved.
func TestDriver_ImageFromOCILayout(t *testing.T) {
	e := newTestEnv(t, nil)
	cfg, cleanup := e.task(t, "layout", TaskConfig{Image: "oci-layout:local/img", ReadonlyRootfs: true})
	defer cleanup()
	p, err := layout.Write(filepath.Join(cfg.TaskDir().LocalDir, "img"), empty.Index)
	must.NoError(t, err)
	must.NoError(t, p.AppendImage(testutil.BusyboxImage(t, imageConfig())))
	ev := e.events(t, cfg.ID)
	res := e.run(cfg)
	must.Eq(t, 0, res.ExitCode, must.Sprint(readLog(cfg, "stderr")))
	waitLog(t, cfg, "stdout", has("from-image pwd=/tmp uid=1000"))
	ev.waitFor(t, "Pulled image sha256:")
}

func TestDriver_ImageTaskAuth(t *testing.T) {
	reg := testutil.StartRegistry(t, testutil.WithBasicAuth("ci", "s3cret"))
	_, byDigest := reg.Push(t, "private/app", "1.0", testutil.BusyboxImage(t, imageConfig()))
	e := newTestEnv(t, allowRegistry(reg.Host, nil))

	bad, cleanupBad := e.taskWithLogs(t, "badauth", TaskConfig{Image: byDigest, ReadonlyRootfs: true, Auth: TaskAuth{Username: "ci", Password: "wrong"}}, false)
	defer cleanupBad()
	_, _, err := e.harness.StartTask(bad)
	must.Error(t, err)
	must.StrContains(t, err.Error(), "refused the credentials")
	must.Eq(t, 0, cachedTrees(t, e.config.ImageDir))

	good, cleanup := e.task(t, "goodauth", TaskConfig{Image: byDigest, ReadonlyRootfs: true, Auth: TaskAuth{Username: "ci", Password: "s3cret"}})
	defer cleanup()
	must.Eq(t, 0, e.run(good).ExitCode)
}

func TestDriver_ImageGCKeepsImagesInUse(t *testing.T) {
	reg := testutil.StartRegistry(t)
	_, used := reg.Push(t, "gc/used", "1", testutil.BusyboxImage(t, imageConfig()))
	cfgB := imageConfig()
	cfgB.Env = append(cfgB.Env, "OTHER=1") // a different image
	_, unused := reg.Push(t, "gc/unused", "1", testutil.BusyboxImage(t, cfgB))
	e := newTestEnv(t, allowRegistry(reg.Host, func(pc *PluginConfig) { pc.ImageGC.MaxAge = "1ns" }))
	e.driver.images.GCGrace = -1

	running, cleanup := e.task(t, "running", TaskConfig{Image: used, ReadonlyRootfs: true, Entrypoint: []string{"/bin/sleep"}, Args: []string{"600"}})
	defer cleanup()
	_, _, err := e.harness.StartTask(running)
	must.NoError(t, err)
	defer func() { must.NoError(t, e.driver.DestroyTask(running.ID, true)) }()

	done, cleanup2 := e.task(t, "done", TaskConfig{Image: unused, ReadonlyRootfs: true})
	defer cleanup2()
	must.Eq(t, 0, e.run(done).ExitCode)
	must.Eq(t, 2, cachedTrees(t, e.config.ImageDir))

	e.driver.collectImages()
	must.Eq(t, 1, cachedTrees(t, e.config.ImageDir), must.Sprint("the unused image goes, the running task's stays"))
	usedDigest := used[strings.Index(used, "@sha256:")+len("@sha256:"):]
	_, err = os.Stat(filepath.Join(e.config.ImageDir, "images", "sha256", usedDigest))
	must.NoError(t, err)
}

// TestDriver_ImagePullTimeout: a registry that never answers holds a start
// no longer than image_pull_timeout, and the error says which setting to
// raise.
func TestDriver_ImagePullTimeout(t *testing.T) {
	var asked atomic.Int64
	stop := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		asked.Add(1)
		select { // hang until the client gives up or the test ends
		case <-r.Context().Done():
		case <-stop:
		}
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() { close(stop) })
	host := strings.TrimPrefix(srv.URL, "http://")
	e := newTestEnv(t, allowRegistry(host, func(pc *PluginConfig) { pc.ImagePullTimeout = "1s" }))
	ref := host + "/ci/slow:1.0"
	cfg, cleanup := e.taskWithLogs(t, "slow", TaskConfig{Image: ref, ReadonlyRootfs: true}, false)
	defer cleanup()
	_, _, err := e.harness.StartTask(cfg)
	must.ErrorContains(t, err, image.ErrPullTimeout.Error()) // through gRPC: text only
	must.ErrorContains(t, err, "image_pull_timeout")
	must.Positive(t, asked.Load(), must.Sprint("the registry was never asked"))
}

// TestDriver_ImageLoopbackRegistryNeedsOperator: a job cannot make the
// plugin talk to a service on the node by naming it as its registry; the
// operator allows such a registry by naming it.
func TestDriver_ImageLoopbackRegistryNeedsOperator(t *testing.T) {
	reg := testutil.StartRegistry(t)
	_, byDigest := reg.Push(t, "ci/busybox", "1.0", testutil.BusyboxImage(t, imageConfig()))
	pushed := reg.Count("GET", "/manifests/")
	e := newTestEnv(t, nil)
	cfg, cleanup := e.taskWithLogs(t, "loopback", TaskConfig{Image: byDigest, ReadonlyRootfs: true}, false)
	defer cleanup()
	ev := e.events(t, cfg.ID)
	_, _, err := e.harness.StartTask(cfg)
	must.ErrorContains(t, err, "non-public address")
	must.ErrorContains(t, err, "allowed_registries")
	ev.waitFor(t, "Sandbox refused: ")
	must.Eq(t, pushed, reg.Count("GET", "/manifests/"), must.Sprint("the registry on loopback was asked"))
	must.Eq(t, 0, cachedTrees(t, e.config.ImageDir))
}

// TestDriver_ImageMaxSize: an image that unpacks to more than
// image_max_size_mb fails with an error naming the setting and leaves
// nothing in the cache.
func TestDriver_ImageMaxSize(t *testing.T) {
	e := newTestEnv(t, func(pc *PluginConfig) { pc.ImageMaxSizeMB = 1 })
	cfg, cleanup := e.taskWithLogs(t, "big", TaskConfig{Image: "oci-layout:local/img", ReadonlyRootfs: true}, false)
	defer cleanup()
	p, err := layout.Write(filepath.Join(cfg.TaskDir().LocalDir, "img"), empty.Index)
	must.NoError(t, err)
	img := testutil.BusyboxImage(t, imageConfig()) // busybox alone is over 1 MiB
	must.NoError(t, p.AppendImage(img))
	_, _, err = e.harness.StartTask(cfg)
	must.ErrorContains(t, err, "image_max_size_mb is 1")
	must.Eq(t, 0, cachedTrees(t, e.config.ImageDir))
	tmp, err := os.ReadDir(filepath.Join(e.config.ImageDir, "tmp"))
	must.NoError(t, err)
	must.SliceEmpty(t, tmp)
}

// TestDriver_ImageForeignErrorNotReported: a registry that sends a blob
// fetch to another host (one the operator allows) cannot get that host's
// answer into the task's events or the audit log.
func TestDriver_ImageForeignErrorNotReported(t *testing.T) {
	const secret = "FOREIGN-SECRET-c41d"
	var asked atomic.Int64
	foreign := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		asked.Add(1)
		w.WriteHeader(http.StatusForbidden)
		w.Write([]byte(`{"errors":[{"code":"DENIED","message":"` + secret + `"}]}`))
	}))
	t.Cleanup(foreign.Close)
	// Pushes check blobs with HEAD: only the driver's pull GETs them.
	reg := testutil.StartRegistry(t, testutil.WithHandler(func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
				http.Redirect(w, r, foreign.URL+"/blob", http.StatusTemporaryRedirect)
				return
			}
			h.ServeHTTP(w, r)
		})
	}))
	_, byDigest := reg.Push(t, "ci/busybox", "1.0", testutil.BusyboxImage(t, imageConfig()))
	auditPath := filepath.Join(t.TempDir(), "audit.log")
	e := newTestEnv(t, func(pc *PluginConfig) {
		pc.AllowedRegistries = []string{reg.Host, strings.TrimPrefix(foreign.URL, "http://")}
		pc.AuditLog = auditPath
	})
	cfg, cleanup := e.taskWithLogs(t, "foreign", TaskConfig{Image: byDigest, ReadonlyRootfs: true}, false)
	defer cleanup()
	ev := e.events(t, cfg.ID)
	_, _, err := e.harness.StartTask(cfg)
	must.ErrorContains(t, err, "403")
	must.StrNotContains(t, err.Error(), secret)
	must.StrNotContains(t, ev.waitFor(t, "Sandbox refused: "), secret)
	must.Positive(t, asked.Load(), must.Sprint("the blob host was never asked: the test proves nothing"))
	b, err := os.ReadFile(auditPath)
	must.NoError(t, err)
	must.StrContains(t, string(b), "403")
	must.StrNotContains(t, string(b), secret)
	must.Eq(t, 0, cachedTrees(t, e.config.ImageDir))
}
