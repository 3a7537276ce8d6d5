package netpolicy

// The per-sandbox DNS service.
//
// A sandbox's resolv.conf names its gateway (the host end of its veth) as its
// only nameserver, and the firewall lets the sandbox reach nothing but that
// address on port 53 and the addresses this service has reported through
// DNSPolicy.Allow. The service is therefore the only way a sandbox learns an
// address it may connect to, and the place where names outside the allowlist
// are stopped before they leave the machine.
//
// What a query gets:
//
//   - A for a name the allowlist permits: resolved upstream (UDP, again over
//     TCP if the answer is truncated). The CNAME chain in the upstream answer
//     is followed; A records at its end are kept unless they point at a denied
//     address. Every kept address is reported through Allow before the answer
//     is written, so the firewall is open when the client connects. All records
//     of the answer carry one TTL: the smallest TTL of the chain, clamped to
//     [MinTTL, MaxTTL]; Allow receives that same clamped TTL, so no client
//     caches an address longer than the firewall was asked to keep it open.
//   - A whose answer pointed only at denied addresses (DNS rebinding to
//     loopback, link-local, metadata services, the node itself, ranges the
//     operator denies): REFUSED, and Refused is called. REFUSED rather than an
//     empty NOERROR because it is a policy decision, not a fact about the name,
//     and it is counted with the other refusals. If only some of the addresses
//     were denied, the others are answered and the denied ones are removed.
//   - AAAA for a permitted name: an empty NOERROR (NODATA), without asking
//     upstream. The firewall drops IPv6, so an IPv6 address would only make
//     clients try a path that cannot work before falling back to IPv4.
//   - Any other type (TXT, ANY, MX, PTR, SRV, HTTPS, ...), any class but IN, and
//     any name outside the allowlist: REFUSED, nothing is sent upstream, and
//     Refused is called with the name. TXT and the like are the usual DNS
//     exfiltration channels, and PTR names are outside every allowlist.
//   - Names that are not plain host names (characters other than letters,
//     digits, '-' and '_', escaped dots inside labels, empty labels): REFUSED.
//     Without this, the one-label name `x\.pypi.test.` would read as
//     "x.pypi.test" to a string match while being a name directly under "test".
//   - Upstream unreachable, or the firewall (Allow) failing for every address:
//     SERVFAIL. An upstream NXDOMAIN or other error code is passed on without
//     records.
//
// A wildcard entry ("*.pypi.org") lets any label under it through to the
// upstream resolvers, and so to the zone's own name servers; that is inherent
// in allowing the wildcard.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/miekg/dns"
)

// DNSRule is the allowlist entry a queried name matched. The DNS service does
// not look inside it: it is handed back to DNSPolicy.Allow unchanged, so that
// the firewall can open the address for that entry's ports.
type DNSRule = any

// DNSPolicy is one sandbox's view of the network policy, as the DNS service
// needs it. Allowed and Allow are required. The functions are called
// concurrently, from the goroutine serving a query, and must not block for
// long: the client is waiting.
type DNSPolicy struct {
	// Allowed reports whether the sandbox may resolve name and which entry
	// allows it. name is lower case, without the trailing dot.
	Allowed func(name string) (DNSRule, bool)

	// Denied reports addresses no answer may point at, on top of the ones
	// that are always denied (see DNSAddrAlwaysDenied): typically the node's
	// own addresses and the private ranges the operator denies. May be nil.
	Denied func(netip.Addr) bool

	// Allow opens the firewall for addr under rule for at least ttl. It is
	// called for every address of an answer before that answer is sent. An
	// address for which it fails is left out of the answer.
	Allow func(addr netip.Addr, rule DNSRule, ttl time.Duration) error

	// Refused is called with the name of every query refused by policy
	// (name outside the allowlist, type or class other than IN A/AAAA,
	// answer pointing only at denied addresses). May be nil.
	Refused func(name string)

	// Client, if valid, is the only source address whose queries are
	// answered; others are dropped without a reply. The listener sits on an
	// address of the host, so this keeps other sandboxes from using it.
	Client netip.Addr
}

// DNSServer holds the settings shared by all the per-sandbox listeners.
type DNSServer struct {
	// Upstreams are the resolvers permitted names are sent to, as "ip" or
	// "ip:port" ("[ip6]:port"), tried in order.
	Upstreams []string

	// MinTTL and MaxTTL bound the TTL of answers and of firewall grants.
	// Zero means 30 s and 1 h.
	MinTTL, MaxTTL time.Duration

	// Timeout bounds the handling of one query, all upstream attempts
	// included; zero means 4 s. UpstreamTimeout bounds one exchange with one
	// upstream; zero means 2 s.
	Timeout, UpstreamTimeout time.Duration

	// MaxInflight bounds the queries one listener sends upstream at the same
	// time; beyond it the client gets SERVFAIL. Zero means 64.
	MaxInflight int

	// MaxTCPConns bounds the TCP connections one listener serves at once;
	// further ones wait in the kernel's accept queue (and beyond it are
	// dropped), so a sandbox cannot take the plugin's file descriptors.
	// Zero means 8.
	MaxTCPConns int

	Logger hclog.Logger
}

const (
	dnsDefaultMinTTL          = 30 * time.Second
	dnsDefaultMaxTTL          = time.Hour
	dnsDefaultTimeout         = 4 * time.Second
	dnsDefaultUpstreamTimeout = 2 * time.Second
	dnsDefaultMaxInflight     = 64
	dnsDefaultMaxTCPConns     = 8

	// dnsEDNSSize is the UDP payload size advertised upstream and to clients
	// (the DNS flag day 2020 value: no IP fragmentation).
	dnsEDNSSize = 1232
	// dnsMaxCNAMEs bounds the CNAME chain followed in an upstream answer.
	dnsMaxCNAMEs = 16
)

// Serve answers the queries of one sandbox on listen, over UDP and TCP, until
// stop is called or ctx is done. Both sockets are bound before Serve returns,
// so a bind error (address missing, port taken) is returned here. If the
// port of listen is 0, UDP picks one and TCP binds the same.
//
// stop closes the listeners, cancels the upstream queries in flight and
// waits (bounded) for the handlers to return; it can be called more than once.
func (s *DNSServer) Serve(ctx context.Context, listen netip.AddrPort, p DNSPolicy) (stop func() error, err error) {
	_, stop, err = s.Listen(ctx, listen, p)
	return stop, err
}

// Listen is Serve that also returns the address it listens on: the port
// picked when listen's is 0.
func (s *DNSServer) Listen(ctx context.Context, listen netip.AddrPort, p DNSPolicy) (bound netip.AddrPort, stop func() error, err error) {
	if p.Allowed == nil || p.Allow == nil {
		return bound, nil, errors.New("dns: policy needs Allowed and Allow")
	}
	if !listen.IsValid() {
		return bound, nil, errors.New("dns: invalid listen address")
	}
	h, err := s.newHandler(p)
	if err != nil {
		return bound, nil, err
	}

	pc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(listen))
	if err != nil {
		return bound, nil, fmt.Errorf("dns: listen udp %s: %w", listen, err)
	}
	tcpAddr := netip.AddrPortFrom(listen.Addr(), pc.LocalAddr().(*net.UDPAddr).AddrPort().Port())
	ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(tcpAddr))
	if err != nil {
		pc.Close()
		return bound, nil, fmt.Errorf("dns: listen tcp %s: %w", tcpAddr, err)
	}

	hctx, cancel := context.WithCancel(context.Background())
	h.ctx = hctx

	servers := []*dns.Server{
		{
			PacketConn:   pc,
			Handler:      h,
			UDPSize:      dnsEDNSSize,
			ReadTimeout:  2 * time.Second,
			WriteTimeout: 2 * time.Second,
		},
		{
			Listener:      newConnLimiter(ln, s.maxTCPConns(), p.Client),
			Handler:       h,
			ReadTimeout:   2 * time.Second,
			WriteTimeout:  2 * time.Second,
			IdleTimeout:   func() time.Duration { return 8 * time.Second },
			MaxTCPQueries: 128,
		},
	}

	type result struct {
		i   int
		err error
	}
	started := make(chan int, len(servers))
	done := make(chan result, len(servers))
	for i, srv := range servers {
		i, srv := i, srv
		srv.NotifyStartedFunc = func() { started <- i }
		go func() { done <- result{i, srv.ActivateAndServe()} }()
	}

	var (
		once     sync.Once
		stopErr  error
		running  = []bool{false, false}
		finished = make(chan struct{})
	)
	shutdown := func() error {
		once.Do(func() {
			cancel()
			sctx, scancel := context.WithTimeout(context.Background(), s.timeout()+2*time.Second)
			defer scancel()
			var errs []error
			for i, srv := range servers {
				if running[i] {
					if err := srv.ShutdownContext(sctx); err != nil {
						errs = append(errs, err)
					}
				}
			}
			pc.Close()
			ln.Close()
			close(finished)
			stopErr = errors.Join(errs...)
		})
		return stopErr
	}

	// Wait until both servers run, or one of them failed to start.
	for n := 0; n < len(servers); n++ {
		select {
		case i := <-started:
			running[i] = true
		case r := <-done:
			shutdown()
			return bound, nil, fmt.Errorf("dns: serve %s: %v", listen, r.err)
		case <-time.After(5 * time.Second):
			shutdown()
			return bound, nil, fmt.Errorf("dns: serve %s: servers did not start", listen)
		}
	}

	go func() {
		for {
			select {
			case r := <-done:
				select {
				case <-finished:
				default:
					if r.err != nil {
						h.log.Error("dns listener failed", "listen", listen, "error", r.err)
					}
				}
			case <-ctx.Done():
				shutdown()
				return
			case <-finished:
				return
			}
		}
	}()

	h.log.Debug("dns listening", "listen", listen)
	return tcpAddr, shutdown, nil
}

func (s *DNSServer) maxTCPConns() int {
	if s.MaxTCPConns > 0 {
		return s.MaxTCPConns
	}
	return dnsDefaultMaxTCPConns
}

// connLimiter is a listener that has at most cap(slots) accepted
// connections open: Accept waits for one of them to close first. When
// client is set, a connection from any other address is closed as soon as
// it is accepted and takes no slot: the listener is on an address of the
// node, which any local user can connect to, and such connections held
// open would starve the sandbox's own.
type connLimiter struct {
	net.Listener
	client netip.Addr
	slots  chan struct{}
	closed chan struct{}
	once   sync.Once
}

func newConnLimiter(ln net.Listener, n int, client netip.Addr) *connLimiter {
	return &connLimiter{Listener: ln, client: client.Unmap(), slots: make(chan struct{}, n), closed: make(chan struct{})}
}

func (l *connLimiter) Accept() (net.Conn, error) {
	select {
	case l.slots <- struct{}{}:
	case <-l.closed:
		return nil, net.ErrClosed
	}
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			<-l.slots
			return nil, err
		}
		if l.client.IsValid() {
			if a, ok := c.RemoteAddr().(*net.TCPAddr); !ok || a.AddrPort().Addr().Unmap() != l.client {
				c.Close()
				continue
			}
		}
		return &limitedConn{Conn: c, release: func() { <-l.slots }}, nil
	}
}

func (l *connLimiter) Close() error {
	l.once.Do(func() { close(l.closed) })
	return l.Listener.Close()
}

// limitedConn gives its slot back once, on the first Close.
type limitedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitedConn) Close() error {
	c.once.Do(c.release)
	return c.Conn.Close()
}

func (s *DNSServer) timeout() time.Duration {
	if s.Timeout > 0 {
		return s.Timeout
	}
	return dnsDefaultTimeout
}

func (s *DNSServer) newHandler(p DNSPolicy) (*dnsHandler, error) {
	h := &dnsHandler{
		policy:          p,
		minTTL:          s.MinTTL,
		maxTTL:          s.MaxTTL,
		timeout:         s.timeout(),
		upstreamTimeout: s.UpstreamTimeout,
		log:             s.Logger,
	}
	if h.minTTL <= 0 {
		h.minTTL = dnsDefaultMinTTL
	}
	if h.maxTTL <= 0 {
		h.maxTTL = dnsDefaultMaxTTL
	}
	if h.minTTL > h.maxTTL {
		return nil, fmt.Errorf("dns: MinTTL %s above MaxTTL %s", h.minTTL, h.maxTTL)
	}
	if h.upstreamTimeout <= 0 {
		h.upstreamTimeout = dnsDefaultUpstreamTimeout
	}
	n := s.MaxInflight
	if n <= 0 {
		n = dnsDefaultMaxInflight
	}
	h.inflight = make(chan struct{}, n)
	if h.log == nil {
		h.log = hclog.NewNullLogger()
	}
	h.log = h.log.Named("dns")

	if len(s.Upstreams) == 0 {
		return nil, errors.New("dns: no upstream servers")
	}
	for _, u := range s.Upstreams {
		ap, err := ParseUpstream(u)
		if err != nil {
			return nil, err
		}
		h.upstreams = append(h.upstreams, ap.String())
	}
	return h, nil
}

// ParseUpstream parses a DNS server as "ip", "[ipv6]", "ip:port" or
// "[ipv6]:port" (port 53 when none is given). The driver checks dns_servers
// with it, so that what the plugin config accepts is what the DNS service
// can use.
func ParseUpstream(u string) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(u); err == nil {
		return ap, nil
	}
	a, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(u, "["), "]"))
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("dns: upstream %q: want ip or ip:port", u)
	}
	return netip.AddrPortFrom(a.Unmap(), 53), nil
}

type dnsHandler struct {
	ctx             context.Context
	policy          DNSPolicy
	upstreams       []string
	minTTL, maxTTL  time.Duration
	timeout         time.Duration
	upstreamTimeout time.Duration
	inflight        chan struct{}
	log             hclog.Logger
}

func (h *dnsHandler) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	defer func() {
		if r := recover(); r != nil {
			h.log.Error("dns handler panicked", "panic", r)
			resp := new(dns.Msg)
			resp.SetRcode(req, dns.RcodeServerFailure)
			h.write(w, req, resp)
		}
	}()

	if h.policy.Client.IsValid() {
		if from, ok := dnsRemoteAddr(w); !ok || from != h.policy.Client.Unmap() {
			h.log.Debug("dropped query from foreign source", "from", w.RemoteAddr())
			return
		}
	}

	resp := new(dns.Msg)
	resp.SetReply(req)
	resp.RecursionAvailable = true

	if req.Opcode != dns.OpcodeQuery {
		resp.Rcode = dns.RcodeNotImplemented
		h.write(w, req, resp)
		return
	}
	if len(req.Question) != 1 {
		resp.Rcode = dns.RcodeFormatError
		h.write(w, req, resp)
		return
	}
	q := req.Question[0]
	name := dnsCanonicalName(q.Name)

	refuse := func(why string) {
		h.log.Debug("refused", "name", name, "type", dns.Type(q.Qtype).String(), "reason", why)
		if h.policy.Refused != nil {
			h.policy.Refused(name)
		}
		resp.Rcode = dns.RcodeRefused
		h.write(w, req, resp)
	}

	if q.Qclass != dns.ClassINET {
		refuse("class")
		return
	}
	if !dnsValidHostName(name) {
		refuse("not a host name")
		return
	}
	rule, ok := h.policy.Allowed(name)
	if !ok {
		refuse("not in allowlist")
		return
	}
	switch q.Qtype {
	case dns.TypeA:
	case dns.TypeAAAA:
		// IPv6 is dropped by the firewall: NODATA, nothing asked upstream.
		h.write(w, req, resp)
		return
	default:
		refuse("query type")
		return
	}

	select {
	case h.inflight <- struct{}{}:
		defer func() { <-h.inflight }()
	default:
		h.log.Warn("too many queries in flight", "name", name)
		resp.Rcode = dns.RcodeServerFailure
		h.write(w, req, resp)
		return
	}

	ctx, cancel := context.WithTimeout(h.ctx, h.timeout)
	defer cancel()
	up, err := h.exchange(ctx, name)
	if err != nil {
		h.log.Warn("upstream query failed", "name", name, "error", err)
		resp.Rcode = dns.RcodeServerFailure
		h.write(w, req, resp)
		return
	}
	if up.Rcode != dns.RcodeSuccess {
		resp.Rcode = up.Rcode
		h.write(w, req, resp)
		return
	}

	cnames, addrs, denied := h.filterAnswer(name, up.Answer)

	// One TTL for the whole answer: the smallest of the chain, clamped.
	ttl := h.maxTTL
	for _, rr := range cnames {
		ttl = min(ttl, time.Duration(rr.Header().Ttl)*time.Second)
	}
	for _, a := range addrs {
		ttl = min(ttl, time.Duration(a.Hdr.Ttl)*time.Second)
	}
	ttl = h.clamp(ttl)
	ttlSecs := uint32(ttl / time.Second)

	var kept []dns.RR
	failed := 0
	for _, a := range addrs {
		addr, _ := netip.AddrFromSlice(a.A.To4())
		if err := h.policy.Allow(addr, rule, ttl); err != nil {
			failed++
			h.log.Error("firewall did not open address; left out of answer", "name", name, "addr", addr, "error", err)
			continue
		}
		a.Hdr.Ttl = ttlSecs
		kept = append(kept, a)
	}

	switch {
	case len(kept) > 0:
		if denied > 0 {
			h.log.Warn("denied addresses removed from answer", "name", name, "removed", denied, "kept", len(kept))
		}
	case failed > 0:
		resp.Rcode = dns.RcodeServerFailure
		h.write(w, req, resp)
		return
	case denied > 0:
		h.log.Warn("answer pointed only at denied addresses", "name", name, "removed", denied)
		refuse("answer denied")
		return
	}
	for _, rr := range cnames {
		rr.Header().Ttl = ttlSecs
		resp.Answer = append(resp.Answer, rr)
	}
	resp.Answer = append(resp.Answer, kept...)
	h.write(w, req, resp)
}

// filterAnswer follows the CNAME chain from name through the upstream answer
// and returns its CNAMEs and the A records at its end whose addresses are not
// denied, with the count of those that were.
func (h *dnsHandler) filterAnswer(name string, answer []dns.RR) (cnames []dns.RR, addrs []*dns.A, denied int) {
	target := dns.Fqdn(name)
	for i := 0; i < dnsMaxCNAMEs; i++ {
		found := false
		for _, rr := range answer {
			c, ok := rr.(*dns.CNAME)
			if ok && strings.EqualFold(c.Hdr.Name, target) && c.Hdr.Class == dns.ClassINET {
				cnames = append(cnames, c)
				target = c.Target
				found = true
				break
			}
		}
		if !found {
			break
		}
	}
	seen := map[netip.Addr]bool{}
	for _, rr := range answer {
		a, ok := rr.(*dns.A)
		if !ok || !strings.EqualFold(a.Hdr.Name, target) || a.Hdr.Class != dns.ClassINET {
			continue
		}
		addr, ok := netip.AddrFromSlice(a.A.To4())
		if !ok || seen[addr] {
			continue
		}
		seen[addr] = true
		if DNSAddrAlwaysDenied(addr) || (h.policy.Denied != nil && h.policy.Denied(addr)) {
			denied++
			h.log.Debug("denied address removed", "name", name, "addr", addr)
			continue
		}
		addrs = append(addrs, a)
	}
	return cnames, addrs, denied
}

// exchange asks the upstreams, in order, for the A records of name.
func (h *dnsHandler) exchange(ctx context.Context, name string) (*dns.Msg, error) {
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), dns.TypeA)
	m.RecursionDesired = true
	m.SetEdns0(dnsEDNSSize, false)

	var last *dns.Msg
	var errs []error
	for _, up := range h.upstreams {
		if ctx.Err() != nil {
			break
		}
		r, err := h.exchangeOne(ctx, m, up)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", up, err))
			continue
		}
		last = r
		// Another upstream may do better than a failure or refusal.
		if r.Rcode == dns.RcodeServerFailure || r.Rcode == dns.RcodeRefused {
			continue
		}
		return r, nil
	}
	if last != nil {
		return last, nil
	}
	if err := ctx.Err(); err != nil {
		errs = append(errs, err)
	}
	return nil, errors.Join(errs...)
}

func (h *dnsHandler) exchangeOne(ctx context.Context, m *dns.Msg, up string) (*dns.Msg, error) {
	c := &dns.Client{Net: "udp", Timeout: h.upstreamTimeout}
	r, _, err := c.ExchangeContext(ctx, m, up)
	if err == nil && r.Truncated {
		c.Net = "tcp"
		r, _, err = c.ExchangeContext(ctx, m, up)
	}
	if err != nil {
		return nil, err
	}
	q := m.Question[0]
	if !r.Response || len(r.Question) != 1 || !strings.EqualFold(r.Question[0].Name, q.Name) ||
		r.Question[0].Qtype != q.Qtype || r.Question[0].Qclass != q.Qclass {
		return nil, errors.New("answer does not match the question")
	}
	if r.Truncated {
		return nil, errors.New("answer truncated over tcp")
	}
	return r, nil
}

// write sends resp, truncated to what the client can take over UDP.
func (h *dnsHandler) write(w dns.ResponseWriter, req, resp *dns.Msg) {
	resp.Ns, resp.Extra = nil, nil
	size := dns.MinMsgSize
	if opt := req.IsEdns0(); opt != nil {
		resp.SetEdns0(dnsEDNSSize, false)
		if s := int(opt.UDPSize()); s > size {
			size = s
		}
		if size > dnsEDNSSize {
			size = dnsEDNSSize
		}
	}
	if _, tcp := w.LocalAddr().(*net.TCPAddr); tcp {
		size = dns.MaxMsgSize
	}
	resp.Compress = true
	resp.Truncate(size)
	if err := w.WriteMsg(resp); err != nil {
		h.log.Debug("writing answer failed", "error", err)
	}
}

func (h *dnsHandler) clamp(ttl time.Duration) time.Duration {
	if ttl < h.minTTL {
		return h.minTTL
	}
	if ttl > h.maxTTL {
		return h.maxTTL
	}
	return ttl
}

func dnsRemoteAddr(w dns.ResponseWriter) (netip.Addr, bool) {
	switch a := w.RemoteAddr().(type) {
	case *net.UDPAddr:
		return a.AddrPort().Addr().Unmap(), true
	case *net.TCPAddr:
		return a.AddrPort().Addr().Unmap(), true
	}
	return netip.Addr{}, false
}

// DNSAddrAlwaysDenied reports the addresses no answer may point at whatever the
// policy says: unspecified, "this network" (0.0.0.0/8), loopback, link-local
// (169.254.0.0/16, the cloud metadata services among them), multicast,
// the reserved 240.0.0.0/4 and the limited broadcast address.
func DNSAddrAlwaysDenied(a netip.Addr) bool {
	a = a.Unmap()
	if a.IsUnspecified() || a.IsLoopback() || a.IsLinkLocalUnicast() ||
		a.IsMulticast() || a.IsLinkLocalMulticast() || a.IsInterfaceLocalMulticast() {
		return true
	}
	if a.Is4() {
		b := a.As4()
		return b[0] == 0 || b[0] >= 240
	}
	return false
}

// dnsCanonicalName lowers name and removes the trailing dot.
func dnsCanonicalName(name string) string {
	return strings.TrimSuffix(strings.ToLower(name), ".")
}

// dnsValidHostName accepts names made of labels of letters, digits, '-' and
// '_' (the presentation form, so an escaped character or a dot inside a label
// is refused), 1 to 63 bytes each, 253 bytes at most.
func dnsValidHostName(name string) bool {
	if name == "" || len(name) > 253 {
		return false
	}
	for _, label := range strings.Split(name, ".") {
		if label == "" || len(label) > 63 {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

// DNSAllowlist builds a DNSPolicy.Allowed from the host entries of an
// allowlist. The rule it hands back is the name itself, so that Allow can
// open the answer for every entry the name matches (the same name may be
// listed with several ports): Manager.AllowName does that.
func DNSAllowlist(entries []Entry) func(string) (DNSRule, bool) {
	return func(name string) (DNSRule, bool) {
		for _, e := range entries {
			if e.MatchesHost(name) {
				return name, true
			}
		}
		return nil, false
	}
}
