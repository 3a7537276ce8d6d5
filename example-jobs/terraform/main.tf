# Sandboxed Nomad jobs managed with Terraform's Nomad provider.
#
#   terraform init
#   terraform apply -var nomad_address=https://nomad.example.com:4646
#
# The clients need the sandbox plugin (see the repository's README) and the
# root filesystem below, under their plugin config's allow_host_rootfs.

terraform {
  required_providers {
    nomad = {
      source  = "hashicorp/nomad"
      version = "~> 2.0"
    }
  }
}

variable "nomad_address" {
  description = "Nomad's HTTP API."
  type        = string
  default     = "http://127.0.0.1:4646"
}

variable "rootfs" {
  description = "Root filesystem of the nightly job's task: a directory under the sandbox plugin's allow_host_rootfs on every client."
  type        = string
  default     = "/var/lib/nomad-sandbox/rootfs/busybox"
}

provider "nomad" {
  address = var.nomad_address
}

# An inline jobspec is a Terraform template: Terraform fills in ${var.rootfs}
# before Nomad sees the job. Nomad's own runtime variables are escaped as
# $${NOMAD_...}: Terraform turns them into ${NOMAD_...}, which the Nomad
# client fills in when it starts the task.
resource "nomad_job" "nightly_audit" {
  jobspec = <<-EOT
    job "nightly-audit" {
      type        = "batch"
      datacenters = ["*"]

      periodic {
        crons            = ["0 3 * * *"]
        time_zone        = "UTC"
        prohibit_overlap = true
      }

      group "audit" {
        restart {
          attempts = 0
          mode     = "fail"
        }

        reschedule {
          attempts  = 0
          unlimited = false
        }

        task "audit" {
          driver = "sandbox"

          config {
            rootfs  = "${var.rootfs}"
            command = "/bin/sh"
            args = [
              "-c",
              "echo nightly audit: job $${NOMAD_JOB_ID}, allocation $${NOMAD_ALLOC_ID}; date -u > /alloc/data/last-run",
            ]
            timeout    = "10m"
            pids_limit = 256
          }

          resources {
            cpu    = 200
            memory = 128
          }
        }
      }
    }
  EOT

  purge_on_destroy = true
}

# A jobspec read with file() is not a Terraform template: write it exactly
# as for `nomad job run`. This registers the CI job that pipelines dispatch
# with sandbox-dispatch (docs-dispatch.md).
resource "nomad_job" "ci_dispatch" {
  jobspec = file("${path.module}/../ci-dispatch.nomad.hcl")

  purge_on_destroy = true
}
