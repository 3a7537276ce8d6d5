package netpolicy

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"time"
)

// Defaults of Config.
const (
	DefaultSubnet   = "10.89.0.0/16"
	DefaultTable    = "nomad_sandbox"
	DefaultPrefix   = "nsbx"
	DefaultStateDir = "/run/nomad-driver-sandbox/netpolicy"
	DefaultNetnsDir = "/run/netns"
	// DefaultFlowIdle is how long a connection admitted through a DNS grant
	// stays open without traffic after the grant itself has expired.
	DefaultFlowIdle = time.Hour
)

// Config is the node-wide network policy setup shared by all sandboxes.
type Config struct {
	// Subnet is the IPv4 pool each sandbox gets a /30 from (host end .1,
	// sandbox .2 of its block). The whole pool is always denied as a
	// destination, so sandboxes cannot reach each other nor another
	// sandbox's gateway. Zero means DefaultSubnet.
	Subnet netip.Prefix
	// Deny is denied as a destination even where the allowlist would allow
	// it, on top of DefaultDeny() (always applied) and Subnet. The driver
	// adds whatever the operator denies. The node's own addresses need no
	// entry: the filter looks each packet's destination up in the node's
	// routing table and drops it if it is local, whenever the address
	// appeared. IPv6 prefixes are accepted and have no effect: all IPv6 is
	// dropped.
	Deny []netip.Prefix
	// Table is the name of the nftables tables (family netdev for the
	// filter, family ip for the masquerade); empty means DefaultTable.
	Table string
	// StateDir keeps the address leases, which must survive a plugin
	// restart (and need not survive a reboot: neither do the namespaces).
	// Empty means DefaultStateDir.
	StateDir string
	// Prefix starts the names of everything created per sandbox: the netns
	// (<prefix>-<hash>), the host end of its veth (<prefix><hash>) and its
	// nftables chains, sets and counters. 1 to 5 characters of [a-z0-9];
	// empty means DefaultPrefix. Reconcile removes what carries it, so two
	// managers on one host need different prefixes and tables.
	Prefix string
	// NetnsDir is where the namespaces are bind-mounted; empty means
	// DefaultNetnsDir, where `ip netns` finds them.
	NetnsDir string
	// Masquerade source-NATs the sandboxes' traffic to the address of the
	// interface it leaves by, so that allowed destinations outside the node
	// can answer without a route back to Subnet.
	Masquerade bool
	// FlowIdle is how long a connection admitted under a DNS grant may stay
	// idle after the grant expired (netdev hooks see no conntrack, so open
	// connections are remembered by the filter itself); zero means
	// DefaultFlowIdle.
	FlowIdle time.Duration
	// GuardPrivate denies private and shared address space (PrivateSpace)
	// as a destination, except the parts the operator opened in
	// OpenPrivate: an allowlisted name that resolves there, or a wide
	// prefix such as 0.0.0.0/0, reaches none of it.
	GuardPrivate bool
	// OpenPrivate are the prefixes the operator named (the IP entries of
	// allowed_egress). Only those within one block of PrivateSpace open
	// anything, so 0.0.0.0/0 opens none of it and 10.1.0.0/16 opens
	// 10.1.0.0/16; a sandbox reaches such an address only if its own
	// allowlist names it too.
	OpenPrivate []netip.Prefix
}

// PrivateSpace returns the private and shared address blocks: RFC 1918,
// the carrier-grade NAT space 100.64.0.0/10 and IPv6 unique local
// addresses (fc00::/7, without effect: IPv6 is dropped).
func PrivateSpace() []netip.Prefix {
	return []netip.Prefix{
		netip.MustParsePrefix("10.0.0.0/8"),
		netip.MustParsePrefix("172.16.0.0/12"),
		netip.MustParsePrefix("192.168.0.0/16"),
		netip.MustParsePrefix("100.64.0.0/10"),
		netip.MustParsePrefix("fc00::/7"),
	}
}

// privateBlock is the private space Config.GuardPrivate denies: the
// blocks of PrivateSpace less the prefixes of OpenPrivate inside one.
func (c *Config) privateBlock() []addrRange {
	if !c.GuardPrivate {
		return nil
	}
	var open []netip.Prefix
	for _, o := range c.OpenPrivate {
		for _, p := range PrivateSpace() {
			if o.IsValid() && p.Bits() <= o.Bits() && p.Contains(o.Addr()) {
				open = append(open, o)
				break
			}
		}
	}
	return subtractSpans(mergeRanges(PrivateSpace()), mergeRanges(open))
}

// DefaultDeny returns the destinations that are always denied: "this
// network" 0.0.0.0/8, loopback 127.0.0.0/8, link-local 169.254.0.0/16 (the
// cloud metadata services at 169.254.169.254 among them), multicast
// 224.0.0.0/4, reserved 240.0.0.0/4 and the limited broadcast
// 255.255.255.255, and their IPv6 counterparts.
func DefaultDeny() []netip.Prefix {
	return []netip.Prefix{
		netip.MustParsePrefix("0.0.0.0/8"),
		netip.MustParsePrefix("127.0.0.0/8"),
		netip.MustParsePrefix("169.254.0.0/16"),
		netip.MustParsePrefix("224.0.0.0/4"),
		netip.MustParsePrefix("240.0.0.0/4"),
		netip.MustParsePrefix("255.255.255.255/32"),
		netip.MustParsePrefix("::/128"),
		netip.MustParsePrefix("::1/128"),
		netip.MustParsePrefix("fe80::/10"),
		netip.MustParsePrefix("ff00::/8"),
	}
}

// NodeAddrs returns every address of the node's interfaces, each as a
// single-address prefix, as read now: for tests and tools.
func NodeAddrs() ([]netip.Prefix, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, fmt.Errorf("list node addresses: %w", err)
	}
	var out []netip.Prefix
	for _, a := range addrs {
		n, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip, ok := netip.AddrFromSlice(n.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		out = append(out, netip.PrefixFrom(ip, ip.BitLen()))
	}
	return out, nil
}

// withDefaults returns c with its empty fields set, or an error for a field
// that cannot work.
func (c Config) withDefaults() (Config, error) {
	if !c.Subnet.IsValid() {
		c.Subnet = netip.MustParsePrefix(DefaultSubnet)
	}
	if !c.Subnet.Addr().Is4() || c.Subnet.Bits() > 30 || c.Subnet.Bits() < 8 {
		return c, fmt.Errorf("network subnet %s: want an IPv4 prefix between /8 and /30", c.Subnet)
	}
	c.Subnet = c.Subnet.Masked()
	if c.Table == "" {
		c.Table = DefaultTable
	}
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	if c.NetnsDir == "" {
		c.NetnsDir = DefaultNetnsDir
	}
	if c.Prefix == "" {
		c.Prefix = DefaultPrefix
	}
	if len(c.Prefix) > 5 || strings.Trim(c.Prefix, "abcdefghijklmnopqrstuvwxyz0123456789") != "" {
		return c, fmt.Errorf("name prefix %q: want 1 to 5 characters of [a-z0-9]", c.Prefix)
	}
	if c.FlowIdle <= 0 {
		c.FlowIdle = DefaultFlowIdle
	}
	for _, p := range c.Deny {
		if !p.IsValid() {
			return c, fmt.Errorf("deny: invalid prefix")
		}
	}
	return c, nil
}

// hashLen is the number of hex digits of the sandbox id's hash in names:
// the host interface name <prefix><hash> must fit IFNAMSIZ-1 = 15.
const hashLen = 10

// names are everything named after one sandbox.
type names struct {
	hash   string // hex digest of the id
	base   string // <prefix><hash>: host interface and base chain
	netns  string // <prefix>-<hash>
	drop   string // chain recording denied destinations, then dropping
	block  string // set: denied destinations
	allow  string // set: static allowlist
	flows  string // set: connections admitted under DNS grants
	denied string // set: denied destinations seen, with counters
	// counters
	cSpoofed, cIPv6, cOther, cDenied string
}

func (c *Config) names(id string) names {
	sum := sha256.Sum256([]byte(id))
	return c.namesFromHash(hex.EncodeToString(sum[:])[:hashLen])
}

func (c *Config) namesFromHash(h string) names {
	base := c.Prefix + h
	return names{
		hash:     h,
		base:     base,
		netns:    c.Prefix + "-" + h,
		drop:     base + "-drop",
		block:    base + "-block",
		allow:    base + "-allow",
		flows:    base + "-flows",
		denied:   base + "-denied",
		cSpoofed: base + "-spoofed",
		cIPv6:    base + "-ipv6",
		cOther:   base + "-other",
		cDenied:  base + "-denied",
	}
}

// dnsSet names the set of addresses granted by the DNS service for one
// protocol and port range.
func (n names) dnsSet(proto string, lo, hi uint16) string {
	return fmt.Sprintf("%s-dns-%s-%d-%d", n.base, proto, lo, hi)
}

func (c *Config) netnsPath(n names) string {
	return filepath.Join(c.NetnsDir, n.netns)
}

// hashOf returns the hash part of an object name of ours (a chain, set,
// counter, interface or netns name), or "" if the name is not ours.
func (c *Config) hashOf(name string) string {
	rest, ok := strings.CutPrefix(name, c.Prefix)
	if !ok {
		return ""
	}
	rest = strings.TrimPrefix(rest, "-")
	if len(rest) < hashLen {
		return ""
	}
	h := rest[:hashLen]
	if strings.Trim(h, "0123456789abcdef") != "" {
		return ""
	}
	if len(rest) > hashLen && rest[hashLen] != '-' {
		return ""
	}
	return h
}

// SandboxNames returns what sandbox id's network is named on the node under
// c (defaults applied): its namespace (under NetnsDir) and its host
// interface, which also starts the names of its nftables objects. For
// tools and tests that look for leftovers.
func (c Config) SandboxNames(id string) (netns, hostIf string) {
	if d, err := c.withDefaults(); err == nil {
		c = d
	}
	n := c.names(id)
	return n.netns, n.base
}
