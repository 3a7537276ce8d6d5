//go:build e2e

package e2e

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

// The test host is the project's test network host (testutil.NetHost). The
// bridge tests use two of its addresses: Addr on its veth, and Other on its
// loopback, which the host routes through Addr (a second host behind the
// first); both serve the line service on both ports, and the host records
// every connection. Nothing it sends leaves the machine: it only answers,
// and its default route is the host end of its veth.
const (
	testHostPort      = 7001
	testHostOtherPort = 7002
)

type testHost struct{ *testutil.NetHost }

// newTestHost makes the test host and starts its servers; the test's cleanup
// removes it, whether the test passed or not.
func newTestHost(t *testing.T) *testHost {
	t.Helper()
	th := &testHost{testutil.StartNetHost(t, testutil.NetServices{Lines: []uint16{testHostPort, testHostOtherPort}})}

	// Positive control: the host reaches both addresses and both ports.
	for _, a := range th.addrs() {
		must.Wait(t, wait4(10*time.Second, func() error {
			got, err := dialRead(a, 2*time.Second)
			if err != nil {
				return err
			}
			if !strings.HasPrefix(got, "hello ") {
				return fmt.Errorf("%s answered %q", a, got)
			}
			return nil
		}), must.Sprintf("the test host does not answer on %s from the host", a))
	}
	th.ResetHits()
	t.Logf("test host %s up: %s and %s, ports %d and %d", th.Netns, th.Addr, th.Other, testHostPort, testHostOtherPort)
	return th
}

func (th *testHost) addrs() []string {
	var out []string
	for _, ip := range []netip.Addr{th.Addr, th.Other} {
		for _, p := range []uint16{testHostPort, testHostOtherPort} {
			out = append(out, netip.AddrPortFrom(ip, p).String())
		}
	}
	return out
}

// ceiling is the plugin's allowed_egress entries for the test host: both of
// its addresses, so that the task's own egress list is what denies the
// second one.
func (th *testHost) ceiling() []string {
	return []string{th.Addr.String() + "/32", th.Other.String() + "/32"}
}

// count is how many connections the test host accepted on addr (ip:port).
func (th *testHost) count(addr string) int {
	return len(th.Hits(func(x testutil.Hit) bool { return x.Proto == "tcp" && x.Local.String() == addr }))
}

func (th *testHost) counts() map[string]int {
	out := map[string]int{}
	for _, x := range th.Hits(func(x testutil.Hit) bool { return x.Proto == "tcp" }) {
		out[x.Local.String()]++
	}
	return out
}

// dialRead connects to addr and returns the first line it sends.
func dialRead(addr string, timeout time.Duration) (string, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read from %s: %w", addr, err)
	}
	return strings.TrimSpace(line), nil
}
