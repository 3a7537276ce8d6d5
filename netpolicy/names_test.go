package netpolicy

import (
	"crypto/sha256"
	"encoding/hex"
	"testing"
)

// TestSandboxNames: the names tools look for are <prefix>-<h> for the
// namespace and <prefix><h> for the interface, h the first 10 hex digits of
// the SHA-256 of the sandbox id, with the default prefix when none is set,
// and the manager recognises them as its own.
func TestSandboxNames(t *testing.T) {
	const id = "alloc/task/1234"
	sum := sha256.Sum256([]byte(id))
	h := hex.EncodeToString(sum[:])[:10]
	for _, c := range []struct {
		cfg    Config
		prefix string
	}{{Config{}, DefaultPrefix}, {Config{Prefix: "ab1"}, "ab1"}} {
		ns, hostIf := c.cfg.SandboxNames(id)
		if ns != c.prefix+"-"+h || hostIf != c.prefix+h || len(hostIf) > 15 {
			t.Errorf("%+v: SandboxNames = %q, %q; want %q, %q", c.cfg, ns, hostIf, c.prefix+"-"+h, c.prefix+h)
		}
		d, err := c.cfg.withDefaults()
		if err != nil {
			t.Fatal(err)
		}
		if d.hashOf(hostIf) != h || d.hashOf(ns) != h {
			t.Errorf("%+v: names %q, %q are not recognised as ours", c.cfg, ns, hostIf)
		}
	}
}
