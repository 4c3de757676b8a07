"""The gateway benchmark section runs in quick mode (correctness only: it starts a real
``onionpost run``, drives its SMTP and IMAP ports and prints its figures; no timing is judged
here, and Postfix and Dovecot are not needed: quick mode never starts them)."""

from __future__ import annotations

import re

import pytest

from bench.__main__ import main


@pytest.mark.slow
def test_gateway_section_quick(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", "--only", "gateway"]) == 0
    out = capsys.readouterr().out
    for expected in (
        "== gateway",
        "SMTP submission: 10 concurrent sessions, 200 messages of 4.0 KiB",
        "onionpost, 10 sessions",
        "onionpost latency p50 / p99",
        "Postfix reference: not run in --quick mode",
        "IMAP first sync of a 500-message INBOX",
        "cold SELECT INBOX",
        "warm UID FETCH 1:* (...ENVELOPE)",
        "warm FETCH 1:* (BODY.PEEK[HEADER])",
        "Dovecot reference: not run in --quick mode",
    ):
        assert expected in out, expected
    assert re.search(r"onionpost, 10 sessions\s+\d+ msg/s", out)
