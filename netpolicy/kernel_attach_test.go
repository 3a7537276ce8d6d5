package netpolicy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

// An allocation network as Nomad's CNI bridge makes it: a bridge on the
// host with the gateway address, and per allocation a namespace whose eth0
// is a veth with its host end on the bridge.
const ktBridge = ktSrvPrefix + "br"

var ktBridgeNet = netip.MustParsePrefix("10.197.0.0/24")

type ktAlloc struct {
	netns  string
	hostIf string
	addr   netip.Addr
	mac    net.HardwareAddr
}

// ktStartBridge makes the bridge, routes what the allocations send through
// it to the test host srv (if not nil) and returns the gateway address.
func ktStartBridge(t *testing.T, srv *testutil.NetHost) netip.Addr {
	t.Helper()
	gw := netip.MustParseAddr("10.197.0.1")
	ktMust(t, netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: ktBridge}}))
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(ktBridge); err == nil {
			if err := netlink.LinkDel(l); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
	})
	br, err := netlink.LinkByName(ktBridge)
	ktMust(t, err)
	ktMust(t, netlink.AddrAdd(br, ktAddr(gw, 24)))
	ktMust(t, netlink.LinkSetUp(br))
	if srv != nil {
		srv.RouteFromLink(t, ktBridge)
	}
	return gw
}

// ktAddAlloc makes allocation k's namespace on the bridge: 10.197.0.(1+k).
func ktAddAlloc(t *testing.T, k int) *ktAlloc {
	t.Helper()
	a := &ktAlloc{
		netns:  filepath.Join(DefaultNetnsDir, fmt.Sprintf("%s-a%d", ktSrvPrefix, k)),
		hostIf: fmt.Sprintf("%sa%d", ktSrvPrefix, k),
		addr:   netip.AddrFrom4([4]byte{10, 197, 0, byte(1 + k)}),
	}
	ktMust(t, createNetns(a.netns, nil))
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(a.hostIf); err == nil {
			if err := netlink.LinkDel(l); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
		if err := deleteNetns(a.netns); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	nsh, err := netns.GetFromPath(a.netns)
	ktMust(t, err)
	defer nsh.Close()
	ktMust(t, netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: a.hostIf}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(nsh))}))
	host, err := netlink.LinkByName(a.hostIf)
	ktMust(t, err)
	br, err := netlink.LinkByName(ktBridge)
	ktMust(t, err)
	ktMust(t, netlink.LinkSetMaster(host, br))
	ktMust(t, netlink.LinkSetUp(host))
	h, err := netlink.NewHandleAt(nsh)
	ktMust(t, err)
	defer h.Close()
	lo, err := h.LinkByName("lo")
	ktMust(t, err)
	ktMust(t, h.LinkSetUp(lo))
	eth, err := h.LinkByName("eth0")
	ktMust(t, err)
	a.mac = eth.Attrs().HardwareAddr
	ktMust(t, h.AddrAdd(eth, ktAddr(a.addr, 24)))
	ktMust(t, h.LinkSetUp(eth))
	ktMust(t, h.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Gw: netip.MustParseAddr("10.197.0.1").AsSlice()}))
	return a
}

// ktListen starts a greeting TCP server on port in namespace ns ("" for the
// root namespace).
func ktListen(t *testing.T, ns string, addr netip.AddrPort) netip.AddrPort {
	t.Helper()
	var ln net.Listener
	ktMust(t, ktIn(ns, func() error {
		var err error
		ln, err = net.Listen("tcp4", addr.String())
		return err
	}))
	t.Cleanup(func() { ln.Close() })
	go testutil.ServeLines(ln)
	return netip.MustParseAddrPort(ln.Addr().String())
}

// ktNetnsState is eth0's IPv4 addresses and default gateway in ns.
func ktNetnsState(t *testing.T, ns string) (addrs []string, gw string) {
	t.Helper()
	h, eth, as := ktEth0(t, ns)
	for _, a := range as {
		addrs = append(addrs, a.IPNet.String())
	}
	rs, err := h.RouteList(eth, netlink.FAMILY_V4)
	ktMust(t, err)
	for _, r := range rs {
		if (r.Dst == nil || r.Dst.IP.IsUnspecified()) && r.Gw != nil {
			gw = r.Gw.String()
		}
	}
	return addrs, gw
}

// ktStrip does to eth0 what runsc does when it takes the namespace over.
func ktStrip(t *testing.T, ns string) {
	t.Helper()
	h, eth, as := ktEth0(t, ns)
	for _, a := range as {
		ktMust(t, h.AddrDel(eth, &a))
	}
}

// ktEth0 is a handle in ns, its eth0 and eth0's IPv4 addresses.
func ktEth0(t *testing.T, ns string) (*netlink.Handle, netlink.Link, []netlink.Addr) {
	t.Helper()
	h := ktHandle(t, ns)
	eth, err := h.LinkByName("eth0")
	ktMust(t, err)
	as, err := h.AddrList(eth, netlink.FAMILY_V4)
	ktMust(t, err)
	return h, eth, as
}

// TestKernelAttach puts the filter on an allocation network like Nomad's
// bridge mode makes, and checks what it lets through from a namespace
// whose plain Linux stack stands in for the sandbox's.
func TestKernelAttach(t *testing.T) {
	ktRequireRoot(t)
	srv := ktStartServer(t)
	gw := ktStartBridge(t, srv)
	a1 := ktAddAlloc(t, 1)
	a2 := ktAddAlloc(t, 2)
	m := ktManager(t, "", nil)
	const id = "alloc-a1/task-web"
	srv1 := netip.AddrPortFrom(srv.Addr, ktTCP1)
	srv2 := netip.AddrPortFrom(srv.Addr, ktTCP2)

	// Controls before any filter: everything answers.
	web := ktListen(t, a1.netns, netip.MustParseAddrPort("0.0.0.0:8080"))
	lateral := ktListen(t, a2.netns, netip.AddrPortFrom(a2.addr, 8080))
	gwSvc := ktListen(t, "", netip.AddrPortFrom(gw, 0))
	for _, dst := range []netip.AddrPort{srv1, srv2, lateral, gwSvc} {
		if _, err := ktTCPWorks(a1.netns, dst); err != nil {
			t.Fatalf("control: %s from the allocation before Attach: %v", dst, err)
		}
	}
	if _, err := ktTCPWorks("", netip.AddrPortFrom(a1.addr, web.Port())); err != nil {
		t.Fatalf("control: inbound before Attach: %v", err)
	}

	sb, err := m.Attach(context.Background(), id, a1.netns, ktEntries(t, srv1.String(), "peer.test:8080"),
		AttachOptions{Replies: []Port{{"tcp", 8080}, {"udp", 8080}, {"tcp", 8090}}})
	ktMust(t, err)
	t.Cleanup(func() {
		if err := m.Destroy(id); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	if !sb.Attached || sb.Netns != a1.netns || sb.HostIf != a1.hostIf || sb.Addr != netip.PrefixFrom(a1.addr, 24) ||
		sb.Gateway != gw || sb.MAC.String() != a1.mac.String() {
		t.Fatalf("Attach = %+v", sb)
	}
	if got, err := m.Get(id); err != nil || got.Netns != a1.netns || got.HostIf != a1.hostIf || !got.Attached {
		t.Errorf("Get = %+v, %v", got, err)
	}
	if _, err := m.Attach(context.Background(), id, a1.netns, nil, AttachOptions{}); !errors.Is(err, ErrExists) {
		t.Errorf("Attach again: %v, want ErrExists", err)
	}
	// A name resolving into the bridge's network (another allocation) is
	// never granted: the DNS service leaves such answers out.
	if err := m.AllowName(id, "peer.test", a2.addr, time.Minute); !errors.Is(err, ErrDeniedAddr) {
		t.Errorf("Allow of the other allocation's address: %v", err)
	}
	if _, err := m.Attach(context.Background(), "alloc-a1/task-other", a1.netns, nil, AttachOptions{}); !errors.Is(err, ErrNetnsInUse) {
		t.Errorf("a second sandbox in the namespace: %v, want ErrNetnsInUse", err)
	}

	t.Run("allowlisted destination connects, others do not", func(t *testing.T) {
		if _, err := ktTCPWorks(a1.netns, srv1); err != nil {
			t.Errorf("%s: %v", srv1, err)
		}
		for _, dst := range []netip.AddrPort{srv2, lateral, gwSvc} {
			if _, err := ktTCPWorks(a1.netns, dst); err == nil {
				t.Errorf("%s reachable", dst)
			}
		}
		den, err := m.Denials(id)
		ktMust(t, err)
		for _, dst := range []netip.AddrPort{srv2, lateral, gwSvc} {
			if den[dst.String()+"/tcp"] == 0 {
				t.Errorf("no denial recorded for %s: %v", dst, den)
			}
		}
	})

	t.Run("inbound to a served port works", func(t *testing.T) {
		g, err := ktTCPWorks("", netip.AddrPortFrom(a1.addr, web.Port()))
		if err != nil {
			t.Fatalf("inbound: %v", err)
		}
		t.Logf("greeting: %s", g)
		// UDP: the echo is the reply of a flow that came from outside.
		var pc net.PacketConn
		ktMust(t, ktIn(a1.netns, func() error {
			var err error
			pc, err = net.ListenPacket("udp4", ":8080")
			return err
		}))
		defer pc.Close()
		go testutil.ServeUDPEcho(pc)
		if _, err := ktUDPEcho("", netip.AddrPortFrom(a1.addr, 8080)); err != nil {
			t.Errorf("inbound UDP to a served port: %v", err)
		}
	})

	t.Run("a served port is no way out", func(t *testing.T) {
		// Sent from a served port, so past the netdev filter; not a reply,
		// so dropped after conntrack.
		for _, dst := range []netip.AddrPort{srv2, gwSvc} {
			var err error
			ktMust(t, ktIn(a1.netns, func() error {
				d := net.Dialer{Timeout: ktTimeout, LocalAddr: &net.TCPAddr{Port: 8090}}
				var c net.Conn
				c, err = d.Dial("tcp4", dst.String())
				if err == nil {
					c.Close()
				}
				return nil
			}))
			if err == nil {
				t.Errorf("%s reachable from served port 8090", dst)
			}
		}
		// UDP from a served port to the server's echo, which would answer.
		var got error
		ktMust(t, ktIn(a1.netns, func() error {
			c, err := net.DialUDP("udp4", &net.UDPAddr{Port: 8080}, net.UDPAddrFromAddrPort(netip.AddrPortFrom(srv.Addr, ktUDP)))
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(ktTimeout))
			if _, err := c.Write([]byte("out")); err != nil {
				return err
			}
			_, got = c.Read(make([]byte, 64))
			return nil
		}))
		if got == nil {
			t.Errorf("UDP from served port 8080 got an answer from %s", srv.Addr)
		}
	})

	t.Run("frames for another MAC are dropped", func(t *testing.T) {
		// Point the gateway at the other allocation's MAC: the frames for
		// the allowed server would be switched to it.
		h := ktHandle(t, a1.netns)
		eth, err := h.LinkByName("eth0")
		ktMust(t, err)
		neigh := &netlink.Neigh{LinkIndex: eth.Attrs().Index, Family: unix.AF_INET, State: netlink.NUD_PERMANENT,
			IP: gw.AsSlice(), HardwareAddr: a2.mac}
		ktMust(t, h.NeighSet(neigh))
		before := ktCounters(t, m, id)
		_, err = ktTCPWorks(a1.netns, srv1)
		ktMust(t, h.NeighDel(neigh))
		if err == nil {
			t.Errorf("%s reachable through frames for %s", srv1, a2.mac)
		}
		if after := ktCounters(t, m, id); after.Denied <= before.Denied {
			t.Errorf("denied counter %d -> %d", before.Denied, after.Denied)
		}
		if _, err := ktTCPWorks(a1.netns, srv1); err != nil {
			t.Errorf("%s with the gateway's MAC back: %v", srv1, err)
		}
	})

	t.Run("DNS goes to the redirect target", func(t *testing.T) {
		pc, err := net.ListenPacket("udp4", netip.AddrPortFrom(gw, 0).String())
		ktMust(t, err)
		defer pc.Close()
		go testutil.ServeUDPEcho(pc)
		to := netip.MustParseAddrPort(pc.LocalAddr().String())
		if _, err := ktUDPEcho(a1.netns, to); err == nil {
			t.Errorf("the DNS service's own port %s is reachable directly", to)
		}
		ktMust(t, m.RedirectDNS(id, to))
		ktMust(t, m.RedirectDNS(id, to)) // replaces, does not add
		if _, err := ktUDPEcho(a1.netns, netip.AddrPortFrom(gw, 53)); err != nil {
			t.Errorf("DNS to %s:53: %v", gw, err)
		}
	})

	t.Run("destroy leaves the namespace as it was", func(t *testing.T) {
		wantAddrs, wantGw := []string{a1.addr.String() + "/24"}, gw.String()
		ktStrip(t, a1.netns)
		ktMust(t, m.Destroy(id))
		ktObjectsGone(t, m, id)
		addrs, g := ktNetnsState(t, a1.netns)
		if fmt.Sprint(addrs) != fmt.Sprint(wantAddrs) || g != wantGw {
			t.Errorf("after Destroy: addresses %v, gateway %q; want %v, %q", addrs, g, wantAddrs, wantGw)
		}
		if _, err := netlink.LinkByName(a1.hostIf); err != nil {
			t.Errorf("the allocation's veth went: %v", err)
		}
		if _, err := os.Stat(a1.netns); err != nil {
			t.Errorf("the allocation's namespace went: %v", err)
		}
		// Unfiltered again, as Nomad made it.
		if _, err := ktTCPWorks(a1.netns, srv2); err != nil {
			t.Errorf("after Destroy: %s: %v", srv2, err)
		}
		// And ready for the task's next run.
		_, err := m.Attach(context.Background(), id, a1.netns, nil, AttachOptions{})
		ktMust(t, err)
		ktMust(t, m.Destroy(id))
		ktObjectsGone(t, m, id)
	})
}

// TestKernelAttachRefuses checks namespaces Attach cannot use.
func TestKernelAttachRefuses(t *testing.T) {
	ktRequireRoot(t)
	m := ktManager(t, "", nil)
	empty := filepath.Join(DefaultNetnsDir, ktSrvPrefix+"-empty")
	ktMust(t, createNetns(empty, nil))
	t.Cleanup(func() {
		if err := deleteNetns(empty); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	if _, err := m.Attach(context.Background(), "x/none", empty, nil, AttachOptions{}); !errors.Is(err, ErrNoInterface) {
		t.Errorf("namespace with loopback only: %v, want ErrNoInterface", err)
	}
	if _, err := m.Attach(context.Background(), "x/bad", empty, nil, AttachOptions{Replies: []Port{{"sctp", 80}}}); err == nil {
		t.Errorf("reply port sctp/80 accepted")
	}
	if _, err := m.Attach(context.Background(), "x/missing", empty+"-missing", nil, AttachOptions{}); err == nil {
		t.Errorf("missing namespace accepted")
	}
}

// TestKernelAttachReconcile: a plugin died with an attached sandbox whose
// runsc had stripped the namespace; a new manager gives the addresses back
// and removes the filter, and leaves the allocation's network alone.
func TestKernelAttachReconcile(t *testing.T) {
	ktRequireRoot(t)
	srv := ktStartServer(t)
	gw := ktStartBridge(t, srv)
	a1 := ktAddAlloc(t, 1)
	state := t.TempDir()
	m := ktManager(t, state, nil)
	const id = "alloc-r1/task"
	_, err := m.Attach(context.Background(), id, a1.netns, ktEntries(t, netip.AddrPortFrom(srv.Addr, ktTCP1).String()), AttachOptions{})
	ktMust(t, err)
	ktMust(t, m.RedirectDNS(id, netip.AddrPortFrom(gw, 5353)))
	ktStrip(t, a1.netns)

	m2 := ktManager(t, state, nil)
	ktMust(t, m2.Reconcile(map[string]bool{}))
	ktObjectsGone(t, m2, id)
	addrs, g := ktNetnsState(t, a1.netns)
	if len(addrs) != 1 || addrs[0] != a1.addr.String()+"/24" || g != gw.String() {
		t.Errorf("after Reconcile: %v via %q", addrs, g)
	}
	if _, err := netlink.LinkByName(a1.hostIf); err != nil {
		t.Errorf("the allocation's veth went: %v", err)
	}
	if _, err := ktTCPWorks(a1.netns, netip.AddrPortFrom(srv.Addr, ktTCP2)); err != nil {
		t.Errorf("after Reconcile the namespace is not as Nomad made it: %v", err)
	}
}

// TestKernelAttachIsAllOrNothing: an Attach that fails after its filter is
// in leaves no filter, no lease, and the namespace as it was.
func TestKernelAttachIsAllOrNothing(t *testing.T) {
	ktRequireRoot(t)
	gw := ktStartBridge(t, ktStartServer(t))
	a1 := ktAddAlloc(t, 1)
	m := ktManager(t, "", nil)
	const id = "alloc-f1/task"
	m.failAt = "attached"
	_, err := m.Attach(context.Background(), id, a1.netns, ktEntries(t, "peer.test:443"), AttachOptions{Replies: []Port{{"tcp", 8080}}})
	if err == nil || !strings.Contains(err.Error(), "injected failure") {
		t.Fatalf("Attach failing after its filter: %v", err)
	}
	ktObjectsGone(t, m, id)
	addrs, g := ktNetnsState(t, a1.netns)
	if len(addrs) != 1 || addrs[0] != a1.addr.String()+"/24" || g != gw.String() {
		t.Errorf("after the failed Attach: %v via %q", addrs, g)
	}
	m.failAt = ""
	_, err = m.Attach(context.Background(), id, a1.netns, nil, AttachOptions{})
	ktMust(t, err)
	ktMust(t, m.Destroy(id))
	ktObjectsGone(t, m, id)
}

// TestKernelAttachRefusesAForeignPeer: a co-located task with NET_ADMIN in
// the group's namespace can replace its interface by a veth whose peer is
// in yet another namespace, at an index that, in the root namespace,
// belongs to another allocation's host end. Attach must not take that
// interface for the sandbox's host end (the other allocation would get
// this sandbox's drop-everything filter): the host end must be the peer of
// the namespace's interface, in the namespace that was attached.
func TestKernelAttachRefusesAForeignPeer(t *testing.T) {
	ktRequireRoot(t)
	ktStartBridge(t, nil)
	victim := ktAddAlloc(t, 1)
	vh, err := netlink.LinkByName(victim.hostIf)
	ktMust(t, err)

	group := filepath.Join(DefaultNetnsDir, ktSrvPrefix+"-group")
	other := filepath.Join(DefaultNetnsDir, ktSrvPrefix+"-other")
	for _, p := range []string{group, other} {
		ktMust(t, createNetns(p, nil))
		t.Cleanup(func() {
			if err := deleteNetns(p); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		})
	}
	gh, err := netns.GetFromPath(group)
	ktMust(t, err)
	defer gh.Close()
	oh := ktHandle(t, other)
	// The veth's end in the other namespace takes the victim's host end's
	// index (free there); its peer is the group's only interface.
	ktMust(t, oh.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "p", Index: vh.Attrs().Index},
		PeerName: "eth0", PeerNamespace: netlink.NsFd(int(gh))}))
	p, err := oh.LinkByName("p")
	ktMust(t, err)
	if p.Attrs().Index != vh.Attrs().Index {
		t.Fatalf("the fake peer got index %d, want %d", p.Attrs().Index, vh.Attrs().Index)
	}
	ktMust(t, oh.LinkSetUp(p))
	h := ktHandle(t, group)
	eth, err := h.LinkByName("eth0")
	ktMust(t, err)
	ktMust(t, h.AddrAdd(eth, ktAddr(netip.MustParseAddr("10.197.0.50"), 24)))
	ktMust(t, h.LinkSetUp(eth))
	ktMust(t, h.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Gw: netip.MustParseAddr("10.197.0.1").AsSlice()}))

	m := ktManager(t, "", nil)
	const id = "alloc-x/task-foreign"
	sb, err := m.Attach(context.Background(), id, group, nil, AttachOptions{})
	if err == nil {
		t.Cleanup(func() { m.Destroy(id) })
		t.Fatalf("attached with host end %s (the other allocation's)", sb.HostIf)
	}
	t.Log(err)
	mustNotFilter(t, victim.hostIf)
}

// mustNotFilter fails if the test table has a chain hooked on dev.
func mustNotFilter(t *testing.T, dev string) {
	t.Helper()
	out, err := nftListTable(ktTable)
	if err != nil {
		return // no table: no filter
	}
	if strings.Contains(out, `device "`+dev+`"`) {
		t.Errorf("a filter is hooked on %s:\n%s", dev, out)
	}
}
