#!/usr/bin/env bash
# mkrootfs.sh DIR: build a minimal busybox root filesystem in DIR for the demo.
# It holds a static busybox with its applet links, /etc/passwd and /etc/group
# with root, app (uid 1000) and nobody, and a world-writable /tmp. Running it
# again over an existing DIR brings it back to this state.
set -euo pipefail

if [ "$#" -ne 1 ] || [ -z "$1" ]; then
	echo "usage: $0 DIR" >&2
	exit 2
fi
dir=$1
busybox=${BUSYBOX:-/usr/bin/busybox}

if [ ! -x "$busybox" ]; then
	echo "$busybox not found: install busybox-static (make deps)" >&2
	exit 1
fi
mkdir -p "$dir"
cd "$dir"
if [ "$(pwd -P)" = / ]; then
	echo "refusing to turn / into a rootfs" >&2
	exit 1
fi
mkdir -p bin sbin usr/bin usr/sbin etc root home/app proc sys dev tmp
chmod 0755 bin sbin usr usr/bin usr/sbin etc dev proc sys home
chmod 0700 root
chmod 1777 tmp

install -m 0755 "$busybox" bin/busybox.new
mv -f bin/busybox.new bin/busybox

"$busybox" --list | while IFS= read -r applet; do
	case "$applet" in
	"" | busybox | */*) continue ;;
	esac
	ln -sfn busybox "bin/$applet"
done

cat >etc/passwd <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
app:x:1000:1000:app:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat >etc/group <<'GROUP'
root:x:0:
app:x:1000:
nogroup:x:65534:
GROUP
chmod 0644 etc/passwd etc/group
chown 1000:1000 home/app 2>/dev/null || true

echo "busybox rootfs ready in $dir ($(ls bin | wc -l) entries in /bin)"
