package driver

import (
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/shoenig/test/must"
)

// TestDriver_EgressSandbox starts a sandbox with an allowlist: it gets its
// own namespace and address, its resolver is its own DNS service, a name
// outside the allowlist is refused, and nothing of the network outlives it.
func TestDriver_EgressSandbox(t *testing.T) {
	e := newTestEnv(t, func(pc *PluginConfig) {
		pc.AllowedEgress = []string{"10.198.0.0/16", "*.allowed.test:443"}
		pc.DNSServers = []string{"127.0.0.1:1"} // never reached in this test
	})
	script := `
grep nameserver /etc/resolv.conf
ip -4 addr show eth0 | grep inet
nslookup secret.exfil.test 2>&1 | tail -2
echo done
`
	cfg, cleanup := e.task(t, "egress", readonlyDefault(TaskConfig{Command: "/bin/sh", Args: []string{"-c", script}, Egress: []string{"10.198.0.1:8080", "*.allowed.test:443"}}))
	defer cleanup()
	res := e.run(cfg)
	must.Eq(t, 0, res.ExitCode, must.Sprint(readLog(cfg, "stderr")))
	out := waitLog(t, cfg, "stdout", has("done"))
	t.Logf("inside the sandbox:\n%s", out)
	must.StrContains(t, out, "inet 10.89.")
	must.StrContains(t, out, "nameserver 10.89.")
	must.StrContains(t, out, "REFUSED", must.Sprint("a name outside the allowlist is refused by the sandbox's DNS service"))
	must.StrNotContains(t, strings.ToLower(out), "address: ")

	// Everything of the network is gone with the sandbox.
	out2, err := exec.Command("ip", "netns", "list").CombinedOutput()
	must.NoError(t, err)
	must.StrNotContains(t, string(out2), e.netPrefix+"-")
	links, err := exec.Command("ip", "-o", "link").CombinedOutput()
	must.NoError(t, err)
	must.StrNotContains(t, string(links), e.netPrefix)
	leases, _ := os.ReadDir(e.base + "/netpolicy/leases")
	must.SliceEmpty(t, leases)
}

func TestDriver_EgressRefusedBeyondCeiling(t *testing.T) {
	e := newTestEnv(t, func(pc *PluginConfig) { pc.AllowedEgress = []string{"10.198.0.0/16:443"} })
	cfg, cleanup := e.taskWithLogs(t, "beyond", readonlyDefault(TaskConfig{Command: "/bin/true", Egress: []string{"10.199.0.1:443"}}), false)
	defer cleanup()
	_, _, err := e.harness.StartTask(cfg)
	must.Error(t, err)
	must.StrContains(t, err.Error(), "allowed_egress")

	none := newTestEnv(t, nil)
	cfg2, cleanup2 := none.taskWithLogs(t, "noegress", readonlyDefault(TaskConfig{Command: "/bin/true", Egress: []string{"10.198.0.1:443"}}), false)
	defer cleanup2()
	_, _, err = none.harness.StartTask(cfg2)
	must.Error(t, err)
	must.StrContains(t, err.Error(), "this node allows no egress")
}
