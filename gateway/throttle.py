"""Slowing down password guessing at the gateway, for SMTP and IMAP alike.

One :class:`LoginThrottle` is shared by both servers, so a guesser gains nothing by switching
protocol.  It counts failed logins per *account* (an existing user's name) and per *client
address*, and after ``n`` failures in a row on a key every login on that key waits
``min(cap, base * 2**(n-1))`` seconds from the last failure before its password is checked;
the failed attempt itself is answered only after that delay.  So one connection guessing in a
loop is paced by the answers, and many connections in parallel all wait for the same moment:
a guesser gets at most (connections / cap) tries per second, each paying an scrypt check.

The owner is never locked out: nothing is refused, a login waits at most ``cap`` seconds
(fixed when it arrives, so a flood that goes on meanwhile does not push it back), the right
password then works, and success clears the account's and the client's counts.  Counts are
forgotten ``forget`` seconds after the last failure.

On loopback every local program has the same address, so the client key is shared by all of
them: a flood against one account also slows the other local users' logins, by at most
``cap``.  That is the price of stopping a local guesser that spreads its guesses over
accounts; an unknown user name counts only against the client, so made-up names cannot fill
memory or reveal which accounts exist.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from onionpost.base.clock import Clock, SystemClock
from onionpost.core.retry import RetryPolicy

BASE_DELAY = 0.5
MAX_DELAY = 15.0
FORGET_AFTER = 3600.0
MAX_KEYS = 10_000


@dataclass
class _Failures:
    count: int
    last: float


class LoginThrottle:
    def __init__(
        self,
        *,
        base: float = BASE_DELAY,
        cap: float = MAX_DELAY,
        forget: float = FORGET_AFTER,
        clock: Clock | None = None,
    ) -> None:
        self.base = base
        self.cap = cap
        self.forget = forget
        #: The backoff a guesser earns, by the one retry policy (no jitter: the pace is
        #: the point, and it is the same for every client).
        self.policy = RetryPolicy(base, cap, jitter=0)
        #: The node's clock: failures are timed and logins wait on it.
        self.clock: Clock = clock or SystemClock()
        self._clock = self.clock.monotonic
        self._keys: dict[tuple[str, str], _Failures] = {}

    def delay(self, failures: int) -> float:
        """The delay that ``failures`` failures in a row earn: exponential, capped."""
        if failures <= 0 or self.base <= 0:
            return 0.0
        return min(self.cap, self.policy.pause(failures))

    def failures(self, account: str | None, client: str) -> int:
        """Recent failures in a row on the worse of the two keys."""
        now = self._clock()
        return max((f.count for f in self._live(account, client, now)), default=0)

    def wait_for(self, account: str | None, client: str) -> float:
        """How long a login arriving now waits before its password is checked."""
        now = self._clock()
        due = max(
            (f.last + self.delay(f.count) for f in self._live(account, client, now)),
            default=now,
        )
        return min(self.cap, max(0.0, due - now))

    async def before_check(self, account: str | None, client: str) -> None:
        wait = self.wait_for(account, client)
        if wait > 0:
            await self.clock.sleep(wait)

    async def failed(self, protocol: str, account: str | None, client: str) -> None:
        """Count a failed login, log it (never the password), and pause before the answer."""
        now = self._clock()
        count = 0
        for key in _keys(account, client):
            entry = self._live_entry(key, now)
            if entry is None:
                entry = self._keys[key] = _Failures(0, now)
            entry.count += 1
            entry.last = now
            count = max(count, entry.count)
        if len(self._keys) > MAX_KEYS:
            self._prune(now)
        delay = self.delay(count)
        # Logged under the protocol's own logger (gateway.smtp, gateway.imap), where an
        # operator looks for it.
        logging.getLogger(f"gateway.{protocol}").warning(
            "%s: failed login for %s from %s (%d in a row; logins there now wait %.1f s)",
            protocol,
            repr(account) if account else "an unknown user",
            client,
            count,
            delay,
        )
        if delay > 0:
            await self.clock.sleep(delay)

    def succeeded(self, account: str, client: str) -> None:
        for key in _keys(account, client):
            self._keys.pop(key, None)

    def _live(self, account: str | None, client: str, now: float) -> list[_Failures]:
        found = (self._live_entry(key, now) for key in _keys(account, client))
        return [f for f in found if f is not None]

    def _live_entry(self, key: tuple[str, str], now: float) -> _Failures | None:
        entry = self._keys.get(key)
        if entry is not None and now - entry.last > self.forget:
            del self._keys[key]
            return None
        return entry

    def _prune(self, now: float) -> None:
        for key in [k for k, f in self._keys.items() if now - f.last > self.forget]:
            del self._keys[key]
        if len(self._keys) > MAX_KEYS:  # many addresses at once: keep the newest
            newest = sorted(self._keys.items(), key=lambda kv: kv[1].last)[-MAX_KEYS // 2 :]
            self._keys = dict(newest)


def _keys(account: str | None, client: str) -> list[tuple[str, str]]:
    keys = [("client", client)]
    if account:
        keys.append(("account", account.lower()))
    return keys
