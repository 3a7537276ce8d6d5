package driver

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/nomad/nomad/structs"
	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/atomicfile"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/netpolicy"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

const (
	// denialPoll is how often denied connections are collected; events
	// about them come at most once per denialEventGap.
	denialPoll     = 5 * time.Second
	denialEventGap = 30 * time.Second

	// maxRefusedNames distinct refused names are kept per task (in memory,
	// network.json and the audit record); refusals of any further name are
	// counted under refusedOther, so a sandbox asking for endless unique
	// names cannot grow them.
	maxRefusedNames = 64
	refusedOther    = "(other names)"
	// maxDenialRecords denied destinations are kept, those with the most
	// packets; the rest are summed under deniedOther.
	maxDenialRecords = 64
	deniedOther      = "(other destinations)"
)

// countRefused records one refusal of name in refused, within
// maxRefusedNames distinct names.
func countRefused(refused map[string]int, name string) {
	n := len(refused)
	if _, ok := refused[refusedOther]; ok {
		n--
	}
	if _, ok := refused[name]; ok || n < maxRefusedNames {
		refused[name]++
		return
	}
	refused[refusedOther]++
}

// capDenials keeps the maxDenialRecords destinations of counts with the
// most packets and sums the others under deniedOther.
func capDenials(counts map[string]uint64) map[string]uint64 {
	if len(counts) <= maxDenialRecords {
		return counts
	}
	keys := make([]string, 0, len(counts))
	for k := range counts {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if counts[keys[i]] != counts[keys[j]] {
			return counts[keys[i]] > counts[keys[j]]
		}
		return keys[i] < keys[j]
	})
	out := make(map[string]uint64, maxDenialRecords+1)
	for i, k := range keys {
		if i < maxDenialRecords {
			out[k] = counts[k]
		} else {
			out[deniedOther] += counts[k]
		}
	}
	return out
}

// taskNet is a running sandbox's network: its namespace and filter, its DNS
// service, and what was denied.
type taskNet struct {
	id      string
	nw      *netpolicy.Network
	entries []netpolicy.Entry
	dir     string

	stopDNS func() error
	cancel  context.CancelFunc

	mu      sync.Mutex
	refused map[string]int
	denials map[string]uint64
}

// configureNetwork prepares the network policy from the plugin's settings:
// the always-denied destinations (the defaults and denied_egress; the node's
// own addresses are denied per packet by the filter, whenever they
// appeared), private space outside what allowed_egress names, and the
// upstream DNS servers (the node's own when dns_servers is empty).
func (d *Driver) configureNetwork(s *Settings) {
	// The manager adds netpolicy.DefaultDeny() and the subnet itself.
	var named []netip.Prefix
	for _, e := range s.allowedEgress {
		if e.Prefix.IsValid() {
			named = append(named, e.Prefix)
		}
	}
	if len(s.DNSServers) == 0 {
		s.DNSServers = runtime.HostNameservers()
	}
	d.net = &netpolicy.Manager{
		Config: netpolicy.Config{
			Subnet:     s.subnet,
			Deny:       s.deniedEgress,
			StateDir:   filepath.Join(filepath.Dir(s.StateDir), "netpolicy"),
			Masquerade: true,
			// Private space only where allowed_egress names it (and the
			// task's egress too, as for any destination).
			GuardPrivate: true,
			OpenPrivate:  named,
			Prefix:       d.netPrefix,
			Table:        d.netTable,
		},
		Logger: d.logger.Named("netpolicy"),
	}
}

// ipv6Entries are the IPv6 entries of an allowlist, which allow nothing:
// the filter drops all IPv6.
func ipv6Entries(entries []netpolicy.Entry) []string {
	var out []string
	for _, e := range entries {
		if e.Prefix.IsValid() && e.Prefix.Addr().Is6() {
			out = append(out, e.String())
		}
	}
	return out
}

// networkMode decides where the sandbox's network comes from. Nomad 1.6
// tells a driver about a group network in bridge (or cni/*, or none) mode
// through NetworkIsolation; for host mode it says nothing, so host mode is
// recognised by what only a network block gives: ports, or a dns block.
// A host-mode block with neither reads like no block at all, and the
// sandbox gets loopback only: it never shares the node's network unless
// allow_host_network says so.
func (d *Driver) networkMode(cfg *drivers.TaskConfig, egress []netpolicy.Entry) (netMode, error) {
	ni := cfg.NetworkIsolation
	if ni != nil {
		switch ni.Mode {
		case drivers.NetIsolationModeGroup:
			if ni.Path == "" {
				return 0, errors.New("group network: Nomad gave no network namespace path")
			}
			return netGroup, nil
		case drivers.NetIsolationModeTask:
			return 0, errors.New(`network mode "driver" is not supported: use network { mode = "bridge" } or no network block`)
		}
	}
	ports := hostModePorts(cfg)
	hostNet := (ni != nil && ni.Mode == drivers.NetIsolationModeHost) || len(ports) > 0 || cfg.DNS != nil
	if !hostNet {
		return netOwn, nil
	}
	if !d.config.AllowHostNetwork {
		what := "a dns block"
		if len(ports) > 0 {
			what = "ports " + strings.Join(ports, ", ")
		}
		return 0, fmt.Errorf(`the group network is in host mode (network { mode = "host" } or a network block without a mode, here with %s), which would share the node's network with the sandbox, and this node forbids it (the plugin's allow_host_network): use network { mode = "bridge" }, where ports and service checks work, or remove the network block`, what)
	}
	if len(egress) > 0 {
		return 0, errors.New(`egress cannot be enforced in host network mode (the sandbox shares the node's network): use network { mode = "bridge" } with egress, or remove egress`)
	}
	return netHost, nil
}

// hostModePorts are the ports of a group or task network in host mode, as
// "label (port)".
func hostModePorts(cfg *drivers.TaskConfig) []string {
	var out []string
	if r := cfg.Resources; r != nil {
		if r.Ports != nil {
			for _, p := range *r.Ports {
				out = append(out, fmt.Sprintf("%s (%d)", p.Label, p.Value))
			}
		}
		if r.NomadResources != nil {
			for _, n := range r.NomadResources.Networks {
				for _, p := range append(append([]structs.Port{}, n.ReservedPorts...), n.DynamicPorts...) {
					out = append(out, fmt.Sprintf("%s (%d)", p.Label, p.Value))
				}
			}
		}
	}
	return out
}

// servedPorts are the ports the allocation's group network maps into its
// namespace: where the task listens ("to", or the host port when to is
// not set), for TCP and UDP alike, as Nomad's port mapping does.
func servedPorts(cfg *drivers.TaskConfig) []netpolicy.Port {
	var out []netpolicy.Port
	seen := map[int]bool{}
	if cfg.Resources == nil || cfg.Resources.Ports == nil {
		return nil
	}
	for _, p := range *cfg.Resources.Ports {
		port := p.To
		if port <= 0 {
			port = p.Value
		}
		if port <= 0 || port > 65535 || seen[port] {
			continue
		}
		seen[port] = true
		out = append(out, netpolicy.Port{Proto: "tcp", Port: uint16(port)}, netpolicy.Port{Proto: "udp", Port: uint16(port)})
	}
	return out
}

// setupNetwork makes the sandbox's network, its filter and its DNS
// service, all before the sandbox exists; on any failure it undoes it all
// and the task does not start (fail closed). In a group network it joins
// the allocation's namespace; nil (and no error) is a group network
// without an interface (mode "none"): loopback only.
func (d *Driver) setupNetwork(cfg *drivers.TaskConfig, id, dir string, lim taskLimits) (*taskNet, error) {
	ctx, cancel := context.WithTimeout(d.ctx, time.Minute)
	defer cancel()
	entries := lim.egress
	var nw *netpolicy.Network
	var err error
	if lim.net == netGroup {
		nw, err = d.net.Attach(ctx, id, cfg.NetworkIsolation.Path, entries, netpolicy.AttachOptions{Replies: servedPorts(cfg)})
		switch {
		case errors.Is(err, netpolicy.ErrNoInterface) && len(entries) == 0:
			return nil, nil
		case errors.Is(err, netpolicy.ErrNoInterface):
			return nil, errors.New(`egress: the group network has no interface (network mode "none"): use network { mode = "bridge" } for egress`)
		case errors.Is(err, netpolicy.ErrNetnsInUse):
			return nil, fmt.Errorf("network: another sandbox task of this allocation runs in the group network; a sandbox takes the namespace's interface over, so a group network serves one sandbox task at a time (prestart tasks that end before the main task starts are fine): %w", err)
		}
	} else {
		nw, err = d.net.Create(ctx, id, entries)
	}
	if err != nil {
		return nil, fmt.Errorf("network: %w", err)
	}
	tn := &taskNet{id: id, nw: nw, entries: entries, dir: dir}
	if err := d.startNetwork(cfg, tn); err != nil {
		_ = d.net.Destroy(id)
		return nil, err
	}
	return tn, nil
}

// startNetwork starts what lives in the plugin process for a sandbox's
// network: its DNS service and the denial collector. A restarted plugin
// calls it again for the sandboxes it recovers.
func (d *Driver) startNetwork(cfg *drivers.TaskConfig, tn *taskNet) error {
	var hosts []netpolicy.Entry
	for _, e := range tn.entries {
		if e.Host != "" {
			hosts = append(hosts, e)
		}
	}
	if tn.refused == nil {
		tn.refused = map[string]int{}
	}
	srv := &netpolicy.DNSServer{Upstreams: d.config.DNSServers, Logger: d.logger.Named("dns")}
	listen := netip.AddrPortFrom(tn.nw.Gateway, 53)
	if tn.nw.Attached {
		// The gateway is shared with the other allocations on the bridge:
		// a port of this sandbox's own, which its queries to port 53 are
		// redirected to.
		listen = netip.AddrPortFrom(tn.nw.Gateway, 0)
	}
	bound, stop, err := srv.Listen(d.ctx, listen, netpolicy.DNSPolicy{
		Allowed: netpolicy.DNSAllowlist(hosts),
		Denied:  d.net.Denied(tn.nw),
		Allow: func(addr netip.Addr, rule netpolicy.DNSRule, ttl time.Duration) error {
			name, _ := rule.(string)
			return d.net.AllowName(tn.id, name, addr, ttl)
		},
		Refused: func(name string) {
			tn.mu.Lock()
			countRefused(tn.refused, name)
			tn.mu.Unlock()
		},
		Client: tn.nw.Addr.Addr(),
	})
	if err != nil {
		return fmt.Errorf("network: DNS service on %s: %w", tn.nw.Gateway, err)
	}
	tn.stopDNS = stop
	if tn.nw.Attached {
		if err := d.net.RedirectDNS(tn.id, bound); err != nil {
			_ = stop()
			return fmt.Errorf("network: %w", err)
		}
	}
	if err := tn.save(); err != nil {
		_ = stop()
		return err
	}
	ctx, cancel := context.WithCancel(d.ctx)
	tn.cancel = cancel
	go d.collectDenials(ctx, cfg, tn)
	return nil
}

// collectDenials turns what the filter and the DNS service refused into
// task events (at most one per denialEventGap) and into network.json, which
// the supervisor copies into the audit record when the task ends.
func (d *Driver) collectDenials(ctx context.Context, cfg *drivers.TaskConfig, tn *taskNet) {
	t := time.NewTicker(denialPoll)
	defer t.Stop()
	reported := map[string]uint64{}
	reportedDNS := map[string]int{}
	var last time.Time
	var saved runtime.NetworkRecord
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		counts, err := d.net.Denials(tn.id)
		if err != nil {
			continue
		}
		counts = capDenials(counts)
		tn.mu.Lock()
		tn.denials = counts
		refused := make(map[string]int, len(tn.refused))
		for k, v := range tn.refused {
			refused[k] = v
		}
		tn.mu.Unlock()
		// Written (and synced) only when something new was denied.
		if !maps.Equal(counts, saved.Denials) || !maps.Equal(refused, saved.RefusedDNS) {
			if tn.save() == nil {
				saved.Denials, saved.RefusedDNS = counts, refused
			}
		}
		if time.Since(last) < denialEventGap {
			continue
		}
		var news []string
		for dst, n := range counts {
			if n > reported[dst] {
				news = append(news, fmt.Sprintf("%s (%d)", dst, n))
				reported[dst] = n
			}
		}
		for name, n := range refused {
			if n > reportedDNS[name] {
				news = append(news, fmt.Sprintf("DNS %s (%d)", name, n))
				reportedDNS[name] = n
			}
		}
		if len(news) == 0 {
			continue
		}
		sort.Strings(news)
		if len(news) > 10 {
			news = append(news[:10], fmt.Sprintf("and %d more", len(news)-10))
		}
		d.emitEvent(cfg, "Egress denied: "+strings.Join(news, ", ")+". Add a destination to the task's egress (within the node's allowed_egress) if the task needs it.", nil)
		last = time.Now()
	}
}

func (tn *taskNet) save() error {
	tn.mu.Lock()
	// The DNS service adds to refused while we write: write a copy.
	refused := make(map[string]int, len(tn.refused))
	for k, v := range tn.refused {
		refused[k] = v
	}
	rec := runtime.NetworkRecord{Denials: tn.denials, RefusedDNS: refused}
	tn.mu.Unlock()
	for _, e := range tn.entries {
		rec.Egress = append(rec.Egress, e.String())
	}
	if err := atomicfile.WriteJSON(runtime.StateDir(tn.dir).Network(), rec, 0o600); err != nil {
		return fmt.Errorf("network: %w", err)
	}
	return nil
}

// stop ends the plugin-side parts; the namespace and filter stay until the
// sandbox is removed.
func (tn *taskNet) stop() {
	if tn == nil {
		return
	}
	if tn.cancel != nil {
		tn.cancel()
	}
	if tn.stopDNS != nil {
		_ = tn.stopDNS()
	}
}

// loadNetwork reads network.json of a recovered sandbox; nil when the
// sandbox has no network.
func (d *Driver) loadNetwork(dir, id string) (*taskNet, error) {
	var rec runtime.NetworkRecord
	if err := atomicfile.ReadJSON(runtime.StateDir(dir).Network(), &rec); errors.Is(err, os.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	sb, err := d.net.Get(id)
	if err != nil {
		return nil, err
	}
	// What was refused before the restart stays in the record.
	tn := &taskNet{id: id, dir: dir, nw: sb, denials: rec.Denials, refused: rec.RefusedDNS}
	for _, s := range rec.Egress {
		e, err := netpolicy.ParseEgress(s)
		if err != nil {
			return nil, err
		}
		tn.entries = append(tn.entries, e)
	}
	return tn, nil
}
