# A pull-request check steered to the untrusted zone. Its node pool's
# plugin config is its ceiling: asking for more (a capability, a longer
# timeout) fails before anything starts, with an event naming the setting.
job "pr-check" {
  datacenters = ["*"]
  type        = "batch"
  node_pool   = "untrusted-pr"

  group "check" {
    task "test" {
      driver = "sandbox"

      identity {
        file = true
      }

      config {
        rootfs     = "/var/lib/nomad-sandbox/rootfs/busybox"
        command    = "/bin/sh"
        args       = ["-c", "echo running the PR's tests; id"]
        timeout    = "5m"
        pids_limit = 128
      }

      resources {
        cpu    = 500
        memory = 256
      }
    }
  }
}
