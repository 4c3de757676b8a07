#!/usr/bin/env bash
# Install onionpost as a service on a Raspberry Pi (or any Debian/Ubuntu machine).
#
#   sudo deploy/install-pi.sh                       # the Pi holds only the inbox (default)
#   sudo ONIONPOST_ROLE=both deploy/install-pi.sh   # the Pi also holds your keys and your mail
#
# Idempotent: running it again upgrades the code and keeps keys, mail and settings.
# What it does: installs tor and python3-venv, creates the `onionpost` user, copies this
# checkout to /opt/onionpost with its own virtual environment, creates the identity in
# /var/lib/onionpost (once), and enables the systemd service. See docs/raspberry-pi.md.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "Run this as root: sudo $0" >&2
    exit 1
fi
src="$(cd "$(dirname "$0")/.." && pwd)"
prefix=/opt/onionpost
data=/var/lib/onionpost
user="${ONIONPOST_USER_NAME:-${SUDO_USER:-me}}"
role="${ONIONPOST_ROLE:-inbox}"
case "$role" in inbox|both) ;; *) echo "ONIONPOST_ROLE must be 'inbox' or 'both'" >&2; exit 1 ;; esac

"$src/scripts/system-deps.sh" run

if ! id onionpost >/dev/null 2>&1; then
    useradd --system --home-dir "$data" --shell /usr/sbin/nologin onionpost
fi
install -d -m 0700 -o onionpost -g onionpost "$data"

echo "Installing onionpost into $prefix"
install -d -m 0755 "$prefix"
# copy the source (not the developer's venv or caches)
tar -C "$src" --exclude=.venv --exclude=.git --exclude='__pycache__' --exclude='.*_cache' -cf - . \
    | tar -C "$prefix" -xf -
python3 -m venv "$prefix/.venv"
"$prefix/.venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
"$prefix/.venv/bin/pip" install --quiet --disable-pip-version-check "$prefix"

if [ ! -e "$data/inbox/server.key" ]; then
    if [ "$role" = inbox ]; then
        echo "Creating the inbox (onion address and server keys; nobody's personal keys)"
        runuser -u onionpost -- env ONIONPOST_HOME="$data" "$prefix/.venv/bin/onionpost" \
            init --role inbox
    else
        echo "Creating the identity for '$user' (mail address and keys)"
        runuser -u onionpost -- env ONIONPOST_HOME="$data" "$prefix/.venv/bin/onionpost" \
            init --user "$user" | tee /dev/stderr | grep -i password >/dev/null || true
    fi
fi

install -m 0644 "$prefix/deploy/systemd/onionpost.service" /etc/systemd/system/onionpost.service
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable onionpost.service
    systemctl restart onionpost.service
    echo "onionpost is running. Status: sudo -u onionpost ONIONPOST_HOME=$data $prefix/.venv/bin/onionpost status"
    if [ "$role" = inbox ]; then
        echo "Invite yourself: sudo -u onionpost ONIONPOST_HOME=$data $prefix/.venv/bin/onionpost users invite $user"
    fi
else
    echo "systemd is not running here; start the node with:"
    echo "  sudo -u onionpost ONIONPOST_HOME=$data $prefix/.venv/bin/onionpost run"
fi
