package image

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/hashicorp/go-hclog"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

// env is one test's world: a parent directory holding the cache, a task
// directory and a sentinel directory that no image may touch.
type env struct {
	parent   string
	store    *Store
	taskDir  string
	sentinel string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	testutil.RequireRoot(t)
	parent := t.TempDir()
	e := &env{
		parent:   parent,
		taskDir:  filepath.Join(parent, "task"),
		sentinel: filepath.Join(parent, "sentinel"),
	}
	for _, d := range []string{e.taskDir, filepath.Join(e.taskDir, "local"), e.sentinel} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(e.sentinel, "secret"), []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	e.store = e.newStore(filepath.Join(parent, "cache"))
	return e
}

func (e *env) newStore(dir string) *Store {
	return &Store{
		Dir:         dir,
		PullTimeout: time.Minute,
		Logger:      hclog.New(&hclog.LoggerOptions{Name: "image", Level: hclog.Warn}),
	}
}

// snapshot lists every path under dir with its type, mode, size and
// content digest-ish summary, skipping the subtree named skip.
func snapshot(t *testing.T, dir, skip string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == skip {
			return filepath.SkipDir
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		v := fi.Mode().String()
		switch {
		case fi.Mode().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			v += " " + string(b)
		case fi.Mode()&fs.ModeSymlink != 0:
			l, _ := os.Readlink(p)
			v += " -> " + l
		}
		out[p] = v
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func diffSnapshots(before, after map[string]string) []string {
	var diffs []string
	for p, v := range after {
		if w, ok := before[p]; !ok {
			diffs = append(diffs, "created "+p)
		} else if w != v {
			diffs = append(diffs, "changed "+p)
		}
	}
	for p := range before {
		if _, ok := after[p]; !ok {
			diffs = append(diffs, "removed "+p)
		}
	}
	sort.Strings(diffs)
	return diffs
}

// assertCacheEmpty checks that no image and no work directory is left.
func assertCacheEmpty(t *testing.T, s *Store) {
	t.Helper()
	for _, d := range []string{s.imagesDir(), s.tmpDir()} {
		entries, err := os.ReadDir(d)
		if err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		for _, en := range entries {
			t.Errorf("left in the cache: %s", filepath.Join(d, en.Name()))
		}
	}
}

func assertNotExist(t *testing.T, paths ...string) {
	t.Helper()
	for _, p := range paths {
		if _, err := os.Lstat(p); err == nil {
			t.Errorf("%s was created outside the image", p)
			os.RemoveAll(p)
		}
	}
}

func mustContain(t *testing.T, err error, parts ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("expected an error containing %q, got none", parts)
	}
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Errorf("error %q does not contain %q", err, p)
		}
	}
}

// entry is one hand-made tar entry.
type entry struct {
	name     string
	typ      byte
	body     string
	size     int64 // for generated content (zeros) when body is empty
	mode     int64
	link     string
	uid, gid int
}

func dir(name string, mode int64) entry { return entry{name: name, typ: tar.TypeDir, mode: mode} }
func file(name, body string, mode int64) entry {
	return entry{name: name, typ: tar.TypeReg, body: body, mode: mode}
}
func symlink(name, target string) entry {
	return entry{name: name, typ: tar.TypeSymlink, link: target, mode: 0o777}
}
func hardlink(name, target string) entry { return entry{name: name, typ: tar.TypeLink, link: target} }

func tarBytes(t testing.TB, entries ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		mode := e.mode
		if mode == 0 {
			mode = 0o644
		}
		hdr := &tar.Header{
			Name: e.name, Typeflag: e.typ, Mode: mode, Linkname: e.link,
			Uid: e.uid, Gid: e.gid, ModTime: time.Unix(1700000000, 0), Format: tar.FormatPAX,
		}
		var body io.Reader
		if e.typ == tar.TypeReg {
			if e.body != "" {
				hdr.Size = int64(len(e.body))
				body = strings.NewReader(e.body)
			} else {
				hdr.Size = e.size
				body = io.LimitReader(zeros{}, e.size)
			}
		}
		if e.typ == tar.TypeChar || e.typ == tar.TypeBlock {
			hdr.Devmajor, hdr.Devminor = 1, 3
		}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		if body != nil {
			if _, err := io.Copy(tw, body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

var testConfig = v1.Config{
	Entrypoint: []string{"/bin/sh", "-c"},
	Cmd:        []string{"echo hello"},
	Env:        []string{"PATH=/bin", "GREETING=hello"},
	WorkingDir: "/home/app",
	User:       "1000:1000",
}

// busyboxImage is testutil's busybox image with testConfig, a home owned
// by uid 1000 in its one base layer (checkBusyboxRootfs checks that the
// owner and mode survive the unpack), and extra layers on top.
func busyboxImage(t testing.TB, extra ...v1.Layer) v1.Image {
	t.Helper()
	base := testutil.BusyboxTar(t,
		&tar.Header{Name: "home/", Typeflag: tar.TypeDir, Mode: 0o755},
		&tar.Header{Name: "home/app/", Typeflag: tar.TypeDir, Mode: 0o750, Uid: 1000, Gid: 1000})
	return testutil.Image(t, testConfig, append([]v1.Layer{testutil.Layer(t, base)}, extra...)...)
}

func digestOf(t testing.TB, img v1.Image) string {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}

// writeLayout writes images into an OCI layout at taskDir/rel, each named
// by the ref.name annotation given (empty for none).
func writeLayout(t testing.TB, taskDir, rel string, imgs map[string]v1.Image) string {
	t.Helper()
	p := filepath.Join(taskDir, rel)
	lp, err := layout.Write(p, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	names := make([]string, 0, len(imgs))
	for n := range imgs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		var opts []layout.Option
		if n != "" {
			opts = append(opts, layout.WithAnnotations(map[string]string{refNameAnnotation: n}))
		}
		if err := lp.AppendImage(imgs[n], opts...); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

// tarDir writes a tar of dir's contents (relative names) to out.
func tarDir(t testing.TB, dir, out string) {
	t.Helper()
	cmd := exec.Command("tar", "-C", dir, "-cf", out, ".")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("tar: %v: %s", err, b)
	}
}

// registryPolicy names the test registry in allowed_registries, as an
// operator must for a registry on a loopback address.
func registryPolicy(r *testutil.Registry) Policy {
	return Policy{AllowedRegistries: []string{r.Host}}
}

func push(t testing.TB, ref string, img v1.Image, opts ...remote.Option) {
	t.Helper()
	if err := remote.Write(mustRef(t, ref), img, opts...); err != nil {
		t.Fatal(err)
	}
}

func pushIndex(t testing.TB, ref string, idx v1.ImageIndex, opts ...remote.Option) {
	t.Helper()
	if err := remote.WriteIndex(mustRef(t, ref), idx, opts...); err != nil {
		t.Fatal(err)
	}
}

func basic(user, pass string) remote.Option {
	return remote.WithAuth(&authn.Basic{Username: user, Password: pass})
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func mustRef(t testing.TB, s string) name.Reference {
	t.Helper()
	r, err := name.ParseReference(s)
	if err != nil {
		t.Fatal(err)
	}
	return r
}
