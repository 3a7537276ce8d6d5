//go:build tools

// Package tools pins the Nomad agent that the demo and the e2e tests run.
// The GNUmakefile builds it with Nomad's `ui` build tag, so that the agent
// serves the web UI at /ui/ (the e2e browser test and `make demo` use it).
package tools

import _ "github.com/hashicorp/nomad"
