//go:build e2e

package e2e

import (
	"bufio"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/shoenig/test/must"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

// The test host: a network namespace the test makes, joined to the host by a
// veth pair, with TCP servers that count the connections they accept. It has
// two addresses: testHostAddr on its veth (the host end has testHostGateway,
// the /30 is on-link), and testHostOther on its loopback, which the host
// routes through testHostAddr: a second host behind the first. Nothing it
// sends leaves the machine: it only answers, and its default route is the
// host end of its veth.
const (
	testHostSubnet      = "10.92.0.0/30"
	testHostGateway     = "10.92.0.1"
	testHostAddr        = "10.92.0.2"
	testHostOtherSubnet = "10.92.1.1/32"
	testHostOther       = "10.92.1.1"
	// Both addresses listen on both ports.
	testHostPort      = 7001
	testHostOtherPort = 7002
)

// testHostNetns and testHostLink name the test host's namespace and the host
// end of its veth; like the bridge, they are the suite's own.
func (h *harness) testHostNetns() string { return "sbxe2e" + h.netID + "-th" }
func (h *harness) testHostLink() string  { return "sbxe2e" + h.netID + "h" }
func (h *harness) testHostPeer() string  { return "sbxe2e" + h.netID + "p" }

type testHost struct {
	ns, link, peer string

	mu      sync.Mutex
	accepts map[string]int // by the address:port the client connected to
	lns     []net.Listener
	wg      sync.WaitGroup
}

// newTestHost makes the test host and starts its servers; the test's cleanup
// removes it, whether the test passed or not. One test host exists at a
// time (the names are the suite's).
func newTestHost(t *testing.T) *testHost {
	t.Helper()
	th := &testHost{ns: suite.testHostNetns(), link: suite.testHostLink(), peer: suite.testHostPeer(), accepts: map[string]int{}}
	// Registered first: it removes whatever part of the host was made.
	t.Cleanup(func() { th.remove(t) })

	for _, args := range [][]string{
		{"netns", "add", th.ns},
		{"link", "add", th.link, "type", "veth", "peer", "name", th.peer, "netns", th.ns},
		{"-n", th.ns, "link", "set", "lo", "up"},
		{"-n", th.ns, "addr", "add", testHostAddr + "/30", "dev", th.peer},
		{"-n", th.ns, "addr", "add", testHostOtherSubnet, "dev", "lo"},
		{"-n", th.ns, "link", "set", th.peer, "up"},
		{"-n", th.ns, "route", "add", "default", "via", testHostGateway},
		{"addr", "add", testHostGateway + "/30", "dev", th.link},
		{"link", "set", th.link, "up"},
		{"route", "add", testHostOtherSubnet, "via", testHostAddr, "dev", th.link},
	} {
		out, err := exec.Command("ip", args...).CombinedOutput()
		must.NoError(t, err, must.Sprintf("ip %s: %s", strings.Join(args, " "), out))
	}
	must.NoError(t, th.listen())

	// Positive control: the host reaches both addresses and both ports.
	for _, a := range th.addrs() {
		must.Wait(t, wait4(10*time.Second, func() error {
			got, err := dialRead(a, 2*time.Second)
			if err != nil {
				return err
			}
			if got != "testhost "+a {
				return fmt.Errorf("%s answered %q", a, got)
			}
			return nil
		}), must.Sprintf("the test host does not answer on %s from the host", a))
	}
	th.reset()
	t.Logf("test host %s up: %s and %s, ports %d and %d", th.ns, testHostAddr, testHostOther, testHostPort, testHostOtherPort)
	return th
}

func (th *testHost) addrs() []string {
	var out []string
	for _, ip := range []string{testHostAddr, testHostOther} {
		for _, p := range []int{testHostPort, testHostOtherPort} {
			out = append(out, fmt.Sprintf("%s:%d", ip, p))
		}
	}
	return out
}

// listen opens the servers' sockets inside the namespace (a socket belongs
// to the namespace of the thread that made it) and serves them.
func (th *testHost) listen() error {
	var lns []net.Listener
	err := testutil.InNetns(filepath.Join(netnsDir, th.ns), func() error {
		for _, p := range []int{testHostPort, testHostOtherPort} {
			l, err := net.Listen("tcp4", fmt.Sprintf("0.0.0.0:%d", p))
			if err != nil {
				return err
			}
			lns = append(lns, l)
		}
		return nil
	})
	th.mu.Lock()
	th.lns = append(th.lns, lns...)
	th.mu.Unlock()
	if err != nil {
		return err
	}
	for _, l := range lns {
		th.wg.Add(1)
		go th.serve(l)
	}
	return nil
}

// serve counts each connection, tells the client where it arrived, and
// closes it.
func (th *testHost) serve(l net.Listener) {
	defer th.wg.Done()
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		local := c.LocalAddr().String()
		th.mu.Lock()
		th.accepts[local]++
		th.mu.Unlock()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(c, "testhost %s\n", local)
		c.Close()
	}
}

// count is how many connections the test host accepted on addr (ip:port).
func (th *testHost) count(addr string) int {
	th.mu.Lock()
	defer th.mu.Unlock()
	return th.accepts[addr]
}

func (th *testHost) counts() map[string]int {
	th.mu.Lock()
	defer th.mu.Unlock()
	out := map[string]int{}
	for k, v := range th.accepts {
		out[k] = v
	}
	return out
}

func (th *testHost) reset() {
	th.mu.Lock()
	th.accepts = map[string]int{}
	th.mu.Unlock()
}

func (th *testHost) remove(t *testing.T) {
	th.mu.Lock()
	for _, l := range th.lns {
		l.Close()
	}
	th.mu.Unlock()
	th.wg.Wait()
	if linkExists(th.link) {
		if out, err := exec.Command("ip", "link", "delete", th.link).CombinedOutput(); err != nil {
			t.Errorf("remove the test host's interface %s: %v: %s", th.link, err, out)
		}
	}
	if netnsExists(th.ns) {
		if out, err := exec.Command("ip", "netns", "delete", th.ns).CombinedOutput(); err != nil {
			t.Errorf("remove the test host's namespace %s: %v: %s", th.ns, err, out)
		}
	}
	if linkExists(th.link) || netnsExists(th.ns) {
		t.Errorf("the test host (%s, %s) is still there after its removal", th.ns, th.link)
	}
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
