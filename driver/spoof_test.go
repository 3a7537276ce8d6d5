package driver

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/shoenig/test/must"
	"github.com/shoenig/test/wait"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil"
)

// TestDriver_EgressSpoofing: a task with raw sockets (cap_add net_raw, which
// the node allows, hence runsc --net-raw) writes its own IPv4 headers. A
// datagram with its own source address reaches the allowlisted server (the
// control: raw sockets work and the server would see one); the same with
// another source address is sent by gVisor, stopped by the host-side
// filter, counted as spoofed, and never reaches the server.
func TestDriver_EgressSpoofing(t *testing.T) {
	ee := newEgressEnv(t, nil, []string{"0.0.0.0/0/udp"}, nil)
	ee.config.AllowCaps = []string{"CAP_NET_RAW"}
	ee.driver.Shutdown()
	ee.driver = ee.newDriver()
	h := ee.host
	own := netip.AddrPortFrom(h.Addr, egUDP)
	spoofed := netip.AddrPortFrom(h.Extra, egUDP)
	p := h.Pool.Addr().As4()
	other := netip.AddrFrom4([4]byte{p[0], p[1], p[2], 250}) // in the pool, not the sandbox's

	probes := []probe{
		{"own-source", "/local/egress-probe spoof $SELF " + own.String()},
		{"spoofed-source", fmt.Sprintf("/local/egress-probe spoof %s %s", other, spoofed)},
	}
	script := "export SELF=$(ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1); echo self=$SELF\n" + probeScript("", probes)
	cfg, cleanup := ee.task(t, "spoof", readonlyDefault(TaskConfig{
		Command: "/bin/sh", Args: []string{"-c", script},
		CapAdd:  []string{"net_raw"},
		Egress:  []string{own.String() + "/udp", spoofed.String() + "/udp"},
		Timeout: "60s",
	}))
	defer cleanup()
	installEgressProbe(t, cfg)
	defer ee.startProbing(t, cfg)()
	_, res := probeResults(t, cfg, probes)
	must.True(t, res["own-source"].ok(), must.Sprintf("raw socket with the own address: %+v", res["own-source"]))
	must.True(t, res["spoofed-source"].ok(), must.Sprintf("gVisor did not send the spoofed datagram: %+v", res["spoofed-source"]))

	// The control arrived, so a spoofed datagram that got through would
	// have been seen too.
	must.Wait(t, wait.InitialSuccess(wait.BoolFunc(func() bool { return len(h.Hits(ee.fromPool("udp", own))) > 0 }), wait.Timeout(egDeadline)),
		must.Sprint("the datagram with the sandbox's own source never reached the server"))
	c, err := ee.driver.net.Counters(sandboxID(cfg))
	must.NoError(t, err)
	must.Positive(t, c.Spoofed, must.Sprint("the filter counted no spoofed packet"))
	must.SliceEmpty(t, h.Hits(func(x testutil.Hit) bool { return x.Proto == "udp" && x.Local == spoofed }),
		must.Sprint("the spoofed datagram reached the server"))
	ee.finish(t, cfg)
}
