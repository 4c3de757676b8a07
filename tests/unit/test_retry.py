"""The retry policy (onionpost/core/retry.py): backoff, jitter, the deadline, and when to give
up."""

from __future__ import annotations

import pytest

from onionpost.core.retry import (
    DEVICE_SYNC,
    DOVECOT_RESTART,
    FILING,
    JOINING,
    TOR_DIAL,
    TOR_REPAIR,
    TOR_START,
    Backoff,
    Decision,
    RetryPolicy,
    after_failure,
)

DEFAULT = RetryPolicy()
NO_JITTER = RetryPolicy(jitter=0.0)

# (attempts, unit_random, seconds): unit_random 0.5 is the middle of the jitter band.
DELAYS = [
    (1, 0.5, 60),  # the first retry waits min_delay
    (2, 0.5, 120),  # then doubles
    (3, 0.5, 240),
    (6, 0.5, 1920),
    (7, 0.5, 3600),  # 3840 is capped at max_delay
    (50, 0.5, 3600),  # a very long history neither overflows nor passes the cap
    (0, 0.5, 60),  # a caller's off-by-one does not go below min_delay
    (-3, 0.5, 60),
    (1, 0.0, 45),  # -25 %
    (1, 0.999999, 75),  # just under +25 %
    (7, 0.0, 2700),  # jitter applies to the capped delay too
]


@pytest.mark.parametrize(("attempts", "unit_random", "seconds"), DELAYS)
def test_delay_doubles_from_min_to_max_with_jitter(
    attempts: int, unit_random: float, seconds: int
) -> None:
    assert DEFAULT.delay(attempts, unit_random) == seconds


def test_delays_never_shrink_as_attempts_grow() -> None:
    delays = [NO_JITTER.delay(n, 0.5) for n in range(1, 40)]
    assert delays == sorted(delays)
    assert delays[0] == NO_JITTER.min_delay and delays[-1] == NO_JITTER.max_delay


def test_delay_is_at_least_one_second() -> None:
    tiny = RetryPolicy(min_delay=0, max_delay=0)
    assert tiny.delay(1, 0.0) == 1
    assert RetryPolicy(min_delay=1, jitter=0.9).delay(1, 0.0) == 1


def test_jitter_stays_within_its_band() -> None:
    for attempts in (1, 3, 10):
        base = NO_JITTER.delay(attempts, 0.5)
        for r in (0.0, 0.1, 0.5, 0.9, 0.999):
            d = DEFAULT.delay(attempts, r)
            assert base * 0.75 - 1 <= d <= base * 1.25 + 1


NOW = 1_000_000

# (temporary, now, expires_at, attempts, expected Decision)
DECISIONS = [
    (False, NOW, NOW + 86_400, 1, Decision(None, "permanent")),
    (False, NOW + 10**6, NOW, 1, Decision(None, "permanent")),  # permanent wins over expired
    (True, NOW, NOW, 1, Decision(None, "expired")),  # at the deadline: give up
    (True, NOW + 1, NOW, 1, Decision(None, "expired")),
    (True, NOW, NOW + 86_400, 1, Decision(NOW + 60, "retry")),
    (True, NOW, NOW + 86_400, 3, Decision(NOW + 240, "retry")),
    (True, NOW, NOW + 30, 1, Decision(NOW + 30, "retry")),  # never past the deadline
    (True, NOW, NOW + 1, 20, Decision(NOW + 1, "retry")),
]


@pytest.mark.parametrize(("temporary", "now", "expires_at", "attempts", "expected"), DECISIONS)
def test_after_failure(
    temporary: bool, now: int, expires_at: int, attempts: int, expected: Decision
) -> None:
    got = after_failure(
        NO_JITTER,
        attempts=attempts,
        temporary=temporary,
        now=now,
        expires_at=expires_at,
        unit_random=0.5,
    )
    assert got == expected


def test_a_retry_is_always_in_the_future_and_never_after_expiry() -> None:
    for expires_in in (1, 59, 60, 61, 3600, 86_400):
        for attempts in (1, 2, 5, 30):
            for r in (0.0, 0.5, 0.999):
                d = after_failure(
                    DEFAULT,
                    attempts=attempts,
                    temporary=True,
                    now=NOW,
                    expires_at=NOW + expires_in,
                    unit_random=r,
                )
                assert d.reason == "retry" and d.retry_at is not None
                assert NOW < d.retry_at <= NOW + expires_in


# Every in-process retry loop's pauses, failure after failure (what each loop did before it
# took its policy from onionpost.core.retry: the same numbers).
LOOPS = [
    (DEVICE_SYNC, [1, 2, 4, 8, 16, 32, 60, 60]),
    (TOR_START, [15, 30, 60, 120, 240, 300, 300]),
    (TOR_REPAIR, [5, 10, 20, 40, 80, 160, 300, 300]),
    (JOINING, [2, 4, 8, 16, 30, 30]),
    (FILING, [5, 10, 20, 40, 80, 160, 320, 600, 600]),
    (DOVECOT_RESTART, [1, 2, 4, 8, 16, 32, 60, 60]),
    (TOR_DIAL, [1, 1, 1, 1, 1, 1, 1]),
]


@pytest.mark.parametrize(("policy", "pauses"), LOOPS)
def test_each_loop_backs_off_by_its_policy(policy: RetryPolicy, pauses: list[float]) -> None:
    backoff = Backoff(policy)
    assert [backoff.failed() for _ in pauses] == pauses
    assert [policy.delay(n, 0.9) for n in range(1, len(pauses) + 1)] == pauses  # no jitter


@pytest.mark.parametrize(("policy", "pauses"), LOOPS)
def test_a_success_starts_the_backoff_over(policy: RetryPolicy, pauses: list[float]) -> None:
    backoff = Backoff(policy)
    assert backoff.next_pause() == pauses[0]
    for _ in range(5):
        backoff.failed()
    assert backoff.next_pause() == pauses[5]  # looking ahead does not count as a failure
    backoff.succeeded()
    assert backoff.failed() == pauses[0]


# (unit_random, pause): a Backoff takes its jitter from the caller's random source.
JITTERED = [(0.0, 45.0), (0.5, 60.0), (0.75, 67.5)]


@pytest.mark.parametrize(("unit_random", "pause"), JITTERED)
def test_backoff_draws_jitter_from_its_random_source(unit_random: float, pause: float) -> None:
    assert Backoff(DEFAULT, lambda: unit_random).failed() == pause


def test_pause_is_delay_before_rounding() -> None:
    for attempts in range(1, 12):
        for r in (0.0, 0.3, 0.5, 0.999):
            assert DEFAULT.delay(attempts, r) == max(1, round(DEFAULT.pause(attempts, r)))
