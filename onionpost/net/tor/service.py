"""The inbox onion service as the runtime keeps it while tor publishes it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class _Service:
    seed: bytes
    target_host: str
    target_port: int

    def __repr__(self) -> str:  # keep the seed out of tracebacks and logs
        return f"_Service(target={self.target_host}:{self.target_port})"
