# A web server in a gVisor sandbox on the group's bridge network: Nomad maps
# a host port to the task's port 8080, checks it through a Nomad service, and
# the task may reach one destination outside (default deny for the rest).
#
# The client needs the CNI plugins: Debian's containernetworking-plugins puts
# them in /usr/lib/cni, which example-jobs/agent.hcl names in cni_path (Nomad
# looks in /opt/cni/bin otherwise). The egress entry must lie within the
# plugin's allowed_egress, as it does there.
job "bridge-web" {
  type        = "service"
  datacenters = ["*"]

  group "web" {
    network {
      mode = "bridge"

      port "http" {
        to = 8080
      }
    }

    service {
      provider = "nomad"
      name     = "bridge-web"
      port     = "http"

      check {
        type     = "http"
        path     = "/"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "web" {
      driver = "sandbox"

      config {
        rootfs  = "/var/lib/nomad-sandbox/rootfs/busybox"
        command = "/bin/sh"
        args = [
          "-c",
          "mkdir -p /tmp/www && echo hello from a gVisor sandbox on the bridge > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www",
        ]

        # Default deny; the sandbox's resolver answers only for listed names.
        egress = ["deb.debian.org:443"]
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
