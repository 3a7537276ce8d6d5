# Client configuration for a Nomad agent that runs tasks with the sandbox
# driver. Copy bin/plugins/sandbox into plugin_dir and bin/runsc to
# /usr/local/bin/runsc first. `make demo` writes its own variant of this file
# (with this checkout's bin/runsc and temporary state directories).

data_dir   = "/opt/nomad/data"
plugin_dir = "/opt/nomad/plugins"

client {
  enabled = true
  # Debian's containernetworking-plugins, for group networks in bridge mode.
  cni_path = "/usr/lib/cni"
}

# Nomad 1.10 and later load a plugin from plugin_dir only when a block
# named after its file exists; older clients accept it too.
plugin "sandbox" {
  config {
    # runsc binary; a bare name is looked up in PATH. Default "runsc".
    runsc_path = "/usr/local/bin/runsc"

    # runsc's --root state directory. Default "/run/nomad-sandbox/runsc".
    runsc_root = "/run/nomad-sandbox/runsc"

    # Per-task bundles and supervisor state. Default "/run/nomad-sandbox/tasks".
    state_dir = "/run/nomad-sandbox/tasks"

    # gVisor platform: "systrap" (default) or "kvm" (needs /dev/kvm).
    platform = "systrap"

    # Capabilities a job may request with cap_add. Default: none.
    allow_caps = []

    # Whether a job may set readonly_rootfs = false (writes then go to an
    # in-memory overlay). Default false.
    allow_writable_rootfs = false

    # Host directories under which a job's absolute rootfs may live.
    # Default: none (only rootfs paths inside the task directory).
    allow_host_rootfs = ["/var/lib/nomad-sandbox/rootfs"]

    # Processes a task may run at once (RLIMIT_NPROC inside gVisor) when the
    # job sets no pids_limit, and the most a job may ask for.
    default_pids_limit = 1024
    max_pids_limit     = 4096

    # Wall-clock limit for tasks that set no timeout, and the longest a job
    # may ask for. Default: none. With only max_timeout set, it is the default.
    default_timeout = "30m"
    max_timeout     = "2h"

    # Destinations jobs may list in egress (the ceiling); empty: no egress.
    # The sandboxes' DNS service forwards to dns_servers (default: this
    # node's resolv.conf).
    allowed_egress = ["deb.debian.org:443", "*.pypi.org:443"]

    # Group networks in host mode share this node's network with the
    # sandbox; refused unless true. Default false.
    allow_host_network = false

    # Sandboxes this node runs at once; a task beyond it fails at once.
    # Default 0: no limit.
    max_sandboxes = 32
  }
}
