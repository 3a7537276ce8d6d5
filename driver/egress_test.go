package driver

// Egress allowlists seen from inside real sandboxes. Each test makes a test
// host (internal/testutil.NetHost): a server in a namespace of its own, with
// the sandbox pool routed to it by a policy rule, so that a broken filter
// lets traffic reach the test server (and the test notices) but never the
// uplink. Positive controls from a client namespace routed like the pool
// show that every service the sandbox must not reach does answer.

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	goruntime "runtime"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/netpolicy"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

// TestDriver_EgressAllowlist: an allowlisted address and port (TCP and UDP)
// answers from inside the sandbox; another port of the same host, another
// host, UDP to another host and ICMP do not, the server never sees them, and
// the denials show up in Manager.Denials, a task event, network.json and the
// audit exit record. Nothing of the network outlives the task.
func TestDriver_EgressAllowlist(t *testing.T) {
	ee := newEgressEnv(t, nil, []string{"0.0.0.0/0", "0.0.0.0/0/udp", "::/0"}, nil)
	h := ee.host
	allowed := netip.AddrPortFrom(h.Addr, egTCP1)
	otherPort := netip.AddrPortFrom(h.Addr, egTCP2)
	otherHost := netip.AddrPortFrom(h.Other, egTCP1)
	udpAllowed := netip.AddrPortFrom(h.Addr, egUDP)
	udpDenied := netip.AddrPortFrom(h.Other, egUDP)

	// Controls: everything the sandbox must not reach answers a client
	// routed as the pool is.
	for _, a := range []netip.AddrPort{otherPort, otherHost} {
		body, err := h.ClientGet(a)
		must.NoError(t, err, must.Sprintf("control: %s", a))
		must.StrContains(t, body, "hello from "+a.String())
	}
	r, err := h.ClientUDP(udpDenied)
	must.NoError(t, err, must.Sprint("control: UDP"))
	must.StrContains(t, r, "echo from")
	must.NoError(t, h.ClientPing(h.Other), must.Sprint("control: ping"))
	must.NoError(t, h.ClientPing(h.Addr), must.Sprint("control: ping"))

	probes := []probe{
		{"allowed", wgetCmd(h.Addr.String(), egTCP1)},
		{"other-port", wgetCmd(h.Addr.String(), egTCP2)},
		{"other-host", wgetCmd(h.Other.String(), egTCP1)},
		{"udp-allowed", udpCmd(h.Addr, egUDP)},
		{"udp-denied", udpCmd(h.Other, egUDP)},
		{"ping-loopback", pingCmd(netip.MustParseAddr("127.0.0.1"))},
		{"ping-other", pingCmd(h.Other)},
		{"ping-allowed-host", pingCmd(h.Addr)},
	}
	cfg, cleanup := ee.task(t, "egress-allow", readonlyDefault(TaskConfig{
		Command: "/bin/sh", Args: []string{"-c", probeScript("", probes)},
		Egress:  []string{allowed.String(), udpAllowed.String() + "/udp", "[2001:db8::1]:443"},
		Timeout: "60s",
	}))
	defer cleanup()
	installEgressProbe(t, cfg)
	ev := ee.events(t, cfg.ID)
	_, _, err = ee.harness.StartTask(cfg)
	must.NoError(t, err)
	// An IPv6 entry allows nothing, and the job is told so.
	must.StrContains(t, ev.waitWithin(t, "Egress entries without effect", egDeadline), "[2001:db8::1]:443")
	defer func() {
		release(cfg, "finish")
		_ = ee.harness.DestroyTask(cfg.ID, true) // gone already if the test got to finish
	}()
	_, res := probeResults(t, cfg, probes)

	must.True(t, res["allowed"].ok(), must.Sprintf("allowlisted %s: %+v", allowed, res["allowed"]))
	must.StrContains(t, res["allowed"].out, "hello from "+allowed.String()+" to "+h.HostAddr.String())
	must.True(t, res["udp-allowed"].ok() && strings.Contains(res["udp-allowed"].out, "reply: echo from "+udpAllowed.String()),
		must.Sprintf("allowlisted UDP %s: %+v", udpAllowed, res["udp-allowed"]))
	must.True(t, res["ping-loopback"].ok(), must.Sprintf("ping works inside the sandbox: %+v", res["ping-loopback"]))
	for _, n := range []string{"other-port", "other-host", "ping-other", "ping-allowed-host"} {
		must.False(t, res[n].ok(), must.Sprintf("%s reached: %+v", n, res[n]))
	}
	must.StrNotContains(t, res["udp-denied"].out, "echo from", must.Sprintf("UDP %s answered", udpDenied))
	must.StrNotContains(t, res["other-port"].out+res["other-host"].out, "hello")

	// What reached the server from the sandbox.
	must.Positive(t, len(h.Hits(ee.fromPool("tcp", allowed))))
	must.Positive(t, len(h.Hits(ee.fromPool("udp", udpAllowed))))
	for _, d := range []netip.AddrPort{otherPort, otherHost} {
		must.SliceEmpty(t, h.Hits(ee.fromPool("tcp", d)), must.Sprintf("the server saw a connection to %s", d))
	}
	must.SliceEmpty(t, h.Hits(ee.fromPool("udp", udpDenied)), must.Sprintf("the server saw a datagram to %s", udpDenied))

	wantDenials := []string{
		otherPort.String() + "/tcp", otherHost.String() + "/tcp", udpDenied.String() + "/udp",
		h.Other.String() + "/icmp", h.Addr.String() + "/icmp",
	}
	denials, err := ee.driver.net.Denials(sandboxID(cfg))
	must.NoError(t, err)
	t.Logf("denials: %v", denials)
	for _, k := range wantDenials {
		must.Positive(t, denials[k], must.Sprintf("denial %s missing from %v", k, denials))
	}
	for k := range denials {
		must.False(t, strings.HasPrefix(k, allowed.String()+"/") || strings.HasPrefix(k, udpAllowed.String()+"/"),
			must.Sprintf("allowed traffic counted as denied: %v", denials))
	}

	msg := ev.waitWithin(t, "Egress denied", egDeadline)
	t.Logf("event: %s", msg)
	must.True(t, strings.Contains(msg, otherPort.String()) || strings.Contains(msg, otherHost.String()) || strings.Contains(msg, h.Other.String()),
		must.Sprint("the event names a denied destination"))
	must.StrContains(t, msg, "egress")

	ee.waitNetRecord(t, cfg, wantDenials, nil)
	exit := ee.finish(t, cfg)
	t.Logf("audit exit record: denials %v, refused DNS %v", exit.EgressDenials, exit.RefusedDNS)
	for _, k := range wantDenials {
		must.Positive(t, exit.EgressDenials[k], must.Sprintf("audit record lacks denial %s: %v", k, exit.EgressDenials))
	}
	must.SliceContainsAll(t, []string{allowed.String(), udpAllowed.String() + "/udp", "[2001:db8::1]:443"}, exit.Policy.Egress)
}

// TestDriver_EgressNames: a host name in the allowlist is resolved through
// the sandbox's DNS service by the upstream and connects, on its port only;
// a name outside the allowlist is REFUSED and never reaches the upstream;
// allowlisted names whose upstream answer is loopback, the metadata address
// or the node's own address, or private space allowed_egress does not
// name, resolve to nothing reachable.
func TestDriver_EgressNames(t *testing.T) {
	node := nodeAddr(t)
	// A service on the node's own address, so that reaching it would show.
	var nodeLn *tcpListener
	port := egTCP1
	if node.IsValid() {
		nodeLn = listenTCP(t, netip.AddrPortFrom(node, 0))
		port = int(nodeLn.addr().Port())
	}
	ee := newEgressEnv(t, []uint16{uint16(port), 53, 853}, []string{"*.allowed.test:8081", fmt.Sprintf("*.rebind.test:%d", port)},
		func(h *testutil.NetHost) map[string]netip.Addr {
			m := map[string]netip.Addr{
				"api.allowed.test":  h.Extra,
				"secret.exfil.test": h.Addr, // would connect if it were resolved
				"lo.rebind.test":    netip.MustParseAddr("127.0.0.1"),
				"meta.rebind.test":  h.Metadata,
				// Private space allowed_egress does not name.
				"priv.rebind.test": h.Other,
			}
			if node.IsValid() {
				m["node.rebind.test"] = node
			}
			return m
		})
	h := ee.host
	// Another resolver over TCP/53 and DNS-over-TLS (853): the test host
	// serves both (the controls); the sandbox reaches neither.
	otherDNS := []netip.AddrPort{netip.AddrPortFrom(h.Addr, 53), netip.AddrPortFrom(h.Addr, 853)}
	for _, a := range otherDNS {
		_, err := h.ClientGet(a)
		must.NoError(t, err, must.Sprintf("control: %s", a))
	}
	meta := netip.AddrPortFrom(h.Metadata, uint16(port))
	body, err := h.ClientGet(meta)
	must.NoError(t, err, must.Sprint("control: metadata address"))
	must.StrContains(t, body, "hello from "+meta.String())
	if nodeLn != nil {
		body, err := h.ClientGet(nodeLn.addr())
		must.NoError(t, err, must.Sprint("control: node address"))
		must.StrContains(t, body, "hello from")
	} else {
		t.Log("no node address outside the test ranges: node.rebind.test not checked")
	}

	probes := []probe{
		{"lookup-allowed", "nslookup api.allowed.test"},
		{"get-allowed", wgetCmd("api.allowed.test", egTCP2)},
		{"get-allowed-other-port", wgetCmd("api.allowed.test", egTCP1)},
		{"lookup-refused", "nslookup secret.exfil.test"},
		{"get-refused", wgetCmd("secret.exfil.test", egTCP1)},
		{"lookup-meta", "nslookup meta.rebind.test"},
		{"get-meta", wgetCmd("meta.rebind.test", port)},
		{"get-lo", wgetCmd("lo.rebind.test", port)},
		{"get-priv", wgetCmd("priv.rebind.test", port)},
		{"tcp53-other", wgetCmd(h.Addr.String(), 53)},
		{"dot-other", wgetCmd(h.Addr.String(), 853)},
	}
	rebound := []string{"meta.rebind.test", "lo.rebind.test", "priv.rebind.test"}
	if nodeLn != nil {
		probes = append(probes, probe{"get-node", wgetCmd("node.rebind.test", port)})
		rebound = append(rebound, "node.rebind.test")
	}
	cfg, cleanup := ee.task(t, "egress-names", readonlyDefault(TaskConfig{
		Command: "/bin/sh", Args: []string{"-c", probeScript("", probes)},
		Egress:  []string{"api.allowed.test:8081", fmt.Sprintf("*.rebind.test:%d", port)},
		Timeout: "60s",
	}))
	defer cleanup()
	ev := ee.events(t, cfg.ID)
	_, _, err = ee.harness.StartTask(cfg)
	must.NoError(t, err)
	defer func() {
		release(cfg, "finish")
		_ = ee.harness.DestroyTask(cfg.ID, true) // gone already if the test got to finish
	}()
	_, res := probeResults(t, cfg, probes)

	extra := netip.AddrPortFrom(h.Extra, egTCP2)
	must.StrContains(t, res["lookup-allowed"].out, "Address: "+h.Extra.String())
	must.True(t, res["get-allowed"].ok(), must.Sprintf("allowlisted name: %+v", res["get-allowed"]))
	must.StrContains(t, res["get-allowed"].out, "hello from "+extra.String())
	must.Positive(t, len(h.Hits(ee.fromPool("tcp", extra))))
	must.Positive(t, ee.dns.Queries("api.allowed.test"), must.Sprint("the upstream answered the allowlisted name"))
	must.False(t, res["get-allowed-other-port"].ok(), must.Sprintf("the name's address on another port: %+v", res["get-allowed-other-port"]))

	must.StrContains(t, res["lookup-refused"].out, "REFUSED")
	must.False(t, res["get-refused"].ok())
	must.Eq(t, 0, ee.dns.Queries("secret.exfil.test"), must.Sprint("a name outside the allowlist reached the upstream"))
	must.SliceEmpty(t, h.Hits(ee.fromPool("tcp", netip.AddrPortFrom(h.Addr, egTCP1))))

	must.StrNotContains(t, res["lookup-meta"].out, "Address: "+h.Metadata.String())
	for _, n := range []string{"get-meta", "get-lo", "get-node", "get-priv", "tcp53-other", "dot-other"} {
		if r, ok := res[n]; ok {
			must.False(t, r.ok(), must.Sprintf("%s reached: %+v", n, r))
			must.StrNotContains(t, r.out, "hello")
		}
	}
	must.Positive(t, ee.dns.Queries("meta.rebind.test"), must.Sprint("the upstream was asked: the answer is what is refused"))
	must.SliceEmpty(t, h.Hits(ee.fromPool("tcp", meta)))
	must.SliceEmpty(t, h.Hits(ee.fromPool("tcp", netip.AddrPortFrom(h.Other, uint16(port)))))
	for _, a := range otherDNS {
		must.SliceEmpty(t, h.Hits(ee.fromPool("tcp", a)), must.Sprintf("the sandbox reached %s", a))
	}
	if nodeLn != nil {
		must.Eq(t, 0, nodeLn.from(h.Pool), must.Sprint("a sandbox reached the node's own address"))
	}

	msg := ev.waitWithin(t, "Egress denied", egDeadline)
	t.Logf("event: %s", msg)
	// The first event lists what was refused by its time: the names (DNS
	// refusals come first, no timeout) or the address on the wrong port.
	must.True(t, strings.Contains(msg, "DNS secret.exfil.test") || strings.Contains(msg, h.Extra.String()+":"), must.Sprint(msg))
	ee.waitNetRecord(t, cfg, nil, append([]string{"secret.exfil.test"}, rebound...))
	exit := ee.finish(t, cfg)
	t.Logf("audit exit record: denials %v, refused DNS %v", exit.EgressDenials, exit.RefusedDNS)
	for _, n := range append([]string{"secret.exfil.test"}, rebound...) {
		must.Positive(t, exit.RefusedDNS[n], must.Sprintf("audit record lacks refused name %s: %v", n, exit.RefusedDNS))
	}
	// The extra address was granted for 8081 only.
	must.Positive(t, exit.EgressDenials[netip.AddrPortFrom(h.Extra, egTCP1).String()+"/tcp"], must.Sprint(exit.EgressDenials))
}

// TestDriver_EgressDenyListWins: the metadata address, the node's own
// address, private space the ceiling does not name (0.0.0.0/0 does not)
// and a service on the sandbox's gateway other than DNS stay unreachable
// although the task lists them in its egress, within the ceiling; an
// ordinary allowlisted address answers in the same sandbox.
func TestDriver_EgressDenyListWins(t *testing.T) {
	node := nodeAddr(t)
	var nodeLn *tcpListener
	if node.IsValid() {
		nodeLn = listenTCP(t, netip.AddrPortFrom(node, 0))
	}
	ee := newEgressEnv(t, nil, []string{"0.0.0.0/0"}, nil)
	h := ee.host
	// The gateway listener reuses the node listener's port (free on every
	// address, since nothing listens on it on all of them) or takes one.
	gwPort := uint16(0)
	if nodeLn != nil {
		gwPort = nodeLn.addr().Port()
	} else {
		gwPort = freePort(t)
	}
	allowed := netip.AddrPortFrom(h.Addr, egTCP1)
	metaHTTP := netip.AddrPortFrom(h.Metadata, egHTTP)
	metaAlt := netip.AddrPortFrom(h.Metadata, egTCP1)
	// Private space: 0.0.0.0/0 in allowed_egress does not name it.
	private := netip.AddrPortFrom(h.Other, egTCP1)
	egress := []string{allowed.String(), metaHTTP.String(), metaAlt.String(), private.String(),
		fmt.Sprintf("%s:%d", h.Pool, gwPort)}
	if nodeLn != nil {
		egress = append(egress, nodeLn.addr().String())
	} else {
		t.Log("no node address outside the test ranges: not checked")
	}
	for _, a := range []netip.AddrPort{metaHTTP, metaAlt, private} {
		body, err := h.ClientGet(a)
		must.NoError(t, err, must.Sprintf("control: %s", a))
		must.StrContains(t, body, "hello from "+a.String())
	}
	if nodeLn != nil {
		_, err := h.ClientGet(nodeLn.addr())
		must.NoError(t, err, must.Sprint("control: node address"))
	}

	// The gateway is known once the sandbox's network exists: the task
	// waits for the test's listener there before it probes.
	probes := []probe{
		{"allowed", wgetCmd(h.Addr.String(), egTCP1)},
		{"metadata-80", wgetCmd(h.Metadata.String(), egHTTP)},
		{"metadata-8080", wgetCmd(h.Metadata.String(), egTCP1)},
		{"private", wgetCmd(h.Other.String(), egTCP1)},
		// IPv4-mapped, 6to4 and NAT64 forms of the metadata address.
		{"mapped-metadata", wgetCmd("[::ffff:"+h.Metadata.String()+"]", egHTTP)},
		{"6to4-metadata", wgetCmd("[2002:a9fe:a9fe::1]", egHTTP)},
		{"nat64-metadata", wgetCmd("[64:ff9b::a9fe:a9fe]", egHTTP)},
		// The gateway is the sandbox's nameserver.
		{"gateway", wgetCmd("$(awk '/^nameserver/ {print $2; exit}' /etc/resolv.conf)", int(gwPort))},
	}
	if nodeLn != nil {
		probes = append(probes, probe{"node", wgetCmd(node.String(), int(nodeLn.addr().Port()))})
	}
	cfg, cleanup := ee.task(t, "egress-deny", readonlyDefault(TaskConfig{
		Command: "/bin/sh", Args: []string{"-c", probeScript("go", probes)},
		Egress:  egress,
		Timeout: "60s",
	}))
	defer cleanup()
	defer ee.startProbing(t, cfg, "go")()
	waitLog(t, cfg, "stdout", has("ready"))
	sb, err := ee.driver.net.Get(sandboxID(cfg))
	must.NoError(t, err)
	gw := listenTCP(t, netip.AddrPortFrom(sb.Gateway, gwPort))
	body, err := h.ClientGet(gw.addr())
	must.NoError(t, err, must.Sprint("control: gateway listener"))
	must.StrContains(t, body, "hello from")
	touch(t, cfg, "go")

	out := waitLog(t, cfg, "stdout", has("probes-done"))
	t.Logf("inside the sandbox (gateway %s):\n%s", sb.Gateway, out)
	res := parseProbes(t, out, probes)
	must.True(t, res["allowed"].ok(), must.Sprintf("allowlisted %s: %+v", allowed, res["allowed"]))
	must.StrContains(t, res["allowed"].out, "hello from "+allowed.String())
	for _, p := range probes[1:] {
		must.False(t, res[p.name].ok(), must.Sprintf("%s reached: %+v", p.name, res[p.name]))
		must.StrNotContains(t, res[p.name].out, "hello")
	}
	must.SliceEmpty(t, h.Hits(ee.fromPool("tcp", metaHTTP)))
	must.SliceEmpty(t, h.Hits(ee.fromPool("tcp", metaAlt)))
	must.SliceEmpty(t, h.Hits(ee.fromPool("tcp", private)))
	must.Eq(t, 0, gw.from(h.Pool), must.Sprint("a sandbox reached its gateway beyond DNS"))
	wantDenials := []string{metaHTTP.String() + "/tcp", metaAlt.String() + "/tcp", private.String() + "/tcp", netip.AddrPortFrom(sb.Gateway, gwPort).String() + "/tcp"}
	if nodeLn != nil {
		must.Eq(t, 0, nodeLn.from(h.Pool), must.Sprint("a sandbox reached the node's own address"))
		wantDenials = append(wantDenials, nodeLn.addr().String()+"/tcp")
	}
	denials, err := ee.driver.net.Denials(sandboxID(cfg))
	must.NoError(t, err)
	t.Logf("denials: %v", denials)
	for _, k := range wantDenials {
		must.Positive(t, denials[k], must.Sprintf("denial %s missing from %v", k, denials))
	}
	ee.finish(t, cfg)
}

// TestDriver_EgressDeniedEgress: the plugin's denied_egress reaches the
// filter through SetConfig. The operator's allowed_egress names both server
// addresses and denies one of them, once as an address and once, on the
// other port, through a prefix; the task lists both in its egress, within
// the ceiling: the other address answers, the denied one never sees a
// packet, and the denials are counted.
func TestDriver_EgressDeniedEgress(t *testing.T) {
	ee := newEgressEnvWith(t, nil, []string{"0.0.0.0/0"}, nil, func(pc *PluginConfig, h *testutil.NetHost) {
		pc.DeniedEgress = []string{h.Extra.String(), netip.PrefixFrom(h.Extra, 30).Masked().String()}
	})
	h := ee.host
	allowed := netip.AddrPortFrom(h.Addr, egTCP1)
	denied := netip.AddrPortFrom(h.Extra, egTCP1)
	deniedAlt := netip.AddrPortFrom(h.Extra, egTCP2)
	for _, a := range []netip.AddrPort{denied, deniedAlt} {
		body, err := h.ClientGet(a)
		must.NoError(t, err, must.Sprintf("control: %s", a))
		must.StrContains(t, body, "hello from "+a.String())
	}
	probes := []probe{
		{"allowed", wgetCmd(h.Addr.String(), egTCP1)},
		{"denied", wgetCmd(h.Extra.String(), egTCP1)},
		{"denied-alt", wgetCmd(h.Extra.String(), egTCP2)},
	}
	cfg, cleanup := ee.task(t, "egress-denied", readonlyDefault(TaskConfig{
		Command: "/bin/sh", Args: []string{"-c", probeScript("", probes)},
		Egress:  []string{allowed.String(), denied.String(), deniedAlt.String()},
		Timeout: "60s",
	}))
	defer cleanup()
	defer ee.startProbing(t, cfg)()
	_, res := probeResults(t, cfg, probes)
	must.True(t, res["allowed"].ok(), must.Sprintf("allowlisted %s: %+v", allowed, res["allowed"]))
	must.StrContains(t, res["allowed"].out, "hello from "+allowed.String())
	for _, n := range []string{"denied", "denied-alt"} {
		must.False(t, res[n].ok(), must.Sprintf("%s reached (denied_egress not applied): %+v", n, res[n]))
		must.StrNotContains(t, res[n].out, "hello")
	}
	for _, d := range []netip.AddrPort{denied, deniedAlt} {
		must.SliceEmpty(t, h.Hits(ee.fromPool("tcp", d)), must.Sprintf("the server saw a connection to %s", d))
	}
	want := []string{denied.String() + "/tcp", deniedAlt.String() + "/tcp"}
	ee.waitNetRecord(t, cfg, want, nil)
	ee.finish(t, cfg)
}

// TestDriver_EgressNoneLoopbackOnly: a task without egress, on a node that
// permits egress, gets no network but loopback and no namespace of the
// driver's.
func TestDriver_EgressNoneLoopbackOnly(t *testing.T) {
	e := newTestEnv(t, func(pc *PluginConfig) {
		pc.AllowedEgress = []string{"0.0.0.0/0"}
		pc.DNSServers = []string{"127.0.0.1:1"} // never asked
	})
	script := `echo "links: $(ip -o link | awk -F': ' '{print $2}' | tr '\n' ' ')"; ip -o -4 addr; echo ready; while [ ! -e /alloc/data/finish ]; do sleep 0.05; done`
	cfg, cleanup := e.task(t, "egress-none", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", script}, Timeout: "60s"}))
	defer cleanup()
	_, _, err := e.harness.StartTask(cfg)
	must.NoError(t, err)
	defer func() {
		release(cfg, "finish")
		_ = e.harness.DestroyTask(cfg.ID, true)
	}()
	out := waitLog(t, cfg, "stdout", has("ready"))
	t.Logf("inside the sandbox:\n%s", out)
	must.StrContains(t, out, "links: lo ")
	must.StrNotContains(t, out, "eth0")
	must.StrNotContains(t, out, "10.89.")
	_, err = e.driver.net.Get(sandboxID(cfg))
	must.True(t, errors.Is(err, netpolicy.ErrNotFound), must.Sprintf("a task without egress got a network: %v", err))
	ns, err := exec.Command("ip", "netns", "list").CombinedOutput()
	must.NoError(t, err)
	must.StrNotContains(t, "\n"+string(ns), "\n"+e.netPrefix+"-")
	touch(t, cfg, "finish")
	res := e.wait(cfg.ID, egDeadline)
	must.Eq(t, 0, res.ExitCode)
}

// checkNodeLaterAddress: the node gains two addresses after the plugin
// started and after the sandbox's filter is in place (on dev, or on a test
// veth of its own if dev is empty), and serves on them. The sandbox lists
// one by address, and had the other granted by a DNS answer before it
// became the node's; a third name answers with the first address. None of
// them reaches the node, while an allowlisted destination answers in the
// same sandbox. an, if set, puts the task in that group network.
func checkNodeLaterAddress(t *testing.T, ee *egressEnv, an *allocNet, dev string) {
	h := ee.host
	// Two addresses the node gains while the sandbox runs, outside the
	// private space (so that nothing but the node rule stands in the way).
	byCIDR, byGrant := h.Spare[0], h.Spare[1]
	port := freePort(t)
	allowed := netip.AddrPortFrom(h.Addr, egTCP1)
	probes := []probe{
		{"allowed", wgetCmd(h.Addr.String(), egTCP1)},
		{"by-cidr", wgetCmd(byCIDR.String(), int(port))},
		{"by-grant", wgetCmd(byGrant.String(), int(port))},
		{"by-name", wgetCmd("node.late.test", int(port))},
	}
	// The grant comes first, while its address is nobody's.
	script := "nslookup grant.late.test; " + probeScript("go", probes)
	cfg, cleanup := ee.task(t, "late-addr", readonlyDefault(TaskConfig{
		Command: "/bin/sh", Args: []string{"-c", script},
		Egress:  []string{allowed.String(), fmt.Sprintf("%s:%d", byCIDR, port), fmt.Sprintf("*.late.test:%d", port)},
		Timeout: "60s",
	}))
	defer cleanup()
	if an != nil {
		groupTask(cfg, an)
	}
	defer ee.startProbing(t, cfg, "go")()
	out := waitLog(t, cfg, "stdout", has("ready"))
	must.StrContains(t, out, "Address: "+byGrant.String(), must.Sprint("precondition: the name was granted before the address became the node's"))

	if dev == "" {
		dev = h.Name("la")
		ipCmd(t, "link", "add", dev, "type", "veth", "peer", "name", h.Name("lb"))
		t.Cleanup(func() { _ = exec.Command("ip", "link", "del", dev).Run() })
		ipCmd(t, "link", "set", dev, "up")
	}
	for _, a := range []netip.Addr{byCIDR, byGrant} {
		ipCmd(t, "addr", "add", a.String()+"/32", "dev", dev)
		t.Cleanup(func() { _ = exec.Command("ip", "addr", "del", a.String()+"/32", "dev", dev).Run() })
	}
	var lns []*tcpListener
	for _, a := range []netip.Addr{byCIDR, byGrant} {
		l := listenTCP(t, netip.AddrPortFrom(a, port))
		body, err := h.ClientGet(l.addr())
		must.NoError(t, err, must.Sprintf("control: %s from a client routed like the sandboxes", l.addr()))
		must.StrContains(t, body, "hello from")
		lns = append(lns, l)
	}
	touch(t, cfg, "go")

	out, res := probeResults(t, cfg, probes)
	must.True(t, res["allowed"].ok(), must.Sprintf("allowlisted %s: %+v", allowed, res["allowed"]))
	for _, n := range []string{"by-cidr", "by-grant", "by-name"} {
		must.False(t, res[n].ok(), must.Sprintf("%s reached the node: %+v", n, res[n]))
		must.StrNotContains(t, res[n].out, "hello")
	}
	any4 := netip.MustParsePrefix("0.0.0.0/0")
	for _, l := range lns {
		must.Eq(t, 1, l.from(any4), must.Sprintf("%s saw more than the control's connection", l.addr()))
	}
	denials, err := ee.driver.net.Denials(sandboxID(cfg))
	must.NoError(t, err)
	t.Logf("denials: %v", denials)
	for _, a := range []netip.Addr{byCIDR, byGrant} {
		k := netip.AddrPortFrom(a, port).String() + "/tcp"
		must.Positive(t, denials[k], must.Sprintf("denial %s missing from %v", k, denials))
	}
	ee.waitNetRecord(t, cfg, nil, []string{"node.late.test"})
	ee.finish(t, cfg)
}

// TestDriver_EgressNodeLaterAddress: addresses the node gains after the
// plugin and the sandbox started are never the sandbox's destination, by
// address, by an earlier DNS grant or by a name.
func TestDriver_EgressNodeLaterAddress(t *testing.T) {
	ee := newEgressEnv(t, nil, []string{"0.0.0.0/0", "*.late.test"}, func(h *testutil.NetHost) map[string]netip.Addr {
		byCIDR, byGrant := h.Spare[0], h.Spare[1]
		return map[string]netip.Addr{"grant.late.test": byGrant, "node.late.test": byCIDR}
	})
	checkNodeLaterAddress(t, ee, nil, "")
}

// TestDriver_EgressMaxEntries: a task listing more egress entries than the
// plugin's max_egress_entries (default 256) is refused with an error naming
// the field and the setting, and nothing of a network is made for it.
func TestDriver_EgressMaxEntries(t *testing.T) {
	entries := func(n int) []string {
		var out []string
		for i := 0; i < n; i++ {
			out = append(out, fmt.Sprintf("203.0.113.%d:%d", i%256, 1000+i))
		}
		return out
	}
	for _, tc := range []struct {
		limit, n int
		want     string
	}{
		{0, 257, "max_egress_entries, 256"},
		{3, 4, "max_egress_entries, 3"},
	} {
		e := newTestEnv(t, func(pc *PluginConfig) {
			pc.AllowedEgress = []string{"203.0.113.0/24"}
			pc.MaxEgressEntries = tc.limit
		})
		cfg, cleanup := e.taskWithLogs(t, "many", readonlyDefault(TaskConfig{Command: "/bin/true", Egress: entries(tc.n)}), false)
		_, _, err := e.harness.StartTask(cfg)
		must.Error(t, err)
		must.StrContains(t, err.Error(), "egress lists")
		must.StrContains(t, err.Error(), tc.want)
		_, err = e.driver.net.Get(sandboxID(cfg))
		must.True(t, errors.Is(err, netpolicy.ErrNotFound), must.Sprintf("a refused task got a network: %v", err))
		leases, _ := os.ReadDir(filepath.Join(e.base, "netpolicy", "leases"))
		must.SliceEmpty(t, leases)
		cleanup()
	}
	// At the limit the entries are accepted by the check.
	e := newTestEnv(t, func(pc *PluginConfig) {
		pc.AllowedEgress = []string{"203.0.113.0/24"}
		pc.MaxEgressEntries = 3
	})
	got, err := (&TaskConfig{Egress: entries(3)}).validateEgress(e.driver.config)
	must.NoError(t, err)
	must.Len(t, 3, got)
}

// conntrackFrom counts the node's conntrack entries whose source is a.
func conntrackFrom(t *testing.T, a netip.Addr) int {
	t.Helper()
	b, err := os.ReadFile("/proc/net/nf_conntrack")
	if err != nil {
		t.Skipf("no /proc/net/nf_conntrack: %v", err)
	}
	return strings.Count(string(b), "src="+a.String()+" ")
}

// TestDriver_EgressDNSFlood: one sandbox floods its DNS service with
// hundreds of thousands of queries for unique names, each from a new source
// port, while holding TCP connections to it; a second sandbox keeps
// resolving its allowlisted name all along. Every one of its lookups
// succeeds; the flooder's refused-name record, network.json, audit record,
// conntrack entries and the plugin's heap stay bounded.
func TestDriver_EgressDNSFlood(t *testing.T) {
	const queries, tcpConns = 200000, 64
	ee := newEgressEnv(t, nil, []string{"*.allowed.test:8081", "*.flood.test:8081"}, func(h *testutil.NetHost) map[string]netip.Addr {
		return map[string]netip.Addr{"api.allowed.test": h.Extra}
	})
	gw := "$(awk '/^nameserver/ {print $2; exit}' /etc/resolv.conf)"
	floodCfg, cleanupF := ee.task(t, "flooder", readonlyDefault(TaskConfig{
		Command: "/bin/sh", Args: []string{"-c", fmt.Sprintf(
			"echo ready; while [ ! -e /alloc/data/go ]; do sleep 0.05; done; /local/egress-probe flood %s:53 %d %d; echo flood-done; while [ ! -e /alloc/data/finish ]; do sleep 0.05; done; echo finished",
			gw, queries, tcpConns)},
		// Listed so that the sandbox has a network; never resolved.
		Egress:  []string{"api.allowed.test:8081"},
		Timeout: "300s",
	}))
	defer cleanupF()
	installEgressProbe(t, floodCfg)
	resolverCfg, cleanupR := ee.task(t, "resolver", readonlyDefault(TaskConfig{
		Command: "/bin/sh", Args: []string{"-c", `echo ready; ok=0; fail=0
while [ ! -e /alloc/data/go ]; do sleep 0.05; done
while [ ! -e /alloc/data/stop ]; do
  if nslookup api.allowed.test 2>&1 | grep -q "Address: ` + ee.host.Extra.String() + `"; then ok=$((ok+1)); else fail=$((fail+1)); fi
done
echo "lookups ok=$ok fail=$fail"
while [ ! -e /alloc/data/finish ]; do sleep 0.05; done; echo finished`},
		Egress:  []string{"api.allowed.test:8081"},
		Timeout: "300s",
	}))
	defer cleanupR()
	for _, cfg := range []*drivers.TaskConfig{floodCfg, resolverCfg} {
		defer ee.startProbing(t, cfg, "go", "stop")()
		waitLog(t, cfg, "stdout", has("ready"))
	}
	var before goruntime.MemStats
	goruntime.GC()
	goruntime.ReadMemStats(&before)
	touch(t, floodCfg, "go")
	touch(t, resolverCfg, "go")
	// The flood takes a minute or more (gVisor makes a socket per query);
	// bounded by the task's own timeout and this wait.
	var out string
	must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool {
		out = readLog(floodCfg, "stdout")
		return strings.Contains(out, "flood-done")
	}), wait.Timeout(4*time.Minute), wait.Gap(time.Second)))
	t.Logf("flooder: %s", out)
	must.StrContains(t, out, fmt.Sprintf("sent %d queries", queries))
	sb, err := ee.driver.net.Get(sandboxID(floodCfg))
	must.NoError(t, err)
	ct := conntrackFrom(t, sb.Addr.Addr())
	var after goruntime.MemStats
	goruntime.GC()
	goruntime.ReadMemStats(&after)
	touch(t, resolverCfg, "stop")
	res := waitLog(t, resolverCfg, "stdout", has("lookups ok="))
	t.Logf("resolver: %s", res)
	m := regexp.MustCompile(`lookups ok=(\d+) fail=(\d+)`).FindStringSubmatch(res)
	must.SliceLen(t, 3, m)
	must.NotEq(t, "0", m[1], must.Sprint("the resolver made no lookup during the flood"))
	must.Eq(t, "0", m[2], must.Sprint("lookups of the allowlisted name failed during the flood"))

	// Conntrack: the DNS rate limit bounds the flood's entries (UDP entries
	// live 30 s unanswered).
	t.Logf("conntrack entries from the flooder: %d; plugin heap %d -> %d KiB", ct, before.HeapAlloc/1024, after.HeapAlloc/1024)
	must.LessEq(t, 2*(netpolicy.DNSPacketRate*60+netpolicy.DNSPacketBurst), ct)
	must.LessEq(t, int64(64<<20), int64(after.HeapAlloc)-int64(before.HeapAlloc), must.Sprint("the plugin's heap grew by more than 64 MiB"))

	rec := ee.waitNetRecord(t, floodCfg, nil, []string{refusedOther})
	must.LessEq(t, maxRefusedNames+1, len(rec.RefusedDNS))
	fi, err := os.Stat(runtime.StateDir(filepath.Join(ee.config.StateDir, sandboxID(floodCfg))).Network())
	must.NoError(t, err)
	t.Logf("network.json: %d bytes, %d refused names, %d denials", fi.Size(), len(rec.RefusedDNS), len(rec.Denials))
	must.LessEq(t, int64(16<<10), fi.Size())
	touch(t, resolverCfg, "finish")
	r := ee.wait(resolverCfg.ID, egDeadline)
	must.Eq(t, 0, r.ExitCode)
	must.NoError(t, ee.harness.DestroyTask(resolverCfg.ID, true))
	exit := ee.finish(t, floodCfg)
	must.LessEq(t, maxRefusedNames+1, len(exit.RefusedDNS))
	must.LessEq(t, maxDenialRecords+1, len(exit.EgressDenials))
	must.Positive(t, exit.RefusedDNS[refusedOther])
	line, err := json.Marshal(exit)
	must.NoError(t, err)
	must.LessEq(t, 32<<10, len(line), must.Sprint("the audit exit record"))
}
