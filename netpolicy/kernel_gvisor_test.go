package netpolicy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
	"golang.org/x/sys/unix"
)

// TestKernelGVisor runs a gVisor sandbox (runsc --network=sandbox, as the
// driver runs it) in a namespace made by Create: gVisor's own network stack
// sends through eth0, and the host end's filter decides.
func TestKernelGVisor(t *testing.T) {
	ktRequireRoot(t)
	runsc := testutil.Runsc(t)
	srv := ktStartServer(t)
	m := ktManager(t, "", nil)
	const id = "alloc-9/task-gvisor"
	sb := ktCreate(t, m, id, ktEntries(t, netip.AddrPortFrom(srv.Addr, ktTCP1).String()))
	// A service on the gateway's DNS port (TCP, so that busybox nc can
	// show it answers).
	ln, err := net.Listen("tcp4", netip.AddrPortFrom(sb.Gateway, 53).String())
	ktMust(t, err)
	t.Cleanup(func() { ln.Close() })
	go testutil.ServeLines(ln)

	dir := t.TempDir()
	root := filepath.Join(dir, "runsc")
	t.Cleanup(func() {
		// runsc keeps an empty network namespace mounted in its root.
		for i := 0; i < 64; i++ {
			if err := unix.Unmount(filepath.Join(root, "null-netns"), unix.MNT_DETACH); err != nil {
				break
			}
		}
	})
	rootfs := testutil.MakeRootfs(t, filepath.Join(dir, "rootfs"))
	checks := []struct {
		name string
		dst  netip.AddrPort
		want string // greeting expected, "" for none
	}{
		{"allowed port", netip.AddrPortFrom(srv.Addr, ktTCP1), "hello " + srv.HostAddr.String()},
		{"other port", netip.AddrPortFrom(srv.Addr, ktTCP2), ""},
		{"gateway DNS port", netip.AddrPortFrom(sb.Gateway, 53), "hello " + sb.Addr.Addr().String()},
		{"metadata address", netip.AddrPortFrom(netip.MustParseAddr("169.254.169.254"), ktTCP1), ""},
	}
	var script strings.Builder
	for i, c := range checks {
		fmt.Fprintf(&script, "echo x | nc -w 2 %s %d; echo '#%d'\n", c.dst.Addr(), c.dst.Port(), i)
	}
	spec := map[string]any{
		"ociVersion": "1.0.2",
		"process": map[string]any{
			"args": []string{"/bin/sh", "-c", script.String()},
			"cwd":  "/", "env": []string{"PATH=/bin"},
			"user": map[string]any{"uid": 0, "gid": 0},
		},
		"root": map[string]any{"path": rootfs, "readonly": true},
		"linux": map[string]any{"namespaces": []map[string]any{
			{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
			{"type": "network", "path": sb.Netns},
		}},
	}
	b, err := json.Marshal(spec)
	ktMust(t, err)
	ktMust(t, os.WriteFile(filepath.Join(dir, "config.json"), b, 0o600))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, runsc, "--root", root, "--network=sandbox", "run", "--bundle", dir, "netpolicy-gvisor").CombinedOutput()
	exec.Command(runsc, "--root", root, "delete", "--force", "netpolicy-gvisor").Run()
	t.Logf("sandbox output:\n%s", out)
	if err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("runsc: %v", err)
		}
	}
	text := string(out)
	for i, c := range checks {
		end := strings.Index(text, fmt.Sprintf("#%d\n", i))
		if end < 0 {
			t.Fatalf("no output for %s", c.name)
		}
		seg := text[:end]
		text = text[end:]
		got := strings.Contains(seg, "hello ")
		switch {
		case c.want != "" && !strings.Contains(seg, c.want):
			t.Errorf("%s (%s): got %q, want %q", c.name, c.dst, seg, c.want)
		case c.want == "" && got:
			t.Errorf("%s (%s) answered: %q", c.name, c.dst, seg)
		}
	}
	d, err := m.Denials(id)
	ktMust(t, err)
	for _, c := range checks {
		if c.want == "" && d[c.dst.String()+"/tcp"] == 0 {
			t.Errorf("denials %v lack %s", d, c.dst)
		}
	}
	// gVisor's own ARP and IPv4 carry the sandbox's MAC and address: the
	// anti-spoofing rules let them through.
	cs := ktCounters(t, m, id)
	t.Logf("denials %v, counters %+v", d, cs)
	if cs.Spoofed != 0 {
		t.Errorf("gVisor's traffic counted as spoofed: %+v", cs)
	}
}
