"""When to try a delivery again, and when to give up.  Pure: time and randomness come in.

Exponential backoff from ``min_delay`` doubling to ``max_delay`` (Postfix's
``minimal_backoff_time``/``maximal_backoff_time``, 1 minute and 1 hour here by default), with
+-25 % jitter so a crowd of queued messages does not retry in lockstep when a popular inbox
comes back.  A temporary error retries until the message's lifetime ends; a permanent one
bounces at once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    min_delay: int = 60
    max_delay: int = 3600
    jitter: float = 0.25

    def delay(self, attempts: int, unit_random: float) -> int:
        """Seconds to wait after the ``attempts``-th failed attempt (``attempts`` >= 1).

        ``unit_random`` is a number in [0, 1) from the caller's random source.
        """
        base = self.min_delay << max(0, min(attempts - 1, 30))
        base = min(base, self.max_delay)
        factor = 1.0 + self.jitter * (2.0 * unit_random - 1.0)
        return max(1, round(base * factor))


@dataclass(frozen=True)
class Decision:
    """What to do with a message after a failed attempt."""

    retry_at: int | None  # None: give up now (bounce)
    reason: str


def after_failure(
    policy: RetryPolicy,
    *,
    attempts: int,
    temporary: bool,
    now: int,
    expires_at: int,
    unit_random: float,
) -> Decision:
    if not temporary:
        return Decision(None, "permanent")
    if now >= expires_at:
        return Decision(None, "expired")
    at = now + policy.delay(attempts, unit_random)
    # Never sleep past the deadline: one last attempt happens right at expiry.
    return Decision(min(at, expires_at), "retry")
