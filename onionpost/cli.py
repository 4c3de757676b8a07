"""The ``onionpost`` command (the only importer of click).

Every :class:`~onionpost.errors.OnionpostError` is turned into one line of text here and
nowhere else (:class:`_Group`), with exit status 1; anything unexpected says so in one line
and points at ``--debug`` instead of printing a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import click

from onionpost import __version__
from onionpost.config import Config, default_data_dir, load
from onionpost.errors import NotInitialized, OnionpostError, UsageError

EXIT_ERROR = 1
EXIT_INTERNAL = 70


@dataclass
class Ctx:
    data_dir: Path
    debug: bool

    def config(self, overrides: dict[str, Any] | None = None) -> Config:
        return load(self.data_dir, overrides)


class _Group(click.Group):
    """Renders errors for people: the one place where the CLI formats them."""

    def invoke(self, ctx: click.Context) -> Any:  # noqa: ANN401
        try:
            return super().invoke(ctx)
        except OnionpostError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted", status=130)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            debug = isinstance(ctx.obj, Ctx) and ctx.obj.debug
            if debug:
                raise
            _fail(
                f"internal error ({type(exc).__name__}: {exc}). Run again with --debug for "
                "details, and please report it.",
                status=EXIT_INTERNAL,
            )


def _fail(message: str, status: int = EXIT_ERROR) -> NoReturn:
    click.echo(f"onionpost: {message}", err=True)
    sys.exit(status)


pass_ctx = click.make_pass_decorator(Ctx)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    envvar="ONIONPOST_HOME",
    show_envvar=True,
    help="Where keys, mail and settings live (default: ~/.local/share/onionpost, or "
    "/var/lib/onionpost for root).",
)
@click.option("--debug", is_flag=True, help="Show full details of unexpected errors.")
@click.version_option(__version__, prog_name="onionpost")
@click.pass_context
def cli(ctx: click.Context, data_dir: Path | None, debug: bool) -> None:
    """onionpost: mail with no provider, no DNS and no open port.

    Your inbox is a Tor onion service; every message is signed and end-to-end encrypted to
    each of your recipients' devices. Point Thunderbird at the local gateway to use it.
    """
    ctx.obj = Ctx((data_dir or default_data_dir()).expanduser(), debug)


# --- init ---------------------------------------------------------------------------------------


def _default_user() -> str:
    name = os.environ.get("USER") or getpass.getuser() or "me"
    name = re.sub(r"[^a-z0-9._-]", "", name.lower())
    return name if name and name[0].isalnum() and name != "root" else "me"


@cli.command()
@click.option("--user", "local", default=None, help="The part before @ in your address.")
@click.option("--device-name", default="primary", show_default=True, help="Name of this device.")
@click.option("--if-missing", is_flag=True, help="Do nothing if already set up (for scripts).")
@pass_ctx
def init(obj: Ctx, local: str | None, device_name: str, if_missing: bool) -> None:
    """Create your identity, this device's keys and your inbox's keys."""
    from onionpost.provision import initialize, is_initialized

    if if_missing and is_initialized(obj.data_dir):
        return
    config = obj.config()
    result = initialize(
        config,
        local=(local or _default_user()).lower(),
        device_name=device_name,
        now=int(time.time()),
        gateway_setup=_gateway_setup(),
    )
    gw = config.gateway
    click.echo(f"onionpost is set up in {obj.data_dir}\n")
    click.echo(f"  Your address:   {result.address}")
    click.echo(f"  Identity:       {result.fingerprint}")
    click.echo(f"  This device:    {result.device_name}\n")
    click.echo("Mail client settings (for Thunderbird run `onionpost thunderbird`):")
    click.echo(f"  IMAP {gw.listen_host}:{gw.imap_port}   SMTP {gw.listen_host}:{gw.smtp_port}")
    click.echo(f"  user name: {result.address.local}")
    if result.password:
        click.echo(f"  password:  {result.password}   (shown once; change it: onionpost password)")
    click.echo("\nStart the node with `onionpost run`.")


def _gateway_setup() -> Callable[[Config, Any], str | None]:
    """The gateway's part of `init`: the mail-client password and the local CA."""
    from gateway.setup import setup_account

    return setup_account


# --- run and status -------------------------------------------------------------------------


def _logging(config: Config, debug: bool) -> None:
    level = logging.DEBUG if debug else getattr(logging, config.log_level.upper())
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("stem", "aiohttp.access", "mail.log"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # "skipped: maximum number of running instances" is coalescing working as intended
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


@cli.command()
@pass_ctx
def run(obj: Ctx) -> None:
    """Run the node until interrupted (Ctrl-C or SIGTERM)."""
    from onionpost.node import Node

    config = obj.config()
    _logging(config, obj.debug)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        node = Node(config, extensions=_gateway_extensions())
        loop.add_signal_handler(signal.SIGUSR1, node.wake)
        await node.run_until(stop)

    asyncio.run(main())


def _gateway_extensions() -> tuple[Any, ...]:
    from gateway.service import start_gateway

    return (start_gateway,)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def status(obj: Ctx, as_json: bool) -> None:
    """Show whether the node runs, its tor state and its queue."""
    path = obj.data_dir / "run" / "status.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(
            "The node is not running (it has no status yet). Start it with `onionpost run`."
        ) from exc
    alive = _pid_alive(int(info.get("pid", 0))) and time.time() - info.get("updated_at", 0) < 30
    info["running"] = alive
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"node:       {'running' if alive else 'NOT running'} (pid {info.get('pid')})")
    if not alive:
        click.echo("            (the details below are from when it last ran)")
    for user in info.get("users", []):
        click.echo(f"address:    {user}")
    gateway = info.get("gateway") or {}
    if gateway:
        imap, smtp = gateway.get("imap"), gateway.get("smtp")
        click.echo(f"gateway:    IMAP 127.0.0.1:{imap}  SMTP 127.0.0.1:{smtp}")
    _print_tor(info.get("tor", {}))
    queue = info.get("queue", {})
    if queue:
        waiting = queue.get("queued", 0)
        click.echo(
            f"queue:      {waiting} message(s) waiting"
            + (" (see `onionpost queue`)" if waiting else "")
        )


def _print_tor(tor: dict[str, Any]) -> None:
    mode = tor.get("mode", "off")
    if mode == "off":
        click.echo("tor:        off (this node reaches only inboxes on this machine)")
    else:
        health = "healthy" if tor.get("healthy", True) else "PROBLEM"
        click.echo(f"tor:        {mode}, {health}, version {tor.get('version') or '?'}")
        click.echo(
            f"            bootstrap {tor.get('bootstrap_percent', 0)}%"
            f" ({tor.get('bootstrap_summary') or ''})"
        )
        published = "published" if tor.get("published") else "NOT published yet"
        click.echo(f"onion:      {tor.get('onion') or '-'}.onion, {published}")
        pow_text = "on" if tor.get("pow_enabled") else f"off ({tor.get('pow_note') or 'n/a'})"
        click.echo(f"            onion-service proof-of-work defence {pow_text}")
        for key, label in (
            ("last_inbound", "last connection in"),
            ("last_outbound", "last connection out"),
            ("last_published", "last published"),
        ):
            if tor.get(key):
                click.echo(f"            {label}: {_ago(tor[key])}")
        if tor.get("last_probe"):
            ok = "reachable" if tor.get("last_probe_ok") else "NOT reachable"
            click.echo(f"            self-check {_ago(tor['last_probe'])}: {ok} through tor")
        for key, label in (("last_error", "last problem"), ("last_recovery", "last recovery")):
            if tor.get(key):
                click.echo(f"            {label}: {tor[key]}")
        for note in tor.get("notes", []):
            click.echo(f"            note: {note}")


def _ago(when: float) -> str:
    seconds = int(time.time() - when)
    return f"{_age(seconds)} ago" if seconds >= 0 else "just now"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@cli.command()
@pass_ctx
def address(obj: Ctx) -> None:
    """Print your onionpost address(es)."""

    from onionpost.keystore import AccountFiles, KeyStore

    files = AccountFiles(KeyStore(obj.data_dir))
    users = files.users()
    if not users:
        raise NotInitialized()
    for local in users:
        click.echo(str(files.load(local).address))


# --- the queue ------------------------------------------------------------------------------


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _user_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--user NAME`` for commands about one person's mail, keys or contacts."""
    return click.option("--user", default=None, metavar="NAME", help=help_text)


_WHOSE = "Whose (needed when this node has several users)."


def _group_user(user: str | None) -> str | None:
    """A subcommand's --user, else its group's: `contacts --user ben show X` works like
    `contacts show --user ben X`."""
    if user is not None:
        return user
    parent = click.get_current_context().parent
    value = parent.params.get("user") if parent is not None else None
    return value if isinstance(value, str) else None


@cli.group(invoke_without_command=True)
@_user_option("Only this user's mail (default: everyone's on this node).")
@click.pass_context
def queue(ctx: click.Context, user: str | None) -> None:
    """List mail waiting to be delivered (see also: queue retry, queue cancel)."""
    if ctx.invoked_subcommand is not None:
        return
    from onionpost import admin

    obj: Ctx = ctx.obj
    with admin.opened(obj.config()) as local:
        items = admin.queue(local, user)
        several = user is None and len(local.files.users()) > 1
    if not items:
        click.echo("The queue is empty: everything was delivered.")
        return
    now = time.time()
    who = {i.user for i in items}
    width = max(4, *(len(u) for u in who)) if several else 0

    def col(text: str) -> str:
        return f"{text:<{width}} " if several else ""

    click.echo(
        f"{'ID':<7} {col('USER')}{'RECIPIENT':<40} {'AGE':>5} {'TRIES':>5} {'NEXT':>5}  STATUS"
    )
    for i in items:
        short = (
            i.recipient if len(i.recipient) <= 40 else i.recipient[:18] + "…" + i.recipient[-21:]
        )
        nxt = "now" if i.next_attempt_at <= now else _age(i.next_attempt_at - now)
        click.echo(
            f"{i.id:<7} {col(i.user)}{short:<40} {_age(now - i.created_at):>5} "
            f"{i.attempts:>5} {nxt:>5}  {i.stage}"
        )
        if i.last_error:
            click.echo(f"{'':<7} last error: {i.last_error}")


@queue.command("retry")
@click.argument("item", required=False)
@_user_option("Only this user's mail (default: everyone's on this node).")
@pass_ctx
def queue_retry(obj: Ctx, item: str | None, user: str | None) -> None:
    """Try again now: one message (ID from `onionpost queue`) or everything."""
    from onionpost import admin

    with admin.opened(obj.config()) as local:
        n = admin.queue_retry(local, item, _group_user(user))
    click.echo(f"{n} queued delivery(ies) will be tried now.")


@queue.command("cancel")
@click.argument("item")
@_user_option("Only if it is this user's mail (IDs are unique on the node).")
@pass_ctx
def queue_cancel(obj: Ctx, item: str, user: str | None) -> None:
    """Withdraw a message that has not been delivered yet."""
    from onionpost import admin

    with admin.opened(obj.config()) as local:
        admin.queue_cancel(local, item, _group_user(user))
    click.echo(f"{item} was withdrawn; it will not be delivered.")


# --- sending from the command line -----------------------------------------------------------


@cli.command()
@click.option("--to", "to", multiple=True, required=True, help="A recipient (repeatable).")
@click.option("--subject", default="", help="Subject, when composing from --text.")
@click.option("--text", default=None, help="Compose a plain-text message with this body.")
@click.option("--user", default=None, help="Send as this local user.")
@click.argument("message", type=click.File("rb"), required=False)
@pass_ctx
def send(
    obj: Ctx,
    *,
    to: tuple[str, ...],
    subject: str,
    text: str | None,
    user: str | None,
    message: BinaryIO | None,
) -> None:
    """Send a message: an RFC 5322 file (or - for stdin), or compose one with --text."""
    from email.message import EmailMessage
    from email.utils import formatdate, make_msgid

    from onionpost import admin
    from onionpost.address import Address

    recipients = [Address.parse(t) for t in to]
    with admin.opened(obj.config()) as local:
        account = local.account(user)
        if text is not None:
            msg = EmailMessage()
            msg["From"] = str(account.address)
            msg["To"] = ", ".join(str(r) for r in recipients)
            msg["Subject"] = subject
            msg["Date"] = formatdate()
            msg["Message-ID"] = make_msgid(domain=account.address.domain)
            msg.set_content(text)
            raw = msg.as_bytes()
        elif message is not None:
            raw = message.read()
        else:
            raise click.UsageError("Give a message file, - for standard input, or --text.")
        sid = admin.submit(local, account.local, recipients, raw)
    click.echo(f"Queued as s{sid} for {len(recipients)} recipient(s).")


# --- contacts and devices --------------------------------------------------------------------


@cli.group(invoke_without_command=True)
@_user_option(_WHOSE)
@click.pass_context
def contacts(ctx: click.Context, user: str | None) -> None:
    """People you have exchanged mail with, their identity fingerprints and safety numbers.

    Every person on a node has their own contacts; say whose with --user."""
    if ctx.invoked_subcommand is not None:
        return
    from onionpost import admin

    obj: Ctx = ctx.obj
    with admin.opened(obj.config()) as local:
        views = admin.contacts(local, user)
        changes = admin.identity_changes(local, user)
    if not views:
        click.echo("No contacts yet.")
    for v in views:
        c = v.contact
        marks = [m for m, on in (("verified", c.verified), ("blocked", c.blocked)) if on]
        name = f" ({c.display_name})" if c.display_name else ""
        click.echo(f"{c.address}{name}  {v.fingerprint}  {' '.join(marks)}")
    for address, _, _, _ in changes:
        click.echo(
            f"WARNING: {address} now presents a DIFFERENT identity key. Mail from and to it "
            "is refused until you compare safety numbers and run "
            f"`onionpost contacts trust {address}`" + (f" --user {user}." if user else ".")
        )


@contacts.command("show")
@click.argument("address")
@_user_option(_WHOSE)
@pass_ctx
def contacts_show(obj: Ctx, address: str, user: str | None) -> None:
    """Show a contact's fingerprint and the safety number to compare with them."""
    from onionpost import admin

    with admin.opened(obj.config()) as local:
        v = admin.contact(local, address, _group_user(user))
    c = v.contact
    click.echo(f"address:        {c.address}")
    click.echo(f"identity:       {v.fingerprint}")
    click.echo(f"safety number:  {v.safety_number}")
    click.echo(f"verified:       {'yes' if c.verified else 'no'}")
    click.echo(f"first seen:     {time.strftime('%Y-%m-%d', time.gmtime(c.first_seen))}")
    click.echo(
        "Compare the safety number with your contact (in person or by phone); if it "
        "matches, run `onionpost contacts verify ADDRESS`."
    )


@contacts.command("verify")
@click.argument("address")
@_user_option(_WHOSE)
@pass_ctx
def contacts_verify(obj: Ctx, address: str, user: str | None) -> None:
    """Record that you compared safety numbers with this contact."""
    from onionpost import admin

    with admin.opened(obj.config()) as local:
        admin.set_contact(local, address, verified=True, user=_group_user(user))
    click.echo(f"{address} is marked as verified.")


@contacts.command("block")
@click.argument("address")
@_user_option(_WHOSE)
@pass_ctx
def contacts_block(obj: Ctx, address: str, user: str | None) -> None:
    """Stop refreshing this contact's keys and mark them blocked."""
    from onionpost import admin

    with admin.opened(obj.config()) as local:
        admin.set_contact(local, address, blocked=True, user=_group_user(user))
    click.echo(f"{address} is blocked.")


@contacts.command("trust")
@click.argument("address")
@_user_option(_WHOSE)
@pass_ctx
def contacts_trust(obj: Ctx, address: str, user: str | None) -> None:
    """Accept a contact's NEW identity key (only after comparing safety numbers)."""
    from onionpost import admin

    with admin.opened(obj.config()) as local:
        admin.accept_identity(local, address, _group_user(user))
    click.echo(f"The old key of {address} is forgotten; the next message pins the new one.")


@cli.group(invoke_without_command=True)
@_user_option(_WHOSE)
@click.pass_context
def devices(ctx: click.Context, user: str | None) -> None:
    """Your devices: which hold keys for your mail (see also: devices revoke)."""
    if ctx.invoked_subcommand is not None:
        return
    from onionpost import admin

    obj: Ctx = ctx.obj
    with admin.opened(obj.config()) as local:
        account = local.account(user)
    dl = account.device_list
    click.echo(f"device list version {dl.version}")
    for d in dl.devices:
        me = "  (this device)" if d.device_id == account.device.device_id else ""
        click.echo(f"  {d.device_id.hex()[:12]}  {d.name:<16} key #{d.dsk_seq}{me}")
    for r in dl.revoked:
        when = time.strftime("%Y-%m-%d", time.gmtime(r.revoked_at))
        click.echo(f"  {r.device_id.hex()[:12]}  revoked {when}")


@devices.command("revoke")
@click.argument("device")
@_user_option(_WHOSE)
@pass_ctx
def devices_revoke(obj: Ctx, device: str, user: str | None) -> None:
    """Revoke a lost or stolen device: its inbox refuses it at once and drops its mail."""
    from onionpost import admin

    with admin.opened(obj.config()) as local:
        account = admin.revoke(local, device, _group_user(user))
    click.echo(f"Revoked. Device list is now version {account.device_list.version}.")


# --- the demo --------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--workdir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Keep the demo's files here (default: a temporary directory, removed afterwards).",
)
@pass_ctx
def demo(obj: Ctx, workdir: Path | None) -> None:
    """See it work: a private Tor network and two people on this machine, about a minute."""
    from onionpost import demo as demo_module

    logging.basicConfig(level=logging.DEBUG if obj.debug else logging.ERROR)
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    asyncio.run(demo_module.run(click.echo, workdir))


# --- users of this node ----------------------------------------------------------------------


@cli.group()
def users() -> None:
    """Users whose mailboxes live on this node (a household shares one inbox)."""


@users.command("add")
@click.argument("name")
@click.option("--device-name", default="primary", show_default=True)
@pass_ctx
def users_add(obj: Ctx, name: str, device_name: str) -> None:
    """Give another person an address on this node's inbox."""
    from onionpost import admin
    from onionpost.provision import add_user

    config = obj.config()
    result = add_user(
        config,
        local=name.lower(),
        device_name=device_name,
        now=int(time.time()),
        gateway_setup=_gateway_setup(),
    )
    click.echo(f"Added {result.address}")
    click.echo(f"  identity:  {result.fingerprint}")
    if result.password:
        click.echo(f"  mail-client user name: {result.address.local}, password: {result.password}")
    if admin.poke(obj.data_dir):
        click.echo("The running node picks the new user up now.")


@users.command("list")
@pass_ctx
def users_list(obj: Ctx) -> None:
    """Everyone with an address on this node, and what their mailbox uses.

    MAIL and SPOOLED are the messages (and their size) waiting at this node's inbox for the
    user's devices to fetch; QUOTA is the most the spool may hold."""
    from onionpost import admin

    with admin.opened(obj.config()) as local:
        rows = admin.users(local)
    if not rows:
        click.echo("Nobody has an address here yet (add someone with `onionpost users add`).")
        return
    width = max(len(r.address) for r in rows)
    click.echo(f"{'ADDRESS':<{width}}  {'MAIL':>5}  {'SPOOLED':>9}  {'DEVICES':>7}  {'QUOTA':>9}")
    for r in rows:
        mail = "-" if r.spooled_messages is None else str(r.spooled_messages)
        click.echo(
            f"{r.address:<{width}}  {mail:>5}  {_size(r.spooled_bytes):>9}  {r.devices:>7}  "
            f"{_size(r.quota_bytes):>9}"
        )


def _size(n: int | None) -> str:
    """Bytes for people: 0 B, 512 B, 3.4 KiB, 12.0 MiB, 2.0 GiB (``-``: not known here)."""
    if n is None:
        return "-"
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


@users.command("remove")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (for scripts).")
@pass_ctx
def users_remove(obj: Ctx, name: str, yes: bool) -> None:
    """Delete a person from this node: their mailbox and mail, contacts, keys and login.

    This cannot be undone: mail waiting at the inbox and everything filed on this device
    for them is deleted, and their address stops working."""
    from onionpost import admin

    name = name.lower()
    with admin.opened(obj.config()) as local:
        admin.check_user_exists(local, name)
        if not yes:
            click.confirm(
                f"Delete {name}'s mailbox, mail, contacts, keys and login for good?",
                abort=True,
            )
        removed = admin.remove_user(local, name)
    click.echo(
        f"Removed {removed.user}: {removed.messages} filed message(s), "
        f"{removed.spooled_messages} waiting at the inbox, {removed.contacts} contact(s), "
        f"{removed.submissions} queued submission(s)."
    )
    if not removed.mailbox:
        click.echo("This machine runs no inbox holding their mailbox; none was removed.")
    if removed.node_told:
        click.echo("The running node stops serving them now.")


# --- mail clients ------------------------------------------------------------------------------


@cli.command()
@click.option("--user", default=None, help="Whose password (default: the only user).")
@click.option("--generate", is_flag=True, help="Make a new random password and print it.")
@pass_ctx
def password(obj: Ctx, user: str | None, generate: bool) -> None:
    """Set the password mail clients use to log in to the local gateway."""
    from gateway.setup import set_password
    from onionpost import admin

    config = obj.config()
    with admin.opened(config) as local:
        account = local.account(user)
    chosen: str | None = None
    if not generate:
        chosen = click.prompt("New password", hide_input=True, confirmation_prompt=True)
    result = set_password(config, account.local, chosen)
    if generate:
        click.echo(f"New password for {account.local}: {result}")
    else:
        click.echo(f"Password changed for {account.local}.")


@cli.command()
@click.option("--user", default=None, help="Which user's account (default: the only user).")
@click.option(
    "--write",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Also write user.js, policies.json and the CA certificate into this directory.",
)
@pass_ctx
def thunderbird(obj: Ctx, user: str | None, write: Path | None) -> None:
    """How to set up Thunderbird (without its wizard, which leaks your address online)."""
    from gateway.thunderbird import (
        GatewaySettings,
        render_policies,
        render_settings,
        render_user_js,
    )
    from gateway.tls import ca_path, ensure_tls
    from onionpost import admin

    config = obj.config()
    with admin.opened(config) as local:
        account = local.account(user)
    tls_dir = config.data_dir / "tls"
    ensure_tls(tls_dir)
    gw = config.gateway
    settings = GatewaySettings(
        address=account.address,
        imap_port=gw.imap_port,
        smtp_port=gw.smtp_port,
        autoconfig_port=gw.autoconfig_port,
        ca_path=ca_path(tls_dir).resolve(),
        require_tls=gw.require_tls,
    )
    click.echo(render_settings(settings))
    if write is not None:
        # everything written here is public (no password is in user.js), and Thunderbird may
        # run as another user: an ordinary directory, not a private one
        write.mkdir(parents=True, exist_ok=True)
        # Thunderbird may run as another user than onionpost, which cannot read the data
        # directory: the policy points at the copy written next to it.
        ca_copy = (write / "onionpost-ca.pem").resolve()
        ca_copy.write_bytes(ca_path(tls_dir).read_bytes())
        ca_copy.chmod(0o644)  # a certificate is public
        (write / "user.js").write_text(render_user_js(settings))
        (write / "policies.json").write_text(render_policies(ca_copy))
        click.echo(f"\nWrote user.js, policies.json and onionpost-ca.pem to {write}.")
        click.echo("See docs/thunderbird.md for where each file goes.")


def main() -> None:
    with contextlib.suppress(BrokenPipeError):
        cli(prog_name="onionpost")


if __name__ == "__main__":  # pragma: no cover
    main()
