"""The ``onionpost`` command (the only importer of click).

Every :class:`~onionpost.core.errors.OnionpostError` is turned into one line of text here and
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
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, cast

import click

from onionpost import __version__
from onionpost.base.config import Config, default_data_dir, load
from onionpost.core.errors import AlreadyInitialized, NotInitialized, OnionpostError, UsageError

if TYPE_CHECKING:
    from gateway.mailread import MailReader, SearchField, Summary
    from onionpost.app.admin import KeyChangeView, Local
    from onionpost.core.chain import Invitees
    from onionpost.core.crypto.keys import Profile

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
@click.option("--device-name", default=None, help="Name of this device (default: primary).")
@click.option(
    "--role",
    type=click.Choice(["both", "inbox"]),
    default="both",
    show_default=True,
    help="'inbox': this machine (a Pi) only holds the inbox; people join it with an invite.",
)
@click.option("--invite", "invite_code", default=None, help="Join an inbox with an invite code.")
@click.option("--join", "join_code", default=None, help="Add this machine as another device.")
@click.option(
    "--no-identity-key",
    is_flag=True,
    help="With --join: leave your identity key off this device (it then cannot add or revoke "
    "devices).",
)
@click.option("--if-missing", is_flag=True, help="Do nothing if already set up (for scripts).")
@pass_ctx
def init(
    obj: Ctx,
    *,
    local: str | None,
    device_name: str | None,
    role: str,
    invite_code: str | None,
    join_code: str | None,
    no_identity_key: bool,
    if_missing: bool,
) -> None:
    """Set up this machine: one machine for everything (default), an inbox for others
    (--role inbox), your mail on this machine with an inbox elsewhere (--invite CODE), or
    another device of yours (--join CODE)."""
    from onionpost.app.provision import initialize, initialize_inbox, is_initialized

    if if_missing and is_initialized(obj.data_dir):
        return
    chosen = [o for o, on in (("--invite", invite_code), ("--join", join_code)) if on]
    if len(chosen) > 1 or (chosen and role != "both"):
        raise click.UsageError("Use only one of --role inbox, --invite and --join.")
    if no_identity_key and not join_code:
        raise click.UsageError("--no-identity-key goes with --join.")
    if invite_code or join_code:
        _init_from_code(
            obj,
            invite_code=invite_code,
            join_code=join_code,
            device_name=device_name,
            with_identity=not no_identity_key,
            local=local,
        )
        return
    config = obj.config()
    if role == "inbox":
        postmaster = initialize_inbox(config, now=int(time.time()))
        click.echo(f"onionpost inbox is set up in {obj.data_dir}\n")
        click.echo(f"  Inbox address:  {postmaster.onion}.onion")
        click.echo("  Nobody's keys are here: people create theirs on their own machines.\n")
        click.echo("Start it with `onionpost run` (or the systemd unit), then invite someone:")
        click.echo("  onionpost users invite NAME")
        return
    result = initialize(
        config,
        local=(local or _default_user()).lower(),
        device_name=device_name or "primary",
        now=int(time.time()),
        gateway_setup=_gateway_setup(),
    )
    _print_initialized(obj, config, result)


def _print_initialized(obj: Ctx, config: Config, result: Any) -> None:  # noqa: ANN401
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


def _init_from_code(
    obj: Ctx,
    *,
    invite_code: str | None,
    join_code: str | None,
    device_name: str | None,
    with_identity: bool,
    local: str | None,
) -> None:
    """init --invite / --join: keys made here, the inbox reached over tor."""
    from onionpost.app.provision import adopt_account, is_initialized
    from onionpost.base.clock import SystemClock
    from onionpost.core.pairing import Code
    from onionpost.device.joining import inbox_dialer, join_identity, redeem_invite
    from onionpost.store.keystore import AccountFiles, KeyStore

    code = Code.parse(invite_code or join_code or "", "invite" if invite_code else "pairing")
    if local is not None:
        raise click.UsageError("--user comes from the code; leave it out.")
    if is_initialized(obj.data_dir):
        raise AlreadyInitialized(
            f"{obj.data_dir} is already set up; --invite and --join make a new data directory. "
            "Use --data-dir to choose another one."
        )
    name = device_name or _default_device_name()
    config = obj.config()
    files = AccountFiles(KeyStore(obj.data_dir))
    clock = SystemClock()

    async def main() -> Any:  # noqa: ANN401
        async with inbox_dialer(config, say=click.echo) as dialer:
            if invite_code:
                return await redeem_invite(
                    config,
                    code,
                    device_name=name,
                    dialer=dialer,
                    say=click.echo,
                    clock=clock,
                    save=files.save,
                )
            return await join_identity(
                config,
                code,
                device_name=name,
                with_identity=with_identity,
                dialer=dialer,
                say=click.echo,
                clock=clock,
            )

    click.echo(f"Reaching the inbox {code.onion}.onion over tor...")
    try:
        account = asyncio.run(main())
    except BaseException:
        _discard_partial(obj.data_dir)
        raise
    result = adopt_account(config, account, gateway_setup=_gateway_setup())
    if join_code:
        held = "holds" if account.identity is not None else "does NOT hold"
        click.echo(
            f"This machine is now a device of {result.address}; it {held} your identity key."
        )
        click.echo("Your other devices get a notice mail about it.\n")
    _print_initialized(obj, config, result)


def _discard_partial(data_dir: Path) -> None:
    """A failed --invite leaves no half-made identity behind (the same code can be tried
    again while it is valid)."""
    import shutil

    users = data_dir / "users"
    if users.is_dir() and not (data_dir / "device.db").exists():
        shutil.rmtree(users, ignore_errors=True)


def _default_device_name() -> str:
    import socket

    name = socket.gethostname().split(".")[0][:64]
    return name or "device"


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


@cli.command()
@pass_ctx
def run(obj: Ctx) -> None:
    """Run the node until interrupted (Ctrl-C or SIGTERM; a second one stops it at once)."""
    from onionpost.app import lifecycle
    from onionpost.core.errors import NodeAlreadyRunning

    config = obj.config()
    _logging(config, obj.debug)
    try:
        lifecycle.serve(config, extensions=_gateway_extensions)
    except NodeAlreadyRunning as exc:
        holder = f" (pid {exc.pid})" if exc.pid else ""
        _fail(
            f"Another onionpost node{holder} already runs on {exc.data_dir}; stop it first "
            "or use --data-dir."
        )


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
    counts = _queue_counts(obj)
    if counts is not None:
        info["queue"] = counts  # counted now, the way `onionpost queue` lists them
    policies = _policies(obj)
    if policies is not None:
        info["policies"] = policies  # read now: `contacts policy` changes it while it runs
    changes = _key_changes(obj)
    if changes is not None:
        info["key_changes"] = changes
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
    server = info.get("mail_server")
    if server:
        restarts = server.get("restarts") or 0
        again = f", restarted {restarts} time(s)" if restarts else ""
        click.echo(f"mailbox:    Dovecot {server.get('status')}{again}")
    filing = info.get("filing") or 0
    if filing:
        click.echo(f"filing:     {filing} message(s) waiting to be filed into the mailbox")
    _print_lan(obj, info)
    _print_tor(info.get("tor", {}), has_inbox=info.get("role") != "gateway")
    counts = info.get("queue") or {}
    if counts:
        click.echo(f"queue:      {_queue_words(counts)}")
    _print_trust(info)


def _print_trust(info: dict[str, Any]) -> None:
    """Whom each person accepts mail from, and contacts whose identity key changed."""
    for name, policy in (info.get("policies") or {}).items():
        who = f"{name}: " if len(info["policies"]) > 1 else ""
        click.echo(f"mail from:  {who}{_POLICY_WORDS[policy == 'open']}")
    for name, pending in (info.get("key_changes") or {}).items():
        for change in pending:
            held = f"; {change['held']} message(s) held in Quarantine" if change["held"] else ""
            click.echo(
                f"WARNING:    {change['address']} presents a NEW identity key{held}: compare "
                f"safety numbers with `onionpost contacts show {change['address']}"
                + (f" --user {name}`" if len(info["key_changes"]) > 1 else "`")
            )


def _key_changes(obj: Ctx) -> dict[str, list[dict[str, Any]]] | None:
    """Each person's contacts whose identity key changed and who wait for `accept-key` or
    `reject-key` (only people with one); None when this machine cannot tell."""
    from onionpost.app import admin

    with contextlib.suppress(OnionpostError), admin.opened(obj.config()) as local:
        found: dict[str, list[dict[str, Any]]] = {}
        for name in local.files.users():
            pending = [
                {"address": c.address, "held": c.held, "seen_at": c.seen_at}
                for c in admin.identity_changes(local, name)
            ]
            if pending:
                found[name] = pending
        return found
    return None


def _policies(obj: Ctx) -> dict[str, str] | None:
    """Whom each person accepts mail from (`contacts policy`): ``open`` or ``contacts-only``,
    by user, as far as this machine knows (its inbox database, else what was last set from
    this device); None when it cannot tell (not initialized, databases unreadable)."""
    from onionpost.app import admin

    with contextlib.suppress(OnionpostError), admin.opened(obj.config()) as local:
        return {
            name: "contacts-only" if admin.accepts_strangers(local, name) is False else "open"
            for name in local.files.users()
        }
    return None


def _print_lan(obj: Ctx, info: dict[str, Any]) -> None:
    """The LAN access line: only when it is on, or set but not yet in effect."""
    from gateway.lan import describe

    try:
        config = obj.config()
    except OnionpostError:
        return
    changed = _config_changed_since(config, info)
    if config.gateway.lan:
        click.echo(f"LAN access: {describe(config.gateway)}")
        if changed:
            click.echo("            (set after the node started: restart it to apply)")
    elif changed:
        click.echo("LAN access: off (set after the node started: restart it to apply)")


def _config_changed_since(config: Config, info: dict[str, Any]) -> bool:
    started = info.get("started_at") or 0
    try:
        return bool(started) and config.config_file.stat().st_mtime > float(started)
    except OSError:
        return False


def _queue_counts(obj: Ctx) -> dict[str, int] | None:
    """The queue counted from the databases (None when this machine has neither queue)."""
    from onionpost.app import admin

    with contextlib.suppress(OnionpostError), admin.opened(obj.config()) as local:
        return admin.queue_summary(local)
    return None


def _queue_words(counts: dict[str, int]) -> str:
    from onionpost.store.queue import STAGES

    total = counts.get("total", 0)
    if not total:
        return "nothing waiting to be delivered"
    parts = [f"{counts[stage]} {stage}" for stage in STAGES if counts.get(stage)]
    return f"{total} not delivered yet: {', '.join(parts)} (see `onionpost queue`)"


def _print_tor(tor: dict[str, Any], *, has_inbox: bool = True) -> None:
    mode = tor.get("mode", "off")
    if mode == "off":
        click.echo("tor:        off (this node reaches only inboxes on this machine)")
    elif tor.get("state") in ("starting", "failed"):
        _print_tor_not_up(tor, has_inbox=has_inbox)
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


def _print_tor_not_up(tor: dict[str, Any], *, has_inbox: bool) -> None:
    """Tor while it starts (or after it gave up): what it is doing, never a '?' or '-'."""
    percent, summary = tor.get("bootstrap_percent", 0), tor.get("bootstrap_summary") or ""
    if tor.get("state") == "failed":
        click.echo(f"tor:        {tor['mode']}, FAILED: {tor.get('last_error') or 'unknown'}")
    else:
        click.echo(f"tor:        {tor['mode']}, starting")
        click.echo(f"            bootstrap {percent}%" + (f" ({summary})" if summary else ""))
    if has_inbox:
        onion = tor.get("onion")
        where = f"{onion}.onion" if onion else "the inbox"
        click.echo(f"onion:      {where}, not published yet (tor is {tor['state']})")
    if tor.get("state") != "failed" and tor.get("last_error"):
        click.echo(f"            last problem: {tor['last_error']}")
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

    from onionpost.store.keystore import AccountFiles, KeyStore

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
    from onionpost.app import admin

    obj: Ctx = ctx.obj
    with admin.opened(obj.config()) as local:
        items = admin.queue(local, user)
        several = user is None and len(local.files.users()) > 1
        done = admin.queue_outcomes(local, user, days=_OUTCOME_DAYS)
    tor = (admin.running_node(obj.data_dir) or {}).get("tor")
    if isinstance(tor, dict) and tor.get("state") == "starting" and items:
        click.echo("This node's tor is still starting: mail for other inboxes waits for it.")
    if not items:
        click.echo("Nothing is waiting to be delivered.")
        finished = [f"{n} {outcome}" for outcome, n in done.items() if n]
        if finished:
            click.echo(f"In the last {_OUTCOME_DAYS} days: {', '.join(finished)}.")
        if done.get("bounced"):
            click.echo("Each bounce was reported in the sender's INBOX with the reason.")
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


#: How far back `onionpost queue` reports what left the queue.
_OUTCOME_DAYS = 30


@queue.command("retry")
@click.argument("item", required=False)
@_user_option("Only this user's mail (default: everyone's on this node).")
@pass_ctx
def queue_retry(obj: Ctx, item: str | None, user: str | None) -> None:
    """Try again now: one message (ID from `onionpost queue`) or everything."""
    from onionpost.app import admin

    with admin.opened(obj.config()) as local:
        n = admin.queue_retry(local, item, _group_user(user))
    click.echo(f"{n} queued delivery(ies) will be tried now.")


@queue.command("cancel")
@click.argument("item")
@_user_option("Only if it is this user's mail (IDs are unique on the node).")
@pass_ctx
def queue_cancel(obj: Ctx, item: str, user: str | None) -> None:
    """Withdraw a message that has not been delivered yet."""
    from onionpost.app import admin

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

    from onionpost.app import admin
    from onionpost.core.address import Address

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


# --- reading mail ------------------------------------------------------------------------------


def _mail_reader(obj: Ctx, user: str | None) -> MailReader:
    """The user's mail through the node's private Dovecot (gateway/mailread.py)."""
    from gateway.dovecot import Layout
    from gateway.mailread import MailReader
    from onionpost.core.errors import DataDirError

    try:
        config = obj.config()
        if config.role == "inbox":
            raise UsageError(
                "This machine is an inbox only: it keeps mail sealed for your devices and "
                "cannot read it. Read your mail on a device set up with `onionpost init "
                "--invite`."
            )
        return MailReader(Layout(config.data_dir), user)
    except PermissionError as exc:
        raise DataDirError(
            f"This account may not read {exc.filename or obj.data_dir}: run the command as "
            "the node's user or as root."
        ) from exc


def _short_address(value: str) -> str:
    """The display name if there is one, else the address."""
    from email.utils import getaddresses

    pairs = getaddresses([value])
    if len(pairs) == 1 and (pairs[0][0] or pairs[0][1]):
        return pairs[0][0] or pairs[0][1]
    return value


def _when(date_header: str, received: int) -> str:
    """The Date header in local time (``YYYY-MM-DD HH:MM``), else when it was received."""
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(date_header).astimezone()
    except (TypeError, ValueError, IndexError, OverflowError):
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(received)) if received else "?"
    return when.strftime("%Y-%m-%d %H:%M")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def _print_summaries(rows: list[Summary], *, show_folder: bool) -> None:
    """One line per message: unread mark, folder and UID, date, sender, subject."""
    import shutil

    from gateway.mailread import printable

    width = shutil.get_terminal_size((100, 24)).columns
    folder_width = max((len(r.folder) for r in rows), default=0) if show_folder else 0
    uid_width = max((len(str(r.uid)) for r in rows), default=1)
    for r in rows:
        where = f"{printable(r.folder):<{folder_width}} " if show_folder else ""
        head = (
            f"{' ' if r.seen else 'N'} {where}{r.uid:>{uid_width}}  {_when(r.date, r.received)}  "
        )
        sender = _clip(printable(_short_address(r.sender)) or "(no sender)", 22)
        rest = max(20, width - len(head) - 24)
        subject = _clip(printable(r.subject) or "(no subject)", rest)
        click.echo(f"{head}{sender:<22}  {subject}")


@cli.command()
@click.argument("folder", required=False)
@click.argument("uid", type=click.IntRange(min=1), required=False)
@_user_option("Whose mail (needed when this node has several users).")
@click.option("--folders", "list_folders", is_flag=True, help="List the folders and counts.")
@click.option("--unread", is_flag=True, help="Only messages not yet read.")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="Show the newest N messages (0: all).",
)
@click.option("--raw", is_flag=True, help="With a UID: the whole message, as stored.")
@click.option("--mark-read", is_flag=True, help="With a UID: mark the message as read.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def read(
    obj: Ctx,
    *,
    folder: str | None,
    uid: int | None,
    user: str | None,
    list_folders: bool,
    unread: bool,
    limit: int,
    raw: bool,
    mark_read: bool,
    as_json: bool,
) -> None:
    """Read mail here, without a mail client (over SSH on a Pi, for one).

    \b
    onionpost read                 the newest messages in INBOX (N marks unread ones)
    onionpost read Sent --unread   another folder; only unread messages
    onionpost read --folders       the folders, with how many messages each holds
    onionpost read INBOX 42        message 42 of INBOX: its headers and its text
    onionpost read INBOX 42 --raw  the whole message as it is stored

    Reading does not mark a message as read unless you add --mark-read.
    """
    from gateway.mailread import render_text

    if uid is None and (raw or mark_read):
        raise click.UsageError("--raw and --mark-read need a folder and a message UID.")
    if list_folders and (folder is not None or unread):
        raise click.UsageError("--folders lists every folder; it takes no folder or --unread.")
    reader = _mail_reader(obj, user)
    if list_folders:
        folders = reader.folders()
        if as_json:
            folder_list = [f.to_json() for f in folders]
            click.echo(json.dumps({"user": reader.user, "folders": folder_list}, indent=2))
            return
        width = max(len(f.name) for f in folders)
        for f in folders:
            click.echo(f"{f.name:<{width}}  {f.messages:>6} messages  {f.unseen:>6} unread")
        return
    name = reader.folder(folder or "INBOX")
    if uid is not None:
        msg = reader.message(name, uid)
        if mark_read:
            reader.mark_read(name, uid)
        if as_json:
            click.echo(json.dumps(msg.to_json(raw=raw), indent=2, ensure_ascii=False))
        elif raw:
            sys.stdout.flush()
            sys.stdout.buffer.write(msg.raw)
            sys.stdout.buffer.flush()
        else:
            click.echo(render_text(msg), nl=False)
        return
    rows = reader.messages(name, unread=unread, limit=limit or None)
    counts = next(f for f in reader.folders() if f.name == name)
    if as_json:
        click.echo(json.dumps({"user": reader.user, "folder": counts.to_json(),
                               "messages": [r.to_json() for r in rows]},
                              indent=2, ensure_ascii=False))  # fmt: skip
        return
    shown = f", showing the newest {len(rows)}" if len(rows) < counts.messages else ""
    what = "unread messages" if unread else "messages"
    click.echo(f"{name}: {counts.messages} messages, {counts.unseen} unread{shown}")
    if not rows:
        click.echo(f"No {what} in {name}.")
        return
    _print_summaries(rows, show_folder=False)
    click.echo(f"Read one with: onionpost read {name} UID")


@cli.command()
@click.argument("query", nargs=-1, required=True)
@click.option("--folder", default=None, help="Search only this folder (default: all folders).")
@click.option(
    "--in",
    "within",
    type=click.Choice(["text", "body", "subject", "from", "to"]),
    default="text",
    show_default=True,
    help="Where to look for the words: text is headers and body.",
)
@_user_option("Whose mail (needed when this node has several users).")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="Show the newest N matches (0: all).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def search(
    obj: Ctx,
    *,
    query: tuple[str, ...],
    folder: str | None,
    within: str,
    user: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Find messages that contain every word of QUERY (Dovecot's search).

    \b
    onionpost search invoice march          both words, anywhere in the message
    onionpost search --in subject meeting   only in the subject
    onionpost search --folder Sent alice    only in Sent

    Words are matched as parts of words and without regard to case; each is searched for as
    it is written (no search operators).
    """
    reader = _mail_reader(obj, user)
    field = cast("SearchField", within)
    rows = reader.search(list(query), folder=folder, within=field, limit=limit or None)
    if as_json:
        click.echo(json.dumps({"user": reader.user, "query": list(query), "in": within,
                               "folder": folder, "messages": [r.to_json() for r in rows]},
                              indent=2, ensure_ascii=False))  # fmt: skip
        return
    if not rows:
        click.echo("Nothing found.")
        return
    _print_summaries(rows, show_folder=True)
    click.echo(f"{len(rows)} found. Read one with: onionpost read FOLDER UID")


# --- contacts and devices --------------------------------------------------------------------


@cli.group(invoke_without_command=True)
@_user_option(_WHOSE)
@click.pass_context
def contacts(ctx: click.Context, user: str | None) -> None:
    """People you have exchanged mail with, their identity fingerprints and safety numbers.

    Every person on a node has their own contacts; say whose with --user."""
    if ctx.invoked_subcommand is not None:
        return
    from onionpost.app import admin

    obj: Ctx = ctx.obj
    with admin.opened(obj.config()) as local:
        views = admin.contacts(local, user)
        changes = admin.identity_changes(local, user)
        waiting = admin.pending_introductions(local, user)
    if not views:
        click.echo("No contacts yet.")
    for v in views:
        c = v.contact
        marks = [m for m, on in (("verified", c.verified), ("blocked", c.blocked)) if on]
        name = f" ({c.display_name})" if c.display_name else ""
        click.echo(f"{c.address}{name}  {v.fingerprint}  {' '.join(marks)}")
    verified = {v.contact.address for v in views if v.contact.verified}
    for ch in changes:
        whose = f" --user {user}" if user else ""
        loud = "VERIFIED contact " if ch.address in verified else ""
        click.echo(
            f"WARNING: your {loud}{ch.address} now presents a DIFFERENT identity key; "
            f"{ch.held} message(s) from it are held in Quarantine. Compare both keys with "
            f"`onionpost contacts show {ch.address}{whose}`, then run "
            f"`onionpost contacts accept-key {ch.address} FINGERPRINT{whose}` or "
            f"`onionpost contacts reject-key {ch.address}{whose}`."
        )
    for intro in waiting:
        click.echo(
            f"Introduced by {intro.introducer}: {intro.address} "
            f"(accept with `onionpost contacts accept-intro {intro.address}"
            + (f" --user {user}`)" if user else "`)")
        )


@contacts.command("show")
@click.argument("address")
@_user_option(_WHOSE)
@pass_ctx
def contacts_show(obj: Ctx, address: str, user: str | None) -> None:
    """Show a contact's fingerprint and the safety number to compare with them."""
    from onionpost.app import admin

    with admin.opened(obj.config()) as local:
        v = admin.contact(local, address, _group_user(user))
        changes = admin.key_changes(local, address, _group_user(user))
    c = v.contact
    click.echo(f"address:        {c.address}")
    if c.display_name:
        click.echo(f"name:           {c.display_name} (from their signed profile)")
    if changes:
        for ch in changes:
            _show_key_change(ch, verified=c.verified)
    else:
        click.echo(f"identity:       {v.fingerprint}")
        click.echo(f"safety number:  {v.safety_number}")
    click.echo(f"verified:       {'yes' if c.verified else 'no'}")
    click.echo(f"first seen:     {time.strftime('%Y-%m-%d', time.gmtime(c.first_seen))}")
    if changes:
        click.echo(
            "Ask your contact, over a channel you trust (in person, or a phone call in their "
            "voice), to read you their fingerprint (`onionpost contacts me`). If it is the "
            f"NEW one, run `onionpost contacts accept-key {c.address} FINGERPRINT` typing what "
            f"they read; if they did not change their key, run `onionpost contacts reject-key "
            f"{c.address}`."
        )
    else:
        click.echo(
            "Compare the safety number with your contact (in person or by phone); if it "
            "matches, run `onionpost contacts verify ADDRESS`."
        )


def _show_key_change(ch: KeyChangeView, *, verified: bool) -> None:
    """The pinned and the new key side by side; safety numbers as three rows of four."""
    seen = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ch.change.seen_at))
    loud = " (a key you VERIFIED)" if verified else ""
    click.echo(f"KEY CHANGE:     a different identity key was presented {seen}{loud}")
    click.echo(f"                {'PINNED (current)':<26}  NEW (not accepted)")
    click.echo(f"identity:       {ch.old_fingerprint:<26}  {ch.new_fingerprint}")
    old_groups, new_groups = ch.old_safety_number.split(), ch.new_safety_number.split()
    for row in range(3):
        label = "safety number:" if row == 0 else ""
        left = " ".join(old_groups[row * 4 : row * 4 + 4])
        right = " ".join(new_groups[row * 4 : row * 4 + 4])
        click.echo(f"{label:<16}{left:<26}  {right}")
    click.echo(f"held:           {ch.change.held} message(s) in Quarantine")


@contacts.command("verify")
@click.argument("address")
@click.option(
    "--scan",
    "scanned",
    metavar="TEXT",
    help="The text of your contact's QR code (`onionpost contacts me --qr` on their device): "
    "verified only if it names this address and the pinned key.",
)
@_user_option(_WHOSE)
@pass_ctx
def contacts_verify(obj: Ctx, address: str, scanned: str | None, user: str | None) -> None:
    """Record that you compared safety numbers (or scanned the QR code) with this contact.

    A verified contact's later key change is louder: its mail is held, never delivered to
    INBOX, until you accept the new key."""
    from onionpost.app import admin

    with admin.opened(obj.config()) as local:
        if scanned is not None:
            admin.verify_scanned(local, address, scanned, _group_user(user))
        else:
            admin.set_contact(local, address, verified=True, user=_group_user(user))
    how = "the scanned code matches the pinned key; " if scanned is not None else ""
    click.echo(f"{how}{address} is marked as verified.")


@contacts.command("me")
@click.option("--qr", is_flag=True, help="Also draw it as a QR code for a contact to scan.")
@_user_option(_WHOSE)
@pass_ctx
def contacts_me(obj: Ctx, qr: bool, user: str | None) -> None:
    """Your own address and identity fingerprint, for a contact to compare (or scan)."""
    from onionpost.app import admin

    with admin.opened(obj.config()) as local:
        address, fp, payload = admin.own_identity(local, _group_user(user))
    click.echo(f"address:      {address}")
    click.echo(f"fingerprint:  {fp}")
    if qr:
        click.echo(_qr(payload))
        click.echo(payload)
        click.echo(
            f"Your contact scans this and runs `onionpost contacts verify {address} --scan TEXT`."
        )


@contacts.command("block")
@click.argument("address")
@_user_option(_WHOSE)
@pass_ctx
def contacts_block(obj: Ctx, address: str, user: str | None) -> None:
    """Refuse this contact's mail: their token is withdrawn at your inbox, so their mail
    bounces there; mail they send as a stranger is dropped here unseen."""
    from onionpost.app import admin

    with admin.opened(obj.config()) as local:
        admin.block(local, address, _group_user(user))
    click.echo(
        f"{address} is blocked: your inbox refuses their contact token, and mail they send "
        "as a stranger is dropped without reaching you."
    )


@contacts.command("unblock")
@click.argument("address")
@_user_option(_WHOSE)
@pass_ctx
def contacts_unblock(obj: Ctx, address: str, user: str | None) -> None:
    """Lift a block. Their withdrawn token stays withdrawn: they write as a stranger until
    you write to them."""
    from onionpost.app import admin

    with admin.opened(obj.config()) as local:
        admin.unblock(local, address, _group_user(user))
    click.echo(
        f"{address} is no longer blocked. Their next message comes as a stranger's "
        "(write to them to make them a contact again)."
    )


_POLICY_WORDS = {
    True: "open (strangers may write, paying a proof of work)",
    False: "contacts-only (strangers' mail is refused at your inbox)",
}


@contacts.command("policy")
@click.argument("mode", required=False, type=click.Choice(["contacts-only", "open"]))
@_user_option(_WHOSE)
@pass_ctx
def contacts_policy(obj: Ctx, mode: str | None, user: str | None) -> None:
    """Who may write to you: contacts-only, or open (strangers too, with a proof of work).

    A contact is someone holding a token for your mailbox: someone you wrote to."""
    from onionpost.app import admin

    with admin.opened(obj.config()) as local:
        if mode is not None:
            admin.set_policy(local, accepts_strangers=mode == "open", user=_group_user(user))
        current = admin.accepts_strangers(local, _group_user(user))
    click.echo(f"mail from:  {_POLICY_WORDS[current is not False]}")


@contacts.command("accept-key")
@click.argument("address")
@click.argument("fingerprint", nargs=-1, required=True)
@_user_option(_WHOSE)
@pass_ctx
def contacts_accept_key(
    obj: Ctx, address: str, fingerprint: tuple[str, ...], user: str | None
) -> None:
    """Pin a contact's NEW identity key, if FINGERPRINT (as they read it to you over a channel
    you trust) is that key's. Spaces, dashes and case do not matter."""
    from onionpost.app import admin

    with admin.opened(obj.config()) as local:
        change = admin.accept_key(local, address, " ".join(fingerprint), _group_user(user))
    click.echo(f"The new identity key of {address} is pinned; mail to and from it flows again.")
    if change.held:
        click.echo(
            f"{change.held} message(s) it sent while the key was not accepted stay in your "
            "Quarantine folder; move them to INBOX in your mail client once you have read them."
        )
    click.echo(
        f"It is no longer marked verified: verify the new key with "
        f"`onionpost contacts verify {address}` when you have compared it in person."
    )


@contacts.command("reject-key")
@click.argument("address")
@_user_option(_WHOSE)
@pass_ctx
def contacts_reject_key(obj: Ctx, address: str, user: str | None) -> None:
    """Keep the pinned identity key: mail signed by the new key is refused from now on."""
    from onionpost.app import admin

    with admin.opened(obj.config()) as local:
        rejected = admin.reject_key(local, address, _group_user(user))
    held = sum(ch.held for ch in rejected)
    click.echo(
        f"The pinned identity key of {address} is kept; mail signed by the rejected key is "
        "refused from now on."
    )
    if held:
        click.echo(
            f"{held} message(s) signed by it stay in Quarantine: delete them, or keep them "
            "as evidence."
        )


@contacts.command("trust", hidden=True)
@click.argument("address")
@_user_option(_WHOSE)
@pass_ctx
def contacts_trust(obj: Ctx, address: str, user: str | None) -> None:
    """Replaced by accept-key, which checks the fingerprint you type."""
    raise UsageError(
        "`onionpost contacts trust` is gone: it pinned whatever key came next. Compare the "
        f"keys with `onionpost contacts show {address}`, then run `onionpost contacts "
        f"accept-key {address} FINGERPRINT` with the fingerprint your contact read to you."
    )


@contacts.command("introduce")
@click.argument("first")
@click.argument("second")
@_user_option(_WHOSE)
@pass_ctx
def contacts_introduce(obj: Ctx, first: str, second: str, user: str | None) -> None:
    """Introduce two of your contacts to each other.

    Each gets a signed introduction naming the other's address and identity fingerprint;
    once one accepts (`onionpost contacts accept-intro`), the other can write to them
    without a proof of work, even when they accept mail from contacts only."""
    from onionpost.app import admin

    with admin.opened(obj.config()) as local:
        sid_b, sid_c = admin.introduce(local, first, second, _group_user(user))
    click.echo(
        f"Queued an introduction for each of them (s{sid_b}, s{sid_c}); "
        "`onionpost queue` shows them until they are delivered."
    )


@contacts.command("accept-intro")
@click.argument("address")
@_user_option(_WHOSE)
@pass_ctx
def contacts_accept_intro(obj: Ctx, address: str, user: str | None) -> None:
    """Accept an introduction: pin the introduced person's identity key and let them write
    to you without a proof of work (also when you accept mail from contacts only)."""
    from onionpost.app import admin
    from onionpost.core.crypto.fingerprint import fingerprint

    with admin.opened(obj.config()) as local:
        accepted = admin.accept_introduction(local, address, _group_user(user))
    intro = accepted.introduction
    click.echo(
        f"Accepted {intro.address}, introduced by {intro.introducer}: identity "
        f"{fingerprint(intro.uik_pk)} is pinned and they may write to you."
    )
    if not accepted.checked_now:
        click.echo(
            "Their inbox could not be reached now: the first time it is, the identity key it "
            "presents is compared with this one, and a different one is refused."
        )


# --- profile -------------------------------------------------------------------------------


@cli.group(invoke_without_command=True)
@_user_option(_WHOSE)
@click.pass_context
def profile(ctx: click.Context, user: str | None) -> None:
    """Your public profile: a display name and an avatar, signed with your identity key and
    served to anyone who fetches your keys (see also: profile set, profile clear)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(profile_show, user=user)


def _print_profile(p: Profile | None) -> None:
    if p is None:
        click.echo("You have no profile. Set one with: onionpost profile set --name NAME")
        return
    click.echo(f"name:    {p.display_name}")
    if p.avatar:
        click.echo(f"avatar:  {p.avatar_type}, {len(p.avatar)} bytes")
    else:
        click.echo("avatar:  none")
    click.echo(f"signed:  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(p.issued_at))}")


@profile.command("show")
@click.option(
    "--save-avatar",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Also write the published avatar to this file.",
)
@_user_option(_WHOSE)
@pass_ctx
def profile_show(obj: Ctx, user: str | None, save_avatar: str | None = None) -> None:
    """Show the profile your contacts see."""
    from onionpost.app import admin

    with admin.opened(obj.config()) as local:
        p = admin.profile_show(local, _group_user(user))
    _print_profile(p)
    if save_avatar is not None and p is not None and p.avatar:
        Path(save_avatar).write_bytes(p.avatar)
        click.echo(f"The avatar is in {save_avatar}.")


@profile.command("set")
@click.option("--name", default=None, help='Your display name, e.g. "Alice Liddell".')
@click.option(
    "--avatar",
    type=click.Path(exists=True, dir_okay=False, readable=True),
    default=None,
    help="A PNG or JPEG picture (scaled to 256 pixels and re-encoded before publishing).",
)
@click.option("--no-avatar", is_flag=True, help="Publish no avatar (drop the current one).")
@_user_option(_WHOSE)
@pass_ctx
def profile_set(
    obj: Ctx, name: str | None, avatar: str | None, no_avatar: bool, user: str | None
) -> None:
    """Sign and publish your display name and avatar. What you leave out is kept."""
    from onionpost.app import admin
    from onionpost.device.avatar import MAX_AVATAR_FILE

    if name is None and avatar is None and not no_avatar:
        raise click.UsageError("Give --name, --avatar or --no-avatar.")
    picture = None
    if avatar is not None:
        try:
            with Path(avatar).open("rb") as f:
                picture = f.read(MAX_AVATAR_FILE + 1)
        except OSError as exc:
            raise click.UsageError(f"Cannot read {avatar}: {exc.strerror}.") from exc
    with admin.opened(obj.config()) as local:
        p = admin.profile_set(
            local, name=name, avatar=picture, no_avatar=no_avatar, user=_group_user(user)
        )
    click.echo("Your profile is published:")
    _print_profile(p)


@profile.command("clear")
@_user_option(_WHOSE)
@pass_ctx
def profile_clear(obj: Ctx, user: str | None) -> None:
    """Publish an empty profile: contacts forget your name and avatar as they see it."""
    from onionpost.app import admin

    with admin.opened(obj.config()) as local:
        admin.profile_clear(local, _group_user(user))
    click.echo("Your profile is cleared: no name, no avatar.")


@cli.group(invoke_without_command=True)
@_user_option(_WHOSE)
@click.pass_context
def devices(ctx: click.Context, user: str | None) -> None:
    """Your devices, each with its own keys (see also: devices add, rename, revoke)."""
    if ctx.invoked_subcommand is not None:
        return
    from onionpost.app import admin

    obj: Ctx = ctx.obj
    with admin.opened(obj.config()) as local:
        account, views = admin.device_views(local, user)
    dl = account.device_list
    now = time.time()
    click.echo(f"{account.address}: device list version {dl.version}")
    click.echo(f"  {'ID':<12}  {'NAME':<18} {'ADDED':<10}  {'LAST SEEN':>9}  KEY")
    for v in views:
        d = v.entry
        me = "  <- this device" if v.this else ""
        added = time.strftime("%Y-%m-%d", time.gmtime(d.added_at))
        seen = f"{_age(now - v.last_seen)} ago" if v.last_seen else "-"
        key_age = f"#{d.dsk_seq}"
        if v.this:
            key_age += f", {_age(now - account.device.signed_prekey().created_at)} old prekey"
        click.echo(
            f"  {d.device_id.hex()[:12]}  {d.name:<18} {added:<10}  {seen:>9}  {key_age}{me}"
        )
    for r in dl.revoked:
        when = time.strftime("%Y-%m-%d", time.gmtime(r.revoked_at))
        click.echo(f"  {r.device_id.hex()[:12]}  revoked {when}")
    if account.identity is None:
        click.echo("This device does not hold your identity key: add and revoke on one that does.")
    if not any(v.last_seen for v in views):
        click.echo("(LAST SEEN comes from your inbox: start the node, then look again.)")


@devices.command("add")
@_user_option(_WHOSE)
@click.option("--json", "as_json", is_flag=True, help="Print the code and the result as JSON.")
@pass_ctx
def devices_add(obj: Ctx, user: str | None, as_json: bool) -> None:
    """Add another machine as your device: prints a one-time pairing code to use there with
    `onionpost init --join CODE`, then waits for it (a few minutes at most)."""
    from onionpost.app import admin
    from onionpost.base.clock import SystemClock
    from onionpost.core.crypto.fingerprint import fingerprint
    from onionpost.core.pairing import Code
    from onionpost.device.joining import inbox_dialer, offer_pairing

    config = obj.config()
    say = (lambda _: None) if as_json else click.echo

    def show(code: Code, expires: int) -> None:
        if as_json:
            click.echo(
                json.dumps({"code": code.text(), "qr": code.qr_payload(), "expires_at": expires})
            )
            sys.stdout.flush()
            return
        click.echo("On the new machine, run:\n")
        click.echo(f"  onionpost init --join {code.text()}\n")
        click.echo(_qr(code.qr_payload()))
        click.echo(
            f"Your identity is {fingerprint(account.uik_pk)}: the new device shows the same "
            "when it has joined."
        )
        click.echo(
            f"The code works once, until {_clock_time(expires)}. Waiting for the new device..."
        )

    with admin.opened(config) as local:
        account = local.account(_group_user(user))

        async def main() -> Any:  # noqa: ANN401
            async with inbox_dialer(config, say=say, own_onion=account.address.onion) as dialer:
                return await offer_pairing(
                    account,
                    config,
                    dialer=dialer,
                    say=say,
                    show_code=show,
                    clock=SystemClock(),
                    save=local.files.save,
                )

        entry = asyncio.run(main())
    admin.poke(obj.data_dir)
    if as_json:
        click.echo(json.dumps({"added": entry.device_id.hex(), "name": entry.name}))
    else:
        click.echo(
            f"Added {entry.name} ({entry.device_id.hex()[:12]}). It receives your mail from now on."
        )


@devices.command("rename")
@click.argument("device")
@click.argument("name")
@_user_option(_WHOSE)
@pass_ctx
def devices_rename(obj: Ctx, device: str, name: str, user: str | None) -> None:
    """Give a device another name."""
    from onionpost.app import admin

    with admin.opened(obj.config()) as local:
        account = admin.rename(local, device, name, _group_user(user))
    click.echo(f"Renamed. Device list is now version {account.device_list.version}.")


@devices.command("revoke")
@click.argument("device")
@_user_option(_WHOSE)
@pass_ctx
def devices_revoke(obj: Ctx, device: str, user: str | None) -> None:
    """Revoke a lost or stolen device: its inbox refuses it at once and drops its mail."""
    from onionpost.app import admin

    with admin.opened(obj.config()) as local:
        account = admin.revoke(local, device, _group_user(user))
    click.echo(f"Revoked. Device list is now version {account.device_list.version}.")


def _clock_time(when: int) -> str:
    return time.strftime("%H:%M", time.localtime(when))


def _qr(payload: str) -> str:
    """A QR code drawn with half blocks: two modules per character cell, with the quiet zone
    the standard asks for, so a phone camera reads it off any terminal."""
    import segno

    matrix = [list(row) for row in segno.make(payload, error="m", boost_error=False).matrix]
    quiet = 2
    width = len(matrix[0]) + 2 * quiet
    rows = [[0] * width for _ in range(quiet)]
    rows += [[0] * quiet + [int(bool(m)) for m in r] + [0] * quiet for r in matrix]
    rows += [[0] * width for _ in range(quiet + 1)]
    # dark module = ink; terminals are usually light-on-dark, so draw the light modules
    chars = {(0, 0): "█", (0, 1): "▀", (1, 0): "▄", (1, 1): " "}
    lines = []
    for top, bottom in zip(rows[0::2], rows[1::2], strict=False):
        lines.append("".join(chars[(a, b)] for a, b in zip(top, bottom, strict=True)))
    return "\n".join(lines)


# --- doctor -------------------------------------------------------------------------------------


@cli.command()
@pass_ctx
def doctor(obj: Ctx) -> None:
    """Check what can go wrong (tor, the onion, ports, permissions, clock, disk, a second
    node) and say what to do about each problem."""
    from onionpost.app.doctor import examine

    findings = asyncio.run(examine(obj.config()))
    for f in findings:
        click.echo(f"{'ok ' if f.ok else '!! '} {f.check:<14} {f.detail}")
        if not f.ok and f.fix:
            click.echo(f"{'':<4}{'':<14} -> {f.fix}")
    problems = sum(not f.ok for f in findings)
    if problems:
        _fail(f"{problems} problem(s) found; see above.")
    click.echo("Everything checked is fine.")


# --- keys ---------------------------------------------------------------------------------------


@cli.group(invoke_without_command=True)
@click.option("--user", default=None, help="Whose keys (default: everyone's on this machine).")
@click.pass_context
def keys(ctx: click.Context, user: str | None) -> None:
    """This machine's keys, their ages and next rotation (see also: keys rotate)."""
    if ctx.invoked_subcommand is not None:
        return
    from onionpost.app import admin

    obj: Ctx = ctx.obj
    now = time.time()
    with admin.opened(obj.config()) as local:
        rows = admin.key_rows(local, user)
    if not rows:
        raise NotInitialized()
    click.echo(f"{'KEY':<44} {'AGE':>5}  {'NEXT':>8}  DETAIL")
    for r in rows:
        age = _age(now - r.created_at) if r.created_at else "-"
        if r.next_at is None:
            nxt = "-"
        elif r.next_at <= now:
            nxt = "due"
        else:
            nxt = "in " + _age(r.next_at - now)
        click.echo(f"{r.what:<44} {age:>5}  {nxt:>8}  {r.detail}")
    click.echo(
        "The running node rotates keys when they are due; `onionpost keys rotate` does it now."
    )


@keys.command("rotate")
@pass_ctx
def keys_rotate(obj: Ctx) -> None:
    """Rotate every key of this machine now (the running node does it and publishes them)."""
    from onionpost.app import admin

    with admin.opened(obj.config()) as local:
        asked = admin.request_rotation(local)
    if not asked:
        raise UsageError(
            "The node is not running; keys are rotated by the node. Start it (`onionpost run`) "
            "and run this again."
        )
    click.echo("The node rotates every key now and publishes them; `onionpost keys` shows them.")


# --- backup and restore ------------------------------------------------------------------------


_PASSPHRASE_FILE = click.option(
    "--passphrase-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="Read the passphrase from this file (for scripts) instead of asking.",
)


def _passphrase(path: Path | None, *, confirm: bool) -> str:
    if path is not None:
        try:
            return path.read_text(encoding="utf-8").rstrip("\n")
        except OSError as exc:
            raise UsageError(f"Cannot read the passphrase file {path}: {exc.strerror}.") from exc
    if not sys.stdin.isatty():
        raise UsageError("Give the passphrase with --passphrase-file (no terminal to ask on).")
    text: str = click.prompt("Backup passphrase", hide_input=True, confirmation_prompt=confirm)
    return text


@cli.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@_PASSPHRASE_FILE
@pass_ctx
def backup(obj: Ctx, file: Path, passphrase_file: Path | None) -> None:
    """Write one encrypted file with your keys, settings and mail (safe while the node runs)."""
    from onionpost.app.backup import make_backup

    report = make_backup(obj.config(), file, _passphrase(passphrase_file, confirm=True))
    click.echo(
        f"Backed up {report.files} files ({report.plaintext_bytes // 1024} KiB) to {file}, "
        "encrypted with your passphrase. Keep it somewhere other than this machine; without "
        "the passphrase nobody (you included) can open it."
    )


@cli.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@_PASSPHRASE_FILE
@pass_ctx
def restore(obj: Ctx, file: Path, passphrase_file: Path | None) -> None:
    """Bring back a backup on a new machine (into a data directory with no identity yet)."""
    from onionpost.app.backup import restore_backup

    found = restore_backup(obj.config(), file, _passphrase(passphrase_file, confirm=False))
    click.echo(f"Restored into {obj.data_dir}:")
    for what in found:
        click.echo(f"  {what}")
    click.echo(
        "Start the node with `onionpost run`. Stop the old machine for good if it still runs: "
        "two nodes with the same address compete for it."
    )


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
    from onionpost.app import demo as demo_module

    logging.basicConfig(level=logging.DEBUG if obj.debug else logging.ERROR)
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
    from onionpost.app import admin
    from onionpost.app.provision import add_user

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


@users.command("invite")
@click.argument("name")
@click.option(
    "--expires",
    "hours",
    type=click.IntRange(1, 24 * 30),
    default=None,
    help="Hours the code is valid (default: inbox.invite_hours, 24).",
)
@click.option("--quota", default=None, help="Mailbox size limit, e.g. 500M or 2G.")
@click.option(
    "--max-devices",
    type=click.IntRange(1, 64),
    default=None,
    help="How many devices the person may have.",
)
@click.option(
    "--can-invite",
    type=click.IntRange(0, 10_000),
    default=0,
    show_default=True,
    help="How many others they may invite in turn (paid from your own allowance).",
)
@_user_option("Who invites, on a machine with several users (their inbox mints the code).")
@click.option("--json", "as_json", is_flag=True, help="Print the invite as JSON.")
@pass_ctx
def users_invite(
    obj: Ctx,
    *,
    name: str,
    hours: int | None,
    quota: str | None,
    max_devices: int | None,
    can_invite: int,
    user: str | None,
    as_json: bool,
) -> None:
    """Invite a person to have their mailbox on this inbox: prints a one-time code for
    `onionpost init --invite CODE` on their own machine (their keys are made there).

    On the inbox machine this is the admin's invite (no limit). On your own machine, with
    your inbox elsewhere, your inbox mints it if your invite allowance covers it (1 for the
    person plus --can-invite); its quota and device limit can be no more than your own."""
    from onionpost.app import admin

    with admin.opened(obj.config()) as local:
        code, expires = admin.invite(
            local,
            name,
            lifetime=hours * 3600 if hours else None,
            quota_bytes=_parse_size(quota) if quota else None,
            max_devices=max_devices,
            can_invite=can_invite,
            user=user,
        )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "user": name.lower(),
                    "code": code.text(),
                    "qr": code.qr_payload(),
                    "inbox": f"{code.onion}.onion",
                    "expires_at": expires,
                    "can_invite": can_invite,
                }
            )
        )
        return
    click.echo(f"Invite for {name.lower()}@{code.onion}.onion\n")
    click.echo("On their own computer, they run:\n")
    click.echo(f"  onionpost init --invite {code.text()}\n")
    click.echo(_qr(code.qr_payload()))
    if can_invite:
        click.echo(f"With it they may invite {can_invite} other(s) (`onionpost users invite`).")
    click.echo(
        f"The code works once, until {time.strftime('%Y-%m-%d %H:%M', time.localtime(expires))}."
        " Give it to them in person or over a channel you trust."
    )


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)i?b?\s*", text.lower())
    if m is None:
        raise click.BadParameter(f"'{text}' is not a size; write e.g. 500M or 2G.")
    unit: int = 1024 ** " kmgt".index(m.group(2) or " ")
    return int(m.group(1)) * unit


@users.command("list")
@pass_ctx
def users_list(obj: Ctx) -> None:
    """Everyone with an address on this node, and what their mailbox uses.

    MAIL and SPOOLED are the messages (and their size) waiting at this node's inbox for the
    user's devices to fetch; QUOTA is the most the spool may hold."""
    from onionpost.app import admin

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
@click.option(
    "--with-invitees", is_flag=True, help="Remove the people they invited too (all the way down)."
)
@click.option("--reparent", is_flag=True, help="Move the people they invited under you.")
@_user_option("Who removes, on a machine with several users (see `users tree`).")
@pass_ctx
def users_remove(
    obj: Ctx, *, name: str, yes: bool, with_invitees: bool, reparent: bool, user: str | None
) -> None:
    """Delete a person: their mailbox and mail, contacts, keys and login.

    On the inbox machine (the admin) anyone can be removed. On your own machine, with your
    inbox elsewhere, you can remove the people below you in the invite chain (people you
    invited, the people they invited, ...); your inbox checks. Someone who invited others
    needs --with-invitees or --reparent. This cannot be undone."""
    from onionpost.app import admin
    from onionpost.core.chain import Invitees

    if with_invitees and reparent:
        raise click.UsageError("Use only one of --with-invitees and --reparent.")
    invitees = Invitees.REMOVE if with_invitees else Invitees.REPARENT if reparent else None
    name = name.lower()
    with admin.opened(obj.config()) as local:
        if local.inbox_db() is None and not admin.user_exists(local, name):
            _remove_member(local, name, invitees, yes=yes, user=user)
            return
        admin.check_user_exists(local, name)
        invitees = admin.removal_choice(local, name, invitees, _ask_invitees)
        if not yes:
            click.confirm(
                f"Delete {name}'s mailbox, mail, contacts, keys and login for good?",
                abort=True,
            )
        removed = admin.remove_user(local, name, invitees)
    from gateway.setup import forget_login

    mail = sum(forget_login(obj.config(), who) for who in (removed.user, *removed.also_removed))
    click.echo(
        f"Removed {removed.user}: {mail + removed.messages} message(s) of mail, "
        f"{removed.spooled_messages} waiting at the inbox, {removed.contacts} contact(s), "
        f"{removed.submissions} queued submission(s)."
    )
    _print_chain_removal(removed.also_removed, removed.reparented, "the admin")
    if not removed.mailbox:
        click.echo("This machine runs no inbox holding their mailbox; none was removed.")
    if removed.node_told:
        click.echo("The running node stops serving them now.")


def _remove_member(
    local: Local,
    name: str,
    invitees: Invitees | None,
    *,
    yes: bool,
    user: str | None,
) -> None:
    """`users remove` of someone below this machine's person, at their inbox."""
    from onionpost.app import admin

    if not yes:
        click.confirm(
            f"Remove {name}'s mailbox at your inbox for good (their mail waiting there too)?",
            abort=True,
        )
    removed, moved = admin.remove_member(local, name, invitees, user=user, ask=_ask_invitees)
    click.echo(f"Removed {removed[0]} at your inbox." if removed else "Nobody was removed.")
    _print_chain_removal(tuple(removed[1:]), tuple(moved), "you")


def _print_chain_removal(also: tuple[str, ...], moved: tuple[str, ...], whom: str) -> None:
    if also:
        click.echo(f"Also removed, invited by them: {', '.join(also)}.")
    if moved:
        click.echo(f"Now invited by {whom}: {', '.join(moved)}.")


def _ask_invitees(target: str, below: list[str]) -> Invitees | None:
    """Ask at a terminal what happens to the people ``target`` invited; None (and the
    command's clear refusal) when nobody is at a terminal to answer."""
    from onionpost.core.chain import Invitees

    if not sys.stdin.isatty():
        return None
    answer = click.prompt(
        f"{target} invited {', '.join(below)}. Remove them too, or move them under you?",
        type=click.Choice(["remove", "reparent", "cancel"]),
        default="cancel",
    )
    if answer == "cancel":
        raise click.Abort()
    return Invitees(answer)


@users.command("tree")
@_user_option("Whose part of the chain, on a machine with several users.")
@pass_ctx
def users_tree(obj: Ctx, user: str | None) -> None:
    """The invite chain: who invited whom, how many invites each may still give, and the
    limits each got. On the inbox machine the whole chain; elsewhere you and those below you.
    """
    from onionpost.app import admin

    with admin.opened(obj.config()) as local:
        rows = admin.tree(local, user)
    width = max([len("  " * r.depth + (r.user or "(admin)")) for r in rows] + [4])
    click.echo(
        f"{'USER':<{width}}  {'INVITED BY':<12}  {'INVITES LEFT':>12}  {'QUOTA':>9}  {'DEVICES':>7}"
    )
    for r in rows:
        who = "  " * r.depth + (r.user or "(admin)")
        if r.user is None:
            click.echo(f"{who:<{width}}  {'-':<12}  {'unlimited':>12}  {'-':>9}  {'-':>7}")
            continue
        by = r.invited_by or "(admin)"
        left = "unlimited" if r.remaining is None else str(r.remaining)
        devices = "-" if r.max_devices is None else str(r.max_devices)
        click.echo(f"{who:<{width}}  {by:<12}  {left:>12}  {_size(r.quota_bytes):>9}  {devices:>7}")


# --- mail clients ------------------------------------------------------------------------------


@cli.command()
@click.option("--user", default=None, help="Whose password (default: the only user).")
@click.option("--generate", is_flag=True, help="Make a new random password and print it.")
@pass_ctx
def password(obj: Ctx, user: str | None, generate: bool) -> None:
    """Set the password mail clients use to log in to the local gateway."""
    from gateway.setup import set_password
    from onionpost.app import admin

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
    from onionpost.app import admin

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


@cli.command()
@click.argument("action", type=click.Choice(["on", "off", "status"]), default="status")
@pass_ctx
def lan(obj: Ctx, action: str) -> None:
    """LAN access: let other computers on your network use this gateway (off by default).

    `lan on` makes IMAP and SMTP listen on every address of this computer as well as
    127.0.0.1, with TLS required for every login from elsewhere and a certificate from a
    LAN CA of its own; `lan off` puts them back on 127.0.0.1 only.  Either takes effect
    when the node next starts.  See docs/thunderbird.md, "Using the gateway from another
    computer on your LAN".
    """
    from gateway.lan import certificate_gaps, describe, tls_names
    from gateway.tls import ensure_lan_tls, ensure_tls
    from onionpost.base.config import set_setting

    config = obj.config()
    if action != "status":
        wanted = action == "on"
        if config.gateway.lan != wanted:
            path = set_setting(obj.data_dir, "gateway", "lan", wanted)
            click.echo(f"Set [gateway] lan = {str(wanted).lower()} in {path}.")
        config = obj.config()
    tls_dir = config.data_dir / "tls"
    names = tls_names()
    click.echo(f"LAN access: {describe(config.gateway)}")
    if config.gateway.lan:
        ensure_tls(tls_dir)
        files = ensure_lan_tls(tls_dir, names.dns, names.ips)
        click.echo(f"  names:     {names.describe() or '(none found)'}")
        if names.unnamed:
            unnamed = ", ".join(str(a) for a in names.unnamed)
            click.echo(f"  not named: {unnamed} (internet addresses; use a name above)")
        click.echo(f"  LAN CA:    {files.ca_cert.resolve()}")
        click.echo("             copy it to the other computer and import it into Thunderbird")
    gaps = certificate_gaps(tls_dir, names) if config.gateway.lan else []
    running = _running_node(obj)
    if action == "status":
        if gaps:
            click.echo(f"  the certificate does not name yet: {', '.join(gaps)}")
        if running is not None and _config_changed_since(config, running):
            click.echo("The running node started before this setting: restart it to apply.")
        return
    if running is not None:
        click.echo(
            "Restart the node to apply it (systemctl restart onionpost, or stop "
            "`onionpost run` and start it again)."
        )
    else:
        click.echo("It applies when the node starts (onionpost run).")


def _running_node(obj: Ctx) -> dict[str, Any] | None:
    try:
        info = json.loads((obj.data_dir / "run" / "status.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(info, dict) and _pid_alive(int(info.get("pid", 0))):
        return info
    return None


def main() -> None:
    with contextlib.suppress(BrokenPipeError):
        cli(prog_name="onionpost")


if __name__ == "__main__":  # pragma: no cover
    main()
