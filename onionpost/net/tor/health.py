"""What a running tor reports about itself, as the status line and doctor show it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TorStatus:
    """What the CLI and the status page show about tor; times are Unix seconds."""

    mode: str
    healthy: bool  # False while a problem found by check_health is not repaired
    version: str | None
    bootstrap_percent: int
    bootstrap_summary: str
    socks: str | None  # "127.0.0.1:port" that the dialer uses
    onion: str | None  # 56 characters, without ".onion"
    published: bool
    pow_enabled: bool
    pow_note: str | None
    last_published: int | None
    last_inbound: int | None
    last_outbound: int | None
    last_probe: int | None
    last_probe_ok: bool | None
    last_error: str | None
    last_recovery: str | None
    restarts: int
    notes: tuple[str, ...]
