package runtime

import (
	"fmt"
	"net/netip"
	"os"
	"strings"
)

// hostResolvConf is the node's own resolver configuration.
const hostResolvConf = "/etc/resolv.conf"

// ResolvConf renders resolv.conf for a sandbox.
func ResolvConf(servers, searches, options []string) []byte {
	var b strings.Builder
	for _, s := range servers {
		fmt.Fprintf(&b, "nameserver %s\n", s)
	}
	if len(searches) > 0 {
		fmt.Fprintf(&b, "search %s\n", strings.Join(searches, " "))
	}
	if len(options) > 0 {
		fmt.Fprintf(&b, "options %s\n", strings.Join(options, " "))
	}
	return []byte(b.String())
}

// Nameservers are the addresses of the nameserver lines of a resolv.conf;
// a line whose address does not parse (a name, a scope suffix) is skipped.
func Nameservers(resolvConf []byte) []string {
	var out []string
	for _, line := range strings.Split(string(resolvConf), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "nameserver" {
			if _, err := netip.ParseAddr(f[1]); err == nil {
				out = append(out, f[1])
			}
		}
	}
	return out
}

// HostNameservers are the node's own resolvers (the default upstreams of the
// sandboxes' DNS service); none when /etc/resolv.conf cannot be read.
func HostNameservers() []string {
	b, err := os.ReadFile(hostResolvConf)
	if err != nil {
		return nil
	}
	return Nameservers(b)
}
