//go:build e2e

package e2e

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"
)

// Group networking: `network { mode = "bridge" }` with mapped ports and
// Nomad service checks, the task's egress allowlist enforced in the group's
// namespace, host mode with ports refused unless the plugin allows it, and
// loopback only without a network block. The bridge tests reach a test host
// (testhost_test.go) and nothing else.

// bridgePluginConfig is the suite's plugin config with the test host added
// to allowed_egress.
func bridgePluginConfig(th *testHost, extra ...string) []string {
	var out []string
	for _, l := range suitePluginConfig {
		if strings.HasPrefix(strings.TrimSpace(l), "allowed_egress") {
			continue
		}
		out = append(out, l)
	}
	ceiling := th.ceiling()
	out = append(out, fmt.Sprintf(`allowed_egress = ["deb.debian.org:443", %q, %q]`, ceiling[0], ceiling[1]))
	return append(out, extra...)
}

// netJob is one sandbox task, "main", in the suite's busybox rootfs, in a
// group with the network block and service the test asks for.
type netJob struct {
	Name      string
	Type      string   // "batch" or "service"
	Network   []string // lines of the group's network block; nil: no block
	Service   string   // a nomad-provider service on port "http"; "": none
	CheckType string   // the service's check: "http" or "tcp"
	Script    string   // run with /bin/sh -c; write $var, never ${var}
	Egress    []string
}

// runNetJob submits the job and waits for its allocation; the returned job's
// cleanup purges it and checks that nothing is left, network included.
func runNetJob(t *testing.T, spec *netJob) *runningJob {
	t.Helper()
	js := shellJob(t, spec.Type, spec.Script)
	if spec.Name != "" {
		js.Name = spec.Name
	}
	if spec.Network != nil {
		js.Group = append(append([]string{"network {"}, spec.Network...), "}")
	}
	if spec.Service != "" {
		js.Group = append(js.Group, "service {", `provider = "nomad"`, "name = "+hclString(spec.Service), `port = "http"`,
			"check {", "type = "+hclString(spec.CheckType))
		if spec.CheckType == "http" {
			js.Group = append(js.Group, `path = "/"`)
		}
		js.Group = append(js.Group, `interval = "1s"`, `timeout = "2s"`, "}", "}")
	}
	if len(spec.Egress) > 0 {
		js.ExtraConfig = append(js.ExtraConfig, "egress = "+hclList(spec.Egress))
	}
	return runJob(t, js)
}

// wait4 polls fn every 200ms until it returns nil or timeout has passed.
func wait4(timeout time.Duration, fn func() error) *wait.Constraint {
	return wait.InitialSuccess(wait.ErrorFunc(fn), wait.Timeout(timeout), wait.Gap(200*time.Millisecond))
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// mappedAddr is the host address:port Nomad mapped the group's port label
// to, and the port inside the group it maps to.
func mappedAddr(t *testing.T, j *runningJob, label string) (string, int) {
	t.Helper()
	var a struct {
		AllocatedResources struct {
			Shared struct {
				Ports []struct {
					Label  string
					Value  int
					To     int
					HostIP string
				}
			}
		}
	}
	must.NoError(t, apiGet("/v1/allocation/"+url.PathEscape(j.allocID), &a))
	for _, p := range a.AllocatedResources.Shared.Ports {
		if p.Label == label {
			return fmt.Sprintf("%s:%d", p.HostIP, p.Value), p.To
		}
	}
	t.Fatalf("allocation %s has no port %q: %+v", j.allocID, label, a.AllocatedResources.Shared.Ports)
	return "", 0
}

// checkResult is a Nomad service check result as the client API returns it.
type checkResult struct {
	Check, Service, Mode, Status, Output string
}

// waitCheckPassing waits until the allocation's service checks have all run
// and passed ("success").
func waitCheckPassing(t *testing.T, j *runningJob) {
	t.Helper()
	var got map[string]checkResult
	must.Wait(t, wait4(60*time.Second, func() error {
		got = nil
		if err := apiGet("/v1/client/allocation/"+url.PathEscape(j.allocID)+"/checks", &got); err != nil {
			return err
		}
		if len(got) == 0 {
			return fmt.Errorf("no check results yet")
		}
		for _, c := range got {
			if c.Status != "success" {
				return fmt.Errorf("check %q is %s: %s", c.Check, c.Status, c.Output)
			}
		}
		return nil
	}), must.Func(func() string {
		return fmt.Sprintf("the service check of allocation %s never passed: %+v", j.allocID, got)
	}))
	for _, c := range got {
		t.Logf("service check %q: %s (%s)", c.Check, c.Status, c.Output)
	}
}

var inboundClient = &http.Client{Timeout: 5 * time.Second}

// waitHTTP waits until GET http://addr/ answers 200 with a body containing
// want.
func waitHTTP(t *testing.T, addr, want string) {
	t.Helper()
	var last string
	must.Wait(t, wait4(60*time.Second, func() error {
		resp, err := inboundClient.Get("http://" + addr + "/")
		if err != nil {
			last = err.Error()
			return err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		last = fmt.Sprintf("%s: %q", resp.Status, b)
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), want) {
			return fmt.Errorf("GET %s: %s", addr, last)
		}
		return nil
	}), must.Func(func() string {
		return fmt.Sprintf("the task's port never answered on %s with %q; last: %s", addr, want, last)
	}))
}

// waitLog waits up to timeout for the task's stdout to contain want.
func (j *runningJob) waitLog(t *testing.T, timeout time.Duration, want string) string {
	t.Helper()
	var out string
	must.Wait(t, wait4(timeout, func() error {
		out = j.logs(t, false)
		if !strings.Contains(out, want) {
			return fmt.Errorf("no %q in the task's stdout", want)
		}
		return nil
	}), must.Func(func() string {
		a, _ := getAlloc(j.allocID)
		return fmt.Sprintf("the task's stdout never contained %q; it holds:\n%s\nstderr:\n%s\ntask: %s",
			want, out, j.logs(t, true), j.taskStateOf(a))
	}))
	return out
}

// eventsWith are the task's events whose text contains s.
func eventsWith(ts *taskState, s string) []string {
	if ts == nil {
		return nil
	}
	var out []string
	for _, e := range ts.Events {
		if txt := e.text(); strings.Contains(txt, s) {
			out = append(out, txt)
		}
	}
	return out
}

// inboundSignal is the file the test writes into the allocation directory
// once the task's mapped port has answered; the task's egress probes wait for
// it, so that they run once the group network is surely up.
const inboundSignal = "inbound-ok"

// bridgeScript serves marker over HTTP on 8080 and prints its resolv.conf.
// In the background it waits for the test's signal, then probes each target
// ("ip port") with nc and prints "probe IP:PORT connected: <answer>" or
// "probe IP:PORT failed: <error>", then "probes done". If retryFirst is set,
// the first target is tried until it connects (at most 20 times), so that a
// slow start does not count as a denial.
func bridgeScript(marker string, retryFirst bool, targets ...string) string {
	var b strings.Builder
	fmt.Fprintf(&b, `mkdir -p /tmp/www
echo %s > /tmp/www/index.html
sed 's/^/resolv: /' /etc/resolv.conf
probe() {
  if out=$(nc -w 3 $1 $2 </dev/null 2>&1); then
    echo "probe $1:$2 connected: $out"
    return 0
  fi
  echo "probe $1:$2 failed: $out"
  return 1
}
(
  i=0
  while [ ! -e /alloc/%s ] && [ $i -lt 90 ]; do i=$((i+1)); sleep 1; done
  [ -e /alloc/%s ] || echo "no signal from the test: probing anyway"
`, marker, inboundSignal, inboundSignal)
	for i, tgt := range targets {
		if i == 0 && retryFirst {
			fmt.Fprintf(&b, `  n=0
  until res=$(probe %s) || [ $n -ge 20 ]; do n=$((n+1)); sleep 1; done
  echo "$res"
`, tgt)
			continue
		}
		fmt.Fprintf(&b, "  probe %s\n", tgt)
	}
	b.WriteString(`  echo probes done
) &
exec httpd -f -p 8080 -h /tmp/www
`)
	return b.String()
}

// A group in bridge mode with a mapped port and a Nomad service check: the
// port answers from the host, the check passes, and the task's egress is
// default deny. With an allowlist, the allowed test host port connects and
// the test host's other port and its second address do not, and the test
// host never sees them; without one, nothing outside is reachable. The
// task's resolver is the driver's DNS service on the bridge's gateway. An
// egress entry outside the plugin's allowed_egress is refused. After each
// job, nothing of its network is left.
func TestNetworkBridge(t *testing.T) {
	defer catchPanic(t)
	th := newTestHost(t)
	suite.withPluginConfig(t, bridgePluginConfig(th)...)

	allowed := netip.AddrPortFrom(th.Addr, testHostPort).String()
	otherPort := netip.AddrPortFrom(th.Addr, testHostOtherPort).String()
	otherHost := netip.AddrPortFrom(th.Other, testHostPort).String()
	for _, tc := range []struct {
		name    string
		egress  []string
		check   string
		allowed string   // must connect
		denied  []string // must not
	}{
		{
			name:    "allowlist",
			egress:  []string{allowed},
			check:   "http",
			allowed: allowed,
			denied:  []string{otherPort, otherHost},
		},
		{
			name:   "no egress",
			check:  "tcp",
			denied: []string{allowed, otherPort, otherHost},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			defer catchPanic(t)
			th.ResetHits()
			marker := "bridge-ok-" + randHex(4)
			var targets []string
			if tc.allowed != "" {
				targets = append(targets, tc.allowed)
			}
			targets = append(targets, tc.denied...)
			var args []string
			for _, tgt := range targets {
				args = append(args, strings.Replace(tgt, ":", " ", 1))
			}
			j := runNetJob(t, &netJob{
				Type:      "service",
				Network:   []string{`mode = "bridge"`, `port "http" {`, `  to = 8080`, `}`},
				Service:   "e2e-bridge-" + randHex(3),
				CheckType: tc.check,
				Script:    bridgeScript(marker, tc.allowed != "", args...),
				Egress:    tc.egress,
			})
			j.waitRunning(t)

			// Inbound: the mapped port on the client's address, then
			// Nomad's own check of it.
			addr, to := mappedAddr(t, j, "http")
			must.Eq(t, 8080, to)
			t.Logf("port http: %s -> 8080", addr)
			waitHTTP(t, addr, marker)
			must.NoError(t, os.WriteFile(filepath.Join(j.allocDir(), "alloc", inboundSignal), nil, 0o644))
			waitCheckPassing(t, j)

			// Outbound, as the task saw it and as the test host saw it.
			out := j.waitLog(t, 90*time.Second, "probes done")
			t.Logf("task stdout:\n%s", out)
			must.StrNotContains(t, out, "no signal from the test")
			if tc.allowed != "" {
				must.StrContains(t, out, fmt.Sprintf("probe %s connected: hello ", tc.allowed),
					must.Sprint("the allowlisted destination did not connect"))
				must.Positive(t, th.count(tc.allowed), must.Sprintf("the test host saw no connection on %s: %v", tc.allowed, th.counts()))
			}
			for _, d := range tc.denied {
				must.StrContains(t, out, "probe "+d+" failed", must.Sprintf("no failed probe of %s", d))
				must.StrNotContains(t, out, "probe "+d+" connected", must.Sprintf("%s was reachable", d))
			}
			if len(tc.egress) > 0 {
				must.StrContains(t, out, "resolv: nameserver "+bridgeGateway,
					must.Sprint("the task's resolver is not the DNS service on the bridge gateway"))
			}

			// Denials as task events (README: at most one every 30 s, so
			// the first one may name only some of them).
			var denials []string
			must.Wait(t, wait4(20*time.Second, func() error {
				a, err := getAlloc(j.allocID)
				if err != nil {
					return err
				}
				if denials = eventsWith(j.taskStateOf(a), "Egress denied"); len(denials) == 0 {
					return fmt.Errorf("no Egress denied event")
				}
				return nil
			}), must.Sprint("no \"Egress denied\" task event within 20s of the denied probes"))
			t.Logf("denial events: %q", denials)
			named := false
			for _, d := range tc.denied {
				named = named || strings.Contains(strings.Join(denials, "\n"), d)
			}
			must.True(t, named, must.Sprintf("the Egress denied events name none of %v: %q", tc.denied, denials))
			if tc.allowed != "" {
				re := regexp.MustCompile(regexp.QuoteMeta(tc.allowed) + `\b`)
				must.False(t, re.MatchString(strings.Join(denials, "\n")), must.Sprintf("the allowed %s is reported as denied: %q", tc.allowed, denials))
			}

			// Stop it: the group's network and the sandbox's go with it
			// (purge checks the namespaces, interfaces, nft objects
			// and CNI state of the allocation and its sandbox).
			j.purge(t)
			must.SliceEmpty(t, bridgePorts(suite.bridge), must.Sprintf("interfaces left on the bridge %s", suite.bridge))
			for _, d := range tc.denied {
				must.Eq(t, 0, th.count(d), must.Sprintf("the test host accepted a connection on denied %s: %v", d, th.counts()))
			}
			for k := range th.counts() {
				if k != tc.allowed {
					t.Errorf("the test host accepted a connection on %s, which no probe may reach: %v", k, th.counts())
				}
			}
		})
	}

	t.Run("egress outside allowed_egress", func(t *testing.T) {
		defer catchPanic(t)
		const outside = "10.93.0.1:80"
		marker := "must-not-run-" + randHex(4)
		j := runNetJob(t, &netJob{
			Type:    "batch",
			Network: []string{`mode = "bridge"`, `port "http" {`, `  to = 8080`, `}`},
			Script:  "echo " + marker,
			Egress:  []string{outside},
		})
		a, ts := j.waitDone(t)
		must.Eq(t, "failed", a.ClientStatus, must.Sprintf("task: %s", ts))
		must.SliceNotEmpty(t, eventsWith(ts, "allowed_egress"), must.Sprintf("no event names allowed_egress; task: %s", ts))
		must.StrNotContains(t, j.logs(t, false), marker)
	})
}

// A group network in host mode that asks for ports is refused while the
// plugin's allow_host_network is false (the suite's default); host mode
// without ports is not.
func TestNetworkHostModeRefused(t *testing.T) {
	defer catchPanic(t)
	for _, tc := range []struct {
		name    string
		network []string
		refused bool
	}{
		{"host mode with a port", []string{`mode = "host"`, `port "http" {}`}, true},
		{"a port and no mode", []string{`port "http" {}`}, true},
		{"host mode without ports", []string{`mode = "host"`}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			defer catchPanic(t)
			t.Parallel()
			marker := "host-mode-ran-" + randHex(4)
			j := runNetJob(t, &netJob{Type: "batch", Network: tc.network, Script: "echo " + marker})
			a, ts := j.waitDone(t)
			refusals := eventsWith(ts, "allow_host_network")
			if tc.refused {
				must.Eq(t, "failed", a.ClientStatus, must.Sprintf("task: %s", ts))
				must.SliceNotEmpty(t, refusals, must.Sprintf("no event names allow_host_network; task: %s", ts))
				must.StrNotContains(t, j.logs(t, false), marker)
				t.Logf("refused: %q", refusals)
				return
			}
			must.Eq(t, "complete", a.ClientStatus, must.Sprintf("task: %s\nstderr: %s", ts, j.logs(t, true)))
			must.SliceEmpty(t, refusals, must.Sprintf("task: %s", ts))
			must.StrContains(t, j.logs(t, false), marker)
		})
	}
}

// With allow_host_network, a host-mode group with a port is not refused.
func TestNetworkHostModeAllowed(t *testing.T) {
	defer catchPanic(t)
	suite.withPluginConfig(t, append(append([]string{}, suitePluginConfig...), "allow_host_network = true")...)
	marker := "host-mode-ran-" + randHex(4)
	j := runNetJob(t, &netJob{Type: "batch", Network: []string{`port "http" {}`}, Script: "echo " + marker})
	a, ts := j.waitDone(t)
	must.Eq(t, "complete", a.ClientStatus, must.Sprintf("task: %s\nstderr: %s", ts, j.logs(t, true)))
	must.SliceEmpty(t, eventsWith(ts, "allow_host_network"), must.Sprintf("task: %s", ts))
	must.StrContains(t, j.logs(t, false), marker)
}

// A job with no network block and no egress, or with a group network in
// mode "none", has loopback only.
func TestNetworkLoopbackOnly(t *testing.T) {
	defer catchPanic(t)
	for _, tc := range []struct {
		name    string
		network []string
	}{
		{"no network block", nil},
		{"mode none", []string{`mode = "none"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			defer catchPanic(t)
			t.Parallel()
			j := runNetJob(t, &netJob{Type: "batch", Network: tc.network, Script: "cat /proc/net/dev; echo ---; ip -o link"})
			a, ts := j.waitDone(t)
			out := j.logs(t, false)
			must.Eq(t, "complete", a.ClientStatus, must.Sprintf("task: %s\nstdout:\n%s\nstderr:\n%s", ts, out, j.logs(t, true)))
			dev, link, ok := strings.Cut(out, "---\n")
			must.True(t, ok, must.Sprintf("stdout:\n%s", out))

			var devs []string
			for _, l := range strings.Split(dev, "\n") {
				if name, _, ok := strings.Cut(l, ":"); ok && !strings.Contains(name, "|") {
					devs = append(devs, strings.TrimSpace(name))
				}
			}
			var links []string
			for _, l := range strings.Split(link, "\n") {
				if f := strings.Fields(l); len(f) >= 2 {
					name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
					links = append(links, name)
				}
			}
			sort.Strings(devs)
			sort.Strings(links)
			must.Eq(t, []string{"lo"}, devs, must.Sprintf("/proc/net/dev:\n%s", dev))
			must.Eq(t, []string{"lo"}, links, must.Sprintf("ip -o link:\n%s", link))
			if tc.network != nil {
				removeNomadNoneNetns(t, j.allocID)
			}
		})
	}
}

// removeNomadNoneNetns deals with a Nomad 1.6.3 leftover: for a group in
// network mode "none", the client's network hook fails to unmount the
// allocation's namespace when the allocation ends ("postrun failed: hook
// \"network\" failed: failed to unmount NS: at /var/run/netns/<alloc>:
// device or resource busy"; umount without MNT_DETACH, not retried), and the
// namespace stays. Seen with raw_exec as well as with this driver, so it is
// Nomad's; the test logs it and removes the namespace, so that the job's
// leftover check looks at what the driver left.
func removeNomadNoneNetns(t *testing.T, allocID string) {
	t.Helper()
	var failed string
	err := wait4(30*time.Second, func() error {
		if !netnsExists(allocID) {
			return nil
		}
		if failed = suite.agentLogLines("failed to unmount NS", allocID); failed != "" {
			return nil
		}
		return fmt.Errorf("namespace %s still there, and Nomad reported no failure to remove it", allocID)
	}).Run()
	must.NoError(t, err)
	if failed == "" {
		return
	}
	t.Logf("KNOWN NOMAD ISSUE (not failing the test): the client left the namespace of allocation %s:\n%s", allocID, failed)
	out, err := exec.Command("ip", "netns", "delete", allocID).CombinedOutput()
	must.NoError(t, err, must.Sprintf("ip netns delete %s: %s", allocID, out))
}
