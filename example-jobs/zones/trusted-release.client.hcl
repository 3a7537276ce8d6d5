# Client for the trusted zone: release tooling that signs and publishes.
# Still sandboxed; the ceiling is higher and explicit.
# Jobs land here with `node_pool = "trusted-release"`.
client {
  enabled   = true
  node_pool = "trusted-release"
}

plugin "sandbox" {
  config {
    runsc_path = "/usr/local/bin/runsc"

    # Release jobs may bind low ports and use a writable (in-memory) root.
    allow_caps            = ["NET_BIND_SERVICE"]
    allow_writable_rootfs = true
    allow_host_rootfs     = ["/var/lib/nomad-sandbox/rootfs"]

    default_timeout = "1h"
    max_timeout     = "4h"
    max_pids_limit  = 4096

    # Release tooling may talk to Nomad's Task API (e.g. to read variables).
    deny_env_identity = true
    allow_task_api    = true

    audit_log = "/var/log/nomad-sandbox/audit.log"
  }
}
