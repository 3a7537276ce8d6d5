package netpolicy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// The filter of one sandbox is a base chain on the ingress hook of the host
// end of its veth, in the netdev table Config.Table. Every frame the sandbox
// sends passes it before the host's stack sees it; nothing inside the
// sandbox or its namespace can change it. Layout (nft syntax, <b> the
// sandbox's base name):
//
//	chain <b> { type filter hook ingress device <b> priority filter; policy drop;
//	  ether saddr != <mac> counter name <b>-spoofed drop
//	  arp htype 1 ptype ip hlen 6 plen 4 arp saddr ether <mac> arp saddr ip <addr> accept
//	  (the same with arp saddr ip 0.0.0.0: address probes)
//	  ether type arp counter name <b>-spoofed drop
//	  ether type ip6 counter name <b>-ipv6 drop
//	  ether type != ip counter name <b>-other drop
//	  ip saddr != <addr> counter name <b>-spoofed drop
//	  ip daddr <gateway> udp dport 53 limit rate 200/second burst 400 packets accept
//	  ip daddr <gateway> tcp dport 53 limit rate 200/second burst 400 packets accept
//	  fib daddr type { local, broadcast, anycast, multicast } counter name <b>-denied goto <b>-drop
//	  ip daddr @<b>-block counter name <b>-denied goto <b>-drop
//	  ip daddr . meta l4proto . th dport @<b>-allow accept
//	  ip daddr . meta l4proto . th sport . th dport @<b>-flows update @<b>-flows { ... } accept
//	  (per DNS port group) meta l4proto P th dport LO-HI ip daddr @<b>-dns-P-LO-HI
//	      update @<b>-flows { ip daddr . meta l4proto . th sport . th dport } accept
//	  counter name <b>-denied goto <b>-drop
//	}
//	chain <b>-drop {
//	  meta l4proto tcp update @<b>-denied { ip daddr . meta l4proto . th dport counter } drop
//	  meta l4proto udp update @<b>-denied { ... } drop
//	  update @<b>-denied { ip daddr . meta l4proto . 0 counter } drop
//	  drop
//	}
//
// and, in the ip table, after conntrack:
//
//	chain <b>-ct { type filter hook prerouting priority -140; policy accept;
//	  ip saddr <addr> ip daddr != <gateway> ct state new ct count over 2048 counter drop
//	  ip saddr <addr> ip daddr <gateway> tcp dport 53 ct state new ct count over 32 counter drop
//	}
//
// All of it is added in one netlink batch, which the kernel applies
// atomically: a sandbox's chain is there whole or not at all.

// Limits one sandbox cannot exceed, so that it cannot starve the others.
const (
	// DNSPacketRate and DNSPacketBurst bound the packets per second (per
	// protocol) a sandbox sends to its DNS service.
	DNSPacketRate  = 200
	DNSPacketBurst = 400
	// MaxConns bounds the connections (conntrack entries) a sandbox has
	// open at once to destinations other than its gateway; DNS to the
	// gateway is bounded by DNSPacketRate instead.
	MaxConns = 2048
	// MaxDNSTCPConns bounds the TCP connections a sandbox has open at once
	// to its DNS service.
	MaxDNSTCPConns = 32
)

// Registers: the 32-bit registers from NFT_REG32_00, so that a
// concatenation is built in consecutive ones.
const (
	r0 = unix.NFT_REG32_00
	r1 = unix.NFT_REG32_01
	r2 = unix.NFT_REG32_02
	r3 = unix.NFT_REG32_03
)

const (
	deniedSetSize = 4096
	flowsSetSize  = 16384
	dnsSetSize    = 4096
)

var (
	allowKeyType = nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeInetProto, nftables.TypeInetService)
	flowKeyType  = nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeInetProto, nftables.TypeInetService, nftables.TypeInetService)
)

func ld(base expr.PayloadBase, off, n, reg uint32) *expr.Payload {
	return &expr.Payload{OperationType: expr.PayloadLoad, DestRegister: reg, Base: base, Offset: off, Len: n}
}

func etherSrc(reg uint32) expr.Any  { return ld(expr.PayloadBaseLLHeader, 6, 6, reg) }
func etherType(reg uint32) expr.Any { return ld(expr.PayloadBaseLLHeader, 12, 2, reg) }
func ipSrc(reg uint32) expr.Any     { return ld(expr.PayloadBaseNetworkHeader, 12, 4, reg) }
func ipDst(reg uint32) expr.Any     { return ld(expr.PayloadBaseNetworkHeader, 16, 4, reg) }
func thSport(reg uint32) expr.Any   { return ld(expr.PayloadBaseTransportHeader, 0, 2, reg) }
func thDport(reg uint32) expr.Any   { return ld(expr.PayloadBaseTransportHeader, 2, 2, reg) }
func l4proto(reg uint32) expr.Any   { return &expr.Meta{Key: expr.MetaKeyL4PROTO, Register: reg} }

func cmp(op expr.CmpOp, reg uint32, data []byte) expr.Any {
	return &expr.Cmp{Op: op, Register: reg, Data: data}
}
func eq(reg uint32, data []byte) expr.Any  { return cmp(expr.CmpOpEq, reg, data) }
func neq(reg uint32, data []byte) expr.Any { return cmp(expr.CmpOpNeq, reg, data) }

func counterRef(name string) expr.Any {
	return &expr.Objref{Type: int(nftables.ObjTypeCounter), Name: name}
}

func verdict(k expr.VerdictKind) expr.Any { return &expr.Verdict{Kind: k} }
func gotoChain(c string) expr.Any         { return &expr.Verdict{Kind: expr.VerdictGoto, Chain: c} }

func be16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }

func a4(a netip.Addr) []byte { b := a.As4(); return b[:] }

// protoNum maps an entry's protocol to its IP protocol number.
func protoNum(p string) byte {
	if p == "udp" {
		return unix.IPPROTO_UDP
	}
	return unix.IPPROTO_TCP
}

// protoName is the inverse of protoNum for the protocols seen in denials.
func protoName(n byte) string {
	switch n {
	case unix.IPPROTO_TCP:
		return "tcp"
	case unix.IPPROTO_UDP:
		return "udp"
	case unix.IPPROTO_ICMP:
		return "icmp"
	case unix.IPPROTO_SCTP:
		return "sctp"
	case unix.IPPROTO_GRE:
		return "gre"
	}
	return "proto-" + strconv.Itoa(int(n))
}

// portGroup is a protocol and port range under which host name entries are
// granted: one DNS set each.
type portGroup struct {
	proto  string
	lo, hi uint16
}

func groupOf(e Entry) portGroup {
	lo, hi := e.ports()
	return portGroup{proto: e.proto(), lo: lo, hi: hi}
}

// filterSpec is everything the filter of one sandbox is built from.
type filterSpec struct {
	n       names
	device  string // the host end of the veth
	mac     net.HardwareAddr
	addr    netip.Addr
	gateway netip.Addr
	block   []addrRange
	allow   []allowElem
	groups  []portGroup
	idle    time.Duration
	// For attached sandboxes (see attach.go): the only destination MAC of
	// IPv4 frames, and the served ports whose replies pass.
	gatewayMAC net.HardwareAddr
	replies    []Port
}

func (m *Manager) netdevTable() *nftables.Table {
	return &nftables.Table{Family: nftables.TableFamilyNetdev, Name: m.cfg.Table}
}

func (m *Manager) natTable() *nftables.Table {
	return &nftables.Table{Family: nftables.TableFamilyIPv4, Name: m.cfg.Table}
}

// queueFilter adds to c's batch the table (if missing) and every object of
// one sandbox's filter.
func (m *Manager) queueFilter(c *nftables.Conn, s *filterSpec) error {
	t := c.AddTable(m.netdevTable())
	n := s.n

	for _, name := range []string{n.cSpoofed, n.cIPv6, n.cOther, n.cDenied} {
		c.AddObj(&nftables.CounterObj{Table: t, Name: name})
	}

	block := &nftables.Set{Table: t, Name: n.block, KeyType: nftables.TypeIPAddr, Interval: true}
	var blockElems []nftables.SetElement
	for _, r := range s.block {
		blockElems = append(blockElems, nftables.SetElement{Key: u32b(r.lo)})
		if r.hi != 0xffffffff {
			blockElems = append(blockElems, nftables.SetElement{Key: u32b(r.hi + 1), IntervalEnd: true})
		}
	}
	if err := c.AddSet(block, blockElems); err != nil {
		return err
	}

	allow := &nftables.Set{Table: t, Name: n.allow, KeyType: allowKeyType, Interval: true, Concatenation: true}
	var allowElems []nftables.SetElement
	for _, a := range s.allow {
		allowElems = append(allowElems, nftables.SetElement{
			Key:    allowKey(a.lo, a.proto, a.portLo),
			KeyEnd: allowKey(a.hi, a.proto, a.portHi),
		})
	}
	if err := c.AddSet(allow, allowElems); err != nil {
		return err
	}

	denied := &nftables.Set{Table: t, Name: n.denied, KeyType: allowKeyType, Dynamic: true, Size: deniedSetSize}
	if err := c.AddSet(denied, nil); err != nil {
		return err
	}

	var flows *nftables.Set
	dnsSets := map[portGroup]*nftables.Set{}
	if len(s.groups) > 0 {
		flows = &nftables.Set{Table: t, Name: n.flows, KeyType: flowKeyType, Concatenation: true,
			Dynamic: true, HasTimeout: true, Timeout: s.idle, Size: flowsSetSize}
		if err := c.AddSet(flows, nil); err != nil {
			return err
		}
		for _, g := range s.groups {
			ds := &nftables.Set{Table: t, Name: n.dnsSet(g.proto, g.lo, g.hi), KeyType: nftables.TypeIPAddr,
				HasTimeout: true, Size: dnsSetSize}
			if err := c.AddSet(ds, nil); err != nil {
				return err
			}
			dnsSets[g] = ds
		}
	}

	// The chain that records a denied destination and drops.
	drop := c.AddChain(&nftables.Chain{Table: t, Name: n.drop})
	record := func(protoCheck []expr.Any, port expr.Any) []expr.Any {
		ex := []expr.Any{&expr.Meta{Key: expr.MetaKeyPROTOCOL, Register: r0}, eq(r0, be16(unix.ETH_P_IP))}
		ex = append(ex, ipDst(r0), l4proto(r1))
		ex = append(ex, protoCheck...)
		return append(ex, port,
			&expr.Dynset{SrcRegKey: r0, SetName: denied.Name, SetID: denied.ID,
				Operation: unix.NFT_DYNSET_OP_UPDATE, Exprs: []expr.Any{&expr.Counter{}}},
			verdict(expr.VerdictDrop))
	}
	c.AddRule(&nftables.Rule{Table: t, Chain: drop, Exprs: record(
		[]expr.Any{eq(r1, []byte{unix.IPPROTO_TCP})}, thDport(r2))})
	c.AddRule(&nftables.Rule{Table: t, Chain: drop, Exprs: record(
		[]expr.Any{eq(r1, []byte{unix.IPPROTO_UDP})}, thDport(r2))})
	c.AddRule(&nftables.Rule{Table: t, Chain: drop, Exprs: record(
		nil, &expr.Immediate{Register: r2, Data: []byte{0, 0, 0, 0}})})
	c.AddRule(&nftables.Rule{Table: t, Chain: drop, Exprs: []expr.Any{verdict(expr.VerdictDrop)}})

	// The base chain on the host end's ingress.
	policy := nftables.ChainPolicyDrop
	ch := c.AddChain(&nftables.Chain{
		Table: t, Name: n.base, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookIngress, Priority: nftables.ChainPriorityFilter,
		Device: s.device, Policy: &policy,
	})
	rule := func(ex ...expr.Any) { c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: ex}) }

	mac := []byte(s.mac)
	addr, gw := a4(s.addr), a4(s.gateway)

	// Every rule states the protocols it reads (meta iiftype, ether type,
	// meta protocol) so that `nft list` shows it in words.
	ether := []expr.Any{&expr.Meta{Key: expr.MetaKeyIIFTYPE, Register: r0}, eq(r0, binary.NativeEndian.AppendUint16(nil, unix.ARPHRD_ETHER))}
	etherIs := func(op expr.CmpOp, typ uint16) []expr.Any {
		return append(append([]expr.Any{}, ether...), etherType(r0), cmp(op, r0, be16(typ)))
	}
	ipv4 := []expr.Any{&expr.Meta{Key: expr.MetaKeyPROTOCOL, Register: r0}, eq(r0, be16(unix.ETH_P_IP))}
	ipRule := func(ex ...expr.Any) { rule(append(append([]expr.Any{}, ipv4...), ex...)...) }

	rule(append(append([]expr.Any{}, ether...), etherSrc(r0), neq(r0, mac), counterRef(n.cSpoofed), verdict(expr.VerdictDrop))...)
	for _, spa := range [][]byte{addr, {0, 0, 0, 0}} {
		rule(append(etherIs(expr.CmpOpEq, unix.ETH_P_ARP),
			ld(expr.PayloadBaseNetworkHeader, 0, 2, r0), eq(r0, be16(1)), // htype Ethernet
			ld(expr.PayloadBaseNetworkHeader, 2, 2, r0), eq(r0, be16(unix.ETH_P_IP)),
			ld(expr.PayloadBaseNetworkHeader, 4, 1, r0), eq(r0, []byte{6}),
			ld(expr.PayloadBaseNetworkHeader, 5, 1, r0), eq(r0, []byte{4}),
			ld(expr.PayloadBaseNetworkHeader, 8, 6, r0), eq(r0, mac),
			ld(expr.PayloadBaseNetworkHeader, 14, 4, r0), eq(r0, spa),
			verdict(expr.VerdictAccept))...)
	}
	rule(append(etherIs(expr.CmpOpEq, unix.ETH_P_ARP), counterRef(n.cSpoofed), verdict(expr.VerdictDrop))...)
	rule(append(etherIs(expr.CmpOpEq, unix.ETH_P_IPV6), counterRef(n.cIPv6), verdict(expr.VerdictDrop))...)
	// VLAN-tagged frames read as ether type 8021q here and end in this rule.
	rule(append(etherIs(expr.CmpOpNeq, unix.ETH_P_IP), counterRef(n.cOther), verdict(expr.VerdictDrop))...)
	ipRule(ipSrc(r0), neq(r0, addr), counterRef(n.cSpoofed), verdict(expr.VerdictDrop))
	if len(s.gatewayMAC) == 6 {
		// On a bridge port: a frame for any other MAC would be switched to
		// another allocation without passing the host's IP stack.
		ipRule(append(append([]expr.Any{}, ether...), ld(expr.PayloadBaseLLHeader, 0, 6, r0), neq(r0, []byte(s.gatewayMAC)),
			counterRef(n.cDenied), gotoChain(n.drop))...)
	}
	for _, p := range s.replies {
		// Replies from a served port; the prerouting chain <b>-replies
		// drops those conntrack does not know as replies.
		ipRule(l4proto(r0), eq(r0, []byte{protoNum(p.Proto)}), thSport(r0), eq(r0, be16(p.Port)),
			verdict(expr.VerdictAccept))
	}
	for _, p := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
		// Rate-limited in the kernel, per sandbox and protocol: a flood
		// beyond it never wakes the plugin; it falls through to the node
		// rule below and is counted as denied like any other packet.
		ipRule(ipDst(r0), eq(r0, gw), l4proto(r0), eq(r0, []byte{p}), thDport(r0), eq(r0, be16(53)),
			&expr.Limit{Type: expr.LimitTypePkts, Rate: DNSPacketRate, Unit: expr.LimitTimeSecond, Burst: DNSPacketBurst},
			verdict(expr.VerdictAccept))
	}
	// The node itself, at whatever addresses it has when the packet
	// passes: a route lookup per packet, so an address that appears after
	// this filter was built (Nomad's bridge, docker0, a VPN, a DHCP lease)
	// is denied from its first packet. Only DNS on the gateway (above)
	// reaches the node.
	for _, typ := range []uint32{unix.RTN_LOCAL, unix.RTN_BROADCAST, unix.RTN_ANYCAST, unix.RTN_MULTICAST} {
		ipRule(&expr.Fib{Register: r0, FlagDADDR: true, ResultADDRTYPE: true},
			eq(r0, binary.NativeEndian.AppendUint32(nil, typ)), counterRef(n.cDenied), gotoChain(n.drop))
	}
	ipRule(ipDst(r0), &expr.Lookup{SourceRegister: r0, SetName: block.Name, SetID: block.ID},
		counterRef(n.cDenied), gotoChain(n.drop))
	ipRule(ipDst(r0), l4proto(r1), thDport(r2),
		&expr.Lookup{SourceRegister: r0, SetName: allow.Name, SetID: allow.ID},
		verdict(expr.VerdictAccept))
	if flows != nil {
		tuple := []expr.Any{ipDst(r0), l4proto(r1), thSport(r2), thDport(r3)}
		update := &expr.Dynset{SrcRegKey: r0, SetName: flows.Name, SetID: flows.ID, Operation: unix.NFT_DYNSET_OP_UPDATE}
		ex := append(append([]expr.Any{}, tuple...),
			&expr.Lookup{SourceRegister: r0, SetName: flows.Name, SetID: flows.ID},
			update, verdict(expr.VerdictAccept))
		ipRule(ex...)
		for _, g := range s.groups {
			ds := dnsSets[g]
			ex := []expr.Any{l4proto(r0), eq(r0, []byte{protoNum(g.proto)})}
			if g.lo != 0 || g.hi != 65535 {
				ex = append(ex, thDport(r0))
				if g.lo == g.hi {
					ex = append(ex, eq(r0, be16(g.lo)))
				} else {
					ex = append(ex, cmp(expr.CmpOpGte, r0, be16(g.lo)), cmp(expr.CmpOpLte, r0, be16(g.hi)))
				}
			}
			ex = append(ex, ipDst(r0), &expr.Lookup{SourceRegister: r0, SetName: ds.Name, SetID: ds.ID})
			ex = append(ex, tuple...)
			ex = append(ex, update, verdict(expr.VerdictAccept))
			ipRule(ex...)
		}
	}
	rule(counterRef(n.cDenied), gotoChain(n.drop))
	m.queueConnLimit(c, n, s.addr, s.gateway)
	return nil
}

// queueConnLimit adds the chain that bounds the sandbox's share of the
// node's conntrack table: a new connection beyond MaxConns open ones is
// dropped before conntrack keeps it. The netdev filter sees no conntrack,
// so this sits in the ip table, after conntrack has looked the packet up;
// the netdev filter's anti-spoofing makes the source address the sandbox's.
func (m *Manager) queueConnLimit(c *nftables.Conn, n names, addr, gw netip.Addr) {
	t := c.AddTable(m.natTable())
	policy := nftables.ChainPolicyAccept
	ch := c.AddChain(&nftables.Chain{
		Table: t, Name: n.base + "-ct", Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRef(-140), Policy: &policy,
	})
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
		ipSrc(r0), eq(r0, a4(addr)),
		ipDst(r0), neq(r0, a4(gw)),
		&expr.Ct{Register: r0, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: r0, DestRegister: r0, Len: 4,
			Mask: binary.NativeEndian.AppendUint32(nil, expr.CtStateBitNEW), Xor: []byte{0, 0, 0, 0}},
		neq(r0, []byte{0, 0, 0, 0}),
		&expr.Connlimit{Count: MaxConns, Flags: expr.NFT_CONNLIMIT_F_INV},
		counterExpr(), verdict(expr.VerdictDrop),
	}})
	// TCP to the DNS service is outside MaxConns (the gateway is), and
	// the service accepts only a few connections at a time: without this
	// ceiling the sandbox would keep a full accept queue of established
	// conntrack entries, each kept for days.
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
		ipSrc(r0), eq(r0, a4(addr)),
		ipDst(r0), eq(r0, a4(gw)),
		l4proto(r0), eq(r0, []byte{unix.IPPROTO_TCP}),
		thDport(r0), eq(r0, be16(53)),
		&expr.Ct{Register: r0, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: r0, DestRegister: r0, Len: 4,
			Mask: binary.NativeEndian.AppendUint32(nil, expr.CtStateBitNEW), Xor: []byte{0, 0, 0, 0}},
		neq(r0, []byte{0, 0, 0, 0}),
		&expr.Connlimit{Count: MaxDNSTCPConns, Flags: expr.NFT_CONNLIMIT_F_INV},
		counterExpr(), verdict(expr.VerdictDrop),
	}})
}

// queueMasquerade adds to c's batch the ip table and its one postrouting rule:
// traffic from the pool to anywhere outside it leaves with the address of
// the outgoing interface. Flushing the chain first keeps it at one rule
// whichever sandbox is created first.
func (m *Manager) queueMasquerade(c *nftables.Conn) {
	t := c.AddTable(m.natTable())
	policy := nftables.ChainPolicyAccept
	ch := c.AddChain(&nftables.Chain{
		Table: t, Name: "postrouting", Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource, Policy: &policy,
	})
	c.FlushChain(ch)
	mask := net.CIDRMask(m.cfg.Subnet.Bits(), 32)
	net4 := a4(m.cfg.Subnet.Addr())
	masked := func(load expr.Any, op expr.CmpOp) []expr.Any {
		return []expr.Any{load,
			&expr.Bitwise{SourceRegister: r0, DestRegister: r0, Len: 4, Mask: mask, Xor: []byte{0, 0, 0, 0}},
			cmp(op, r0, net4)}
	}
	ex := append(masked(ipSrc(r0), expr.CmpOpEq), masked(ipDst(r0), expr.CmpOpNeq)...)
	ex = append(ex, &expr.Masq{})
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: ex})
}

func u32b(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

// allowKey is a key of the allow and denied sets: address, protocol and port,
// each padded to a 32-bit register.
func allowKey(addr uint32, proto byte, port uint16) []byte {
	k := make([]byte, 12)
	binary.BigEndian.PutUint32(k[0:], addr)
	k[4] = proto
	binary.BigEndian.PutUint16(k[8:], port)
	return k
}

// span is an inclusive range of addresses or ports.
type span[T uint16 | uint32] struct{ lo, hi T }

// mergeSpans returns the union of ss as sorted, disjoint, non-adjacent
// spans; it sorts ss in place.
func mergeSpans[T uint16 | uint32](ss []span[T]) []span[T] {
	sort.Slice(ss, func(i, j int) bool { return ss[i].lo < ss[j].lo })
	var out []span[T]
	for _, r := range ss {
		if k := len(out) - 1; k >= 0 && uint64(r.lo) <= uint64(out[k].hi)+1 {
			out[k].hi = max(out[k].hi, r.hi)
			continue
		}
		out = append(out, r)
	}
	return out
}

// subtractSpans returns the parts of a not covered by b; both sorted and
// disjoint, as mergeSpans returns them.
func subtractSpans[T uint16 | uint32](a, b []span[T]) []span[T] {
	var out []span[T]
	for _, r := range a {
		lo := uint64(r.lo)
		for _, c := range b {
			if uint64(c.hi) < lo || c.lo > r.hi {
				continue
			}
			if uint64(c.lo) > lo {
				out = append(out, span[T]{T(lo), c.lo - 1})
			}
			lo = uint64(c.hi) + 1
		}
		if lo <= uint64(r.hi) {
			out = append(out, span[T]{T(lo), r.hi})
		}
	}
	return out
}

// addrRange is an inclusive IPv4 range.
type addrRange = span[uint32]

func prefixRange(p netip.Prefix) addrRange {
	lo := addrU32(p.Masked().Addr())
	size := uint64(1) << (32 - p.Bits())
	return addrRange{lo: lo, hi: uint32(uint64(lo) + size - 1)}
}

// mergeRanges returns the union of the IPv4 prefixes in ps as sorted,
// disjoint, non-adjacent ranges; IPv6 prefixes are left out.
func mergeRanges(ps []netip.Prefix) []addrRange {
	var rs []addrRange
	for _, p := range ps {
		if p.IsValid() && p.Addr().Is4() {
			rs = append(rs, prefixRange(p))
		}
	}
	return mergeSpans(rs)
}

// allowElem is one element of the static allow set: an address range, a
// protocol and a port range.
type allowElem struct {
	lo, hi         uint32
	proto          byte
	portLo, portHi uint16
}

// allowElems turns the IPv4 IP entries into disjoint elements of the allow
// set. The kernel's set for concatenated ranges refuses overlapping
// elements, and allowlists overlap ("203.0.113.0/24" and "203.0.113.7:443"),
// so the union is cut at every address boundary, the port ranges of each
// piece are merged, and neighbouring pieces with the same ports are joined.
func allowElems(entries []Entry) []allowElem {
	var out []allowElem
	for _, proto := range []byte{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
		type box struct {
			a      addrRange
			lo, hi uint16
		}
		var boxes []box
		cuts := map[uint64]bool{}
		for _, e := range entries {
			if !e.Prefix.IsValid() || !e.Prefix.Addr().Is4() || protoNum(e.proto()) != proto {
				continue
			}
			lo, hi := e.ports()
			r := prefixRange(e.Prefix)
			boxes = append(boxes, box{r, lo, hi})
			cuts[uint64(r.lo)] = true
			cuts[uint64(r.hi)+1] = true
		}
		if len(boxes) == 0 {
			continue
		}
		points := make([]uint64, 0, len(cuts))
		for p := range cuts {
			points = append(points, p)
		}
		sort.Slice(points, func(i, j int) bool { return points[i] < points[j] })

		type piece struct {
			a     addrRange
			ports []portRange
		}
		var pieces []piece
		for i := 0; i+1 < len(points); i++ {
			seg := addrRange{uint32(points[i]), uint32(points[i+1] - 1)}
			var ports []portRange
			for _, b := range boxes {
				if b.a.lo <= seg.lo && seg.hi <= b.a.hi {
					ports = append(ports, portRange{b.lo, b.hi})
				}
			}
			if len(ports) == 0 {
				continue
			}
			ports = mergeSpans(ports)
			if k := len(pieces) - 1; k >= 0 && uint64(pieces[k].a.hi)+1 == uint64(seg.lo) && slices.Equal(pieces[k].ports, ports) {
				pieces[k].a.hi = seg.hi
				continue
			}
			pieces = append(pieces, piece{seg, ports})
		}
		for _, p := range pieces {
			for _, pr := range p.ports {
				out = append(out, allowElem{lo: p.a.lo, hi: p.a.hi, proto: proto, portLo: pr.lo, portHi: pr.hi})
			}
		}
	}
	return out
}

type portRange = span[uint16]

// ours lists the chains, sets and counters in the netdev table whose names
// carry a sandbox hash, by hash. A missing table lists nothing.
type nftObjects struct {
	chains   []string // base chains first
	sets     []string
	counters []string
	ipChains []string // in the ip table: attached sandboxes' DNS redirect and replies
}

func (m *Manager) listOurs(c *nftables.Conn) (map[string]*nftObjects, error) {
	out := map[string]*nftObjects{}
	get := func(h string) *nftObjects {
		o := out[h]
		if o == nil {
			o = &nftObjects{}
			out[h] = o
		}
		return o
	}
	ipt := m.natTable()
	if _, err := c.ListTableOfFamily(ipt.Name, ipt.Family); err == nil {
		chains, err := c.ListChainsOfTableFamily(ipt.Family)
		if err != nil {
			return nil, fmt.Errorf("nft list chains: %w", err)
		}
		for _, ch := range chains {
			if ch.Table.Name != ipt.Name {
				continue
			}
			if h := m.cfg.hashOf(ch.Name); h != "" {
				get(h).ipChains = append(get(h).ipChains, ch.Name)
			}
		}
	} else if !isNotExist(err) {
		return nil, fmt.Errorf("nft list table: %w", err)
	}
	t := m.netdevTable()
	if _, err := c.ListTableOfFamily(t.Name, t.Family); err != nil {
		if isNotExist(err) {
			return out, nil
		}
		return nil, fmt.Errorf("nft list table: %w", err)
	}
	chains, err := c.ListChainsOfTableFamily(t.Family)
	if err != nil {
		return nil, fmt.Errorf("nft list chains: %w", err)
	}
	for _, ch := range chains {
		if ch.Table.Name != t.Name {
			continue
		}
		if h := m.cfg.hashOf(ch.Name); h != "" {
			o := get(h)
			if ch.Hooknum != nil {
				o.chains = append([]string{ch.Name}, o.chains...)
			} else {
				o.chains = append(o.chains, ch.Name)
			}
		}
	}
	sets, err := c.GetSets(t)
	if err != nil {
		return nil, fmt.Errorf("nft list sets: %w", err)
	}
	for _, s := range sets {
		if h := m.cfg.hashOf(s.Name); h != "" {
			get(h).sets = append(get(h).sets, s.Name)
		}
	}
	objs, err := c.GetNamedObjects(t)
	if err != nil {
		return nil, fmt.Errorf("nft list counters: %w", err)
	}
	for _, o := range objs {
		v, ok := o.(*nftables.NamedObj)
		if !ok || v.Type != nftables.ObjTypeCounter {
			continue
		}
		name := v.Name
		if h := m.cfg.hashOf(name); h != "" {
			get(h).counters = append(get(h).counters, name)
		}
	}
	return out, nil
}

// queueDelete adds to c's batch the removal of objs: chains (the base chain
// first, as it refers to the rest), then sets and counters.
func (m *Manager) queueDelete(c *nftables.Conn, objs *nftObjects) {
	t := m.netdevTable()
	for _, ch := range objs.chains {
		// Rules first: a chain cannot go while another chain's rule jumps
		// to it, and the base chain's rules refer to the sets.
		c.FlushChain(&nftables.Chain{Table: t, Name: ch})
	}
	for _, ch := range objs.chains {
		c.DelChain(&nftables.Chain{Table: t, Name: ch})
	}
	for _, s := range objs.sets {
		c.DelSet(&nftables.Set{Table: t, Name: s})
	}
	for _, name := range objs.counters {
		c.DeleteObject(&nftables.NamedObj{Table: t, Name: name, Type: nftables.ObjTypeCounter})
	}
	for _, ch := range objs.ipChains {
		c.FlushChain(&nftables.Chain{Table: m.natTable(), Name: ch})
		c.DelChain(&nftables.Chain{Table: m.natTable(), Name: ch})
	}
}

func isNotExist(err error) bool {
	return err != nil && (errors.Is(err, unix.ENOENT) || strings.Contains(err.Error(), "no such file or directory") ||
		strings.Contains(err.Error(), "not exist"))
}
