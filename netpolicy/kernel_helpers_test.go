package netpolicy

// Helpers of the real-kernel tests: the test host as these tests use it,
// clients that run inside a sandbox's namespace, raw frames, and the check
// that nothing is left behind.
//
// Traffic stays on this machine: the sandboxes' pool (ktSubnet) is routed,
// by a policy rule of the test host (internal/testutil.NetHost), to its
// server's namespace and nowhere else, so a broken filter sends packets to
// the test server, never out of the uplink.

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
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

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/netnsrun"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil/packet"
)

const (
	ktTable  = "nomad_sandbox_test"
	ktPrefix = "tnpx" // sandboxes of the tests
	// ktSrvPrefix names the other namespaces and interfaces the tests make
	// (allocation networks).
	ktSrvPrefix = "tnps"

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
		if !a.Is4() || a.IsLoopback() || ktSubnet.Contains(a) || testutil.IsNetHostAddr(a) {
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

// ktCreate creates sandbox id, destroyed when the test ends.
// ktObjectsGone checks that nothing of id is left in nftables nor in the
// leases.
func ktObjectsGone(t *testing.T, m *Manager, id string) {
	t.Helper()
	n := m.cfg.names(id)
	c, err := nftables.New()
	ktMust(t, err)
	objs, err := m.listOurs(c)
	ktMust(t, err)
	if o := objs[n.hash]; o != nil {
		t.Errorf("nftables objects still there: %+v", *o)
	}
	if _, err := os.Stat(m.cfg.leasePath(n.hash)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lease %s still there (%v)", n.hash, err)
	}
}

func ktCreate(t *testing.T, m *Manager, id string, allow []Entry) *Network {
	t.Helper()
	sb, err := m.Create(context.Background(), id, allow)
	ktMust(t, err)
	t.Cleanup(func() {
		if err := m.Destroy(id); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return sb
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

// ktStartServer starts the test host with the services these tests talk
// to (the line service on ktTCP1 and ktTCP2, a UDP echo on ktUDP) and
// routes the sandboxes' pool, ktSubnet, to it.
func ktStartServer(t *testing.T) *testutil.NetHost {
	t.Helper()
	h := testutil.StartNetHost(t, testutil.NetServices{Lines: []uint16{ktTCP1, ktTCP2}, UDP: ktUDP})
	h.RouteFrom(t, ktSubnet)
	return h
}

// ktHandle is a netlink handle in the namespace at ns, closed with the test.
func ktHandle(t *testing.T, ns string) *netlink.Handle {
	t.Helper()
	nsh, err := netns.GetFromPath(ns)
	ktMust(t, err)
	defer nsh.Close()
	h, err := netlink.NewHandleAt(nsh)
	ktMust(t, err)
	t.Cleanup(h.Close)
	return h
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

// ktIn runs fn in the namespace at ns, or in the root namespace if ns is "".
func ktIn(ns string, fn func() error) error {
	if ns == "" {
		return fn()
	}
	return netnsrun.In(ns, fn)
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
	msg := packet.ICMPEcho(id, 1, []byte("kt"))
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
	binary.BigEndian.PutUint16(udp[6:], packet.Checksum(append(pseudo, udp...)))
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

// ktLeftovers lists what the tests may leave: namespaces, interfaces and
// nft tables of theirs (the test host checks its own).
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
	return errors.Join(errs...)
}

// nftListTable is `nft list table netdev <name>`, for the test log.
func nftListTable(name string) (string, error) {
	out, err := exec.Command("nft", "list", "table", "netdev", name).CombinedOutput()
	return string(out), err
}
