"""Certificates: the swarm's root CA, node keys and CSRs, issuing, identities, verification.

Everything here is pure: values in, values out, no files, no network, no clocks except the
`now` a caller may pass (tests pass one to make expired or not-yet-valid certificates). The
shapes follow swarmkit (`ca/certificates.go`, `ca/config.go`) so a Docker operator recognises
them:

- the root CA: ECDSA P-256, CN `swarm-ca`, 20 years, made at `swarm init`;
- a node certificate: `O=<cluster ID>, OU=swarm-manager|swarm-worker, CN=<node ID>`, SANs
  `<OU>, <node ID>` (plus `swarm-ca` for managers), backdated 1 h, 90 days by default;
- the node makes its own key and sends only a CSR: the private key never leaves the node, and
  the signer takes nothing from the CSR but the public key (as swarmkit's CSRWhitelist does);
- root rotation: the new root is cross-signed by the old one, and certificates issued during
  the rotation carry that cross-signed certificate, so they verify against either root.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv6Address

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from orchestrator.store.objects import Role

ROOT_CN = "swarm-ca"
# swarmkit RootCAExpiration = "630720000s": 20 years of 365 days.
ROOT_CA_VALIDITY = timedelta(seconds=630_720_000)
DEFAULT_NODE_CERT_EXPIRY = timedelta(hours=2160)  # 90 days
MIN_NODE_CERT_EXPIRY = timedelta(hours=1)
# Certificates start an hour in the past so a node whose clock is a little behind the
# manager's does not reject a certificate that is "not yet valid".
CERT_BACKDATE = timedelta(hours=1)
# Managers' certificates also carry this name, so a client can dial "the CA" by name (swarmkit
# CARole) whatever manager answers.
CA_SAN = "swarm-ca"

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class PKIError(Exception):
    """A certificate, key or CSR is unusable; the message says which and why."""


def role_ou(role: Role) -> str:
    """How a certificate spells a node's role (its OU)."""
    return f"swarm-{role.value}"


def role_from_ou(ou: str) -> Role:
    for role in Role:
        if role_ou(role) == ou:
            return role
    raise PKIError(f"unknown role {ou!r} in certificate (want swarm-manager or swarm-worker)")


# ---- PEM helpers ---------------------------------------------------------------------------


def certs_to_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def certs_from_pem(pem: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise PKIError(f"not a PEM certificate bundle: {e}") from e
    return certs


def key_to_pem(key: PrivateKey) -> bytes:
    # PKCS#8 without a passphrase: keys at rest are protected by the file mode and, on managers,
    # by the store's encryption (autolock), not by a passphrase nobody could type at boot.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_from_pem(pem: bytes) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise PKIError(f"not an unencrypted PEM private key: {e}") from e
    _check_key(key)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    return key


def _check_key(key: object) -> None:
    """Only the key types swarmkit accepts: ECDSA on the NIST curves, RSA of 2048 bits or more."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _ALLOWED_CURVES):
            raise PKIError(f"unsupported ECDSA curve {key.curve.name}")
        return
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise PKIError(f"RSA key of {key.key_size} bits is too small (2048 minimum)")
        return
    raise PKIError(f"unsupported key type {type(key).__name__} (want ECDSA or RSA)")


def _same_public_key(cert: x509.Certificate, key: PrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def _now(now: datetime | None) -> datetime:
    return datetime.now(UTC) if now is None else now


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key, the kind swarmkit (via cfssl) gives every node and root."""
    return ec.generate_private_key(ec.SECP256R1())


# ---- the node side: key and CSR ------------------------------------------------------------


@dataclass(frozen=True)
class NodeCSR:
    """A node's new key and the CSR it sends to a manager; the key stays on the node.

    The CSR's subject is empty on purpose: the manager decides the node ID, role and cluster,
    so nothing a node writes in its CSR could grant it more.
    """

    key_pem: bytes = field(repr=False)
    pem: bytes

    @classmethod
    def generate(cls) -> NodeCSR:
        key = new_key()
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .sign(key, hashes.SHA256())
        )
        return cls(key_pem=key_to_pem(key), pem=csr.public_bytes(serialization.Encoding.PEM))


# ---- identities ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """Who a certificate says its holder is. Trust it only after the chain was verified."""

    node_id: str
    role: Role
    cluster_id: str
    serial: int
    not_before: datetime
    not_after: datetime

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> Identity:
        def one(oid: x509.ObjectIdentifier, what: str) -> str:
            attrs = cert.subject.get_attributes_for_oid(oid)
            if len(attrs) != 1 or not isinstance(attrs[0].value, str) or not attrs[0].value:
                raise PKIError(f"certificate has no single {what} in its subject")
            return attrs[0].value

        return cls(
            node_id=one(NameOID.COMMON_NAME, "CN (node ID)"),
            role=role_from_ou(one(NameOID.ORGANIZATIONAL_UNIT_NAME, "OU (role)")),
            cluster_id=one(NameOID.ORGANIZATION_NAME, "O (cluster ID)"),
            serial=cert.serial_number,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )

    @classmethod
    def from_pem(cls, pem: bytes) -> Identity:
        """The identity of the first certificate of a PEM chain (the leaf)."""
        certs = certs_from_pem(pem)
        return cls.from_certificate(certs[0])


# ---- issuing -------------------------------------------------------------------------------


def check_expiry(expiry: timedelta) -> timedelta:
    """`--cert-expiry` as the engine checks it: at least an hour."""
    if expiry < MIN_NODE_CERT_EXPIRY:
        raise PKIError(f"minimum certificate expiry time is 1h0m0s, not {expiry}")
    return expiry


@dataclass(frozen=True)
class Issuer:
    """What signs node certificates: a CA key, the certificate that names it, and the
    certificates appended to every chain it issues.

    Normally the root itself with no intermediates. During a root rotation it is the new root's
    key, and `intermediates` holds the new root cross-signed by the old one, so an issued chain
    `[leaf, cross-signed]` verifies against the old root (through the cross-signed certificate)
    and against the new root (which signed the leaf directly).
    """

    key: PrivateKey = field(repr=False)
    cert: x509.Certificate
    intermediates: tuple[x509.Certificate, ...] = ()
    expiry: timedelta = DEFAULT_NODE_CERT_EXPIRY

    def __post_init__(self) -> None:
        check_expiry(self.expiry)
        if not _same_public_key(self.cert, self.key):
            raise PKIError("the signing key does not match the signing certificate")
        if self.intermediates and (
            self.intermediates[0].subject != self.cert.subject
            or self.intermediates[0].public_key() != self.cert.public_key()
        ):
            # The first intermediate stands in for the signer in the chain (swarmkit checks the
            # same): otherwise the chain we hand out would not link up.
            raise PKIError("the first intermediate must have the signer's subject and key")

    def sign_csr(
        self,
        csr_pem: bytes,
        *,
        node_id: str,
        role: Role,
        cluster_id: str,
        now: datetime | None = None,
        expiry: timedelta | None = None,
        ip_addresses: Sequence[IPv4Address | IPv6Address] = (),
    ) -> bytes:
        """Sign a node's CSR; returns the PEM chain `[leaf, *intermediates]` the node keeps.

        Only the CSR's public key is used (its signature proves the node holds the key). The
        subject and SANs come from the arguments, as swarmkit's PrepareCSR does. `now` and
        `expiry` exist for tests (an expired certificate) and per-request overrides;
        `ip_addresses`, IP SANs that swarm nodes never carry, for peers that dial by address
        and check it (bench/raft.py's etcd members).
        """
        # The CSR comes from the network: every way it can be wrong becomes a PKIError.
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
            public_key = csr.public_key()
            signed = csr.is_signature_valid
        except (ValueError, UnsupportedAlgorithm) as e:
            raise PKIError(f"not a PEM certificate request: {e}") from e
        if not signed:
            raise PKIError("the certificate request's signature does not verify")
        _check_key(public_key)
        assert isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
        lifetime = self.expiry if expiry is None else expiry
        start = _now(now)
        sans = [role_ou(role), node_id] + ([CA_SAN] if role is Role.MANAGER else [])
        leaf = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_id),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role_ou(role)),
                        x509.NameAttribute(NameOID.COMMON_NAME, node_id),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - CERT_BACKDATE)
            .not_valid_after(start + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_encipherment=True,
                    content_commitment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                # Every node is both: it serves (managers) and it dials (everyone).
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        *(x509.DNSName(n) for n in sans),
                        *(x509.IPAddress(ip) for ip in ip_addresses),
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return certs_to_pem([leaf, *self.intermediates])


# ---- the root CA ---------------------------------------------------------------------------


def _ca_certificate(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    serial: int,
    not_before: datetime,
    not_after: datetime,
    signer_key: PrivateKey,
    issuer: x509.Name,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # path_length=1: below a root there is at most one CA, the next root cross-signed by it
        # during a rotation; nothing else may issue CA certificates.
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        # The authority key ID is what lets a verifier tell two roots both named "swarm-ca"
        # apart (old and new during a rotation): names alone would be ambiguous.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
            critical=False,
        )
        .sign(signer_key, hashes.SHA256())
    )


@dataclass(frozen=True)
class RootCA:
    """The swarm's root of trust: its self-signed certificate and, on managers, its key.

    A worker (or a node that just fetched the root while joining) holds a `RootCA` without a
    key: it can verify but not sign.
    """

    cert: x509.Certificate
    key: PrivateKey | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        bc = _basic_constraints(self.cert)
        if bc is None or not bc.ca:
            raise PKIError("the root certificate is not a CA certificate")
        if self.cert.issuer != self.cert.subject:
            raise PKIError("the root certificate is not self-signed")
        try:
            self.cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise PKIError(f"the root certificate's self-signature does not verify: {e}") from e
        _check_key(self.cert.public_key())
        if self.key is not None and not _same_public_key(self.cert, self.key):
            raise PKIError("the root CA key does not match the root CA certificate")

    @classmethod
    def create(
        cls,
        *,
        now: datetime | None = None,
        validity: timedelta = ROOT_CA_VALIDITY,
        cn: str = ROOT_CN,
    ) -> RootCA:
        """A new root for `swarm init` (or `swarm ca --rotate`)."""
        key = new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        # cfssl backdates the root the way it backdates leaves; keep the same slack.
        start = _now(now) - CERT_BACKDATE
        cert = _ca_certificate(
            name, key.public_key(), x509.random_serial_number(), start, start + validity, key, name
        )
        return cls(cert=cert, key=key)

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes | None = None) -> RootCA:
        certs = certs_from_pem(cert_pem)
        if len(certs) != 1:
            raise PKIError(f"want exactly one root certificate, got {len(certs)}")
        return cls(cert=certs[0], key=None if key_pem is None else key_from_pem(key_pem))

    @property
    def cert_pem(self) -> bytes:
        return certs_to_pem([self.cert])

    @property
    def key_pem(self) -> bytes:
        if self.key is None:
            raise PKIError("this root CA has no key (only managers hold it)")
        return key_to_pem(self.key)

    @property
    def digest(self) -> bytes:
        """SHA-256 of the certificate's DER: what a join token pins."""
        return root_digest([self.cert])

    def public(self) -> RootCA:
        """The same root without its key: what workers get."""
        return RootCA(cert=self.cert)

    def issuer(self, expiry: timedelta = DEFAULT_NODE_CERT_EXPIRY) -> Issuer:
        if self.key is None:
            raise PKIError("this root CA has no key, it cannot sign")
        return Issuer(key=self.key, cert=self.cert, expiry=expiry)

    def cross_sign(self, other: x509.Certificate) -> x509.Certificate:
        """`other` (a new root) re-signed by this root: same subject, key, validity and
        constraints, but issued by us (swarmkit CrossSignCACertificate).

        A fresh serial, unlike Go's copy of the template's: both roots are named "swarm-ca",
        so the same serial would give two different certificates the same issuer and serial.
        """
        if self.key is None:
            raise PKIError("this root CA has no key, it cannot cross-sign")
        bc = _basic_constraints(other)
        if bc is None or not bc.ca:
            raise PKIError("the certificate to cross-sign is not a CA certificate")
        public_key = other.public_key()
        _check_key(public_key)
        assert isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
        return _ca_certificate(
            other.subject,
            public_key,
            x509.random_serial_number(),
            other.not_valid_before_utc,
            other.not_valid_after_utc,
            self.key,
            self.cert.subject,
        )


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def root_digest(roots: Sequence[x509.Certificate]) -> bytes:
    """SHA-256 over the DER of every root in the bundle, in order.

    DER, not PEM: the same certificate has one DER but many PEM spellings (line ends, headers).
    Every root, not one: otherwise a man in the middle could serve the real root (matching the
    digest) next to a root of its own that its server certificate chains to (swarmkit hashes
    the whole bundle for the same reason).
    """
    h = hashlib.sha256()
    for cert in roots:
        h.update(cert.public_bytes(serialization.Encoding.DER))
    return h.digest()


# ---- root rotation -------------------------------------------------------------------------


@dataclass(frozen=True)
class RootRotation:
    """A root rotation in progress (swarmkit `RootCA.RootRotation`).

    1. `start`: make the new root and cross-sign it with the old one. Nodes keep trusting the
       old root; every node is re-issued by `issuer()`, whose chains verify against both.
    2. When every node holds a new certificate, `finish()`: nodes switch their trust to the new
       root (their `[leaf, cross-signed]` chains verify against it directly), join tokens get
       the new digest, and the old root's key is forgotten.
    During the switch some nodes trust only the old root and some only the new one; both accept
    the chains `issuer()` made. A certificate issued before the rotation verifies only against
    the old root, which is why trust moves only after every node was re-issued.
    """

    old: RootCA
    new: RootCA
    cross_signed: x509.Certificate

    def __post_init__(self) -> None:
        if self.new.key is None:
            raise PKIError("the new root needs its key to issue during the rotation")
        if (
            self.cross_signed.subject != self.new.cert.subject
            or self.cross_signed.public_key() != self.new.cert.public_key()
        ):
            raise PKIError("the cross-signed certificate is not the new root's")
        try:
            self.cross_signed.verify_directly_issued_by(self.old.cert)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise PKIError(f"the cross-signed certificate is not the old root's: {e}") from e

    @classmethod
    def start(cls, old: RootCA, new: RootCA | None = None) -> RootRotation:
        new = RootCA.create() if new is None else new
        return cls(old=old, new=new, cross_signed=old.cross_sign(new.cert))

    @property
    def trust(self) -> RootCA:
        """The root nodes trust until `finish`."""
        return self.old.public()

    def issuer(self, expiry: timedelta = DEFAULT_NODE_CERT_EXPIRY) -> Issuer:
        assert self.new.key is not None  # checked in __post_init__
        return Issuer(
            key=self.new.key, cert=self.new.cert, intermediates=(self.cross_signed,), expiry=expiry
        )

    def finish(self) -> RootCA:
        return self.new

    @property
    def cross_signed_pem(self) -> bytes:
        return certs_to_pem([self.cross_signed])

    @classmethod
    def from_pem(
        cls, old: RootCA, new_cert_pem: bytes, new_key_pem: bytes, cross_signed_pem: bytes
    ) -> RootRotation:
        crossed = certs_from_pem(cross_signed_pem)
        if len(crossed) != 1:
            raise PKIError(f"want one cross-signed certificate, got {len(crossed)}")
        return cls(old=old, new=RootCA.from_pem(new_cert_pem, new_key_pem), cross_signed=crossed[0])


# ---- verification --------------------------------------------------------------------------


def verify_chain(
    chain: bytes | Sequence[x509.Certificate],
    trust: RootCA | Sequence[x509.Certificate],
    *,
    now: datetime | None = None,
    server_name: str | None = None,
) -> Identity:
    """Check that a node's chain `[leaf, *intermediates]` leads to a trusted root and is valid
    at `now`; return the leaf's identity.

    The node checks what a manager hands it before keeping it (swarmkit: "trust, but verify"),
    and a joining node checks the manager's certificate against the root its token pinned.
    `server_name` also checks the leaf's SANs (e.g. "swarm-manager" for a manager).
    """
    certs = certs_from_pem(chain) if isinstance(chain, bytes) else list(chain)
    if not certs:
        raise PKIError("no certificates to verify")
    roots = [trust.cert] if isinstance(trust, RootCA) else list(trust)
    if not roots:
        raise PKIError("no trusted roots to verify against")
    builder = (
        verification.PolicyBuilder()
        .store(verification.Store(roots))
        .time(_now(now))
        .max_chain_depth(3)
    )
    try:
        if server_name is None:
            builder.build_client_verifier().verify(certs[0], certs[1:])
        else:
            builder.build_server_verifier(x509.DNSName(server_name)).verify(certs[0], certs[1:])
    except verification.VerificationError as e:
        raise PKIError(f"certificate chain does not verify: {e}") from e
    return Identity.from_certificate(certs[0])
