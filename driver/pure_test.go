package driver

import (
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/nomad/structs"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/shoenig/test/must"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/netpolicy"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

// Root-free tests of the driver's pure functions: they run under
// `make unit` (go test -short) as any user.

func TestMergeEnv(t *testing.T) {
	got := mergeEnv([]string{"A=1", "B=2", "PATH=/bin"}, []string{"B=3", "C=4", "PATH=/usr/bin:/bin", "EMPTY="})
	must.Eq(t, []string{"A=1", "B=3", "PATH=/usr/bin:/bin", "C=4", "EMPTY="}, got)
	must.Eq(t, []string{"A=1"}, mergeEnv([]string{"A=1"}, nil))
	must.Eq(t, []string{"A=2"}, mergeEnv(nil, []string{"A=1", "A=2"}))
}

func TestParseSignal(t *testing.T) {
	for in, want := range map[string]syscall.Signal{
		"SIGTERM": syscall.SIGTERM, "sigterm": syscall.SIGTERM, "TERM": syscall.SIGTERM,
		"kill": syscall.SIGKILL, "SIGHUP": syscall.SIGHUP, "usr1": syscall.SIGUSR1,
	} {
		got, err := parseSignal(in)
		must.NoError(t, err, must.Sprint(in))
		must.Eq(t, want, got, must.Sprint(in))
	}
	for _, bad := range []string{"", "SIG", "SIGBOGUS", "9", "TERM "} {
		_, err := parseSignal(bad)
		must.ErrorContains(t, err, "unknown signal", must.Sprint(bad))
	}
}

func TestSandboxID(t *testing.T) {
	cfg := &drivers.TaskConfig{ID: "0123abcd-4567/web Server/1", AllocID: "0123ABCD-4567-89ab", Name: "Web Server/Ünïcode"}
	id := sandboxID(cfg)
	must.Eq(t, id, sandboxID(cfg), must.Sprint("the same task always gets the same sandbox"))
	must.StrHasPrefix(t, "nomad-0123abcd-web-server--n-code-", id)
	must.RegexMatch(t, regexp.MustCompile(`^nomad-[a-z0-9-]+-[0-9a-f]{8}$`), id)

	other := *cfg
	other.ID = "0123abcd-4567/web Server/2"
	must.NotEq(t, id, sandboxID(&other), must.Sprint("another task ID, another sandbox"))

	long := &drivers.TaskConfig{ID: "x", AllocID: "a", Name: strings.Repeat("n", 100)}
	must.StrContains(t, sandboxID(long), "-"+strings.Repeat("n", 40)+"-")
	must.StrNotContains(t, sandboxID(long), strings.Repeat("n", 41))
	must.StrHasPrefix(t, "nomad-a-task-", sandboxID(&drivers.TaskConfig{ID: "y", AllocID: "a"}))
}

func TestSanitize(t *testing.T) {
	must.Eq(t, "abc-09-x", sanitize("ABC_09/x", 63))
	must.Eq(t, "abc", sanitize("abcdef", 3))
	must.Eq(t, "task", sanitize("", 8))
	must.Eq(t, "-", sanitize("é", 8))
}

func TestExitResult(t *testing.T) {
	ok := exitResult(&runtime.ExitStatus{ExitCode: 3, Signal: 0}, time.Minute)
	must.Eq(t, 3, ok.ExitCode)
	must.NoError(t, ok.Err)
	must.False(t, ok.OOMKilled)

	sig := exitResult(&runtime.ExitStatus{ExitCode: 137, Signal: 9}, time.Minute)
	must.Eq(t, 9, sig.Signal)
	must.NoError(t, sig.Err)

	failed := exitResult(&runtime.ExitStatus{ExitCode: 128, Err: "runsc create: boom"}, time.Minute)
	must.EqError(t, failed.Err, "runsc create: boom")

	timedOut := exitResult(&runtime.ExitStatus{ExitCode: 0, TimedOut: true}, 90*time.Second)
	must.EqError(t, timedOut.Err, "time limit of 1m30s exceeded")
	must.Eq(t, 0, timedOut.ExitCode)

	oom := exitResult(&runtime.ExitStatus{ExitCode: 137, OOMKilled: true}, time.Minute)
	must.True(t, oom.OOMKilled)
	must.ErrorContains(t, oom.Err, "out of memory")
}

func TestNetworkMode(t *testing.T) {
	ports := &structs.AllocatedPorts{{Label: "http", Value: 8080}}
	egress := []netpolicy.Entry{{}}
	cases := []struct {
		name      string
		cfg       drivers.TaskConfig
		egress    []netpolicy.Entry
		allowHost bool
		want      netMode
		err       string
	}{
		{name: "no network block", want: netOwn},
		{name: "no network block, egress", egress: egress, want: netOwn},
		{name: "bridge", cfg: drivers.TaskConfig{NetworkIsolation: &drivers.NetworkIsolationSpec{Mode: drivers.NetIsolationModeGroup, Path: "/var/run/netns/x"}}, want: netGroup},
		{name: "group without a path", cfg: drivers.TaskConfig{NetworkIsolation: &drivers.NetworkIsolationSpec{Mode: drivers.NetIsolationModeGroup}}, err: "no network namespace path"},
		{name: "driver mode", cfg: drivers.TaskConfig{NetworkIsolation: &drivers.NetworkIsolationSpec{Mode: drivers.NetIsolationModeTask}}, err: `network mode "driver" is not supported`},
		{name: "host mode forbidden", cfg: drivers.TaskConfig{NetworkIsolation: &drivers.NetworkIsolationSpec{Mode: drivers.NetIsolationModeHost}}, err: "allow_host_network"},
		{name: "ports forbidden", cfg: drivers.TaskConfig{Resources: &drivers.Resources{Ports: ports}}, err: "ports http (8080)"},
		{name: "dns block forbidden", cfg: drivers.TaskConfig{DNS: &drivers.DNSConfig{}}, err: "a dns block"},
		{name: "host mode allowed", cfg: drivers.TaskConfig{Resources: &drivers.Resources{Ports: ports}}, allowHost: true, want: netHost},
		{name: "host mode with egress", cfg: drivers.TaskConfig{DNS: &drivers.DNSConfig{}}, egress: egress, allowHost: true, err: "egress cannot be enforced"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := New(hclog.NewNullLogger())
			t.Cleanup(d.Shutdown)
			d.config = &Settings{PluginConfig: PluginConfig{AllowHostNetwork: tc.allowHost}}
			got, err := d.networkMode(&tc.cfg, tc.egress)
			if tc.err != "" {
				must.ErrorContains(t, err, tc.err)
				return
			}
			must.NoError(t, err)
			must.Eq(t, tc.want, got)
		})
	}
}
