//go:build tools

// Package tools pins the Nomad agent that the demo and the e2e tests run.
package tools

import _ "github.com/hashicorp/nomad"
