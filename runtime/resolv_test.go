package runtime

import (
	"testing"

	"github.com/shoenig/test/must"
)

// The nameserver lines of a resolv.conf, with comments, other keywords and
// unusable addresses passed over.
func TestNameservers(t *testing.T) {
	conf := `# generated
search example.test
nameserver 10.0.0.2
nameserver   fd00::53
nameserver
nameserver dns.example.test
 nameserver 10.0.0.3 # trailing
options ndots:2
`
	must.Eq(t, []string{"10.0.0.2", "fd00::53", "10.0.0.3"}, Nameservers([]byte(conf)))
	must.Nil(t, Nameservers(nil))
}

// What ResolvConf writes, Nameservers reads back.
func TestResolvConf_RoundTrip(t *testing.T) {
	b := ResolvConf([]string{"10.89.0.1"}, []string{"svc.test"}, []string{"ndots:1"})
	must.Eq(t, "nameserver 10.89.0.1\nsearch svc.test\noptions ndots:1\n", string(b))
	must.Eq(t, []string{"10.89.0.1"}, Nameservers(b))
}
