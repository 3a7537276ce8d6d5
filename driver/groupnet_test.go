package driver

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/nomad/nomad/structs"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/audit"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/netnsrun"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

// allocNet is an allocation network as Nomad's bridge mode makes it (CNI
// bridge plugin): a bridge with the gateway address, and a namespace whose
// eth0 is a veth with its host end on the bridge. Its addresses come from
// the test host's pool, which the host routes to the test server only.
type allocNet struct {
	bridge, netns, hostIf string
	gateway, addr         netip.Addr
}

func ipCmd(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

func newAllocNet(t *testing.T, h *testutil.NetHost, withIf bool) *allocNet {
	t.Helper()
	p := h.Pool.Addr().As4()
	an := &allocNet{
		bridge:  h.Name("b"),
		netns:   h.Name("b-n"),
		hostIf:  h.Name("ba"),
		gateway: netip.AddrFrom4([4]byte{p[0], p[1], p[2], 1}),
		addr:    netip.AddrFrom4([4]byte{p[0], p[1], p[2], 10}),
	}
	ipCmd(t, "netns", "add", an.netns)
	t.Cleanup(func() {
		for _, c := range [][]string{{"link", "del", an.hostIf}, {"link", "del", an.bridge}} {
			_ = exec.Command("ip", c...).Run()
		}
		if out, err := exec.Command("ip", "netns", "del", an.netns).CombinedOutput(); err != nil {
			t.Errorf("cleanup: ip netns del %s: %v: %s", an.netns, err, out)
		}
	})
	ipCmd(t, "-n", an.netns, "link", "set", "lo", "up")
	if !withIf {
		return an
	}
	ipCmd(t, "link", "add", an.bridge, "type", "bridge")
	ipCmd(t, "addr", "add", an.gateway.String()+"/24", "dev", an.bridge)
	ipCmd(t, "link", "set", an.bridge, "up")
	ipCmd(t, "link", "add", an.hostIf, "type", "veth", "peer", "name", "eth0", "netns", an.netns)
	ipCmd(t, "link", "set", an.hostIf, "master", an.bridge, "up")
	// With a broadcast address, as the CNI bridge plugin sets it.
	ipCmd(t, "-n", an.netns, "addr", "add", an.addr.String()+"/24", "brd", "+", "dev", "eth0")
	ipCmd(t, "-n", an.netns, "link", "set", "eth0", "up")
	ipCmd(t, "-n", an.netns, "route", "add", "default", "via", an.gateway.String())
	return an
}

func (an *allocNet) path() string { return filepath.Join("/run/netns", an.netns) }

// eth0 is the namespace's eth0 as `ip -4 -o addr` and `ip route` show it.
func (an *allocNet) eth0(t *testing.T) string {
	t.Helper()
	a, _ := exec.Command("ip", "-n", an.netns, "-4", "-o", "addr", "show", "dev", "eth0").CombinedOutput()
	r, _ := exec.Command("ip", "-n", an.netns, "-4", "route", "show", "default").CombinedOutput()
	return string(a) + string(r)
}

// groupTask makes cfg a task of the allocation: the group network's
// namespace, and Nomad's mapping of host port 28080 to 8080.
func groupTask(cfg *drivers.TaskConfig, an *allocNet) {
	cfg.NetworkIsolation = &drivers.NetworkIsolationSpec{Mode: drivers.NetIsolationModeGroup, Path: an.path(), Labels: map[string]string{}}
	cfg.Resources.Ports = &structs.AllocatedPorts{{Label: "http", Value: 28080, To: 8080, HostIP: "127.0.0.1"}}
}

// httpGet fetches / from dst, from the root namespace or (ns set) another.
func httpGet(ns string, dst netip.AddrPort) (string, error) {
	var body string
	get := func() error {
		c, err := net.DialTimeout("tcp4", dst.String(), 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := fmt.Fprintf(c, "GET /index.html HTTP/1.0\r\n\r\n"); err != nil {
			return err
		}
		b, err := io.ReadAll(c)
		body = string(b)
		return err
	}
	if ns == "" {
		return body, get()
	}
	return body, netnsrun.In(ns, get)
}

// nodeServices listens on the bridge's gateway and on the node's own
// address (as a Nomad agent bound to 0.0.0.0 would), checks that both answer
// the allocation's namespace before the task starts (the controls), and
// returns probes of them for the sandbox and a check that it reached
// neither.
func nodeServices(t *testing.T, an *allocNet) ([]probe, func(map[string]probeResult)) {
	t.Helper()
	svcs := map[string]*tcpListener{"gateway": listenTCP(t, netip.AddrPortFrom(an.gateway, 0))}
	if node := nodeAddr(t); node.IsValid() {
		svcs["node"] = listenTCP(t, netip.AddrPortFrom(node, 0))
	}
	any4 := netip.MustParsePrefix("0.0.0.0/0")
	var probes []probe
	seen := map[string]int{}
	for name, l := range svcs {
		var body []byte
		err := netnsrun.In(an.path(), func() error {
			c, err := net.DialTimeout("tcp4", l.addr().String(), 2*time.Second)
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(3 * time.Second))
			body, err = io.ReadAll(c)
			return err
		})
		must.NoError(t, err, must.Sprintf("control: %s from the allocation's namespace", l.addr()))
		must.StrContains(t, string(body), "hello from")
		seen[name] = l.from(any4)
		probes = append(probes, probe{name, wgetCmd(l.addr().Addr().String(), int(l.addr().Port()))})
	}
	return probes, func(res map[string]probeResult) {
		t.Helper()
		for name, l := range svcs {
			must.False(t, res[name].ok(), must.Sprintf("the sandbox reached the %s's service %s: %+v", name, l.addr(), res[name]))
			must.Eq(t, seen[name], l.from(any4), must.Sprintf("the %s's service %s saw a connection from the sandbox", name, l.addr()))
		}
	}
}

// TestDriver_GroupNetwork: a task in a bridge-mode group network joins the
// allocation's namespace: its served port answers the host (as Nomad's
// checks do) and a client elsewhere, its egress allowlist holds, a second
// sandbox cannot share the namespace, and the namespace is given back as
// it was, so the task's next run works.
func TestDriver_GroupNetwork(t *testing.T) {
	ee := newEgressEnv(t, nil, []string{"0.0.0.0/0"}, nil)
	h := ee.host
	an := newAllocNet(t, h, true)
	allowed := netip.AddrPortFrom(h.Addr, egTCP1)
	otherPort := netip.AddrPortFrom(h.Addr, egTCP2)
	before := an.eth0(t)
	must.StrContains(t, before, an.addr.String()+"/24")
	services, unreached := nodeServices(t, an)
	probes := append([]probe{
		{"allowed", wgetCmd(h.Addr.String(), egTCP1)},
		{"other-port", wgetCmd(h.Addr.String(), egTCP2)},
		{"resolv", "cat /etc/resolv.conf"},
	}, services...)
	script := "mkdir -p /tmp/www && echo served-from-the-sandbox > /tmp/www/index.html && httpd -p 8080 -h /tmp/www && " + probeScript("", probes)
	cfg, cleanup := ee.task(t, "web", readonlyDefault(TaskConfig{
		Command: "/bin/sh", Args: []string{"-c", script},
		Egress: []string{allowed.String()}, Timeout: "60s",
	}))
	defer cleanup()
	groupTask(cfg, an)
	installEgressProbe(t, cfg)
	ev := ee.events(t, cfg.ID)
	defer ee.startProbing(t, cfg)()
	_, res := probeResults(t, cfg, probes)
	must.True(t, res["allowed"].ok(), must.Sprintf("allowlisted %s: %+v", allowed, res["allowed"]))
	must.False(t, res["other-port"].ok(), must.Sprintf("%s reached: %+v", otherPort, res["other-port"]))
	unreached(res)
	must.StrContains(t, res["resolv"].out, "nameserver "+an.gateway.String())
	must.Positive(t, len(h.Hits(ee.fromPool("tcp", allowed))))
	must.SliceEmpty(t, h.Hits(ee.fromPool("tcp", otherPort)), must.Sprint("the server saw the denied connection"))

	// Inbound: from the host (where Nomad's checks run) and from a client
	// in another namespace, to the served port.
	web := netip.AddrPortFrom(an.addr, 8080)
	var body string
	must.Wait(t, wait.InitialSuccess(wait.ErrorFunc(func() error {
		var err error
		body, err = httpGet("", web)
		return err
	}), wait.Timeout(egDeadline), wait.Gap(100*time.Millisecond)))
	must.StrContains(t, body, "served-from-the-sandbox")
	body, err := httpGet(h.ClientNetns, web)
	must.NoError(t, err, must.Sprint("from the client namespace"))
	must.StrContains(t, body, "served-from-the-sandbox")

	msg := ev.waitWithin(t, "Egress denied", egDeadline)
	must.StrContains(t, msg, otherPort.String())

	// A second sandbox in the same group network is refused, clearly.
	cfg2, cleanup2 := ee.task(t, "sidecar", readonlyDefault(TaskConfig{Command: "/bin/true"}))
	defer cleanup2()
	groupTask(cfg2, an)
	_, _, err = ee.harness.StartTask(cfg2)
	must.ErrorContains(t, err, "one sandbox task at a time")

	ee.finish(t, cfg)
	must.Eq(t, before, an.eth0(t), must.Sprint("the allocation's eth0 after the task"))
	_, err = os.Stat(an.path())
	must.NoError(t, err)

	// The task's next run (Nomad restarts it in the same namespace).
	cfg3, cleanup3 := ee.task(t, "web-again", readonlyDefault(TaskConfig{
		Command: "/bin/sh", Args: []string{"-c", wgetCmd(h.Addr.String(), egTCP1)},
		Egress: []string{allowed.String()}, Timeout: "60s",
	}))
	defer cleanup3()
	groupTask(cfg3, an)
	_, _, err = ee.harness.StartTask(cfg3)
	must.NoError(t, err)
	r := ee.wait(cfg3.ID, egDeadline)
	must.Eq(t, 0, r.ExitCode, must.Sprintf("second run: %s %s", readLog(cfg3, "stdout"), readLog(cfg3, "stderr")))
	must.NoError(t, ee.harness.DestroyTask(cfg3.ID, true))
	ee.assertNoNetworkLeft(t)
	must.Eq(t, before, an.eth0(t))
}

// TestDriver_GroupNetworkNodeLaterAddress: in bridge mode, addresses
// Nomad's bridge gains after the sandbox attached (as a gateway does when
// its bridge is made or renumbered) are no destination either.
func TestDriver_GroupNetworkNodeLaterAddress(t *testing.T) {
	ee := newEgressEnv(t, nil, []string{"0.0.0.0/0", "*.late.test"}, func(h *testutil.NetHost) map[string]netip.Addr {
		byCIDR, byGrant := h.Spare[0], h.Spare[1]
		return map[string]netip.Addr{"grant.late.test": byGrant, "node.late.test": byCIDR}
	})
	an := newAllocNet(t, ee.host, true)
	checkNodeLaterAddress(t, ee, an, an.bridge)
}

// TestDriver_GroupNetworkNoEgress: in a bridge-mode group without egress
// the task serves its port and reaches nothing.
func TestDriver_GroupNetworkNoEgress(t *testing.T) {
	ee := newEgressEnv(t, nil, []string{"0.0.0.0/0"}, nil)
	h := ee.host
	an := newAllocNet(t, h, true)
	services, unreached := nodeServices(t, an)
	probes := append([]probe{{"server", wgetCmd(h.Addr.String(), egTCP1)}}, services...)
	script := "mkdir -p /tmp/www && echo quiet-sandbox > /tmp/www/index.html && httpd -p 8080 -h /tmp/www && " + probeScript("", probes)
	cfg, cleanup := ee.task(t, "web", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", script}, Timeout: "60s"}))
	defer cleanup()
	groupTask(cfg, an)
	defer ee.startProbing(t, cfg)()
	out := waitLog(t, cfg, "stdout", has("probes-done"))
	res := parseProbes(t, out, probes)
	must.False(t, res["server"].ok(), must.Sprintf("reached the server without egress: %+v", res["server"]))
	unreached(res)
	must.SliceEmpty(t, h.Hits(ee.fromPool("tcp", netip.AddrPort{})))
	body, err := httpGet("", netip.AddrPortFrom(an.addr, 8080))
	must.NoError(t, err)
	must.StrContains(t, body, "quiet-sandbox")
	ee.finish(t, cfg)
}

// TestDriver_GroupNetworkNone: Nomad's mode "none" gives a namespace with
// loopback only; the sandbox has loopback only, and egress is refused.
func TestDriver_GroupNetworkNone(t *testing.T) {
	ee := newEgressEnv(t, nil, []string{"0.0.0.0/0"}, nil)
	an := newAllocNet(t, ee.host, false)
	cfg, cleanup := ee.task(t, "none", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c",
		`echo "links: $(ip -o link | awk -F': ' '{print $2}' | tr '\n' ' ')"`}}))
	defer cleanup()
	cfg.NetworkIsolation = &drivers.NetworkIsolationSpec{Mode: drivers.NetIsolationModeGroup, Path: an.path()}
	_, _, err := ee.harness.StartTask(cfg)
	must.NoError(t, err)
	r := ee.wait(cfg.ID, egDeadline)
	must.Eq(t, 0, r.ExitCode)
	out := waitLog(t, cfg, "stdout", has("links:"))
	must.StrContains(t, out, "links: lo \n")
	must.NoError(t, ee.harness.DestroyTask(cfg.ID, true))
	recs := readAudit(t, ee.audit)[cfg.ID]
	must.SliceNotEmpty(t, recs)
	for _, r := range recs {
		must.Eq(t, "none", r.Policy.Network, must.Sprintf("the audit record of %s", r.Event))
	}

	cfg2, cleanup2 := ee.task(t, "none-egress", readonlyDefault(TaskConfig{Command: "/bin/true", Egress: []string{"10.0.0.1:443"}}))
	defer cleanup2()
	cfg2.NetworkIsolation = &drivers.NetworkIsolationSpec{Mode: drivers.NetIsolationModeGroup, Path: an.path()}
	_, _, err = ee.harness.StartTask(cfg2)
	must.ErrorContains(t, err, `network mode "none"`)
	ee.assertNoNetworkLeft(t)
}

// TestDriver_HostNetwork: a host-mode network block (seen as ports without
// a namespace) is refused unless allow_host_network, naming the setting;
// allowed, the sandbox sees the node's interfaces, and egress is refused.
func TestDriver_HostNetwork(t *testing.T) {
	hostPorts := func(cfg *drivers.TaskConfig) {
		cfg.Resources.Ports = &structs.AllocatedPorts{{Label: "http", Value: 28081, HostIP: "127.0.0.1"}}
	}
	links := `echo "links: $(ip -o link | awk -F': ' '{print $2}' | tr '\n' ' ')"`

	t.Run("refused by default", func(t *testing.T) {
		e := newTestEnv(t, nil)
		cfg, cleanup := e.task(t, "host", readonlyDefault(TaskConfig{Command: "/bin/true"}))
		defer cleanup()
		hostPorts(cfg)
		_, _, err := e.harness.StartTask(cfg)
		must.ErrorContains(t, err, "allow_host_network")
		must.ErrorContains(t, err, "http (28081)")
		entries, _ := os.ReadDir(e.config.StateDir)
		must.SliceEmpty(t, entries, must.Sprint("a refused task left state"))

		cfg2, cleanup2 := e.task(t, "host-dns", readonlyDefault(TaskConfig{Command: "/bin/true"}))
		defer cleanup2()
		cfg2.DNS = &drivers.DNSConfig{Servers: []string{"192.0.2.53"}}
		_, _, err = e.harness.StartTask(cfg2)
		must.ErrorContains(t, err, "allow_host_network")
	})

	t.Run("allowed by the operator", func(t *testing.T) {
		e := newTestEnv(t, func(pc *PluginConfig) {
			pc.AllowHostNetwork = true
			pc.AllowedEgress = []string{"0.0.0.0/0"}
		})
		ifs, err := net.Interfaces()
		must.NoError(t, err)
		var hostIf string
		for _, i := range ifs {
			if i.Flags&net.FlagLoopback == 0 && i.Flags&net.FlagUp != 0 {
				hostIf = i.Name
				break
			}
		}
		if hostIf == "" {
			t.Skip("the node has no interface but loopback")
		}
		cfg, cleanup := e.task(t, "host", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", links}}))
		defer cleanup()
		hostPorts(cfg)
		_, _, err = e.harness.StartTask(cfg)
		must.NoError(t, err)
		r := e.wait(cfg.ID, egDeadline)
		must.Eq(t, 0, r.ExitCode, must.Sprint(readLog(cfg, "stderr")))
		out := waitLog(t, cfg, "stdout", has("links:"))
		must.StrContains(t, out, " "+hostIf+" ", must.Sprintf("the node's %s is not visible: %s", hostIf, out))
		must.NoError(t, e.harness.DestroyTask(cfg.ID, true))

		cfg2, cleanup2 := e.task(t, "host-egress", readonlyDefault(TaskConfig{Command: "/bin/true", Egress: []string{"10.0.0.1:443"}}))
		defer cleanup2()
		hostPorts(cfg2)
		_, _, err = e.harness.StartTask(cfg2)
		must.ErrorContains(t, err, "egress cannot be enforced in host network mode")
	})
}

// TestDriver_GroupNetworkRecover: the plugin restarts while a bridge-mode
// task runs. The new plugin serves the task's DNS again (a new port, the
// redirect moved to it): an allowlisted name resolves and connects, a name
// outside the allowlist is refused without reaching the upstream, and the
// namespace is given back when the task ends.
func TestDriver_GroupNetworkRecover(t *testing.T) {
	ee := newEgressEnv(t, nil, []string{"*.allowed.test:8081"}, func(h *testutil.NetHost) map[string]netip.Addr {
		return map[string]netip.Addr{"api.allowed.test": h.Extra, "secret.exfil.test": h.Addr}
	})
	h := ee.host
	an := newAllocNet(t, h, true)
	before := an.eth0(t)
	probes := []probe{
		{"name-allowed", wgetCmd("api.allowed.test", egTCP2)},
		{"name-refused", "nslookup secret.exfil.test " + an.gateway.String()},
	}
	cfg, cleanup := ee.task(t, "recover", readonlyDefault(TaskConfig{
		// A name refused before the restart, which the audit record keeps.
		Command: "/bin/sh", Args: []string{"-c", "nslookup before.exfil.test " + an.gateway.String() + "; " + probeScript("go", probes)},
		Egress: []string{"api.allowed.test:8081"}, Timeout: "60s",
	}))
	defer cleanup()
	groupTask(cfg, an)
	handle, _, err := ee.harness.StartTask(cfg)
	must.NoError(t, err)
	defer func() {
		release(cfg, "go", "finish")
		_ = ee.driver.DestroyTask(cfg.ID, true)
	}()
	waitLog(t, cfg, "stdout", has("ready"))
	ee.waitNetRecord(t, cfg, nil, []string{"before.exfil.test"})

	ee.driver.Shutdown() // the DNS service of the old plugin goes with it
	fresh := ee.newDriver()
	ee.driver = fresh
	must.NoError(t, fresh.RecoverTask(handle))
	touch(t, cfg, "go")
	_, res := probeResults(t, cfg, probes)
	must.True(t, res["name-allowed"].ok(), must.Sprintf("allowlisted name after the restart: %+v", res["name-allowed"]))
	must.StrContains(t, res["name-allowed"].out, "hello from "+netip.AddrPortFrom(h.Extra, egTCP2).String())
	must.False(t, res["name-refused"].ok() && strings.Contains(res["name-refused"].out, h.Addr.String()),
		must.Sprintf("a name outside the allowlist resolved: %+v", res["name-refused"]))
	must.Eq(t, 0, ee.dns.Queries("secret.exfil.test"))
	must.Positive(t, ee.dns.Queries("api.allowed.test"))
	ee.waitNetRecord(t, cfg, nil, []string{"before.exfil.test", "secret.exfil.test"})

	touch(t, cfg, "finish")
	ch, err := fresh.WaitTask(t.Context(), cfg.ID)
	must.NoError(t, err)
	select {
	case r := <-ch:
		must.Eq(t, 0, r.ExitCode)
	case <-time.After(egDeadline):
		t.Fatal("recovered task did not report its exit")
	}
	must.NoError(t, fresh.DestroyTask(cfg.ID, true))
	ee.assertNoNetworkLeft(t)
	must.Eq(t, before, an.eth0(t))
	var refused map[string]int
	for _, r := range readAudit(t, ee.audit)[cfg.ID] {
		if r.Event == audit.EventExited {
			refused = r.RefusedDNS
		}
	}
	must.Positive(t, refused["before.exfil.test"], must.Sprintf("refused before the restart, missing from the exit record: %v", refused))
	must.Positive(t, refused["secret.exfil.test"], must.Sprintf("refused after the restart, missing from the exit record: %v", refused))
}
