#!/usr/bin/env bash
# demo.sh: run example-jobs/hello.nomad.hcl on a throwaway Nomad dev agent that
# loads the sandbox driver from bin/plugins, print what the task wrote and its
# allocation status, then stop the agent and remove everything it created.
# It prints the allocation's address in Nomad's web UI; with KEEP=1 the agent
# keeps running after the job (so that a person can open that address) until
# interrupted (Ctrl-C), and then cleans up as usual.
# Expects `make deps build rootfs` to have run (`make demo` does that). Needs root.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$repo"

nomad=$repo/bin/nomad
runsc=$repo/bin/runsc
plugins=$repo/bin/plugins
job=$repo/example-jobs/hello.nomad.hcl
job_name=hello
task=hello
rootfs_parent=/var/lib/nomad-sandbox/rootfs

export NOMAD_ADDR=http://127.0.0.1:4646
unset NOMAD_TOKEN NOMAD_NAMESPACE NOMAD_REGION || true

log() { printf '==> %s\n' "$*"; }
die() {
	printf 'demo: %s\n' "$*" >&2
	exit 1
}

[ "$(id -u)" -eq 0 ] || die "must run as root (the driver creates sandboxes and cgroups)"
for f in "$nomad" "$runsc" "$plugins/sandbox"; do
	[ -x "$f" ] || die "$f is missing: run 'make demo' (or 'make deps build')"
done
[ -x "$rootfs_parent/busybox/bin/busybox" ] || die "no rootfs in $rootfs_parent/busybox: run 'make rootfs'"

# Another agent on the port would take our job: refuse rather than use it.
if (exec 3<>/dev/tcp/127.0.0.1/4646) 2>/dev/null; then
	die "something already listens on 127.0.0.1:4646; stop it first"
fi

work=$(mktemp -d /tmp/nomad-sandbox-demo.XXXXXX)
agent_pid=""
agent_log=$work/agent.log
runsc_root=$work/runsc

# Unmount whatever the agent left mounted under $work, deepest first, so that
# removing the directory never reaches through a mount into host files.
unmount_under() {
	local base=$1 mp
	awk -v base="$base" '$5 == base || index($5, base "/") == 1 { print $5 }' /proc/self/mountinfo |
		sort -r | while IFS= read -r mp; do
		umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || true
	done
}

# diagnose prints where a failed run says why: the task's events as Nomad
# recorded them, and, for each sandbox, runsc's log and the supervisor's.
diagnose() {
	local f
	if [ -n "${alloc_id:-}" ] && [ -n "$agent_pid" ] && kill -0 "$agent_pid" 2>/dev/null; then
		echo "demo: the task's events (nomad alloc status $alloc_id):"
		"$nomad" alloc status -t "{{with index .TaskStates \"$task\"}}{{range .Events}}{{.Type}}: {{.DisplayMessage}}{{\"\\n\"}}{{end}}{{end}}" "$alloc_id" 2>&1 || true
	fi
	for f in "$work"/tasks/*/runsc.log "$work"/tasks/*/supervisor.log; do
		[ -s "$f" ] || continue
		echo "demo: last lines of $f:"
		tail -n 20 "$f"
	done
}

cleanup() {
	local rc=$? id i
	trap - EXIT INT TERM
	if [ "$rc" -ne 0 ] && [ -s "$agent_log" ]; then
		echo "demo: failed; last lines of the agent log ($agent_log):" >&2
		grep -v "http: request complete" "$agent_log" | tail -n 30 >&2 || true
	fi
	if [ "$rc" -ne 0 ]; then
		diagnose >&2 || true
	fi
	if [ -n "$agent_pid" ] && kill -0 "$agent_pid" 2>/dev/null; then
		log "stopping the agent"
		kill -TERM "$agent_pid" 2>/dev/null || true
		for i in $(seq 1 60); do
			kill -0 "$agent_pid" 2>/dev/null || break
			sleep 0.5
		done
		if kill -0 "$agent_pid" 2>/dev/null; then
			echo "demo: agent did not stop in 30s, killing it" >&2
			kill -KILL "$agent_pid" 2>/dev/null || true
		fi
		wait "$agent_pid" 2>/dev/null || true
	fi
	# The demo's sandboxes live in their own runsc root: remove any left over.
	if [ -d "$runsc_root" ]; then
		for id in $("$runsc" --root "$runsc_root" list -quiet 2>/dev/null); do
			echo "demo: removing leftover sandbox $id" >&2
			"$runsc" --root "$runsc_root" kill "$id" KILL 2>/dev/null || true
			"$runsc" --root "$runsc_root" delete -force "$id" 2>/dev/null || true
		done
	fi
	# Task supervisors outlive the agent on purpose and ignore SIGTERM; once
	# their sandbox is gone they end by themselves. Kill any that did not.
	if [ -d "$work/tasks" ]; then
		sleep 1
		while IFS= read -r pidfile; do
			local pid
			pid=$(cat "$pidfile" 2>/dev/null) || continue
			case "$pid" in '' | *[!0-9]*) continue ;; esac
			if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF " supervise $work/tasks"; then
				echo "demo: killing leftover supervisor $pid" >&2
				kill -KILL "$pid" 2>/dev/null || true
			fi
		done < <(find "$work/tasks" -name supervisor.pid 2>/dev/null)
	fi
	unmount_under "$work"
	rm -rf --one-file-system "$work" || echo "demo: could not remove all of $work" >&2
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The agent config: the same plugin block as example-jobs/agent.hcl, with this
# checkout's runsc and the demo's own state directories.
cat >"$work/agent.hcl" <<EOF
# A cgroup parent of the demo's own, not Nomad's default "nomad" that a
# real client on this machine may use (make reset-host removes this one).
client {
  cgroup_parent = "nomad-sandbox-demo"
}

plugin "sandbox" {
  config {
    runsc_path        = "$runsc"
    runsc_root        = "$runsc_root"
    state_dir         = "$work/tasks"
    allow_host_rootfs = ["$rootfs_parent"]
    allowed_egress    = ["deb.debian.org:443"]
  }
}
EOF

log "starting a Nomad dev agent (log: $agent_log)"
"$nomad" agent -dev -bind 127.0.0.1 \
	-config "$work/agent.hcl" \
	-plugin-dir "$plugins" \
	-data-dir "$work/data" \
	>"$agent_log" 2>&1 </dev/null &
agent_pid=$!

# wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds.
wait_for() {
	local secs=$1 what=$2 deadline
	shift 2
	deadline=$((SECONDS + secs))
	until "$@"; do
		kill -0 "$agent_pid" 2>/dev/null || die "the agent exited while waiting for $what"
		[ "$SECONDS" -lt "$deadline" ] || die "timed out after ${secs}s waiting for $what"
		sleep 0.5
	done
}

driver_healthy() {
	local out
	out=$("$nomad" node status -self \
		-t '{{with index .Drivers "sandbox"}}{{.Detected}} {{.Healthy}}{{end}}' 2>/dev/null) || return 1
	[ "$out" = "true true" ]
}
wait_for 60 'the sandbox driver to be healthy' driver_healthy
log "driver \"sandbox\" is healthy on this node:"
"$nomad" node status -self -verbose 2>/dev/null | grep -E '^driver\.sandbox' || true

log "running $job"
"$nomad" job run -detach "$job"

alloc_id=""
find_alloc() {
	alloc_id=$("$nomad" job allocs -t '{{range .}}{{.ID}}{{"\n"}}{{end}}' "$job_name" 2>/dev/null | head -n1)
	[ -n "$alloc_id" ]
}
wait_for 60 'an allocation to be placed' find_alloc
ui_url=$NOMAD_ADDR/ui/allocations/$alloc_id
log "allocation $alloc_id, in the web UI: $ui_url"

status=""
alloc_done() {
	status=$("$nomad" alloc status -t '{{.ClientStatus}}' "$alloc_id" 2>/dev/null) || return 1
	case "$status" in
	complete | failed | lost) return 0 ;;
	esac
	return 1
}
wait_for 120 "allocation $alloc_id to finish" alloc_done

echo
log "task stdout:"
"$nomad" alloc logs "$alloc_id" "$task" || true
log "task stderr:"
"$nomad" alloc logs -stderr "$alloc_id" "$task" || true
echo
log "allocation status:"
"$nomad" alloc status "$alloc_id" || true
echo

failed=$("$nomad" alloc status -t "{{with index .TaskStates \"$task\"}}{{.Failed}}{{end}}" "$alloc_id")
result=0
if [ "$status" != complete ] || [ "$failed" != false ]; then
	printf 'demo: the job did not succeed (allocation %s, task failed=%s)\n' "$status" "$failed" >&2
	result=1
else
	log "the job succeeded"
fi

if [ "${KEEP:-}" = 1 ]; then
	log "KEEP=1: the agent keeps running; open $ui_url"
	log "(the job: $NOMAD_ADDR/ui/jobs/$job_name@default). Press Ctrl-C to stop the agent and clean up."
	# The demo's result stands; an interrupt is how a person ends it.
	trap 'exit $result' INT TERM
	wait "$agent_pid" || true
	die "the agent exited by itself (see $agent_log)"
fi
exit "$result"
