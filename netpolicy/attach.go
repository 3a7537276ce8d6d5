package netpolicy

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/cleanup"
)

// Attached sandboxes: the network namespace is not ours but the
// allocation's, made by Nomad (CNI bridge: one veth whose host end is a port
// of Nomad's bridge). The sandbox joins it, and its filter goes on the host
// end of that veth exactly as on a veth of our own, with three additions:
//
//   - frames must be addressed to the gateway's MAC: the host end is a
//     bridge port, and a frame for another allocation's MAC would be
//     switched to it without ever reaching the host's IP stack;
//   - replies from the ports the allocation serves (Nomad's port mapping)
//     pass the netdev filter whatever their destination, and a prerouting
//     chain (after conntrack) drops those that are not replies to a
//     connection made from outside, so a sandbox cannot use its service
//     port as a source to reach what the allowlist denies;
//   - DNS to the gateway's port 53 is redirected (RedirectDNS) to the port
//     the plugin's DNS service for this sandbox listens on, since every
//     allocation on the bridge shares the gateway address.
//
// runsc takes the namespace's interface over and strips its addresses, so
// Attach records them and Destroy puts them back: the allocation's
// namespace is left as Nomad made it, ready for the task's next run.

// Port is a port the sandbox serves, for AttachOptions.Replies.
type Port struct {
	Proto string // "tcp" or "udp"
	Port  uint16
}

func (p Port) String() string { return fmt.Sprintf("%d/%s", p.Port, p.Proto) }

// AttachOptions are the parts of an attached sandbox's filter that depend on
// its allocation.
type AttachOptions struct {
	// Replies are the ports the allocation serves: answers sent from them
	// to connections made from outside pass, whatever their destination.
	Replies []Port
}

// More errors callers may test for.
var (
	// ErrNoInterface is returned by Attach for a namespace with nothing
	// but loopback (Nomad's network mode "none").
	ErrNoInterface = errors.New("the network namespace has no interface but loopback")
	// ErrNetnsInUse is returned by Attach for a namespace another sandbox
	// is attached to: runsc takes its interface over.
	ErrNetnsInUse = errors.New("the network namespace is in use by another sandbox")
)

// attachment is what a lease keeps of an attached sandbox's namespace.
type attachment struct {
	Netns      string         `json:"netns"`
	HostIf     string         `json:"host_if"`
	Link       string         `json:"link"`
	Addrs      []netip.Prefix `json:"addrs"`
	Broadcast  []netip.Addr   `json:"broadcast,omitempty"` // per address, invalid for none
	Routes     []savedRoute   `json:"routes"`
	GatewayMAC string         `json:"gateway_mac"`
	Replies    []string       `json:"replies,omitempty"`
}

// savedRoute is an IPv4 route of the namespace's interface; an invalid Dst
// is the default route.
type savedRoute struct {
	Dst      netip.Prefix `json:"dst,omitempty"`
	Gw       netip.Addr   `json:"gw,omitempty"`
	Src      netip.Addr   `json:"src,omitempty"`
	Scope    uint8        `json:"scope"`
	Priority int          `json:"priority,omitempty"`
}

// nsView is what Attach reads of a namespace and its host side.
type nsView struct {
	link       string
	mac        net.HardwareAddr
	addrs      []netip.Prefix
	broadcast  []netip.Addr
	routes     []savedRoute
	gateway    netip.Addr
	hostIf     string
	gatewayMAC net.HardwareAddr
}

// Attach puts the filter for allow on the network namespace at netnsPath,
// made by someone else (Nomad, for a group network), for sandbox id; the
// sandbox then runs in that namespace. The namespace must have exactly one
// interface besides loopback, a veth with one IPv4 address and a default
// route, whose host end is in the root namespace. Nothing in the namespace
// is changed; the filter is installed in one batch before Attach returns,
// and on error nothing of it is left.
func (m *Manager) Attach(ctx context.Context, id, netnsPath string, allow []Entry, opt AttachOptions) (*Network, error) {
	for _, p := range opt.Replies {
		if (p.Proto != "tcp" && p.Proto != "udp") || p.Port == 0 {
			return nil, fmt.Errorf("attach sandbox network: reply port %s: want tcp or udp and a port above 0", p)
		}
	}
	n, leases, unlock, err := m.reserve(ctx, "attach", id, allow)
	if err != nil {
		return nil, err
	}
	defer unlock()
	fail := func(step string, err error) error {
		return fmt.Errorf("attach sandbox network %s to %s: %s: %w", id, netnsPath, step, err)
	}
	for _, l := range leases {
		if l.Attached != nil && l.Attached.Netns == netnsPath {
			return nil, fail("namespace", fmt.Errorf("%w (sandbox %s)", ErrNetnsInUse, l.ID))
		}
	}

	v, err := inspectNetns(netnsPath)
	if err != nil {
		return nil, fail("inspect", err)
	}
	addr := v.addrs[0]
	sb := &Network{ID: id, Netns: netnsPath, HostIf: v.hostIf, Addr: addr, Gateway: v.gateway, MAC: v.mac, Attached: true}
	att := &attachment{Netns: netnsPath, HostIf: v.hostIf, Link: v.link, Addrs: v.addrs, Broadcast: v.broadcast, Routes: v.routes, GatewayMAC: v.gatewayMAC.String()}
	for _, p := range opt.Replies {
		att.Replies = append(att.Replies, p.String())
	}
	l := newLease(id, n, allow)
	l.Addr, l.Gateway, l.MAC, l.Attached = addr, v.gateway, v.mac.String(), att
	if err := m.cfg.writeLease(l); err != nil {
		return nil, err
	}
	undo := cleanup.Make(func() {
		if derr := m.destroy(n, l); derr != nil {
			m.Logger.Error("sandbox network: undo of a failed attach left something behind", "id", id, "error", derr)
		}
	})
	defer undo.Clean()
	spec := m.filterSpecFor(sb, n, allow)
	spec.gatewayMAC = v.gatewayMAC
	spec.replies = opt.Replies
	c, err := nftables.New()
	if err != nil {
		return nil, fail("filter", err)
	}
	if err := m.queueFilter(c, spec); err != nil {
		return nil, fail("filter", err)
	}
	if len(opt.Replies) > 0 {
		m.queueReplies(c, n, addr.Addr(), opt.Replies)
	}
	if err := c.Flush(); err != nil {
		return nil, fail("filter", fmt.Errorf("nftables: %w", err))
	}
	if m.failAt == "attached" {
		return nil, fail("attached", errors.New("injected failure after the filter"))
	}
	m.Logger.Debug("sandbox network attached", "id", id, "netns", netnsPath, "host_if", sb.HostIf,
		"addr", sb.Addr, "gateway", sb.Gateway, "allow", l.Allow, "replies", att.Replies)
	undo.Release()
	return sb, nil
}

// RedirectDNS sends the DNS queries of attached sandbox id, addressed to its
// gateway's port 53, to to (the gateway address and the port of the
// sandbox's DNS service). Calling it again replaces the redirect.
func (m *Manager) RedirectDNS(id string, to netip.AddrPort) error {
	if err := m.init(); err != nil {
		return err
	}
	n := m.cfg.names(id)
	l, err := m.cfg.readLease(n.hash)
	if errors.Is(err, fs.ErrNotExist) || (err == nil && l.ID != id) {
		return fmt.Errorf("redirect DNS of %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return err
	}
	if l.Attached == nil {
		return fmt.Errorf("redirect DNS of %s: not an attached sandbox", id)
	}
	if !to.Addr().Is4() {
		return fmt.Errorf("redirect DNS of %s: %s is not IPv4", id, to)
	}
	c, err := nftables.New()
	if err != nil {
		return err
	}
	t := c.AddTable(m.natTable())
	policy := nftables.ChainPolicyAccept
	ch := c.AddChain(&nftables.Chain{
		Table: t, Name: n.base + "-dnat", Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest, Policy: &policy,
	})
	c.FlushChain(ch)
	for _, p := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
			ipSrc(r0), eq(r0, a4(l.Addr.Addr())),
			ipDst(r0), eq(r0, a4(l.Gateway)),
			l4proto(r0), eq(r0, []byte{p}),
			thDport(r0), eq(r0, be16(53)),
			&expr.Immediate{Register: r1, Data: a4(to.Addr())},
			&expr.Immediate{Register: r2, Data: be16(to.Port())},
			&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: r1, RegProtoMin: r2, Specified: true},
		}})
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("redirect DNS of %s: nftables: %w", id, err)
	}
	return nil
}

// queueReplies adds the chain that lets only replies leave from the
// sandbox's served ports: after conntrack, a packet from such a port that
// is not in the reply direction of a connection is dropped.
func (m *Manager) queueReplies(c *nftables.Conn, n names, addr netip.Addr, ports []Port) {
	t := c.AddTable(m.natTable())
	policy := nftables.ChainPolicyAccept
	ch := c.AddChain(&nftables.Chain{
		Table: t, Name: n.base + "-replies", Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRef(-140), Policy: &policy,
	})
	for _, p := range ports {
		match := []expr.Any{
			ipSrc(r0), eq(r0, a4(addr)),
			l4proto(r0), eq(r0, []byte{protoNum(p.Proto)}),
			thSport(r0), eq(r0, be16(p.Port)),
		}
		reply := append(append([]expr.Any{}, match...),
			&expr.Ct{Register: r0, Key: expr.CtKeyDIRECTION}, eq(r0, []byte{1}), // IP_CT_DIR_REPLY
			verdict(expr.VerdictAccept))
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: reply})
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: append(match, counterExpr(), verdict(expr.VerdictDrop))})
	}
}

func counterExpr() expr.Any { return &expr.Counter{} }

// inspectNetns reads the namespace's one interface and its host end.
func inspectNetns(path string) (*nsView, error) {
	nsh, err := netns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("open netns: %w", err)
	}
	defer nsh.Close()
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return nil, fmt.Errorf("netlink in netns: %w", err)
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list interfaces: %w", err)
	}
	var ifs []netlink.Link
	for _, l := range links {
		if l.Attrs().Flags&net.FlagLoopback == 0 {
			ifs = append(ifs, l)
		}
	}
	if len(ifs) == 0 {
		return nil, ErrNoInterface
	}
	if len(ifs) > 1 {
		var names []string
		for _, l := range ifs {
			names = append(names, l.Attrs().Name)
		}
		return nil, fmt.Errorf("the namespace has %d interfaces (%s): a sandbox can take over exactly one", len(ifs), strings.Join(names, ", "))
	}
	link := ifs[0]
	if link.Type() != "veth" {
		return nil, fmt.Errorf("interface %s is a %s, not a veth: the filter needs the host end of a veth", link.Attrs().Name, link.Type())
	}
	v := &nsView{link: link.Attrs().Name, mac: link.Attrs().HardwareAddr}
	if len(v.mac) != 6 {
		return nil, fmt.Errorf("interface %s has no Ethernet address", v.link)
	}
	addrs, err := h.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("addresses of %s: %w", v.link, err)
	}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP.To4())
		if !ok {
			continue
		}
		bits, _ := a.Mask.Size()
		v.addrs = append(v.addrs, netip.PrefixFrom(ip, bits))
		var brd netip.Addr
		if a.Broadcast != nil {
			brd, _ = netip.AddrFromSlice(a.Broadcast.To4())
		}
		v.broadcast = append(v.broadcast, brd)
	}
	if len(v.addrs) != 1 {
		return nil, fmt.Errorf("interface %s has %d IPv4 addresses, want exactly 1 (an earlier sandbox may have taken it over and not given it back)", v.link, len(v.addrs))
	}
	routes, err := h.RouteList(link, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("routes of %s: %w", v.link, err)
	}
	for _, r := range routes {
		if r.Protocol == unix.RTPROT_KERNEL {
			continue // made by the address itself
		}
		sr := savedRoute{Scope: uint8(r.Scope), Priority: r.Priority}
		if r.Dst != nil {
			ip, _ := netip.AddrFromSlice(r.Dst.IP.To4())
			bits, _ := r.Dst.Mask.Size()
			sr.Dst = netip.PrefixFrom(ip, bits)
		}
		if r.Gw != nil {
			sr.Gw, _ = netip.AddrFromSlice(r.Gw.To4())
		}
		if r.Src != nil {
			sr.Src, _ = netip.AddrFromSlice(r.Src.To4())
		}
		if (!sr.Dst.IsValid() || sr.Dst.Bits() == 0) && sr.Gw.IsValid() {
			v.gateway = sr.Gw
		}
		v.routes = append(v.routes, sr)
	}
	if !v.gateway.IsValid() {
		return nil, fmt.Errorf("interface %s has no IPv4 default route", v.link)
	}
	if !v.addrs[0].Contains(v.gateway) {
		return nil, fmt.Errorf("gateway %s is not on %s's network %s", v.gateway, v.link, v.addrs[0].Masked())
	}

	// The host end: the veth peer, in the root namespace.
	peer := link.Attrs().ParentIndex
	if peer == 0 {
		return nil, fmt.Errorf("interface %s: no veth peer index", v.link)
	}
	host, err := netlink.LinkByIndex(peer)
	if err != nil {
		return nil, fmt.Errorf("host end of %s (index %d): %w", v.link, peer, err)
	}
	if host.Type() != "veth" {
		return nil, fmt.Errorf("host end %s of %s is a %s, not a veth", host.Attrs().Name, v.link, host.Type())
	}
	if hv, ok := host.(*netlink.Veth); ok && hv.PeerHardwareAddr != nil && hv.PeerHardwareAddr.String() != v.mac.String() {
		return nil, fmt.Errorf("host interface %s (index %d) is not the peer of %s", host.Attrs().Name, peer, v.link)
	}
	// An index alone names nothing: the interface's peer may be in a third
	// namespace (made by a co-located task with NET_ADMIN) at an index
	// that, here, is another allocation's host end. The host end must be
	// this interface's peer, in this namespace (the kernel gives the
	// namespace an id when it reports the host end's link).
	nsid, err := netlink.GetNetNsIdByFd(int(nsh))
	if err != nil {
		return nil, fmt.Errorf("id of the namespace: %w", err)
	}
	if nsid < 0 || host.Attrs().NetNsID != nsid || host.Attrs().ParentIndex != link.Attrs().Index {
		return nil, fmt.Errorf("interface %s's peer is not in the root namespace (index %d there is %s, whose peer is another interface): the namespace was changed after Nomad made it", v.link, peer, host.Attrs().Name)
	}
	v.hostIf = host.Attrs().Name
	// The gateway is the bridge the host end is a port of, or the host end
	// itself (point-to-point).
	v.gatewayMAC = host.Attrs().HardwareAddr
	if mi := host.Attrs().MasterIndex; mi != 0 {
		br, err := netlink.LinkByIndex(mi)
		if err != nil {
			return nil, fmt.Errorf("bridge of %s: %w", v.hostIf, err)
		}
		v.gatewayMAC = br.Attrs().HardwareAddr
	}
	if len(v.gatewayMAC) != 6 {
		return nil, fmt.Errorf("gateway of %s has no Ethernet address", v.link)
	}
	return v, nil
}

// restoreNetns gives the namespace's interface back the addresses and
// routes it had when the sandbox was attached. A namespace or interface
// that is gone needs nothing.
func restoreNetns(a *attachment) error {
	nsh, err := netns.GetFromPath(a.Netns)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("open netns %s: %w", a.Netns, err)
	}
	defer nsh.Close()
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return fmt.Errorf("netlink in netns %s: %w", a.Netns, err)
	}
	defer h.Close()
	link, err := h.LinkByName(a.Link)
	if err != nil {
		if isLinkNotFound(err) {
			return nil
		}
		return fmt.Errorf("interface %s in %s: %w", a.Link, a.Netns, err)
	}
	var errs []error
	if err := h.LinkSetUp(link); err != nil {
		errs = append(errs, fmt.Errorf("%s up: %w", a.Link, err))
	}
	for i, p := range a.Addrs {
		na := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)}}
		if i < len(a.Broadcast) && a.Broadcast[i].IsValid() {
			na.Broadcast = a.Broadcast[i].AsSlice()
		}
		if err := h.AddrReplace(link, na); err != nil {
			errs = append(errs, fmt.Errorf("address %s on %s: %w", p, a.Link, err))
		}
	}
	for _, r := range a.Routes {
		nr := &netlink.Route{LinkIndex: link.Attrs().Index, Scope: netlink.Scope(r.Scope), Priority: r.Priority}
		if r.Dst.IsValid() {
			nr.Dst = &net.IPNet{IP: r.Dst.Addr().AsSlice(), Mask: net.CIDRMask(r.Dst.Bits(), 32)}
		}
		if r.Gw.IsValid() {
			nr.Gw = r.Gw.AsSlice()
		}
		if r.Src.IsValid() {
			nr.Src = r.Src.AsSlice()
		}
		if err := h.RouteReplace(nr); err != nil {
			errs = append(errs, fmt.Errorf("route %+v on %s: %w", r, a.Link, err))
		}
	}
	return errors.Join(errs...)
}
