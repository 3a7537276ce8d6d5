package image

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

const (
	// maxResponseSize bounds every successful response that is not a
	// blob (manifests, indexes, token answers): the largest manifest the
	// store accepts. Blobs are bounded by their descriptor's size.
	maxResponseSize = maxManifestSize
	// maxErrorBody is how much of a registry's error response is read;
	// the rest is dropped.
	maxErrorBody = 4 << 10
	// maxErrorText caps the error text that reaches task events and the
	// audit log.
	maxErrorText = 2 << 10
)

// hopPolicy is what one pull may reach. Every request a pull makes (the
// registry's own, a token realm, a redirect, a blob URL) is checked by name
// and scheme before it is sent, and by the address actually dialled after
// DNS, so a name that resolves (or rebinds) to an internal address is
// refused as well.
type hopPolicy struct {
	registry   string   // canonical host[:port] of the reference's registry
	listed     []string // the operator's allowed_registries, canonical
	insecureOK func(host string) bool
}

func newHopPolicy(registry string, pol Policy, insecureOK func(string) bool) *hopPolicy {
	p := &hopPolicy{registry: canonicalRegistry(registry), insecureOK: insecureOK}
	for _, a := range pol.AllowedRegistries {
		p.listed = append(p.listed, canonicalRegistry(a))
	}
	return p
}

// names reports whether hostport is one of names, where an entry without a
// port also matches the default HTTP and HTTPS ports.
func names(list []string, hostport string) bool {
	hp := canonicalRegistry(hostport)
	host, port, err := net.SplitHostPort(hp)
	if err != nil {
		host, port = hp, ""
	}
	host = canonicalRegistry(strings.Trim(host, "[]"))
	for _, e := range list {
		if e == hp || e == host && (port == "" || port == "443" || port == "80") {
			return true
		}
		if eh, ep, err := net.SplitHostPort(e); err == nil && canonicalRegistry(strings.Trim(eh, "[]")) == host && ep == port {
			return true
		}
	}
	return false
}

func (p *hopPolicy) isRegistry(hostport string) bool { return names([]string{p.registry}, hostport) }

// checkURL applies the registry's own rules to a hop: allowed_registries
// (when set) and TLS unless the operator allows plain HTTP for the host.
func (p *hopPolicy) checkURL(scheme, host string) error {
	if !p.isRegistry(host) && len(p.listed) > 0 && !names(p.listed, host) {
		return fmt.Errorf("request to %s refused: the registry %s sent the pull there, and %s is not in the plugin's allowed_registries (add it there if it is the registry's token or blob server)", host, p.registry, host)
	}
	if scheme != "https" && !p.insecureOK(host) {
		return fmt.Errorf("plain HTTP to %s refused: only loopback registries, or ones the operator allows as insecure, may be used without TLS", host)
	}
	return nil
}

// checkAddr refuses a connection to an address that is not public unless
// the operator named the host in allowed_registries: a job must not make
// the plugin, which runs as root on the node, talk to the node itself or
// to its private networks.
func (p *hopPolicy) checkAddr(hostport string, ip netip.Addr) error {
	if names(p.listed, hostport) {
		return nil
	}
	if nonPublic(ip) {
		return fmt.Errorf("connection to %s (%s) refused: it is a loopback, private or otherwise non-public address, which only registries named in the plugin's allowed_registries may use", hostport, ip)
	}
	node, err := nodeAddr(ip)
	if err != nil {
		return fmt.Errorf("connection to %s (%s) refused: cannot tell whether it is an address of this node: %w", hostport, ip, err)
	}
	if node {
		return fmt.Errorf("connection to %s (%s) refused: it is an address of this node, which only registries named in the plugin's allowed_registries may use", hostport, ip)
	}
	return nil
}

// nodeAddr reports whether the kernel routes ip to the node itself (a
// local, broadcast or anycast route): the node's public addresses are no
// more a registry's to use than loopback. It is asked at every dial, so an
// address the node gained after the plugin started counts too. A failed
// lookup is an error, and the dial is refused: there would be no route to
// connect over anyway.
func nodeAddr(ip netip.Addr) (bool, error) {
	routes, err := netlink.RouteGet(ip.WithZone("").Unmap().AsSlice())
	if err != nil {
		return false, fmt.Errorf("route lookup: %w", err)
	}
	return slices.ContainsFunc(routes, func(r netlink.Route) bool {
		return r.Type == unix.RTN_LOCAL || r.Type == unix.RTN_BROADCAST || r.Type == unix.RTN_ANYCAST
	}), nil
}

// nonPublicPrefixes are the ranges a pull may reach only for registries the
// operator named.
var nonPublicPrefixes = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("100.64.0.0/10"),
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.0.0.0/24"),
	netip.MustParsePrefix("192.168.0.0/16"),
	netip.MustParsePrefix("198.18.0.0/15"),
	netip.MustParsePrefix("224.0.0.0/3"),
	netip.MustParsePrefix("::/127"),
	netip.MustParsePrefix("fc00::/7"),
	netip.MustParsePrefix("fe80::/10"),
	netip.MustParsePrefix("ff00::/8"),
}

// nonPublic reports whether ip is loopback, private, link-local, shared,
// multicast or reserved, also when written as an IPv4-mapped, 6to4 or NAT64
// address.
func nonPublic(ip netip.Addr) bool {
	// A zone ([::1%lo]) makes every prefix match fail, and the kernel
	// ignores it for any address but a link-local one.
	ip = ip.WithZone("").Unmap()
	if ip.Is6() {
		b := ip.As16()
		switch {
		case b[0] == 0x20 && b[1] == 0x02: // 6to4: 2002:AABB:CCDD::/48
			return nonPublic(netip.AddrFrom4([4]byte{b[2], b[3], b[4], b[5]}))
		case netip.MustParsePrefix("64:ff9b::/96").Contains(ip):
			return nonPublic(netip.AddrFrom4([4]byte{b[12], b[13], b[14], b[15]}))
		}
	}
	return slices.ContainsFunc(nonPublicPrefixes, func(p netip.Prefix) bool { return p.Contains(ip) })
}

// hopTransport is one pull's HTTP transport. It has connections of its own
// (none are shared with a pull under another policy) and no proxy: the
// address it checks must be the one it talks to.
type hopTransport struct {
	inner *http.Transport
	pol   *hopPolicy
}

func newHopTransport(pol *hopPolicy) *hopTransport {
	inner := remote.DefaultTransport.(*http.Transport).Clone()
	inner.Proxy = nil
	inner.DialContext = pol.dial
	return &hopTransport{inner: inner, pol: pol}
}

// dial connects to addr, checking every address it tries after DNS.
func (p *hopPolicy) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	d := net.Dialer{
		Timeout:   30 * time.Second,
		KeepAlive: 30 * time.Second,
		Control: func(_, address string, _ syscall.RawConn) error {
			ap, err := netip.ParseAddrPort(address)
			if err != nil {
				return err
			}
			return p.checkAddr(addr, ap.Addr())
		},
	}
	return d.DialContext(ctx, network, addr)
}

func (t *hopTransport) close() { t.inner.CloseIdleConnections() }

func (t *hopTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if err := t.pol.checkURL(req.URL.Scheme, req.URL.Host); err != nil {
		if req.Body != nil {
			req.Body.Close()
		}
		return nil, err
	}
	resp, err := t.inner.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	switch {
	case resp.StatusCode < 200 || resp.StatusCode > 299:
		if !t.pol.isRegistry(req.URL.Host) {
			// Another host's error text must not reach the task:
			// only its status does.
			resp.Body.Close()
			resp.Body, resp.ContentLength = http.NoBody, 0
			break
		}
		resp.Body = &cappedBody{rc: resp.Body, left: maxErrorBody, truncate: true}
	default:
		limit, ok := blobLimit(req)
		if !ok {
			limit = maxResponseSize
		}
		resp.Body = &cappedBody{rc: resp.Body, left: limit, limit: limit, host: req.URL.Host}
	}
	return resp, nil
}

type blobKey struct{}

// blobWant is the blob a fetch is for.
type blobWant struct {
	path string // "/blobs/<digest>", the end of its URL's path
	size int64
}

// withBlob marks ctx as the fetch of the blob d: its answer may run to
// d's size. Every other answer (manifests, token answers, which
// go-containerregistry reads whole, also when the token is asked for in
// the middle of a blob fetch) is held to maxResponseSize.
func withBlob(ctx context.Context, d v1.Descriptor) context.Context {
	return context.WithValue(ctx, blobKey{}, blobWant{path: "/blobs/" + d.Digest.String(), size: d.Size})
}

// blobLimit returns the size of the blob req fetches: req, or the request
// whose redirect led to it, asks for the blob its context is marked with.
// A URL's path alone does not make a blob request (a token realm may have
// "/blobs/" in it too).
func blobLimit(req *http.Request) (int64, bool) {
	w, ok := req.Context().Value(blobKey{}).(blobWant)
	if !ok || w.size < 0 {
		return 0, false
	}
	for req.Response != nil && req.Response.Request != nil {
		req = req.Response.Request
	}
	if !strings.HasSuffix(req.URL.Path, w.path) {
		return 0, false
	}
	return w.size, true
}

// cappedBody reads at most left bytes: past that it ends the body
// (truncate) or fails naming the host and the limit.
type cappedBody struct {
	rc       io.ReadCloser
	left     int64
	limit    int64
	truncate bool
	host     string
}

var errResponseTooLarge = errors.New("response too large")

func (c *cappedBody) Read(p []byte) (int, error) {
	if c.left <= 0 {
		if c.truncate {
			return 0, io.EOF
		}
		// One more byte tells a body of exactly the cap from a longer one.
		var one [1]byte
		if n, _ := c.rc.Read(one[:]); n == 0 {
			return 0, io.EOF
		}
		return 0, fmt.Errorf("the answer from %s is larger than %d bytes: %w", c.host, c.limit, errResponseTooLarge)
	}
	if int64(len(p)) > c.left {
		p = p[:c.left]
	}
	n, err := c.rc.Read(p)
	c.left -= int64(n)
	return n, err
}

func (c *cappedBody) Close() error { return c.rc.Close() }

// cappedError keeps an error's chain but caps its text, which reaches task
// events and the audit log.
type cappedError struct {
	err error
	msg string
}

func (e *cappedError) Error() string { return e.msg }
func (e *cappedError) Unwrap() error { return e.err }

// capError makes err's text safe to show: control characters and
// bidirectional overrides (a registry's error body may carry terminal
// escapes for whoever reads the task's events) are written escaped, and
// the text is capped at maxErrorText.
func capError(err error) error {
	orig := err.Error()
	msg := escapeControls(orig)
	if len(msg) > maxErrorText {
		cut := maxErrorText
		for cut > 0 && !utf8.RuneStart(msg[cut]) {
			cut--
		}
		msg = msg[:cut] + " ... (truncated)"
	}
	if msg == orig {
		return err
	}
	return &cappedError{err: err, msg: msg}
}

// escapeControls writes control characters and bidirectional formatting
// characters of s as Go escapes (\x1b, \u202e), and keeps the rest.
func escapeControls(s string) string {
	unsafe := func(r rune) bool { return unicode.IsControl(r) || unicode.Is(unicode.Bidi_Control, r) }
	if !strings.ContainsFunc(s, unsafe) {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		if unsafe(r) {
			q := strconv.QuoteRuneToASCII(r)
			b.WriteString(q[1 : len(q)-1])
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}
