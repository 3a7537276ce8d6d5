# A batch job that runs one command in a gVisor sandbox and exits.
# Run it with `make demo`, or on a client configured like example-jobs/agent.hcl
# after `make rootfs` has created /var/lib/nomad-sandbox/rootfs/busybox.
job "hello" {
  type        = "batch"
  datacenters = ["*"]

  group "hello" {
    # Fail fast instead of retrying: the demo reports the first outcome.
    restart {
      attempts = 0
      mode     = "fail"
    }

    reschedule {
      attempts  = 0
      unlimited = false
    }

    task "hello" {
      driver = "sandbox"

      config {
        # An absolute rootfs must lie under the plugin's allow_host_rootfs.
        rootfs  = "/var/lib/nomad-sandbox/rootfs/busybox"
        command = "/bin/sh"
        args = [
          "-c",
          "echo hello from $(uname -s) $(uname -r) in a gVisor sandbox; id; cat /proc/self/status | grep CapEff; touch /probe || echo root filesystem is read-only; echo this goes to stderr >&2",
        ]
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
