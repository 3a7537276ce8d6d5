package runtime

import (
	"os/signal"
	goruntime "runtime"
	"syscall"
)

func signalIgnore() {
	signal.Ignore(syscall.SIGPIPE, syscall.SIGHUP, syscall.SIGINT, syscall.SIGTERM)
}

// runtimeKeepAlive keeps v reachable up to this call.
func runtimeKeepAlive(v any) { goruntime.KeepAlive(v) }
