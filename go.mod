module github.com/nomad-driver-sandbox/nomad-driver-sandbox

go 1.26

require (
	github.com/opencontainers/runtime-spec v1.1.0-rc.3
	github.com/shoenig/test v1.7.0
	golang.org/x/sys v0.13.0
)

require github.com/google/go-cmp v0.6.0 // indirect

replace (
	github.com/Microsoft/go-winio => github.com/endocrimes/go-winio v0.4.13-0.20190628114223-fb47a8b41948
	github.com/armon/go-metrics => github.com/armon/go-metrics v0.0.0-20230509193637-d9ca9af9f1f9
	github.com/hashicorp/hcl => github.com/hashicorp/hcl v1.0.1-0.20201016140508-a07e7d50bbee
)
