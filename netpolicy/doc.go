// Package netpolicy gives a sandbox that has an egress allowlist a network
// of its own, or joins it to its allocation's, and enforces the allowlist
// where the sandbox cannot reach.
//
// Manager.Create makes a network namespace per sandbox (for
// `runsc --network=sandbox`, named in the OCI spec's linux.namespaces) with
// a veth: eth0 inside, with an address from a /30 of Config.Subnet and a
// default route via the host end. The filter is an nftables netdev chain on
// the ingress hook of the host end, policy drop: every frame the sandbox
// sends passes it before the host's stack sees it, and nothing inside the
// sandbox or its namespace can change it (rules inside the namespace would
// not even see gVisor's traffic, which leaves through an AF_PACKET socket).
// It drops frames from another MAC or IPv4 source address, ARP claiming
// another address, all IPv6 and anything neither IPv4 nor ARP; accepts DNS
// to the gateway; drops destinations in the deny list (loopback,
// link-local and the metadata services, multicast, broadcast, the pool, the
// node's own addresses, Config.Deny) even if allowlisted; accepts the IP
// entries of the allowlist and the addresses the DNS service granted
// (Manager.Allow, with a timeout) for host name entries; records everything
// else (Manager.Denials) and drops it. It is installed in one atomic batch
// before the host end comes up, and Create undoes all it did on any error.
//
// Manager.Attach puts the same filter on a namespace someone else made:
// Nomad's, for a group network in bridge mode, whose eth0 is a veth with
// its host end on Nomad's bridge (see attach.go for what differs there:
// frames only to the gateway's MAC, replies from served ports checked
// against conntrack, DNS redirected per sandbox with RedirectDNS, the
// namespace's addresses given back by Destroy).
//
// The DNS service (DNSServer) answers on the gateway, resolves only names
// the allowlist permits, and grants their addresses through Allow before it
// answers.
//
// ParseEgress reads the allowlist entries of a job.
package netpolicy
