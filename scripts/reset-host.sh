#!/usr/bin/env bash
# Returns this machine to the state of a fresh one, as far as this project is
# concerned: what the driver, the demo and the tests create goes, nothing
# else is touched. The built tools in bin/ stay (reproducible caches).
#
# What goes, and how it is recognised:
#   processes   Nomad agents run from bin/nomad, plugins from bin/plugins
#               and from the e2e suite's work directories,
#               task supervisors ("... supervise DIR"), every process of
#               bin/runsc (sandboxes, gofers) and of any other runsc whose
#               --root is one of ours, and whatever runs in our cgroups
#   mounts      anything mounted under the directories below or on one of
#               our network namespaces, and the disk_limit overlays over
#               task directories (source nomad-sandbox-disk:*; their loop
#               devices detach themselves once unmounted), and runsc's mounts
#               under a killed Go test's temporary directory (/tmp/Test*/runsc)
#   directories /run/nomad-sandbox (state_dir, runsc_root), /run/nomad-driver-sandbox,
#               /var/lib/nomad-sandbox (image cache, disks, demo rootfs),
#               /var/log/nomad-sandbox, and the e2e suite's and the demo's
#               work directories /tmp/nomad-sandbox-e2e-*, /tmp/nomad-sandbox-demo.*,
#               and the driver tests' allocation directories
#               /tmp/nomad_driver_harness-* (made by Nomad's test harness)
#   cgroups     nomad-sandbox, nomad-sandbox-test-*, and the e2e and demo
#               agents' own nomad-sandbox-e2e-* and nomad-sandbox-demo, in
#               every hierarchy
#   network     namespaces, veths and nft tables named by the driver (nsbx,
#               nomad_sandbox*), by its tests (tnpx, tnps, t<4 hex>, nsbx_test_*,
#               sbxt*) and the e2e suite's bridge (sbxe2e*), its CNI state
#               and iptables chains, the test hosts' policy rules and tables
#   sysctl      net.ipv4.ip_forward back to 0
set -uo pipefail

[ "$(id -u)" = 0 ] || { echo "reset-host: run as root" >&2; exit 1; }
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin="$top/bin"
say() { echo "reset-host: $*"; }

dirs=(/run/nomad-sandbox /run/nomad-driver-sandbox /var/lib/nomad-sandbox /var/log/nomad-sandbox)
# The e2e suite's and the demo's work directories (agent data, task dirs),
# and the allocation directories Nomad's driver test harness made for the
# driver tests (a killed test leaves them, with the task's binds in them).
for d in /tmp/nomad-sandbox-e2e-* /tmp/nomad-sandbox-demo.* /tmp/nomad_driver_harness-*; do
	[ -d "$d" ] && dirs+=("$d")
done
ns_re='^(nsbx|tnpx|tnps|sbxt|sbxe2e|t[0-9a-f]{4})'
table_re='^(nomad_sandbox|nsbx_test_)'

# 1. Processes: agents and plugins first (they would start sandboxes
# again), then supervisors, then what runsc runs.
kill_matching() {
	local what=$1 pattern=$2 pids
	pids=$(pgrep -f -- "$pattern" | grep -vx "$$" || true)
	[ -n "$pids" ] || return 0
	say "killing $what: $(echo $pids)"
	kill -KILL $pids 2>/dev/null || true
}
kill_matching "nomad agents" "^$bin/nomad agent"
kill_matching "plugins" "^$bin/plugins/"
kill_matching "e2e plugins" "^/tmp/nomad-sandbox-e2e-[0-9]+/plugins/"
kill_matching "task supervisors" " supervise (/run/nomad-sandbox|/tmp/)"
for p in /proc/[0-9]*; do
	pid=${p#/proc/}
	exe=$(readlink "$p/exe" 2>/dev/null) || continue
	cmd=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null) || continue
	case "$exe $cmd" in
	"$bin/runsc"*|*"--root=/run/nomad-sandbox"*|*"--root /run/nomad-sandbox"*)
		say "killing runsc process $pid"
		kill -KILL "$pid" 2>/dev/null ;;
	esac
done
# Whatever still runs in the project's cgroups is a sandbox of ours, whichever
# runsc binary started it (another checkout's, a test's).
for h in /sys/fs/cgroup /sys/fs/cgroup/*; do
	for top in "$h"/nomad-sandbox "$h"/nomad-sandbox-test-* "$h"/nomad-sandbox-e2e-* "$h"/nomad-sandbox-demo; do
		[ -d "$top" ] || continue
		for pid in $(find "$top" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u); do
			say "killing process $pid of cgroup $top"
			kill -KILL "$pid" 2>/dev/null
		done
	done
done
# Give the kernel a moment to reap them before their mounts and cgroups go.
for _ in $(seq 50); do
	pgrep -f -- "^$bin/runsc|runsc-sandbox|runsc-gofer" >/dev/null || break
	sleep 0.1
done

# 2. Disk overlays over task directories (wherever Nomad's data dir is),
# then mounts under our directories and on our namespaces, deepest first.
awk '$1 ~ /^nomad-sandbox-disk:/ {print $2}' /proc/mounts | sort -r | while read -r m; do
	say "unmounting $m"; umount -l "$m" 2>/dev/null
done
awk '{print $2}' /proc/mounts | sort -r | while read -r m; do
	for d in "${dirs[@]}"; do
		case "$m" in "$d"/*|"$d") say "unmounting $m"; umount -l "$m" 2>/dev/null ;; esac
	done
	# runsc's own mounts (null-netns) under a Go test's temporary runsc
	# root, left by a test that was killed.
	case "$m" in /tmp/Test*/runsc/*) say "unmounting $m"; umount -l "$m" 2>/dev/null ;; esac
	case "$m" in /run/netns/*)
		if [[ "${m#/run/netns/}" =~ $ns_re ]]; then say "unmounting $m"; umount -l "$m" 2>/dev/null; fi ;;
	esac
done

# 3. Directories.
for d in "${dirs[@]}"; do
	if [ -e "$d" ]; then say "removing $d"; rm -rf --one-file-system "$d"; fi
done

# 4. Cgroups: children before parents, in every hierarchy.
for h in /sys/fs/cgroup /sys/fs/cgroup/*; do
	for top in "$h"/nomad-sandbox "$h"/nomad-sandbox-test-* "$h"/nomad-sandbox-e2e-* "$h"/nomad-sandbox-demo; do
		[ -d "$top" ] || continue
		say "removing cgroup $top"
		find "$top" -depth -type d -exec rmdir {} \; 2>/dev/null
		[ -d "$top" ] && say "cgroup $top is still in use (a process of another program?)"
	done
done

# 5. Network: namespaces, links, nft tables, policy rules, CNI state.
for n in $(ip netns list 2>/dev/null | awk '{print $1}'); do
	if [[ "$n" =~ $ns_re ]]; then say "deleting netns $n"; ip netns delete "$n" 2>/dev/null || rm -f "/run/netns/$n"; fi
done
for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
	if [[ "$l" =~ $ns_re ]]; then say "deleting link $l"; ip link delete "$l" 2>/dev/null; fi
done
if command -v nft >/dev/null; then
	nft list tables 2>/dev/null | while read -r _ fam name; do
		if [[ "$name" =~ $table_re ]]; then say "deleting nft table $fam $name"; nft delete table "$fam" "$name"; fi
	done
fi
# The test hosts' routing: rules at priority 1998 pointing at tables 20000+.
while ip rule show 2>/dev/null | grep -qE '^1998:.*lookup 20[0-9]{3}'; do
	ip rule del priority 1998 2>/dev/null || break
done
for t in $(ip route show table all 2>/dev/null | grep -oE 'table 20[0-9]{3}' | awk '{print $2}' | sort -u); do
	ip route flush table "$t" 2>/dev/null
done
for f in /var/lib/cni/networks/sbxe2e* /var/lib/cni/results/*sbxe2e*; do
	[ -e "$f" ] && { say "removing CNI state $f"; rm -rf "$f"; }
done
if command -v iptables-save >/dev/null; then
	for c in $(iptables-save -t nat 2>/dev/null | grep -oE '^:CNI-[0-9a-f]+' | tr -d :); do
		if iptables-save -t nat | grep -- "-A $c " | grep -q sbxe2e; then
			say "removing iptables chain $c"
			iptables-save -t nat | grep -- "-A POSTROUTING.*-j $c" | sed 's/^-A/-D/' | while read -r r; do iptables -t nat $r; done
			iptables -t nat -F "$c"; iptables -t nat -X "$c"
		fi
	done
fi

# 6. Sysctls as a fresh machine has them.
if [ "$(sysctl -n net.ipv4.ip_forward)" != 0 ]; then
	say "net.ipv4.ip_forward back to 0"
	sysctl -qw net.ipv4.ip_forward=0
fi
say "done"
