package testutil

// The test network host: one server in a network namespace of its own that
// every network test of the project talks to (netpolicy's kernel tests, the
// driver's egress and group network tests, the e2e suite), a client
// namespace routed like the sandboxes for positive controls, and a DNS
// server to act as upstream resolver.
//
// Traffic stays on this machine. A policy rule sends everything from the
// sandboxes' addresses that is not for the machine itself nor for those
// addresses to the test server, so a sandbox whose filter is broken reaches
// the test server (and the test sees it), never the uplink.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/netnsrun"
)

const (
	// netHostPrefix starts the names of the namespaces (sbxttest-<k>,
	// sbxttest-<k>c) and host interfaces (sbxts<k>, sbxtc<k>) of test hosts,
	// and those a test makes with Name.
	netHostPrefix = "sbxt"
	// netHostTable + k is the routing table of test host k; its rules have
	// priority netHostRulePrio.
	netHostTable    = 20000
	netHostRulePrio = 1998

	netHostTimeout = 2 * time.Second
)

// netHostRanges are the ranges of the address plan (see NetHost) for every
// k; none of them is the machine's uplink (192.0.2.0/24) nor routed to it.
var netHostRanges = []netip.Prefix{
	netip.MustParsePrefix("10.188.0.0/16"),
	netip.MustParsePrefix("10.189.0.0/16"),
	netip.MustParsePrefix("10.190.0.0/16"),
	netip.MustParsePrefix("198.18.0.0/16"),
}

// IsNetHostAddr reports whether a belongs to the address plan of test
// hosts (of this test or of tests running at the same time).
func IsNetHostAddr(a netip.Addr) bool {
	for _, p := range netHostRanges {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// NetHost is the test network host. Its address plan, with k its index
// (claimed by creating the namespace sbxttest-<k>, so that the hosts of tests
// and packages that run at the same time never share one):
//
//	Pool        10.188.k.0/24    sandbox addresses, routed to the server
//	HostAddr    10.189.k.1/30    host end (sbxts<k>) of the server's link
//	Addr        10.189.k.2/30    the server's eth0
//	            10.189.k.5/30    host end (sbxtc<k>) of the client's link
//	ClientAddr  10.189.k.6/30    the client namespace, routed like the pool
//	Extra       10.190.k.1       on the server's loopback (the host routes
//	Other       10.190.k.2         10.190.k.0/24 through Addr)
//	Metadata    169.254.169.254  on the server's loopback, reached only by
//	                             what is routed to the server
//	Spare       198.18.k.1, .2   nobody's, outside private space: a test may
//	                             give them to the node
//	routing     table 20000+k, rules at priority 1998
//
// The server runs the services asked for (NetServices) on all its
// addresses. Every connection and datagram is recorded (Hits).
type NetHost struct {
	K int
	// Netns is the server's namespace (a path for setns).
	Netns string
	// Pool is the address range for the sandboxes, routed to the server.
	Pool netip.Prefix
	// HostAddr is the host end of the server's link: traffic from the pool
	// masqueraded by the host arrives from it.
	HostAddr                     netip.Addr
	Addr, Extra, Other, Metadata netip.Addr
	Spare                        [2]netip.Addr
	// ClientNetns and ClientAddr are the client namespace, for controls.
	ClientNetns string
	ClientAddr  netip.Addr
	Services    NetServices

	mu   sync.Mutex
	hits []Hit
}

// NetServices are the services a test host runs on each of its addresses.
type NetServices struct {
	// HTTP ports answer every request with "hello from <address:port
	// reached> to <client address>".
	HTTP []uint16
	// Lines ports run ServeLines: a greeting naming the client, then an
	// echo of each line.
	Lines []uint16
	// UDP, if not 0, runs ServeUDPEcho on each address.
	UDP uint16
}

// Hit is one connection or datagram the test host received.
type Hit struct {
	Proto  string // "tcp" or "udp"
	Local  netip.AddrPort
	Remote netip.Addr
}

// StartNetHost creates the test host; everything it made is removed when
// the test ends, failed or not, and the test fails if some of it is still
// there afterwards.
func StartNetHost(t testing.TB, svc NetServices) *NetHost {
	t.Helper()
	RequireRoot(t)
	var h *NetHost
	withNetHostLock(t, func() {
		ipForward(t)
		// Registered after ipForward's, so that it runs before it and
		// after every other cleanup of the host.
		t.Cleanup(func() {
			if h != nil {
				h.checkRemoved(t)
			}
		})
		start := rand.IntN(256)
		for i := 0; i < 256 && h == nil; i++ {
			k := (start + i) % 256
			var err error
			h, err = claimNetHost(t, k)
			if err != nil {
				t.Fatal(err)
			}
		}
	})
	if h == nil {
		t.Fatal("test host: no free index (leftovers named " + netHostPrefix + "* from earlier runs?)")
	}
	h.Services = svc
	h.setup(t)
	return h
}

// Name is a name for an interface or namespace that a test makes beside
// host k: netHostPrefix, tag and k, so that concurrent tests do not collide
// and leftovers are recognised as a test's.
func (h *NetHost) Name(tag string) string {
	return fmt.Sprintf("%s%s%d", netHostPrefix, tag, h.K)
}

func netnsPath(name string) string { return filepath.Join("/run/netns", name) }

func v4(a, b, c, d int) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(a), byte(b), byte(c), byte(d)})
}

func (h *NetHost) serverName() string { return fmt.Sprintf("%stest-%d", netHostPrefix, h.K) }
func (h *NetHost) serverIf() string   { return h.Name("s") }
func (h *NetHost) clientIf() string   { return h.Name("c") }
func (h *NetHost) table() int         { return netHostTable + h.K }

// claimNetHost takes index k by creating the server's namespace (which
// fails if it exists); nil, nil if k is taken.
func claimNetHost(t testing.TB, k int) (*NetHost, error) {
	h := &NetHost{K: k}
	name := h.serverName()
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		if strings.Contains(string(out), "exists") {
			return nil, nil
		}
		return nil, fmt.Errorf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() { delNetns(t, name) })
	if _, err := netlink.LinkByName(h.serverIf()); err == nil {
		return nil, nil // a leftover: leave it be
	}
	h.Netns = netnsPath(name)
	h.Pool = netip.PrefixFrom(v4(10, 188, k, 0), 24)
	h.HostAddr = v4(10, 189, k, 1)
	h.Addr = v4(10, 189, k, 2)
	h.ClientNetns = netnsPath(name + "c")
	h.ClientAddr = v4(10, 189, k, 6)
	h.Extra = v4(10, 190, k, 1)
	h.Other = v4(10, 190, k, 2)
	h.Metadata = netip.MustParseAddr("169.254.169.254")
	h.Spare = [2]netip.Addr{v4(198, 18, k, 1), v4(198, 18, k, 2)}
	return h, nil
}

func delNetns(t testing.TB, name string) {
	if out, err := exec.Command("ip", "netns", "delete", name).CombinedOutput(); err != nil {
		t.Errorf("cleanup: ip netns delete %s: %v: %s", name, err, out)
	}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func ipnet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)}
}

func nlAddr(a netip.Addr, bits int) *netlink.Addr {
	return &netlink.Addr{IPNet: ipnet(netip.PrefixFrom(a, bits))}
}

// link makes a veth whose host end hostIf carries hostAddr/30 and whose
// other end is eth0 in ns with addr/30 and a default route via hostAddr,
// and returns the host end. loopback addresses go on the namespace's lo.
func link(t testing.TB, ns, hostIf string, hostAddr, addr netip.Addr, loopback ...netip.Addr) netlink.Link {
	t.Helper()
	nsh, err := netns.GetFromPath(ns)
	must(t, err)
	defer nsh.Close()
	must(t, netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: hostIf}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(nsh))}))
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(hostIf); err == nil {
			if err := netlink.LinkDel(l); err != nil {
				t.Errorf("cleanup: delete %s: %v", hostIf, err)
			}
		}
	})
	host, err := netlink.LinkByName(hostIf)
	must(t, err)
	must(t, netlink.AddrAdd(host, nlAddr(hostAddr, 30)))
	must(t, netlink.LinkSetUp(host))
	nh, err := netlink.NewHandleAt(nsh)
	must(t, err)
	defer nh.Close()
	lo, err := nh.LinkByName("lo")
	must(t, err)
	must(t, nh.LinkSetUp(lo))
	for _, a := range loopback {
		must(t, nh.AddrAdd(lo, nlAddr(a, 32)))
	}
	eth, err := nh.LinkByName("eth0")
	must(t, err)
	must(t, nh.AddrAdd(eth, nlAddr(addr, 30)))
	must(t, nh.LinkSetUp(eth))
	must(t, nh.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Gw: hostAddr.AsSlice()}))
	return host
}

func (h *NetHost) setup(t testing.TB) {
	t.Helper()
	k := h.K
	clientName := filepath.Base(h.ClientNetns)
	if out, err := exec.Command("ip", "netns", "add", clientName).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", clientName, err, out)
	}
	t.Cleanup(func() { delNetns(t, clientName) })

	host := link(t, h.Netns, h.serverIf(), h.HostAddr, h.Addr, h.Extra, h.Other, h.Metadata)
	link(t, h.ClientNetns, h.clientIf(), v4(10, 189, k, 5), h.ClientAddr)

	// The host reaches the server's loopback addresses through it (the
	// metadata address excepted: that stays for the pool's table only).
	extra := &netlink.Route{LinkIndex: host.Attrs().Index, Dst: ipnet(netip.PrefixFrom(v4(10, 190, k, 0), 24)), Gw: h.Addr.AsSlice()}
	must(t, netlink.RouteAdd(extra))
	t.Cleanup(func() {
		if err := netlink.RouteDel(extra); err != nil && !errors.Is(err, unix.ESRCH) {
			t.Errorf("cleanup: route: %v", err)
		}
	})

	// Everything the pool and the client send that is not for this machine
	// (the local table comes first), the pool or the client goes to the
	// server. (The rule for the pool also catches what this machine sends
	// from the sandboxes' gateways: their answers to the client.)
	flushTable(h.table()) // a crashed run's, if any: the index is ours now
	def := &netlink.Route{LinkIndex: host.Attrs().Index, Gw: h.Addr.AsSlice(), Table: h.table()}
	must(t, netlink.RouteAdd(def))
	t.Cleanup(func() { flushTable(h.table()) })
	h.RouteFrom(t, h.Pool)
	h.throw(t, netip.PrefixFrom(h.ClientAddr, 30).Masked())
	h.rule(t, "from "+h.ClientAddr.String(), func(r *netlink.Rule) { r.Src = ipnet(netip.PrefixFrom(h.ClientAddr, 32)) })

	must(t, h.serve(t))
}

// RouteFrom routes everything that src sends, and that is not for this
// machine nor for src, to the server, until the test ends: for sandbox
// addresses other than Pool.
func (h *NetHost) RouteFrom(t testing.TB, src netip.Prefix) {
	t.Helper()
	h.throw(t, src)
	h.rule(t, "from "+src.String(), func(r *netlink.Rule) { r.Src = ipnet(src) })
}

// RouteFromLink routes everything that arrives on the host's interface
// name, and that is not for this machine nor for a range routed with
// RouteFrom, to the server, until the test ends: for a bridge whose
// namespaces may send from any address.
func (h *NetHost) RouteFromLink(t testing.TB, name string) {
	t.Helper()
	h.rule(t, "iif "+name, func(r *netlink.Rule) { r.IifName = name })
}

// throw makes dst leave the host's table (for the main table).
func (h *NetHost) throw(t testing.TB, dst netip.Prefix) {
	t.Helper()
	must(t, netlink.RouteAdd(&netlink.Route{Dst: ipnet(dst), Table: h.table(), Type: unix.RTN_THROW}))
}

// rule adds a rule to the host's table, removed when the test ends.
func (h *NetHost) rule(t testing.TB, what string, sel func(*netlink.Rule)) {
	t.Helper()
	rule := netlink.NewRule()
	sel(rule)
	rule.Table = h.table()
	rule.Priority = netHostRulePrio
	must(t, netlink.RuleAdd(rule))
	t.Cleanup(func() {
		if err := netlink.RuleDel(rule); err != nil {
			t.Errorf("cleanup: rule %s: %v", what, err)
		}
	})
}

// serve starts the services in the server's namespace (a socket belongs to
// the namespace of the thread that made it); they stop when the test ends.
func (h *NetHost) serve(t testing.TB) error {
	var closers []func()
	t.Cleanup(func() {
		for _, c := range closers {
			c()
		}
	})
	return netnsrun.In(h.Netns, func() error {
		for _, port := range h.Services.HTTP {
			ln, err := net.Listen("tcp4", fmt.Sprintf(":%d", port))
			if err != nil {
				return err
			}
			srv := &http.Server{
				Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					local, _ := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
					remote, _, _ := net.SplitHostPort(r.RemoteAddr)
					fmt.Fprintf(w, "hello from %s to %s\n", local, remote)
				}),
				ConnState: func(c net.Conn, s http.ConnState) {
					if s == http.StateNew {
						h.record("tcp", c.LocalAddr(), c.RemoteAddr())
					}
				},
				ReadHeaderTimeout: 5 * time.Second,
			}
			go srv.Serve(ln)
			closers = append(closers, func() { srv.Close() })
		}
		for _, port := range h.Services.Lines {
			ln, err := net.Listen("tcp4", fmt.Sprintf(":%d", port))
			if err != nil {
				return err
			}
			go serveLines(ln, func(c net.Conn) { h.record("tcp", c.LocalAddr(), c.RemoteAddr()) })
			closers = append(closers, func() { ln.Close() })
		}
		if h.Services.UDP == 0 {
			return nil
		}
		// One socket per address, so that each reply leaves from the
		// address the datagram came to.
		for _, a := range []netip.Addr{h.Addr, h.Extra, h.Other, h.Metadata} {
			pc, err := net.ListenPacket("udp4", netip.AddrPortFrom(a, h.Services.UDP).String())
			if err != nil {
				return err
			}
			go serveUDPEcho(pc, func(from net.Addr) { h.record("udp", pc.LocalAddr(), from) })
			closers = append(closers, func() { pc.Close() })
		}
		return nil
	})
}

// checkRemoved fails the test if anything of the host is left once its
// cleanups have run.
func (h *NetHost) checkRemoved(t testing.TB) {
	var left []string
	for _, ns := range []string{h.serverName(), h.serverName() + "c"} {
		if _, err := os.Stat(netnsPath(ns)); err == nil {
			left = append(left, "netns "+ns)
		}
	}
	for _, l := range []string{h.serverIf(), h.clientIf()} {
		if _, err := netlink.LinkByName(l); err == nil {
			left = append(left, "link "+l)
		}
	}
	if rules, err := netlink.RuleList(unix.AF_INET); err == nil {
		for _, r := range rules {
			if r.Table == h.table() {
				left = append(left, fmt.Sprintf("ip rule %v", r))
			}
		}
	}
	if routes, err := netlink.RouteListFiltered(unix.AF_INET, &netlink.Route{Table: h.table()}, netlink.RT_FILTER_TABLE); err == nil && len(routes) > 0 {
		left = append(left, fmt.Sprintf("%d routes in table %d", len(routes), h.table()))
	}
	if len(left) > 0 {
		t.Errorf("test host %d left behind: %s", h.K, strings.Join(left, "; "))
	}
}

func flushTable(table int) {
	routes, err := netlink.RouteListFiltered(unix.AF_INET, &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return
	}
	for _, r := range routes {
		_ = netlink.RouteDel(&r)
	}
}

// ServeLines serves ln until it is closed: each connection gets a greeting
// "hello <client address>\n", then each line it sends echoed, until it
// closes its side.
func ServeLines(ln net.Listener) { serveLines(ln, nil) }

func serveLines(ln net.Listener, accepted func(net.Conn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		if accepted != nil {
			accepted(c)
		}
		go func() {
			defer c.Close()
			ip, _, _ := net.SplitHostPort(c.RemoteAddr().String())
			fmt.Fprintf(c, "hello %s\n", ip)
			sc := bufio.NewScanner(c)
			for sc.Scan() {
				fmt.Fprintf(c, "%s\n", sc.Text())
			}
		}()
	}
}

// ServeUDPEcho answers each datagram on pc, until pc is closed, with "echo
// from <local address:port> to <client address:port>: <payload>".
func ServeUDPEcho(pc net.PacketConn) { serveUDPEcho(pc, nil) }

func serveUDPEcho(pc net.PacketConn, received func(from net.Addr)) {
	buf := make([]byte, 1500)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		if received != nil {
			received(from)
		}
		pc.WriteTo([]byte(fmt.Sprintf("echo from %s to %s: %s", pc.LocalAddr(), from, buf[:n])), from)
	}
}

func addrPortOf(a net.Addr) netip.AddrPort {
	ap, _ := netip.ParseAddrPort(a.String())
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func (h *NetHost) record(proto string, local, remote net.Addr) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.hits = append(h.hits, Hit{Proto: proto, Local: addrPortOf(local), Remote: addrPortOf(remote).Addr()})
}

// Hits returns what the host received so far that match keeps (all if nil).
func (h *NetHost) Hits(keep func(Hit) bool) []Hit {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []Hit
	for _, x := range h.hits {
		if keep == nil || keep(x) {
			out = append(out, x)
		}
	}
	return out
}

// ResetHits forgets what the host received so far.
func (h *NetHost) ResetHits() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.hits = nil
}

// ClientGet does an HTTP GET of dst from the client namespace and returns
// the body, within a bounded time.
func (h *NetHost) ClientGet(dst netip.AddrPort) (string, error) {
	var c net.Conn
	err := netnsrun.In(h.ClientNetns, func() error {
		var err error
		c, err = net.DialTimeout("tcp4", dst.String(), netHostTimeout)
		return err
	})
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(netHostTimeout))
	fmt.Fprintf(c, "GET / HTTP/1.0\r\nHost: %s\r\n\r\n", dst)
	var b strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		b.Write(buf[:n])
		if err != nil {
			break
		}
	}
	out := b.String()
	if i := strings.Index(out, "\r\n\r\n"); i >= 0 {
		return out[i+4:], nil
	}
	return "", fmt.Errorf("GET %s: no response: %q", dst, out)
}

// ClientUDP sends a datagram from the client namespace to dst and returns
// the reply.
func (h *NetHost) ClientUDP(dst netip.AddrPort) (string, error) {
	var c net.Conn
	err := netnsrun.In(h.ClientNetns, func() error {
		var err error
		c, err = net.Dial("udp4", dst.String())
		return err
	})
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(netHostTimeout))
	if _, err := c.Write([]byte("control")); err != nil {
		return "", err
	}
	buf := make([]byte, 1500)
	n, err := c.Read(buf)
	return string(buf[:n]), err
}

// ClientPing pings dst once from the client namespace (busybox ping).
func (h *NetHost) ClientPing(dst netip.Addr) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*netHostTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", "netns", "exec", filepath.Base(h.ClientNetns),
		BusyboxPath, "ping", "-c", "1", "-W", "2", dst.String()).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ping %s: %v: %s", dst, err, out)
	}
	return nil
}

// DNSUpstream is a DNS server on 127.0.0.1 (UDP and TCP on one port) that
// answers A queries from a fixed table, NXDOMAIN for other names and empty
// answers for other types, and counts the queries per name.
type DNSUpstream struct {
	// Addr is "127.0.0.1:port".
	Addr string

	mu      sync.Mutex
	records map[string]netip.Addr
	queries map[string]int
}

// StartDNSUpstream starts the server, stopped when the test ends. Names in
// records are lower case without the trailing dot.
func StartDNSUpstream(t testing.TB, records map[string]netip.Addr) *DNSUpstream {
	t.Helper()
	u := &DNSUpstream{records: records, queries: map[string]int{}}
	var pc net.PacketConn
	var ln net.Listener
	for i := 0; ; i++ {
		var err error
		pc, err = net.ListenPacket("udp4", "127.0.0.1:0")
		must(t, err)
		ln, err = net.Listen("tcp4", pc.LocalAddr().String())
		if err == nil {
			break
		}
		pc.Close()
		if i == 20 {
			t.Fatalf("DNS upstream: no port free for both UDP and TCP: %v", err)
		}
	}
	u.Addr = pc.LocalAddr().String()
	udp := &dns.Server{PacketConn: pc, Handler: u}
	tcp := &dns.Server{Listener: ln, Handler: u}
	go udp.ActivateAndServe()
	go tcp.ActivateAndServe()
	t.Cleanup(func() {
		udp.Shutdown()
		tcp.Shutdown()
	})
	return u
}

func (u *DNSUpstream) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(req)
	if len(req.Question) == 1 {
		q := req.Question[0]
		name := strings.TrimSuffix(strings.ToLower(q.Name), ".")
		u.mu.Lock()
		u.queries[name]++
		a, ok := u.records[name]
		u.mu.Unlock()
		switch {
		case !ok:
			m.Rcode = dns.RcodeNameError
		case q.Qtype == dns.TypeA && q.Qclass == dns.ClassINET:
			m.Answer = append(m.Answer, &dns.A{
				Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60},
				A:   a.AsSlice(),
			})
		}
	}
	w.WriteMsg(m)
}

// Queries returns how many queries for name (any type) reached the server.
func (u *DNSUpstream) Queries(name string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.queries[name]
}
