"""The benchmark harness runs (correctness only: no timing is judged here)."""

from __future__ import annotations

import pytest

from bench import SECTIONS
from bench.__main__ import main


def test_crypto_section_quick(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", "--only", "crypto"]) == 0
    out = capsys.readouterr().out
    for expected in (
        "== crypto",
        "envelope seal 1.0 KiB",
        "vs secretstream push",
        "vs AEAD decrypt",
        "per extra device",
        "tracemalloc",
        "seal, streamed through files",
        "mint",
        "verify",
    ):
        assert expected in out, expected


def test_list_and_unknown_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    assert capsys.readouterr().out.split() == list(SECTIONS)
    with pytest.raises(SystemExit):
        main(["--only", "no-such-section"])
