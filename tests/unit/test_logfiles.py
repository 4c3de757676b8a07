"""Log files of the programs the node runs are set aside past a limit (base.logfiles)."""

from __future__ import annotations

from pathlib import Path

from onionpost.base.logfiles import set_aside_if_large


def test_a_small_log_stays(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_bytes(b"a" * 100)
    assert set_aside_if_large(log, 100) is False
    assert log.read_bytes() == b"a" * 100 and not (tmp_path / "x.log.1").exists()


def test_a_large_log_goes_to_dot_1_replacing_the_one_before(tmp_path: Path) -> None:
    log, old = tmp_path / "x.log", tmp_path / "x.log.1"
    old.write_bytes(b"older")
    log.write_bytes(b"b" * 101)
    assert set_aside_if_large(log, 100) is True
    assert old.read_bytes() == b"b" * 101 and not log.exists()


def test_no_log_yet_is_nothing_to_do(tmp_path: Path) -> None:
    assert set_aside_if_large(tmp_path / "none.log", 0) is False
