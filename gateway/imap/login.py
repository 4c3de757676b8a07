"""Gateway logins: accounts from the store, password checks off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from datetime import datetime
from typing import Any

from pymap.config import IMAPConfig
from pymap.exceptions import AuthorizationFailure, InvalidAuth, NotAllowedError
from pymap.interfaces.login import IdentityInterface, LoginInterface
from pymap.interfaces.token import TokenCredentials, TokensInterface
from pymap.user import UserMetadata
from pysasl.creds.server import ServerCredentials

from gateway.imap.folders import MailboxSet
from gateway.imap.hub import Hub
from gateway.imap.session import Session
from gateway.replies import AUTH_FAILED
from gateway.throttle import LoginThrottle
from onionpost.store.accounts import AccountStore, Credential, check_password
from onionpost.store.mailbox import MailboxStore

#: The first failed login's pause; it doubles with each further failure (gateway.throttle).
FAILED_LOGIN_DELAY = 0.5

#: The connected client's address, set per connection by the server: pymap hands the login
#: hook only the credentials, and failures are counted per client as well as per account.
client_address: ContextVar[str] = ContextVar("client_address", default="unknown")


class _NoTokens(TokensInterface):
    """The gateway logs in with passwords only; pymap's bearer tokens are not offered."""

    def get_login_token(
        self,
        identifier: str,
        authcid: str,
        key: bytes,
        *,
        authzid: str | None = None,
        location: str | None = None,
        expiration: datetime | None = None,
    ) -> str | None:
        return None

    def get_admin_token(
        self,
        admin_key: bytes | None,
        *,
        authzid: str | None = None,
        location: str | None = None,
        expiration: datetime | None = None,
    ) -> str | None:
        return None

    def parse(
        self,
        authzid: str,
        token: str,
        *,
        admin_keys: Any = frozenset(),  # noqa: ANN401
    ) -> TokenCredentials:
        raise InvalidAuth(AUTH_FAILED.text)


class _Secret:
    """pysasl's view of one stored credential: the password check runs in a worker thread."""

    def __init__(self, credential: Credential | None) -> None:
        self._credential = credential

    @property
    def authcid(self) -> str:
        return self._credential.user if self._credential else ""

    def compare_authcid(self, authcid: str) -> bool:
        return True  # the credential was looked up by this very name (or is the dummy)

    def compare_secret(self, secret: str) -> bool:
        return check_password(self._credential, secret)

    def get_clear_secret(self) -> str | None:
        return None


class Login(LoginInterface):
    """pymap's login hook: who may log in, and the session each login gets."""

    def __init__(
        self,
        config: IMAPConfig,
        accounts: AccountStore,
        mailbox: MailboxStore,
        hub: Hub,
        throttle: LoginThrottle | None = None,
    ) -> None:
        self.config = config
        self.accounts = accounts
        self.mailbox = mailbox
        self.hub = hub
        self.throttle = throttle or LoginThrottle(base=FAILED_LOGIN_DELAY)

    @property
    def tokens(self) -> TokensInterface:
        return _NoTokens()

    async def authenticate(self, credentials: ServerCredentials) -> _Identity:
        """Check a login; failures slow down further logins (shared with SMTP, see
        :class:`gateway.throttle.LoginThrottle`) and are logged, without the password."""
        credential = self.accounts.credential(credentials.authcid)
        account = credential.user if credential else None
        client = client_address.get()
        await self.throttle.before_check(account, client)
        # scrypt takes tens of milliseconds of CPU: not on the event loop.
        ok = await asyncio.to_thread(credentials.verify, _Secret(credential))
        if not ok or credential is None:
            await self.throttle.failed("imap", account, client)
            raise InvalidAuth(AUTH_FAILED.text)
        self.throttle.succeeded(credential.user, client)
        return _Identity(credential.user, credential.address, self)

    async def authorize(self, authenticated: IdentityInterface, authzid: str) -> _Identity:
        if not isinstance(authenticated, _Identity) or not authenticated.may_act_as(authzid):
            raise AuthorizationFailure()
        return authenticated


class _Identity(IdentityInterface):
    def __init__(self, user: str, address: str, login: Login) -> None:
        self._user = user
        self._address = address
        self._login = login

    @property
    def name(self) -> str:
        return self._user

    @property
    def roles(self) -> frozenset[str]:
        return frozenset()

    def may_act_as(self, authzid: str) -> bool:
        return authzid.lower() in ("", self._user.lower(), self._address.lower())

    @asynccontextmanager
    async def new_session(self) -> AsyncIterator[Session]:
        login = self._login
        login.mailbox.ensure_user(self._user)
        yield Session(self._user, login.config, MailboxSet(self._user, login.mailbox, login.hub))

    async def new_token(self, *, expiration: datetime | None = None) -> str | None:
        return None

    async def get(self) -> UserMetadata:
        return UserMetadata(self._login.config, self._user)

    async def set(self, metadata: UserMetadata) -> int | None:
        raise NotAllowedError("Accounts are managed with the onionpost command.")

    async def delete(self) -> None:
        raise NotAllowedError("Accounts are managed with the onionpost command.")
