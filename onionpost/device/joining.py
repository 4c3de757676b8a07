"""Setting up a machine from a one-time code, and offering one: the device side of enrolment.

``onionpost init --invite CODE`` (:func:`redeem_invite`) makes a new identity *on this
machine* and opens its mailbox on the inbox named in the code; ``onionpost devices add``
(:func:`offer_pairing`) and ``onionpost init --join CODE`` (:func:`join_identity`) add a
device to an identity.  All three reach the inbox over tor (:func:`inbox_dialer`) and retry
while it is unreachable, telling the person what they wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from onionpost.base.clock import Clock, SystemClock
from onionpost.base.config import Config
from onionpost.core.account import Account, create_identity
from onionpost.core.crypto.bundle import KeyBundle
from onionpost.core.crypto.keys import DeviceEntry, DeviceList, DeviceSecrets, IdentitySecrets
from onionpost.core.crypto.primitives import RandomSource, ed25519_public, system_random
from onionpost.core.errors import (
    CodeRefused,
    OnionpostError,
    PairingFailed,
    PeerUnreachable,
    UsageError,
)
from onionpost.core.pairing import Code, Joiner, JoinGrant, JoinRequest, Offer
from onionpost.core.retry import JOINING, Backoff
from onionpost.core.wire import KeyUpdate
from onionpost.device.keylife import prekey_lifetime
from onionpost.device.session import device_session
from onionpost.net.client import InboxClient
from onionpost.net.tor.runtime import TorRuntime
from onionpost.net.tor.socks import SocksEndpoint, TorDialer
from onionpost.net.transport import Dialer, DirectDialer

log = logging.getLogger(__name__)

T = TypeVar("T")
Say = Callable[[str], None]
ENROL_ISOLATION = "enrol"
POLL_SECONDS = 1.0


# --- reaching the inbox --------------------------------------------------------------------


def running_status(data_dir: Path) -> dict[str, object] | None:
    """The running node's status (``run/status.json``), or None when no node runs for this
    data directory: the file must name a live process and have been written recently."""
    try:
        info = json.loads((data_dir / "run" / "status.json").read_text())
        pid = int(info.get("pid", 0))
        if pid <= 0:
            return None
        os.kill(pid, 0)
    except PermissionError:
        pass  # alive, but another user's (the service user's) process
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    if not isinstance(info, dict) or time.time() - float(info.get("updated_at", 0)) > 30:
        return None
    return info


@contextlib.asynccontextmanager
async def inbox_dialer(
    config: Config, *, say: Say, own_onion: str | None = None, clock: Clock | None = None
) -> AsyncIterator[Dialer]:
    """A way to reach inboxes from the CLI: the running node's inbox on loopback, its tor's
    SOCKS port, or (no node runs) a tor started for this command alone."""
    clock = clock or SystemClock()
    direct = DirectDialer(config.tor.static_routes)
    info = running_status(config.data_dir)
    if info is not None:
        api_port, tor = info.get("api_port"), info.get("tor")
        if own_onion and isinstance(api_port, int) and api_port > 0:
            direct.add(own_onion, "127.0.0.1", api_port)
        socks = tor.get("socks") if isinstance(tor, dict) else None
        if isinstance(socks, str) and ":" in socks:
            host, _, port = socks.rpartition(":")
            direct.fallback = TorDialer(SocksEndpoint(host, int(port), clock))
            yield direct
            return
        if config.tor.mode != "off" and not (own_onion and own_onion in direct.routes):
            # the running node's tor owns <data>/tor: a second one there would fail
            raise PeerUnreachable(
                "The running node's tor is still connecting; try again in a minute "
                "(onionpost status shows its progress)."
            )
    if config.tor.mode == "off" or (own_onion and own_onion in direct.routes):
        yield direct
        return
    say("Starting tor to reach the inbox (this can take a minute on the first run)...")
    runtime = await TorRuntime.start(
        config.tor,
        config.data_dir,
        clock=clock,
        on_progress=lambda p, what: say(f"  tor: {p}% {what}") if p % 25 == 0 else None,
    )
    try:
        direct.fallback = TorDialer(runtime)
        yield direct
    finally:
        await runtime.stop()


async def retrying(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    *,
    say: Say,
    patience: float,
    clock: Clock,
) -> T:
    """Await ``attempt()`` until it works; while the inbox is unreachable say so and retry."""
    deadline = clock.monotonic() + patience
    backoff = Backoff(JOINING)
    while True:
        try:
            return await attempt()
        except PeerUnreachable as exc:
            delay = backoff.next_pause()
            if clock.monotonic() + delay > deadline:
                raise PeerUnreachable(
                    f"The inbox could not be reached over tor to {what} ({exc}). Check that it "
                    "runs (`onionpost status` on it) and try again."
                ) from exc
            say(f"The inbox cannot be reached yet ({exc}); retrying in {delay:.0f} s.")
            await clock.sleep(backoff.failed())


def _client(config: Config, dialer: Dialer, onion: str) -> InboxClient:
    return InboxClient(
        dialer,
        onion,
        port=config.tor.onion_port,
        isolation=ENROL_ISOLATION,
        timeout=180.0,
        connect_timeout=120.0,
    )


# --- an invite: a new identity on this machine ---------------------------------------------


async def redeem_invite(
    config: Config,
    code: Code,
    *,
    device_name: str,
    dialer: Dialer,
    say: Say,
    clock: Clock,
    rng: RandomSource = system_random,
    patience: float = 600.0,
    pending: Account | None = None,
    save: Callable[[Account], None],
) -> Account:
    """Make the identity here, then open its mailbox at the inbox; returns the account.

    The keys are saved (``save``) *before* the inbox is asked, so a redeem whose answer was
    lost is repeated with the same keys (``pending``) and the inbox answers it again.
    """
    client = _client(config, dialer, code.onion)
    account = pending
    if account is None:
        info = await retrying(
            "read the invite",
            lambda: client.invite_info(code.claim()),
            say=say,
            patience=patience,
            clock=clock,
        )
        try:
            local = str(info["local"])
            sek_id = int(info["sek_id"])
            sek_pk = bytes.fromhex(str(info["sek_pk"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise PairingFailed("The inbox's answer to the invite is not understood.") from exc
        account = create_identity(
            local,
            device_name,
            onion_pk=code.onion_pk,
            sek_id=sek_id,
            sek_pk=sek_pk,
            now=clock.now(),
            prekey_lifetime=prekey_lifetime(config.keys),
            rng=rng,
        )
        save(account)
    update = KeyUpdate(
        device_list=account.device_list,
        binding=account.binding,
        prekeys=[account.device.signed_prekey()],
    )
    acct = account
    signed = await retrying(
        "open your mailbox",
        lambda: client.redeem_invite(code.claim(), update, acct.self_token),
        say=say,
        patience=patience,
        clock=clock,
    )
    account.binding = signed
    save(account)
    return account


# --- pairing: the existing device ------------------------------------------------------------


async def latest_device_list(account: Account, client: InboxClient) -> DeviceList:
    """The person's device list as their inbox publishes it (never older than ours)."""
    bundle = KeyBundle.parse(await client.bundle(account.local))
    dl = bundle.device_list
    dl.verify()
    if dl.uik_pk != account.uik_pk:
        raise PairingFailed("The inbox serves a device list of another identity.")
    return dl if dl.version > account.device_list.version else account.device_list


async def offer_pairing(
    account: Account,
    config: Config,
    *,
    dialer: Dialer,
    say: Say,
    show_code: Callable[[Code, int], None],
    clock: Clock,
    save: Callable[[Account], None],
    rng: RandomSource = system_random,
) -> DeviceEntry:
    """Print a pairing code and wait for the new device; returns its entry once it joined."""
    if account.identity is None:
        raise UsageError(
            "This device does not hold your identity key, so it cannot add devices. Run "
            "`onionpost devices add` on one of your devices that does."
        )
    client = _client(config, dialer, account.address.onion)
    session = device_session(account, client)
    account.device_list = await retrying(
        "read your device list",
        lambda: latest_device_list(account, client),
        say=say,
        patience=120.0,
        clock=clock,
    )
    code = Code.generate("pairing", account.onion_pk, rng=rng)
    offer = Offer.create(code, rng=rng)
    slot = code.slot()
    expires = await session.offer_pairing(slot, offer.public)
    show_code(code, expires)
    try:
        while True:
            state = await session.pairing_state(slot)
            if state.get("state") == "joined" and "join_pk" in state:
                break
            if clock.now() >= expires:
                raise PairingFailed(
                    "No device used the pairing code in time; run `onionpost devices add` "
                    "again for a new one."
                )
            await clock.sleep(POLL_SECONDS)
        join_pk = bytes.fromhex(str(state["join_pk"]))
        request = offer.open_request(join_pk, bytes.fromhex(str(state["box"])))
    except (OnionpostError, ValueError, asyncio.CancelledError, KeyboardInterrupt):
        with contextlib.suppress(OnionpostError):
            await session.finish_pairing(slot, None)
        raise
    now = clock.now()
    old = account.device_list
    if old.device(request.device_id) is not None or old.is_revoked(request.device_id):
        await session.finish_pairing(slot, None)
        raise PairingFailed("The new device presented an id that is already in use.")
    entry = DeviceEntry(request.device_id, request.dsk_pk, 0, now, request.name)
    new_list = DeviceList(
        old.uik_pk, old.version + 1, now, (*old.devices, entry), old.revoked
    ).signed(account.identity.uik_seed)
    try:
        await session.publish(KeyUpdate(device_list=new_list, prekeys=[request.prekey]))
    except OnionpostError:
        with contextlib.suppress(OnionpostError):
            await session.finish_pairing(slot, None)
        raise
    account.device_list = new_list
    save(account)
    give_identity = request.wants_identity
    grant = JoinGrant(
        account.local,
        account.mailbox_id,
        account.self_token,
        account.binding,
        new_list,
        account.identity.uik_seed if give_identity else None,
        account.identity.created_at,
    )
    await session.finish_pairing(slot, offer.seal_grant(join_pk, grant, rng=rng))
    return entry


# --- pairing: the new device -------------------------------------------------------------------


async def join_identity(
    config: Config,
    code: Code,
    *,
    device_name: str,
    with_identity: bool,
    dialer: Dialer,
    say: Say,
    clock: Clock,
    rng: RandomSource = system_random,
    patience: float = 600.0,
) -> Account:
    """Join the identity whose device showed ``code``; returns this device's account."""
    client = _client(config, dialer, code.onion)
    slot = code.slot()
    first = await retrying(
        "read the pairing offer",
        lambda: client.pair_read(slot),
        say=say,
        patience=patience,
        clock=clock,
    )
    try:
        offer_pk = bytes.fromhex(str(first["offer"]))
    except (KeyError, ValueError) as exc:
        raise PairingFailed("The inbox's pairing offer is not understood.") from exc
    joiner = Joiner.create(code, offer_pk, rng=rng)
    now = clock.now()
    device = DeviceSecrets.generate(
        device_name, now, prekey_lifetime=prekey_lifetime(config.keys), rng=rng
    )
    request = JoinRequest(
        device.device_id, device.dsk_pk, device_name, device.signed_prekey(), with_identity
    )
    await client.pair_join(slot, joiner.public, joiner.seal_request(request, rng=rng))
    say("Waiting for your other device to confirm...")
    while True:
        try:
            state = await client.pair_read(slot)
        except CodeRefused as exc:
            raise PairingFailed(
                "Your other device stopped the pairing, or the code expired: nothing was "
                "changed. Run `onionpost devices add` there again."
            ) from exc
        except PeerUnreachable:
            state = {}
        if "grant" in state:
            break
        await clock.sleep(POLL_SECONDS)
    grant = joiner.open_grant(bytes.fromhex(str(state["grant"])))
    return _account_from_grant(code, grant, device)


def _account_from_grant(code: Code, grant: JoinGrant, device: DeviceSecrets) -> Account:
    """Check everything the other device sent before trusting any of it."""
    dl, binding = grant.device_list, grant.binding
    dl.verify()
    binding.verify()
    if binding.onion_pk != code.onion_pk:
        raise PairingFailed("The answer names another inbox than the code did.")
    if binding.uik_pk != dl.uik_pk or binding.mailbox_id != grant.mailbox_id:
        raise PairingFailed("The answer's binding and device list belong to different identities.")
    if binding.local != grant.local:
        raise PairingFailed("The answer's binding names another user.")
    mine = dl.device(device.device_id)
    if mine is None or mine.dsk_pk != device.dsk_pk:
        raise PairingFailed("The device list you were sent does not include this device.")
    identity = None
    if grant.identity_seed is not None:
        if ed25519_public(grant.identity_seed) != dl.uik_pk:
            raise PairingFailed("The identity key you were sent does not match the identity.")
        identity = IdentitySecrets(grant.local, grant.identity_seed, grant.identity_created_at)
    return Account(
        grant.local,
        code.onion_pk,
        grant.mailbox_id,
        grant.self_token,
        binding,
        dl,
        device,
        identity,
    )
