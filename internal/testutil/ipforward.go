package testutil

// IPv4 forwarding is one switch for the whole machine, which the test hosts
// of packages run in parallel (and the drivers under test) share. A test
// host turns it on while it exists; the last one to go puts back the value
// the first one found, so that no package turns it off under another's
// host. A lock file serialises this across test processes, and also holds
// the value found.

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

const (
	ipForwardPath = "/proc/sys/net/ipv4/ip_forward"
	netHostLock   = "/run/lock/nomad-sandbox-test-nethost"
)

// withNetHostLock runs fn holding the test hosts' lock.
func withNetHostLock(t testing.TB, fn func()) {
	t.Helper()
	f, err := lockNetHosts()
	if err != nil {
		t.Fatal(err)
	}
	defer unlockNetHosts(f)
	fn()
}

func lockNetHosts() (*os.File, error) {
	f, err := os.OpenFile(netHostLock, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("test host lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("test host lock: %w", err)
	}
	return f, nil
}

func unlockNetHosts(f *os.File) {
	_ = unix.Flock(int(f.Fd()), unix.LOCK_UN)
	f.Close()
}

// netHostsAlive reports whether a test host of any test process exists
// (a killed run's leftover counts too: reset-host removes those).
func netHostsAlive() bool {
	m, _ := filepath.Glob(netnsPath(netHostPrefix + "test-*"))
	return len(m) > 0
}

// ipForward, called with the lock held before the host is claimed, turns
// IPv4 forwarding on for the rest of the test, as a test host routed
// through this machine needs (a fresh machine has it off, and the driver
// turns it on only with its first sandbox network). The first host saves
// the value it found in the lock file; when the test ends, the last host
// puts that value back.
func ipForward(t testing.TB) {
	t.Helper()
	b, err := os.ReadFile(ipForwardPath)
	if err != nil {
		t.Fatalf("read %s: %v", ipForwardPath, err)
	}
	// The first host saves what it found; so does a later one if nothing
	// was saved (the file is new while an older run's host exists).
	if saved, _ := os.ReadFile(netHostLock); !netHostsAlive() || forwardValue(saved) == "" {
		if err := os.WriteFile(netHostLock, b, 0o600); err != nil {
			t.Fatalf("save %s: %v", ipForwardPath, err)
		}
	}
	if err := os.WriteFile(ipForwardPath, []byte("1"), 0); err != nil {
		t.Fatalf("enable IPv4 forwarding: %v", err)
	}
	t.Cleanup(func() {
		if err := RestoreIPForward(nil); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
}

// RestoreIPForward puts IPv4 forwarding back to before (the content of
// /proc/sys/net/ipv4/ip_forward read earlier, or nil for the value the first
// test host found), unless a test host of any test process still exists:
// then the last host puts back what the first one found. For the TestMains
// whose drivers turn forwarding on, and for the hosts themselves.
func RestoreIPForward(before []byte) error {
	f, err := lockNetHosts()
	if err != nil {
		return err
	}
	defer unlockNetHosts(f)
	if netHostsAlive() {
		return nil
	}
	if before == nil {
		b, err := os.ReadFile(netHostLock)
		if err != nil {
			return fmt.Errorf("read the saved %s: %w", ipForwardPath, err)
		}
		before = b
	}
	v := forwardValue(before)
	if v == "" {
		return nil // nothing known to put back
	}
	if err := os.WriteFile(ipForwardPath, []byte(v), 0); err != nil {
		return fmt.Errorf("restore %s: %w", ipForwardPath, err)
	}
	return nil
}

// forwardValue is "0" or "1" as b holds it, or "" if it holds neither.
func forwardValue(b []byte) string {
	if v := strings.TrimSpace(string(b)); v == "0" || v == "1" {
		return v
	}
	return ""
}
