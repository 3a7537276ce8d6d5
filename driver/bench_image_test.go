package driver

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

// benchCachedPairs is how many image/rootfs pairs one iteration of
// BenchmarkStartTask_CachedImage runs: a 10% bound needs more than the 10
// samples `make bench` gives each side with one pair per iteration on a
// loaded 2-core machine.
const benchCachedPairs = 3

// BenchmarkStartTask_CachedImage compares a task whose root is a cached
// image with one whose root is a local directory. The image (the same
// busybox tree as the benchmark's rootfs, one layer, empty config) is pushed
// to a registry on 127.0.0.1 and named by digest (`image =
// "127.0.0.1:PORT/bench/busybox@sha256:..."`); it is pulled and unpacked
// once before the loop, so every timed start of it is a cache hit. Each
// iteration runs benchCachedPairs pairs of /bin/true from the image and
// /bin/true from `rootfs = <dir under allow_host_rootfs>`, in alternating
// order, through StartTask, WaitTask's result and DestroyTask (ns/op is
// those pairs). Every image start is checked to be a cache hit, off the
// clock: the driver's "Using cached image <digest>" event and no "Pulled
// image", at most one manifest GET at the registry, and still exactly one
// tree in the cache.
// Metrics (medians):
//
//	image-start-s, rootfs-start-s  StartTask returned
//	image-exit-s, rootfs-exit-s    StartTask called -> exit result
//	image-cycle-s, rootfs-cycle-s  exit result + DestroyTask
//	ratio                          image-cycle-s / rootfs-cycle-s (target: at most 1.10)
//	ratio-paired                   median of each interleaved pair's image / rootfs cycle
//	ratio-start                    image-start-s / rootfs-start-s
//	image-cpu-s, rootfs-cpu-s      CPU of a cycle (see benchRun.cpu)
//	pull-s                         the one-time pull and unpack (image.Image.PullTime)
//	manifest-gets/start            registry manifest GETs per timed image start
//	lost-exit                      cycles whose exit status WaitTask lost (should be 0)
//
// After the loop, off the clock, it splits the image's extra work:
//
//	cached-get-ms      Driver.pullImage on the cached digest (what StartTask
//	                   does for an image instead of resolving a rootfs)
//	registry-check-ms  the registry part of it, done outside the driver the
//	                   same way (a new go-containerregistry Puller and a
//	                   HEAD of the digest over a kept transport)
//	resolve-rootfs-ms  Driver.resolveRootfs, what the rootfs task does instead
//
// The registry check is made on every start, cached or not (a ping of /v2/
// and a HEAD of the manifest; to a plain-HTTP loopback registry the ping
// first tries HTTPS), so on loopback it costs about a millisecond, but
// against a real registry each cached start pays those round trips.
func BenchmarkStartTask_CachedImage(b *testing.B) {
	var ids []string
	// Registered first, so it runs after every other cleanup and sees
	// what they left of the sandboxes.
	b.Cleanup(func() { benchCheckGone(b, ids) })
	// Before newBenchEnv: the registry stops after the driver's cleanup.
	reg := testutil.StartRegistry(b)
	e := newBenchEnv(b, false)
	e.d.config.AllowedRegistries = []string{reg.Host} // a loopback registry must be named
	manifests := func() int64 { return int64(reg.Count("GET", "/manifests/")) }
	ev := watchEvents(b, e.d)

	_, ref := reg.Push(b, "bench/busybox", "1", testutil.BusyboxImage(b, v1.Config{}))
	digest := ref[strings.LastIndex(ref, "@")+1:]
	imageTC := TaskConfig{Image: ref, Command: "/bin/true", ReadonlyRootfs: true, Tmpfs: []string{"/tmp"}}
	rootfsTC := TaskConfig{Rootfs: e.rootfs, Command: "/bin/true", ReadonlyRootfs: true, Tmpfs: []string{"/tmp"}}
	imageDir := e.d.config.ImageDir

	// The one pull, through the driver's own path.
	pullCfg := e.taskConfigWith(b, "true", imageTC)
	m0 := manifests()
	img, err := e.d.pullImage(pullCfg, &imageTC)
	if err != nil {
		b.Fatalf("pull %s: %v", ref, err)
	}
	if !img.Pulled || img.Digest != digest {
		b.Fatalf("first Get of %s: pulled %v, digest %s: want a pull of %s", ref, img.Pulled, img.Digest, digest)
	}
	if manifests() == m0 {
		b.Fatal("the first pull made no manifest GET at the registry")
	}
	if err := benchOneTree(imageDir); err != nil {
		b.Fatal(err)
	}
	if err := benchTreeDiff(img.Rootfs, e.rootfs); err != nil {
		b.Fatalf("the image's tree %s is not the rootfs %s: %v", img.Rootfs, e.rootfs, err)
	}
	pull := img.PullTime

	gets, maxGets := int64(0), int64(0)
	imageRun := func() benchRun {
		cfg := e.taskConfigWith(b, "true", imageTC)
		ids = append(ids, sandboxID(cfg))
		before := manifests()
		r := e.runCycle(b, cfg)
		b.StopTimer()
		n := manifests() - before
		gets += n
		maxGets = max(maxGets, n)
		if n > 1 {
			b.Fatalf("image start %s made %d manifest GETs at the registry: not a cache hit", cfg.ID, n)
		}
		if _, ok := ev.wait(cfg.ID, "Using cached image "+digest, 5*time.Second); !ok {
			b.Fatalf("image start %s: no \"Using cached image %s\" event; events: %q", cfg.ID, digest, ev.messages(cfg.ID))
		}
		if m, ok := ev.find(cfg.ID, "Pulled image"); ok {
			b.Fatalf("image start %s pulled the image again: %q", cfg.ID, m)
		}
		if err := benchOneTree(imageDir); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		return r
	}
	rootfsRun := func() benchRun {
		cfg := e.taskConfigWith(b, "true", rootfsTC)
		ids = append(ids, sandboxID(cfg))
		return e.runCycle(b, cfg)
	}

	// Untimed warm-up of both paths: page cache, the runsc root's null
	// netns, the registry connection. (b.Loop resets the timer.)
	imageRun()
	rootfsRun()
	gets, maxGets = 0, 0

	var imgs, roots []benchRun
	i := 0
	for b.Loop() {
		for k := 0; k < benchCachedPairs; k++ {
			// Alternate the order so that neither always runs second.
			if i%2 == 0 {
				imgs = append(imgs, imageRun())
				roots = append(roots, rootfsRun())
			} else {
				roots = append(roots, rootfsRun())
				imgs = append(imgs, imageRun())
			}
			i++
		}
	}
	b.StopTimer()

	// A pair with a lost exit status has no meaningful times: left out,
	// and counted.
	var gi, gr []benchRun
	var pairs []float64
	cycle := func(r benchRun) time.Duration { return r.exit + r.destroy }
	for i := range imgs {
		if imgs[i].lostExit || roots[i].lostExit {
			continue
		}
		gi, gr = append(gi, imgs[i]), append(gr, roots[i])
		pairs = append(pairs, cycle(imgs[i]).Seconds()/cycle(roots[i]).Seconds())
	}
	lost := benchLost(b, len(imgs)-len(gi), len(imgs), "pairs had a task whose exit status WaitTask lost (\"left no exit status\")")
	mi, mr := mediansOf(gi), mediansOf(gr)
	iStart, rStart := mi.start, mr.start
	iExit, rExit := mi.exit, mr.exit
	iCycle, rCycle := mi.cycle, mr.cycle
	iCPU, rCPU := mi.cpu, mr.cpu
	ratio := iCycle.Seconds() / rCycle.Seconds()

	// Where the image's extra time can go, off the clock and interleaved:
	// the driver's whole cached Get, its registry round trips alone, and
	// what the rootfs task does instead.
	ctx := context.Background()
	tr := &benchCountingTransport{inner: remote.DefaultTransport.(*http.Transport).Clone()}
	var getT, headT, resolveT []time.Duration
	m1 := manifests()
	const diagN = 21
	for j := 0; j < diagN; j++ {
		t0 := time.Now()
		im, err := e.d.pullImage(pullCfg, &imageTC)
		getT = append(getT, time.Since(t0))
		if err != nil || im.Pulled {
			b.Fatalf("cached Get of %s: pulled %v, %v", ref, im != nil && im.Pulled, err)
		}
		t0 = time.Now()
		err = benchRegistryHead(ctx, ref, tr)
		headT = append(headT, time.Since(t0))
		if err != nil {
			b.Fatalf("HEAD %s: %v", ref, err)
		}
		t0 = time.Now()
		if _, err := e.d.resolveRootfs(pullCfg, e.rootfs); err != nil {
			b.Fatalf("resolveRootfs: %v", err)
		}
		resolveT = append(resolveT, time.Since(t0))
	}
	diagGets := manifests() - m1
	getMed, headMed, resolveMed := testutil.Median(getT), testutil.Median(headT), testutil.Median(resolveT)
	reqs := tr.requests()
	perHead := float64(len(reqs)) / diagN
	if err := benchOneTree(imageDir); err != nil {
		b.Fatal(err)
	}

	ms := func(d time.Duration) float64 { return d.Seconds() * 1000 }
	mi.report(b, "image-")
	mr.report(b, "rootfs-")
	b.ReportMetric(iCycle.Seconds(), "image-cycle-s")
	b.ReportMetric(rCycle.Seconds(), "rootfs-cycle-s")
	b.ReportMetric(ratio, "ratio")
	b.ReportMetric(testutil.Median(pairs), "ratio-paired")
	b.ReportMetric(iStart.Seconds()/rStart.Seconds(), "ratio-start")
	b.ReportMetric(pull.Seconds(), "pull-s")
	b.ReportMetric(float64(gets)/float64(len(imgs)), "manifest-gets/start")
	b.ReportMetric(ms(getMed), "cached-get-ms")
	b.ReportMetric(ms(headMed), "registry-check-ms")
	b.ReportMetric(ms(resolveMed), "resolve-rootfs-ms")
	b.ReportMetric(float64(lost), "lost-exit")

	verdict := "within"
	if ratio > 1.10 {
		verdict = "OVER"
	}
	summary := fmt.Sprintf("cached image vs local rootfs, /bin/true: cycle (StartTask -> exit result -> DestroyTask) image %.3fs vs rootfs %.3fs, ratio %.3f (%s the 1.10 target; paired %.3f) | StartTask %.3fs vs %.3fs (%+.1f ms), to exit %.3fs vs %.3fs | CPU %.3fs vs %.3fs | one-time pull+unpack %.3fs (%.1f MiB tree) | cache hits checked: %d manifest GETs in %d timed image starts (at most %d in one), one tree in the cache | image's extra work, off the clock, median of %d: cached Get %.2f ms, of which the registry check (new Puller + HEAD: %.1f requests, %s) %.2f ms; rootfs resolve instead %.3f ms; %d manifest GETs in those Gets | medians of %d interleaved pairs, loadavg %s",
		iCycle.Seconds(), rCycle.Seconds(), ratio, verdict, testutil.Median(pairs),
		iStart.Seconds(), rStart.Seconds(), ms(iStart-rStart), iExit.Seconds(), rExit.Seconds(),
		iCPU.Seconds(), rCPU.Seconds(), pull.Seconds(), float64(img.Size)/(1<<20),
		gets, len(imgs), maxGets, diagN, ms(getMed), perHead, benchRequestKinds(reqs), ms(headMed), ms(resolveMed), diagGets,
		len(gi), benchLoadavg())
	benchSummary(b, summary)
}

// benchOneTree fails unless the image cache under dir holds exactly one
// unpacked image.
func benchOneTree(dir string) error {
	entries, err := os.ReadDir(filepath.Join(dir, "images", "sha256"))
	if err != nil {
		return fmt.Errorf("image cache: %w", err)
	}
	if len(entries) != 1 {
		var names []string
		for _, ent := range entries {
			names = append(names, ent.Name())
		}
		return fmt.Errorf("image cache holds %d trees, want 1: %v", len(entries), names)
	}
	return nil
}

// benchTreeDiff compares two directory trees by their entries' names,
// types, sizes of regular files and symlink targets.
func benchTreeDiff(a, b string) error {
	list := func(root string) (map[string]string, error) {
		out := map[string]string{}
		err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(root, p)
			fi, err := d.Info()
			if err != nil {
				return err
			}
			desc := fi.Mode().Type().String()
			switch {
			case fi.Mode().IsRegular():
				desc += fmt.Sprintf(" %d", fi.Size())
			case fi.Mode()&os.ModeSymlink != 0:
				t, err := os.Readlink(p)
				if err != nil {
					return err
				}
				desc += " -> " + t
			}
			out[rel] = desc
			return nil
		})
		return out, err
	}
	la, err := list(a)
	if err != nil {
		return err
	}
	lb, err := list(b)
	if err != nil {
		return err
	}
	var diffs []string
	for k, v := range la {
		if lb[k] != v {
			diffs = append(diffs, fmt.Sprintf("%s: %q vs %q", k, v, lb[k]))
		}
	}
	for k, v := range lb {
		if _, ok := la[k]; !ok {
			diffs = append(diffs, fmt.Sprintf("%s: missing vs %q", k, v))
		}
	}
	if len(diffs) > 0 {
		sort.Strings(diffs)
		if len(diffs) > 5 {
			diffs = append(diffs[:5], fmt.Sprintf("and %d more", len(diffs)-5))
		}
		return errors.New(strings.Join(diffs, "; "))
	}
	return nil
}

// benchCountingTransport records the requests it carries.
type benchCountingTransport struct {
	inner http.RoundTripper
	mu    sync.Mutex
	reqs  []string // "METHOD scheme://host/path"
}

func (t *benchCountingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	t.mu.Lock()
	t.reqs = append(t.reqs, req.Method+" "+req.URL.Scheme+"://"+req.URL.Host+req.URL.Path)
	t.mu.Unlock()
	return t.inner.RoundTrip(req)
}

func (t *benchCountingTransport) requests() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]string(nil), t.reqs...)
}

// benchRegistryHead checks a digest at the registry the way the image
// store does for every registry reference, cached or not: a new Puller (so
// a new ping of /v2/) and a HEAD of the manifest.
func benchRegistryHead(ctx context.Context, ref string, tr http.RoundTripper) error {
	r, err := name.ParseReference(ref)
	if err != nil {
		return err
	}
	p, err := remote.NewPuller(remote.WithTransport(tr), remote.WithUserAgent("nomad-driver-sandbox-bench"))
	if err != nil {
		return err
	}
	_, err = p.Head(ctx, r)
	return err
}

// benchRequestKinds sums requests up by method, scheme and path shape,
// e.g. "GET http /v2/ x21, HEAD http manifest x21".
func benchRequestKinds(reqs []string) string {
	n := map[string]int{}
	for _, r := range reqs {
		method, url, _ := strings.Cut(r, " ")
		scheme, rest, _ := strings.Cut(url, "://")
		path := "/"
		if i := strings.Index(rest, "/"); i >= 0 {
			path = rest[i:]
		}
		switch {
		case strings.Contains(path, "/manifests/"):
			path = "manifest"
		case strings.Contains(path, "/blobs/"):
			path = "blob"
		}
		n[method+" "+scheme+" "+path]++
	}
	var out []string
	for k, v := range n {
		out = append(out, fmt.Sprintf("%s x%d", k, v))
	}
	sort.Strings(out)
	return strings.Join(out, ", ")
}
