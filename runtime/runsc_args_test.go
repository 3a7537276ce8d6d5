package runtime

import (
	"context"
	"testing"

	"github.com/shoenig/test/must"
)

// TestRunOpts_Args: runsc reads --network, --overlay2, --host-uds and
// --net-raw only before the verb, and the bundle and id come after it.
func TestRunOpts_Args(t *testing.T) {
	cases := []struct {
		name   string
		opts   RunOpts
		global []string
	}{
		{"defaults", RunOpts{Bundle: "/b"}, nil},
		{"loopback only", RunOpts{Bundle: "/b", Network: "none", Overlay: "none"},
			[]string{"--network", "none", "--overlay2", "none"}},
		{"group network with raw sockets", RunOpts{Bundle: "/b", Network: "sandbox", NetRaw: true},
			[]string{"--network", "sandbox", "--net-raw"}},
		{"host network, task API", RunOpts{Bundle: "/b", Network: "host", HostUDS: "open"},
			[]string{"--network", "host", "--host-uds", "open"}},
		{"logs and trail", RunOpts{Bundle: "/b", LogFile: "/s/runsc.log", PanicLog: "/s/panic.log", PodInitConfig: "/s/trace.json"},
			[]string{"--log", "/s/runsc.log", "--log-format", "text", "--panic-log", "/s/panic.log", "--pod-init-config", "/s/trace.json"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			global, verb := c.opts.args("sbx-1")
			must.Eq(t, c.global, global)
			must.Eq(t, []string{"--detach", "--bundle", "/b", "sbx-1"}, verb)
		})
	}
	_, verb := RunOpts{Bundle: "/b", PidFile: "/s/sandbox.pid"}.args("sbx-1")
	must.Eq(t, []string{"--detach", "--pid-file", "/s/sandbox.pid", "--bundle", "/b", "sbx-1"}, verb)
}

// Every runsc call has runsc's global flags first, a verb's global-position
// flags next, then the verb, and nothing of the caller's environment.
func TestRunsc_Command(t *testing.T) {
	t.Setenv("SANDBOX_SECRET", "x")
	r := &Runsc{Path: "/bin/runsc", Root: "/run/r", Platform: PlatformSystrap}
	global, verb := RunOpts{Bundle: "/b", Network: "none", PidFile: "/s/p"}.args("sbx-1")
	cmd := r.command(context.Background(), global, "run", verb)
	must.Eq(t, []string{"/bin/runsc", "--root", "/run/r", "--platform", "systrap", "--network", "none", "run", "--detach", "--pid-file", "/s/p", "--bundle", "/b", "sbx-1"}, cmd.Args)
	must.Eq(t, runscEnv(), cmd.Env)

	cmd = r.command(context.Background(), nil, "--version", nil)
	must.Eq(t, []string{"/bin/runsc", "--root", "/run/r", "--platform", "systrap", "--version"}, cmd.Args)
	must.Eq(t, runscEnv(), cmd.Env)
}
