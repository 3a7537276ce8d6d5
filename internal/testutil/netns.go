package testutil

import (
	"errors"
	"fmt"
	"os"
	goruntime "runtime"

	"golang.org/x/sys/unix"
)

// InNetns runs fn on an OS thread that has joined the network namespace
// mounted at path; the sockets fn opens stay in that namespace after it
// returns. It is the tests' one way into a namespace.
//
// fn runs on a goroutine of its own, so that the caller's thread never
// changes namespace: if the thread cannot go back, it stays locked and
// ends with that goroutine instead of running other code in the wrong
// namespace.
func InNetns(path string, fn func() error) error {
	target, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open netns: %w", err)
	}
	defer target.Close()
	errc := make(chan error, 1)
	go func() {
		goruntime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			goruntime.UnlockOSThread()
			errc <- fmt.Errorf("open own netns: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			goruntime.UnlockOSThread()
			errc <- fmt.Errorf("enter netns %s: %w", path, err)
			return
		}
		err = fn()
		if serr := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); serr != nil {
			errc <- errors.Join(err, fmt.Errorf("leave netns %s: %w", path, serr))
			return
		}
		goruntime.UnlockOSThread()
		errc <- err
	}()
	return <-errc
}
