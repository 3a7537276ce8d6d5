package runtime

import (
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
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			global, verb := c.opts.Args("sbx-1")
			must.Eq(t, c.global, global)
			must.Eq(t, []string{"--bundle", "/b", "sbx-1"}, verb)
		})
	}
}
