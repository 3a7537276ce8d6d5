package runtime

import "fmt"

// Platform is the gVisor platform a sandbox runs on.
type Platform string

const (
	PlatformSystrap Platform = "systrap"
	PlatformKVM     Platform = "kvm"
)

// Set parses s, rejecting anything runsc would not accept here.
func (p *Platform) Set(s string) error {
	switch Platform(s) {
	case PlatformSystrap, PlatformKVM:
		*p = Platform(s)
		return nil
	case "":
		*p = PlatformSystrap
		return nil
	}
	return fmt.Errorf("platform %q is not supported: use \"systrap\" or \"kvm\"", s)
}

func (p Platform) String() string { return string(p) }
