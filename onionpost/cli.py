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
from typing import Any, NoReturn

import click

from onionpost import __version__
from onionpost.config import Config, default_data_dir, load
from onionpost.errors import NotInitialized, OnionpostError

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


def _gateway_setup() -> Callable[[Config, Any], str | None] | None:
    """The gateway's part of `init` (mail-client password, local CA), if it is installed."""
    try:
        from gateway.setup import setup_account
    except ImportError:
        return None
    return setup_account


# --- run and status -------------------------------------------------------------------------


def _logging(config: Config, debug: bool) -> None:
    level = logging.DEBUG if debug else getattr(logging, config.log_level.upper())
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("stem", "aiohttp.access", "mail.log", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
        await node.run_until(stop)

    asyncio.run(main())


def _gateway_extensions() -> tuple[Any, ...]:
    try:
        from gateway.service import start_gateway
    except ImportError:
        return ()
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
        raise NotInitialized(
            "The node is not running (no status file). Start it with `onionpost run`."
        ) from exc
    alive = _pid_alive(int(info.get("pid", 0))) and time.time() - info.get("updated_at", 0) < 30
    info["running"] = alive
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"node:      {'running' if alive else 'NOT running'} (pid {info.get('pid')})")
    for user in info.get("users", []):
        click.echo(f"address:   {user}")
    tor = info.get("tor", {})
    click.echo(f"tor:       {tor.get('mode', 'off')}")
    for key in (
        "version",
        "bootstrap_percent",
        "onion",
        "published",
        "pow_enabled",
        "pow_note",
        "last_inbound",
        "last_outbound",
        "last_error",
    ):
        if tor.get(key) not in (None, ""):
            click.echo(f"  {key.replace('_', ' ')}: {_when(key, tor[key])}")
    queue = info.get("queue", {})
    if queue:
        click.echo(f"queue:     {queue.get('queued', 0)} message(s) waiting")


def _when(key: str, value: object) -> object:
    if key.startswith("last_") and isinstance(value, int | float) and value > 1e9:
        return f"{int(time.time() - value)} s ago"
    return value


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


def main() -> None:
    with contextlib.suppress(BrokenPipeError):
        cli(prog_name="onionpost")


if __name__ == "__main__":  # pragma: no cover
    main()
