# A CI check that a pipeline dispatches and waits for:
#
#   nomad job run example-jobs/ci-dispatch.nomad.hcl      # once: registers it
#   sandbox-dispatch -job ci-dispatch -meta git_ref=$(git rev-parse HEAD) \
#       -meta repo_url=https://git.example.com/app.git -payload ci.json \
#       -collect out/
#
# sandbox-dispatch (cmd/sandbox-dispatch, see docs-dispatch.md) streams the
# task's stdout and stderr and exits with the task's exit code: 124 when the
# timeout below ends it, 137 when it runs out of memory, 125 when it could not
# start. Every dispatch is a child job of its own (ci-dispatch/dispatch-...),
# so concurrent pipelines never see each other's results.
#
# Runs on the demo setup: the rootfs comes from `make rootfs` and must lie
# under the plugin's allow_host_rootfs (example-jobs/agent.hcl allows
# /var/lib/nomad-sandbox/rootfs).
job "ci-dispatch" {
  type        = "batch"
  datacenters = ["*"]

  parameterized {
    # The pipeline's input (a JSON document, at most 16 KiB): lands in the
    # task's local/ directory, /local/input.json in the sandbox.
    payload = "optional"
    # NOMAD_META_git_ref and NOMAD_META_repo_url in the task's environment.
    meta_required = ["git_ref"]
    meta_optional = ["repo_url"]
  }

  group "ci" {
    # One attempt, one verdict: no restarts, no rescheduling. A CI re-run
    # is the retry.
    restart {
      attempts = 0
      mode     = "fail"
    }

    reschedule {
      attempts  = 0
      unlimited = false
    }

    task "check" {
      driver = "sandbox"

      dispatch_payload {
        file = "input.json"
      }

      config {
        rootfs  = "/var/lib/nomad-sandbox/rootfs/busybox"
        command = "/bin/sh"
        # Default-deny egress: the package mirror is the only destination
        # (through the sandbox's own DNS service; the node's
        # allowed_egress must permit it). Sources come with the payload,
        # an artifact or the rootfs.
        #
        # Shell variables are written $var, without braces: "$${" in a
        # jobspec stands for "${", which the client then reads as an
        # interpolation of its own when it renders the task config (a shell
        # "${var}" would have to be written "$$${var}").
        args = ["-c", <<-EOT
          set -eu
          ref="$NOMAD_META_git_ref"
          repo="$NOMAD_META_repo_url"
          echo "ci: checking $ref in allocation $NOMAD_ALLOC_ID"
          if [ -n "$repo" ]; then echo "ci: repository $repo"; fi
          if [ -s /local/input.json ]; then
            echo "ci: input.json:"
            cat /local/input.json
            echo
          fi
          # The real steps (build, test) go here.
          status=passed
          printf '{"git_ref":"%s","status":"%s"}\n' "$ref" "$status" > /alloc/data/result.json
          echo "ci: $status; result in /alloc/data/result.json"
        EOT
        ]
        # Wall-clock limit for one check. A node refuses a task asking for
        # more than its plugin's max_timeout (exit 125 from sandbox-dispatch,
        # with the event naming the ceiling).
        timeout = "10m"
        egress  = ["deb.debian.org:443"]
      }

      resources {
        cpu    = 500
        memory = 256
      }
    }
  }
}
