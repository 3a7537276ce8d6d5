package image

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

// hostPath is a path outside the test's directory that a broken extractor
// would create: checked to be absent afterwards.
func hostPath() string { return fmt.Sprintf("/tmp/nomad-sandbox-image-escape-%d", rand.Uint64()) }

// layerCase is an image made of hand-written layers, and what unpacking it
// must give: an error naming the layer and entry, or a tree to check.
type layerCase struct {
	name   string
	layers func(e *env) []v1.Layer
	store  func(s *Store)
	// errLayer is "1/2" and the like when an error is expected.
	errLayer string
	errParts []string
	check    func(t *testing.T, e *env, rootfs string)
	outside  []string // host paths that must not exist
}

func tarLayers(t testing.TB, layers ...[]entry) []v1.Layer {
	var out []v1.Layer
	for _, l := range layers {
		out = append(out, testutil.Layer(t, tarBytes(t, l...)))
	}
	return out
}

func TestMaliciousLayers(t *testing.T) {
	outsideAbs := hostPath()
	outsideTmp := hostPath()
	outsideEtc := "/etc/" + filepath.Base(hostPath())
	cases := []layerCase{
		{
			name:     "dot-dot escape",
			layers:   func(e *env) []v1.Layer { return tarLayers(t, []entry{file("../escape", "x", 0o644)}) },
			errLayer: "1/1", errParts: []string{`entry "../escape"`, `".." refused`},
		},
		{
			name: "deep dot-dot escape",
			layers: func(e *env) []v1.Layer {
				return tarLayers(t, []entry{dir("a/", 0o755), file("a/../../../../../../../.."+outsideTmp, "x", 0o644)})
			},
			errLayer: "1/1", errParts: []string{`".." refused`}, outside: []string{outsideTmp},
		},
		{
			name: "absolute name",
			layers: func(e *env) []v1.Layer {
				return tarLayers(t, []entry{file(e.sentinel+"/abs-evil", "x", 0o644), file(outsideAbs, "x", 0o644)})
			},
			errLayer: "1/1", errParts: []string{"absolute path refused"}, outside: []string{outsideAbs},
		},
		{
			name: "write through symlink to /",
			layers: func(e *env) []v1.Layer {
				return tarLayers(t, []entry{symlink("link", "/"), file("link"+e.sentinel+"/evil", "x", 0o644)})
			},
			errLayer: "1/1", errParts: []string{`parent "link" is a symlink`},
		},
		{
			name: "write through symlink into /etc",
			layers: func(e *env) []v1.Layer {
				return tarLayers(t, []entry{symlink("link", "/"), file("link"+outsideEtc, "x", 0o644)})
			},
			errLayer: "1/1", errParts: []string{`parent "link" is a symlink`}, outside: []string{outsideEtc},
		},
		{
			name: "write through relative symlink going up",
			layers: func(e *env) []v1.Layer {
				return tarLayers(t, []entry{symlink("up", "../../../../../../../.."), file("up"+e.sentinel+"/evil", "x", 0o644)})
			},
			errLayer: "1/1", errParts: []string{`parent "up" is a symlink`},
		},
		{
			name: "symlink in a lower layer, write in the next",
			layers: func(e *env) []v1.Layer {
				return tarLayers(t, []entry{symlink("d", e.sentinel)}, []entry{file("d/evil", "x", 0o644)})
			},
			errLayer: "2/2", errParts: []string{`entry "d/evil"`, `parent "d" is a symlink`},
		},
		{
			name: "directory replaced by symlink, then written through",
			layers: func(e *env) []v1.Layer {
				return tarLayers(t, []entry{dir("x/", 0o755), file("x/ok", "ok", 0o644), symlink("x", e.sentinel), file("x/evil", "x", 0o644)})
			},
			errLayer: "1/1", errParts: []string{`entry "x/evil"`, `parent "x" is a symlink`},
		},
		{
			name:     "hardlink to an absolute path",
			layers:   func(e *env) []v1.Layer { return tarLayers(t, []entry{hardlink("passwd", "/etc/passwd")}) },
			errLayer: "1/1", errParts: []string{`entry "passwd"`, `hardlink to "/etc/passwd"`, "absolute path refused"},
		},
		{
			name:     "hardlink out with dot-dot",
			layers:   func(e *env) []v1.Layer { return tarLayers(t, []entry{hardlink("h", "../outside")}) },
			errLayer: "1/1", errParts: []string{`hardlink to "../outside"`, `".." refused`},
		},
		{
			name: "hardlink through a symlink",
			layers: func(e *env) []v1.Layer {
				return tarLayers(t, []entry{symlink("s", e.sentinel), hardlink("h", "s/secret")})
			},
			errLayer: "1/1", errParts: []string{`hardlink to "s/secret"`, `parent "s" is a symlink`},
		},
		{
			name: "char device",
			layers: func(e *env) []v1.Layer {
				return tarLayers(t, []entry{dir("dev/", 0o755), {name: "dev/mem", typ: tar.TypeChar, mode: 0o666}})
			},
			errLayer: "1/1", errParts: []string{`entry "dev/mem"`, "device node (1:3) refused"},
		},
		{
			name:     "block device",
			layers:   func(e *env) []v1.Layer { return tarLayers(t, []entry{{name: "sda", typ: tar.TypeBlock, mode: 0o660}}) },
			errLayer: "1/1", errParts: []string{`entry "sda"`, "device node"},
		},
		{
			name: "whiteout of dot-dot",
			layers: func(e *env) []v1.Layer {
				return tarLayers(t, []entry{file("etc/x", "x", 0o644)}, []entry{file(".wh...", "", 0o644)})
			},
			errLayer: "2/2", errParts: []string{`entry ".wh..."`, "whiteout names no file"},
		},
		{
			name:     "whiteout above the root",
			layers:   func(e *env) []v1.Layer { return tarLayers(t, []entry{file("../.wh.sentinel", "", 0o644)}) },
			errLayer: "1/1", errParts: []string{`".." refused`},
		},
		{
			name: "whiteout through a symlink",
			layers: func(e *env) []v1.Layer {
				return tarLayers(t, []entry{symlink("s", e.sentinel)}, []entry{file("s/.wh.secret", "", 0o644)})
			},
			errLayer: "2/2", errParts: []string{`entry "s/.wh.secret"`, `parent "s" is a symlink`},
		},
		{
			name: "opaque whiteout in a symlink",
			layers: func(e *env) []v1.Layer {
				return tarLayers(t, []entry{symlink("s", e.sentinel)}, []entry{file("s/.wh..wh..opq", "", 0o644)})
			},
			errLayer: "2/2", errParts: []string{"opaque whiteout", "symlink"},
		},
		{
			name: "gzip bomb",
			layers: func(e *env) []v1.Layer {
				return tarLayers(t, []entry{{name: "bomb", typ: tar.TypeReg, size: 64 << 20, mode: 0o644}})
			},
			store:    func(s *Store) { s.MaxImageSize = 8 << 20 },
			errLayer: "1/1", errParts: []string{"more than 8388608 bytes unpacked", "max image size"},
		},
		{
			name: "bomb spread over layers",
			layers: func(e *env) []v1.Layer {
				var ls [][]entry
				for i := range 4 {
					ls = append(ls, []entry{{name: fmt.Sprintf("f%d", i), typ: tar.TypeReg, size: 3 << 20, mode: 0o644}})
				}
				return tarLayers(t, ls...)
			},
			store:    func(s *Store) { s.MaxImageSize = 8 << 20 },
			errLayer: "3/4", errParts: []string{"max image size"},
		},
		{
			name: "bomb after the end of the tar",
			layers: func(e *env) []v1.Layer {
				b := tarBytes(t, file("small", "x", 0o644))
				var gz bytes.Buffer
				zw := gzip.NewWriter(&gz)
				zw.Write(b)
				io.Copy(zw, io.LimitReader(zeros{}, 64<<20))
				zw.Close()
				return []v1.Layer{static.NewLayer(gz.Bytes(), types.OCILayer)}
			},
			store:    func(s *Store) { s.MaxImageSize = 8 << 20 },
			errLayer: "1/1", errParts: []string{"max image size"},
		},
		{
			name: "too many files",
			layers: func(e *env) []v1.Layer {
				var es []entry
				for i := range 200 {
					es = append(es, file(fmt.Sprintf("f%03d", i), "x", 0o644))
				}
				return tarLayers(t, es)
			},
			store:    func(s *Store) { s.MaxFiles = 100 },
			errLayer: "1/1", errParts: []string{`entry "f100"`, "more than 100 entries"},
		},
		{
			name: "setuid, setgid and sticky bits",
			layers: func(e *env) []v1.Layer {
				return tarLayers(t, []entry{
					dir("bin/", 0o4755), file("bin/su", "su", 0o4755), file("bin/sg", "sg", 0o2755), file("bin/st", "st", 0o1755),
					dir("tmp/", 0o1777), dir("shared/", 0o2775),
				})
			},
			check: func(t *testing.T, e *env, rootfs string) {
				for p, want := range map[string]fs.FileMode{
					"bin": fs.ModeDir | 0o755, "bin/su": 0o755, "bin/sg": 0o755, "bin/st": 0o755,
					"tmp": fs.ModeDir | fs.ModeSticky | 0o777, "shared": fs.ModeDir | fs.ModeSetgid | 0o775,
				} {
					fi, err := os.Lstat(filepath.Join(rootfs, p))
					if err != nil || fi.Mode() != want {
						t.Errorf("%s: mode %v (%v), want %v", p, fi.Mode(), err, want)
					}
				}
			},
		},
		{
			name: "FIFO is skipped",
			layers: func(e *env) []v1.Layer {
				return tarLayers(t, []entry{{name: "pipe", typ: tar.TypeFifo, mode: 0o644}, file("after", "ok", 0o644)})
			},
			check: func(t *testing.T, e *env, rootfs string) {
				if _, err := os.Lstat(filepath.Join(rootfs, "pipe")); !os.IsNotExist(err) {
					t.Errorf("FIFO: %v", err)
				}
				if b, _ := os.ReadFile(filepath.Join(rootfs, "after")); string(b) != "ok" {
					t.Error("entry after the FIFO missing")
				}
			},
		},
		{
			name: "whiteouts and opaque directories",
			layers: func(e *env) []v1.Layer {
				return tarLayers(t,
					[]entry{dir("d/", 0o755), file("d/a", "a", 0o644), file("d/b", "b", 0o644), dir("d/sub/", 0o755), file("d/sub/c", "c", 0o644), file("e", "e", 0o644), file("keep", "k", 0o644)},
					[]entry{dir("d/", 0o755), file("d/.wh..wh..opq", "", 0o644), file("d/new", "n", 0o644), file(".wh.e", "", 0o644), file(".wh.absent", "", 0o644)},
					// Opaque marker after an entry of the same layer keeps it.
					[]entry{dir("f/", 0o755), file("f/lower", "l", 0o644)},
					[]entry{file("f/mine", "m", 0o644), file("f/.wh..wh..opq", "", 0o644)},
				)
			},
			check: func(t *testing.T, e *env, rootfs string) {
				for _, p := range []string{"d/new", "keep", "f/mine"} {
					if _, err := os.Lstat(filepath.Join(rootfs, p)); err != nil {
						t.Errorf("%s missing: %v", p, err)
					}
				}
				for _, p := range []string{"d/a", "d/b", "d/sub", "e", "f/lower", "d/.wh..wh..opq", ".wh.e"} {
					if _, err := os.Lstat(filepath.Join(rootfs, p)); err == nil {
						t.Errorf("%s survived its whiteout", p)
					}
				}
			},
		},
		{
			name: "file replacing a symlink does not follow it",
			layers: func(e *env) []v1.Layer {
				return tarLayers(t, []entry{symlink("f", e.sentinel+"/secret")}, []entry{file("f", "mine", 0o644)})
			},
			check: func(t *testing.T, e *env, rootfs string) {
				if b, err := os.ReadFile(filepath.Join(rootfs, "f")); err != nil || string(b) != "mine" {
					t.Errorf("f: %q %v", b, err)
				}
			},
		},
		{
			name: "symlinks and hardlinks inside the image",
			layers: func(e *env) []v1.Layer {
				return tarLayers(t, []entry{
					symlink("abs", "/etc/passwd"), symlink("rel", "../../../etc/shadow"),
					symlink("out", e.sentinel+"/secret"), hardlink("out2", "out"),
					file("data", "d", 0o640), hardlink("data2", "data"),
				})
			},
			check: func(t *testing.T, e *env, rootfs string) {
				for p, want := range map[string]string{"abs": "/etc/passwd", "rel": "../../../etc/shadow", "out2": e.sentinel + "/secret"} {
					if l, err := os.Readlink(filepath.Join(rootfs, p)); err != nil || l != want {
						t.Errorf("%s -> %q %v, want %q", p, l, err, want)
					}
				}
				a, _ := os.Stat(filepath.Join(rootfs, "data"))
				b, _ := os.Stat(filepath.Join(rootfs, "data2"))
				if !os.SameFile(a, b) {
					t.Error("data2 is not a hardlink of data")
				}
			},
		},
		{
			name: "ownership from the tar",
			layers: func(e *env) []v1.Layer {
				return tarLayers(t, []entry{
					{name: "owned", typ: tar.TypeReg, body: "x", mode: 0o600, uid: 4242, gid: 4343},
					{name: "ownlink", typ: tar.TypeSymlink, link: "owned", uid: 5, gid: 6},
				})
			},
			check: func(t *testing.T, e *env, rootfs string) {
				for p, want := range map[string][2]uint32{"owned": {4242, 4343}, "ownlink": {5, 6}} {
					fi, err := os.Lstat(filepath.Join(rootfs, p))
					if err != nil {
						t.Fatal(err)
					}
					if st := fi.Sys().(*syscall.Stat_t); st.Uid != want[0] || st.Gid != want[1] {
						t.Errorf("%s owned by %d:%d, want %v", p, st.Uid, st.Gid, want)
					}
				}
			},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t)
			if c.store != nil {
				c.store(e.store)
			}
			img := testutil.Image(t, testConfig, c.layers(e)...)
			writeLayout(t, e.taskDir, "local/img", map[string]v1.Image{"": img})
			before := snapshot(t, e.parent, e.store.Dir)
			got, err := e.store.Get(ctxT(t), "oci-layout:local/img", nil, Policy{}, e.taskDir)
			after := snapshot(t, e.parent, e.store.Dir)
			for _, d := range diffSnapshots(before, after) {
				t.Errorf("outside the cache: %s", d)
			}
			assertNotExist(t, c.outside...)
			if c.errLayer != "" {
				layers, _ := img.Layers()
				var n int
				fmt.Sscanf(c.errLayer, "%d/", &n)
				ld, _ := layers[n-1].Digest()
				mustContain(t, err, append([]string{"layer " + c.errLayer + " " + ld.String()}, c.errParts...)...)
				t.Log(err)
				assertCacheEmpty(t, e.store)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasPrefix(got.Rootfs, e.store.Dir+"/") {
				t.Fatalf("rootfs %s outside the cache", got.Rootfs)
			}
			c.check(t, e, got.Rootfs)
		})
	}
}
