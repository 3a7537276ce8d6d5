// Package netnsrun runs code inside another network namespace: the one way
// into a namespace for the driver and its tests.
//
// A namespace belongs to an OS thread, not to a goroutine, so the code runs
// on a goroutine of its own, locked to its thread: the caller's thread never
// changes namespace, and sockets the code opens stay in the namespace it ran
// in. If the thread cannot go back to its namespace it stays locked, and Go
// ends it with the goroutine instead of running other code in the wrong
// namespace.
package netnsrun

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// In runs fn inside the network namespace mounted (or linked, as
// /proc/<pid>/ns/net) at path.
func In(path string, fn func() error) error {
	target, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open netns: %w", err)
	}
	defer target.Close()
	return run("netns "+path, func() error { return unix.Setns(int(target.Fd()), unix.CLONE_NEWNET) }, fn)
}

// InNew runs fn inside a new network namespace; fn can bind-mount
// /proc/thread-self/ns/net to keep it.
func InNew(fn func() error) error {
	return run("a new netns", func() error { return unix.Unshare(unix.CLONE_NEWNET) }, fn)
}

// run locks a new goroutine to its thread, moves the thread with enter,
// runs fn, and moves the thread back.
func run(what string, enter, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open own netns: %w", err)
			return
		}
		defer orig.Close()
		if err := enter(); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter %s: %w", what, err)
			return
		}
		err = fn()
		if serr := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); serr != nil {
			// The thread stays locked and ends with this goroutine.
			errc <- errors.Join(err, fmt.Errorf("leave %s: %w", what, serr))
			return
		}
		runtime.UnlockOSThread()
		errc <- err
	}()
	return <-errc
}
