"""A private Dovecot per node: IMAP for mail clients, LMTP for the node to file mail into.

Why Dovecot, and why private: measured against the pymap gateway, Dovecot passes every
imaptest group (pymap failed 18 of 71), is about five times faster, and no onionpost code has
to parse IMAP, so a hostile client can never stall the node (see ``shared/DESIGN.md``,
Gateway).  The node owns this Dovecot the way it owns its tor: the configuration is generated
into ``<data>/dovecot/`` on every start, Dovecot runs in the foreground as our child
(``dovecot -F -c <data>/dovecot/dovecot.conf``), and nothing in ``/etc/dovecot`` is read or
changed.  Only this module runs ``dovecot``; ``doveadm`` runs here and in gateway/mailread.py.

Layout::

    <data>/dovecot/dovecot.conf   generated on every start (no secrets in it)
    <data>/dovecot/passwd         user:{ARGON2ID}hash, 0600, written atomically
    <data>/dovecot/run/           Dovecot's base_dir: sockets, among them run/lmtp
    <data>/dovecot/state/         state_dir
    <data>/dovecot/dovecot.log    Dovecot's log (set aside as .1 past 10 MiB, while it runs)
    <data>/mail/<user>/           the user's Maildir (INBOX, .Sent, .Drafts, ...)

Two configuration syntaxes: Debian 12 (and Raspberry Pi OS bookworm) ships Dovecot 2.3,
Debian 13 ships 2.4, which renamed most settings and requires ``dovecot_config_version``
first.  :func:`find_installation` reads ``dovecot --version`` and :func:`render_config`
writes the matching file.

Who the processes run as (:func:`choose_identity`):

* **An unprivileged node** (the systemd unit runs as ``onionpost``; ``make run`` as a user):
  Dovecot cannot change user, so every process runs as that user: ``default_login_user``,
  ``default_internal_user`` and the mail user are all the node's user, no process is chrooted
  (chroot needs root), and ``first_valid_uid``/``last_valid_uid`` admit that uid alone.
* **A root node** (CI, a root shell): Dovecot refuses to access mail as root ("Mail access not
  allowed for root"), and its login processes should not run as root either.  The master and
  the auth process stay root (auth reads the 0600 passwd file); the pre-login processes run as
  Debian's ``dovenull``, chrooted as Dovecot intends; the other internal processes as
  ``dovecot``; mail (imap, lmtp deliveries) as the data directory's owner if that is not root,
  else as Debian's ``dovecot`` account.  That account must reach ``<data>/mail``: the data
  directory gets group search permission for its group (0710, nothing readable), and every
  directory above it must be passable by others (``/var/lib/onionpost``, the root default,
  is; a data directory under ``/root`` is not, and :func:`prepare` says so).

Every user exists for LMTP and doveadm (the static userdb's ``allow_all_users``): mail is
filed for a person whether or not they have an IMAP password yet, and only the node can
reach the LMTP socket (0600 in a 0700 directory).  Logging in needs a passwd-file entry.

The password a mail client uses is hashed by ``doveadm pw`` (ARGON2ID where this Dovecot has
it, else BLF-CRYPT or SHA512-CRYPT) with the password on standard input, never on a command
line, in a configuration file or in a log.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import logging
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.imapsession import ImapSessions
from gateway.lan import connect_host
from gateway.tls import LocalTLS, ensure_tls
from onionpost.base.atomicfile import write_atomic
from onionpost.base.clock import Clock, SystemClock
from onionpost.base.logfiles import LOG_ROTATE_BYTES, set_aside_if_large
from onionpost.core.errors import (
    FilingDeferred,
    FilingRefused,
    MailServerError,
    MailServerNotInstalled,
    PasswordRejected,
    UnknownLocalUser,
)
from onionpost.core.retry import DOVECOT_RESTART, Backoff
from onionpost.core.trust import QUARANTINE

__all__ = [
    "TLS_REQUIRED",
    "DovecotServer",
    "Identity",
    "Installation",
    "Layout",
    "PasswdFile",
    "Settings",
    "choose_identity",
    "doveadm_add_flags",
    "doveadm_force_resync",
    "doveadm_search",
    "doveadm_sync",
    "find_installation",
    "hash_password",
    "lmtp_deliver",
    "prepare",
    "render_config",
    "request_resync",
]

log = logging.getLogger(__name__)

#: Strongest first; the first one ``doveadm pw -l`` lists is used.
PASSWORD_SCHEMES = ("ARGON2ID", "BLF-CRYPT", "SHA512-CRYPT")
#: Where Debian (and most other systems) keep Dovecot's service programs.
LIBEXEC_DIRS = (Path("/usr/lib/dovecot"), Path("/usr/libexec/dovecot"))
#: Dovecot lives in sbin, which an unprivileged user's PATH often lacks.
_EXTRA_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
#: The folders every mailbox has, with the SPECIAL-USE flag mail clients map them by.
SPECIAL_FOLDERS = (
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Trash", "\\Trash"),
    ("Junk", "\\Junk"),
    ("Archive", "\\Archive"),
)
#: Folders every mailbox has that no SPECIAL-USE flag names: Quarantine holds mail signed by
#: a contact's identity key that the person has not accepted yet (see onionpost.device.sync).
PLAIN_FOLDERS = (QUARANTINE,)
#: sockaddr_un holds 108 bytes; Dovecot's longest socket name below base_dir is about 25.
_MAX_BASE_DIR = 80
#: The folders the node files into (gateway.service's filer), as Maildir++ directories.
FILED_FOLDERS = (("INBOX", ""), ("Sent", ".Sent"))
#: Mail waiting in a folder's new/ before the node has Dovecot move it to cur/ (fewer is not
#: worth a doveadm process: the next SELECT renames a few files in well under a millisecond).
TIDY_AT = 32
_USER = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_FOLDER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# --- what is installed --------------------------------------------------------------------


@dataclass(frozen=True)
class Installation:
    """The Dovecot on this machine: its programs, version and best password scheme."""

    dovecot: str
    doveadm: str
    version: tuple[int, int, int]
    version_text: str
    scheme: str

    @property
    def syntax(self) -> Literal["2.3", "2.4"]:
        """Which configuration syntax this version reads."""
        return "2.3" if self.version < (2, 4, 0) else "2.4"


def _which(name: str) -> str | None:
    path = os.environ.get("PATH", "/usr/bin:/bin")
    return shutil.which(name, path=f"{path}:{_EXTRA_PATH}")


def _run(argv: list[str], *, stdin: str | None = None, timeout: float = 30.0) -> str:
    """Run a Dovecot tool and return its standard output; its failure as a MailServerError."""
    try:
        done = subprocess.run(  # noqa: S603 - argv is built here from found program paths
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={"PATH": f"/usr/bin:/bin:{_EXTRA_PATH}", "LANG": "C.UTF-8"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MailServerError(f"Cannot run {argv[0]}: {exc}") from exc
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        raise MailServerError(
            f"{Path(argv[0]).name} {argv[1]} failed: {why[-1] if why else done.returncode}"
        )
    return done.stdout


def find_installation() -> Installation:
    """Find Dovecot, its IMAP and LMTP servers, its version and its strongest hash."""
    dovecot, doveadm = _which("dovecot"), _which("doveadm")
    if dovecot is None or doveadm is None:
        raise MailServerNotInstalled()
    missing = [
        name
        for name in ("imap", "imap-login", "lmtp")
        if not any(os.access(d / name, os.X_OK) for d in LIBEXEC_DIRS)
    ]
    if missing:
        raise MailServerNotInstalled(
            f"Dovecot is installed without {', '.join(missing)}: install the Debian packages "
            "dovecot-imapd and dovecot-lmtpd (scripts/system-deps.sh run, as root)."
        )
    text = _run([dovecot, "--version"]).strip()
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", text)
    if match is None:
        raise MailServerError(f"Cannot read Dovecot's version from {text!r}.")
    version = (int(match[1]), int(match[2]), int(match[3]))
    if version < (2, 3, 0):
        raise MailServerError(f"Dovecot {text} is too old: onionpost needs 2.3 or 2.4.")
    listed = set(_run([doveadm, "-O", "pw", "-l"]).split())
    scheme = next((s for s in PASSWORD_SCHEMES if s in listed), None)
    if scheme is None:
        raise MailServerError(
            f"Dovecot {text} offers none of the password schemes {', '.join(PASSWORD_SCHEMES)}."
        )
    return Installation(dovecot, doveadm, version, text, scheme)


# --- where and as whom --------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Dovecot's files in a node's data directory."""

    data_dir: Path

    @property
    def root(self) -> Path:
        return self.data_dir / "dovecot"

    @property
    def config(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def passwd(self) -> Path:
        return self.root / "passwd"

    @property
    def base_dir(self) -> Path:
        return self.root / "run"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def log(self) -> Path:
        return self.root / "dovecot.log"

    @property
    def lmtp_socket(self) -> Path:
        return self.base_dir / "lmtp"

    @property
    def resync_marker(self) -> Path:
        """Left by whatever wrote Maildir files without Dovecot (:func:`request_resync`)."""
        return self.root / "resync-needed"

    @property
    def mail(self) -> Path:
        return self.data_dir / "mail"

    @property
    def tls(self) -> Path:
        return self.data_dir / "tls"

    def maildir(self, user: str) -> Path:
        return self.mail / _check_user(user)


@dataclass(frozen=True)
class Identity:
    """Which accounts Dovecot's processes run as (see the module docstring)."""

    privileged: bool  # the master runs as root and changes user for its children
    mail_user: str
    mail_uid: int
    mail_gid: int
    login_user: str
    internal_user: str
    internal_group: str


def choose_identity(data_dir: Path) -> Identity:
    """The accounts for this process: itself when unprivileged, system accounts when root."""
    euid, egid = os.geteuid(), os.getegid()
    if euid != 0:
        name = _user_name(euid)
        group = _group_name(egid)
        return Identity(False, name, euid, egid, name, name, group)
    for account in ("dovecot", "dovenull"):
        try:
            pwd.getpwnam(account)
        except KeyError:
            raise MailServerNotInstalled(
                f"The system account {account!r} that Debian's dovecot-core creates is missing."
            ) from None
    owner = data_dir.stat().st_uid if data_dir.exists() else 0
    mail = pwd.getpwuid(owner) if owner != 0 else pwd.getpwnam("dovecot")
    internal_group = _group_name(pwd.getpwnam("dovecot").pw_gid)
    return Identity(
        True, mail.pw_name, mail.pw_uid, mail.pw_gid, "dovenull", "dovecot", internal_group
    )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise MailServerError(f"User id {uid} has no name; Dovecot needs one.") from None


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        raise MailServerError(f"Group id {gid} has no name; Dovecot needs one.") from None


@dataclass(frozen=True)
class Settings:
    """What the node's configuration decides about IMAP (``[gateway]``)."""

    host: str = "127.0.0.1"  # or a list, "0.0.0.0, ::" (gateway.lan.dovecot_listen)
    imap_port: int = 1143
    require_tls: bool = False  # else plaintext login is allowed from loopback only
    #: LAN access (gateway.lan): the LAN certificate for connections to any address but
    #: loopback, which keeps the loopback certificate (gateway.tls.ensure_lan_tls).
    lan_tls: LocalTLS | None = None


# --- the configuration --------------------------------------------------------------------


def render_config(
    inst: Installation, layout: Layout, ident: Identity, settings: Settings, tls: LocalTLS
) -> str:
    """Dovecot's configuration, in the syntax of the installed version."""
    lan = [settings.lan_tls.cert, settings.lan_tls.key] if settings.lan_tls else []
    for path in (layout.data_dir, tls.cert, tls.key, *lan):
        if any(c in str(path) for c in '"\n\\$%{}'):
            raise MailServerError(f"Dovecot cannot be configured with the path {path}.")
    if inst.syntax == "2.3":
        return _render_23(layout, ident, settings, tls)
    return _render_24(layout, ident, settings, tls)


def _folders(indent: str) -> str:
    special = "".join(
        f"{indent}mailbox {name} {{\n{indent}  special_use = {flag}\n"
        f"{indent}  auto = subscribe\n{indent}}}\n"
        for name, flag in SPECIAL_FOLDERS
    )
    plain = "".join(
        f"{indent}mailbox {name} {{\n{indent}  auto = subscribe\n{indent}}}\n"
        for name in PLAIN_FOLDERS
    )
    return special + plain


def _certificates(settings: Settings, tls: LocalTLS, cert: str, key: str) -> str:
    """The server certificate; with LAN access the LAN one, except over loopback."""
    if settings.lan_tls is None:
        return f"{cert}{tls.cert}\n{key}{tls.key}"
    lan = settings.lan_tls
    loopback = "".join(
        f"local {address} {{\n  {cert}{tls.cert}\n  {key}{tls.key}\n}}\n"
        for address in ("127.0.0.1", "::1")
    )
    return f"{cert}{lan.cert}\n{key}{lan.key}\n{loopback}"


def _unprivileged_services(ident: Identity) -> str:
    """Without root nothing can chroot or change user: say so to every chrooting service."""
    if ident.privileged:
        return ""
    return "".join(f"service {name} {{\n  chroot =\n}}\n" for name in ("imap-login", "anvil"))


#: Dovecot counts a loopback connection as secure, so ``ssl = required`` alone still lets a
#: loopback client log in without TLS.  With require_tls the first passdb looks in a file that
#: does not exist unless the connection is TLS (the auth variable ``secured`` is "TLS" only for
#: a TLS connection, "secured" for loopback); the passwd-file path is expanded per login in
#: both versions (2.4 keeps ``passwd_file_path`` unexpanded until then), only the syntax
#: differs.  A login that fails there reaches the second passdb, the same file with
#: ``nologin``: the right password then gets :data:`TLS_REQUIRED` as the answer ("NO
#: [CONTACTADMIN] ...", the code Dovecot gives every nologin), a wrong one AUTHENTICATIONFAILED
#: as ever, so the clear answer tells nothing to someone who does not know the password.
_TLS_ONLY_23 = "%{if;%{secured};eq;TLS;;.without-tls}"
_TLS_ONLY_24 = "%{if(secured, 'eq', 'TLS', '', '.without-tls')}"
TLS_REQUIRED = "This server requires TLS: use STARTTLS before logging in."
#: Dovecot 2.3 splits passdb fields at spaces, so the answer reaches its auth process through
#: the environment (``import_environment``, ``%{env:...}``); 2.4 reads it quoted.
_TLS_REQUIRED_ENV = "ONIONPOST_TLS_REQUIRED"
#: Mail clients all come from loopback, so the per-IP limit is a per-user limit (default 10).
MAX_SESSIONS_PER_USER = 256


def _passdbs_23(layout: Layout, settings: Settings) -> str:
    if not settings.require_tls:
        return f"passdb {{\n  driver = passwd-file\n  args = {layout.passwd}\n}}\n"
    return f"""\
import_environment = $import_environment {_TLS_REQUIRED_ENV}
passdb {{
  driver = passwd-file
  args = {layout.passwd}{_TLS_ONLY_23}
}}
passdb {{
  driver = passwd-file
  args = {layout.passwd}
  override_fields = nologin=y reason=%{{env:{_TLS_REQUIRED_ENV}}}
}}
"""


def _passdbs_24(layout: Layout, settings: Settings) -> str:
    if not settings.require_tls:
        return f"passdb passwd-file {{\n  passwd_file_path = {layout.passwd}\n}}\n"
    return f"""\
passdb tls {{
  driver = passwd-file
  passwd_file_path = {layout.passwd}{_TLS_ONLY_24}
}}
passdb without_tls {{
  driver = passwd-file
  passwd_file_path = {layout.passwd}
  fields {{
    nologin = yes
    reason = "{TLS_REQUIRED}"
  }}
}}
"""


#: No mailbox list index.  With one, every commit (each LMTP delivery, each doveadm flag
#: change) ends by updating the folder's status in ``dovecot.list.index``, and that update asks
#: the folder for its GUID, which a Maildir keeps only in the header of ``dovecot-uidlist``:
#: Dovecot then parses the whole uidlist, one line per message, to read one line (2.3.19 and
#: 2.4: ``index_list_update_fill_changes`` -> ``maildir_uidlist_get_mailbox_guid``).  That was
#: ~0.3 s per delivery into a folder of 100,000 messages; without it an LMTP delivery only
#: appends to the uidlist and the index (docs/performance.md, "Cost growth").  What the list
#: index saved: a STATUS of a folder not selected opens its index instead (a few syscalls; a
#: sync only if mail arrived since), and LIST reads the Maildir++ root (a dozen folders).
#: Dovecot then offers no IMAP NOTIFY (RFC 5465), which common mail clients do not use (IDLE
#: is unchanged).
_LIST_INDEX_OFF = """\
# No mailbox list index: updating it after each delivery made Dovecot parse the folder's whole
# dovecot-uidlist (for the folder GUID), a cost that grew with the folder (gateway/dovecot.py).
mailbox_list_index = no
"""


def _render_23(layout: Layout, ident: Identity, settings: Settings, tls: LocalTLS) -> str:
    auth_as_root = "service auth {\n  user = root\n}\n" if ident.privileged else ""
    return f"""\
# Generated by onionpost (gateway/dovecot.py) for Dovecot 2.3 on every start: edits are lost.
instance_name = onionpost
base_dir = {layout.base_dir}
state_dir = {layout.state_dir}
log_path = {layout.log}
protocols = imap lmtp
listen = {settings.host}
default_login_user = {ident.login_user}
default_internal_user = {ident.internal_user}
default_internal_group = {ident.internal_group}
first_valid_uid = {ident.mail_uid}
last_valid_uid = {ident.mail_uid}
first_valid_gid = {ident.mail_gid}
last_valid_gid = {ident.mail_gid}
mail_privileged_group =
mail_access_groups =

ssl = {"required" if settings.require_tls else "yes"}
{_certificates(settings, tls, "ssl_cert = <", "ssl_key = <")}
ssl_min_protocol = TLSv1.2
ssl_prefer_server_ciphers = yes
disable_plaintext_auth = yes
auth_mechanisms = plain login
auth_username_format = %Ln

{_passdbs_23(layout, settings)}userdb {{
  driver = static
  args = uid={ident.mail_uid} gid={ident.mail_gid} home={layout.mail}/%Ln allow_all_users=yes
}}
mail_location = maildir:~
# Only this Dovecot touches these Maildirs (the node files through LMTP), so it need not rescan
# a folder whose directory changed within the last seconds: SELECT right after new mail stays fast.
maildir_very_dirty_syncs = yes
# LMTP leaves mail in new/; any sync (the node's doveadm, STATUS, EXAMINE) moves it to cur/, not
# only a SELECT: the first SELECT after a pile of mail stays fast.  \\Recent lives in the index.
maildir_empty_new = yes
{_LIST_INDEX_OFF}namespace inbox {{
  inbox = yes
  separator = /
{_folders("  ")}}}

recipient_delimiter = +
lmtp_save_to_detail_mailbox = yes
lmtp_add_received_header = no
lmtp_hdr_delivery_address = none
postmaster_address = postmaster@localhost
mail_max_userip_connections = {MAX_SESSIONS_PER_USER}

# One login process for many connections (not one each, at most 100): a flood of
# connections cannot use up the login processes and lock the user out.
service imap-login {{
  service_count = 0
  process_min_avail = 1
  inet_listener imap {{
    address = {settings.host}
    port = {settings.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0600
  }}
}}
{auth_as_root}{_unprivileged_services(ident)}"""


def _render_24(layout: Layout, ident: Identity, settings: Settings, tls: LocalTLS) -> str:
    auth_as_root = "service auth {\n  user = root\n}\n" if ident.privileged else ""
    return f"""\
dovecot_config_version = 2.4.0
dovecot_storage_version = 2.4.0
# Generated by onionpost (gateway/dovecot.py) for Dovecot 2.4 on every start: edits are lost.
instance_name = onionpost
base_dir = {layout.base_dir}
state_dir = {layout.state_dir}
log_path = {layout.log}
protocols = imap lmtp
listen = {settings.host}
default_login_user = {ident.login_user}
default_internal_user = {ident.internal_user}
default_internal_group = {ident.internal_group}
first_valid_uid = {ident.mail_uid}
last_valid_uid = {ident.mail_uid}
first_valid_gid = {ident.mail_gid}
last_valid_gid = {ident.mail_gid}
mail_privileged_group =
mail_access_groups =

ssl = {"required" if settings.require_tls else "yes"}
{_certificates(settings, tls, "ssl_server_cert_file = ", "ssl_server_key_file = ")}
ssl_min_protocol = TLSv1.2
auth_allow_cleartext = no
auth_mechanisms = plain login
auth_username_format = %{{user | username | lower}}

{_passdbs_24(layout, settings)}userdb static {{
  userdb_static_allow_all_users = yes
  fields {{
    uid = {ident.mail_uid}
    gid = {ident.mail_gid}
    home = {layout.mail}/%{{user | username | lower}}
  }}
}}
mail_driver = maildir
mail_path = ~
# Only this Dovecot touches these Maildirs (the node files through LMTP), so it need not rescan
# a folder whose directory changed within the last seconds: SELECT right after new mail stays fast.
maildir_very_dirty_syncs = yes
# LMTP leaves mail in new/; any sync (the node's doveadm, STATUS, EXAMINE) moves it to cur/, not
# only a SELECT: the first SELECT after a pile of mail stays fast.  \\Recent lives in the index.
maildir_empty_new = yes
{_LIST_INDEX_OFF}namespace inbox {{
  inbox = yes
  separator = /
{_folders("  ")}}}

recipient_delimiter = +
lmtp_save_to_detail_mailbox = yes
lmtp_add_received_header = no
lmtp_hdr_delivery_address = none
mail_max_userip_connections = {MAX_SESSIONS_PER_USER}

service imap-login {{
  restart_request_count = unlimited
  process_min_avail = 1
  inet_listener imap {{
    listen = {settings.host}
    port = {settings.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0600
  }}
}}
{auth_as_root}{_unprivileged_services(ident)}"""


# --- preparing the data directory ---------------------------------------------------------


def prepare(
    layout: Layout, settings: Settings, inst: Installation, ident: Identity | None = None
) -> Identity:
    """Create Dovecot's directories and write its configuration; return who it runs as."""
    ident = ident or choose_identity(layout.data_dir)
    if len(str(layout.base_dir)) > _MAX_BASE_DIR:
        raise MailServerError(
            f"The data directory's path is too long for Dovecot's sockets ({layout.base_dir} "
            f"has more than {_MAX_BASE_DIR} characters)."
        )
    tls = ensure_tls(layout.tls)
    try:
        for d in (layout.data_dir, layout.root, layout.state_dir, layout.mail):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Dovecot makes base_dir itself (0755 inside our 0700/0710 folder), as its login
        # chroot needs; a stale one from a crash is fine, Dovecot clears its sockets.
        if ident.privileged:
            _grant_mail_user(layout, ident)
        else:
            for d in (layout.root, layout.state_dir, layout.mail):
                d.chmod(0o700)
        if not layout.passwd.exists():
            write_atomic(layout.passwd, b"")
        set_aside_if_large(layout.log)
        text = render_config(inst, layout, ident, settings, tls)
        write_atomic(layout.config, text.encode())
    except OSError as exc:
        raise MailServerError(f"Cannot prepare Dovecot's files in {layout.root}: {exc}") from exc
    return ident


def _grant_mail_user(layout: Layout, ident: Identity) -> None:
    """Root node: let the mail account pass through to its Maildirs and Dovecot's sockets."""
    _check_ancestors_passable(layout.data_dir, ident)
    for d in (layout.data_dir, layout.root):
        st = d.stat()
        if st.st_uid != ident.mail_uid:
            os.chown(d, -1, ident.mail_gid)
            d.chmod(0o710)  # search only: the group cannot list or read anything here
    layout.state_dir.chmod(0o700)
    os.chown(layout.mail, ident.mail_uid, ident.mail_gid)
    layout.mail.chmod(0o700)
    for entry in layout.mail.iterdir():  # Maildirs made before (all Dovecot's own)
        if entry.is_dir() and entry.stat().st_uid != ident.mail_uid:
            for path in (entry, *entry.rglob("*")):
                os.lchown(path, ident.mail_uid, ident.mail_gid)


def _check_ancestors_passable(data_dir: Path, ident: Identity) -> None:
    groups = {ident.mail_gid} | {g.gr_gid for g in grp.getgrall() if ident.mail_user in g.gr_mem}
    for d in data_dir.resolve().parents:
        st = d.stat()
        if st.st_uid == ident.mail_uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise MailServerError(
                f"Dovecot's mail account {ident.mail_user!r} cannot pass through {d} "
                f"(mode {stat.S_IMODE(st.st_mode):04o}) to reach {data_dir}/mail. A node run "
                "as root needs its data directory where other accounts may pass, such as "
                "/var/lib/onionpost (the default), or run it as its own user."
            )


# --- passwords ----------------------------------------------------------------------------


def _check_user(user: str) -> str:
    if not _USER.match(user):
        raise UnknownLocalUser(f"{user!r} is not a valid onionpost user name.")
    return user


def hash_password(inst: Installation, password: str) -> str:
    """``{SCHEME}hash`` from ``doveadm pw``, the password passed on standard input."""
    if not password or any(c in password for c in "\r\n\0"):
        raise PasswordRejected("A password must not be empty or contain line breaks.")
    # doveadm asks twice ("Enter new password", "Retype") and reads lines from stdin.
    out = _run([inst.doveadm, "-O", "pw", "-s", inst.scheme], stdin=f"{password}\n" * 2)
    hashed = out.strip()
    if not hashed.startswith(f"{{{inst.scheme}}}") or ":" in hashed or "\n" in hashed:
        raise MailServerError(f"doveadm pw gave an unexpected answer for {inst.scheme}.")
    return hashed


class PasswdFile:
    """Dovecot's passwd-file: one ``user:{SCHEME}hash`` line per user.

    Every change rewrites the file atomically (0600) under an exclusive lock, so the CLI and
    a running node can both change passwords; Dovecot rereads the file when it changes.
    """

    def __init__(self, layout: Layout) -> None:
        self.path = layout.passwd

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, str]]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = self.path.with_name(".passwd.lock")
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            entries = self._read()
            before = dict(entries)
            yield entries
            if entries != before:
                lines = "".join(f"{u}:{h}\n" for u, h in sorted(entries.items()))
                old = self._mtime()
                write_atomic(self.path, lines.encode())
                if old is not None and self._mtime() == old:
                    # Dovecot notices a changed passwd-file by its mtime in whole seconds and
                    # its size; a new hash of the same length within the same second would
                    # go unnoticed, so the change is dated a second later.
                    os.utime(self.path, (old + 1, old + 1))
        finally:
            os.close(fd)

    def _mtime(self) -> int | None:
        try:
            return int(self.path.stat().st_mtime)
        except FileNotFoundError:
            return None

    def _read(self) -> dict[str, str]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        entries = {}
        for line in text.splitlines():
            user, sep, rest = line.partition(":")
            if sep and user and not line.startswith("#"):
                entries[user] = rest.split(":", 1)[0]
        return entries

    def users(self) -> list[str]:
        return sorted(self._read())

    def set_password(self, inst: Installation, user: str, password: str) -> None:
        hashed = hash_password(inst, password)
        with self._locked() as entries:
            entries[_check_user(user)] = hashed

    def remove(self, user: str) -> None:
        with self._locked() as entries:
            entries.pop(user, None)


# --- LMTP ---------------------------------------------------------------------------------


async def lmtp_deliver(
    socket_path: Path,
    user: str,
    message: bytes | Path,
    *,
    folder: str = "INBOX",
    sender: str = "",
    header: bytes = b"",
    timeout: float = 120.0,
) -> str:
    """File one message for ``user`` into ``folder``; return only after LMTP's 250.

    The folder is chosen with the recipient's detail (``user+Sent``) and Dovecot's
    ``lmtp_save_to_detail_mailbox``: no Sieve needed.  Dovecot stores the message as given
    (line ends made CRLF, one added at the end if missing) below a ``Return-Path: <sender>``
    line that LMTP always adds; ``header`` (complete lines) goes first.  A file is streamed,
    never read whole.  Raises :class:`FilingDeferred` for 4xx answers and lost connections
    (try again later) and :class:`FilingRefused` for 5xx (trying again won't help).
    """
    _check_user(user)
    if folder != "INBOX" and not _FOLDER.match(folder):
        raise FilingRefused(f"{folder!r} is not a folder LMTP can file into.")
    if any(c in sender for c in "<>\r\n "):
        raise FilingRefused(f"{sender!r} is not a usable envelope sender.")
    recipient = user if folder == "INBOX" else f"{user}+{folder}"
    try:
        async with asyncio.timeout(timeout):
            return await _lmtp_session(socket_path, sender, recipient, header, message)
    except TimeoutError as exc:
        raise FilingDeferred(f"LMTP did not answer within {timeout:.0f} s.") from exc
    except OSError as exc:
        raise FilingDeferred(f"Cannot talk to Dovecot's LMTP at {socket_path}: {exc}") from exc


_CHUNK = 256 * 1024


def _stuffed_lines(lines: Iterable[bytes]) -> Iterator[bytes]:
    """Lines with CRLF ends and leading dots doubled, batched into chunks of ~256 KiB."""
    batch: list[bytes] = []
    size = 0
    for raw in lines:
        line = raw.rstrip(b"\r\n")
        if line.startswith(b"."):
            line = b"." + line
        batch.append(line + b"\r\n")
        size += len(line) + 2
        if size >= _CHUNK:
            yield b"".join(batch)
            batch, size = [], 0
    if batch:
        yield b"".join(batch)


def _message_lines(message: bytes | Path) -> Iterator[bytes]:
    if isinstance(message, Path):
        with message.open("rb") as f:
            # A lone CR is a line end to LMTP's sender as to Dovecot: split on it here too.
            for line in f:
                yield from line.replace(b"\r\n", b"\n").replace(b"\r", b"\n").splitlines()
        return
    yield from (
        message.replace(b"\r\n", b"\n")
        .replace(b"\r", b"\n")
        .split(b"\n")[: -1 if message.endswith((b"\n", b"\r")) else None]
    )


async def _lmtp_session(
    socket_path: Path, sender: str, recipient: str, header: bytes, message: bytes | Path
) -> str:
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    try:

        async def reply(expect: str, what: str) -> str:
            lines: list[str] = []
            while True:
                raw = await reader.readline()
                if not raw:
                    raise FilingDeferred(f"Dovecot's LMTP closed the connection after {what}.")
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                lines.append(line)
                if line[3:4] != "-":
                    break
            text = " / ".join(lines)
            if not line.startswith(expect):
                error = FilingDeferred if line.startswith("4") else FilingRefused
                raise error(f"LMTP answered {what} with: {text}")
            return text

        async def command(line: str, expect: str) -> str:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()
            return await reply(expect, line.split(":", maxsplit=1)[0])

        await reply("220", "connecting")
        await command("LHLO onionpost", "250")
        await command(f"MAIL FROM:<{sender}>", "250")
        await command(f"RCPT TO:<{recipient}>", "250")
        await command("DATA", "354")
        if header:
            writer.write(b"".join(_stuffed_lines(header.splitlines())))
        for chunk in _stuffed_lines(_message_lines(message)):
            writer.write(chunk)
            await writer.drain()
        writer.write(b".\r\n")
        await writer.drain()
        done = await reply("250", "the message")  # one reply per recipient: ours
        with contextlib.suppress(OSError, FilingDeferred, FilingRefused):
            await command("QUIT", "221")
        return done
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# --- looking into the mailbox (doveadm) -----------------------------------------------------


def _uids_from(from_uid: int) -> list[str]:
    """The search keys for "UID ``from_uid`` or more" (none from 1: the whole folder).

    Dovecot checks a UID range against its index before it opens anything, so a header
    search limited to the newest messages costs the same in a folder of 100,000 as in one
    of 100, where the unlimited search reads (or looks up in its cache) every message's
    header: seconds, and more than :func:`_run`'s timeout when nothing is cached yet."""
    return ["uid", f"{from_uid}:*"] if from_uid > 1 else []


def doveadm_search(
    inst: Installation,
    layout: Layout,
    *,
    user: str,
    folder: str,
    header: str,
    value: str,
    from_uid: int = 1,
) -> list[str]:
    """The GUIDs/UIDs of messages in ``folder`` (UID ``from_uid`` or more) whose ``header``
    contains ``value``."""
    out = _run(
        [
            inst.doveadm,
            "-c",
            str(layout.config),
            "search",
            "-u",
            _check_user(user),
            "mailbox",
            folder,
            *_uids_from(from_uid),
            "header",
            header,
            value,
        ]
    )
    return [line.split()[-1] for line in out.splitlines() if line.strip()]


def doveadm_uidnext(inst: Installation, layout: Layout, *, user: str, folder: str) -> int:
    """``folder``'s UIDNEXT, from Dovecot's index (no message is read)."""
    out = _run(
        [
            inst.doveadm,
            "-c",
            str(layout.config),
            "mailbox",
            "status",
            "-u",
            _check_user(user),
            "uidnext",
            folder,
        ]
    )
    m = re.search(r"uidnext=(\d+)", out)
    if m is None:
        raise MailServerError(f"doveadm mailbox status gave no UIDNEXT for {folder}: {out!r}")
    return int(m.group(1))


def doveadm_add_flags(
    inst: Installation,
    layout: Layout,
    *,
    user: str,
    folder: str,
    header: str,
    value: str,
    flags: str,
    from_uid: int = 1,
) -> None:
    """Add ``flags`` (e.g. ``\\Seen``) to the messages in ``folder`` (UID ``from_uid`` or
    more) whose ``header`` has ``value``."""
    _run(
        [
            inst.doveadm,
            "-c",
            str(layout.config),
            "flags",
            "add",
            "-u",
            _check_user(user),
            flags,
            "mailbox",
            folder,
            *_uids_from(from_uid),
            "header",
            header,
            value,
        ]
    )


def doveadm_sync(inst: Installation, layout: Layout, *, user: str, folder: str) -> None:
    """Have Dovecot sync ``folder``: with ``maildir_empty_new`` that moves its new/ to cur/.

    A doveadm search syncs the folder before it looks, in 2.3 and 2.4 alike (doveadm's mail
    iterator); ``mailbox status`` need not, since the folder list index may answer it.  The
    search itself (UID 1) is the cheapest there is.  Flags, \\Recent and UIDs stay as they
    are (see :meth:`DovecotServer.tidy_new_mail`).
    """
    _run(
        [
            inst.doveadm,
            "-c",
            str(layout.config),
            "search",
            "-u",
            _check_user(user),
            "mailbox",
            folder,
            "uid",
            "1",
        ]
    )


def doveadm_force_resync(
    inst: Installation, layout: Layout, *, user: str, folder: str = "*"
) -> None:
    """Have Dovecot read ``folder`` (a mask: ``*`` is every folder) from disk as if it had no
    index: every file in ``cur/`` and ``new/`` is listed and checked against the uidlist and the
    index, which are corrected (new files get UIDs, vanished ones are expunged)."""
    _run(
        [inst.doveadm, "-c", str(layout.config), "force-resync", "-u", _check_user(user), folder],
        timeout=600.0,
    )


def request_resync(layout: Layout) -> None:
    """Say that Maildir files were written without Dovecot: its next start rereads every folder.

    Why: ``maildir_very_dirty_syncs`` lets Dovecot trust its index about ``cur/`` and read the
    directory only when its mtime changed.  A file written into ``cur/`` in the same clock tick
    as Dovecot's last look, or a directory whose mtime was set back (a restore), would be
    missed until something else changed the directory, and mail delivered meanwhile would be
    numbered before them (tests/integration/test_dovecot.py shows both).  Whatever
    writes Maildir files itself (gateway/mailbox_upgrade.py, ``onionpost restore``) calls this
    first; :meth:`DovecotServer.start` then runs :func:`doveadm_force_resync` for every user
    once Dovecot answers (doveadm looks users up through it) and before the node files
    anything, and removes the marker once all succeeded.
    """
    layout.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(layout.resync_marker, b"Maildir files were written outside Dovecot.\n")


# --- the running server -------------------------------------------------------------------


class DovecotServer:
    """Starts the private Dovecot, waits until IMAP and LMTP answer, restarts it if it dies.

    ``status`` is one line for ``onionpost status``: "running", "restarting (...)", "stopped"
    or "failed (...)".  A restart waits 1 s, doubling to 60 s while Dovecot keeps dying soon
    after starting; a run of a minute or more resets the wait.

    While it runs, every ``TIDY_INTERVAL`` seconds it looks into the Maildirs' new/ directories
    (:meth:`tidy_new_mail`): mail filed while no client had the folder selected waits there,
    and Dovecot's first SELECT would rename all of it into cur/ while the client waits.  It
    also keeps Dovecot's log from growing without end (:meth:`rotate_log`).
    """

    RESTART, STABLE_AFTER = DOVECOT_RESTART, 60.0
    TIDY_INTERVAL = 5.0
    LOG_LIMIT = LOG_ROTATE_BYTES

    def __init__(
        self,
        layout: Layout,
        settings: Settings,
        *,
        installation: Installation | None = None,
        identity: Identity | None = None,
        ready_timeout: float = 20.0,
        clock: Clock | None = None,
    ) -> None:
        #: The node's clock: the restart backoff and the tidying interval wait on it (the
        #: readiness and stop deadlines bound real waiting on a real process, on purpose).
        self.clock: Clock = clock or SystemClock()
        self.layout = layout
        self.settings = settings
        self._inst = installation
        self._ident = identity
        self.ready_timeout = ready_timeout
        self.status = "stopped"
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self._output: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_lines: list[str] = []
        self._tidy: asyncio.Task[None] | None = None
        self._tidy_error: str | None = None
        self._log_error = ""
        #: The filer's kept-open IMAP sessions, one per user (gateway/imapsession.py).
        self.imap_sessions = ImapSessions(self._imap_argv)

    def _imap_argv(self, user: str) -> list[str]:
        """Dovecot's ``imap`` for ``user``, pre-authenticated on standard input and output,
        as the mail user (doveadm finds the program and looks the user up, as for its own
        commands)."""
        return [
            self.installation.doveadm,
            "-c",
            str(self.layout.config),
            "exec",
            "imap",
            "-u",
            _check_user(user),
        ]

    @property
    def installation(self) -> Installation:
        if self._inst is None:
            self._inst = find_installation()
        return self._inst

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    @property
    def lmtp_socket(self) -> Path:
        return self.layout.lmtp_socket

    async def start(self) -> None:
        """Prepare the files, start Dovecot and return once IMAP and LMTP both answer."""
        inst = self.installation
        self._ident = await asyncio.to_thread(
            prepare, self.layout, self.settings, inst, self._ident
        )
        self._stopping = False
        self.status = "starting"
        self.imap_sessions.reopen()
        try:
            await self._spawn()
            if self.layout.resync_marker.exists():  # doveadm needs Dovecot's auth for users
                await asyncio.to_thread(self.resync_all)
        except BaseException:
            await self._terminate()
            self.status = "stopped"
            raise
        self.status = "running"
        log.info(
            "Dovecot %s: IMAP on %s:%d, LMTP at %s",
            inst.version_text.split()[0],
            self.settings.host,
            self.settings.imap_port,
            self.layout.lmtp_socket,
        )
        self._watch = asyncio.create_task(self._supervise(), name="dovecot-supervisor")
        self._tidy = asyncio.create_task(self._tidy_loop(), name="dovecot-tidy")

    async def set_password(self, user: str, password: str) -> None:
        """Set (or replace) ``user``'s IMAP password; hashing takes a noticeable moment."""
        await asyncio.to_thread(
            PasswdFile(self.layout).set_password, self.installation, user, password
        )

    async def deliver(
        self, user: str, message: bytes | Path, *, folder: str = "INBOX", sender: str = ""
    ) -> str:
        """File a message through LMTP (see :func:`lmtp_deliver`)."""
        if self.status != "running":
            raise FilingDeferred(f"Dovecot is {self.status}.")
        return await lmtp_deliver(
            self.layout.lmtp_socket, user, message, folder=folder, sender=sender
        )

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL to the whole process group after ``timeout`` seconds."""
        self._stopping = True
        for task in (self._tidy, self._watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._tidy = self._watch = None
        await self.imap_sessions.close()
        await self._terminate(timeout)
        self.status = "stopped"

    def resync_all(self) -> list[str]:
        """Reread every user's folders from disk (see :func:`request_resync`); the users done.

        Blocking: run it in a thread.  :meth:`start` calls it when the marker is there, once
        Dovecot answers and before it returns (so before the node files anything).  A user
        whose resync fails is logged and the marker stays, so the next start tries again (the
        mail is on disk either way; only a client may not see all of it yet).
        """
        done: list[str] = []
        failed = False
        try:
            users = sorted(p.name for p in self.layout.mail.iterdir() if _USER.match(p.name))
        except OSError:
            users = []
        for user in users:
            started = time.monotonic()
            try:
                doveadm_force_resync(self.installation, self.layout, user=user)
            except MailServerError as exc:
                log.error("Dovecot could not reread %s's folders: %s", user, exc)
                failed = True
                continue
            log.info(
                "Dovecot reread %s's folders from disk in %.1f s (Maildir files were written "
                "outside Dovecot)",
                user,
                time.monotonic() - started,
            )
            done.append(user)
        if not failed:
            with contextlib.suppress(FileNotFoundError):
                self.layout.resync_marker.unlink()
        return done

    def tidy_new_mail(self) -> list[tuple[str, str]]:
        """Have Dovecot move mail waiting in new/ to cur/ where :data:`TIDY_AT` or more wait;
        the (user, folder) pairs it did.  Blocking: run it in a thread.

        Why: LMTP saves into new/, and Dovecot moves new/ to cur/ when a session SELECTs the
        folder.  With a client in IDLE that is a file or two at a time; after a pile of mail
        filed while no client looked (a week away, a mailing list), the first SELECT renamed
        every file while the client waited, about five times as long as the same SELECT of a
        mailbox already in cur/ (docs/performance.md, IMAP).  ``maildir_empty_new`` lets any
        sync move them, so a doveadm sync here does that work ahead of the client.  Only the
        files' directory changes: \\Recent (kept in Dovecot's index), the flags in the file
        names (none: unread) and the UIDs stay as they were.  While nothing waits, this costs
        a look into two directories per user.
        """
        done: list[tuple[str, str]] = []
        try:
            users = sorted(p.name for p in self.layout.mail.iterdir() if _USER.match(p.name))
        except OSError:
            return done
        for user in users:
            for folder, subdir in FILED_FOLDERS:
                new = self.layout.maildir(user) / subdir / "new"
                try:
                    with os.scandir(new) as entries:
                        waiting = sum(1 for _ in zip(entries, range(TIDY_AT), strict=False))
                except OSError:
                    continue  # no such folder (yet)
                if waiting < TIDY_AT:
                    continue
                try:
                    doveadm_sync(self.installation, self.layout, user=user, folder=folder)
                except MailServerError as exc:
                    # Harmless (the next SELECT moves the mail); said once, not every pass.
                    if str(exc) != self._tidy_error:
                        log.warning("could not have Dovecot move new mail into place: %s", exc)
                    self._tidy_error = str(exc)
                    continue
                done.append((user, folder))
        return done

    def rotate_log(self) -> bool:
        """Set Dovecot's log aside once it passes the limit (onionpost.base.logfiles) and have
        Dovecot reopen it; whether it did.  Blocking: run it in a thread.  Dovecot writes into
        the renamed file until it has reopened, so no line is lost."""
        try:
            if not set_aside_if_large(self.layout.log, self.LOG_LIMIT):
                return False
            _run([self.installation.doveadm, "-c", str(self.layout.config), "log", "reopen"])
        except (OSError, MailServerError) as exc:
            if str(exc) != self._log_error:  # said once, not every pass
                log.warning("could not start a new Dovecot log at %s: %s", self.layout.log, exc)
            self._log_error = str(exc)
            return False
        self._log_error = ""
        return True

    async def _tidy_loop(self) -> None:
        while True:
            await self.clock.sleep(self.TIDY_INTERVAL)
            if self.status == "running":
                for user, folder in await asyncio.to_thread(self.tidy_new_mail):
                    log.debug("Dovecot moved %s's new mail in %s to cur/", user, folder)
                if await asyncio.to_thread(self.rotate_log):
                    log.info("Dovecot's log was set aside as %s.1", self.layout.log.name)

    # -- internals --

    def _stop_requested(self) -> bool:
        return self._stopping

    async def _spawn(self) -> None:
        await asyncio.to_thread(self._stop_stale_master)
        self._last_lines = []
        self._proc = await asyncio.create_subprocess_exec(
            self.installation.dovecot,
            "-F",
            "-c",
            str(self.layout.config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() can kill all of it
            env={
                "PATH": f"/usr/bin:/bin:{_EXTRA_PATH}",
                "LANG": "C.UTF-8",
                _TLS_REQUIRED_ENV: TLS_REQUIRED,  # read by 2.3's auth (_passdbs_23)
            },
        )
        self._output = asyncio.create_task(self._read_output(self._proc))
        await self._wait_ready(self._proc)

    async def _read_output(self, proc: asyncio.subprocess.Process) -> None:
        """What Dovecot prints before its log is open (fatal configuration errors)."""
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self._last_lines = [*self._last_lines[-9:], line]
            log.warning("dovecot: %s", line)

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if proc.returncode is not None:
                raise MailServerError(
                    f"Dovecot exited with status {proc.returncode} while starting: {self._why()}"
                )
            if await self._answers():
                return
            if time.monotonic() > deadline:
                raise MailServerError(
                    f"Dovecot did not answer within {self.ready_timeout:.0f} s: {self._why()}"
                )
            await asyncio.sleep(0.05)

    def _why(self) -> str:
        lines = [*self._last_lines, *_tail(self.layout.log, 5)]
        errors = [line for line in lines if "Fatal" in line or "Error" in line]
        return (errors or lines or ["no output"])[-1]

    async def _answers(self) -> bool:
        """IMAP greets with "* OK" and LMTP with "220"."""
        writers: list[asyncio.StreamWriter] = []  # closed also when a greeting never comes
        try:
            async with asyncio.timeout(2):
                r, w = await asyncio.open_connection(
                    connect_host(self.settings.host), self.settings.imap_port
                )
                writers.append(w)
                imap = await r.readline()
                w.close()
                r, w2 = await asyncio.open_unix_connection(str(self.layout.lmtp_socket))
                writers.append(w2)
                lmtp = await r.readline()
                w2.write(b"QUIT\r\n")
                w2.close()
        except (OSError, TimeoutError):
            return False
        finally:
            for writer in writers:
                writer.close()
        return imap.startswith(b"* OK") and lmtp.startswith(b"220")

    async def _supervise(self) -> None:
        backoff = Backoff(self.RESTART)
        while not self._stopping:
            proc = self._proc
            assert proc is not None
            started = self.clock.monotonic()
            code = await _exit_status(proc)
            if self._stop_requested():  # stop() may have been called while we waited
                return
            # The filer's IMAP sessions belong to the Dovecot that died: they end with it and
            # the first use after the restart starts new ones.
            await self.imap_sessions.close()
            self.imap_sessions.reopen()
            if self.clock.monotonic() - started >= self.STABLE_AFTER:
                backoff.succeeded()  # it ran a while: this exit starts the backoff over
            why = self._why()
            self.status = f"restarting (Dovecot exited with status {code}: {why})"
            delay = backoff.failed()
            log.error("Dovecot exited with status %s (%s); restarting in %.0f s", code, why, delay)
            await self.clock.sleep(delay)
            try:
                await self._terminate(1.0)  # what is left of the old process group
                await self._spawn()
            except MailServerError as exc:
                self.status = f"restarting ({exc})"
                log.error("%s", exc)
                continue
            self.restarts += 1
            self.status = "running"
            log.info("Dovecot restarted (%d restarts so far)", self.restarts)

    async def _terminate(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                log.warning("Dovecot did not stop within %.0f s: killing it", timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, if any
        # ... and gone before this returns: a straggler still holds the master's listeners
        # (the LMTP socket), and a Dovecot started meanwhile (the next run of the node)
        # refuses to start: "Socket already exists".
        await asyncio.to_thread(_wait_group_gone, proc.pid, 2.0)
        if proc.returncode is None:
            await proc.wait()
        if self._output is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._output, 1.0)
            self._output = None

    def _stop_stale_master(self) -> None:
        """Clear what an earlier run left in the way of Dovecot's start.

        A node killed hard leaves its Dovecot running: it is stopped here. A Dovecot killed
        hard leaves ``master.pid`` behind, and Dovecot refuses to start while any process has
        that pid; with pid_max at 32768 the number is soon reused by an unrelated process, so
        a pid file that does not name our own Dovecot is removed. The node holds the data
        directory's lock, so no other run of this node can own that file.
        """
        pid_file = self.layout.base_dir / "master.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            with contextlib.suppress(OSError):
                pid_file.unlink()
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            cmdline = []
        if str(self.layout.config).encode() not in cmdline:
            if not _running(pid):
                # A master killed hard can leave its children behind it for a while, and they
                # hold its listeners: the new master would refuse to start.  Its process
                # group has no leader now (a reused pid leads a group of its own: left alone).
                _end_stragglers(pid)
            with contextlib.suppress(OSError):
                pid_file.unlink()  # gone, a zombie, or a reused pid: not a Dovecot of ours
            return
        log.warning("stopping Dovecot (pid %d) left over from an earlier run", pid)
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _running(pid):
                break
        # Its children (imap-login holds the IMAP port) can outlive the master by a moment:
        # they are in its process group (Dovecot runs in a session of its own), so end them too.
        _end_group(pid)
        with contextlib.suppress(OSError):
            pid_file.unlink()


def _end_group(pgid: int) -> None:
    """SIGTERM, then SIGKILL, the processes of group ``pgid``; return once none is left."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        if _wait_group_gone(pgid, wait):
            return


def _wait_group_gone(pgid: int, wait: float) -> bool:
    """Whether no process of group ``pgid`` is alive, waiting ``wait`` seconds at most."""
    deadline = time.monotonic() + wait
    while any(_running(p) for p in _group_members(pgid)):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _end_stragglers(pgid: int) -> None:
    """SIGKILL the Dovecot processes left in the group of a master that is gone."""
    left = [p for p in _group_members(pgid) if _is_dovecot(p)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while any(_running(p) for p in left) and time.monotonic() < deadline:
        time.sleep(0.02)


def _is_dovecot(pid: int) -> bool:
    """Dovecot's processes name themselves ``dovecot/<service>`` (``dovecot/lmtp`` ...)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"dovecot")
    except OSError:
        return False


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid):
            members.append(int(entry.name))
    return members


async def _exit_status(proc: asyncio.subprocess.Process) -> int:
    """The master's exit status, as soon as it has exited.

    ``proc.wait()`` alone also waits for the end of the master's output pipe, which its
    children hold until they notice it is gone: tens of seconds while the filer's kept IMAP
    session keeps one of them busy, and mail would wait that long for the restart."""
    waiting = asyncio.ensure_future(proc.wait())
    try:
        while proc.returncode is None and not waiting.done():
            await asyncio.wait({waiting}, timeout=0.5)
    finally:
        waiting.cancel()
    return proc.returncode if proc.returncode is not None else waiting.result()


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie has exited, only its parent has not looked)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _tail(path: Path, n: int) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            return f.read().decode("utf-8", "replace").splitlines()[-n:]
    except OSError:
        return []
