"""Every error onionpost raises on purpose, under one root.

Each class's docstring is the sentence a person reads; an instance may carry a more specific
sentence (``str(err)``).  Errors that can reach a mail peer or a mail client also carry an
RFC 3463 enhanced status code and say whether trying again later can help, so the SMTP
gateway, the IMAP gateway, the node API and the CLI each translate them in one place without
guessing.

::

    OnionpostError
     +- UsageError                     a person asked for something that cannot be done as asked
     |   +- ConfigError
     |   +- DataDirError
     |   |   +- NodeAlreadyRunning
     |   +- AlreadyInitialized
     |   +- NotInitialized
     |   +- ListenError
     |   +- PairingFailed
     |   +- CodeRefused                invites and pairings, also answered by the node API
     |   +- TooManyCodeAttempts
     |   +- InviteChainRefused
     |   +- FingerprintMismatch        a typed or scanned fingerprint is not the key's
     |   +- WrongPassphrase            a backup's passphrase
     |   +- AvatarError                (onionpost/device/avatar.py)
     |   +- BadCode                    (onionpost/core/pairing.py)
     +- AddressError                   not a valid  local@<v3 onion>.onion  address
     +- CryptoError                    keys, bundles, envelopes, stamps
     |   +- MalformedData              bytes that do not parse as the structure they claim to be
     |   +- BadSignature
     |   +- KeyBundleError             a recipient's published keys
     |   |   +- RotationChainBroken
     |   |   +- RotationChainForked
     |   |   +- DeviceListRollback
     |   |   +- PrekeyExpired
     |   |   +- BindingMismatch
     |   |   +- IdentityKeyChanged
     |   +- EnvelopeError              a message's layers
     |   |   +- NotForThisInbox
     |   |   +- NoStanzaForDevice
     |   |   +- HeaderTampered
     |   |   +- PayloadTampered
     |   |   +- MessageTruncated
     |   |   +- NotARecipient
     |   |   +- ForwardedMessage
     |   |   +- MessageExpired
     |   |   +- InvalidLifetime
     |   |   +- MessageFromFuture
     |   |   +- ReplayedMessage
     |   |   +- MessageTooLarge
     |   +- ProofOfWorkError
     |   +- IntroductionMismatch
     +- StoreError                     the local database (no sqlite3 exception leaves store/)
     |   +- DatabaseBusy               another writer holds the lock: try again
     |   +- DatabaseFailed             full, damaged, or a bug
     |   +- QuotaExceeded
     |   +- DiskFull                   this machine's disk is nearly full: new mail waits
     |   +- IllegalTransition          a queue step its state machine does not have (a bug)
     |   +- FolderError
     |       +- FolderNotFound
     |       +- FolderExists
     |       +- FolderProtected
     |       +- InvalidFolderName
     +- DeliveryError                  what a peer inbox answered, or why it could not be reached
     |   +- TemporaryDeliveryError     always temporary: the outbox retries
     |   |   +- StaleRecipientKeys
     |   |   +- PeerProtocolError
     |   +- PermanentDeliveryError     never temporary: the sender gets a bounce
     |   |   +- UnknownMailbox
     |   +- PeerUnreachable            tor's answer; temporary unless the subclass says not
     |       +- TorStillConnecting     this node's tor, not the peer
     |       +- PeerOffline
     |       +- PeerDescriptorInvalid
     |       +- PeerIntroductionFailed
     |       +- PeerIntroductionTimedOut
     |       +- PeerRendezvousFailed
     |       +- PeerTimedOut
     |       +- PeerConnectionFailed
     |       +- PeerConnectionLost       a kept connection: the request may go again
     |       +- PeerRefused
     |       +- BadOnionAddress        permanent
     |       +- OnionClientAuthRequired  permanent
     |       +- OnionClientAuthRejected  permanent
     +- BadRequest                     a peer or device sent the node API something it cannot parse
     +- RequestAborted                 ... or went away before its request arrived
     +- DeviceRefused                  unknown or revoked device, or a failed device login
     +- TorError                       tor missing, too old, unreachable, or failing
     |   +- TorNotInstalled
     |   +- TorTooOld
     |   +- TorControlError
     |   |   +- TorAuthError
     |   +- OnionServiceError
     |   +- TorNotRunning
     |   +- TorBootstrapError
     +- GatewayError                   mail-client facing problems (auth, recipients, size)
         +- AuthenticationFailed
         +- SenderNotAllowed
         +- UnknownLocalUser
         +- PasswordRejected
         +- LocalTLSError
         +- MailServerError            the private Dovecot
         |   +- MailServerNotInstalled
         |   +- FilingDeferred
         +- SMTPFrontError             the SMTP front process (gateway/smtpfront.py)
         |   +- SMTPFrontFrameError
         +- FilingRefused

Every class is in this tree, under its real parent: ``tests/unit/test_errors.py`` fails when
they differ.  Whether an error is temporary is its ``temporary`` attribute, never its place in
the tree, except under ``TemporaryDeliveryError`` and ``PermanentDeliveryError``, whose names
promise it (the same test holds every subclass to its parent's promise).
"""

from __future__ import annotations

from typing import ClassVar


class OnionpostError(Exception):
    """Something went wrong in onionpost."""

    #: RFC 3463 enhanced status code ("class.subject.detail") for mail-facing audiences.
    enhanced_code: ClassVar[str] = "5.0.0"
    #: Whether the same operation may succeed later without anyone changing anything.
    temporary: ClassVar[bool] = False

    def __init__(self, detail: str | None = None, *, code: str | None = None) -> None:
        self.detail = detail
        #: The enhanced status code of this instance (a class default unless given).
        self.code = code or self.enhanced_code
        super().__init__(detail or self.summary())

    @classmethod
    def summary(cls) -> str:
        """The class docstring's first paragraph, folded onto one line."""
        doc = cls.__doc__ or cls.__name__
        first = doc.strip().split("\n\n", 1)[0]
        return " ".join(first.split())

    def __str__(self) -> str:
        return self.detail or self.summary()


# --- people and configuration -------------------------------------------------------------


class UsageError(OnionpostError):
    """That cannot be done as asked."""


class ConfigError(UsageError):
    """The configuration is not valid."""


class DataDirError(UsageError):
    """The data directory cannot be used."""


class NodeAlreadyRunning(DataDirError):
    """Another onionpost node already runs on this data directory.

    Two nodes on one data directory would share one inbox address and one outbox, and the
    second would release the first one's delivery leases; only one may run.  The CLI words it
    with :attr:`pid` and :attr:`data_dir`.
    """

    def __init__(self, data_dir: str, pid: int | None) -> None:
        self.data_dir = data_dir
        self.pid = pid
        holder = f" (pid {pid})" if pid else ""
        super().__init__(f"Another onionpost node{holder} already runs on {data_dir}.")


class AlreadyInitialized(UsageError):
    """This data directory already holds an onionpost identity; refusing to overwrite its keys.

    Use another --data-dir for a second identity, or keep using this one.
    """


class NotInitialized(UsageError):
    """This data directory has no onionpost identity yet. Run `onionpost init` first."""


class ListenError(UsageError):
    """onionpost cannot listen on one of its ports."""

    @classmethod
    def from_os_error(cls, exc: OSError, host: str, port: int, setting: str) -> ListenError:
        if exc.errno == 98:  # EADDRINUSE
            why = "another program already uses that port"
        elif exc.errno == 13:  # EACCES
            why = "this user may not use that port"
        else:
            why = exc.strerror or str(exc)
        return cls(
            f"Cannot listen on {host}:{port}: {why}. Stop the other program, or choose another "
            f"port with `{setting}` in onionpost.toml."
        )


class PairingFailed(UsageError):
    """Setting up this machine with the code did not complete; nothing was changed."""


class CodeRefused(UsageError):
    """The inbox refused the code: it is unknown, expired or already used. Ask for a new one."""

    enhanced_code = "5.7.0"
    reason = "code-refused"


class TooManyCodeAttempts(UsageError):
    """Too many wrong codes were tried at this inbox; it accepts codes again within the hour."""

    enhanced_code = "4.7.0"
    temporary = True
    reason = "code-attempts"


class InviteChainRefused(UsageError):
    """The invite chain does not allow that: not enough invites left, a limit above your own,
    or a removal by someone who is not up the chain of the person."""

    enhanced_code = "5.7.1"
    reason = "invite-chain"


class FingerprintMismatch(UsageError):
    """The fingerprint does NOT match the key: do not trust this key.

    Either it was mistyped or misread, or the key is not your contact's. Compare again over a
    channel you trust (in person, or a phone call in their voice)."""


class WrongPassphrase(UsageError):
    """The passphrase does not open this backup."""


# --- addresses ------------------------------------------------------------------------------


class AddressError(OnionpostError):
    """That is not a valid onionpost address (local@<56-character v3 onion>.onion)."""

    enhanced_code = "5.1.3"


# --- cryptography ---------------------------------------------------------------------------


class CryptoError(OnionpostError):
    """A cryptographic check failed."""

    enhanced_code = "5.7.0"


class MalformedData(CryptoError):
    """The data is malformed: it does not parse as the structure it claims to be."""

    enhanced_code = "5.6.0"


class BadSignature(CryptoError):
    """A signature does not verify: the data was altered or not signed by the claimed key."""

    enhanced_code = "5.7.7"


class KeyBundleError(CryptoError):
    """The recipient's published keys do not verify."""


class RotationChainBroken(KeyBundleError):
    """A device key rotation record does not follow from the previous key."""


class RotationChainForked(KeyBundleError):
    """A device's key history forked: two different keys claim the same place in the chain.

    This happens when a device key was stolen and used. Treat the device as compromised.
    """


class DeviceListRollback(KeyBundleError):
    """The device list is older than one already seen; someone may be replaying old keys."""


class PrekeyExpired(KeyBundleError):
    """The device's encryption key has expired and no newer one is published."""


class BindingMismatch(KeyBundleError):
    """The keys were not issued for this inbox address."""


class IdentityKeyChanged(KeyBundleError):
    """This contact's identity key is not the one pinned on first contact.

    Either the contact reset their identity, or someone is impersonating them. Compare safety
    numbers with the contact over another channel before trusting the new key.
    """


class EnvelopeError(CryptoError):
    """The message envelope failed a check."""


class NotForThisInbox(EnvelopeError):
    """The message was not sealed to this inbox's key."""

    enhanced_code = "5.7.1"


class NoStanzaForDevice(EnvelopeError):
    """The message holds no key for this device (it was sent to the recipient's other devices)."""

    enhanced_code = "5.7.1"


class HeaderTampered(EnvelopeError):
    """The message's key header was altered in transit."""

    enhanced_code = "5.7.7"


class PayloadTampered(EnvelopeError):
    """Part of the message body was altered in transit."""

    enhanced_code = "5.7.7"


class MessageTruncated(EnvelopeError):
    """The message ends early: its end marker is missing."""

    enhanced_code = "5.6.0"


class NotARecipient(EnvelopeError):
    """The message's signed recipient list does not include you."""

    enhanced_code = "5.7.1"


class ForwardedMessage(EnvelopeError):
    """The message was re-wrapped by someone other than its signer (surreptitious forwarding)."""

    enhanced_code = "5.7.7"


class MessageExpired(EnvelopeError):
    """The message's lifetime has run out."""

    enhanced_code = "5.4.7"


class InvalidLifetime(EnvelopeError):
    """The message's lifetime is negative or longer than 30 days, which is not allowed."""

    enhanced_code = "5.6.0"


class MessageFromFuture(EnvelopeError):
    """The message claims to have been written in the future (check the sender's clock)."""

    enhanced_code = "5.7.0"


class ReplayedMessage(EnvelopeError):
    """This message was already received once; the copy is a replay."""

    enhanced_code = "5.7.0"


class MessageTooLarge(EnvelopeError):
    """The message is larger than the size limit."""

    enhanced_code = "5.3.4"


class ProofOfWorkError(CryptoError):
    """The anti-spam proof of work is missing or does not meet the required difficulty."""

    enhanced_code = "5.7.1"


# --- storage --------------------------------------------------------------------------------


class StoreError(OnionpostError):
    """The local database could not complete the operation."""

    enhanced_code = "4.3.0"
    temporary = True


class DatabaseBusy(StoreError):
    """The database is busy with another writer; try again in a moment."""


class DatabaseFailed(StoreError):
    """The database could not complete the operation: it may be full, damaged or unreadable."""


class QuotaExceeded(StoreError):
    """The mailbox is full; the message can be delivered once the owner frees space."""

    enhanced_code = "4.2.2"
    temporary = True


class DiskFull(StoreError):
    """This machine's disk is nearly full: new mail is refused until space is freed.

    Refused before it is stored (``Config.min_free_mib``), so that the databases never run
    into a full disk halfway through a commit; the sender keeps the message and retries."""

    enhanced_code = "4.3.1"  # RFC 3463: mail system full
    temporary = True


class IllegalTransition(StoreError):
    """A queued message cannot go from that state to that one (docs/queues.md)."""

    enhanced_code = "4.3.0"
    temporary = True


class FolderError(StoreError):
    """That cannot be done with this folder."""

    enhanced_code = "5.2.0"
    temporary = False


class FolderNotFound(FolderError):
    """There is no folder with that name."""


class FolderExists(FolderError):
    """A folder with that name already exists."""


class FolderProtected(FolderError):
    """The standard folders (INBOX, Sent, Drafts, Trash, Junk, Archive) cannot be deleted or
    renamed."""


class InvalidFolderName(FolderError):
    """That folder name cannot be used. A name must not be empty, must not contain control
    characters, "%" or "*", and uses "/" only between levels."""


# --- delivery between nodes ------------------------------------------------------------------


class DeliveryError(OnionpostError):
    """The recipient's inbox did not accept the message."""

    enhanced_code = "4.4.0"
    temporary = True
    #: A short machine-readable reason that travels between nodes next to the code.
    default_reason: ClassVar[str] = "refused"

    def __init__(
        self, detail: str | None = None, *, code: str | None = None, reason: str | None = None
    ) -> None:
        if code is not None:
            # The first digit of an enhanced code says temporary (4) or permanent (5).
            code = ("4" if self.temporary else "5") + code[1:]
        super().__init__(detail, code=code)
        self.reason = reason or self.default_reason

    @classmethod
    def from_error(cls, exc: OnionpostError) -> DeliveryError:
        """Carry another error's sentence and code across the node-to-node boundary."""
        return cls(str(exc), code=exc.code, reason=type(exc).__name__)


class TemporaryDeliveryError(DeliveryError):
    """The recipient's inbox could not take the message now; it will be retried."""

    enhanced_code = "4.4.0"
    temporary = True


class PermanentDeliveryError(DeliveryError):
    """The recipient's inbox refused the message; retrying will not help."""

    enhanced_code = "5.0.0"
    temporary = False


class UnknownMailbox(PermanentDeliveryError):
    """The recipient's inbox has no such mailbox."""

    enhanced_code = "5.1.1"
    default_reason = "unknown-mailbox"


class StaleRecipientKeys(TemporaryDeliveryError):
    """The message was sealed to keys the recipient no longer uses; fresh keys are needed."""

    # RFC 3463 X.7.5: "cryptographic failure ... necessary information such as key was not
    # available"; distinct from rate limiting (X.7.0) so the sender can re-seal instead.
    enhanced_code = "4.7.5"
    default_reason = "stale-keys"


class BadRequest(OnionpostError):
    """The request is not understood: it is not what the onionpost protocol expects.

    Distinct from :class:`PeerProtocolError`, which is what a *client* concludes about a
    server's answer (temporary: the server may be mid-upgrade); a request that does not parse
    will never parse, so the node API answers it 400, permanently.
    """

    enhanced_code = "5.5.2"
    reason = "bad-request"


class RequestAborted(OnionpostError):
    """The other side went away before its whole request arrived.

    Nobody is left to read an answer; the node API logs it as one line, since a peer whose tor
    circuit breaks mid-upload is ordinary, not a fault of this node.
    """

    enhanced_code = "4.4.2"
    temporary = True
    reason = "aborted"


class DeviceRefused(OnionpostError):
    """This device may not use the mailbox (unknown or revoked device, or failed login)."""

    enhanced_code = "5.7.8"


class PeerUnreachable(DeliveryError):
    """The recipient's inbox cannot be reached right now.

    Temporary, as a :class:`DeliveryError` is by default; a few of tor's answers are
    permanent (a malformed address, a missing or rejected client-authorization key), so this
    is not a :class:`TemporaryDeliveryError`, whose name promises a retry.
    """

    enhanced_code = "4.4.1"


class TorStillConnecting(PeerUnreachable):
    """This node's tor is still connecting to the Tor network; the message waits until it is.

    Nothing is known about the recipient then, so the outbox and the sealing queue do not count
    it as an attempt and do not back off: the mail goes as soon as tor is ready.
    """


# Why tor could not reach a peer, from its SOCKS reply (tor.py maps the codes).


class PeerOffline(PeerUnreachable):
    """The recipient's inbox is offline: its onion descriptor was not found."""


class PeerDescriptorInvalid(PeerUnreachable):
    """The recipient's inbox published an onion descriptor that tor could not read."""


class PeerIntroductionFailed(PeerUnreachable):
    """The recipient's inbox could not be reached: introduction failed (its tor may have
    restarted or be overloaded)."""


class PeerIntroductionTimedOut(PeerUnreachable):
    """The recipient's inbox could not be reached: introduction timed out."""


class PeerRendezvousFailed(PeerUnreachable):
    """The recipient's inbox could not be reached: the rendezvous with it failed."""


class PeerTimedOut(PeerUnreachable):
    """The recipient's inbox did not answer in time."""


class PeerConnectionFailed(PeerUnreachable):
    """Tor could not complete the connection to the recipient's inbox."""


class PeerConnectionLost(PeerUnreachable):
    """The connection to the recipient's inbox ended before any of its answer arrived.

    On a reused keep-alive connection the peer most likely closed it while it was idle, so
    the request may go once more on a fresh connection (a repeated delivery is recognised by
    its digest and answered as a duplicate).
    """


class PeerRefused(PeerUnreachable):
    """The recipient's onion service refused the connection: no inbox is listening there."""


class BadOnionAddress(PeerUnreachable):
    """The recipient's onion address is not valid."""

    enhanced_code = "5.1.2"
    temporary = False


class OnionClientAuthRequired(PeerUnreachable):
    """The recipient's inbox accepts only authorized clients, and this node has no key for it."""

    enhanced_code = "5.7.1"
    temporary = False


class OnionClientAuthRejected(PeerUnreachable):
    """The recipient's inbox rejected this node's onion client authorization key."""

    enhanced_code = "5.7.1"
    temporary = False


class PeerProtocolError(TemporaryDeliveryError):
    """The recipient's inbox answered with something that is not the onionpost protocol."""

    enhanced_code = "4.5.0"


# --- tor ------------------------------------------------------------------------------------


class TorError(OnionpostError):
    """Tor is not working."""

    enhanced_code = "4.4.1"
    temporary = True


class TorNotInstalled(TorError):
    """The tor program is not installed. Install it with `sudo apt-get install tor`."""

    temporary = False


class TorTooOld(TorError):
    """The installed tor is too old for onionpost."""

    temporary = False


class TorControlError(TorError):
    """onionpost cannot talk to tor's control port."""


class TorAuthError(TorControlError):
    """Tor refused onionpost's control-port authentication."""

    temporary = False


class OnionServiceError(TorError):
    """Tor could not create or publish the inbox's onion service."""


class TorNotRunning(TorError):
    """Tor is not running: onionpost cannot reach its SOCKS port."""


class TorBootstrapError(TorError):
    """Tor could not connect to the Tor network."""


# --- mail-client gateway --------------------------------------------------------------------


class GatewayError(OnionpostError):
    """The mail client's request cannot be carried out."""


class AuthenticationFailed(GatewayError):
    """The user name or password is wrong."""

    enhanced_code = "5.7.8"


class SenderNotAllowed(GatewayError):
    """The From address must be your own onionpost address."""

    enhanced_code = "5.7.1"


class UnknownLocalUser(GatewayError):
    """There is no such user on this onionpost node."""

    enhanced_code = "5.1.1"


class PasswordRejected(GatewayError):
    """That password cannot be used: it must not be empty."""

    enhanced_code = "5.7.0"


class LocalTLSError(GatewayError):
    """The gateway's local TLS certificate could not be created or loaded."""

    enhanced_code = "4.7.0"
    temporary = True


class MailServerError(GatewayError):
    """The private IMAP server (Dovecot) could not be set up or is not running."""

    enhanced_code = "4.3.0"
    temporary = True


class SMTPFrontError(GatewayError):
    """The SMTP front process (the submission protocol's second process) failed."""

    enhanced_code = "4.3.0"
    temporary = True


class SMTPFrontFrameError(SMTPFrontError):
    """A frame between the node and its SMTP front process cannot be read.

    ``request`` is the frame's request id when its header could be read (the frame can then
    be answered and skipped); None when the stream itself can no longer be trusted.
    """

    def __init__(self, detail: str, request: int | None = None) -> None:
        super().__init__(detail)
        self.request = request


class MailServerNotInstalled(MailServerError):
    """Dovecot's IMAP and LMTP servers are not installed: run scripts/system-deps.sh run as root."""

    temporary = False


class FilingDeferred(MailServerError):
    """The mail server could not file the message now; it stays queued and is tried again."""


class FilingRefused(GatewayError):
    """The mail server refused to file the message."""

    enhanced_code = "5.3.0"


class IntroductionMismatch(CryptoError):
    """The identity key an introduction vouches for is not the key this person presents.

    Either the introducer was wrong about them, or someone is impersonating them.  Nothing was
    pinned and nobody was let in: ask the introducer and the person to compare fingerprints
    over another channel.
    """
