package netpolicy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/miekg/dns"
	"github.com/shoenig/test/must"
)

// Every socket in these tests is on loopback (127.0.0.0/8): the upstream
// resolver is a miekg/dns server the test starts, and nothing is sent
// anywhere else.

// dnsTestUpstream is an authoritative test server on 127.0.0.1 that counts
// every query it receives.
type dnsTestUpstream struct {
	addr    string
	mu      sync.Mutex
	counts  map[string]int // "net name type" -> queries
	total   int
	records map[string][]dns.RR
}

func (u *dnsTestUpstream) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	netw := "udp"
	if _, ok := w.LocalAddr().(*net.TCPAddr); ok {
		netw = "tcp"
	}
	resp := new(dns.Msg)
	resp.SetReply(req)
	if len(req.Question) == 1 {
		q := req.Question[0]
		name := strings.ToLower(q.Name)
		u.mu.Lock()
		u.counts[fmt.Sprintf("%s %s %s", netw, name, dns.TypeToString[q.Qtype])]++
		u.total++
		u.mu.Unlock()

		rrs, exists := u.lookup(name)
		if !exists {
			resp.Rcode = dns.RcodeNameError
		}
		// Answer the way a recursive resolver does: chase CNAMEs.
		for hops := 0; hops < 8; hops++ {
			next := ""
			for _, rr := range rrs {
				if rr.Header().Rrtype == q.Qtype || q.Qtype == dns.TypeANY {
					resp.Answer = append(resp.Answer, dns.Copy(rr))
				} else if c, ok := rr.(*dns.CNAME); ok {
					resp.Answer = append(resp.Answer, dns.Copy(rr))
					next = c.Target
				}
			}
			if next == "" {
				break
			}
			rrs, _ = u.lookup(next)
		}
	}
	size := dns.MinMsgSize
	if opt := req.IsEdns0(); opt != nil {
		resp.SetEdns0(opt.UDPSize(), false)
		size = int(opt.UDPSize())
	}
	if netw == "udp" {
		resp.Truncate(size)
	}
	w.WriteMsg(resp)
}

// lookup reads records under the lock: tests change them between queries.
func (u *dnsTestUpstream) lookup(name string) ([]dns.RR, bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	rrs, ok := u.records[name]
	return rrs, ok
}

func (u *dnsTestUpstream) count(netw, name string, qtype uint16) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.counts[fmt.Sprintf("%s %s. %s", netw, name, dns.TypeToString[qtype])]
}

func (u *dnsTestUpstream) queries() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.total
}

func dnsTestRR(t testing.TB, s string) dns.RR {
	t.Helper()
	rr, err := dns.NewRR(s)
	must.NoError(t, err)
	return rr
}

// dnsTestListen binds UDP and TCP on the same free port of ip.
func dnsTestListen(t testing.TB, ip string) (*net.UDPConn, *net.TCPListener) {
	t.Helper()
	for i := 0; i < 20; i++ {
		pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.ParseIP(ip)})
		must.NoError(t, err)
		ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.ParseIP(ip), Port: pc.LocalAddr().(*net.UDPAddr).Port})
		if err == nil {
			return pc, ln
		}
		pc.Close()
	}
	t.Fatal("no free port for udp and tcp")
	return nil, nil
}

// dnsTestFreePort returns a port free for UDP and TCP on ip.
func dnsTestFreePort(t testing.TB, ip string) netip.AddrPort {
	t.Helper()
	pc, ln := dnsTestListen(t, ip)
	ap := pc.LocalAddr().(*net.UDPAddr).AddrPort()
	pc.Close()
	ln.Close()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func startDNSTestUpstream(t testing.TB) *dnsTestUpstream {
	t.Helper()
	u := &dnsTestUpstream{counts: map[string]int{}, records: map[string][]dns.RR{}}
	add := func(s string) {
		rr := dnsTestRR(t, s)
		name := strings.ToLower(rr.Header().Name)
		u.records[name] = append(u.records[name], rr)
	}
	add("allowed.test. 5 IN A 10.199.0.10")
	add("allowed.test. 5 IN TXT \"secret\"")
	add("allowed.test. 5 IN AAAA fd00:199::10")
	add("rebind.test. 300 IN A 127.0.0.1")
	add("meta.test. 300 IN A 169.254.169.254")
	add("sub.pypi.test. 7200 IN A 10.199.0.11")
	add("pypi.test. 300 IN A 10.199.0.12")
	add("pypi.test.evil.test. 300 IN A 10.199.0.13")
	add("secret.test. 300 IN A 10.199.0.14")
	add("mixed.test. 300 IN A 10.199.0.15")
	add("mixed.test. 300 IN A 192.168.7.7")
	add("mixed.test. 300 IN A 127.0.0.2")
	add("alias.test. 600 IN CNAME target.cdn.test.")
	add("target.cdn.test. 120 IN A 10.199.0.16")
	for i := 0; i < 100; i++ {
		add(fmt.Sprintf("big.test. 300 IN A 10.199.1.%d", i))
	}

	pc, ln := dnsTestListen(t, "127.0.0.1")
	u.addr = pc.LocalAddr().String()
	udp := &dns.Server{PacketConn: pc, Handler: u}
	tcp := &dns.Server{Listener: ln, Handler: u}
	for _, srv := range []*dns.Server{udp, tcp} {
		srv := srv
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		go srv.ActivateAndServe()
		select {
		case <-started:
		case <-time.After(5 * time.Second):
			t.Fatal("test upstream did not start")
		}
		t.Cleanup(func() { srv.Shutdown() })
	}
	return u
}

type dnsTestAllow struct {
	addr netip.Addr
	rule DNSRule
	ttl  time.Duration
}

type dnsTestEnv struct {
	up     *dnsTestUpstream
	listen netip.AddrPort

	mu      sync.Mutex
	allows  []dnsTestAllow
	refused []string

	// onAllow, if set, runs inside the Allow callback.
	onAllow func(dnsTestAllow) error
}

func (e *dnsTestEnv) setOnAllow(f func(dnsTestAllow) error) {
	e.mu.Lock()
	e.onAllow = f
	e.mu.Unlock()
}

func (e *dnsTestEnv) allowed() []dnsTestAllow {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]dnsTestAllow(nil), e.allows...)
}

func (e *dnsTestEnv) refusedNames() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.refused...)
}

func dnsTestPolicy(env *dnsTestEnv) DNSPolicy {
	var entries []Entry
	for _, s := range []string{"allowed.test", "*.pypi.test", "rebind.test", "meta.test",
		"mixed.test", "alias.test", "big.test", "missing.test"} {
		e, err := ParseEgress(s + ":443")
		if err != nil {
			panic(err)
		}
		entries = append(entries, e)
	}
	operatorDenied := netip.MustParsePrefix("192.168.0.0/16")
	return DNSPolicy{
		Allowed: DNSAllowlist(entries),
		Denied:  func(a netip.Addr) bool { return operatorDenied.Contains(a) },
		Allow: func(addr netip.Addr, rule DNSRule, ttl time.Duration) error {
			a := dnsTestAllow{addr, rule, ttl}
			env.mu.Lock()
			env.allows = append(env.allows, a)
			hook := env.onAllow
			env.mu.Unlock()
			if hook != nil {
				return hook(a)
			}
			return nil
		},
		Refused: func(name string) {
			env.mu.Lock()
			env.refused = append(env.refused, name)
			env.mu.Unlock()
		},
	}
}

func dnsTestServer(t testing.TB, upstreams ...string) *DNSServer {
	return &DNSServer{
		Upstreams:       upstreams,
		MinTTL:          30 * time.Second,
		MaxTTL:          time.Hour,
		Timeout:         2 * time.Second,
		UpstreamTimeout: time.Second,
		Logger:          hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: hclog.Debug, Output: testWriter{t}}),
	}
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// startDNSTest starts a test upstream and the service in front of it on
// 127.0.0.1.
func startDNSTest(t *testing.T, mod func(*DNSPolicy)) *dnsTestEnv {
	t.Helper()
	env := &dnsTestEnv{up: startDNSTestUpstream(t)}
	p := dnsTestPolicy(env)
	if mod != nil {
		mod(&p)
	}
	env.listen = dnsTestFreePort(t, "127.0.0.1")
	stop, err := dnsTestServer(t, env.up.addr).Serve(context.Background(), env.listen, p)
	must.NoError(t, err)
	t.Cleanup(func() { must.NoError(t, stop()) })
	return env
}

func dnsTestQuery(t *testing.T, netw string, server netip.AddrPort, name string, qtype uint16) (*dns.Msg, error) {
	t.Helper()
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	c := &dns.Client{Net: netw, Timeout: 3 * time.Second}
	r, _, err := c.Exchange(m, server.String())
	return r, err
}

func dnsTestMustQuery(t *testing.T, netw string, server netip.AddrPort, name string, qtype uint16) *dns.Msg {
	t.Helper()
	r, err := dnsTestQuery(t, netw, server, name, qtype)
	must.NoError(t, err, must.Sprintf("query %s %s over %s", name, dns.TypeToString[qtype], netw))
	return r
}

func dnsTestAddrs(r *dns.Msg) []string {
	var out []string
	for _, rr := range r.Answer {
		if a, ok := rr.(*dns.A); ok {
			out = append(out, a.A.String())
		}
	}
	return out
}

func TestDNSAddrAlwaysDenied(t *testing.T) {
	for _, s := range []string{"127.0.0.1", "127.9.9.9", "169.254.169.254", "169.254.0.1", "0.0.0.0",
		"0.1.2.3", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "::1", "fe80::1", "ff02::1",
		"::ffff:127.0.0.1", "::"} {
		must.True(t, DNSAddrAlwaysDenied(netip.MustParseAddr(s)), must.Sprint(s))
	}
	for _, s := range []string{"10.199.0.10", "192.168.1.1", "8.8.8.8", "100.64.0.1", "2001:db8::1"} {
		must.False(t, DNSAddrAlwaysDenied(netip.MustParseAddr(s)), must.Sprint(s))
	}
}

// The allowlisted name resolves upstream, with its TTL clamped, and Allow is
// called with that TTL before the client has any answer.
func TestDNSAllowedNameAllowBeforeAnswer(t *testing.T) {
	env := startDNSTest(t, nil)

	called := make(chan dnsTestAllow, 1)
	release := make(chan struct{})
	env.setOnAllow(func(a dnsTestAllow) error {
		called <- a
		select {
		case <-release:
		case <-time.After(5 * time.Second):
		}
		return nil
	})

	type result struct {
		r   *dns.Msg
		err error
	}
	answered := make(chan result, 1)
	go func() {
		r, err := dnsTestQuery(t, "udp", env.listen, "allowed.test.", dns.TypeA)
		answered <- result{r, err}
	}()

	select {
	case a := <-called:
		must.Eq(t, netip.MustParseAddr("10.199.0.10"), a.addr)
		must.Eq(t, 30*time.Second, a.ttl) // upstream TTL 5 s, clamped up to MinTTL
		must.Eq(t, DNSRule("allowed.test"), a.rule)
	case <-time.After(3 * time.Second):
		t.Fatal("Allow was not called")
	}
	select {
	case res := <-answered:
		t.Fatalf("answer arrived while Allow had not returned: %v %v", res.r, res.err)
	case <-time.After(300 * time.Millisecond):
	}
	close(release)

	var res result
	select {
	case res = <-answered:
	case <-time.After(4 * time.Second):
		t.Fatal("no answer after Allow returned")
	}
	must.NoError(t, res.err)
	must.Eq(t, dns.RcodeSuccess, res.r.Rcode)
	must.Eq(t, []string{"10.199.0.10"}, dnsTestAddrs(res.r))
	must.Eq(t, uint32(30), res.r.Answer[0].Header().Ttl)
	must.Eq(t, 1, env.up.count("udp", "allowed.test", dns.TypeA))

	// A long TTL is clamped down to MaxTTL, in the answer and for Allow.
	env.setOnAllow(nil)
	r := dnsTestMustQuery(t, "udp", env.listen, "sub.pypi.test.", dns.TypeA)
	must.Eq(t, []string{"10.199.0.11"}, dnsTestAddrs(r))
	must.Eq(t, uint32(3600), r.Answer[0].Header().Ttl)
	allows := env.allowed()
	must.Eq(t, time.Hour, allows[len(allows)-1].ttl)
	must.Eq(t, netip.MustParseAddr("10.199.0.11"), allows[len(allows)-1].addr)
	must.SliceEmpty(t, env.refusedNames())
}

// Names outside the allowlist are refused and never reach the upstream.
func TestDNSRefusesNamesOutsideAllowlist(t *testing.T) {
	env := startDNSTest(t, nil)

	for _, name := range []string{
		"secret.test.",
		"pypi.test.",           // apex of "*.pypi.test"
		"pypi.test.evil.test.", // pattern as a prefix
		"xpypi.test.",
		`evil\.pypi.test.`,      // one label "evil.pypi" under "test"
		`a\000b.sub.pypi.test.`, // escaped byte in a label
		"10.0.199.10.in-addr.arpa.",
	} {
		for _, netw := range []string{"udp", "tcp"} {
			r := dnsTestMustQuery(t, netw, env.listen, name, dns.TypeA)
			must.Eq(t, dns.RcodeRefused, r.Rcode, must.Sprintf("%s over %s", name, netw))
			must.SliceEmpty(t, r.Answer)
		}
	}
	must.Eq(t, 0, env.up.queries(), must.Sprint("refused names reached the upstream"))
	must.SliceEmpty(t, env.allowed())
	must.SliceContains(t, env.refusedNames(), "secret.test")
	must.SliceContains(t, env.refusedNames(), "pypi.test")
	must.SliceContains(t, env.refusedNames(), "pypi.test.evil.test")

	// The wildcard still lets its subdomains through, in any case.
	r := dnsTestMustQuery(t, "udp", env.listen, "SUB.PyPi.Test.", dns.TypeA)
	must.Eq(t, dns.RcodeSuccess, r.Rcode)
	must.Eq(t, []string{"10.199.0.11"}, dnsTestAddrs(r))
	must.Eq(t, 1, env.up.count("udp", "sub.pypi.test", dns.TypeA))
	must.Eq(t, 0, env.up.count("udp", "pypi.test", dns.TypeA))
	must.Eq(t, 0, env.up.count("udp", "pypi.test.evil.test", dns.TypeA))
	must.Eq(t, 0, env.up.count("udp", "secret.test", dns.TypeA))

	// A deeper name under the wildcard goes upstream; its NXDOMAIN is passed on.
	r = dnsTestMustQuery(t, "udp", env.listen, "a.b.pypi.test.", dns.TypeA)
	must.Eq(t, dns.RcodeNameError, r.Rcode)
	must.Eq(t, 1, env.up.count("udp", "a.b.pypi.test", dns.TypeA))
}

// Answers pointing at loopback, link-local or operator-denied addresses lose
// those records; Allow is never called for them.
func TestDNSDropsDeniedAddresses(t *testing.T) {
	env := startDNSTest(t, nil)

	for _, name := range []string{"rebind.test.", "meta.test."} {
		r := dnsTestMustQuery(t, "udp", env.listen, name, dns.TypeA)
		must.Eq(t, dns.RcodeRefused, r.Rcode, must.Sprint(name))
		must.SliceEmpty(t, r.Answer, must.Sprint(name))
		must.Eq(t, 1, env.up.count("udp", strings.TrimSuffix(name, "."), dns.TypeA))
	}
	must.SliceEmpty(t, env.allowed())
	must.Eq(t, []string{"rebind.test", "meta.test"}, env.refusedNames())

	// Mixed: only the permitted address is left.
	r := dnsTestMustQuery(t, "udp", env.listen, "mixed.test.", dns.TypeA)
	must.Eq(t, dns.RcodeSuccess, r.Rcode)
	must.Eq(t, []string{"10.199.0.15"}, dnsTestAddrs(r))
	allows := env.allowed()
	must.Len(t, 1, allows)
	must.Eq(t, netip.MustParseAddr("10.199.0.15"), allows[0].addr)
	must.Eq(t, 5*time.Minute, allows[0].ttl)
}

func TestDNSRefusesOtherTypes(t *testing.T) {
	env := startDNSTest(t, nil)

	for _, qtype := range []uint16{dns.TypeTXT, dns.TypeANY, dns.TypeMX, dns.TypeCNAME, dns.TypeSRV,
		dns.TypeNS, dns.TypeSOA, dns.TypeHTTPS, dns.TypeNULL, dns.TypePTR} {
		for _, netw := range []string{"udp", "tcp"} {
			r := dnsTestMustQuery(t, netw, env.listen, "allowed.test.", qtype)
			must.Eq(t, dns.RcodeRefused, r.Rcode, must.Sprintf("%s over %s", dns.TypeToString[qtype], netw))
			must.SliceEmpty(t, r.Answer)
		}
	}
	r := dnsTestMustQuery(t, "udp", env.listen, "10.0.199.10.in-addr.arpa.", dns.TypePTR)
	must.Eq(t, dns.RcodeRefused, r.Rcode)

	// Class CHAOS.
	m := new(dns.Msg)
	m.Question = []dns.Question{{Name: "allowed.test.", Qtype: dns.TypeA, Qclass: dns.ClassCHAOS}}
	m.Id = dns.Id()
	c := &dns.Client{Timeout: 3 * time.Second}
	r, _, err := c.Exchange(m, env.listen.String())
	must.NoError(t, err)
	must.Eq(t, dns.RcodeRefused, r.Rcode)

	must.Eq(t, 0, env.up.queries())
	must.SliceEmpty(t, env.allowed())
}

func TestDNSAAAAIsEmpty(t *testing.T) {
	env := startDNSTest(t, nil)

	for _, netw := range []string{"udp", "tcp"} {
		r := dnsTestMustQuery(t, netw, env.listen, "allowed.test.", dns.TypeAAAA)
		must.Eq(t, dns.RcodeSuccess, r.Rcode)
		must.SliceEmpty(t, r.Answer)
	}
	r := dnsTestMustQuery(t, "udp", env.listen, "secret.test.", dns.TypeAAAA)
	must.Eq(t, dns.RcodeRefused, r.Rcode)

	must.Eq(t, 0, env.up.queries())
	must.SliceEmpty(t, env.allowed())
}

func TestDNSOverTCP(t *testing.T) {
	env := startDNSTest(t, nil)

	r := dnsTestMustQuery(t, "tcp", env.listen, "allowed.test.", dns.TypeA)
	must.Eq(t, dns.RcodeSuccess, r.Rcode)
	must.Eq(t, []string{"10.199.0.10"}, dnsTestAddrs(r))
	must.Len(t, 1, env.allowed())

	// CNAME chain within the upstream answer.
	r = dnsTestMustQuery(t, "tcp", env.listen, "alias.test.", dns.TypeA)
	must.Eq(t, dns.RcodeSuccess, r.Rcode)
	must.Eq(t, []string{"10.199.0.16"}, dnsTestAddrs(r))
	must.Len(t, 2, r.Answer)
	for _, rr := range r.Answer {
		must.Eq(t, uint32(120), rr.Header().Ttl) // smallest TTL of the chain
	}
	allows := env.allowed()
	must.Eq(t, netip.MustParseAddr("10.199.0.16"), allows[len(allows)-1].addr)
	must.Eq(t, 0, env.up.count("udp", "target.cdn.test", dns.TypeA))
}

// An answer too big for UDP: the service retries the upstream over TCP, and
// tells a UDP client to do the same.
func TestDNSTruncation(t *testing.T) {
	env := startDNSTest(t, nil)

	r := dnsTestMustQuery(t, "udp", env.listen, "big.test.", dns.TypeA)
	must.True(t, r.Truncated)
	must.Eq(t, 1, env.up.count("udp", "big.test", dns.TypeA))
	must.Eq(t, 1, env.up.count("tcp", "big.test", dns.TypeA))

	r = dnsTestMustQuery(t, "tcp", env.listen, "big.test.", dns.TypeA)
	must.False(t, r.Truncated)
	must.Len(t, 100, dnsTestAddrs(r))

	seen := map[netip.Addr]bool{}
	for _, a := range env.allowed() {
		seen[a.addr] = true
	}
	must.MapLen(t, 100, seen)
}

func TestDNSMalformedPackets(t *testing.T) {
	env := startDNSTest(t, nil)

	valid := new(dns.Msg)
	valid.SetQuestion("allowed.test.", dns.TypeA)
	packed, err := valid.Pack()
	must.NoError(t, err)

	rnd := rand.New(rand.NewSource(1))
	junk := func(n int) []byte {
		b := make([]byte, n)
		rnd.Read(b)
		return b
	}
	header := func(flags, qd, an, ns, ar uint16) []byte {
		return []byte{0x12, 0x34, byte(flags >> 8), byte(flags), byte(qd >> 8), byte(qd), byte(an >> 8), byte(an),
			byte(ns >> 8), byte(ns), byte(ar >> 8), byte(ar)}
	}
	packets := [][]byte{
		{},
		{0x00},
		junk(5),
		header(0, 1, 0, 0, 0),      // says one question, has none
		header(0x8000, 1, 0, 0, 0), // a response
		header(0x2800, 1, 0, 0, 0), // UPDATE opcode
		header(0, 3, 0, 0, 0),      // three questions
		append(header(0, 1, 0, 0, 0), 0xc0, 0x0c, 0, 1, 0, 1), // name is a pointer to itself
		append(header(0, 1, 0, 0, 0), 63, 'a', 'b'),           // label longer than the packet
		packed[:len(packed)-3],                                // cut short
		junk(300),
		junk(1500),
	}
	for i := 0; i < 50; i++ {
		packets = append(packets, junk(12+rnd.Intn(200)))
	}

	uc, err := net.Dial("udp", env.listen.String())
	must.NoError(t, err)
	defer uc.Close()
	for _, p := range packets {
		if len(p) > 0 {
			_, err := uc.Write(p)
			must.NoError(t, err)
		}
	}

	for _, p := range packets {
		tc, err := net.DialTimeout("tcp", env.listen.String(), 2*time.Second)
		must.NoError(t, err)
		tc.SetDeadline(time.Now().Add(2 * time.Second))
		frame := append([]byte{byte(len(p) >> 8), byte(len(p))}, p...)
		tc.Write(frame)
		tc.Close()
	}
	// A length prefix promising more than is sent, left open until the
	// server's read timeout.
	tc, err := net.DialTimeout("tcp", env.listen.String(), 2*time.Second)
	must.NoError(t, err)
	tc.Write([]byte{0xff, 0xff, 1, 2, 3})
	defer tc.Close()

	// Still serving, over both transports.
	for _, netw := range []string{"udp", "tcp"} {
		r := dnsTestMustQuery(t, netw, env.listen, "allowed.test.", dns.TypeA)
		must.Eq(t, []string{"10.199.0.10"}, dnsTestAddrs(r))
	}
}

// With no upstream answering the client gets SERVFAIL within the configured
// timeout; a dead upstream before a live one is skipped.
func TestDNSUpstreamFailure(t *testing.T) {
	up := startDNSTestUpstream(t)
	dead := dnsTestFreePort(t, "127.0.0.1") // nothing listens there

	// A UDP socket that swallows queries without answering.
	black, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.ParseIP("127.0.0.1")})
	must.NoError(t, err)
	defer black.Close()

	for _, tc := range []struct {
		name      string
		upstreams []string
		rcode     int
	}{
		{"refused port", []string{dead.String()}, dns.RcodeServerFailure},
		{"silent", []string{black.LocalAddr().String()}, dns.RcodeServerFailure},
		{"dead then live", []string{dead.String(), up.addr}, dns.RcodeSuccess},
		{"silent then live", []string{black.LocalAddr().String(), up.addr}, dns.RcodeSuccess},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := &dnsTestEnv{up: up}
			listen := dnsTestFreePort(t, "127.0.0.1")
			srv := dnsTestServer(t, tc.upstreams...)
			srv.Timeout = 3 * time.Second
			srv.UpstreamTimeout = 500 * time.Millisecond
			stop, err := srv.Serve(context.Background(), listen, dnsTestPolicy(env))
			must.NoError(t, err)
			defer stop()

			start := time.Now()
			r := dnsTestMustQuery(t, "udp", listen, "allowed.test.", dns.TypeA)
			must.Eq(t, tc.rcode, r.Rcode)
			must.Less(t, 2500*time.Millisecond, time.Since(start))
			if tc.rcode == dns.RcodeSuccess {
				must.Eq(t, []string{"10.199.0.10"}, dnsTestAddrs(r))
			} else {
				must.SliceEmpty(t, env.allowed())
			}
		})
	}
}

// When the firewall cannot be opened, the address is not handed out.
func TestDNSAllowFailure(t *testing.T) {
	env := startDNSTest(t, nil)
	env.setOnAllow(func(a dnsTestAllow) error {
		if a.addr == netip.MustParseAddr("10.199.0.10") {
			return fmt.Errorf("nft failed")
		}
		return nil
	})
	r := dnsTestMustQuery(t, "udp", env.listen, "allowed.test.", dns.TypeA)
	must.Eq(t, dns.RcodeServerFailure, r.Rcode)
	must.SliceEmpty(t, r.Answer)
}

// Queries from another source than the sandbox's are dropped.
func TestDNSClientFilter(t *testing.T) {
	env := startDNSTest(t, func(p *DNSPolicy) { p.Client = netip.MustParseAddr("127.0.0.2") })

	query := func(netw, from string, timeout time.Duration) (*dns.Msg, error) {
		m := new(dns.Msg)
		m.SetQuestion("allowed.test.", dns.TypeA)
		d := &net.Dialer{Timeout: timeout}
		if netw == "udp" {
			d.LocalAddr = &net.UDPAddr{IP: net.ParseIP(from)}
		} else {
			d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
		}
		c := &dns.Client{Net: netw, Dialer: d, Timeout: timeout}
		r, _, err := c.Exchange(m, env.listen.String())
		return r, err
	}
	for _, netw := range []string{"udp", "tcp"} {
		_, err := query(netw, "127.0.0.3", 700*time.Millisecond)
		must.Error(t, err, must.Sprintf("foreign source answered over %s", netw))

		r, err := query(netw, "127.0.0.2", 3*time.Second)
		must.NoError(t, err)
		must.Eq(t, []string{"10.199.0.10"}, dnsTestAddrs(r))
	}
	must.Eq(t, 2, env.up.count("udp", "allowed.test", dns.TypeA))
}

func TestDNSServeAndStop(t *testing.T) {
	up := startDNSTestUpstream(t)
	env := &dnsTestEnv{up: up}
	srv := dnsTestServer(t, up.addr)

	// Bad configurations are errors.
	listen := dnsTestFreePort(t, "127.0.0.1")
	_, err := srv.Serve(context.Background(), listen, DNSPolicy{})
	must.Error(t, err)
	_, err = (&DNSServer{}).Serve(context.Background(), listen, dnsTestPolicy(env))
	must.Error(t, err)
	_, err = (&DNSServer{Upstreams: []string{"resolver.example"}}).Serve(context.Background(), listen, dnsTestPolicy(env))
	must.Error(t, err)
	_, err = (&DNSServer{Upstreams: []string{up.addr}, MinTTL: time.Hour, MaxTTL: time.Minute}).Serve(context.Background(), listen, dnsTestPolicy(env))
	must.Error(t, err)

	// A taken port is an error, and leaves nothing bound.
	busy, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(listen))
	must.NoError(t, err)
	_, err = srv.Serve(context.Background(), listen, dnsTestPolicy(env))
	must.Error(t, err)
	busy.Close()

	// stop closes both listeners; a second stop is harmless.
	stop, err := srv.Serve(context.Background(), listen, dnsTestPolicy(env))
	must.NoError(t, err)
	must.Eq(t, dns.RcodeSuccess, dnsTestMustQuery(t, "udp", listen, "allowed.test.", dns.TypeA).Rcode)
	must.NoError(t, stop())
	must.NoError(t, stop())
	dnsTestMustBeDown(t, listen)

	// So does cancelling the context.
	ctx, cancel := context.WithCancel(context.Background())
	stop, err = srv.Serve(ctx, listen, dnsTestPolicy(env))
	must.NoError(t, err)
	defer stop()
	must.Eq(t, dns.RcodeSuccess, dnsTestMustQuery(t, "tcp", listen, "allowed.test.", dns.TypeA).Rcode)
	cancel()
	dnsTestMustBeDown(t, listen)

	// Both ports can be bound again.
	pc, ln := dnsTestListenAt(t, listen)
	pc.Close()
	ln.Close()
}

func dnsTestListenAt(t *testing.T, ap netip.AddrPort) (*net.UDPConn, *net.TCPListener) {
	t.Helper()
	var (
		pc  *net.UDPConn
		ln  *net.TCPListener
		err error
	)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if pc, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(ap)); err == nil {
			if ln, err = net.ListenTCP("tcp", net.TCPAddrFromAddrPort(ap)); err == nil {
				return pc, ln
			}
			pc.Close()
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("cannot bind %s again: %v", ap, err)
	return nil, nil
}

// dnsTestMustBeDown waits until neither transport answers at ap.
func dnsTestMustBeDown(t *testing.T, ap netip.AddrPort) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		m := new(dns.Msg)
		m.SetQuestion("allowed.test.", dns.TypeA)
		_, _, errU := (&dns.Client{Net: "udp", Timeout: 300 * time.Millisecond}).Exchange(m, ap.String())
		_, _, errT := (&dns.Client{Net: "tcp", Timeout: 300 * time.Millisecond}).Exchange(m, ap.String())
		if errU != nil && errT != nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s still answers", ap)
}

// TestDNSTCPConnLimit: a listener serves at most MaxTCPConns TCP
// connections at once; a further client is served only once one of them
// closes.
func TestDNSTCPConnLimit(t *testing.T) {
	env := &dnsTestEnv{up: startDNSTestUpstream(t)}
	env.listen = dnsTestFreePort(t, "127.0.0.1")
	srv := dnsTestServer(t, env.up.addr)
	srv.MaxTCPConns = 2
	stop, err := srv.Serve(context.Background(), env.listen, dnsTestPolicy(env))
	must.NoError(t, err)
	t.Cleanup(func() { must.NoError(t, stop()) })

	query := func(c *dns.Conn) error {
		m := new(dns.Msg)
		m.SetQuestion("allowed.test.", dns.TypeA)
		c.SetDeadline(time.Now().Add(time.Second))
		if err := c.WriteMsg(m); err != nil {
			return err
		}
		_, err := c.ReadMsg()
		return err
	}
	var held []*dns.Conn
	for i := 0; i < 2; i++ {
		c, err := dns.Dial("tcp", env.listen.String())
		must.NoError(t, err)
		defer c.Close()
		must.NoError(t, query(c), must.Sprintf("connection %d within the limit", i))
		held = append(held, c)
	}
	extra, err := dns.Dial("tcp", env.listen.String())
	must.NoError(t, err)
	defer extra.Close()
	must.Error(t, query(extra), must.Sprint("a third connection was served while two were open"))
	held[0].Close()
	extra2, err := dns.Dial("tcp", env.listen.String())
	must.NoError(t, err)
	defer extra2.Close()
	// The slot goes to the oldest waiting connection (extra, which gave
	// up); extra2 follows once extra is closed too.
	extra.Close()
	must.NoError(t, query(extra2), must.Sprint("served once the others closed"))
}

// TestDNSBypasses: the answers egress filters are attacked with. A CNAME
// from an allowlisted name to an internal name whose address is denied is
// refused; a TTL-0 answer that flips from an allowed to a denied address
// never grants the denied one (and grants the allowed one for MinTTL);
// case and trailing-dot variants are the same name, and a punycode
// look-alike is another name, refused without asking upstream.
func TestDNSBypasses(t *testing.T) {
	var entries []Entry
	for _, s := range []string{"cname-in.test:443", "flip.test:443", "allowed.test:443"} {
		e, err := ParseEgress(s)
		must.NoError(t, err)
		entries = append(entries, e)
	}
	env := startDNSTest(t, func(p *DNSPolicy) { p.Allowed = DNSAllowlist(entries) })
	env.up.mu.Lock()
	for _, s := range []string{
		"cname-in.test. 300 IN CNAME db.corp.internal.",
		"db.corp.internal. 300 IN A 192.168.9.9",
		"flip.test. 0 IN A 10.199.0.20",
	} {
		rr := dnsTestRR(t, s)
		name := strings.ToLower(rr.Header().Name)
		env.up.records[name] = append(env.up.records[name], rr)
	}
	env.up.mu.Unlock()

	r := dnsTestMustQuery(t, "udp", env.listen, "cname-in.test.", dns.TypeA)
	must.Eq(t, dns.RcodeRefused, r.Rcode)
	must.SliceEmpty(t, r.Answer)
	must.SliceEmpty(t, env.allowed())

	r = dnsTestMustQuery(t, "udp", env.listen, "flip.test.", dns.TypeA)
	must.Eq(t, []string{"10.199.0.20"}, dnsTestAddrs(r))
	must.Eq(t, uint32(30), r.Answer[0].Header().Ttl)
	env.up.mu.Lock()
	env.up.records["flip.test."] = []dns.RR{dnsTestRR(t, "flip.test. 0 IN A 192.168.9.10")}
	env.up.mu.Unlock()
	r = dnsTestMustQuery(t, "udp", env.listen, "flip.test.", dns.TypeA)
	must.Eq(t, dns.RcodeRefused, r.Rcode)
	allows := env.allowed()
	must.Len(t, 1, allows)
	must.Eq(t, netip.MustParseAddr("10.199.0.20"), allows[0].addr)
	must.Eq(t, 30*time.Second, allows[0].ttl)

	for _, name := range []string{"ALLOWED.Test.", "allowed.test"} {
		r = dnsTestMustQuery(t, "udp", env.listen, dns.Fqdn(name), dns.TypeA)
		must.Eq(t, []string{"10.199.0.10"}, dnsTestAddrs(r), must.Sprint(name))
	}
	for _, name := range []string{"xn--llowed-9ya.test.", "allowed.test.evil.test.", "allowed\\.test.evil."} {
		r = dnsTestMustQuery(t, "udp", env.listen, name, dns.TypeA)
		must.Eq(t, dns.RcodeRefused, r.Rcode, must.Sprint(name))
	}
	must.Eq(t, 0, env.up.count("udp", "xn--llowed-9ya.test", dns.TypeA))
	must.Eq(t, 0, env.up.count("udp", "allowed.test.evil.test", dns.TypeA))
}

// BenchmarkDNSUnderFlood measures the time to resolve an allowlisted name
// while another client floods the same service with queries for unique
// names outside the allowlist, each from a new source port (on loopback;
// in a sandbox the kernel filter's rate limit, DNSPacketRate, stops most
// of such a flood before it reaches the service).
func BenchmarkDNSUnderFlood(b *testing.B) {
	up := startDNSTestUpstream(b)
	listen := dnsTestFreePort(b, "127.0.0.1")
	srv := dnsTestServer(b, up.addr)
	srv.Logger = hclog.NewNullLogger()
	env := &dnsTestEnv{up: up, listen: listen}
	stop, err := srv.Serve(context.Background(), listen, dnsTestPolicy(env))
	must.NoError(b, err)
	defer stop()

	done := make(chan struct{})
	flooded := make(chan int)
	go func() {
		n := 0
		defer func() { flooded <- n }()
		for {
			select {
			case <-done:
				return
			default:
			}
			c, err := net.Dial("udp4", listen.String())
			if err != nil {
				continue
			}
			m := new(dns.Msg)
			m.SetQuestion(fmt.Sprintf("f%d.flood.test.", n), dns.TypeA)
			if p, err := m.Pack(); err == nil {
				c.Write(p)
			}
			c.Close()
			n++
		}
	}()
	c := &dns.Client{Net: "udp", Timeout: 3 * time.Second}
	q := new(dns.Msg)
	q.SetQuestion("allowed.test.", dns.TypeA)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		r, _, err := c.Exchange(q, listen.String())
		if err != nil || r.Rcode != dns.RcodeSuccess {
			b.Fatalf("allowlisted name during the flood: %v %v", r, err)
		}
	}
	b.StopTimer()
	close(done)
	b.ReportMetric(float64(<-flooded)/float64(b.N), "flood-queries/op")
}

// TestDNSTCPSlotsOnlyForTheClient: the sandbox's DNS listener sits on an
// address of the node, so any local user can connect to it. Connections
// from any other source than the sandbox's are closed when accepted and
// take none of the MaxTCPConns slots, so they cannot starve the sandbox's
// DNS over TCP.
func TestDNSTCPSlotsOnlyForTheClient(t *testing.T) {
	env := &dnsTestEnv{up: startDNSTestUpstream(t)}
	env.listen = dnsTestFreePort(t, "127.0.0.1")
	srv := dnsTestServer(t, env.up.addr)
	srv.MaxTCPConns = 2
	p := dnsTestPolicy(env)
	p.Client = netip.MustParseAddr("127.0.0.2")
	stop, err := srv.Serve(context.Background(), env.listen, p)
	must.NoError(t, err)
	t.Cleanup(func() { must.NoError(t, stop()) })

	dial := func(from string) *dns.Conn {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: time.Second}
		nc, err := d.Dial("tcp", env.listen.String())
		must.NoError(t, err)
		c := &dns.Conn{Conn: nc}
		t.Cleanup(func() { c.Close() })
		return c
	}
	m := new(dns.Msg)
	m.SetQuestion("allowed.test.", dns.TypeA)
	var foreign []*dns.Conn
	for i := 0; i < 2; i++ {
		c := dial("127.0.0.3")
		must.NoError(t, c.WriteMsg(m))
		foreign = append(foreign, c)
	}
	own := dial("127.0.0.2")
	own.SetDeadline(time.Now().Add(3 * time.Second))
	must.NoError(t, own.WriteMsg(m))
	r, err := own.ReadMsg()
	must.NoError(t, err, must.Sprint("the sandbox was not served while foreign connections were open"))
	must.Eq(t, []string{"10.199.0.10"}, dnsTestAddrs(r))
	for i, c := range foreign {
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		_, err := c.ReadMsg()
		// Closed by the server: EOF, or a reset when the query it sent
		// was still unread; a time-out means it was kept open.
		closed := errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)
		must.True(t, closed, must.Sprintf("foreign connection %d was not closed: %v", i, err))
	}
}
