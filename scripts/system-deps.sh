#!/usr/bin/env bash
# Installs the Debian packages onionpost needs, when they are missing.
#   scripts/system-deps.sh run    -> what running a node needs (python3-venv, tor, Dovecot's
#                                    IMAP and LMTP servers)
#   scripts/system-deps.sh test   -> that, plus the real mail clients the test suite drives
#   scripts/system-deps.sh bench  -> that, plus Postfix and Dovecot (the gateway benchmark's references)
# As root it installs with apt-get (no prompts, works without standard input, as CI runs it).
# As another user it prints the one command to run and fails, rather than guessing at sudo.
set -euo pipefail
mode="${1:-run}"

need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# A Python that can create virtual environments (Debian splits ensurepip into python3-venv).
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then need+=(python3-venv); fi
have_cmd tor || need+=(tor)

# Dovecot serves IMAP: the node starts a private instance of its own, with its configuration in
# the data directory (gateway/dovecot.py); the system service is never used. A `dovecot` command
# alone is not enough (dovecot-core installs it without the IMAP or LMTP server), so look for the
# programs that do the work, wherever this system keeps Dovecot's helper programs.
dovecot_libexec() {
    for dir in /usr/lib/dovecot /usr/libexec/dovecot; do
        if [ -x "$dir/$1" ]; then return 0; fi
    done
    return 1
}
had_dovecot=no
have_pkg dovecot-core && had_dovecot=yes
if [ "$mode" = run ] || [ "$mode" = test ]; then
    { have_cmd dovecot || have_cmd /usr/sbin/dovecot; } && dovecot_libexec imap \
        && dovecot_libexec imap-login || need+=(dovecot-imapd)
    dovecot_libexec lmtp || need+=(dovecot-lmtpd)
    # doveadm hashes the IMAP password; it comes with dovecot-core, which both pull in.
fi

if [ "$mode" = test ]; then
    have_cmd swaks || need+=(swaks)
    have_cmd mbsync || need+=(isync)
    have_cmd neomutt || need+=(neomutt)
    have_cmd thunderbird || need+=(thunderbird)
    have_cmd Xvfb || need+=(xvfb)
    have_cmd strace || need+=(strace)  # the Thunderbird leak test watches its system calls
    have_pkg ca-certificates || need+=(ca-certificates)
fi

if [ "$mode" = bench ]; then
    # bench/gateway.py starts private Postfix and Dovecot instances of its own; the system
    # services are never used, so none is configured or enabled here.
    have_pkg postfix || need+=(postfix)
    have_pkg dovecot-imapd || need+=(dovecot-imapd)
    have_pkg dovecot-lmtpd || need+=(dovecot-lmtpd)
fi

if [ "${#need[@]}" -eq 0 ]; then exit 0; fi

if ! have_cmd apt-get; then
    echo "onionpost needs these programs: ${need[*]}. Install them with your system's package manager." >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "onionpost needs these Debian packages: ${need[*]}" >&2
    echo "Install them once with:  sudo apt-get install -y ${need[*]}" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# The system tor service is not wanted: onionpost launches its own tor (see torrc.example to attach).
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
echo "Installing Debian packages: ${need[*]}"
case " ${need[*]} " in *" postfix "*)
    # Debian's default answer, "Internet Site", would listen on port 25 on every interface
    # from the next boot; "No configuration" installs the programs only.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections ;;
esac
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" </dev/null
# policy-rc.d kept the services from starting during the install; Debian still enables them for
# the next boot. Disable them, unless this machine had them before (then they are its owner's).
disable_service() {
    local svc=$1
    if have_cmd systemctl; then
        systemctl disable "$svc.service" "$svc.socket" >/dev/null 2>&1 || true
    elif have_cmd deb-systemd-helper; then
        deb-systemd-helper disable "$svc.service" "$svc.socket" >/dev/null 2>&1 || true
    fi
    if [ -x "/etc/init.d/$svc" ] && have_cmd update-rc.d; then
        update-rc.d "$svc" disable >/dev/null 2>&1 || true
    fi
}
case " ${need[*]} " in *" postfix "*) disable_service postfix ;; esac
case " ${need[*]} " in *" dovecot-"*)
    if [ "$had_dovecot" = no ]; then disable_service dovecot; fi ;;
esac
