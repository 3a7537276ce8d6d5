package netpolicy

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

// TestMain checks, after the tests, that nothing of theirs is left on the
// machine (and removes it if something is), and puts IPv4 forwarding back
// as it found it.
func TestMain(m *testing.M) {
	flag.Parse()
	// Under -short (make unit) no kernel test runs: nothing to check or put
	// back, and another run's objects are not this one's leftovers.
	if os.Geteuid() != 0 || testing.Short() {
		os.Exit(m.Run())
	}
	fwd, fwdErr := readSysctl("net/ipv4/ip_forward")
	if left := ktLeftovers(); len(left) > 0 {
		fmt.Fprintf(os.Stderr, "netpolicy tests: removing leftovers of an earlier run: %v\n", left)
		ktRemoveLeftovers()
	}
	code := m.Run()
	if left := ktLeftovers(); len(left) > 0 {
		fmt.Fprintf(os.Stderr, "netpolicy tests left behind: %s\n", strings.Join(left, "; "))
		if err := ktRemoveLeftovers(); err != nil {
			fmt.Fprintf(os.Stderr, "netpolicy tests: removing leftovers: %v\n", err)
		}
		code = 1
	}
	if fwdErr == nil {
		if err := testutil.RestoreIPForward([]byte(fwd)); err != nil {
			fmt.Fprintf(os.Stderr, "netpolicy tests: %v\n", err)
		}
	}
	os.Exit(code)
}

// ktGone checks that nothing of sandbox id is left: namespace, interface,
// nftables objects, lease.
func ktGone(t *testing.T, m *Manager, id string) {
	t.Helper()
	n := m.cfg.names(id)
	if _, err := os.Stat(m.cfg.netnsPath(n)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("netns %s still there (%v)", n.netns, err)
	}
	if _, err := netlink.LinkByName(n.base); err == nil {
		t.Errorf("interface %s still there", n.base)
	}
	ktObjectsGone(t, m, id)
}

func ktCounters(t *testing.T, m *Manager, id string) Counters {
	t.Helper()
	c, err := m.Counters(id)
	ktMust(t, err)
	return c
}

// TestKernelFilter runs a sandbox namespace against a test server and
// checks what its host-side filter lets through.
func TestKernelFilter(t *testing.T) {
	ktRequireRoot(t)
	srv := ktStartServer(t)
	m := ktManager(t, "", nil)
	const id = "alloc-1/task-filter"
	allow := ktEntries(t,
		fmt.Sprintf("%s:%d", netip.PrefixFrom(srv.Addr, 30).Masked(), ktTCP1), // overlapping on purpose
		netip.AddrPortFrom(srv.Addr, ktTCP1).String(),
		"dyn.test:8082",
		"[2001:db8::1]:443", // ignored: IPv6 is dropped
	)
	sb := ktCreate(t, m, id, allow)
	if _, err := m.Create(context.Background(), id, allow); !errors.Is(err, ErrExists) {
		t.Fatalf("second Create: %v, want ErrExists", err)
	}
	if !ktSubnet.Contains(sb.Addr.Addr()) || sb.Addr.Bits() != 30 || sb.Gateway.Next() != sb.Addr.Addr() {
		t.Fatalf("sandbox addresses: %+v", sb)
	}
	if len(sb.HostIf) > 15 || sb.Netns != filepath.Join(DefaultNetnsDir, ktPrefix+"-"+sb.HostIf[len(ktPrefix):]) {
		t.Fatalf("sandbox names: %+v", sb)
	}
	t.Logf("sandbox: netns %s, host end %s, address %s, gateway %s, mac %s", sb.Netns, sb.HostIf, sb.Addr, sb.Gateway, sb.MAC)

	// Services of the node: on the gateway address (DNS on 53 and another
	// port) and on the node's own addresses.
	gwDNS := netip.AddrPortFrom(sb.Gateway, 53)
	udpDNS, err := net.ListenPacket("udp4", gwDNS.String())
	ktMust(t, err)
	t.Cleanup(func() { udpDNS.Close() })
	go testutil.ServeUDPEcho(udpDNS)
	var hostLns []net.Listener
	t.Cleanup(func() {
		for _, l := range hostLns {
			l.Close()
		}
	})
	listen := func(a netip.AddrPort) netip.AddrPort {
		ln, err := net.Listen("tcp4", a.String())
		ktMust(t, err)
		hostLns = append(hostLns, ln)
		go testutil.ServeLines(ln)
		return netip.MustParseAddrPort(ln.Addr().String())
	}
	listen(gwDNS)
	gwOther := listen(netip.AddrPortFrom(sb.Gateway, 8080))
	var nodeSvcs []netip.AddrPort
	for _, a := range ktNodeAddrs(t) {
		nodeSvcs = append(nodeSvcs, listen(netip.AddrPortFrom(a, 0)))
	}

	srv1 := netip.AddrPortFrom(srv.Addr, ktTCP1)
	srv2 := netip.AddrPortFrom(srv.Addr, ktTCP2)
	srvUDP := netip.AddrPortFrom(srv.Addr, ktUDP)
	extra2 := netip.AddrPortFrom(srv.Extra, ktTCP2)
	metadata := netip.MustParseAddr("169.254.169.254")

	// Positive controls from the root namespace: every service answers, so
	// a failure from the sandbox is the filter's doing.
	for _, a := range append([]netip.AddrPort{srv1, srv2, extra2, gwOther, gwDNS}, nodeSvcs...) {
		if _, err := ktTCPWorks("", a); err != nil {
			t.Fatalf("control: %s from the host: %v", a, err)
		}
	}
	if _, err := ktUDPEcho("", srvUDP); err != nil {
		t.Fatalf("control: UDP %s from the host: %v", srvUDP, err)
	}
	if err := ktPing("", srv.Addr); err != nil {
		t.Fatalf("control: ping %s from the host: %v", srv.Addr, err)
	}

	t.Run("allowed port answers, through the masquerade", func(t *testing.T) {
		g, err := ktTCPWorks(sb.Netns, srv1)
		if err != nil {
			t.Fatalf("%s: %v", srv1, err)
		}
		if want := "hello " + srv.HostAddr.String(); g != want {
			t.Errorf("greeting %q, want %q (source masqueraded to the host end)", g, want)
		}
	})

	t.Run("other port, UDP and ICMP to the allowed host are dropped", func(t *testing.T) {
		if _, err := ktTCPWorks(sb.Netns, srv2); err == nil {
			t.Errorf("%s reachable", srv2)
		}
		if _, err := ktUDPEcho(sb.Netns, srvUDP); err == nil {
			t.Errorf("UDP %s reachable", srvUDP)
		}
		if err := ktPing(sb.Netns, srv.Addr); err == nil {
			t.Errorf("ping %s answered", srv.Addr)
		}
	})

	t.Run("DNS on the gateway answers, its other ports do not", func(t *testing.T) {
		if r, err := ktUDPEcho(sb.Netns, gwDNS); err != nil || !strings.Contains(r, " to "+sb.Addr.Addr().String()+":") {
			t.Errorf("UDP %s: %q, %v", gwDNS, r, err)
		}
		if g, err := ktTCPWorks(sb.Netns, gwDNS); err != nil || g != "hello "+sb.Addr.Addr().String() {
			t.Errorf("TCP %s: %q, %v", gwDNS, g, err)
		}
		if _, err := ktTCPWorks(sb.Netns, gwOther); err == nil {
			t.Errorf("%s reachable", gwOther)
		}
	})

	t.Run("metadata address and the node's own addresses are unreachable", func(t *testing.T) {
		// The test server answers on 169.254.169.254 and the policy route
		// sends the pool there: only the filter stands in the way.
		for _, p := range []uint16{80, ktTCP1} {
			if _, err := ktTCPWorks(sb.Netns, netip.AddrPortFrom(metadata, p)); err == nil {
				t.Errorf("%s:%d reachable", metadata, p)
			}
		}
		if len(nodeSvcs) == 0 {
			t.Log("no node address outside the test ranges")
		}
		for _, a := range nodeSvcs {
			if _, err := ktTCPWorks(sb.Netns, a); err == nil {
				t.Errorf("node service %s reachable", a)
			}
		}
	})

	t.Run("denials name the denied destinations", func(t *testing.T) {
		d, err := m.Denials(id)
		ktMust(t, err)
		t.Logf("denials: %v", d)
		want := []string{
			srv2.String() + "/tcp",
			srvUDP.String() + "/udp",
			srv.Addr.String() + "/icmp",
			gwOther.String() + "/tcp",
			metadata.String() + ":80/tcp",
			fmt.Sprintf("%s:%d/tcp", metadata, ktTCP1),
		}
		for _, a := range nodeSvcs {
			want = append(want, a.String()+"/tcp")
		}
		for _, k := range want {
			if d[k] == 0 {
				t.Errorf("denials lack %s", k)
			}
		}
		for k := range d {
			if strings.HasPrefix(k, srv1.String()) || strings.HasPrefix(k, gwDNS.String()) {
				t.Errorf("allowed destination among the denials: %s", k)
			}
		}
		if c := ktCounters(t, m, id); c.Denied < uint64(len(want)) {
			t.Errorf("denied counter %d, want at least %d", c.Denied, len(want))
		}
	})

	t.Run("DNS grant opens a destination until its ttl, open connections survive it", func(t *testing.T) {
		dyn := allow[2]
		if _, err := ktTCPWorks(sb.Netns, extra2); err == nil {
			t.Fatalf("%s reachable before the grant", extra2)
		}
		if err := m.Allow(id, srv.Extra, dyn, 2*time.Second); err != nil {
			t.Fatal(err)
		}
		conn, g, err := ktDial(sb.Netns, netip.Addr{}, extra2)
		if err != nil {
			t.Fatalf("%s after the grant: %v", extra2, err)
		}
		defer conn.Close()
		t.Logf("granted: %s", g)
		// The port of the grant only.
		if _, err := ktTCPWorks(sb.Netns, netip.AddrPortFrom(srv.Extra, ktTCP1)); err == nil {
			t.Errorf("%s:%d reachable under a grant for %d", srv.Extra, ktTCP1, ktTCP2)
		}
		// The grant expires: new connections fail again.
		err = ktEventually(15*time.Second, func() error {
			if _, err := ktTCPWorks(sb.Netns, extra2); err == nil {
				return errors.New("still reachable")
			}
			return nil
		})
		if err != nil {
			t.Fatalf("%s after the ttl: %v", extra2, err)
		}
		// The connection opened under the grant still carries traffic.
		conn.SetDeadline(time.Now().Add(ktTimeout))
		if _, err := fmt.Fprintf(conn, "still there\n"); err != nil {
			t.Fatalf("write on the granted connection: %v", err)
		}
		buf := make([]byte, 64)
		n, err := conn.Read(buf)
		if err != nil || string(buf[:n]) != "still there\n" {
			t.Fatalf("echo on the granted connection after the ttl: %q, %v", buf[:n], err)
		}

		// AllowName grants by name, for every entry that matches it.
		if err := m.AllowName(id, "DYN.test.", srv.Extra, time.Minute); err != nil {
			t.Fatal(err)
		}
		if _, err := ktTCPWorks(sb.Netns, extra2); err != nil {
			t.Errorf("%s after AllowName: %v", extra2, err)
		}

		// What Allow refuses.
		other := ktEntries(t, "other.test:8082")[0]
		for _, c := range []struct {
			name string
			err  error
			want error
		}{
			{"entry not in the allowlist", m.Allow(id, srv.Extra, other, time.Minute), ErrNotAllowed},
			{"IP entry", m.Allow(id, srv.Extra, allow[0], time.Minute), ErrNotAllowed},
			{"name not in the allowlist", m.AllowName(id, "other.test", srv.Extra, time.Minute), ErrNotAllowed},
			{"metadata address", m.Allow(id, metadata, dyn, time.Minute), ErrDeniedAddr},
			{"pool address", m.Allow(id, sb.Gateway, dyn, time.Minute), ErrDeniedAddr},
			{"IPv6", m.Allow(id, netip.MustParseAddr("2001:db8::1"), dyn, time.Minute), ErrIPv6},
			{"unknown sandbox", m.Allow("nope", srv.Extra, dyn, time.Minute), ErrNotFound},
		} {
			if !errors.Is(c.err, c.want) {
				t.Errorf("%s: %v, want %v", c.name, c.err, c.want)
			}
		}
	})

	t.Run("spoofed source address gets nothing through", func(t *testing.T) {
		spoof := netip.MustParseAddr("10.198.255.254")
		h := ktHandle(t, sb.Netns)
		eth, err := h.LinkByName("eth0")
		ktMust(t, err)
		ktMust(t, h.AddrAdd(eth, ktAddr(spoof, 32)))
		defer h.AddrDel(eth, ktAddr(spoof, 32))
		before := ktCounters(t, m, id)
		if c, _, err := ktDial(sb.Netns, spoof, srv1); err == nil {
			c.Close()
			t.Errorf("%s reachable from %s", srv1, spoof)
		}
		if c, _, err := ktDial(sb.Netns, spoof, gwDNS); err == nil {
			c.Close()
			t.Errorf("%s reachable from %s", gwDNS, spoof)
		}
		if after := ktCounters(t, m, id); after.Spoofed <= before.Spoofed {
			t.Errorf("spoofed counter %d -> %d", before.Spoofed, after.Spoofed)
		}
		// The real address still works.
		if _, err := ktTCPWorks(sb.Netns, srv1); err != nil {
			t.Errorf("%s from the sandbox's own address: %v", srv1, err)
		}
	})

	t.Run("spoofed MAC gets nothing through", func(t *testing.T) {
		h := ktHandle(t, sb.Netns)
		eth, err := h.LinkByName("eth0")
		ktMust(t, err)
		host, err := netlink.LinkByName(sb.HostIf)
		ktMust(t, err)
		// A permanent neighbour entry for the gateway, so that what is
		// tested is the frame's source MAC, not ARP.
		neigh := &netlink.Neigh{LinkIndex: eth.Attrs().Index, State: netlink.NUD_PERMANENT,
			IP: sb.Gateway.AsSlice(), HardwareAddr: host.Attrs().HardwareAddr}
		ktMust(t, h.NeighSet(neigh))
		defer h.NeighDel(neigh)
		ktMust(t, h.LinkSetHardwareAddr(eth, net.HardwareAddr{0x02, 0, 0, 0, 0, 0x01}))
		restored := false
		defer func() {
			if !restored {
				h.LinkSetHardwareAddr(eth, sb.MAC)
			}
		}()
		before := ktCounters(t, m, id)
		if _, err := ktTCPWorks(sb.Netns, srv1); err == nil {
			t.Errorf("%s reachable from another MAC", srv1)
		}
		if after := ktCounters(t, m, id); after.Spoofed <= before.Spoofed {
			t.Errorf("spoofed counter %d -> %d", before.Spoofed, after.Spoofed)
		}
		ktMust(t, h.LinkSetHardwareAddr(eth, sb.MAC))
		restored = true
		if _, err := ktTCPWorks(sb.Netns, srv1); err != nil {
			t.Errorf("%s with the MAC restored: %v", srv1, err)
		}
	})

	t.Run("ARP claiming another address is dropped", func(t *testing.T) {
		host, err := netlink.LinkByName(sb.HostIf)
		ktMust(t, err)
		other := netip.MustParseAddr("10.198.255.253")
		bcast := net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
		before := ktCounters(t, m, id)
		frame := append(ktEther(bcast, sb.MAC, 0x0806), ktARP(sb.MAC, other, sb.Gateway)...)
		ktMust(t, ktSendFrame(sb.Netns, "eth0", frame))
		err = ktEventually(2*time.Second, func() error {
			if after := ktCounters(t, m, id); after.Spoofed <= before.Spoofed {
				return fmt.Errorf("spoofed counter %d -> %d", before.Spoofed, after.Spoofed)
			}
			return nil
		})
		if err != nil {
			t.Error(err)
		}
		neighs, err := netlink.NeighList(host.Attrs().Index, netlink.FAMILY_V4)
		ktMust(t, err)
		for _, n := range neighs {
			if n.IP.Equal(other.AsSlice()) {
				t.Errorf("the host learned %s from a spoofed ARP: %v", other, n)
			}
		}
	})

	t.Run("IPv6 is dropped", func(t *testing.T) {
		host, err := netlink.LinkByName(sb.HostIf)
		ktMust(t, err)
		// Give the host end IPv6 and a listener, so that a frame the filter
		// let through would be received.
		ktMust(t, writeSysctl("net/ipv6/conf/"+sb.HostIf+"/disable_ipv6", "0"))
		defer writeSysctl("net/ipv6/conf/"+sb.HostIf+"/disable_ipv6", "1")
		hostV6 := netip.MustParseAddr("fd99::1")
		a := ktAddr(hostV6, 64)
		a.Flags = 0x02 // IFA_F_NODAD
		ktMust(t, netlink.AddrAdd(host, a))
		pc, err := net.ListenPacket("udp6", netip.AddrPortFrom(hostV6, 0).String())
		ktMust(t, err)
		defer pc.Close()
		port := uint16(pc.LocalAddr().(*net.UDPAddr).Port)
		before := ktCounters(t, m, id)
		pkt := ktIPv6UDP(netip.MustParseAddr("fd99::2"), hostV6, 40000, port, []byte("v6"))
		frame := append(ktEther(host.Attrs().HardwareAddr, sb.MAC, 0x86dd), pkt...)
		ktMust(t, ktSendFrame(sb.Netns, "eth0", frame))
		pc.SetReadDeadline(time.Now().Add(ktTimeout))
		if n, from, err := pc.ReadFrom(make([]byte, 64)); err == nil {
			t.Errorf("host received %d bytes over IPv6 from %s", n, from)
		}
		if after := ktCounters(t, m, id); after.IPv6 <= before.IPv6 {
			t.Errorf("IPv6 counter %d -> %d", before.IPv6, after.IPv6)
		}
	})

	t.Run("VLAN-tagged and other frames are dropped", func(t *testing.T) {
		host, err := netlink.LinkByName(sb.HostIf)
		ktMust(t, err)
		before := ktCounters(t, m, id)
		// An 802.1Q frame around an IPv4 header, and an unknown ether type.
		tagged := append(ktEther(host.Attrs().HardwareAddr, sb.MAC, 0x8100), 0, 5, 0x08, 0x00)
		tagged = append(tagged, make([]byte, 46)...)
		ktMust(t, ktSendFrame(sb.Netns, "eth0", tagged))
		ktMust(t, ktSendFrame(sb.Netns, "eth0", append(ktEther(host.Attrs().HardwareAddr, sb.MAC, 0x88b5), make([]byte, 46)...)))
		err = ktEventually(2*time.Second, func() error {
			if after := ktCounters(t, m, id); after.Other < before.Other+2 {
				return fmt.Errorf("other counter %d -> %d", before.Other, after.Other)
			}
			return nil
		})
		if err != nil {
			t.Error(err)
		}
	})

	t.Run("ruleset", func(t *testing.T) {
		// What the filter looks like, for the record.
		if out, err := nftListTable(ktTable); err == nil {
			t.Logf("\n%s", out)
		}
	})
}

// TestKernelCreateIsAllOrNothing makes Create fail at each step and checks
// that nothing is left.
func TestKernelCreateIsAllOrNothing(t *testing.T) {
	ktRequireRoot(t)
	m := ktManager(t, "", nil)
	const id = "alloc-2/task-atomic"
	allow := ktEntries(t, "10.199.2.2:80", "dyn.test:443")
	for _, step := range []string{"netns", "veth", "filter", "forwarding", "up"} {
		m.failAt = step
		_, err := m.Create(context.Background(), id, allow)
		if err == nil || !strings.Contains(err.Error(), "injected failure at "+step) {
			t.Fatalf("Create failing at %s: %v", step, err)
		}
		ktGone(t, m, id)
	}
	m.failAt = ""
	// A cancelled context fails the same way.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := m.Create(ctx, id, allow); !errors.Is(err, context.Canceled) {
		t.Fatalf("Create with a cancelled context: %v", err)
	}
	ktGone(t, m, id)
	// A batch the kernel refuses: a set of another type already holds the
	// name of the sandbox's allow set. Nothing of the batch is applied and
	// the undo removes the rest (the squatting set too: it carries the
	// sandbox's name).
	c, err := nftables.New()
	ktMust(t, err)
	tb := c.AddTable(&nftables.Table{Family: nftables.TableFamilyNetdev, Name: ktTable})
	ktMust(t, c.AddSet(&nftables.Set{Table: tb, Name: m.cfg.names(id).allow, KeyType: nftables.TypeIPAddr}, nil))
	ktMust(t, c.Flush())
	if _, err := m.Create(context.Background(), id, allow); err == nil || !strings.Contains(err.Error(), ": filter: nftables:") {
		t.Fatalf("Create with a refused batch: %v", err)
	}
	ktGone(t, m, id)

	sb, err := m.Create(context.Background(), id, allow)
	ktMust(t, err)
	ktMust(t, m.Destroy(id))
	ktGone(t, m, id)
	if _, err := os.Stat(sb.Netns); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("netns after Destroy: %v", err)
	}
}

// TestKernelDestroy checks that Destroy removes everything, can be repeated,
// and that the id can be used again afterwards.
func TestKernelDestroy(t *testing.T) {
	ktRequireRoot(t)
	m := ktManager(t, "", nil)
	const id = "alloc-3/task-destroy"
	sb, err := m.Create(context.Background(), id, ktEntries(t, "dyn.test:443", "10.199.3.2"))
	ktMust(t, err)
	if got, err := m.Get(id); err != nil || got.Addr != sb.Addr || got.MAC.String() != sb.MAC.String() {
		t.Errorf("Get = %+v, %v; want %+v", got, err, sb)
	}
	ktMust(t, m.Destroy(id))
	if _, err := m.Get(id); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after Destroy: %v", err)
	}
	ktGone(t, m, id)
	ktMust(t, m.Destroy(id))
	if _, err := m.Denials(id); !errors.Is(err, ErrNotFound) {
		t.Errorf("Denials after Destroy: %v", err)
	}
	if _, err := m.Counters(id); !errors.Is(err, ErrNotFound) {
		t.Errorf("Counters after Destroy: %v", err)
	}
	if err := m.Allow(id, netip.MustParseAddr("10.199.3.2"), ktEntries(t, "dyn.test:443")[0], time.Minute); !errors.Is(err, ErrNotFound) {
		t.Errorf("Allow after Destroy: %v", err)
	}
	_, err = m.Create(context.Background(), id, nil)
	ktMust(t, err)
	ktMust(t, m.Destroy(id))
	ktGone(t, m, id)
}

// TestKernelReconcile simulates a plugin that died with sandboxes up: a
// new Manager on the same state removes those not live, and orphans.
func TestKernelReconcile(t *testing.T) {
	ktRequireRoot(t)
	srv := ktStartServer(t)
	dir := t.TempDir()
	noMasq := func(c *Config) { c.Masquerade = false }
	crashed := ktManager(t, dir, noMasq)
	allow := ktEntries(t, netip.AddrPortFrom(srv.Addr, ktTCP1).String())
	a, err := crashed.Create(context.Background(), "alloc-4/a", allow)
	ktMust(t, err)
	b, err := crashed.Create(context.Background(), "alloc-4/b", allow)
	ktMust(t, err)
	if a.Addr == b.Addr || a.MAC.String() == b.MAC.String() {
		t.Fatalf("two sandboxes share an address: %+v %+v", a, b)
	}
	// Without the masquerade the server sees the sandbox's own address.
	if g, err := ktTCPWorks(a.Netns, netip.AddrPortFrom(srv.Addr, ktTCP1)); err != nil || g != "hello "+a.Addr.Addr().String() {
		t.Fatalf("from a: %q, %v", g, err)
	}
	// Sandboxes cannot reach each other, even where one listens: a's filter
	// denies the pool. (Nothing can connect into a sandbox: its answers
	// leave through its own filter, which lets them out only towards
	// allowed destinations.)
	var bln net.Listener
	ktMust(t, ktIn(b.Netns, func() (err error) {
		bln, err = net.Listen("tcp4", ":8081")
		return err
	}))
	defer bln.Close()
	go testutil.ServeLines(bln)
	bsvc := netip.AddrPortFrom(b.Addr.Addr(), 8081)
	if _, err := ktTCPWorks(b.Netns, bsvc); err != nil {
		t.Fatalf("control: %s from b itself: %v", bsvc, err)
	}
	if _, err := ktTCPWorks(a.Netns, bsvc); err == nil {
		t.Errorf("a reached b at %s", bsvc)
	}
	if d, err := crashed.Denials("alloc-4/a"); err != nil || d[bsvc.String()+"/tcp"] == 0 {
		t.Errorf("denials of a: %v, %v; want %s/tcp", d, err, bsvc)
	}
	// An orphan: an interface of ours with no lease.
	orphan := crashed.cfg.names("alloc-4/orphan")
	ktMust(t, netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: orphan.base}, PeerName: orphan.base + "p"}))
	// The plugin dies: a new Manager on the same state directory.
	restarted := ktManager(t, dir, noMasq)
	ktMust(t, restarted.Reconcile(map[string]bool{"alloc-4/b": true}))
	ktGone(t, restarted, "alloc-4/a")
	ktGone(t, restarted, "alloc-4/orphan")
	if _, err := os.Stat(b.Netns); err != nil {
		t.Errorf("live sandbox b lost its netns: %v", err)
	}
	if _, err := ktTCPWorks(b.Netns, netip.AddrPortFrom(srv.Addr, ktTCP1)); err != nil {
		t.Errorf("live sandbox b after Reconcile: %v", err)
	}
	// The restarted manager serves b.
	if _, err := restarted.Denials("alloc-4/b"); err != nil {
		t.Errorf("Denials of b after restart: %v", err)
	}
	if got, err := restarted.Get("alloc-4/b"); err != nil || got.Addr != b.Addr || got.Gateway != b.Gateway ||
		got.Netns != b.Netns || got.HostIf != b.HostIf || got.MAC.String() != b.MAC.String() {
		t.Errorf("Get(b) after restart = %+v, %v; want %+v", got, err, b)
	}
	if _, err := restarted.Get("alloc-4/a"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get(a) after Reconcile: %v", err)
	}
	ktMust(t, restarted.Reconcile(nil))
	ktGone(t, restarted, "alloc-4/b")
	c, err := nftables.New()
	ktMust(t, err)
	tables, err := c.ListTables()
	ktMust(t, err)
	for _, tb := range tables {
		if tb.Name == ktTable {
			t.Errorf("table %s (family %d) left after the last sandbox", tb.Name, tb.Family)
		}
	}
}

// TestKernelConnLimit: a sandbox holds at most MaxConns conntrack entries
// of its own: a new flow beyond them is dropped.
func TestKernelConnLimit(t *testing.T) {
	ktRequireRoot(t)
	srv := ktStartServer(t)
	m := ktManager(t, "", nil)
	const id = "alloc-1/task-connlimit"
	sb := ktCreate(t, m, id, ktEntries(t, fmt.Sprintf("%s:%d/udp", srv.Addr, ktUDP)))
	dst := netip.AddrPortFrom(srv.Addr, ktUDP)
	if _, err := ktUDPEcho(sb.Netns, dst); err != nil {
		t.Fatalf("control: UDP echo: %v", err)
	}
	// One datagram from each of MaxConns source ports (fixed ones: an
	// ephemeral port may come back, and with it the same flow): each is a
	// flow conntrack keeps for 30 s.
	ktMust(t, ktIn(sb.Netns, func() error {
		for i := 0; i < MaxConns; i++ {
			d := net.Dialer{LocalAddr: &net.UDPAddr{Port: 20000 + i}}
			c, err := d.Dial("udp4", dst.String())
			if err != nil {
				return err
			}
			_, err = c.Write([]byte("flow"))
			c.Close()
			if err != nil {
				return err
			}
		}
		return nil
	}))
	count := func() int {
		b, err := os.ReadFile("/proc/net/nf_conntrack")
		if err != nil {
			t.Skipf("no /proc/net/nf_conntrack: %v", err)
		}
		return strings.Count(string(b), "src="+sb.Addr.Addr().String()+" dst="+srv.Addr.String()+" ")
	}
	ktMust(t, ktEventually(10*time.Second, func() error {
		if n := count(); n < MaxConns {
			return fmt.Errorf("%d conntrack entries, want %d", n, MaxConns)
		}
		return nil
	}))
	if _, err := ktUDPEcho(sb.Netns, dst); err == nil {
		t.Fatalf("a new flow beyond %d open ones got through", MaxConns)
	}
	if n := count(); n > MaxConns {
		t.Fatalf("%d conntrack entries from the sandbox, more than %d", n, MaxConns)
	}
}

// TestKernelDNSTCPConnLimit: TCP connections to the sandbox's DNS service
// are not under MaxConns (the gateway is left out of it), and the service
// accepts only a few at a time: the rest would wait in the listener's
// accept queue, each an established conntrack entry (kept for days) for as
// long as the sandbox holds it. A sandbox has at most MaxDNSTCPConns of
// them open; one more is dropped.
func TestKernelDNSTCPConnLimit(t *testing.T) {
	ktRequireRoot(t)
	m := ktManager(t, "", nil)
	const id = "alloc-1/task-dnstcp"
	sb := ktCreate(t, m, id, ktEntries(t, "10.199.9.2:443"))
	// A listener on the gateway that never accepts: every connection
	// stays in its accept queue.
	ln, err := net.Listen("tcp4", netip.AddrPortFrom(sb.Gateway, 53).String())
	ktMust(t, err)
	t.Cleanup(func() { ln.Close() })

	var open []net.Conn
	t.Cleanup(func() {
		for _, c := range open {
			c.Close()
		}
	})
	const extra = 3
	failed := 0
	ktMust(t, ktIn(sb.Netns, func() error {
		for i := 0; i < MaxDNSTCPConns+extra; i++ {
			d := net.Dialer{Timeout: 500 * time.Millisecond}
			c, err := d.Dial("tcp4", ln.Addr().String())
			if err != nil {
				failed++
				continue
			}
			open = append(open, c)
		}
		return nil
	}))
	if len(open) > MaxDNSTCPConns {
		t.Fatalf("%d TCP connections to the DNS service open at once, more than %d", len(open), MaxDNSTCPConns)
	}
	if len(open) < MaxDNSTCPConns {
		t.Fatalf("only %d TCP connections to the DNS service, want %d (%d failed)", len(open), MaxDNSTCPConns, failed)
	}
	// Closing one (with a reset: conntrack then forgets it at once) frees
	// its place.
	open[0].(*net.TCPConn).SetLinger(0)
	open[0].Close()
	open = open[1:]
	ktMust(t, ktEventually(10*time.Second, func() error {
		return ktIn(sb.Netns, func() error {
			d := net.Dialer{Timeout: 500 * time.Millisecond}
			c, err := d.Dial("tcp4", ln.Addr().String())
			if err != nil {
				return err
			}
			open = append(open, c)
			return nil
		})
	}))
}

// TestKernelBroadcastAndMulticastToTheNode: even with every address
// allowlisted for a port, datagrams to the limited broadcast address, the
// broadcast address of the sandbox's own link and of another link of the
// node, and to the all-hosts multicast group never reach a listener of the
// node on that port.
func TestKernelBroadcastAndMulticastToTheNode(t *testing.T) {
	ktRequireRoot(t)
	srv := ktStartServer(t)
	pc, err := net.ListenPacket("udp4", "0.0.0.0:0")
	ktMust(t, err)
	t.Cleanup(func() { pc.Close() })
	port := uint16(pc.LocalAddr().(*net.UDPAddr).Port)
	got := make(chan string, 16)
	go func() {
		buf := make([]byte, 64)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			got <- fmt.Sprintf("%q from %s", buf[:n], from)
		}
	}()
	// Control: the listener hears a datagram from the node itself.
	c, err := net.Dial("udp4", netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port).String())
	ktMust(t, err)
	c.Write([]byte("control"))
	c.Close()
	select {
	case <-got:
	case <-time.After(ktTimeout):
		t.Fatal("control: the listener heard nothing")
	}

	m := ktManager(t, "", nil)
	const id = "alloc-1/task-bcast"
	sb := ktCreate(t, m, id, ktEntries(t, fmt.Sprintf("0.0.0.0/0:%d/udp", port)))
	ownBcast := netip.PrefixFrom(sb.Addr.Addr(), sb.Addr.Bits()).Masked().Addr()
	for i := 0; i < 1<<(32-sb.Addr.Bits())-1; i++ {
		ownBcast = ownBcast.Next()
	}
	other := srv.HostAddr.As4()
	other[3] |= 3 // the broadcast address of its /30
	targets := []netip.Addr{
		netip.MustParseAddr("255.255.255.255"),
		ownBcast,
		netip.AddrFrom4(other),
		netip.MustParseAddr("224.0.0.1"),
	}
	ktMust(t, ktIn(sb.Netns, func() error {
		for _, dst := range targets {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
			if err != nil {
				return err
			}
			unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_BROADCAST, 1)
			err = unix.Sendto(fd, []byte("from the sandbox to "+dst.String()), 0, &unix.SockaddrInet4{Port: int(port), Addr: dst.As4()})
			unix.Close(fd)
			if err != nil {
				t.Logf("send to %s: %v", dst, err)
			}
		}
		return nil
	}))
	select {
	case s := <-got:
		t.Fatalf("the node's listener got %s", s)
	case <-time.After(ktTimeout):
	}
}
