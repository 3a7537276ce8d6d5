package driver

// The egress test env: a driver whose sandbox pool is routed to the test
// network host (internal/testutil.NetHost), with a DNS upstream and an audit
// log, and the checks the egress, group network, spoofing and trace tests
// share.

import (
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/audit"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/netpolicy"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

const (
	egTCP1, egTCP2, egHTTP = 8080, 8081, 80
	egUDP                  = 5353
	// egDeadline bounds every wait on the collector (it polls every
	// denialPoll) and on the task.
	egDeadline = 20 * time.Second
)

// egressEnv is a test env whose sandbox pool is routed to a test host, with
// a DNS server acting as upstream and an audit log.
type egressEnv struct {
	*testEnv
	host  *testutil.NetHost
	dns   *testutil.DNSUpstream
	audit string
}

// newEgressEnv makes the test host, then the DNS upstream (records may use
// the host's addresses), then the driver with ceiling as allowed_egress.
func newEgressEnv(t *testing.T, extraPorts []uint16, ceiling []string, records func(*testutil.NetHost) map[string]netip.Addr) *egressEnv {
	t.Helper()
	return newEgressEnvWith(t, extraPorts, ceiling, records, nil)
}

// newEgressEnvWith is newEgressEnv with mutate (nil: none) applied to the
// plugin config last, for a test of another network setting.
func newEgressEnvWith(t *testing.T, extraPorts []uint16, ceiling []string, records func(*testutil.NetHost) map[string]netip.Addr, mutate func(*PluginConfig, *testutil.NetHost)) *egressEnv {
	t.Helper()
	testutil.RequireRoot(t)
	ee := &egressEnv{}
	ports := []uint16{egTCP1, egTCP2, egHTTP}
	for _, p := range extraPorts {
		if !slices.Contains(ports, p) {
			ports = append(ports, p)
		}
	}
	ee.host = testutil.StartNetHost(t, testutil.NetServices{HTTP: ports, UDP: egUDP})
	var recs map[string]netip.Addr
	if records != nil {
		recs = records(ee.host)
	}
	ee.dns = testutil.StartDNSUpstream(t, recs)
	ee.audit = filepath.Join(t.TempDir(), "audit.log")
	// The server's addresses are private space, which a sandbox reaches
	// only where allowed_egress names it: the operator names Addr and
	// Extra; Other stays private space nobody named.
	ceiling = append(slices.Clone(ceiling), ee.host.Addr.String()+"/32", ee.host.Extra.String()+"/32")
	ee.testEnv = newTestEnv(t, func(pc *PluginConfig) {
		pc.AllowedEgress = ceiling
		pc.DNSServers = []string{ee.dns.Addr}
		pc.NetworkSubnet = ee.host.Pool.String()
		pc.AuditLog = ee.audit
		if mutate != nil {
			mutate(pc, ee.host)
		}
	})
	t.Logf("test host %d: pool %s, server %s (extra %s, other %s), client %s, DNS upstream %s",
		ee.host.K, ee.host.Pool, ee.host.Addr, ee.host.Extra, ee.host.Other, ee.host.ClientAddr, ee.dns.Addr)
	return ee
}

// fromPool keeps the hits of sandbox traffic: whatever did not come from
// the control client (the sandbox's arrives masqueraded to the host end of
// the server's link, but a hit from anywhere else counts too).
func (ee *egressEnv) fromPool(proto string, dst netip.AddrPort) func(testutil.Hit) bool {
	return func(h testutil.Hit) bool {
		return h.Proto == proto && h.Remote != ee.host.ClientAddr && (!dst.IsValid() || h.Local == dst)
	}
}

// waitNetRecord waits until the sandbox's network.json (refreshed by the
// collector every denialPoll) lists every denial and refused name wanted.
func (ee *egressEnv) waitNetRecord(t *testing.T, cfg *drivers.TaskConfig, denials, refused []string) runtime.NetworkRecord {
	t.Helper()
	path := runtime.StateDir(filepath.Join(ee.config.StateDir, sandboxID(cfg))).Network()
	var rec runtime.NetworkRecord
	err := wait.InitialSuccess(wait.BoolFunc(func() bool {
		b, err := os.ReadFile(path)
		if err != nil {
			return false
		}
		rec = runtime.NetworkRecord{}
		if json.Unmarshal(b, &rec) != nil {
			return false
		}
		for _, k := range denials {
			if rec.Denials[k] == 0 {
				return false
			}
		}
		for _, k := range refused {
			if rec.RefusedDNS[k] == 0 {
				return false
			}
		}
		return true
	}), wait.Timeout(egDeadline), wait.Gap(100*time.Millisecond)).Run()
	if err != nil {
		t.Fatalf("%s never listed denials %q and refused names %q; last: %+v", path, denials, refused, rec)
	}
	return rec
}

// touch creates name in the task's shared alloc data dir (/alloc/data).
func touch(t *testing.T, cfg *drivers.TaskConfig, name string) {
	t.Helper()
	must.NoError(t, os.WriteFile(filepath.Join(cfg.TaskDir().SharedAllocDir, "data", name), nil, 0o644))
}

// finish lets the task end, waits for its exit (0), destroys it and
// returns its audit exit record; then checks that nothing of the sandbox's
// network is left on the host.
func (ee *egressEnv) finish(t *testing.T, cfg *drivers.TaskConfig) audit.Record {
	t.Helper()
	touch(t, cfg, "finish")
	res := ee.wait(cfg.ID, egDeadline)
	must.Eq(t, 0, res.ExitCode, must.Sprint(readLog(cfg, "stderr")))
	waitLog(t, cfg, "stdout", has("finished"))
	must.NoError(t, ee.harness.DestroyTask(cfg.ID, true))
	ee.assertNoNetworkLeft(t)
	var exit *audit.Record
	for _, r := range readAudit(t, ee.audit)[cfg.ID] {
		if r.Event == audit.EventExited {
			r := r
			exit = &r
		}
	}
	must.NotNil(t, exit, must.Sprint("no exit record in the audit log"))
	must.NotNil(t, exit.Policy)
	must.StrContains(t, exit.Policy.Network, "sandbox")
	return *exit
}

// assertNoNetworkLeft checks `ip netns`, `ip link` and `nft list ruleset`
// for anything of the env's prefix, the node-wide tables excepted (they
// stay while the plugin runs; the env's cleanup removes them and checks).
func (ee *egressEnv) assertNoNetworkLeft(t *testing.T) {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	must.NoError(t, err)
	for _, l := range strings.Split(string(out), "\n") {
		must.False(t, strings.HasPrefix(l, ee.netPrefix+"-"), must.Sprintf("ip netns: %s left", l))
	}
	out, err = exec.Command("ip", "-o", "link").CombinedOutput()
	must.NoError(t, err)
	for _, l := range strings.Split(string(out), "\n") {
		// "3: name@peer: <...>"
		if f := strings.Fields(l); len(f) > 1 {
			must.False(t, strings.HasPrefix(f[1], ee.netPrefix), must.Sprintf("ip link: %s left", l))
		}
	}
	tableHeader := regexp.MustCompile(`^table (ip|netdev) ` + regexp.QuoteMeta(ee.driver.netTable) + ` \{$`)
	var left []string
	for _, l := range nftLinesOf(t, ee.netPrefix) {
		if !tableHeader.MatchString(l) {
			left = append(left, l)
		}
	}
	must.SliceEmpty(t, left, must.Sprint("nftables objects of the sandbox left"))
	leases, _ := os.ReadDir(filepath.Join(ee.base, "netpolicy", "leases"))
	must.SliceEmpty(t, leases)
}

// nftLinesOf returns the lines of `nft list ruleset` that mention prefix.
func nftLinesOf(t *testing.T, prefix string) []string {
	t.Helper()
	out, err := exec.Command("nft", "list", "ruleset").CombinedOutput()
	must.NoError(t, err, must.Sprint(string(out)))
	var lines []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, prefix) {
			lines = append(lines, strings.TrimSpace(l))
		}
	}
	return lines
}

// nodeAddr is an IPv4 address of the node outside the test ranges and
// loopback, or invalid if there is none.
func nodeAddr(t *testing.T) netip.Addr {
	t.Helper()
	ps, err := netpolicy.NodeAddrs()
	must.NoError(t, err)
	for _, p := range ps {
		a := p.Addr()
		if a.Is4() && !a.IsLoopback() && !a.IsLinkLocalUnicast() && !testutil.IsNetHostAddr(a) {
			return a
		}
	}
	return netip.Addr{}
}

// tcpListener serves a greeting on addr (port 0: any) and records where
// each connection came from.
type tcpListener struct {
	ln    net.Listener
	mu    sync.Mutex
	peers []netip.Addr
}

func listenTCP(t *testing.T, addr netip.AddrPort) *tcpListener {
	t.Helper()
	ln, err := net.Listen("tcp4", addr.String())
	must.NoError(t, err)
	l := &tcpListener{ln: ln}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			ap, _ := netip.ParseAddrPort(c.RemoteAddr().String())
			l.mu.Lock()
			l.peers = append(l.peers, ap.Addr())
			l.mu.Unlock()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			fmt.Fprintf(c, "HTTP/1.0 200 OK\r\n\r\nhello from %s\n", ln.Addr())
			c.Close()
		}
	}()
	return l
}

func (l *tcpListener) addr() netip.AddrPort { return netip.MustParseAddrPort(l.ln.Addr().String()) }

func (l *tcpListener) from(p netip.Prefix) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, a := range l.peers {
		if p.Contains(a) {
			n++
		}
	}
	return n
}

// freePort is a TCP port nothing listens on at the moment.
func freePort(t *testing.T) uint16 {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	must.NoError(t, err)
	defer ln.Close()
	return netip.MustParseAddrPort(ln.Addr().String()).Port()
}
