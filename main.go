// Command sandbox is a Nomad task driver plugin that runs each task in a
// gVisor sandbox.
package main

import (
	"os"

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
	plugins.Serve(func(log hclog.Logger) interface{} { return driver.NewPlugin(log) })
}
