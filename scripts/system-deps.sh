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

# Each need is a check of what onionpost (or its tests) actually use, not merely of a command
# name, and the Debian packages that provide it.  apt-get below runs with
# --no-install-recommends, so what a client only *recommends* but the tests use (swaks's TLS
# module, for one) is named here explicitly.
checks=() packages=() need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
require() {  # require CHECK PACKAGE...  (CHECK is run by bash; it must succeed silently)
    checks+=("$1")
    packages+=("${*:2}")
    if ! bash -c "$1" >/dev/null 2>&1; then need+=("${@:2}"); fi
}
sbin_path="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
# Dovecot's helper programs, wherever this system keeps them.
dovecot_has="f() { for d in /usr/lib/dovecot /usr/libexec/dovecot; do [ -x \"\$d/\$1\" ] && return 0; done; return 1; }; f"

# A Python that can create virtual environments (Debian splits ensurepip into python3-venv).
require 'python3 -c "import ensurepip, venv"' python3-venv
require 'command -v tor' tor

# Dovecot serves IMAP: the node starts a private instance of its own, with its configuration in
# the data directory (gateway/dovecot.py); the system service is never used. A `dovecot` command
# alone is not enough (dovecot-core installs it without the IMAP or LMTP server), so look for the
# programs that do the work. doveadm hashes the IMAP password; it comes with dovecot-core.
had_dovecot=no
have_pkg dovecot-core && had_dovecot=yes
if [ "$mode" = run ] || [ "$mode" = test ] || [ "$mode" = bench ]; then
    require "PATH=$sbin_path command -v dovecot && PATH=$sbin_path command -v doveadm && $dovecot_has imap && $dovecot_has imap-login" dovecot-imapd
    require "$dovecot_has lmtp" dovecot-lmtpd
fi

if [ "$mode" = test ]; then
    require 'command -v swaks' swaks
    # swaks only recommends the Perl module its STARTTLS needs ("TLS not available: requires
    # Net::SSLeay"); swaks itself says whether it can do TLS.
    require 'perl -MNet::SSLeay -e1 && swaks --support 2>&1 | grep -qx "=== TLS supported"' \
        libnet-ssleay-perl
    require 'command -v mbsync' isync
    require 'command -v neomutt' neomutt
    require 'command -v thunderbird' thunderbird
    require 'command -v Xvfb' xvfb
    require 'command -v strace' strace  # the Thunderbird leak test watches its system calls
    require 'test -s /etc/ssl/certs/ca-certificates.crt' ca-certificates
fi

if [ "$mode" = bench ]; then
    # bench/gateway.py starts private Postfix and Dovecot instances of its own; the system
    # services are never used, so none is configured or enabled here.
    require "PATH=$sbin_path command -v postconf && PATH=$sbin_path command -v postfix" postfix
fi

# After installing, every check must pass: a package that installs but does not give what is
# checked for (a renamed module, a split package) is reported here, not as a test failure.
verify() {
    local i missing=()
    for i in "${!checks[@]}"; do
        bash -c "${checks[$i]}" >/dev/null 2>&1 || missing+=("${packages[$i]} (${checks[$i]})")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    printf 'Still missing after installing Debian packages:\n' >&2
    printf '  %s\n' "${missing[@]}" >&2
    exit 1
}

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
verify
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
