package testutil

// A test host for network tests: a server in a network namespace of its
// own, a pool of sandbox addresses that the host routes to it (and nowhere
// else), a client namespace routed the same way for positive controls, and
// a DNS server to act as upstream resolver.
//
// Traffic stays on this machine. A policy rule sends everything from the
// pool that is not for the machine itself nor for the pool to the test
// server, so a sandbox whose filter is broken reaches the test server (and
// the test sees it), never the uplink.

import (
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
)

const (
	// netHostPrefix starts the names of the namespaces (sbxtest-<k>,
	// sbxtest-<k>c) and host interfaces (sbxts<k>, sbxtc<k>) of test hosts.
	netHostPrefix = "sbxt"
	// netHostTable + k is the routing table of test host k; its rules have
	// priority netHostRulePrio.
	netHostTable    = 20000
	netHostRulePrio = 1998

	netHostTimeout = 2 * time.Second
)

// NetHost is a test host in a network namespace of its own. With k chosen
// per host (so that concurrent tests do not collide):
//
//	Pool      10.188.k.0/24  sandbox addresses: routed to the server
//	Addr      10.189.k.2     the server's eth0 (10.189.k.1 is the host end)
//	Extra     10.190.k.1     second address of the server (loopback)
//	Other     10.190.k.2     third address of the server (loopback)
//	Metadata  169.254.169.254 on the server's loopback
//	client    10.189.k.6     a client namespace routed like the pool
//
// It serves HTTP on every TCP port given, on all its addresses (the body
// names the address and port connected to and the client), and a UDP echo
// on the UDP port of each address. Every connection and datagram is
// recorded (Hits).
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
	// ClientNetns and ClientAddr are the client namespace, for controls.
	ClientNetns string
	ClientAddr  netip.Addr
	TCPPorts    []uint16
	UDPPort     uint16

	mu   sync.Mutex
	hits []Hit
}

// Hit is one connection or datagram the test host received.
type Hit struct {
	Proto  string // "tcp" or "udp"
	Local  netip.AddrPort
	Remote netip.Addr
}

// StartNetHost creates the test host; everything it made is removed when
// the test ends, failed or not.
func StartNetHost(t testing.TB, tcpPorts []uint16, udpPort uint16) *NetHost {
	t.Helper()
	RequireRoot(t)
	IPForward(t)
	start := rand.IntN(256)
	var h *NetHost
	for i := 0; i < 256 && h == nil; i++ {
		k := (start + i) % 256
		var err error
		h, err = claimNetHost(t, k)
		if err != nil {
			t.Fatal(err)
		}
	}
	if h == nil {
		t.Fatal("test host: no free index (leftovers named " + netHostPrefix + "* from earlier runs?)")
	}
	h.TCPPorts, h.UDPPort = tcpPorts, udpPort
	h.setup(t)
	return h
}

func netnsPath(name string) string { return filepath.Join("/run/netns", name) }

func v4(a, b, c, d int) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(a), byte(b), byte(c), byte(d)})
}

// claimNetHost takes index k by creating the server's namespace (which
// fails if it exists); nil, nil if k is taken.
func claimNetHost(t testing.TB, k int) (*NetHost, error) {
	name := fmt.Sprintf("%stest-%d", netHostPrefix, k)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		if strings.Contains(string(out), "exists") {
			return nil, nil
		}
		return nil, fmt.Errorf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() { delNetns(t, name) })
	if _, err := netlink.LinkByName(fmt.Sprintf("%ss%d", netHostPrefix, k)); err == nil {
		return nil, nil // a leftover: leave it be
	}
	return &NetHost{
		K:           k,
		Netns:       netnsPath(name),
		Pool:        netip.PrefixFrom(v4(10, 188, k, 0), 24),
		HostAddr:    v4(10, 189, k, 1),
		Addr:        v4(10, 189, k, 2),
		Extra:       v4(10, 190, k, 1),
		Other:       v4(10, 190, k, 2),
		Metadata:    netip.MustParseAddr("169.254.169.254"),
		ClientNetns: netnsPath(name + "c"),
		ClientAddr:  v4(10, 189, k, 6),
	}, nil
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

	srvIf := fmt.Sprintf("%ss%d", netHostPrefix, k)
	host := link(t, h.Netns, srvIf, h.HostAddr, h.Addr, h.Extra, h.Other, h.Metadata)
	link(t, h.ClientNetns, fmt.Sprintf("%sc%d", netHostPrefix, k), v4(10, 189, k, 5), h.ClientAddr)

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
	table := netHostTable + k
	flushTable(table) // a crashed run's, if any: the index is ours now
	def := &netlink.Route{LinkIndex: host.Attrs().Index, Gw: h.Addr.AsSlice(), Table: table}
	throw := &netlink.Route{Dst: ipnet(h.Pool), Table: table, Type: unix.RTN_THROW}
	must(t, netlink.RouteAdd(def))
	t.Cleanup(func() { flushTable(table) })
	must(t, netlink.RouteAdd(throw))
	must(t, netlink.RouteAdd(&netlink.Route{Dst: ipnet(netip.PrefixFrom(h.ClientAddr, 30).Masked()), Table: table, Type: unix.RTN_THROW}))
	for _, src := range []netip.Prefix{h.Pool, netip.PrefixFrom(h.ClientAddr, 32)} {
		rule := netlink.NewRule()
		rule.Src = ipnet(src)
		rule.Table = table
		rule.Priority = netHostRulePrio
		must(t, netlink.RuleAdd(rule))
		t.Cleanup(func() {
			if err := netlink.RuleDel(rule); err != nil {
				t.Errorf("cleanup: rule from %s: %v", src, err)
			}
		})
	}

	// The services, in the server's namespace.
	var closers []func()
	t.Cleanup(func() {
		for _, c := range closers {
			c()
		}
	})
	err := InNetns(h.Netns, func() error {
		for _, port := range h.TCPPorts {
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
		if h.UDPPort == 0 {
			return nil
		}
		// One socket per address, so that each reply leaves from the
		// address the datagram came to.
		for _, a := range []netip.Addr{h.Addr, h.Extra, h.Other, h.Metadata} {
			pc, err := net.ListenPacket("udp4", netip.AddrPortFrom(a, h.UDPPort).String())
			if err != nil {
				return err
			}
			go h.serveUDP(pc)
			closers = append(closers, func() { pc.Close() })
		}
		return nil
	})
	must(t, err)
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

func (h *NetHost) serveUDP(pc net.PacketConn) {
	buf := make([]byte, 1500)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		h.record("udp", pc.LocalAddr(), from)
		pc.WriteTo([]byte(fmt.Sprintf("echo from %s: %s", pc.LocalAddr(), buf[:n])), from)
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

// ClientGet does an HTTP GET of dst from the client namespace and returns
// the body, within a bounded time.
func (h *NetHost) ClientGet(dst netip.AddrPort) (string, error) {
	var c net.Conn
	err := InNetns(h.ClientNetns, func() error {
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
	err := InNetns(h.ClientNetns, func() error {
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

// IPForward turns IPv4 forwarding on for the rest of the test, as a test
// host routed through this machine needs (a fresh machine has it off, and
// the driver turns it on only with its first sandbox network), and puts back
// the value it found when the test ends.
func IPForward(t testing.TB) {
	t.Helper()
	const path = "/proc/sys/net/ipv4/ip_forward"
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	if strings.TrimSpace(string(b)) == "1" {
		return
	}
	if err := os.WriteFile(path, []byte("1"), 0); err != nil {
		t.Fatalf("enable IPv4 forwarding: %v", err)
	}
	t.Cleanup(func() {
		if err := os.WriteFile(path, b, 0); err != nil {
			t.Errorf("restore %s: %v", path, err)
		}
	})
}
