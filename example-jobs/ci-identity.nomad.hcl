# A CI job that reads its Nomad workload identity and prepares the exchange
# of that token for cloud credentials (the OIDC federation pattern: a cloud
# STS trusts Nomad's JWKS at /.well-known/jwks.json and swaps the JWT for a
# short-lived credential scoped to this job).
#
# The token arrives as a file, never in the environment: with the plugin's
# deny_env_identity = true, a job asking for `env = true` is refused.
job "ci-identity" {
  datacenters = ["*"]
  type        = "batch"

  group "ci" {
    task "exchange" {
      driver = "sandbox"

      identity {
        file = true
      }

      config {
        rootfs  = "/var/lib/nomad-sandbox/rootfs/busybox"
        command = "/bin/sh"
        args = ["-c", <<-EOT
          set -eu
          token=$(cat /secrets/nomad_token)
          # The JWT's middle part holds the claims: job, task, allocation.
          payload=$(echo "$token" | cut -d. -f2 | tr '_-' '/+')
          # (No shell brace expansions here: Nomad would interpolate them.)
          while [ $(( $(printf %s "$payload" | wc -c) % 4 )) -ne 0 ]; do payload="$payload="; done
          echo "claims: $(echo "$payload" | base64 -d)"
          # The exchange itself, once the node's egress allowlist lets the
          # sandbox reach the STS (e.g. sts.example.com:443):
          #   wget -q -O /alloc/data/creds.json \
          #     --post-data "grant_type=urn:ietf:params:oauth:grant-type:token-exchange&subject_token=$token&subject_token_type=urn:ietf:params:oauth:token-type:jwt" \
          #     https://sts.example.com/v1/token
          echo "token is $(printf %s "$token" | wc -c) bytes; never printed, never in env"
        EOT
        ]
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
