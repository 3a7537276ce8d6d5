// Package netpolicy will hold the per-allocation network namespaces and the
// host-side egress filter. Until it does, every sandbox runs with
// `runsc --network=none` and has loopback only.
package netpolicy
