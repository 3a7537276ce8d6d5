package netpolicy

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/hashicorp/go-hclog"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/cleanup"
)

// Manager creates and removes the network namespaces of sandboxes and their
// host-side filters. Set Config and Logger before the first call and do not
// change them afterwards. Its methods are safe for concurrent use; several
// processes using the same StateDir are serialized by a lock file.
type Manager struct {
	Config Config
	Logger hclog.Logger

	once    sync.Once
	initErr error
	cfg     Config      // Config with defaults
	block   []addrRange // destinations always denied, from cfg
	mu      sync.Mutex

	// failAt, in tests, makes Create fail at the named step.
	failAt string
}

// Network is one sandbox's network: a namespace whose eth0 is configured
// with Addr and a default route via Gateway, the host end of the veth, and
// the filter on it.
type Network struct {
	ID string
	// Netns is the path of the bind-mounted namespace, for the OCI spec's
	// linux.namespaces network path.
	Netns string
	// HostIf is the host end of the veth; the filter sits on its ingress.
	HostIf string
	// Addr is the sandbox's address and prefix (a /30).
	Addr netip.Prefix
	// Gateway is the host end's address: the sandbox's default route and
	// its only DNS server.
	Gateway netip.Addr
	// MAC is the sandbox end's hardware address, the only one the filter
	// accepts.
	MAC net.HardwareAddr
	// Attached is set for a namespace made by someone else (Attach): then
	// Netns and HostIf are theirs, and Gateway is shared with others.
	Attached bool
}

// Counters are packet counts of one sandbox's filter.
type Counters struct {
	// Spoofed counts frames with another source MAC or IPv4 address, or ARP
	// claiming another address.
	Spoofed uint64
	// IPv6 counts IPv6 packets, all dropped.
	IPv6 uint64
	// Other counts frames neither IPv4 nor ARP (VLAN tagged ones included).
	Other uint64
	// Denied counts IPv4 packets to destinations not allowed.
	Denied uint64
}

// Errors callers may test for.
var (
	// ErrExists is returned by Create for an id that already has a network.
	ErrExists = errors.New("sandbox network already exists")
	// ErrNotFound is returned for an id without a network.
	ErrNotFound = errors.New("sandbox network not found")
	// ErrDeniedAddr is returned by Allow for an address that stays denied
	// whatever the allowlist says (Config.Deny and the defaults).
	ErrDeniedAddr = errors.New("address is always denied")
	// ErrNotAllowed is returned by Allow for an entry that is not a host
	// name entry of the sandbox's allowlist.
	ErrNotAllowed = errors.New("not a host name entry of the sandbox's allowlist")
	// ErrIPv6 is returned by Allow for an IPv6 address: IPv6 is dropped.
	ErrIPv6 = errors.New("IPv6 is not supported: sandboxes have IPv4 only")
)

func (m *Manager) init() error {
	m.once.Do(func() {
		m.cfg, m.initErr = m.Config.withDefaults()
		m.block = mergeRanges(append(append(DefaultDeny(), m.cfg.Deny...), m.cfg.Subnet))
		if priv := m.cfg.privateBlock(); len(priv) > 0 {
			m.block = mergeSpans(append(m.block, priv...))
		}
		if m.Logger == nil {
			m.Logger = hclog.NewNullLogger()
		}
	})
	return m.initErr
}

// lock serializes changes to the networks: the manager's mutex for this
// process, the state directory's lock for the others. The returned function
// releases both.
func (m *Manager) lock() (func(), error) {
	m.mu.Lock()
	unlock, err := m.cfg.lockState()
	if err != nil {
		m.mu.Unlock()
		return nil, err
	}
	return func() {
		unlock()
		m.mu.Unlock()
	}, nil
}

// Create makes the network of sandbox id: a new network namespace whose eth0
// (the sandbox end of a veth) is up with an address of its own /30 and a
// default route via the host end, loopback up, IPv6 disabled; the host end
// with the gateway address; and the host end's ingress filter for allow. The
// filter is installed before the host end is brought up, so no frame passes
// unfiltered. It is all or nothing: on any error what was made is removed.
//
// IPv6 entries in allow are ignored (logged): IPv6 is dropped. Host name
// entries allow nothing until the DNS service calls Allow.
//
// A namespace serves one sandbox lifetime (runsc takes its eth0 over and
// strips its address): Destroy it when the sandbox is gone. Create for an id
// that still has a network returns ErrExists.
func (m *Manager) Create(ctx context.Context, id string, allow []Entry) (*Network, error) {
	n, leases, unlock, err := m.reserve(ctx, "create", id, allow)
	if err != nil {
		return nil, err
	}
	defer unlock()
	addr, gw, err := m.cfg.allocate(n.hash, leases)
	if err != nil {
		return nil, err
	}
	l := newLease(id, n, allow)
	l.Addr, l.Gateway = addr, gw
	if err := m.cfg.writeLease(l); err != nil {
		return nil, err
	}
	undo := cleanup.Make(func() {
		if derr := m.destroy(n, nil); derr != nil {
			m.Logger.Error("sandbox network: undo of a failed create left something behind", "id", id, "error", derr)
		}
	})
	defer undo.Clean()
	fail := func(step string, err error) error {
		return fmt.Errorf("create sandbox network %s: %s: %w", id, step, err)
	}
	step := func(name string) error {
		if m.failAt == name {
			return fmt.Errorf("injected failure at %s", name)
		}
		return ctx.Err()
	}

	sb := &Network{ID: id, Netns: m.cfg.netnsPath(n), HostIf: n.base, Addr: addr, Gateway: gw}

	// The namespace, with IPv6 off before any interface appears in it.
	if err := step("netns"); err != nil {
		return nil, fail("netns", err)
	}
	if err := createNetns(sb.Netns, func() error {
		for _, k := range []string{"all", "default"} {
			if err := writeSysctl("net/ipv6/conf/"+k+"/disable_ipv6", "1"); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
		}
		return nil
	}); err != nil {
		return nil, fail("netns", err)
	}

	if err := step("veth"); err != nil {
		return nil, fail("veth", err)
	}
	mac, err := m.setupLinks(sb)
	if err != nil {
		return nil, fail("veth", err)
	}
	sb.MAC = mac
	l.MAC = mac.String()
	if err := m.cfg.writeLease(l); err != nil {
		return nil, fail("lease", err)
	}

	if err := step("filter"); err != nil {
		return nil, fail("filter", err)
	}
	if err := m.installFilter(sb, n, allow); err != nil {
		return nil, fail("filter", err)
	}

	if err := step("forwarding"); err != nil {
		return nil, fail("forwarding", err)
	}
	if err := m.enableForwarding(); err != nil {
		return nil, fail("forwarding", err)
	}

	if err := step("up"); err != nil {
		return nil, fail("up", err)
	}
	host, err := netlink.LinkByName(sb.HostIf)
	if err == nil {
		err = netlink.LinkSetUp(host)
	}
	if err != nil {
		return nil, fail("host end up", err)
	}
	m.Logger.Debug("sandbox network created", "id", id, "netns", sb.Netns, "host_if", sb.HostIf,
		"addr", sb.Addr, "gateway", sb.Gateway, "allow", l.Allow)
	undo.Release()
	return sb, nil
}

// reserve begins Create or Attach (op) of sandbox id's network: it checks
// id and allow, takes the locks (the caller releases them with unlock) and
// refuses an id, or a name, that has a network already. It returns the
// sandbox's names and every lease.
func (m *Manager) reserve(ctx context.Context, op, id string, allow []Entry) (n names, leases map[string]*lease, unlock func(), err error) {
	if err := m.init(); err != nil {
		return n, nil, nil, err
	}
	if id == "" {
		return n, nil, nil, fmt.Errorf("%s sandbox network: empty id", op)
	}
	if err := checkEntries(allow); err != nil {
		return n, nil, nil, fmt.Errorf("%s sandbox network: %w", op, err)
	}
	release, err := m.lock()
	if err != nil {
		return n, nil, nil, err
	}
	undo := cleanup.Make(release)
	defer undo.Clean()
	if err := ctx.Err(); err != nil {
		return n, nil, nil, err
	}
	n = m.cfg.names(id)
	leases, err = m.cfg.readLeases()
	if err != nil {
		return n, nil, nil, err
	}
	if l, ok := leases[n.hash]; ok {
		if l.ID == id {
			return n, nil, nil, fmt.Errorf("%s sandbox network %s: %w", op, id, ErrExists)
		}
		return n, nil, nil, fmt.Errorf("%s sandbox network %s: name %s is taken by sandbox %q", op, id, n.base, l.ID)
	}
	undo.Release()
	return n, leases, release, nil
}

// newLease is the lease of sandbox id with allowlist allow.
func newLease(id string, n names, allow []Entry) *lease {
	l := &lease{ID: id, Hash: n.hash, Created: time.Now().UTC()}
	for _, e := range allow {
		l.Allow = append(l.Allow, e.String())
	}
	return l
}

// checkEntries refuses allowlist entries that were not made by ParseEgress.
func checkEntries(allow []Entry) error {
	for _, e := range allow {
		if e.Host == "" && !e.Prefix.IsValid() {
			return fmt.Errorf("invalid allowlist entry %+v", e)
		}
		if p := e.proto(); p != "tcp" && p != "udp" {
			return fmt.Errorf("entry %s: protocol %q", e, e.Proto)
		}
		if lo, hi := e.ports(); lo > hi {
			return fmt.Errorf("entry %s: reversed port range", e)
		}
	}
	return nil
}

// Get returns the network of sandbox id as Create made it, read from its
// lease: for a plugin that restarted and recovers its tasks (to serve DNS on
// Gateway for Addr again). ErrNotFound if there is no lease or its host end
// or namespace is gone.
func (m *Manager) Get(id string) (*Network, error) {
	if err := m.init(); err != nil {
		return nil, err
	}
	n := m.cfg.names(id)
	l, err := m.cfg.readLease(n.hash)
	if errors.Is(err, fs.ErrNotExist) || (err == nil && l.ID != id) {
		return nil, fmt.Errorf("sandbox network %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	sb := &Network{ID: id, Netns: m.cfg.netnsPath(n), HostIf: n.base, Addr: l.Addr, Gateway: l.Gateway}
	if a := l.Attached; a != nil {
		sb.Netns, sb.HostIf, sb.Attached = a.Netns, a.HostIf, true
	}
	sb.MAC, _ = net.ParseMAC(l.MAC)
	if _, err := os.Stat(sb.Netns); err != nil {
		return nil, fmt.Errorf("sandbox network %s: netns: %w", id, ErrNotFound)
	}
	if _, err := netlink.LinkByName(sb.HostIf); err != nil {
		return nil, fmt.Errorf("sandbox network %s: host end %s: %w", id, sb.HostIf, ErrNotFound)
	}
	return sb, nil
}

// setupLinks makes the veth (its sandbox end, eth0, directly inside the
// namespace), configures both ends but leaves the host end down, and
// returns the sandbox end's MAC.
func (m *Manager) setupLinks(sb *Network) (net.HardwareAddr, error) {
	nsh, err := netns.GetFromPath(sb.Netns)
	if err != nil {
		return nil, fmt.Errorf("open netns: %w", err)
	}
	defer nsh.Close()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: sb.HostIf},
		PeerName:      "eth0",
		PeerNamespace: netlink.NsFd(int(nsh)),
	}
	if err := netlink.LinkAdd(veth); err != nil {
		return nil, fmt.Errorf("add veth %s: %w", sb.HostIf, err)
	}
	host, err := netlink.LinkByName(sb.HostIf)
	if err != nil {
		return nil, err
	}
	if err := writeSysctl("net/ipv6/conf/"+sb.HostIf+"/disable_ipv6", "1"); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	gw := &netlink.Addr{IPNet: &net.IPNet{IP: sb.Gateway.AsSlice(), Mask: net.CIDRMask(sb.Addr.Bits(), 32)}}
	if err := netlink.AddrAdd(host, gw); err != nil {
		return nil, fmt.Errorf("address %s on %s: %w", sb.Gateway, sb.HostIf, err)
	}

	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return nil, fmt.Errorf("netlink in netns: %w", err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		return nil, fmt.Errorf("lo up: %w", err)
	}
	eth, err := h.LinkByName("eth0")
	if err != nil {
		return nil, fmt.Errorf("eth0: %w", err)
	}
	a := &netlink.Addr{IPNet: &net.IPNet{IP: sb.Addr.Addr().AsSlice(), Mask: net.CIDRMask(sb.Addr.Bits(), 32)}}
	if err := h.AddrAdd(eth, a); err != nil {
		return nil, fmt.Errorf("address %s on eth0: %w", sb.Addr, err)
	}
	if err := h.LinkSetUp(eth); err != nil {
		return nil, fmt.Errorf("eth0 up: %w", err)
	}
	route := &netlink.Route{LinkIndex: eth.Attrs().Index, Gw: sb.Gateway.AsSlice()}
	if err := h.RouteAdd(route); err != nil {
		return nil, fmt.Errorf("default route via %s: %w", sb.Gateway, err)
	}
	// Read the MAC back rather than trusting the one asked for.
	eth, err = h.LinkByName("eth0")
	if err != nil {
		return nil, fmt.Errorf("eth0: %w", err)
	}
	mac := eth.Attrs().HardwareAddr
	if len(mac) != 6 {
		return nil, fmt.Errorf("eth0 has no Ethernet address (%v)", mac)
	}
	return mac, nil
}

// installFilter adds the sandbox's chains, sets and counters, and the
// masquerade if configured, in one atomic batch.
func (m *Manager) installFilter(sb *Network, n names, allow []Entry) error {
	spec := m.filterSpecFor(sb, n, allow)
	c, err := nftables.New()
	if err != nil {
		return err
	}
	if m.cfg.Masquerade {
		m.queueMasquerade(c)
	}
	if err := m.queueFilter(c, spec); err != nil {
		return err
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	return nil
}

// filterSpecFor is the filter of sandbox sb for allow.
func (m *Manager) filterSpecFor(sb *Network, n names, allow []Entry) *filterSpec {
	spec := &filterSpec{
		n: n, device: sb.HostIf, mac: sb.MAC, addr: sb.Addr.Addr(), gateway: sb.Gateway,
		block: m.blockFor(ownNet(sb.Attached, sb.Addr)),
		idle:  m.cfg.FlowIdle,
	}
	var static []Entry
	seen := map[portGroup]bool{}
	for _, e := range allow {
		switch {
		case e.Host != "":
			if g := groupOf(e); !seen[g] {
				seen[g] = true
				spec.groups = append(spec.groups, g)
			}
		case e.Prefix.Addr().Is6():
			m.Logger.Warn("sandbox network: IPv6 allowlist entry ignored, IPv6 is dropped", "id", sb.ID, "entry", e.String())
		default:
			static = append(static, e)
		}
	}
	sort.Slice(spec.groups, func(i, j int) bool {
		a, b := spec.groups[i], spec.groups[j]
		if a.proto != b.proto {
			return a.proto < b.proto
		}
		if a.lo != b.lo {
			return a.lo < b.lo
		}
		return a.hi < b.hi
	})
	spec.allow = allowElems(static)
	return spec
}

// ownNet is the network an attached sandbox shares with others (the
// bridge's: the other allocations and the gateway), which is never its
// destination; invalid for a sandbox of ours, whose /30 is in the pool.
func ownNet(attached bool, addr netip.Prefix) netip.Prefix {
	if !attached {
		return netip.Prefix{}
	}
	return addr.Masked()
}

// blockFor is everything denied as a destination to a sandbox whose own
// network is own: the defaults, the configured Deny, the pool, and own.
func (m *Manager) blockFor(own netip.Prefix) []addrRange {
	if !own.IsValid() {
		return m.block
	}
	return mergeSpans(append(slices.Clone(m.block), prefixRange(own)))
}

// Denied reports, for the DNS service of sandbox sb, the addresses no
// answer may point at: those sb's filter denies whatever its allowlist says.
func (m *Manager) Denied(sb *Network) func(netip.Addr) bool {
	if err := m.init(); err != nil {
		return func(netip.Addr) bool { return true }
	}
	block := m.blockFor(ownNet(sb.Attached, sb.Addr))
	return func(a netip.Addr) bool { return inRanges(block, a) || isNodeAddr(a) }
}

// isNodeAddr reports whether a is an address of the node at this moment
// (the kernel's route to it is local or broadcast): answers pointing there
// are refused, as the filter's own per-packet lookup would drop them
// anyway. A failed lookup reports false; the filter still holds.
func isNodeAddr(a netip.Addr) bool {
	a = a.Unmap()
	if !a.Is4() {
		return false
	}
	routes, err := netlink.RouteGet(a.AsSlice())
	if err != nil {
		return false
	}
	for _, r := range routes {
		if r.Type == unix.RTN_LOCAL || r.Type == unix.RTN_BROADCAST {
			return true
		}
	}
	return false
}

// inRanges reports whether a, an IPv4 address, is in one of rs.
func inRanges(rs []addrRange, a netip.Addr) bool {
	a = a.Unmap()
	if !a.Is4() {
		return false
	}
	v := addrU32(a)
	for _, r := range rs {
		if r.lo <= v && v <= r.hi {
			return true
		}
	}
	return false
}

func (m *Manager) enableForwarding() error {
	v, err := readSysctl("net/ipv4/ip_forward")
	if err != nil {
		return err
	}
	if v == "1" {
		return nil
	}
	m.Logger.Info("sandbox network: enabling IPv4 forwarding (net.ipv4.ip_forward=1)")
	return writeSysctl("net/ipv4/ip_forward", "1")
}

// Allow opens addr, resolved from a name that e allows, for e's protocol and
// ports for ttl: the DNS service calls it before answering. Calling it again
// for the same address and ports restarts the ttl. Connections opened while
// the grant holds stay open after it expires while they carry traffic
// (Config.FlowIdle).
func (m *Manager) Allow(id string, addr netip.Addr, e Entry, ttl time.Duration) error {
	return m.allow(id, addr, ttl, func(l *lease) ([]portGroup, error) {
		if e.Host == "" {
			return nil, fmt.Errorf("entry %s: %w", e, ErrNotAllowed)
		}
		want := e.String()
		for _, s := range l.Allow {
			if s == want {
				return []portGroup{groupOf(e)}, nil
			}
		}
		return nil, fmt.Errorf("entry %s: %w", want, ErrNotAllowed)
	})
}

// AllowName opens addr, an address name resolved to, for every host name
// entry of the sandbox's allowlist that matches name, for ttl.
func (m *Manager) AllowName(id, name string, addr netip.Addr, ttl time.Duration) error {
	return m.allow(id, addr, ttl, func(l *lease) ([]portGroup, error) {
		var gs []portGroup
		seen := map[portGroup]bool{}
		for _, s := range l.Allow {
			e, err := ParseEgress(s)
			if err != nil || !e.MatchesHost(name) {
				continue
			}
			if g := groupOf(e); !seen[g] {
				seen[g] = true
				gs = append(gs, g)
			}
		}
		if len(gs) == 0 {
			return nil, fmt.Errorf("name %s: %w", name, ErrNotAllowed)
		}
		return gs, nil
	})
}

func (m *Manager) allow(id string, addr netip.Addr, ttl time.Duration, groups func(*lease) ([]portGroup, error)) error {
	if err := m.init(); err != nil {
		return err
	}
	addr = addr.Unmap()
	if addr.Is6() {
		return fmt.Errorf("allow %s for %s: %w", addr, id, ErrIPv6)
	}
	if !addr.Is4() {
		return fmt.Errorf("allow for %s: invalid address", id)
	}
	if ttl < time.Second {
		ttl = time.Second
	}
	n := m.cfg.names(id)
	l, err := m.cfg.readLease(n.hash)
	if errors.Is(err, fs.ErrNotExist) || (err == nil && l.ID != id) {
		return fmt.Errorf("allow for %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return err
	}
	gs, err := groups(l)
	if err != nil {
		return fmt.Errorf("allow %s for %s: %w", addr, id, err)
	}
	if inRanges(m.blockFor(ownNet(l.Attached != nil, l.Addr)), addr) || isNodeAddr(addr) {
		return fmt.Errorf("allow %s for %s: %w", addr, id, ErrDeniedAddr)
	}
	c, err := nftables.New()
	if err != nil {
		return err
	}
	key := a4(addr)
	for _, g := range gs {
		s := &nftables.Set{Table: m.netdevTable(), Name: n.dnsSet(g.proto, g.lo, g.hi), KeyType: nftables.TypeIPAddr, HasTimeout: true}
		el := []nftables.SetElement{{Key: key, Timeout: ttl}}
		// Add (a no-op if present), delete, add: one batch that leaves the
		// element with a fresh timeout whether or not it was there.
		if err := c.SetAddElements(s, el); err != nil {
			return err
		}
		if err := c.SetDeleteElements(s, el); err != nil {
			return err
		}
		if err := c.SetAddElements(s, el); err != nil {
			return err
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("allow %s for %s: nftables: %w", addr, id, err)
	}
	return nil
}

// Denials returns the destinations the sandbox was denied, as
// "ip:port/proto" for TCP and UDP and "ip/proto" for other protocols
// ("icmp", "proto-N"), with the number of packets each. At most 4096
// destinations are recorded; Counters().Denied counts them all.
func (m *Manager) Denials(id string) (map[string]uint64, error) {
	if err := m.init(); err != nil {
		return nil, err
	}
	n := m.cfg.names(id)
	c, err := nftables.New()
	if err != nil {
		return nil, err
	}
	els, err := c.GetSetElements(&nftables.Set{Table: m.netdevTable(), Name: n.denied, KeyType: allowKeyType})
	if err != nil {
		if isNotExist(err) {
			return nil, fmt.Errorf("denials of %s: %w", id, ErrNotFound)
		}
		return nil, fmt.Errorf("denials of %s: %w", id, err)
	}
	out := map[string]uint64{}
	for _, el := range els {
		if len(el.Key) < 12 {
			continue
		}
		ip := netip.AddrFrom4([4]byte(el.Key[0:4]))
		proto := el.Key[4]
		port := uint16(el.Key[8])<<8 | uint16(el.Key[9])
		var k string
		if proto == unix.IPPROTO_TCP || proto == unix.IPPROTO_UDP {
			k = fmt.Sprintf("%s:%d/%s", ip, port, protoName(proto))
		} else {
			k = fmt.Sprintf("%s/%s", ip, protoName(proto))
		}
		var pk uint64
		if el.Counter != nil {
			pk = el.Counter.Packets
		}
		out[k] += pk
	}
	return out, nil
}

// Counters returns the packet counters of the sandbox's filter.
func (m *Manager) Counters(id string) (Counters, error) {
	var out Counters
	if err := m.init(); err != nil {
		return out, err
	}
	n := m.cfg.names(id)
	c, err := nftables.New()
	if err != nil {
		return out, err
	}
	objs, err := c.GetNamedObjects(m.netdevTable())
	if err != nil {
		if isNotExist(err) {
			return out, fmt.Errorf("counters of %s: %w", id, ErrNotFound)
		}
		return out, fmt.Errorf("counters of %s: %w", id, err)
	}
	found := false
	for _, o := range objs {
		v, ok := o.(*nftables.NamedObj)
		if !ok || v.Type != nftables.ObjTypeCounter {
			continue
		}
		ctr, ok := v.Obj.(*expr.Counter)
		if !ok {
			continue
		}
		name, packets := v.Name, ctr.Packets
		switch name {
		case n.cSpoofed:
			out.Spoofed, found = packets, true
		case n.cIPv6:
			out.IPv6, found = packets, true
		case n.cOther:
			out.Other, found = packets, true
		case n.cDenied:
			out.Denied, found = packets, true
		}
	}
	if !found {
		return out, fmt.Errorf("counters of %s: %w", id, ErrNotFound)
	}
	return out, nil
}

// Destroy removes the network of sandbox id: the veth (first, so that no
// frame passes once the filter is gone), the filter, the namespace and the
// lease. A missing part is not an error, so Destroy can be repeated.
func (m *Manager) Destroy(id string) error {
	if err := m.init(); err != nil {
		return err
	}
	unlock, err := m.lock()
	if err != nil {
		return err
	}
	defer unlock()
	n := m.cfg.names(id)
	l, err := m.cfg.readLease(n.hash)
	if err == nil && l.ID != id {
		return fmt.Errorf("destroy sandbox network %s: name %s belongs to sandbox %q", id, n.base, l.ID)
	}
	if err := m.destroy(n, l); err != nil {
		return fmt.Errorf("destroy sandbox network %s: %w", id, err)
	}
	return nil
}

// destroy removes everything named after n; the lease goes last and only if
// the rest is gone, so that Reconcile tries again after a failure. l, the
// lease if there is one, tells an attached sandbox: its namespace gets its
// addresses back and stays, as does the veth.
func (m *Manager) destroy(n names, l *lease) error {
	var errs []error
	if l != nil && l.Attached != nil {
		if err := restoreNetns(l.Attached); err != nil {
			errs = append(errs, err)
		}
	}
	if link, err := netlink.LinkByName(n.base); err == nil {
		if err := netlink.LinkDel(link); err != nil {
			errs = append(errs, fmt.Errorf("delete %s: %w", n.base, err))
		}
	} else if !isLinkNotFound(err) {
		errs = append(errs, fmt.Errorf("find %s: %w", n.base, err))
	}
	if err := m.deleteFilter(n.hash); err != nil {
		errs = append(errs, err)
	}
	if err := deleteNetns(m.cfg.netnsPath(n)); err != nil {
		errs = append(errs, err)
	}
	if len(errs) == 0 {
		if err := m.cfg.removeLease(n.hash); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (m *Manager) deleteFilter(hash string) error {
	c, err := nftables.New()
	if err != nil {
		return err
	}
	all, err := m.listOurs(c)
	if err != nil {
		return err
	}
	objs := all[hash]
	if objs == nil {
		return nil
	}
	m.queueDelete(c, objs)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: delete filter of %s: %w", m.cfg.namesFromHash(hash).base, err)
	}
	return nil
}

func isLinkNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, unix.ENODEV)
}

// Reconcile removes every sandbox network of this manager's Config (leases,
// namespaces, host interfaces and nftables objects carrying its Prefix)
// whose sandbox id is not in live, such as those left by a plugin that died.
// Objects without a lease are orphans and go too. When nothing is left the
// tables go as well.
func (m *Manager) Reconcile(live map[string]bool) error {
	if err := m.init(); err != nil {
		return err
	}
	unlock, err := m.lock()
	if err != nil {
		return err
	}
	defer unlock()

	keep := map[string]bool{}
	for id, ok := range live {
		if ok {
			keep[m.cfg.names(id).hash] = true
		}
	}
	found := map[string]string{} // hash -> id, "" if unknown
	leases, err := m.cfg.readLeases()
	if err != nil {
		return err
	}
	for h, l := range leases {
		found[h] = l.ID
	}
	if ents, err := os.ReadDir(m.cfg.NetnsDir); err == nil {
		for _, e := range ents {
			if h := m.cfg.hashOf(e.Name()); h != "" && e.Name() == m.cfg.Prefix+"-"+h {
				if _, ok := found[h]; !ok {
					found[h] = ""
				}
			}
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("reconcile: %w", err)
	}
	links, err := netlink.LinkList()
	if err != nil {
		return fmt.Errorf("reconcile: list links: %w", err)
	}
	for _, l := range links {
		name := l.Attrs().Name
		if h := m.cfg.hashOf(name); h != "" && name == m.cfg.Prefix+h {
			if _, ok := found[h]; !ok {
				found[h] = ""
			}
		}
	}
	c, err := nftables.New()
	if err != nil {
		return err
	}
	objs, err := m.listOurs(c)
	if err != nil {
		return fmt.Errorf("reconcile: %w", err)
	}
	for h := range objs {
		if _, ok := found[h]; !ok {
			found[h] = ""
		}
	}

	var errs []error
	remaining := 0
	hashes := make([]string, 0, len(found))
	for h := range found {
		hashes = append(hashes, h)
	}
	sort.Strings(hashes)
	for _, h := range hashes {
		if keep[h] {
			remaining++
			continue
		}
		m.Logger.Info("sandbox network: removing leftover", "id", found[h], "name", m.cfg.Prefix+h)
		if err := m.destroy(m.cfg.namesFromHash(h), leases[h]); err != nil {
			errs = append(errs, err)
			remaining++
		}
	}
	if remaining == 0 {
		if err := m.deleteTables(); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("reconcile: %w", errors.Join(errs...))
	}
	return nil
}

// deleteTables removes the netdev and ip tables if they hold nothing of a
// sandbox.
func (m *Manager) deleteTables() error {
	c, err := nftables.New()
	if err != nil {
		return err
	}
	tables, err := c.ListTables()
	if err != nil {
		return fmt.Errorf("nft list tables: %w", err)
	}
	n := 0
	for _, t := range tables {
		if t.Name != m.cfg.Table {
			continue
		}
		if t.Family == nftables.TableFamilyNetdev || t.Family == nftables.TableFamilyIPv4 {
			c.DelTable(&nftables.Table{Name: t.Name, Family: t.Family})
			n++
		}
	}
	if n == 0 {
		return nil
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: delete tables %s: %w", m.cfg.Table, err)
	}
	return nil
}
