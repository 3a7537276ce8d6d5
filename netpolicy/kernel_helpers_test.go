package netpolicy

// Helpers of the real-kernel tests: a test server in a namespace of its
// own, clients that run inside a sandbox's namespace, raw frames, and the
// check that nothing is left behind.
//
// Traffic stays on this machine: the sandboxes' pool (ktSubnet) is routed,
// by a policy rule the test adds, to the test server's namespace and nowhere
// else, so a broken filter sends packets to the test server, never out of
// the uplink.

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/hashicorp/go-hclog"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

const (
	ktTable     = "nomad_sandbox_test"
	ktPrefix    = "tnpx" // sandboxes of the tests
	ktSrvPrefix = "tnps" // test servers: netns tnps-<k>, host end tnps<k>
	// ktRouteTable routes the pool to the test server (policy routing).
	ktRouteTable = 19899
	ktRulePrio   = 1999

	ktTCP1, ktTCP2 = 8081, 8082
	ktUDP          = 5353

	ktTimeout = 1500 * time.Millisecond
)

var ktSubnet = netip.MustParsePrefix("10.198.0.0/16")

// ktRequireRoot: network namespaces, veth and nftables need root.
func ktRequireRoot(t *testing.T) {
	t.Helper()
	testutil.RequireRoot(t)
}

type ktLogWriter struct {
	mu sync.Mutex
	t  *testing.T
}

func (w *ktLogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// ktNodeAddrs are the node's IPv4 addresses outside the test ranges.
func ktNodeAddrs(t *testing.T) []netip.Addr {
	ps, err := NodeAddrs()
	if err != nil {
		t.Fatal(err)
	}
	var out []netip.Addr
	for _, p := range ps {
		a := p.Addr()
		if !a.Is4() || a.IsLoopback() || ktSubnet.Contains(a) || netip.MustParsePrefix("10.199.0.0/16").Contains(a) {
			continue
		}
		out = append(out, a)
	}
	return out
}

// ktManager returns a Manager on the test table, prefix and pool, whose
// sandboxes are all removed when the test ends.
func ktManager(t *testing.T, stateDir string, mod func(*Config)) *Manager {
	t.Helper()
	deny, err := NodeAddrs()
	if err != nil {
		t.Fatal(err)
	}
	if stateDir == "" {
		stateDir = t.TempDir()
	}
	m := &Manager{
		Config: Config{Subnet: ktSubnet, Table: ktTable, StateDir: stateDir, Prefix: ktPrefix, Masquerade: true, Deny: deny},
		Logger: hclog.New(&hclog.LoggerOptions{Name: "netpolicy", Level: hclog.Debug, Output: &ktLogWriter{t: t}}),
	}
	if mod != nil {
		mod(&m.Config)
	}
	t.Cleanup(func() {
		if err := m.Reconcile(nil); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return m
}

func ktEntries(t *testing.T, ss ...string) []Entry {
	t.Helper()
	var out []Entry
	for _, s := range ss {
		e, err := ParseEgress(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, e)
	}
	return out
}

// ktServer is a test host in a namespace of its own, reached from the root
// namespace over a veth: 10.199.k.2, plus 10.199.(100+k).2 and
// 169.254.169.254 on its loopback. It runs TCP servers on ktTCP1 and ktTCP2
// (a greeting naming the client's address, then an echo of each line) and a
// UDP echo on ktUDP, on every address.
type ktServer struct {
	netns    string
	hostIf   string
	hostAddr netip.Addr // host end, 10.199.k.1
	addr     netip.Addr // 10.199.k.2
	extra    netip.Addr // 10.199.(100+k).2
	mac      net.HardwareAddr
}

func ktStartServer(t *testing.T, k int) *ktServer {
	t.Helper()
	// The host routes between the test's namespaces and the server; a
	// fresh machine does not forward until a Manager's first Create.
	testutil.IPForward(t)
	s := &ktServer{
		netns:    filepath.Join(DefaultNetnsDir, fmt.Sprintf("%s-%d", ktSrvPrefix, k)),
		hostIf:   fmt.Sprintf("%s%d", ktSrvPrefix, k),
		hostAddr: netip.AddrFrom4([4]byte{10, 199, byte(k), 1}),
		addr:     netip.AddrFrom4([4]byte{10, 199, byte(k), 2}),
		extra:    netip.AddrFrom4([4]byte{10, 199, byte(100 + k), 2}),
	}
	if err := createNetns(s.netns, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(s.hostIf); err == nil {
			if err := netlink.LinkDel(l); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
		if err := deleteNetns(s.netns); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	nsh, err := netns.GetFromPath(s.netns)
	if err != nil {
		t.Fatal(err)
	}
	defer nsh.Close()
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: s.hostIf}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(nsh))}); err != nil {
		t.Fatal(err)
	}
	host, err := netlink.LinkByName(s.hostIf)
	if err != nil {
		t.Fatal(err)
	}
	s.mac = host.Attrs().HardwareAddr
	ktMust(t, netlink.AddrAdd(host, ktAddr(s.hostAddr, 30)))
	ktMust(t, netlink.LinkSetUp(host))
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	ktMust(t, err)
	ktMust(t, h.LinkSetUp(lo))
	ktMust(t, h.AddrAdd(lo, ktAddr(s.extra, 32)))
	ktMust(t, h.AddrAdd(lo, ktAddr(netip.MustParseAddr("169.254.169.254"), 32)))
	eth, err := h.LinkByName("eth0")
	ktMust(t, err)
	ktMust(t, h.AddrAdd(eth, ktAddr(s.addr, 30)))
	ktMust(t, h.LinkSetUp(eth))
	ktMust(t, h.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Gw: s.hostAddr.AsSlice()}))

	// The host reaches the server's extra address through it.
	ktMust(t, netlink.RouteAdd(&netlink.Route{LinkIndex: host.Attrs().Index,
		Dst: ktNet("10.199." + fmt.Sprint(100+k) + ".0/24"), Gw: s.addr.AsSlice()}))

	// Everything the pool sends that is not for the node itself or the pool
	// goes to the server, never to the uplink.
	throw := &netlink.Route{Dst: ktNet(ktSubnet.String()), Table: ktRouteTable, Type: unix.RTN_THROW}
	ktMust(t, netlink.RouteAdd(&netlink.Route{LinkIndex: host.Attrs().Index, Gw: s.addr.AsSlice(), Table: ktRouteTable}))
	ktMust(t, netlink.RouteAdd(throw))
	rule := netlink.NewRule()
	rule.Src = ktNet(ktSubnet.String())
	rule.Table = ktRouteTable
	rule.Priority = ktRulePrio
	ktMust(t, netlink.RuleAdd(rule))
	t.Cleanup(func() {
		if err := netlink.RuleDel(rule); err != nil {
			t.Errorf("cleanup: rule: %v", err)
		}
		if err := netlink.RouteDel(throw); err != nil {
			t.Errorf("cleanup: throw route: %v", err)
		}
	})

	// Servers, started inside the namespace.
	var lns []io.Closer
	err = testutil.InNetns(s.netns, func() error {
		for _, port := range []int{ktTCP1, ktTCP2} {
			ln, err := net.Listen("tcp4", fmt.Sprintf(":%d", port))
			if err != nil {
				return err
			}
			lns = append(lns, ln)
			go ktServeTCP(ln)
		}
		pc, err := net.ListenPacket("udp4", fmt.Sprintf(":%d", ktUDP))
		if err != nil {
			return err
		}
		lns = append(lns, pc)
		go ktServeUDP(pc)
		return nil
	})
	t.Cleanup(func() {
		for _, c := range lns {
			c.Close()
		}
	})
	ktMust(t, err)
	return s
}

func ktServeTCP(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
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

func ktServeUDP(pc net.PacketConn) {
	buf := make([]byte, 1500)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		ip, _, _ := net.SplitHostPort(from.String())
		pc.WriteTo([]byte(fmt.Sprintf("echo %s %s", ip, buf[:n])), from)
	}
}

func ktMust(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func ktAddr(a netip.Addr, bits int) *netlink.Addr {
	return &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, a.BitLen())}}
}

func ktNet(s string) *net.IPNet {
	_, n, err := net.ParseCIDR(s)
	if err != nil {
		panic(err)
	}
	return n
}

// ktIn runs fn in the namespace at ns, or in the root namespace if ns is "".
func ktIn(ns string, fn func() error) error {
	if ns == "" {
		return fn()
	}
	return testutil.InNetns(ns, fn)
}

// ktDial connects from namespace ns (from src if valid) to dst and reads
// the server's greeting, each within ktTimeout.
func ktDial(ns string, src netip.Addr, dst netip.AddrPort) (net.Conn, string, error) {
	var c net.Conn
	err := ktIn(ns, func() error {
		d := net.Dialer{Timeout: ktTimeout}
		if src.IsValid() {
			d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
		}
		var err error
		c, err = d.Dial("tcp4", dst.String())
		return err
	})
	if err != nil {
		return nil, "", err
	}
	c.SetReadDeadline(time.Now().Add(ktTimeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		c.Close()
		return nil, "", fmt.Errorf("read greeting: %w", err)
	}
	return c, strings.TrimSpace(line), nil
}

// ktTCPWorks reports whether a connection from ns to dst gets a greeting,
// and the greeting.
func ktTCPWorks(ns string, dst netip.AddrPort) (string, error) {
	c, g, err := ktDial(ns, netip.Addr{}, dst)
	if err != nil {
		return "", err
	}
	c.Close()
	return g, nil
}

// ktUDPEcho sends a datagram from ns to dst and waits ktTimeout for the echo.
func ktUDPEcho(ns string, dst netip.AddrPort) (string, error) {
	var c net.Conn
	err := ktIn(ns, func() error {
		var err error
		c, err = net.Dial("udp4", dst.String())
		return err
	})
	if err != nil {
		return "", err
	}
	defer c.Close()
	if _, err := c.Write([]byte("ping")); err != nil {
		return "", err
	}
	c.SetReadDeadline(time.Now().Add(ktTimeout))
	buf := make([]byte, 1500)
	n, err := c.Read(buf)
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

// ktPing sends one ICMP echo request from ns to dst and waits ktTimeout for
// the reply.
func ktPing(ns string, dst netip.Addr) error {
	var pc net.PacketConn
	err := ktIn(ns, func() error {
		var err error
		pc, err = net.ListenPacket("ip4:icmp", "0.0.0.0")
		return err
	})
	if err != nil {
		return err
	}
	defer pc.Close()
	id := uint16(os.Getpid()) ^ uint16(time.Now().UnixNano())
	msg := []byte{8, 0, 0, 0, byte(id >> 8), byte(id), 0, 1, 'k', 't'}
	binary.BigEndian.PutUint16(msg[2:], ktChecksum(msg))
	if _, err := pc.WriteTo(msg, &net.IPAddr{IP: dst.AsSlice()}); err != nil {
		return err
	}
	deadline := time.Now().Add(ktTimeout)
	buf := make([]byte, 1500)
	for {
		pc.SetReadDeadline(deadline)
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return err
		}
		// Echo reply (type 0) from dst with our id.
		if n >= 8 && buf[0] == 0 && binary.BigEndian.Uint16(buf[4:]) == id && from.String() == dst.String() {
			return nil
		}
	}
}

func ktChecksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// ktSendFrame sends a raw Ethernet frame out of ifname in namespace ns.
func ktSendFrame(ns, ifname string, frame []byte) error {
	return ktIn(ns, func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Sendto(fd, frame, 0, &unix.SockaddrLinklayer{Ifindex: ifi.Index, Halen: 6})
	})
}

// ktEther builds an Ethernet header.
func ktEther(dst, src net.HardwareAddr, typ uint16) []byte {
	b := append(append([]byte{}, dst...), src...)
	return binary.BigEndian.AppendUint16(b, typ)
}

// ktARP builds an ARP request from sha/spa for tpa.
func ktARP(sha net.HardwareAddr, spa, tpa netip.Addr) []byte {
	b := []byte{0, 1, 8, 0, 6, 4, 0, 1}
	b = append(b, sha...)
	b = append(b, spa.AsSlice()...)
	b = append(b, 0, 0, 0, 0, 0, 0)
	return append(b, tpa.AsSlice()...)
}

// ktIPv6UDP builds an IPv6 packet carrying a UDP datagram, checksums right.
func ktIPv6UDP(src, dst netip.Addr, sport, dport uint16, payload []byte) []byte {
	udp := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint16(udp[0:], sport)
	binary.BigEndian.PutUint16(udp[2:], dport)
	binary.BigEndian.PutUint16(udp[4:], uint16(8+len(payload)))
	udp = append(udp, payload...)
	pseudo := append(append([]byte{}, src.AsSlice()...), dst.AsSlice()...)
	pseudo = binary.BigEndian.AppendUint32(pseudo, uint32(len(udp)))
	pseudo = append(pseudo, 0, 0, 0, unix.IPPROTO_UDP)
	binary.BigEndian.PutUint16(udp[6:], ktChecksum(append(pseudo, udp...)))
	ip := []byte{0x60, 0, 0, 0, 0, 0, unix.IPPROTO_UDP, 64}
	binary.BigEndian.PutUint16(ip[4:], uint16(len(udp)))
	ip = append(ip, src.AsSlice()...)
	ip = append(ip, dst.AsSlice()...)
	return append(ip, udp...)
}

// ktEventually polls cond every 100ms until it returns nil or timeout
// passes, and returns its last error.
func ktEventually(timeout time.Duration, cond func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// ktLeftovers lists what the tests may leave: namespaces, interfaces, nft
// tables, routing rules and routes of theirs.
func ktLeftovers() []string {
	var out []string
	isOurs := func(name string) bool {
		return strings.HasPrefix(name, ktPrefix) || strings.HasPrefix(name, ktSrvPrefix)
	}
	if ents, err := os.ReadDir(DefaultNetnsDir); err == nil {
		for _, e := range ents {
			if isOurs(e.Name()) {
				out = append(out, "netns "+e.Name())
			}
		}
	}
	if links, err := netlink.LinkList(); err == nil {
		for _, l := range links {
			if isOurs(l.Attrs().Name) {
				out = append(out, "link "+l.Attrs().Name)
			}
		}
	} else {
		out = append(out, "list links: "+err.Error())
	}
	if c, err := nftables.New(); err == nil {
		if tables, err := c.ListTables(); err == nil {
			for _, tb := range tables {
				if tb.Name == ktTable {
					out = append(out, fmt.Sprintf("nft table (family %d) %s", tb.Family, tb.Name))
				}
			}
		} else {
			out = append(out, "list nft tables: "+err.Error())
		}
	}
	if rules, err := netlink.RuleList(unix.AF_INET); err == nil {
		for _, r := range rules {
			if r.Table == ktRouteTable {
				out = append(out, fmt.Sprintf("ip rule %v", r))
			}
		}
	}
	if routes, err := netlink.RouteListFiltered(unix.AF_INET, &netlink.Route{Table: ktRouteTable}, netlink.RT_FILTER_TABLE); err == nil {
		for _, r := range routes {
			out = append(out, fmt.Sprintf("route table %d %v", ktRouteTable, r))
		}
	}
	return out
}

// ktRemoveLeftovers removes what ktLeftovers lists.
func ktRemoveLeftovers() error {
	var errs []error
	if links, err := netlink.LinkList(); err == nil {
		for _, l := range links {
			if n := l.Attrs().Name; strings.HasPrefix(n, ktPrefix) || strings.HasPrefix(n, ktSrvPrefix) {
				errs = append(errs, netlink.LinkDel(l))
			}
		}
	}
	if ents, err := os.ReadDir(DefaultNetnsDir); err == nil {
		for _, e := range ents {
			if n := e.Name(); strings.HasPrefix(n, ktPrefix) || strings.HasPrefix(n, ktSrvPrefix) {
				errs = append(errs, deleteNetns(filepath.Join(DefaultNetnsDir, n)))
			}
		}
	}
	if c, err := nftables.New(); err == nil {
		if tables, err := c.ListTables(); err == nil {
			for _, tb := range tables {
				if tb.Name == ktTable {
					c.DelTable(tb)
				}
			}
			errs = append(errs, c.Flush())
		}
	}
	if rules, err := netlink.RuleList(unix.AF_INET); err == nil {
		for _, r := range rules {
			if r.Table == ktRouteTable {
				errs = append(errs, netlink.RuleDel(&r))
			}
		}
	}
	if routes, err := netlink.RouteListFiltered(unix.AF_INET, &netlink.Route{Table: ktRouteTable}, netlink.RT_FILTER_TABLE); err == nil {
		for _, r := range routes {
			errs = append(errs, netlink.RouteDel(&r))
		}
	}
	return errors.Join(errs...)
}

// nftListTable is `nft list table netdev <name>`, for the test log.
func nftListTable(name string) (string, error) {
	out, err := exec.Command("nft", "list", "table", "netdev", name).CombinedOutput()
	return string(out), err
}
