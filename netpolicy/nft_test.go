package netpolicy

import (
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/shoenig/test/must"
)

func fmtElems(els []allowElem) string {
	var parts []string
	for _, e := range els {
		r := fmt.Sprintf("%s-%s", u32Addr(e.lo), u32Addr(e.hi))
		parts = append(parts, fmt.Sprintf("%s %s %d-%d", r, protoName(e.proto), e.portLo, e.portHi))
	}
	return strings.Join(parts, ", ")
}

func TestAllowElemsDisjoint(t *testing.T) {
	entries := func(ss ...string) []Entry { return ktEntries(t, ss...) }
	cases := []struct {
		in   []Entry
		want string
	}{
		{entries("203.0.113.7:443"), "203.0.113.7-203.0.113.7 tcp 443-443"},
		// Contained in a wider entry: one element.
		{entries("203.0.113.0/24", "203.0.113.7:443"), "203.0.113.0-203.0.113.255 tcp 0-65535"},
		// A port added on part of a prefix: the prefix is cut around it.
		{entries("203.0.113.0/30:80", "203.0.113.2:443"),
			"203.0.113.0-203.0.113.1 tcp 80-80, 203.0.113.2-203.0.113.2 tcp 80-80, 203.0.113.2-203.0.113.2 tcp 443-443, 203.0.113.3-203.0.113.3 tcp 80-80"},
		// Overlapping and adjacent port ranges merge; adjacent prefixes join.
		{entries("10.0.0.0/25:100-200", "10.0.0.128/25:150-300", "10.0.0.0/24:201-400"),
			"10.0.0.0-10.0.0.127 tcp 100-400, 10.0.0.128-10.0.0.255 tcp 150-400"},
		{entries("10.0.0.0/25:1-10", "10.0.0.128/25:1-10"), "10.0.0.0-10.0.0.255 tcp 1-10"},
		// Protocols are kept apart; IPv6 and host entries are not in the set.
		{entries("10.0.0.1:53/udp", "10.0.0.1:53", "[2001:db8::1]:53", "github.com:443"),
			"10.0.0.1-10.0.0.1 tcp 53-53, 10.0.0.1-10.0.0.1 udp 53-53"},
		{entries("0.0.0.0/0:443"), "0.0.0.0-255.255.255.255 tcp 443-443"},
		{nil, ""},
	}
	for _, c := range cases {
		got := allowElems(c.in)
		if s := fmtElems(got); s != c.want {
			t.Errorf("allowElems(%v):\n got %s\nwant %s", c.in, s, c.want)
		}
		// No two elements of one protocol overlap (the kernel refuses that).
		for i, a := range got {
			for _, b := range got[i+1:] {
				if a.proto == b.proto && a.lo <= b.hi && b.lo <= a.hi && a.portLo <= b.portHi && b.portLo <= a.portHi {
					t.Errorf("allowElems(%v): %v and %v overlap", c.in, a, b)
				}
			}
		}
	}
}

func TestMergeRanges(t *testing.T) {
	got := mergeRanges(append(DefaultDeny(), netip.MustParsePrefix("10.89.0.0/16"), netip.MustParsePrefix("10.89.3.0/24")))
	want := []addrRange{
		{addrU32(netip.MustParseAddr("0.0.0.0")), addrU32(netip.MustParseAddr("0.255.255.255"))},
		{addrU32(netip.MustParseAddr("10.89.0.0")), addrU32(netip.MustParseAddr("10.89.255.255"))},
		{addrU32(netip.MustParseAddr("127.0.0.0")), addrU32(netip.MustParseAddr("127.255.255.255"))},
		{addrU32(netip.MustParseAddr("169.254.0.0")), addrU32(netip.MustParseAddr("169.254.255.255"))},
		{addrU32(netip.MustParseAddr("224.0.0.0")), 0xffffffff},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("mergeRanges = %v, want %v", got, want)
	}
}

func TestAllocate(t *testing.T) {
	c, err := Config{Subnet: netip.MustParsePrefix("10.89.0.0/28")}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	taken := map[string]*lease{}
	seen := map[netip.Addr]bool{}
	for i := 0; i < 4; i++ {
		h := c.names(fmt.Sprint("sandbox-", i)).hash
		addr, gw, err := c.allocate(h, taken)
		if err != nil {
			t.Fatal(err)
		}
		if !c.Subnet.Contains(addr.Addr()) || addr.Bits() != 30 || gw.Next() != addr.Addr() || addr.Masked().Addr().Next() != gw {
			t.Fatalf("allocate: addr %s gateway %s", addr, gw)
		}
		if seen[addr.Addr()] {
			t.Fatalf("allocate: %s handed out twice", addr)
		}
		seen[addr.Addr()] = true
		taken[h] = &lease{Hash: h, Addr: addr, Gateway: gw}
	}
	if _, _, err := c.allocate("ffffffffff", taken); err == nil || !strings.Contains(err.Error(), "all 4 /30 blocks are in use") {
		t.Fatalf("allocate on a full pool: %v", err)
	}
}

func TestConfigChecks(t *testing.T) {
	for _, c := range []Config{
		{Subnet: netip.MustParsePrefix("2001:db8::/64")},
		{Subnet: netip.MustParsePrefix("10.0.0.0/31")},
		{Prefix: "toolong"},
		{Prefix: "Ab"},
	} {
		if _, err := c.withDefaults(); err == nil {
			t.Errorf("%+v: no error", c)
		}
	}
	c, err := Config{}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	n := c.names("some/alloc/task")
	if len(n.base) > 15 || n.base != "nsbx"+n.hash || n.netns != "nsbx-"+n.hash {
		t.Errorf("names: %+v", n)
	}
	for _, s := range []string{n.base, n.netns, n.drop, n.block, n.dnsSet("tcp", 443, 443), n.cDenied} {
		if c.hashOf(s) != n.hash {
			t.Errorf("hashOf(%q) = %q, want %q", s, c.hashOf(s), n.hash)
		}
	}
	for _, s := range []string{"eth0", "nsbx", "nsbxzzzzzzzzzz", "nsbx0123456789abc", "veth0123456789"} {
		if h := c.hashOf(s); h != "" {
			t.Errorf("hashOf(%q) = %q, want none", s, h)
		}
	}
}

func TestPrivateBlock(t *testing.T) {
	pfx := netip.MustParsePrefix
	c := Config{GuardPrivate: true, OpenPrivate: []netip.Prefix{
		pfx("0.0.0.0/0"),      // names no private space
		pfx("10.1.0.0/16"),    // opens itself
		pfx("192.168.0.0/16"), // the whole block
		pfx("203.0.113.0/24"), // not private: nothing
	}}
	got := c.privateBlock()
	want := []addrRange{
		prefixRange(pfx("10.0.0.0/16")),
		{lo: addrU32(netip.MustParseAddr("10.2.0.0")), hi: addrU32(netip.MustParseAddr("10.255.255.255"))},
		prefixRange(pfx("100.64.0.0/10")),
		prefixRange(pfx("172.16.0.0/12")),
	}
	must.Eq(t, want, got)
	for _, a := range []string{"10.1.2.3", "192.168.7.7", "203.0.113.9", "8.8.8.8"} {
		must.False(t, inRanges(got, netip.MustParseAddr(a)), must.Sprint(a))
	}
	for _, a := range []string{"10.0.0.1", "10.2.0.1", "172.20.1.1", "100.100.100.100"} {
		must.True(t, inRanges(got, netip.MustParseAddr(a)), must.Sprint(a))
	}
	must.SliceEmpty(t, (&Config{OpenPrivate: c.OpenPrivate}).privateBlock())
}
