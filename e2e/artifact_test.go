//go:build e2e

package e2e

import (
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/shoenig/test/must"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

// serveFiles serves name -> content on loopback for the agent's artifact
// fetcher and returns the base URL.
func serveFiles(t *testing.T, files map[string][]byte) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must.NoError(t, err)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, ok := files[strings.TrimPrefix(r.URL.Path, "/")]
		if !ok {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write(b)
	}))
	srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	t.Cleanup(srv.Close)
	return srv.URL
}

// A root filesystem full of symbolic links (busybox's applets) reaches the
// sandbox intact as an oci-archive fetched by an artifact block, which is
// how the README tells jobs to deliver one; the same tree unpacked by the
// artifact fetcher as a plain tarball has its links turned into empty files,
// and the start fails saying so and what to do instead.
func TestArtifactRootfs(t *testing.T) {
	defer catchPanic(t)
	rootfs := testutil.MakeRootfs(t, filepath.Join(t.TempDir(), "rootfs"))
	base := serveFiles(t, map[string][]byte{
		"busybox-oci.tar": testutil.OCIArchive(t, testutil.BusyboxImage(t, v1.Config{})),
		"rootfs.tar":      testutil.TarDir(t, rootfs),
	})

	t.Run("oci-archive", func(t *testing.T) {
		defer catchPanic(t)
		spec := &jobSpec{
			Name: jobName(t), Type: "batch", Task: "main", KillTimeout: "20s",
			Command: "/bin/sh",
			// ls and echo are applet links to busybox.
			Args: []string{"-c", "ls /bin/ls >/dev/null && echo image-from-artifact-ok"},
			TaskBlocks: []string{
				`artifact {`,
				`  source      = "` + base + `/busybox-oci.tar"`,
				`  destination = "local/busybox-oci.tar"`,
				`  mode        = "file"`,
				`  options { archive = "false" }`,
				`}`,
			},
			ExtraConfig: []string{`image = "oci-archive:local/busybox-oci.tar"`},
		}
		j := runJob(t, spec)
		a, ts := j.waitDone(t)
		must.Eq(t, "complete", a.ClientStatus, must.Sprint(ts))
		must.Eq(t, 0, exitCodeOf(t, ts))
		j.waitLogs(t, false, "image-from-artifact-ok")
	})

	t.Run("unpacked-tarball", func(t *testing.T) {
		defer catchPanic(t)
		spec := &jobSpec{
			Name: jobName(t), Type: "batch", Task: "main", KillTimeout: "20s",
			Rootfs: "local/rootfs", Command: "/bin/sh", Args: []string{"-c", "echo should-not-run"},
			TaskBlocks: []string{
				`artifact {`,
				`  source      = "` + base + `/rootfs.tar"`,
				`  destination = "local/rootfs"`,
				`}`,
			},
		}
		j := runJob(t, spec)
		a, ts := j.waitDone(t)
		must.Eq(t, "failed", a.ClientStatus, must.Sprint(ts))
		var why string
		for _, e := range ts.Events {
			if strings.Contains(e.text(), "empty file") {
				why = e.text()
			}
		}
		must.StrContains(t, why, "/bin/sh", must.Sprintf("no event says the shell is an empty file; task: %s", ts))
		must.StrContains(t, why, "oci-archive:")
		must.StrNotContains(t, j.logs(t, false), "should-not-run")
	})
}
