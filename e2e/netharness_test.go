//go:build e2e

package e2e

// Group networking on the suite's client. The client runs Nomad's CNI bridge
// (`network { mode = "bridge" }`) on a bridge of the suite's own, with the
// Debian CNI plugins. What bridge mode creates on the host, as seen with
// Nomad 1.6.3 and iptables-nft here:
//
//   - the bridge (Nomad never removes it), with route_localnet=1 set on it by
//     the portmap plugin, which is what lets mapped ports answer on
//     127.0.0.1, the address of the client's network_interface "lo";
//   - per allocation: the namespace /run/netns/<alloc ID>, a veth on the
//     bridge, an address reservation in /var/lib/cni/networks/nomad and a
//     result in /var/lib/cni/results, the nat chains CNI-<h> (masquerade)
//     and CNI-DN-<h> (port mapping), h being the hex SHA-512 of "nomad" and
//     the allocation ID, and rules in CNI-FORWARD, POSTROUTING and
//     CNI-HOSTPORT-DNAT; all removed when the allocation stops;
//   - for good: the tables ip filter (NOMAD-ADMIN, CNI-FORWARD, a jump in
//     FORWARD), ip nat (CNI-HOSTPORT-DNAT/-SETMARK/-MASQ, jumps in
//     PREROUTING, OUTPUT and POSTROUTING), an empty ip6 nat (portmap's
//     teardown lists it), /var/lib/cni, and net.ipv4.ip_forward=1.
//
// Before the agent starts, the suite records what exists (netSnapshot, kept
// in its directory so that the cleanup of a killed run can use it). After the
// agent has stopped, cleanNetwork removes what bridge mode made since then,
// and only that: the suite's bridge, CNI and NOMAD chains that are new (and
// the rules that jump to them), iptables-nft tables that are new and left
// empty, /var/lib/cni if it is new, ip_forward as it was. What an
// allocation or a sandbox should have removed itself is reported as left
// behind first.

import (
	"bytes"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/netpolicy"
)

const (
	// cniPath is where Debian's containernetworking-plugins puts them.
	cniPath = "/usr/lib/cni"
	// bridgeSubnet is the client's bridge_network_subnet: apart from the
	// driver's network_subnet default 10.89.0.0/16 and from the test
	// host's address plan (testutil.NetHost). The CNI bridge takes its
	// first address.
	bridgeSubnet  = "10.91.0.0/24"
	bridgeGateway = "10.91.0.1"
	// cniNetwork is the name of Nomad's bridge CNI network (its chain
	// names and state files derive from it).
	cniNetwork = "nomad"
	// cniStateDir is where the CNI plugins keep their state.
	cniStateDir = "/var/lib/cni"
	// netnsDir is where `ip netns` and Nomad's alloc namespaces live.
	netnsDir = "/run/netns"

	// The driver's netpolicy names with the plugin's defaults (the suite
	// does not change them).
	driverNetPrefix = netpolicy.DefaultPrefix
	driverNetTable  = netpolicy.DefaultTable

	netSnapFile   = "netsnap.json"
	sandboxesFile = "sandboxes"
)

// suiteNetID is the part of the suite's interface and namespace names that
// tells this run apart; it derives from the run's directory, so that the
// cleanup of a killed run finds them again.
func suiteNetID(tmp string) string {
	sum := sha256.Sum256([]byte(filepath.Base(tmp)))
	return hex.EncodeToString(sum[:2])
}

// driverNetNames are the namespace and host interface names the driver gives
// a sandbox's own network.
func driverNetNames(sandboxID string) (netns, link string) {
	return netpolicy.Config{}.SandboxNames(sandboxID)
}

// cniChainHash is the part of the CNI chain names of an allocation:
// CNI-<first 24> (bridge masquerade), CNI-DN-<first 21> (port mapping).
func cniChainHash(allocID string) string {
	sum := sha512.Sum512([]byte(cniNetwork + allocID))
	return hex.EncodeToString(sum[:])[:21]
}

// netSnapshot is the host's network state before the suite's agent ran.
type netSnapshot struct {
	Tables    []string `json:"tables"` // "family name"
	Chains    []string `json:"chains"` // "family table chain"
	Links     []string `json:"links"`
	CNIState  bool     `json:"cni_state"` // cniStateDir existed
	IPForward string   `json:"ip_forward"`
}

func has(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

// prepareNetwork checks that bridge mode can work here without clashing with
// anything, and records the host's network state.
func (h *harness) prepareNetwork() error {
	for _, p := range []string{"bridge", "host-local", "loopback", "firewall", "portmap"} {
		if _, err := os.Stat(filepath.Join(cniPath, p)); err != nil {
			return fmt.Errorf("CNI plugin %s missing in %s (Debian: apt-get install containernetworking-plugins): %v", p, cniPath, err)
		}
	}
	if err := checkFreeSubnets(bridgeSubnet); err != nil {
		return err
	}
	snap, err := takeNetSnapshot()
	if err != nil {
		return err
	}
	if has(snap.Links, h.bridge) {
		return fmt.Errorf("a link named %s (the suite's bridge) exists already", h.bridge)
	}
	b, err := json.MarshalIndent(snap, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(h.tmp, netSnapFile), b, 0o600)
}

// checkFreeSubnets fails if an address or route of the host lies in one of
// the subnets the suite is about to use.
func checkFreeSubnets(subnets ...string) error {
	var ps []netip.Prefix
	for _, s := range subnets {
		ps = append(ps, netip.MustParsePrefix(s))
	}
	addrs, err := netpolicy.NodeAddrs()
	if err != nil {
		return err
	}
	for _, a := range addrs {
		for _, p := range ps {
			if p.Contains(a.Addr()) {
				return fmt.Errorf("the host has address %s in %s, which the suite uses (left by another run?)", a.Addr(), p)
			}
		}
	}
	out, err := exec.Command("ip", "-4", "route", "show", "table", "all").Output()
	if err != nil {
		return fmt.Errorf("ip route: %v", err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		dst := f[0]
		if dst == "local" || dst == "broadcast" || dst == "unicast" {
			if len(f) < 2 {
				continue
			}
			dst = f[1]
		}
		r, err := netip.ParsePrefix(dst)
		if err != nil {
			a, aerr := netip.ParseAddr(dst)
			if aerr != nil {
				continue
			}
			r = netip.PrefixFrom(a, 32)
		}
		for _, p := range ps {
			if r.Bits() > 0 && p.Overlaps(r) {
				return fmt.Errorf("route %q overlaps %s, which the suite uses (left by another run?)", line, p)
			}
		}
	}
	return nil
}

func takeNetSnapshot() (*netSnapshot, error) {
	rs, err := listRuleset()
	if err != nil {
		return nil, err
	}
	snap := &netSnapshot{}
	for _, t := range rs.tables {
		snap.Tables = append(snap.Tables, t.key())
	}
	for _, c := range rs.chains {
		snap.Chains = append(snap.Chains, c.key())
	}
	snap.Links, err = linkNames()
	if err != nil {
		return nil, err
	}
	_, err = os.Stat(cniStateDir)
	snap.CNIState = err == nil
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
	if err != nil {
		return nil, err
	}
	snap.IPForward = strings.TrimSpace(string(b))
	return snap, nil
}

func readNetSnapshot(tmp string) (*netSnapshot, error) {
	b, err := os.ReadFile(filepath.Join(tmp, netSnapFile))
	if err != nil {
		return nil, err
	}
	var s netSnapshot
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// nftTable, nftChain and nftRule are the parts of `nft -j list ruleset`
// the suite reads.
type nftTable struct {
	Family string `json:"family"`
	Name   string `json:"name"`
}

func (t nftTable) key() string { return t.Family + " " + t.Name }

type nftChain struct {
	Family string `json:"family"`
	Table  string `json:"table"`
	Name   string `json:"name"`
	Hook   string `json:"hook"`
}

func (c nftChain) key() string { return c.Family + " " + c.Table + " " + c.Name }

type nftRule struct {
	Family  string          `json:"family"`
	Table   string          `json:"table"`
	Chain   string          `json:"chain"`
	Handle  int             `json:"handle"`
	Expr    json.RawMessage `json:"expr"`
	targets []string        // chains it jumps or goes to
}

type nftRuleset struct {
	raw    []byte
	tables []nftTable
	chains []nftChain
	rules  []nftRule
}

func listRuleset() (*nftRuleset, error) {
	var stderr bytes.Buffer
	cmd := exec.Command("nft", "-j", "list", "ruleset")
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("nft -j list ruleset: %v: %s", err, strings.TrimSpace(stderr.String()))
	}
	var doc struct {
		Nftables []map[string]json.RawMessage `json:"nftables"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		return nil, fmt.Errorf("nft -j list ruleset: %v", err)
	}
	rs := &nftRuleset{raw: out}
	for _, o := range doc.Nftables {
		if b, ok := o["table"]; ok {
			var t nftTable
			if err := json.Unmarshal(b, &t); err == nil {
				rs.tables = append(rs.tables, t)
			}
		}
		if b, ok := o["chain"]; ok {
			var c nftChain
			if err := json.Unmarshal(b, &c); err == nil {
				rs.chains = append(rs.chains, c)
			}
		}
		if b, ok := o["rule"]; ok {
			var r nftRule
			if err := json.Unmarshal(b, &r); err == nil {
				var expr any
				_ = json.Unmarshal(r.Expr, &expr)
				r.targets = jumpTargets(expr, nil)
				rs.rules = append(rs.rules, r)
			}
		}
	}
	return rs, nil
}

// jumpTargets collects the targets of the jump and goto verdicts in a rule's
// expressions.
func jumpTargets(v any, out []string) []string {
	switch x := v.(type) {
	case map[string]any:
		for k, sub := range x {
			if k == "jump" || k == "goto" {
				if m, ok := sub.(map[string]any); ok {
					if s, ok := m["target"].(string); ok {
						out = append(out, s)
						continue
					}
				}
			}
			out = jumpTargets(sub, out)
		}
	case []any:
		for _, sub := range x {
			out = jumpTargets(sub, out)
		}
	}
	return out
}

// contains reports whether any table, chain, set, counter or rule of the
// ruleset mentions s.
func (rs *nftRuleset) contains(s string) bool {
	return bytes.Contains(rs.raw, []byte(s))
}

func linkNames() ([]string, error) {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, i := range ifs {
		out = append(out, i.Name)
	}
	return out, nil
}

func linkExists(name string) bool {
	_, err := net.InterfaceByName(name)
	return err == nil
}

// bridgePorts are the interfaces attached to the bridge.
func bridgePorts(bridge string) []string {
	ents, err := os.ReadDir(filepath.Join("/sys/class/net", bridge, "brif"))
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

func netnsExists(name string) bool {
	_, err := os.Stat(filepath.Join(netnsDir, name))
	return err == nil
}

// recordSandboxes appends sandbox IDs to the suite's list, for the leftover
// checks of teardown.
func (h *harness) recordSandboxes(ids []string) error {
	if len(ids) == 0 {
		return nil
	}
	f, err := os.OpenFile(filepath.Join(h.tmp, sandboxesFile), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = fmt.Fprintln(f, strings.Join(ids, "\n"))
	return err
}

func (h *harness) recordedList(name string) []string {
	b, _ := os.ReadFile(filepath.Join(h.tmp, name))
	seen := map[string]bool{}
	var out []string
	for _, s := range strings.Fields(string(b)) {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}

// sandboxIDsOf are the sandbox IDs the driver reported for the allocation's
// tasks ("Sandbox started" events carry them).
func sandboxIDsOf(a *allocation) []string {
	var out []string
	if a == nil {
		return nil
	}
	for _, ts := range a.TaskStates {
		if ts == nil {
			continue
		}
		for _, e := range ts.Events {
			if id := e.Details["sandbox_id"]; id != "" && !has(out, id) {
				out = append(out, id)
			}
		}
	}
	sort.Strings(out)
	return out
}

// recordAllSandboxes records the sandbox IDs of every allocation the agent
// still knows.
func (h *harness) recordAllSandboxes() {
	var allocs []allocation
	if err := apiGet("/v1/allocations", &allocs); err != nil {
		return
	}
	for i := range allocs {
		a, err := getAlloc(allocs[i].ID)
		if err != nil {
			continue
		}
		_ = h.recordSandboxes(sandboxIDsOf(a))
	}
}

// netLeftovers lists what the network of these allocations and sandboxes
// left on the host: namespaces, interfaces, nft objects and CNI state. It
// runs after the allocations have stopped.
func netLeftovers(allocIDs, sandboxIDs []string) []string {
	var out []string
	rs, err := listRuleset()
	if err != nil {
		out = append(out, err.Error())
		rs = &nftRuleset{}
	}
	for _, a := range allocIDs {
		if netnsExists(a) {
			out = append(out, fmt.Sprintf("network namespace %s (allocation %s)", filepath.Join(netnsDir, a), a))
		}
		if h := cniChainHash(a); rs.contains("CNI-"+h) || rs.contains("CNI-DN-"+h) {
			out = append(out, fmt.Sprintf("nft: CNI chains of allocation %s (CNI-%s..., CNI-DN-%s)", a, h, h))
		}
		out = append(out, cniStateOf(a)...)
	}
	for _, s := range sandboxIDs {
		ns, link := driverNetNames(s)
		if netnsExists(ns) {
			out = append(out, fmt.Sprintf("network namespace %s (sandbox %s)", filepath.Join(netnsDir, ns), s))
		}
		if linkExists(link) {
			out = append(out, fmt.Sprintf("interface %s (sandbox %s)", link, s))
		}
		if rs.contains(link) {
			out = append(out, fmt.Sprintf("nft objects named %s... (sandbox %s)", link, s))
		}
	}
	return out
}

// cniStateOf lists the CNI state files of an allocation: its address
// reservation (the file is named after the address and holds the container
// ID, Nomad's allocation ID) and its cached result.
func cniStateOf(allocID string) []string {
	var out []string
	resv, _ := filepath.Glob(filepath.Join(cniStateDir, "networks", cniNetwork, "*"))
	for _, f := range resv {
		b, err := os.ReadFile(f)
		if err == nil && strings.HasPrefix(string(b), allocID) {
			out = append(out, fmt.Sprintf("CNI address reservation %s (allocation %s)", f, allocID))
		}
	}
	res, _ := filepath.Glob(filepath.Join(cniStateDir, "results", cniNetwork+"-"+allocID+"-*"))
	for _, f := range res {
		out = append(out, fmt.Sprintf("CNI result %s (allocation %s)", f, allocID))
	}
	return out
}

// suiteNetLeftovers lists the network leftovers of everything the suite ran:
// its allocations' and sandboxes' networks and interfaces on its bridge
// (the test host checks its own removal).
func (h *harness) suiteNetLeftovers() []string {
	out := netLeftovers(h.recordedList(allocsFile), h.recordedList(sandboxesFile))
	for _, p := range bridgePorts(h.bridge) {
		out = append(out, fmt.Sprintf("interface %s on the bridge %s", p, h.bridge))
	}
	return out
}

// cleanNetwork removes, once the agent has stopped, what the suite's bridge
// networking made and was not there before (see the top of this file), and
// anything an allocation, sandbox or test left. Leftovers that something
// should have removed itself are reported as problems; what Nomad leaves by
// design (the bridge, its chains and tables) as notes.
func (h *harness) cleanNetwork(report func(kind reportKind, format string, args ...any)) {
	snap, err := readNetSnapshot(h.tmp)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		report(failed, "read the network snapshot: %v", err)
	}
	run := func(args ...string) {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			report(failed, "%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
	}

	allocs, sandboxes := h.recordedList(allocsFile), h.recordedList(sandboxesFile)
	// A killed run recorded no sandboxes; their state directories are
	// named after them.
	if ents, err := os.ReadDir(h.stateDir); err == nil {
		for _, e := range ents {
			if e.IsDir() && !has(sandboxes, e.Name()) {
				sandboxes = append(sandboxes, e.Name())
			}
		}
	}
	for _, a := range allocs {
		if netnsExists(a) {
			report(leftBehind, "network namespace of allocation %s left behind; removing it", a)
			run("ip", "netns", "delete", a)
		}
	}
	for _, s := range sandboxes {
		ns, link := driverNetNames(s)
		if netnsExists(ns) {
			report(leftBehind, "network namespace %s of sandbox %s left behind; removing it", ns, s)
			run("ip", "netns", "delete", ns)
		}
		if linkExists(link) {
			report(leftBehind, "interface %s of sandbox %s left behind; removing it", link, s)
			run("ip", "link", "delete", link)
		}
	}
	for _, p := range bridgePorts(h.bridge) {
		report(leftBehind, "interface %s left on the bridge %s; removing it", p, h.bridge)
		run("ip", "link", "delete", p)
	}
	if linkExists(h.bridge) && (snap == nil || !has(snap.Links, h.bridge)) {
		report(note, "removing the bridge %s (Nomad leaves it)", h.bridge)
		run("ip", "link", "delete", h.bridge)
	}

	h.cleanNFT(snap, allocs, sandboxes, report)

	if snap != nil {
		h.cleanCNIState(snap, allocs, report, run)
		if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward"); err == nil && snap.IPForward != "" && strings.TrimSpace(string(b)) != snap.IPForward {
			report(note, "net.ipv4.ip_forward is %s, was %s: setting it back", strings.TrimSpace(string(b)), snap.IPForward)
			if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte(snap.IPForward), 0o644); err != nil {
				report(failed, "set net.ipv4.ip_forward: %v", err)
			}
		}
	}
}

// reportKind says what cleanNetwork found: something an allocation, sandbox
// or test should have removed (teardown's leftover checks have reported it
// already for the running suite), what Nomad leaves by design, or a failure
// to remove something.
type reportKind int

const (
	leftBehind reportKind = iota
	note
	failed
)

// iptablesTables are the tables iptables-nft makes (family ip or ip6).
var iptablesTables = map[string]bool{"filter": true, "nat": true, "mangle": true, "raw": true, "security": true}

// cniChain tells the chains that Nomad's bridge networking creates.
func cniChain(name string) bool {
	return strings.HasPrefix(name, "CNI-") || name == "NOMAD-ADMIN"
}

// cniAllocChain matches the chains of one allocation (CNI-<hash>,
// CNI-DN-<hash>); the others are shared by all.
var cniAllocChain = regexp.MustCompile(`^CNI-(DN-)?[0-9a-f]{21,24}$`)

// cleanNFT removes new CNI and NOMAD chains with the rules that jump to them,
// then new iptables-nft tables left empty, and new driver tables.
func (h *harness) cleanNFT(snap *netSnapshot, allocs, sandboxes []string, report func(reportKind, string, ...any)) {
	rs, err := listRuleset()
	if err != nil {
		report(failed, "%v", err)
		return
	}
	for _, a := range allocs {
		if c := cniChainHash(a); rs.contains("CNI-"+c) || rs.contains("CNI-DN-"+c) {
			report(leftBehind, "nft: CNI chains of allocation %s left behind; removing them", a)
		}
	}
	for _, s := range sandboxes {
		if _, link := driverNetNames(s); rs.contains(link) {
			report(leftBehind, "nft: objects %s... of sandbox %s left behind", link, s)
		}
	}
	isNew := func(key string, old []string) bool { return snap == nil || !has(old, key) }
	nft := func(args ...string) bool {
		if out, err := exec.Command("nft", args...).CombinedOutput(); err != nil {
			report(failed, "nft %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
			return false
		}
		return true
	}

	// The chains to remove: the per-allocation chains of the suite's
	// allocations, and the shared ones (NOMAD-ADMIN, CNI-FORWARD,
	// CNI-HOSTPORT-*) if they are new and no other allocation's chains
	// (another agent's on this host) need them.
	ourAlloc := func(name string) bool {
		for _, a := range allocs {
			h := cniChainHash(a)
			if strings.HasPrefix(name, "CNI-"+h) || strings.HasPrefix(name, "CNI-DN-"+h) {
				return true
			}
		}
		return false
	}
	ours := map[string]bool{} // chain keys to remove
	var names, foreign []string
	for _, c := range rs.chains {
		if (c.Family != "ip" && c.Family != "ip6") || !cniChain(c.Name) {
			continue
		}
		switch {
		case cniAllocChain.MatchString(c.Name) && ourAlloc(c.Name):
			ours[c.key()] = true
			names = append(names, c.key())
		case cniAllocChain.MatchString(c.Name):
			foreign = append(foreign, c.key())
		}
	}
	if len(foreign) > 0 {
		report(note, "keeping the shared CNI chains: other allocations' chains exist (%s)", strings.Join(foreign, ", "))
	} else {
		for _, c := range rs.chains {
			if (c.Family == "ip" || c.Family == "ip6") && cniChain(c.Name) && !cniAllocChain.MatchString(c.Name) && isNew(c.key(), snapChains(snap)) {
				ours[c.key()] = true
				names = append(names, c.key())
			}
		}
	}
	if len(ours) > 0 {
		sort.Strings(names)
		report(note, "removing the nft chains bridge networking created: %s", strings.Join(names, ", "))
	}
	// Rules elsewhere that jump to them first, then the chains: flushed
	// all before any is deleted, as they jump to each other.
	for _, r := range rs.rules {
		if ours[r.Family+" "+r.Table+" "+r.Chain] {
			continue
		}
		for _, tgt := range r.targets {
			if ours[r.Family+" "+r.Table+" "+tgt] {
				nft("delete", "rule", r.Family, r.Table, r.Chain, "handle", fmt.Sprint(r.Handle))
				break
			}
		}
	}
	for _, c := range rs.chains {
		if ours[c.key()] {
			nft("flush", "chain", c.Family, c.Table, c.Name)
		}
	}
	for _, c := range rs.chains {
		if ours[c.key()] {
			nft("delete", "chain", c.Family, c.Table, c.Name)
		}
	}

	// New tables: iptables-nft's, if only empty base chains are left in
	// them; the driver's, which it keeps while its plugin runs.
	rs, err = listRuleset()
	if err != nil {
		report(failed, "%v", err)
		return
	}
	for _, t := range rs.tables {
		if !isNew(t.key(), snapTables(snap)) {
			continue
		}
		switch {
		case t.Name == driverNetTable:
			report(note, "removing the driver's nft table %s (left after the agent stopped)", t.key())
			nft("delete", "table", t.Family, t.Name)
		case (t.Family == "ip" || t.Family == "ip6") && iptablesTables[t.Name]:
			empty := true
			for _, c := range rs.chains {
				if c.Family == t.Family && c.Table == t.Name && c.Hook == "" {
					empty = false
				}
			}
			for _, r := range rs.rules {
				if r.Family == t.Family && r.Table == t.Name {
					empty = false
				}
			}
			if !empty {
				report(note, "keeping the nft table %s: it holds chains or rules that are not bridge networking's", t.key())
				continue
			}
			report(note, "removing the nft table %s (iptables-nft made it for bridge networking)", t.key())
			nft("delete", "table", t.Family, t.Name)
		}
	}
}

func snapChains(s *netSnapshot) []string {
	if s == nil {
		return nil
	}
	return s.Chains
}

func snapTables(s *netSnapshot) []string {
	if s == nil {
		return nil
	}
	return s.Tables
}

// cleanCNIState removes the CNI plugins' state directory if the suite made
// it, or else the suite's allocations' files in it.
func (h *harness) cleanCNIState(snap *netSnapshot, allocs []string, report func(reportKind, string, ...any), run func(...string)) {
	for _, a := range allocs {
		for _, l := range cniStateOf(a) {
			report(leftBehind, "%s left behind", l)
		}
	}
	if _, err := os.Stat(cniStateDir); err != nil {
		return
	}
	if !snap.CNIState {
		report(note, "removing %s (the CNI plugins made it for bridge networking)", cniStateDir)
		if err := os.RemoveAll(cniStateDir); err != nil {
			report(failed, "remove %s: %v", cniStateDir, err)
		}
		return
	}
	for _, a := range allocs {
		resv, _ := filepath.Glob(filepath.Join(cniStateDir, "networks", cniNetwork, "*"))
		for _, f := range resv {
			if b, err := os.ReadFile(f); err == nil && strings.HasPrefix(string(b), a) {
				run("rm", "-f", f)
			}
		}
		res, _ := filepath.Glob(filepath.Join(cniStateDir, "results", cniNetwork+"-"+a+"-*"))
		for _, f := range res {
			run("rm", "-f", f)
		}
	}
}
