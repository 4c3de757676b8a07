"""The gateway's own certificate authority, so mail clients can use STARTTLS on loopback.

Thunderbird does not accept a self-signed server certificate even when the user trusts it
(measured: trusting the leaf with ``certutil -t P,,`` fails); it does accept a leaf signed by
a CA the user imported.  So the gateway creates, once, in ``<data_dir>/tls/``:

* ``ca.pem`` / ``ca.key`` — a CA that can only vouch for loopback names: its critical name
  constraints permit ``localhost``, 127.0.0.0/8 and ::1 and nothing else, so importing it
  into a mail client cannot let anyone who steals ``ca.key`` impersonate other sites;
* ``cert.pem`` / ``key.pem`` — a CA:FALSE server certificate for 127.0.0.1, ::1 and
  localhost, signed by that CA, renewed automatically before it expires (397 days, the
  longest validity Apple clients accept).

Keys are written with mode 0600 into a 0700 directory, atomically.

**LAN access** (``[gateway] lan = true``, :mod:`gateway.lan`) cannot use that CA: its name
constraints, the reason trusting it is safe, forbid every LAN name, and a CA's constraints
cannot change without a new CA that every client would have to import again.  So LAN access
has a second CA of its own, made the first time it is needed and kept from then on:

* ``lan-ca.pem`` / ``lan-ca.key`` — constrained to the address ranges that are never routed on
  the internet (RFC 1918, CGNAT, IPv6 unique-local, loopback, the documentation ranges), to
  ``.local`` (mDNS) and to this machine's own host names when it was made.  A new LAN address
  from DHCP stays inside, so clients that trust it keep working; only a new host name that is
  not covered makes a new LAN CA (logged, and ``onionpost doctor`` says so);
* ``lan-cert.pem`` / ``lan-key.pem`` — the server certificate for connections that do not come
  in over loopback, naming the loopback names plus the machine's LAN names and addresses;
  reissued, under the same LAN CA, whenever that set changes (checked at every start).

Connections to a loopback address keep getting ``cert.pem``, so a local mail client that
trusts the first CA notices nothing when LAN access is turned on.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from onionpost.base.atomicfile import write_atomic
from onionpost.core.errors import LocalTLSError

__all__ = [
    "LAN_NETWORKS",
    "LocalTLS",
    "ca_path",
    "certificate_names",
    "ensure_lan_tls",
    "ensure_tls",
    "lan_ca_covers",
    "lan_ca_fits",
    "lan_server_context",
    "nameable",
    "server_context",
]

CA_FILE, CA_KEY_FILE = "ca.pem", "ca.key"
CERT_FILE, KEY_FILE = "cert.pem", "key.pem"
LAN_CA_FILE, LAN_CA_KEY_FILE = "lan-ca.pem", "lan-ca.key"
LAN_CERT_FILE, LAN_KEY_FILE = "lan-cert.pem", "lan-key.pem"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: What the LAN CA may vouch for: ranges that no internet host can hold (a LAN address, or
#: one that only a LAN or a test network uses).  Link-local addresses are left out: they
#: need an interface name (``fe80::1%eth0``) that no certificate can carry.
LAN_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "192.0.2.0/24",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "::1/128",
        "fc00::/7",
        "2001:db8::/32",
    )
)
#: The mDNS domain: ``<hostname>.local``.
LAN_DNS_SUFFIX = "local"
CA_LIFETIME = timedelta(days=3650)
LEAF_LIFETIME = timedelta(days=397)
RENEW_BEFORE = timedelta(days=30)
_LOOPBACK_NAMES: list[x509.GeneralName] = [
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    x509.IPAddress(ipaddress.ip_address("::1")),
]


@dataclass(frozen=True)
class LocalTLS:
    """Where the gateway's TLS files are; ``ca_cert`` is what a mail client should trust."""

    directory: Path
    ca_cert: Path
    cert: Path
    key: Path


def ca_path(tls_dir: Path) -> Path:
    """The CA certificate to import into mail clients (creating it if needed)."""
    return ensure_tls(tls_dir).ca_cert


def server_context(tls_dir: Path) -> ssl.SSLContext:
    """A TLS 1.2+ server context with the gateway certificate (created or renewed first)."""
    files = ensure_tls(tls_dir)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as exc:
        raise LocalTLSError(f"Cannot load the gateway certificate from {tls_dir}: {exc}") from exc
    return context


def ensure_tls(tls_dir: Path, *, now: datetime | None = None) -> LocalTLS:
    """Create the CA and the server certificate if missing; renew the certificate if due."""
    now = now or datetime.now(UTC)
    files = LocalTLS(tls_dir, tls_dir / CA_FILE, tls_dir / CERT_FILE, tls_dir / KEY_FILE)
    try:
        tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tls_dir.chmod(0o700)
        ca_cert, ca_key = _load_or_create_ca(tls_dir, now)
        if not _leaf_is_current(files, ca_cert, now):
            _write_leaf(files, ca_cert, ca_key, now)
    except (OSError, ValueError, TypeError) as exc:
        raise LocalTLSError(f"Cannot set up the gateway certificate in {tls_dir}: {exc}") from exc
    return files


_LOOPBACK_SUBTREES: list[x509.GeneralName] = [
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.ip_network("127.0.0.0/8")),
    x509.IPAddress(ipaddress.ip_network("::1/128")),
]


# --- LAN access ---------------------------------------------------------------------------


def nameable(address: IPAddress) -> bool:
    """Whether the LAN CA may vouch for this address (see :data:`LAN_NETWORKS`)."""
    return any(address in net for net in LAN_NETWORKS if net.version == address.version)


def _lan_names(dns: Iterable[str], ips: Iterable[IPAddress]) -> list[x509.GeneralName]:
    """The LAN certificate's names: loopback's, then ``dns`` and the nameable ``ips``."""
    names = list(_LOOPBACK_NAMES)
    seen = {n.value for n in names}
    for raw in dns:
        host = raw.lower().rstrip(".")
        if host and host not in seen:
            names.append(x509.DNSName(host))
            seen.add(host)
    for address in ips:
        if nameable(address) and address not in seen:
            names.append(x509.IPAddress(address))
            seen.add(address)
    return names


def _dns_covered(name: str, subtrees: Iterable[str]) -> bool:
    return any(name == tree or name.endswith("." + tree) for tree in subtrees)


def lan_ca_covers(ca_cert: x509.Certificate, dns: Iterable[str]) -> bool:
    """Whether the LAN CA's name constraints permit every one of these host names."""
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return False
    trees = [t.value for t in constraints.permitted_subtrees or [] if isinstance(t, x509.DNSName)]
    return all(_dns_covered(h.lower().rstrip("."), trees) for h in dns if h)


def lan_ca_fits(tls_dir: Path, dns: Iterable[str]) -> bool:
    """False when a LAN CA exists whose constraints do not cover these host names (the next
    start will make a new one); True otherwise, including when there is none yet."""
    try:
        ca = x509.load_pem_x509_certificate((tls_dir / LAN_CA_FILE).read_bytes())
    except (OSError, ValueError):
        return True
    return lan_ca_covers(ca, dns)


def _lan_ca_subtrees(dns: Iterable[str]) -> list[x509.GeneralName]:
    trees: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName(LAN_DNS_SUFFIX)]
    for host in sorted({h.lower().rstrip(".") for h in dns if h}):
        if not _dns_covered(host, [t.value for t in trees if isinstance(t, x509.DNSName)]):
            trees.append(x509.DNSName(host))
    return trees + [x509.IPAddress(net) for net in LAN_NETWORKS]


def ensure_lan_tls(
    tls_dir: Path,
    dns: Iterable[str],
    ips: Iterable[IPAddress],
    *,
    now: datetime | None = None,
) -> LocalTLS:
    """The LAN CA (created once) and a LAN certificate naming exactly these names.

    The certificate is reissued, under the same LAN CA, when the names or addresses differ
    from the ones it carries (a new DHCP lease), when it is due, or when the CA is new.
    """
    now = now or datetime.now(UTC)
    dns = list(dns)
    wanted = _lan_names(dns, ips)
    files = LocalTLS(
        tls_dir, tls_dir / LAN_CA_FILE, tls_dir / LAN_CERT_FILE, tls_dir / LAN_KEY_FILE
    )
    try:
        tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tls_dir.chmod(0o700)
        ca_cert, ca_key = _load_or_create_ca(
            tls_dir,
            now,
            files=(LAN_CA_FILE, LAN_CA_KEY_FILE),
            title="onionpost LAN gateway CA",
            organisation="onionpost (this computer and its LAN only)",
            permitted=_lan_ca_subtrees(dns),
            keep=lambda cert: lan_ca_covers(cert, dns),
        )
        current = _leaf_is_current(files, ca_cert, now)
        if not current or _names_of(files.cert) != _as_set(wanted):
            _write_leaf(files, ca_cert, ca_key, now, wanted)
    except (OSError, ValueError, TypeError) as exc:
        raise LocalTLSError(f"Cannot set up the LAN certificate in {tls_dir}: {exc}") from exc
    return files


def lan_server_context(
    tls_dir: Path, dns: Iterable[str], ips: Iterable[IPAddress]
) -> ssl.SSLContext:
    """A TLS 1.2+ server context with the LAN certificate (created or reissued first)."""
    files = ensure_lan_tls(tls_dir, dns, ips)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as exc:
        raise LocalTLSError(f"Cannot load the LAN certificate from {tls_dir}: {exc}") from exc
    return context


def certificate_names(cert_path: Path) -> tuple[set[str], set[IPAddress]]:
    """The DNS names and IP addresses a certificate's subjectAltName carries (empty sets if
    the file is missing or unreadable)."""
    names = _names_of(cert_path)
    dns = {n for n in names if isinstance(n, str)}
    return dns, {n for n in names if not isinstance(n, str)}


def _as_set(names: Iterable[x509.GeneralName]) -> set[str | IPAddress]:
    out: set[str | IPAddress] = set()
    for n in names:
        value = n.value
        if isinstance(value, str | ipaddress.IPv4Address | ipaddress.IPv6Address):
            out.add(value)
    return out


def _names_of(cert_path: Path) -> set[str | IPAddress]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return set()
    return _as_set(san)


def _load_or_create_ca(
    tls_dir: Path,
    now: datetime,
    *,
    files: tuple[str, str] = (CA_FILE, CA_KEY_FILE),
    title: str = "onionpost local gateway CA",
    organisation: str = "onionpost (this computer only)",
    permitted: list[x509.GeneralName] | None = None,
    keep: Callable[[x509.Certificate], bool] = lambda _cert: True,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = tls_dir / files[0], tls_dir / files[1]
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if (
            isinstance(key, ec.EllipticCurvePrivateKey)
            and cert.not_valid_after_utc > now
            and keep(cert)
        ):
            return cert, key
    key = ec.generate_private_key(ec.SECP256R1())
    tag = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest.hex()[:8]
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"{title} {tag}"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
        ]
    )
    constraints = x509.NameConstraints(
        permitted_subtrees=list(permitted or _LOOPBACK_SUBTREES), excluded_subtrees=None
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(constraints, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _leaf_is_current(files: LocalTLS, ca_cert: x509.Certificate, now: datetime) -> bool:
    """The server certificate exists, matches its key, was signed by this CA, and is not due."""
    if not (files.cert.exists() and files.key.exists()):
        return False
    try:
        leaf = x509.load_pem_x509_certificate(files.cert.read_bytes())
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        ca_public = ca_cert.public_key()
        algorithm = leaf.signature_hash_algorithm
        if not isinstance(ca_public, ec.EllipticCurvePublicKey) or algorithm is None:
            return False
        ca_public.verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(algorithm))
    except (ValueError, TypeError, InvalidSignature):
        return False
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        return False
    return leaf.not_valid_after_utc - RENEW_BEFORE > now


def _spki(public_key: object) -> bytes:
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return b""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write_leaf(
    files: LocalTLS,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime,
    names: list[x509.GeneralName] | None = None,
) -> None:
    names = names or _LOOPBACK_NAMES
    common = next(
        (n.value for n in names if isinstance(n, x509.DNSName) and n.value != "localhost"),
        "localhost",
    )
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(min(now + LEAF_LIFETIME, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(files.key, _key_pem(key))
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(
        serialization.Encoding.PEM
    )
    _write_public(files.cert, chain)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    write_atomic(path, data, mode=0o600)


def _write_public(path: Path, data: bytes) -> None:
    write_atomic(path, data, mode=0o644)
