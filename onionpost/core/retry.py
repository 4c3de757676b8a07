"""When to try again, and when to give up: the one retry policy.  Pure: time and randomness
come in.

Every retry in onionpost waits by a :class:`RetryPolicy`: exponential backoff from
``min_delay`` doubling to ``max_delay``, with +-``jitter``.  Mail delivery and sealing use
Postfix's ``minimal_backoff_time``/``maximal_backoff_time`` (1 minute and 1 hour by default,
``[delivery] retry_min_seconds``/``retry_max_seconds``) with +-25 % jitter, so a crowd of
queued messages does not retry in lockstep when a popular inbox comes back; a temporary error
retries until the message's lifetime ends (:func:`after_failure`), a permanent one bounces at
once.  The in-process loops below (a single retrier each, so no jitter) take their policy from
the table at the end of this module, which is the place to change any of them; a loop keeps
its place in its policy with a :class:`Backoff`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from onionpost.core.errors import OnionpostError, TorError


@dataclass(frozen=True)
class RetryPolicy:
    min_delay: float = 60
    max_delay: float = 3600
    jitter: float = 0.25

    def pause(self, attempts: int, unit_random: float = 0.5) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt, as a fraction (for
        in-process waits).  ``attempts`` below 1 count as 1.

        ``unit_random`` is a number in [0, 1) from the caller's random source; 0.5 is the
        middle of the jitter band (exactly the backoff, whatever the jitter).
        """
        base = min(self.min_delay * (1 << max(0, min(attempts - 1, 30))), self.max_delay)
        return base * (1.0 + self.jitter * (2.0 * unit_random - 1.0))

    def delay(self, attempts: int, unit_random: float) -> int:
        """:meth:`pause` in whole seconds, at least one (for times stored in a queue)."""
        return max(1, round(self.pause(attempts, unit_random)))


class Backoff:
    """Where one retry loop is in its policy: :meth:`failed` after each failure gives the
    pause before the next try, :meth:`succeeded` starts over."""

    def __init__(self, policy: RetryPolicy, unit_random: Callable[[], float] = lambda: 0.5) -> None:
        self.policy = policy
        self.unit_random = unit_random
        self.failures = 0

    def next_pause(self) -> float:
        """The pause the next failure will get (for a message before deciding to wait)."""
        return self.policy.pause(self.failures + 1, self.unit_random())

    def failed(self) -> float:
        self.failures += 1
        return self.policy.pause(self.failures, self.unit_random())

    def succeeded(self) -> None:
        self.failures = 0


@dataclass(frozen=True)
class Decision:
    """What to do with a message after a failed attempt."""

    retry_at: int | None  # None: give up now (bounce)
    reason: str


def worth_retrying(exc: OnionpostError) -> bool:
    """Whether a failed delivery or hand-over goes again later: a temporary error, or any
    trouble with this node's own tor (installed or repaired, the same request goes).  Also
    whether a refusal of a whole batch request stands for each envelope of it (rather than
    making them go one at a time to get their own answers)."""
    return exc.temporary or isinstance(exc, TorError)


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


# -- every other retry in onionpost, in one table ----------------------------------------
# (mail delivery and sealing build theirs from [delivery] retry_min/max_seconds)

#: A device's long-poll sync with its inbox after a failure (device.py).
DEVICE_SYNC = RetryPolicy(1, 60, jitter=0)
#: Starting tor and publishing the inbox's onion service (node.py's tor supervisor).
TOR_START = RetryPolicy(15, 300, jitter=0)
#: Repairing an unhealthy tor (tor.py's health check).
TOR_REPAIR = RetryPolicy(5, 300, jitter=0)
#: Reaching the inbox while joining, pairing or enrolling (joining.py).
JOINING = RetryPolicy(2, 30, jitter=0)
#: Filing a message into the mailbox server (filing.py; per row, stored as a due time).
FILING = RetryPolicy(5, 600, jitter=0)
#: Restarting Dovecot after it exited (gateway/dovecot.py; starts over once it ran a while).
DOVECOT_RESTART = RetryPolicy(1, 60, jitter=0)
#: Restarting the SMTP front process after it exited (gateway/smtpfront.py; clients wait in
#: the listen backlog meanwhile, so it starts quickly; starts over once it ran a while).
SMTP_FRONT_RESTART = RetryPolicy(0.5, 30, jitter=0)
#: Dialing a peer through tor's SOCKS port again within one dial's timeout (net/tor/socks.py:
#: a steady second; how many tries each kind of failure gets is decided there).
TOR_DIAL = RetryPolicy(1, 1, jitter=0)
