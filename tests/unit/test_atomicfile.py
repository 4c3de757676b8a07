"""onionpost.base.atomicfile: a file is replaced whole, with its mode from the start, or not at
all."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from onionpost.base.atomicfile import write_atomic


def test_replaces_the_file_with_the_mode_asked_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    write_atomic(target, b"new", mode=0o644)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
    write_atomic(target, b"private")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_streams_from_a_writer_and_runs_prepare_first(tmp_path: Path) -> None:
    seen: list[int] = []
    write_atomic(
        tmp_path / "f",
        lambda fd: seen.append(fd) or None,
        prepare=seen.append,
        durable=False,
    )
    assert len(seen) == 2 and seen[0] == seen[1]
    assert (tmp_path / "f").read_bytes() == b""


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomic(target, fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
