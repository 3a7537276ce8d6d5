package netpolicy

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
)

func TestParseEgressValid(t *testing.T) {
	pfx := netip.MustParsePrefix
	cases := []struct {
		in   string
		want Entry
		str  string // canonical String(); "" means in
	}{
		{"203.0.113.0/24", Entry{Prefix: pfx("203.0.113.0/24"), Proto: "tcp"}, ""},
		{"203.0.113.7", Entry{Prefix: pfx("203.0.113.7/32"), Proto: "tcp"}, ""},
		{"203.0.113.7/32", Entry{Prefix: pfx("203.0.113.7/32"), Proto: "tcp"}, "203.0.113.7"},
		{"203.0.113.7:443", Entry{Prefix: pfx("203.0.113.7/32"), PortLo: 443, PortHi: 443, Proto: "tcp"}, ""},
		{"203.0.113.7:443/tcp", Entry{Prefix: pfx("203.0.113.7/32"), PortLo: 443, PortHi: 443, Proto: "tcp"}, "203.0.113.7:443"},
		{"10.1.2.3:53/udp", Entry{Prefix: pfx("10.1.2.3/32"), PortLo: 53, PortHi: 53, Proto: "udp"}, ""},
		{"10.1.2.3:53/UDP", Entry{Prefix: pfx("10.1.2.3/32"), PortLo: 53, PortHi: 53, Proto: "udp"}, "10.1.2.3:53/udp"},
		{"10.1.2.3/udp", Entry{Prefix: pfx("10.1.2.3/32"), Proto: "udp"}, ""},
		{"10.0.0.0/8/udp", Entry{Prefix: pfx("10.0.0.0/8"), Proto: "udp"}, ""},
		{"198.51.100.9:8000-8100", Entry{Prefix: pfx("198.51.100.9/32"), PortLo: 8000, PortHi: 8100, Proto: "tcp"}, ""},
		{"198.51.100.9:443-443", Entry{Prefix: pfx("198.51.100.9/32"), PortLo: 443, PortHi: 443, Proto: "tcp"}, "198.51.100.9:443"},
		{"203.0.113.0/24:443", Entry{Prefix: pfx("203.0.113.0/24"), PortLo: 443, PortHi: 443, Proto: "tcp"}, ""},
		{"[2001:db8::1]:443", Entry{Prefix: pfx("2001:db8::1/128"), PortLo: 443, PortHi: 443, Proto: "tcp"}, ""},
		{"2001:db8::1", Entry{Prefix: pfx("2001:db8::1/128"), Proto: "tcp"}, ""},
		{"2001:db8::/32", Entry{Prefix: pfx("2001:db8::/32"), Proto: "tcp"}, ""},
		{"[2001:db8::/32]:1-1024/udp", Entry{Prefix: pfx("2001:db8::/32"), PortLo: 1, PortHi: 1024, Proto: "udp"}, ""},
		{"::ffff:10.1.2.3", Entry{Prefix: pfx("10.1.2.3/32"), Proto: "tcp"}, "10.1.2.3"},
		{"github.com:443", Entry{Host: "github.com", PortLo: 443, PortHi: 443, Proto: "tcp"}, ""},
		{"GitHub.COM.:443", Entry{Host: "github.com", PortLo: 443, PortHi: 443, Proto: "tcp"}, "github.com:443"},
		{"github.com", Entry{Host: "github.com", Proto: "tcp"}, ""},
		{"*.pypi.org:443", Entry{Host: "pypi.org", Wildcard: true, PortLo: 443, PortHi: 443, Proto: "tcp"}, ""},
		{"ntp.example.net:123/udp", Entry{Host: "ntp.example.net", PortLo: 123, PortHi: 123, Proto: "udp"}, ""},
		{"_srv.x-y.example:1", Entry{Host: "_srv.x-y.example", PortLo: 1, PortHi: 1, Proto: "tcp"}, ""},
		{"localhost:80", Entry{Host: "localhost", PortLo: 80, PortHi: 80, Proto: "tcp"}, ""},
		{" 10.1.2.3:22 ", Entry{Prefix: pfx("10.1.2.3/32"), PortLo: 22, PortHi: 22, Proto: "tcp"}, "10.1.2.3:22"},
		{"1.2.3.4:65535", Entry{Prefix: pfx("1.2.3.4/32"), PortLo: 65535, PortHi: 65535, Proto: "tcp"}, ""},
	}
	for _, c := range cases {
		got, err := ParseEgress(c.in)
		if err != nil {
			t.Errorf("ParseEgress(%q): %v", c.in, err)
			continue
		}
		if got != c.want {
			t.Errorf("ParseEgress(%q) = %+v, want %+v", c.in, got, c.want)
		}
		want := c.str
		if want == "" {
			want = c.in
		}
		if s := got.String(); s != want {
			t.Errorf("ParseEgress(%q).String() = %q, want %q", c.in, s, want)
		}
		// The canonical form reads back to the same entry.
		again, err := ParseEgress(got.String())
		if err != nil || again != got {
			t.Errorf("ParseEgress(%q) = %+v, %v; want %+v", got.String(), again, err, got)
		}
	}
}

func TestParseEgressInvalid(t *testing.T) {
	const forms = "; accepted forms: IP or IP/prefix (any port), IP:port, IP:port-port, [IPv6]:port, " +
		"host:port, *.domain:port, each optionally followed by /tcp (the default) or /udp"
	cases := []struct{ in, msg string }{
		{"", `egress entry "": empty`},
		{"   ", `egress entry "   ": empty`},
		{"10.1.2.3:53/sctp", `egress entry "10.1.2.3:53/sctp": unknown protocol "sctp" (want tcp or udp)`},
		{"/udp", `egress entry "/udp": no address or host before /udp`},
		{":443", `egress entry ":443": no address or host`},
		{"10.1.2.3:", `egress entry "10.1.2.3:": invalid port ""`},
		{"10.1.2.3:http", `egress entry "10.1.2.3:http": invalid port "http"`},
		{"10.1.2.3:0", `egress entry "10.1.2.3:0": port 0 out of range 1-65535`},
		{"10.1.2.3:65536", `egress entry "10.1.2.3:65536": port 65536 out of range 1-65535`},
		{"10.1.2.3:-5", `egress entry "10.1.2.3:-5": invalid port ""`},
		{"10.1.2.3:9-1", `egress entry "10.1.2.3:9-1": port range 9-1 is reversed`},
		{"10.1.2.3:1-2-3", `egress entry "10.1.2.3:1-2-3": invalid port "2-3"`},
		{"203.0.113.7/24", `egress entry "203.0.113.7/24": prefix has host bits set (did you mean 203.0.113.0/24?)`},
		{"203.0.113.0/33", `egress entry "203.0.113.0/33": invalid prefix "203.0.113.0/33"`},
		{"10.1.2:80", `egress entry "10.1.2:80": invalid IP address "10.1.2"`},
		{"300.1.2.3", `egress entry "300.1.2.3": invalid IP address "300.1.2.3"`},
		{"[2001:db8::1", `egress entry "[2001:db8::1": missing ']'`},
		{"[2001:db8::1]443", `egress entry "[2001:db8::1]443": unexpected "443" after ']'`},
		{"[10.1.2.3]:443", `egress entry "[10.1.2.3]:443": brackets are only for IPv6 addresses`},
		{"fe80::1%eth0", `egress entry "fe80::1%eth0": address with a zone`},
		{"exa mple.com:443", `egress entry "exa mple.com:443": invalid host name "exa mple.com"`},
		{"-bad.example:443", `egress entry "-bad.example:443": invalid host name "-bad.example"`},
		{"a..b:443", `egress entry "a..b:443": invalid host name "a..b"`},
		{"foo.*.com:443", `egress entry "foo.*.com:443": "*" is only allowed as the whole first label ("*.example.com")`},
		{"*:443", `egress entry "*:443": "*" is only allowed as the whole first label ("*.example.com")`},
		{"*.*.pypi.org", `egress entry "*.*.pypi.org": "*" is only allowed as the whole first label ("*.example.com")`},
		{"*.com:443", `egress entry "*.com:443": wildcard "*.com" would cover a whole top-level domain`},
		{"*.", `egress entry "*.": "*" is only allowed as the whole first label ("*.example.com")`},
		{"http://github.com", `egress entry "http://github.com": a URL, not an entry; write host:port`},
	}
	for _, c := range cases {
		_, err := ParseEgress(c.in)
		if err == nil {
			t.Errorf("ParseEgress(%q): no error, want %s", c.in, c.msg)
			continue
		}
		if got, want := err.Error(), c.msg+forms; got != want {
			t.Errorf("ParseEgress(%q):\n got %s\nwant %s", c.in, got, want)
		}
		if _, ok := err.(*EntryError); !ok {
			t.Errorf("ParseEgress(%q): error is %T, want *EntryError", c.in, err)
		}
	}
}

func TestEntryMatchesHost(t *testing.T) {
	must := func(s string) Entry {
		e, err := ParseEgress(s)
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
	wild, exact, ip := must("*.pypi.org:443"), must("github.com:443"), must("10.1.2.3:443")
	cases := []struct {
		e    Entry
		name string
		want bool
	}{
		{wild, "files.pypi.org", true},
		{wild, "a.b.pypi.org", true},
		{wild, "FILES.PyPI.org.", true},
		{wild, "pypi.org", false},
		{wild, "pypi.org.evil.com", false},
		{wild, "xpypi.org", false},
		{wild, "evil.com", false},
		{wild, ".pypi.org", false},
		{wild, "files..pypi.org", false},
		{wild, "", false},
		{exact, "github.com", true},
		{exact, "GitHub.com.", true},
		{exact, "api.github.com", false},
		{exact, "github.com.evil.com", false},
		{exact, "xgithub.com", false},
		{ip, "10.1.2.3", false},
	}
	for _, c := range cases {
		if got := c.e.MatchesHost(c.name); got != c.want {
			t.Errorf("%s.MatchesHost(%q) = %v, want %v", c.e, c.name, got, c.want)
		}
	}
}

func TestEntryCovers(t *testing.T) {
	cases := []struct {
		outer, inner string
		want         bool
	}{
		// Prefixes: the outer contains the inner's addresses.
		{"10.198.0.0/16:443", "10.198.3.4:443", true},
		{"10.198.0.0/16:443", "10.198.0.0/24:443", true},
		{"10.198.0.0/16:443", "10.198.0.0/16:443", true},
		{"10.198.0.0/16:443", "10.0.0.0/8:443", false},
		{"10.198.0.0/16:443", "10.199.0.1:443", false},
		{"0.0.0.0/0", "203.0.113.7:22", true},
		{"0.0.0.0/0", "2001:db8::1", false},
		{"2001:db8::/32", "[2001:db8::1]:443", true},
		{"2001:db8::/32", "10.1.2.3", false},
		// Ports: an outer without ports covers any; an inner without
		// ports is any port, covered only by an outer without ports.
		{"10.198.0.0/16:443", "10.198.3.4:80", false},
		{"10.198.0.0/16:443", "10.198.3.4", false},
		{"10.198.0.0/16", "10.198.3.4:80", true},
		{"10.198.0.0/16", "10.198.3.4", true},
		{"10.1.2.3:8000-8100", "10.1.2.3:8000-8100", true},
		{"10.1.2.3:8000-8100", "10.1.2.3:8050-8060", true},
		{"10.1.2.3:8000-8100", "10.1.2.3:7999-8050", false},
		{"10.1.2.3:8000-8100", "10.1.2.3:8050-8101", false},
		{"10.1.2.3:1-65535", "10.1.2.3", false},
		// Protocols: tcp is the default and covers no udp.
		{"10.1.2.3:53/udp", "10.1.2.3:53/udp", true},
		{"10.1.2.3:53/udp", "10.1.2.3:53", false},
		{"10.1.2.3:53", "10.1.2.3:53/udp", false},
		{"10.1.2.3:53/tcp", "10.1.2.3:53", true},
		// Names: exact only by the same name, a wildcard by names and
		// wildcards strictly under it, or the same wildcard.
		{"mirror.test:80", "mirror.test:80", true},
		{"mirror.test:80", "MIRROR.test.:80", true},
		{"mirror.test:80", "*.mirror.test:80", false},
		{"mirror.test:80", "a.mirror.test:80", false},
		{"*.pypi.test:443", "files.pypi.test:443", true},
		{"*.pypi.test:443", "*.pypi.test:443", true},
		{"*.pypi.test:443", "*.a.pypi.test:443", true},
		{"*.pypi.test:443", "pypi.test:443", false},
		{"*.pypi.test:443", "pypi.test.evil.test:443", false},
		{"*.a.pypi.test:443", "*.pypi.test:443", false},
		{"*.pypi.test:443", "files.pypi.test:80", false},
		// Names and addresses never cover each other.
		{"0.0.0.0/0", "github.com:443", false},
		{"*.github.com", "140.82.112.3:443", false},
	}
	for _, c := range cases {
		outer, err := ParseEgress(c.outer)
		if err != nil {
			t.Fatalf("ParseEgress(%q): %v", c.outer, err)
		}
		inner, err := ParseEgress(c.inner)
		if err != nil {
			t.Fatalf("ParseEgress(%q): %v", c.inner, err)
		}
		if got := outer.Covers(inner); got != c.want {
			t.Errorf("%q.Covers(%q) = %v, want %v", c.outer, c.inner, got, c.want)
		}
	}
	// A literal without Proto is tcp, as ParseEgress's entries are.
	bare := Entry{Prefix: netip.MustParsePrefix("10.0.0.0/8")}
	if tcp, _ := ParseEgress("10.1.2.3"); !bare.Covers(tcp) || !tcp.Covers(Entry{Prefix: netip.MustParsePrefix("10.1.2.3/32")}) {
		t.Error("an Entry without Proto is not treated as tcp")
	}
}

// TestEntryCovers_NeverWidens: whenever Covers says an allowed_egress entry
// covers a task's entry, every destination the task's entry opens (address
// or name, port, protocol) is one the ceiling opens too, judged without
// Covers. The entries are every combination of addresses, prefixes (IPv4,
// IPv6, IPv4-mapped), names and wildcards, ports, port ranges and protocols,
// so a ceiling that a task could exceed through any one of them fails here.
func TestEntryCovers_NeverWidens(t *testing.T) {
	hosts := []string{
		"10.0.0.0/8", "10.0.0.0/16", "10.1.0.0/16", "10.1.2.3", "10.1.2.4", "0.0.0.0/0",
		"2001:db8::/32", "2001:db8::1", "::/0", "::ffff:10.1.2.3", "::ffff:a01:204",
		"ex.test", "a.ex.test", "b.a.ex.test", "*.ex.test", "*.a.ex.test", "other.test",
	}
	ports := []string{"", ":1", ":80", ":443", ":1-1024", ":443-444", ":65535", ":1-65535"}
	protos := []string{"", "/tcp", "/udp"}
	var entries []Entry
	for _, h := range hosts {
		for _, p := range ports {
			for _, pr := range protos {
				s := h
				if p != "" && strings.Contains(h, ":") {
					s = "[" + h + "]"
				}
				e, err := ParseEgress(s + p + pr)
				if err != nil {
					t.Fatalf("ParseEgress(%q): %v", s+p+pr, err)
				}
				entries = append(entries, e)
			}
		}
	}
	type dest struct {
		addr  netip.Addr
		name  string
		port  uint16
		proto string
	}
	where := func(d dest) string {
		if d.addr.IsValid() {
			return netip.AddrPortFrom(d.addr, d.port).String() + "/" + d.proto
		}
		return fmt.Sprintf("%s:%d/%s", d.name, d.port, d.proto)
	}
	var dests []dest
	for _, port := range []uint16{1, 2, 80, 443, 444, 1024, 1025, 65535} {
		for _, proto := range []string{"tcp", "udp"} {
			for _, a := range []string{"10.1.2.3", "10.1.2.4", "10.2.0.1", "11.0.0.1", "2001:db8::1", "2001:db8::2", "2001:db9::1"} {
				dests = append(dests, dest{addr: netip.MustParseAddr(a), port: port, proto: proto})
			}
			for _, n := range []string{"ex.test", "a.ex.test", "b.a.ex.test", "c.b.a.ex.test", "z.ex.test", "other.test", "a.other.test", "ex.test.other.test"} {
				dests = append(dests, dest{name: n, port: port, proto: proto})
			}
		}
	}
	// opens is what the filter and the DNS service let through for e,
	// spelled out from the fields rather than through Covers.
	opens := func(e Entry, d dest) bool {
		proto := e.Proto
		if proto == "" {
			proto = "tcp"
		}
		if proto != d.proto {
			return false
		}
		if (e.PortLo != 0 || e.PortHi != 0) && (d.port < e.PortLo || d.port > e.PortHi) {
			return false
		}
		if d.addr.IsValid() {
			return e.Prefix.IsValid() && e.Prefix.Contains(d.addr)
		}
		return e.MatchesHost(d.name)
	}
	checked := 0
	for _, outer := range entries {
		for _, inner := range entries {
			if !outer.Covers(inner) {
				continue
			}
			checked++
			for _, d := range dests {
				if opens(inner, d) && !opens(outer, d) {
					t.Fatalf("%s covers %s, but %s opens %s and %s does not", outer, inner, inner, where(d), outer)
				}
			}
		}
	}
	if checked == 0 {
		t.Fatal("no entry covered another: the table is broken")
	}
}
