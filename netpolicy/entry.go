package netpolicy

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Entry is one egress allowlist entry: either an IP prefix or a host name
// (exact, or every name under a domain), with an optional port range and a
// protocol.
type Entry struct {
	// Prefix is set for IP entries; a bare address is a /32 or /128.
	Prefix netip.Prefix
	// Host is set for host name entries: lower case, without a trailing dot
	// and without the "*." of a wildcard.
	Host string
	// Wildcard makes Host match the names under it only ("*.pypi.org"
	// matches "files.pypi.org", never "pypi.org" nor "pypi.org.evil.com").
	Wildcard bool
	// PortLo and PortHi bound the destination port; 0,0 means any port.
	PortLo, PortHi uint16
	// Proto is "tcp" (the default when empty) or "udp". ICMP and other
	// protocols cannot be allowed.
	Proto string
}

// EntryError is the error ParseEgress returns: the entry as written, what is
// wrong with it, and the forms that are accepted.
type EntryError struct {
	Entry  string
	Reason string
}

// EgressForms lists the accepted forms of an egress entry, as error messages
// and documentation show them.
const EgressForms = `accepted forms: IP or IP/prefix (any port), IP:port, IP:port-port, ` +
	`[IPv6]:port, host:port, *.domain:port, each optionally followed by /tcp (the default) or /udp`

func (e *EntryError) Error() string {
	return fmt.Sprintf("egress entry %q: %s; %s", e.Entry, e.Reason, EgressForms)
}

// ParseEgress parses one egress allowlist entry:
//
//	203.0.113.0/24          a prefix, any TCP port
//	203.0.113.7             one address, any TCP port
//	203.0.113.7:443         one port
//	198.51.100.9:8000-8100  a port range
//	10.1.2.3:53/udp         UDP instead of TCP
//	[2001:db8::1]:443       IPv6 (parsed, but IPv6 is dropped by the filter)
//	203.0.113.0/24:443      a prefix and a port
//	github.com:443          a host name, allowed through the DNS service
//	*.pypi.org:443          every name under pypi.org, not pypi.org itself
//
// Host names are lower-cased. A port is 1 to 65535.
func ParseEgress(s string) (Entry, error) {
	fail := func(format string, args ...any) (Entry, error) {
		return Entry{}, &EntryError{Entry: s, Reason: fmt.Sprintf(format, args...)}
	}
	rest := strings.TrimSpace(s)
	if rest == "" {
		return fail("empty")
	}
	if strings.Contains(rest, "://") {
		return fail("a URL, not an entry; write host:port")
	}
	e := Entry{Proto: "tcp"}

	// A protocol suffix is the letters after the last '/'; digits there are
	// a prefix length.
	if i := strings.LastIndexByte(rest, '/'); i >= 0 && isLetters(rest[i+1:]) {
		switch p := strings.ToLower(rest[i+1:]); p {
		case "tcp", "udp":
			e.Proto = p
		default:
			return fail("unknown protocol %q (want tcp or udp)", rest[i+1:])
		}
		rest = rest[:i]
		if rest == "" {
			return fail("no address or host before /%s", e.Proto)
		}
	}

	// Split host and port.
	var hostPart, portPart string
	hasPort := false
	switch {
	case strings.HasPrefix(rest, "["):
		end := strings.IndexByte(rest, ']')
		if end < 0 {
			return fail("missing ']'")
		}
		hostPart = rest[1:end]
		after := rest[end+1:]
		switch {
		case after == "":
		case strings.HasPrefix(after, ":"):
			portPart, hasPort = after[1:], true
		default:
			return fail("unexpected %q after ']'", after)
		}
		if !strings.Contains(hostPart, ":") {
			return fail("brackets are only for IPv6 addresses")
		}
	case strings.Count(rest, ":") > 1:
		// An IPv6 address or prefix without brackets has no port.
		hostPart = rest
	default:
		if i := strings.IndexByte(rest, ':'); i >= 0 {
			hostPart, portPart, hasPort = rest[:i], rest[i+1:], true
		} else {
			hostPart = rest
		}
	}
	if hostPart == "" {
		return fail("no address or host")
	}

	if hasPort {
		lo, hi, reason := parsePorts(portPart)
		if reason != "" {
			return fail("%s", reason)
		}
		e.PortLo, e.PortHi = lo, hi
	}

	if strings.Contains(hostPart, "/") {
		p, err := netip.ParsePrefix(hostPart)
		if err != nil {
			return fail("invalid prefix %q", hostPart)
		}
		if p.Addr().Is4In6() {
			return fail("IPv4-mapped IPv6 prefix; write the IPv4 prefix")
		}
		if p.Masked() != p {
			return fail("prefix has host bits set (did you mean %s?)", p.Masked())
		}
		e.Prefix = p
		return e, nil
	}
	if a, err := netip.ParseAddr(hostPart); err == nil {
		if a.Zone() != "" {
			return fail("address with a zone")
		}
		a = a.Unmap()
		e.Prefix = netip.PrefixFrom(a, a.BitLen())
		return e, nil
	}
	if looksNumeric(hostPart) {
		return fail("invalid IP address %q", hostPart)
	}

	name := strings.TrimSuffix(strings.ToLower(hostPart), ".")
	if strings.HasPrefix(name, "*.") {
		e.Wildcard = true
		name = name[2:]
		if !strings.Contains(name, ".") && validHostName(name) {
			return fail("wildcard %q would cover a whole top-level domain", "*."+name)
		}
	}
	if strings.Contains(name, "*") {
		return fail(`"*" is only allowed as the whole first label ("*.example.com")`)
	}
	if !validHostName(name) {
		return fail("invalid host name %q", hostPart)
	}
	e.Host = name
	return e, nil
}

// parsePorts parses "443" or "8000-8100"; reason is empty on success.
func parsePorts(s string) (lo, hi uint16, reason string) {
	one := func(p string) (uint16, string) {
		if p == "" || len(p) > 5 || strings.Trim(p, "0123456789") != "" {
			return 0, fmt.Sprintf("invalid port %q", p)
		}
		n, _ := strconv.Atoi(p)
		if n < 1 || n > 65535 {
			return 0, fmt.Sprintf("port %s out of range 1-65535", p)
		}
		return uint16(n), ""
	}
	a, b, isRange := strings.Cut(s, "-")
	lo, reason = one(a)
	if reason != "" {
		return 0, 0, reason
	}
	if !isRange {
		return lo, lo, ""
	}
	hi, reason = one(b)
	if reason != "" {
		return 0, 0, reason
	}
	if hi < lo {
		return 0, 0, fmt.Sprintf("port range %d-%d is reversed", lo, hi)
	}
	return lo, hi, ""
}

func isLetters(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i] | 0x20
		if c < 'a' || c > 'z' {
			return false
		}
	}
	return true
}

// looksNumeric reports strings made of digits and dots only ("10.1.2",
// "1.2.3.4.5"): mistyped addresses, never host names.
func looksNumeric(s string) bool {
	return strings.Trim(s, "0123456789.") == ""
}

// validHostName accepts lower-case names of labels of letters, digits, '-'
// and '_' (no leading or trailing '-'), 1 to 63 bytes each, 253 at most, whose
// last label is not all digits.
func validHostName(name string) bool {
	if name == "" || len(name) > 253 {
		return false
	}
	labels := strings.Split(name, ".")
	for _, l := range labels {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return false
		}
		for i := 0; i < len(l); i++ {
			c := l[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return strings.Trim(labels[len(labels)-1], "0123456789") != ""
}

// MatchesHost reports whether the host name name (any case, with or without
// a trailing dot) is allowed by e: equal to Host, or for a wildcard entry,
// strictly under it. IP entries match no name.
func (e Entry) MatchesHost(name string) bool {
	if e.Host == "" {
		return false
	}
	name = strings.TrimSuffix(strings.ToLower(name), ".")
	if !validHostName(name) {
		return false
	}
	if !e.Wildcard {
		return name == e.Host
	}
	return len(name) > len(e.Host)+1 && strings.HasSuffix(name, "."+e.Host)
}

// Covers reports whether every destination inner allows, e allows too: the
// same protocol, a port range containing inner's (an entry without ports
// covers any), and an IP prefix containing inner's, or a host name that is
// inner's, or for a wildcard, inner's name or wildcard at or under it. An IP
// entry never covers a name, nor a name an IP entry.
func (e Entry) Covers(inner Entry) bool {
	if e.proto() != inner.proto() || !e.coversPorts(inner) {
		return false
	}
	switch {
	case e.Prefix.IsValid() && inner.Prefix.IsValid():
		return e.Prefix.Bits() <= inner.Prefix.Bits() && e.Prefix.Contains(inner.Prefix.Addr())
	case e.Host != "" && inner.Host != "":
		if !e.Wildcard {
			return !inner.Wildcard && e.Host == inner.Host
		}
		return inner.Wildcard && inner.Host == e.Host || e.MatchesHost(inner.Host)
	}
	return false
}

// coversPorts reports whether e's port range contains inner's.
func (e Entry) coversPorts(inner Entry) bool {
	lo, hi := e.ports()
	innerLo, innerHi := inner.ports()
	return innerLo >= lo && innerHi <= hi
}

func (e Entry) proto() string {
	if e.Proto == "" {
		return "tcp"
	}
	return e.Proto
}

// ports returns the port range, 0-65535 for "any".
func (e Entry) ports() (lo, hi uint16) {
	if e.PortLo == 0 && e.PortHi == 0 {
		return 0, 65535
	}
	return e.PortLo, e.PortHi
}

// String returns e in the form ParseEgress reads, canonical: the same entry
// always prints the same way.
func (e Entry) String() string {
	var b strings.Builder
	hasPort := e.PortLo != 0 || e.PortHi != 0
	switch {
	case e.Host != "":
		if e.Wildcard {
			b.WriteString("*.")
		}
		b.WriteString(e.Host)
	case e.Prefix.IsValid():
		var s string
		if e.Prefix.IsSingleIP() {
			s = e.Prefix.Addr().String()
		} else {
			s = e.Prefix.String()
		}
		if hasPort && e.Prefix.Addr().Is6() {
			s = "[" + s + "]"
		}
		b.WriteString(s)
	default:
		b.WriteString("invalid")
	}
	if hasPort {
		b.WriteByte(':')
		b.WriteString(strconv.Itoa(int(e.PortLo)))
		if e.PortHi != e.PortLo {
			b.WriteByte('-')
			b.WriteString(strconv.Itoa(int(e.PortHi)))
		}
	}
	if p := e.proto(); p != "tcp" {
		b.WriteByte('/')
		b.WriteString(p)
	}
	return b.String()
}
