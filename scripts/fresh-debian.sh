#!/bin/bash
# Run a command in a clean Debian root built from Debian's packages alone: the machine a new
# user (and so CI) has. No pyenv Python, nothing installed by hand, root, no standard input.
#
#   scripts/fresh-debian.sh SUITE [COMMAND]      (as root, from the checkout)
#     SUITE    bookworm (Debian 12, Raspberry Pi OS bookworm) or trixie (Debian 13)
#     COMMAND  default "make test"
#
# The committed HEAD of this checkout is cloned into the root. The root has only what minbase
# brings plus python3, python3-venv, make, git, ca-certificates, procps and iproute2: what a
# fresh Debian or Raspberry Pi OS install has at least; everything else the project's own
# files must install. Prints the command's last lines and exits with its status; the full log
# stays in the folder it names after a failure; the root is removed unless FRESH_KEEP is set.
set -u
suite=${1:?usage: scripts/fresh-debian.sh bookworm|trixie [COMMAND]}
cmd=${2:-make test}
src=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "fresh-debian.sh needs root (it builds a chroot)"; exit 2; }
work=$(mktemp -d -t "fresh-$suite.XXXXXX")
root=$work/root
if ! command -v mmdebstrap >/dev/null; then
    apt-get update -qq >/dev/null 2>&1
    apt-get install -y -qq mmdebstrap >/dev/null </dev/null || { echo "cannot install mmdebstrap"; exit 1; }
fi
# This machine's Debian mirrors: the first URI is the archive, one ending in -security the
# security archive.
uris=$(grep -hoE '^URIs:.*|^deb +[^ ]+' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | awk '{print $2}')
archive=$(echo "$uris" | grep -v -- '-security' | head -1)
security=$(echo "$uris" | grep -- '-security' | head -1)
[ -n "$archive" ] || { echo "no Debian archive found in this machine's apt sources"; exit 1; }
mirrors=("deb $archive $suite main" "deb $archive $suite-updates main")
[ -n "$security" ] && mirrors+=("deb $security $suite-security main")
built=0
for attempt in 1 2 3; do  # a mirror hiccup is not a test failure
    rm -rf "$root"
    if mmdebstrap --variant=minbase \
        --include=ca-certificates,python3,python3-venv,make,git,procps,iproute2 \
        "$suite" "$root" "${mirrors[@]}" >"$work/mmdebstrap.log" 2>&1; then
        built=1; break
    fi
    echo "building the $suite root failed (attempt $attempt); retrying"
    sleep 10
done
[ "$built" = 1 ] || { tail "$work/mmdebstrap.log"; exit 1; }
git clone -q "$src" "$root/project" || exit 1
cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null
# What Debian's installer writes (the host name too: programs resolve their own host name).
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' \
    "$(hostname)" >"$root/etc/hosts"
# Trust the same certificate authorities as this machine (its mirrors may sit behind a proxy).
mkdir -p "$root/usr/local/share/ca-certificates"
cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null
chroot "$root" update-ca-certificates >/dev/null 2>&1
mount -t proc proc "$root/proc"; mount --rbind /sys "$root/sys"; mount --rbind /dev "$root/dev"
cleanup() {
    umount -R "$root/proc" "$root/sys" "$root/dev" 2>/dev/null
    # Never delete through a mount that is still there (it would be the host's /dev or /sys).
    if [ -n "${FRESH_KEEP:-}" ] || grep -qF " $root/" /proc/mounts; then
        echo "log and root in $work"
    elif [ "${rc:-1}" = 0 ]; then
        rm -rf "$work"
    else
        # A root is 1-2 GB; kept after a failure it can leave the next suite's root (CI builds
        # both, one after the other) without room to install. The log says what failed.
        rm -rf "$root"
        echo "log in $work/run.log (the root is removed; FRESH_KEEP=1 keeps it)"
    fi
}
trap cleanup EXIT
SECONDS=0
chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 CI=true \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt PIP_DEFAULT_TIMEOUT=180 \
    bash -c "cd /project && $cmd" </dev/null >"$work/run.log" 2>&1; rc=$?
echo "== Debian $suite, fresh: '$cmd' exited $rc after ${SECONDS}s"
tail -25 "$work/run.log"
exit $rc
