"""The node's private Dovecot, for real: generated configuration, IMAP over STARTTLS, LMTP.

Each test starts a Dovecot of the installed version (2.3 on Debian 12, 2.4 on Debian 13)
from the configuration gateway/dovecot.py writes into a temporary data directory, and talks
to it the way mail clients (imaplib) and the node (LMTP) will.  Nothing in /etc/dovecot is
used.  Data directories live under a 0755 folder in /tmp rather than pytest's 0700 tmp_path:
as root, Dovecot's mail account has to pass through every folder above them.
"""

from __future__ import annotations

import asyncio
import imaplib
import os
import pwd
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway import dovecot as dovecot_module
from gateway.dovecot import (
    SPECIAL_FOLDERS,
    TIDY_AT,
    TLS_REQUIRED,
    DovecotServer,
    Identity,
    Installation,
    Layout,
    PasswdFile,
    Settings,
    choose_identity,
    doveadm_force_resync,
    doveadm_sync,
    doveadm_uidnext,
    find_installation,
    lmtp_deliver,
    render_config,
    request_resync,
)
from gateway.tls import ensure_tls
from onionpost.core.errors import (
    FilingRefused,
    MailServerError,
    MailServerNotInstalled,
    UnknownLocalUser,
)
from onionpost.core.retry import RetryPolicy
from onionpost.core.trust import QUARANTINE
from onionpost.testing.ports import free_port

USER, PASSWORD = "alice", "correct horse battery"
REPO = Path(__file__).resolve().parents[2]


def message(subject: str, body: bytes = b"hello\r\n") -> bytes:
    return (
        f"From: Bob <bob@{'b' * 56}.onion>\r\nTo: alice@{'a' * 56}.onion\r\n"
        f"Subject: {subject}\r\nMessage-ID: <{subject}@x>\r\n\r\n"
    ).encode() + body


@pytest.fixture(scope="module")
def installation() -> Installation:
    try:
        return find_installation()
    except MailServerNotInstalled as exc:
        pytest.skip(f"{exc} (scripts/system-deps.sh test installs it)")


@pytest.fixture
def data_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="opdc-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base / "data"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def server(installation: Installation, data_dir: Path) -> AsyncIterator[DovecotServer]:
    srv = DovecotServer(
        Layout(data_dir), Settings(imap_port=free_port()), installation=installation
    )
    srv.RESTART = RetryPolicy(0.2, 60, jitter=0)
    await srv.set_password(USER, PASSWORD)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def imap_login(srv: DovecotServer, password: str = PASSWORD) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", srv.settings.imap_port)
    assert "STARTTLS" in client.capabilities
    ca = srv.layout.tls / "ca.pem"
    client.starttls(ssl.create_default_context(cafile=str(ca)))  # verifies the local CA
    try:
        client.login(USER, password)
    except imaplib.IMAP4.error:
        client.shutdown()
        raise
    return client


def fetch_all(client: imaplib.IMAP4, folder: str) -> list[bytes]:
    typ, _ = client.select(folder, readonly=True)
    assert typ == "OK"
    typ, data = client.fetch("1:*", "(BODY.PEEK[])")
    assert typ == "OK"
    return [part[1] for part in data if isinstance(part, tuple)]


async def test_imap_over_starttls_and_lmtp_to_inbox_and_sent(server: DovecotServer) -> None:
    inbox_msg = message("to-inbox", b"first line\r\n.a line with a dot\r\n")
    sent_msg = message("to-sent")
    reply = await server.deliver(USER, inbox_msg, sender=f"bob@{'b' * 56}.onion")
    assert reply.startswith("250")
    assert (await server.deliver(USER, sent_msg, folder="Sent")).startswith("250")

    def client_side() -> None:
        client = imap_login(server)
        try:
            typ, caps = client.capability()
            assert typ == "OK"
            capabilities = caps[0].split()
            assert b"IDLE" in capabilities
            assert b"SPECIAL-USE" in capabilities
            typ, listing = client.list()
            assert typ == "OK"
            for name, flag in SPECIAL_FOLDERS:
                line = next(
                    x for x in listing if isinstance(x, bytes) and x.endswith(name.encode())
                )
                assert flag.encode() in line
            typ, subscribed = client.lsub()
            assert {x.rsplit(b" ", 1)[-1] for x in subscribed if isinstance(x, bytes)} >= {
                n.encode() for n, _ in SPECIAL_FOLDERS
            }
            # LMTP always puts a Return-Path line above the message; the rest is byte for byte.
            expected = f"Return-Path: <bob@{'b' * 56}.onion>\r\n".encode() + inbox_msg
            assert fetch_all(client, "INBOX") == [expected]
            assert fetch_all(client, "Sent") == [b"Return-Path: <>\r\n" + sent_msg]
        finally:
            client.logout()

    await asyncio.to_thread(client_side)
    # LMTP filed into new/; EXAMINE synced, which (maildir_empty_new) moved each to cur/ unread.
    maildir = server.layout.maildir(USER)
    for folder in (maildir, maildir / ".Sent"):
        assert not list((folder / "new").iterdir())
        assert [p.name.rsplit(":2,", 1)[1] for p in (folder / "cur").iterdir()] == [""]


async def test_idle_sees_an_lmtp_delivery(server: DovecotServer) -> None:
    client = await asyncio.to_thread(imap_login, server)
    try:
        await asyncio.to_thread(client.select, "INBOX")
        tag = client._new_tag()  # imaplib on Python 3.11 has no idle()
        client.send(tag + b" IDLE\r\n")
        assert (await asyncio.to_thread(client.readline)).startswith(b"+")
        await server.deliver(USER, message("pushed"))
        pushed = await asyncio.wait_for(asyncio.to_thread(client.readline), 10)
        assert pushed.strip() == b"* 1 EXISTS"
        client.send(b"DONE\r\n")
        line = await asyncio.to_thread(client.readline)
        while line.startswith(b"* "):  # "* 1 RECENT" may follow
            line = await asyncio.to_thread(client.readline)
        assert line.startswith(tag + b" OK")
    finally:
        await asyncio.to_thread(client.logout)


def _subjects_and_flags(client: imaplib.IMAP4) -> list[tuple[str, str]]:
    typ, data = client.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK"
    found = []
    for part in data:
        if isinstance(part, tuple):
            flags = part[0].split(b"FLAGS (", 1)[1].split(b")", 1)[0].decode()
            found.append((part[1].decode().split(":", 1)[1].strip(), flags))
    return found


async def test_a_pile_of_new_mail_is_moved_before_a_client_looks(server: DovecotServer) -> None:
    """Mail filed while no client looks waits in new/; the node has Dovecot move it to cur/
    (tidy_new_mail) so that the first SELECT need not.  The client still sees every message
    unread and \\Recent, in the order filed, and a folder with a few waiting is left alone."""
    count = TIDY_AT + 3
    for i in range(count):
        await server.deliver(USER, message(f"pile-{i:02d}"))
    await server.deliver(USER, message("sent-copy"), folder="Sent")
    maildir = server.layout.maildir(USER)
    assert len(list((maildir / "new").iterdir())) == count

    assert await asyncio.to_thread(server.tidy_new_mail) == [(USER, "INBOX")]
    assert not list((maildir / "new").iterdir())
    moved = [p.name for p in (maildir / "cur").iterdir()]
    assert len(moved) == count and all(name.endswith(":2,") for name in moved)  # no flags
    assert len(list((maildir / ".Sent" / "new").iterdir())) == 1  # fewer than TIDY_AT
    assert await asyncio.to_thread(server.tidy_new_mail) == []  # nothing left to do

    def client_side() -> None:
        client = imap_login(server)
        try:
            typ, data = client.select("INBOX")
            assert typ == "OK" and int(data[0]) == count
            assert client.response("RECENT")[1] == [str(count).encode()]
            assert _subjects_and_flags(client) == [
                (f"pile-{i:02d}", "\\Recent") for i in range(count)
            ]
            typ, data = client.search(None, "UNSEEN")
            assert typ == "OK" and len(data[0].split()) == count
        finally:
            client.logout()

    await asyncio.to_thread(client_side)


async def test_the_running_server_moves_piled_up_mail_itself(
    installation: Installation, data_dir: Path
) -> None:
    srv = DovecotServer(
        Layout(data_dir), Settings(imap_port=free_port()), installation=installation
    )
    srv.TIDY_INTERVAL = 0.1
    await srv.set_password(USER, PASSWORD)
    await srv.start()
    try:
        for i in range(TIDY_AT):
            await srv.deliver(USER, message(f"bulk-{i:02d}"))
        new = srv.layout.maildir(USER) / "new"
        for _ in range(600):  # a loaded machine may take a while; normally well under 1 s
            if not list(new.iterdir()):
                break
            await asyncio.sleep(0.1)
        assert not list(new.iterdir())
        client = await asyncio.to_thread(imap_login, srv)
        try:
            typ, data = await asyncio.to_thread(client.select, "INBOX")
            assert typ == "OK" and int(data[0]) == TIDY_AT
        finally:
            await asyncio.to_thread(client.logout)
    finally:
        await srv.stop()


async def test_a_file_is_delivered_too(server: DovecotServer) -> None:
    path = server.layout.data_dir.parent / "message.eml"
    path.write_bytes(message("from-a-file"))
    await server.deliver(USER, path, folder="Archive")
    client = await asyncio.to_thread(imap_login, server)
    try:
        got = await asyncio.to_thread(fetch_all, client, "Archive")
    finally:
        await asyncio.to_thread(client.logout)
    assert got == [b"Return-Path: <>\r\n" + message("from-a-file")]


async def test_quarantine_is_made_subscribed_and_takes_held_mail(server: DovecotServer) -> None:
    """Held mail (a contact's unaccepted new identity key) goes to Quarantine: every mailbox
    has it, subscribed, with no SPECIAL-USE role, and LMTP files into it."""
    held = message("held")
    assert (await server.deliver(USER, held, folder=QUARANTINE)).startswith("250")

    def client_side() -> tuple[list[bytes], list[bytes], list[bytes]]:
        client = imap_login(server)
        try:
            listing = [x for x in client.list()[1] if isinstance(x, bytes)]
            subscribed = [x for x in client.lsub()[1] if isinstance(x, bytes)]
            return listing, subscribed, fetch_all(client, QUARANTINE)
        finally:
            client.logout()

    listing, subscribed, got = await asyncio.to_thread(client_side)
    (line,) = [x for x in listing if x.rsplit(b" ", 1)[-1].strip(b'"') == QUARANTINE.encode()]
    assert not any(flag.encode() in line for _, flag in SPECIAL_FOLDERS)
    assert QUARANTINE.encode() in {x.rsplit(b" ", 1)[-1].strip(b'"') for x in subscribed}
    assert got == [b"Return-Path: <>\r\n" + held]


async def test_wrong_password_and_bad_recipients_are_refused(server: DovecotServer) -> None:
    with pytest.raises(imaplib.IMAP4.error, match=r"AUTHENTICATIONFAILED|Authentication failed"):
        await asyncio.to_thread(imap_login, server, "wrong password")
    # A user without an IMAP password still gets mail (allow_all_users): the node files for
    # its own users only, and only it can reach the LMTP socket.
    await server.deliver("carol", message("no password yet"))
    with pytest.raises(UnknownLocalUser):
        await server.deliver("Mallory Smith", message("nobody"))
    with pytest.raises(FilingRefused):
        await lmtp_deliver(server.lmtp_socket, USER, b"x", folder="../etc")


async def test_password_stays_out_of_config_and_files(server: DovecotServer) -> None:
    layout = server.layout
    assert (layout.passwd.stat().st_mode & 0o777) == 0o600
    line = layout.passwd.read_text()
    assert line.startswith(f"{USER}:{{{server.installation.scheme}}}")
    assert PASSWORD not in line
    for path in (layout.config, layout.log):
        assert PASSWORD not in path.read_text()
    # A new password replaces the old one at once: Dovecot rereads the changed file.
    await server.set_password(USER, "a new password")
    assert PasswdFile(layout).users() == [USER]
    client = await asyncio.to_thread(imap_login, server, "a new password")
    await asyncio.to_thread(client.logout)


async def test_killed_dovecot_is_restarted_and_stop_is_clean(server: DovecotServer) -> None:
    first = server.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while server.restarts < 1 or server.status != "running":
        assert time.monotonic() < deadline, server.status
        await asyncio.sleep(0.05)
    assert server.pid not in (None, first)
    assert (await server.deliver(USER, message("after-restart"))).startswith("250")

    pid = server.pid
    assert pid is not None
    started = time.monotonic()
    await server.stop()
    assert time.monotonic() - started < 5
    assert server.status == "stopped"
    assert not _ours_running(server.layout)


def _ours_running(layout: Layout) -> list[int]:
    """Processes whose command line names this data directory's Dovecot configuration."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if str(layout.config).encode() in cmdline:
                found.append(int(proc.name))
    return found


async def test_a_dovecot_left_over_by_a_killed_node_is_replaced(
    installation: Installation, data_dir: Path
) -> None:
    settings = Settings(imap_port=free_port())
    old = DovecotServer(Layout(data_dir), settings, installation=installation)
    await old.start()
    assert old._proc is not None
    orphan = old._proc.pid
    old._stopping = True  # as if the node were killed: nobody stops it
    assert old._watch is not None
    old._watch.cancel()
    new = DovecotServer(Layout(data_dir), settings, installation=installation)
    await new.start()
    try:
        assert new.pid != orphan
        assert new.status == "running"
    finally:
        await new.stop()
    if old._proc is not None and old._proc.returncode is None:
        await old._proc.wait()  # reaped: it was stopped by the new server
    assert not _ours_running(Layout(data_dir))


def test_configuration_for_both_versions(installation: Installation, tmp_path: Path) -> None:
    layout = Layout(tmp_path / "data")
    tls = ensure_tls(layout.tls)
    ident = Identity(False, "op", 1000, 1000, "op", "op", "op")
    v23 = Installation("dovecot", "doveadm", (2, 3, 19), "2.3.19.1", "ARGON2ID")
    v24 = Installation("dovecot", "doveadm", (2, 4, 1), "2.4.1-4", "ARGON2ID")
    old = render_config(v23, layout, ident, Settings(imap_port=1143), tls)
    new = render_config(v24, layout, ident, Settings(imap_port=1143, require_tls=True), tls)
    assert "mail_location = maildir:~" in old and "ssl_cert = <" in old
    assert new.splitlines()[0] == "dovecot_config_version = 2.4.0"
    assert "mail_driver = maildir" in new and "ssl_server_cert_file =" in new
    assert "ssl = required" in new and "ssl = yes" in old
    for text in (old, new):
        assert "port = 1143" in text and "lmtp_save_to_detail_mailbox = yes" in text
        assert "chroot =" in text  # unprivileged: nothing may chroot
        assert "maildir_empty_new = yes" in text  # the same name in 2.3 and 2.4
        assert "\nmailbox_list_index = no\n" in text  # likewise
    # require_tls: the first passdb's file is missing unless the login came over TLS, in each
    # version's expansion syntax; the second refuses the right password with the reason.
    assert f"  args = {layout.passwd}\n}}\nuserdb" in old
    tls_only = "%{if(secured, 'eq', 'TLS', '', '.without-tls')}"
    assert f"  passwd_file_path = {layout.passwd}{tls_only}\n" in new
    assert f'    nologin = yes\n    reason = "{TLS_REQUIRED}"\n' in new
    old_tls = render_config(v23, layout, ident, Settings(require_tls=True), tls)
    assert f"  args = {layout.passwd}%{{if;%{{secured}};eq;TLS;;.without-tls}}\n" in old_tls
    assert "override_fields = nologin=y reason=%{env:ONIONPOST_TLS_REQUIRED}\n" in old_tls
    plain_24 = render_config(v24, layout, ident, Settings(), tls)
    assert f"  passwd_file_path = {layout.passwd}\n}}\nuserdb" in plain_24
    assert "nologin" not in plain_24 + old
    # The installed Dovecot accepts the file written for it, with and without require_tls.
    layout.root.mkdir(parents=True)
    for require_tls in (False, True):
        mine = render_config(
            installation, layout, choose_identity(tmp_path), Settings(require_tls=require_tls), tls
        )
        layout.config.write_text(mine)
        done = subprocess.run(
            [shutil.which("doveconf", path="/usr/bin:/usr/sbin:/bin") or "doveconf",
             "-c", str(layout.config), "-n"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr


# --- as an unprivileged user ----------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, imaplib, ssl, sys
    from pathlib import Path
    from gateway.dovecot import DovecotServer, Layout, Settings

    async def main(data, port):
        srv = DovecotServer(Layout(Path(data)), Settings(imap_port=port))
        await srv.set_password("alice", "pw for alice")
        await srv.start()
        try:
            assert srv._ident is not None and not srv._ident.privileged
            await srv.deliver("alice", b"Subject: one\\r\\n\\r\\nbody\\r\\n")
            await srv.deliver("alice", b"Subject: two\\r\\n\\r\\nbody\\r\\n", folder="Sent")
            def imap():
                m = imaplib.IMAP4("127.0.0.1", port)
                m.starttls(ssl.create_default_context(cafile=data + "/tls/ca.pem"))
                m.login("alice", "pw for alice")
                counts = [m.select(f, readonly=True)[1][0].decode() for f in ("INBOX", "Sent")]
                m.logout()
                return counts
            print("COUNTS", *(await asyncio.to_thread(imap)))
        finally:
            await srv.stop()
        print("STATUS", srv.status)

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


@pytest.fixture
def unprivileged_user() -> Iterator[str]:
    """The current user if not root; as root, a temporary system account made for the test."""
    if os.geteuid() != 0:
        yield pwd.getpwuid(os.geteuid()).pw_name
        return
    if shutil.which("useradd") is None or shutil.which("runuser") is None:
        pytest.skip("running as root without useradd/runuser to make an unprivileged user")
    name = f"opdc{os.getpid() % 100000}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True,
    )
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False)


def _python_for(user: str) -> list[str]:
    """An interpreter the user can run with this checkout's packages importable."""
    site = [p for p in sys.path if p.endswith("site-packages")]
    path = os.pathsep.join([str(REPO), *site])
    candidates = [sys.executable]
    if sys.version_info[:2] == (3, 11) and Path("/usr/bin/python3.11").exists():
        candidates.append("/usr/bin/python3.11")  # the venv's own Python may sit under /root
    if sys.version_info[:2] == (3, 13) and Path("/usr/bin/python3.13").exists():
        candidates.append("/usr/bin/python3.13")
    for python in candidates:
        argv = [f"PYTHONPATH={path}", python]
        probe = _as(user, [*argv, "-c", "import gateway.dovecot"])
        if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
            return argv
    pytest.skip(f"no Python interpreter that {user} may run can import this checkout")


def _as(user: str, argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return ["env", *argv]
    return ["runuser", "-u", user, "--", "env", *argv]


def test_the_whole_thing_as_an_unprivileged_user(
    installation: Installation, unprivileged_user: str
) -> None:
    python = _python_for(unprivileged_user)
    base = Path(tempfile.mkdtemp(prefix="opdc-user-", dir="/tmp"))
    try:
        base.chmod(0o755)
        data = base / "data"
        data.mkdir(mode=0o700)
        script = base / "child.py"
        script.write_text(CHILD)
        script.chmod(0o644)
        if os.geteuid() == 0:
            account = pwd.getpwnam(unprivileged_user)
            os.chown(data, account.pw_uid, account.pw_gid)
        argv = _as(unprivileged_user, [*python, str(script), str(data), str(free_port())])
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "COUNTS 1 1" in done.stdout
        assert "STATUS stopped" in done.stdout
        owner = pwd.getpwuid(os.getuid() if os.geteuid() else account.pw_uid).pw_name
        maildir = data / "mail" / "alice"
        assert pwd.getpwuid(maildir.stat().st_uid).pw_name == owner
        assert not _ours_running(Layout(data))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_cli_keeps_dovecots_logins_in_step(tmp_path: Path) -> None:
    """init, password and users remove write the private Dovecot's passwd-file too, so the
    IMAP server that replaces pymap knows every password (hashes only, never the text)."""
    from click.testing import CliRunner

    from onionpost.app.cli import cli

    home = tmp_path / "home"

    def run(*args: str) -> str:
        result = CliRunner().invoke(cli, ["--data-dir", str(home), *args])
        assert result.exit_code == 0, result.output
        return result.output

    password = run("init", "--user", "alice").split("password:")[1].split()[0]
    passwd = PasswdFile(Layout(home))
    assert passwd.users() == ["alice"]
    first = passwd.path.read_text()
    assert password not in first and first.startswith("alice:{")
    run("password", "--generate")
    assert passwd.path.read_text() != first
    run("users", "add", "bob")
    assert passwd.users() == ["alice", "bob"]
    run("users", "remove", "bob", "--yes")
    assert passwd.users() == ["alice"]


async def test_the_filers_searches_from_a_uid_floor(server: DovecotServer) -> None:
    """A search from UIDNEXT read before a message was filed finds it (and only what came
    after); the \\Seen flag set from that floor lands on it alone (onionpost/device/filing.py)."""
    from gateway.service import DovecotSink

    sink = DovecotSink(server)
    for i in range(3):
        await lmtp_deliver(
            server.lmtp_socket, USER, message(f"old{i}"), folder="Sent", header=b"X-K: same\r\n"
        )
    floor = await sink.next_uid(USER, "Sent")
    assert floor == 4
    await lmtp_deliver(
        server.lmtp_socket, USER, message("new"), folder="Sent", header=b"X-K: same\r\n"
    )
    assert await sink.holds(USER, "Sent", "Message-ID", "<new@x>", from_uid=floor)
    assert not await sink.holds(USER, "Sent", "Message-ID", "<old1@x>", from_uid=floor)
    assert await sink.holds(USER, "Sent", "Message-ID", "<old1@x>")  # the whole folder
    await sink.mark_seen(USER, "Sent", "X-K", "same", from_uid=floor)
    client = await asyncio.to_thread(imap_login, server)
    try:
        client.select("Sent", readonly=True)
        typ, data = client.search(None, "SEEN")
    finally:
        await asyncio.to_thread(client.logout)
    assert typ == "OK"
    assert data[0].split() == [b"4"]  # the new one only, not the three with X-K too


# --- Maildir files written without Dovecot; the cost of a delivery --------------------------


def _write_into_cur(maildir: Path, count: int, tag: str) -> None:
    """``count`` messages written straight into ``maildir/cur`` as the upgrade, a restore or
    the growth bench's pre-fill do, owned by the Maildir's owner; ``cur/``'s mtime is then set
    back to what it was, as when the files land in the same clock tick as Dovecot's last look
    (or a restore brings the old mtime back)."""
    cur = maildir / "cur"
    before = cur.stat()
    for i in range(count):
        data = f"Subject: {tag} {i}\r\nMessage-ID: <{tag}.{i}@x>\r\n\r\nwritten directly\r\n"
        raw = data.encode()
        path = cur / f"{1_700_000_000 + i}.M{i}P1.{tag},S={len(raw)},W={len(raw)}:2,S"
        path.write_bytes(raw)
        os.chown(path, before.st_uid, before.st_gid)
        path.chmod(0o600)
    os.utime(cur, ns=(before.st_atime_ns, before.st_mtime_ns))


def _imap_count_and_last(srv: DovecotServer, folder: str) -> tuple[int, int, str]:
    """(messages, the newest UID, its Subject) over IMAP."""
    client = imap_login(srv)
    try:
        typ, data = client.select(folder, readonly=True)
        assert typ == "OK"
        count = int(data[0] or b"0")
        typ, fetched = client.uid("FETCH", "*", "(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK"
        part = next(p for p in fetched if isinstance(p, tuple))
        uid = int(part[0].split(b"UID ")[1].split()[0])
        subject = part[1].decode().split(":", 1)[1].strip()
        return count, uid, subject
    finally:
        client.logout()


async def test_mail_written_without_dovecot_is_seen_after_the_resync_marker(
    server: DovecotServer,
) -> None:
    """The direct-write paths (mailbox upgrade, restore) leave :func:`request_resync`'s marker;
    the next start rereads every folder, so a delivery into a folder that already held mail
    lands after all of it, and the index agrees with the files."""
    inst, layout = server.installation, server.layout
    for folder in ("INBOX", "Sent"):
        await server.deliver(USER, message(f"first in {folder}"), folder=folder)
        doveadm_sync(inst, layout, user=USER, folder=folder)  # the index knows cur/'s mtime
    await server.stop()
    maildir = layout.maildir(USER)
    _write_into_cur(maildir, 300, "inbox")
    _write_into_cur(maildir / ".Sent", 300, "sent")
    request_resync(layout)
    await server.start()
    assert not layout.resync_marker.exists()
    for folder in ("INBOX", "Sent"):
        await server.deliver(USER, message(f"new in {folder}"), folder=folder)
        count, uid, subject = await asyncio.to_thread(_imap_count_and_last, server, folder)
        assert (count, uid, subject) == (302, 302, f"new in {folder}")
        # Reading the folder from disk once more changes nothing: index and files agree.
        doveadm_force_resync(inst, layout, user=USER, folder=folder)
        assert doveadm_uidnext(inst, layout, user=USER, folder=folder) == 303
        count, uid, _ = await asyncio.to_thread(_imap_count_and_last, server, folder)
        assert (count, uid) == (302, 302)


async def test_a_failed_resync_keeps_the_marker(
    server: DovecotServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user whose folders could not be reread is tried again at the next start."""
    await server.deliver(USER, message("one"))
    request_resync(server.layout)

    def fails(*args: object, **kwargs: object) -> None:
        raise MailServerError("doveadm force-resync failed: disk on fire")

    monkeypatch.setattr(dovecot_module, "doveadm_force_resync", fails)
    assert server.resync_all() == []
    assert server.layout.resync_marker.exists()
    monkeypatch.undo()
    assert server.resync_all() == [USER]
    assert not server.layout.resync_marker.exists()


async def test_deliveries_leave_no_mailbox_list_index(server: DovecotServer) -> None:
    """``mailbox_list_index = no``: a delivery ends without updating a list index, which for a
    Maildir meant parsing the folder's whole dovecot-uidlist (docs/performance.md, "Cost
    growth")."""
    for folder in ("INBOX", "Sent", QUARANTINE):
        await server.deliver(USER, message(f"to {folder}"), folder=folder)
        doveadm_sync(server.installation, server.layout, user=USER, folder=folder)
    assert not list(server.layout.mail.rglob("dovecot.list.index*"))
    assert (server.layout.maildir(USER) / ".Sent" / "dovecot-uidlist").exists()


async def test_a_long_log_is_set_aside_and_dovecot_writes_a_new_one(
    installation: Installation, data_dir: Path
) -> None:
    """A node runs for months: Dovecot's log is set aside past its limit while Dovecot runs,
    and Dovecot goes on in a new file (its own lines, not a copy)."""
    srv = DovecotServer(
        Layout(data_dir), Settings(imap_port=free_port()), installation=installation
    )
    srv.TIDY_INTERVAL = 0.1
    srv.LOG_LIMIT = 4096
    await srv.set_password(USER, PASSWORD)
    await srv.start()
    log, aside = srv.layout.log, srv.layout.log.with_name(srv.layout.log.name + ".1")
    try:
        with log.open("ab") as f:
            f.write(b"padding from the test\n" * 400)  # past the limit
        for _ in range(600):  # the tidy loop looks every 0.1 s; a loaded machine is slower
            if aside.exists() and log.exists():
                break
            await asyncio.sleep(0.1)
        assert b"padding from the test" in aside.read_bytes()
        # Dovecot writes its next lines into the new file
        with pytest.raises(imaplib.IMAP4.error):
            await asyncio.to_thread(imap_login, srv, "wrong password")
        await srv.deliver(USER, message("after the rotation"))
        for _ in range(600):
            if log.exists() and log.stat().st_size > 0:
                break
            await asyncio.sleep(0.1)
        text = log.read_text(errors="replace")
        assert "padding from the test" not in text and "wrong password" not in text
        assert text.strip(), "Dovecot wrote nothing into its new log"
    finally:
        await srv.stop()
