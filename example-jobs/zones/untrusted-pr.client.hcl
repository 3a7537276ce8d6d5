# Client for the untrusted zone: pull-request validation, package-manager
# hooks, bots. Everything is shut that a job does not strictly need.
# Jobs land here with `node_pool = "untrusted-pr"`.
client {
  enabled   = true
  node_pool = "untrusted-pr"
}

plugin "sandbox" {
  config {
    runsc_path = "/usr/local/bin/runsc"

    # No capabilities, read-only root, no host directories.
    allow_caps            = []
    allow_writable_rootfs = false
    allow_host_rootfs     = []

    # Short runs, few processes, few sandboxes at once.
    default_timeout    = "10m"
    max_timeout        = "30m"
    default_pids_limit = 256
    max_pids_limit     = 512
    max_sandboxes      = 8

    # Tokens as files only; the Task API socket stays closed.
    deny_env_identity = true
    allow_task_api    = false

    audit_log = "/var/log/nomad-sandbox/audit.log"
  }
}
