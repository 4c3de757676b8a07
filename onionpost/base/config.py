"""Configuration: typed, frozen, validated, with secure defaults.

The file is ``<data dir>/onionpost.toml``; every key is optional.  Unknown keys and bad values
raise :class:`ConfigError` naming the key, so a typo never silently falls back to a default.
The data directory itself comes from ``--data-dir``, else ``ONIONPOST_HOME``, else the
platform default (``/var/lib/onionpost`` for root, ``$XDG_DATA_HOME/onionpost`` or
``~/.local/share/onionpost`` for everyone else).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_type_hints

from onionpost.base.atomicfile import write_atomic
from onionpost.core.errors import ConfigError

CONFIG_FILE = "onionpost.toml"
DAY = 86_400
HOUR = 3_600
MiB = 1 << 20
#: More threads than this only add memory: each opens one envelope at a time.
MAX_CRYPTO_WORKERS = 64

Role = Literal["both", "inbox", "gateway"]
TorMode = Literal["launch", "attach", "off"]


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("ONIONPOST_HOME"):
        return Path(env["ONIONPOST_HOME"]).expanduser()
    if os.geteuid() == 0:
        return Path("/var/lib/onionpost")
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "onionpost"


@dataclass(frozen=True)
class InboxConfig:
    """The post office: the node API that the onion service maps to."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 0  # 0: a free port, chosen at start and recorded in the run state
    max_envelope_bytes: int = 64 * MiB  # sealed size; fits a 50 MiB message with padding
    quota_bytes: int = 2048 * MiB  # per mailbox, all of its devices' spools together
    spool_days: int = 14  # undelivered sealed mail for a device is dropped after this
    pow_bits: int = 19  # stranger proof-of-work: ~0.25 s here, ~1 s on a Pi 4 (make bench)
    max_connections: int = 256
    request_timeout: float = 120.0  # a whole request (headers and body) must arrive within this
    header_timeout: float = 15.0
    # Accepted mail per hour (the window is the clock hour).  Contacts and strangers have
    # separate budgets, so strangers cannot use up what contacts need (docs/threat-model.md).
    rate_per_mailbox_per_hour: int = 600  # from all contacts into one mailbox
    rate_per_source_per_hour: int = 300  # from one contact token
    rate_strangers_per_mailbox_per_hour: int = 100  # stamped, into one mailbox, per difficulty
    rate_strangers_per_hour: int = 1200  # stamped, into all mailboxes here, per difficulty
    longpoll_seconds: float = 25.0
    invite_hours: int = 24  # how long an invite code (users invite) can be used
    pairing_minutes: int = 10  # how long a pairing code (devices add) can be used
    code_failures_per_hour: int = 20  # wrong codes tried at this inbox before it stops checking


@dataclass(frozen=True)
class TorConfig:
    """How onionpost reaches tor.  See torrc.example."""

    mode: TorMode = "launch"
    tor_binary: str = "tor"
    control_port: int = 0  # attach mode: 0 means use control_socket
    control_socket: str = "/run/tor/control"
    control_password: str = ""  # attach mode, when the system tor uses HashedControlPassword
    socks_host: str = "127.0.0.1"
    socks_port: int = 0  # attach mode: the system tor's SocksPort (launch mode picks its own)
    pow_defense: bool = True
    pow_queue_rate: int = 250  # introductions/s tor hands to the service while under attack
    pow_queue_burst: int = 2500
    onion_port: int = 80  # the virtual port of the inbox onion service
    bootstrap_timeout: float = 300.0
    # Seconds between self-reachability probes through our own onion address (0: never).
    self_probe_interval: int = 600
    # Only for tests and the offline demo with mode "off": onion label -> "host:port".
    static_routes: Mapping[str, str] = field(default_factory=dict)
    # Extra torrc lines for a launched tor (the private test network uses these).
    extra_torrc: tuple[str, ...] = ()


@dataclass(frozen=True)
class GatewayConfig:
    """The local SMTP submission and IMAP servers for mail clients."""

    listen_host: str = "127.0.0.1"
    smtp_port: int = 1587
    imap_port: int = 1143
    autoconfig_port: int = 8088
    max_message_bytes: int = 50 * MiB
    require_tls: bool = False  # plaintext AUTH is allowed on loopback; see docs/thunderbird.md
    #: A submitted message's Sent copy waits this long for the client's own (see filing.py).
    sent_copy_wait_seconds: int = 60
    # Listen on every address of this machine too (IMAP and SMTP), TLS required for every
    # login, with a certificate naming its LAN names and addresses; `onionpost lan on|off`.
    lan: bool = False


@dataclass(frozen=True)
class DeliveryConfig:
    """Store-and-forward: how long and how often the outbox retries."""

    retry_min_seconds: int = 60
    retry_max_seconds: int = HOUR
    lifetime_seconds: int = 5 * DAY
    delay_notice_seconds: int = 4 * HOUR
    bundle_refresh_seconds: int = 6 * HOUR
    prekey_grace_seconds: int = 14 * DAY
    concurrency: int = 8
    #: Threads that open fetched envelopes (libsodium releases the GIL); 0: one per CPU.
    crypto_workers: int = 0


@dataclass(frozen=True)
class KeysConfig:
    """Key lifecycle."""

    device_key_rotation_days: int = 30
    prekey_rotation_days: int = 7
    retired_prekey_keep_days: int = 60
    server_key_rotation_days: int = 30


@dataclass(frozen=True)
class Config:
    data_dir: Path
    role: Role = "both"
    log_level: str = "INFO"
    # New mail (from mail clients and from other inboxes) is refused, temporarily, while
    # storing it would leave less than this free on the data directory's disk (0: never).
    min_free_mib: int = 64
    inbox: InboxConfig = field(default_factory=InboxConfig)
    tor: TorConfig = field(default_factory=TorConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)

    @property
    def config_file(self) -> Path:
        return self.data_dir / CONFIG_FILE


_T = TypeVar("_T")


def _coerce(section: str, key: str, hint: Any, value: Any) -> Any:  # noqa: ANN401, PLR0911, PLR0912
    name = f"{section}.{key}" if section else key
    origin = getattr(hint, "__origin__", None)
    if origin is Literal:
        if value not in get_args(hint):
            allowed = ", ".join(repr(a) for a in get_args(hint))
            raise ConfigError(f"{name} = {value!r} is not allowed; use one of {allowed}.")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, not {value!r}.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be a whole number of at least 0, not {value!r}.")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{name} must be a positive number, not {value!r}.")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, not {value!r}.")
        return value
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of strings.")
        return tuple(value)
    if origin in (Mapping, dict) or hint is Mapping:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{name} must be a table of strings.")
        return dict(value)
    raise ConfigError(f"{name} cannot be set in the configuration file.")  # pragma: no cover


def _build(
    cls: type[_T], section: str, values: Mapping[str, Any], fixed: Mapping[str, Any] | None = None
) -> _T:
    """Instantiate a config dataclass from file values; ``fixed`` values bypass validation."""
    fixed = fixed or {}
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)} - set(fixed)  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"[{section}]" if section else "the top level"
        raise ConfigError(
            f"Unknown setting {unknown[0]!r} in {where} of {CONFIG_FILE}; "
            f"known settings there: {', '.join(sorted(known))}."
        )
    kwargs = {k: _coerce(section, k, hints[k], v) for k, v in values.items()}
    return cls(**kwargs, **fixed)


def _check_loopback(name: str, host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        warnings.warn(
            f"{name} = {host!r} is not a loopback address: the service will be reachable from "
            "other machines. onionpost is designed to listen on 127.0.0.1 only.",
            stacklevel=3,
        )


_SECTION = re.compile(r"^\s*\[([^\]]+)\]\s*(#.*)?$")


def set_setting(data_dir: Path, section: str, key: str, value: bool | int | str) -> Path:
    """Set ``[section] key = value`` in ``<data_dir>/onionpost.toml``, keeping every other
    line (comments included) as it is; the file is created if missing.

    The result is read back and validated before it replaces the file, so a setting that
    would make the node refuse to start is refused here instead.  Returns the file's path.
    """
    path = data_dir / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Cannot read {path}: {exc}") from exc
    if isinstance(value, bool):
        rendered = "true" if value else "false"
    elif isinstance(value, int):
        rendered = str(value)
    else:
        rendered = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    line = f"{key} = {rendered}"
    lines = text.splitlines()
    start = next(
        (
            i
            for i, raw in enumerate(lines)
            if (m := _SECTION.match(raw)) and m[1].strip() == section
        ),
        None,
    )
    if start is None:
        lines += ([""] if lines and lines[-1].strip() else []) + [f"[{section}]", line]
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if _SECTION.match(lines[i])), len(lines)
        )
        own = re.compile(rf"^\s*{re.escape(key)}\s*=")
        found = next((i for i in range(start + 1, end) if own.match(lines[i])), None)
        if found is None:
            lines.insert(start + 1, line)
        else:
            lines[found] = line
    new_text = "\n".join(lines) + "\n"
    try:
        from_mapping(data_dir, tomllib.loads(new_text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(path, new_text.encode())
    except OSError as exc:
        raise ConfigError(f"Cannot write {path}: {exc}") from exc
    return path


def load(data_dir: Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read ``<data_dir>/onionpost.toml`` (if present) and apply ``overrides`` on top.

    ``overrides`` has the same shape as the file: ``{"inbox": {"listen_port": 0}, ...}``.
    """
    raw: dict[str, Any] = {}
    path = data_dir / CONFIG_FILE
    if path.exists():
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Cannot read {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return from_mapping(data_dir, raw)


def from_mapping(data_dir: Path, raw: Mapping[str, Any]) -> Config:
    sections: dict[str, Any] = {}
    top: dict[str, Any] = {}
    section_types: dict[str, type[Any]] = {
        "inbox": InboxConfig,
        "tor": TorConfig,
        "gateway": GatewayConfig,
        "delivery": DeliveryConfig,
        "keys": KeysConfig,
    }
    for key, value in raw.items():
        if key in section_types:
            if not isinstance(value, Mapping):
                raise ConfigError(f"[{key}] must be a table.")
            sections[key] = _build(section_types[key], key, value)
        else:
            top[key] = value
    if "data_dir" in top:
        raise ConfigError("data_dir cannot be set inside the data directory's own config file.")
    cfg = _build(Config, "", top, fixed={"data_dir": Path(data_dir), **sections})
    _check_loopback("inbox.listen_host", cfg.inbox.listen_host)
    _check_loopback("gateway.listen_host", cfg.gateway.listen_host)
    if cfg.gateway.lan and cfg.gateway.listen_host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(
            "gateway.lan = true already makes the gateway listen on every address; leave "
            f"gateway.listen_host at 127.0.0.1 (it is {cfg.gateway.listen_host!r})."
        )
    if cfg.delivery.retry_min_seconds > cfg.delivery.retry_max_seconds:
        raise ConfigError("delivery.retry_min_seconds must not exceed delivery.retry_max_seconds.")
    if not 0 <= cfg.delivery.crypto_workers <= MAX_CRYPTO_WORKERS:
        raise ConfigError(
            f"delivery.crypto_workers must be between 0 (one per CPU) and {MAX_CRYPTO_WORKERS}."
        )
    if cfg.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError("log_level must be one of DEBUG, INFO, WARNING, ERROR.")
    return cfg
