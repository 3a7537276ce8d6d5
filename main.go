// Command sandbox is a Nomad task driver plugin that runs each task in a
// gVisor sandbox.
package main

import (
	"os"
	"os/signal"
	"syscall"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/plugins"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/driver"
	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/runtime"
)

func main() {
	// The same binary supervises each task, outliving the plugin process.
	if len(os.Args) > 1 && os.Args[1] == runtime.SupervisorArg {
		os.Exit(runtime.SupervisorMain(os.Args[2:]))
	}
	// Log rotation tools send SIGHUP; the audit log is opened per record,
	// so there is nothing to reopen, and the plugin must not die of it.
	signal.Ignore(syscall.SIGHUP)
	// An agent killed without a clean shutdown leaves this process writing
	// its log into a pipe no one reads; a new agent reattaches to it, and
	// the first log line would kill it with SIGPIPE.
	signal.Ignore(syscall.SIGPIPE)
	plugins.Serve(func(log hclog.Logger) interface{} { return driver.NewPlugin(log) })
}
