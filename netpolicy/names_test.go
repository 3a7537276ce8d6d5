package netpolicy

import (
	"strings"
	"testing"
)

// TestSandboxNames: the names tools look for are the ones Create and
// Attach use, with the defaults applied and the interface within IFNAMSIZ.
func TestSandboxNames(t *testing.T) {
	for _, c := range []Config{{}, {Prefix: "ab1"}} {
		ns, hostIf := c.SandboxNames("alloc/task/1234")
		d, err := c.withDefaults()
		if err != nil {
			t.Fatal(err)
		}
		n := d.names("alloc/task/1234")
		if ns != n.netns || hostIf != n.base || !strings.HasPrefix(hostIf, d.Prefix) || len(hostIf) > 15 {
			t.Errorf("%+v: SandboxNames = %q, %q; want %q, %q", c, ns, hostIf, n.netns, n.base)
		}
		if d.hashOf(hostIf) == "" || d.hashOf(ns) == "" {
			t.Errorf("%+v: names %q, %q are not recognised as ours", c, ns, hostIf)
		}
	}
	if ns, _ := (Config{}).SandboxNames("x"); !strings.HasPrefix(ns, DefaultPrefix+"-") {
		t.Errorf("default namespace name %q", ns)
	}
}
