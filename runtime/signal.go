package runtime

import (
	"os/signal"
	"syscall"
)

func signalIgnore() {
	signal.Ignore(syscall.SIGPIPE, syscall.SIGHUP, syscall.SIGINT, syscall.SIGTERM)
}
