"""Join tokens (`SWMTKN-1-...`) and unlock keys (`SWMKEY-1-...`), as Docker spells them.

A join token is two things at once (swarmkit `ca/config.go`):

- `<digest>`: SHA-256 of the root CA certificate, base 36, zero-padded to 50 characters. A
  joining node fetches the root from whatever answers at the manager's address and refuses to
  go on unless it hashes to this digest: the token *pins* the CA, so a man in the middle
  cannot pose as the manager.
- `<secret>`: 16 random bytes, base 36, zero-padded to 25 characters. The manager admits a
  node as worker or manager when the whole token equals its worker or manager token.

The digest is of the root's DER (see `pki.root_digest`), so the same root always gives the same
digest. When a root rotation finishes the tokens are regenerated with the new digest, as
swarmkit's CA reconciler does.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509

from orchestrator.ca.pki import PKIError, RootCA, certs_from_pem, root_digest
from orchestrator.store.objects import Role

JOIN_TOKEN_PREFIX = "SWMTKN-1-"
DIGEST_LEN = 50  # ceil(log36(2**256))
SECRET_LEN = 25  # ceil(log36(2**128))
SECRET_BYTES = 16
UNLOCK_KEY_PREFIX = "SWMKEY-1-"
UNLOCK_KEY_BYTES = 32
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


class TokenError(ValueError):
    """A join token or unlock key that cannot be used; the message says why."""


def _to_base36(raw: bytes, width: int) -> str:
    n = int.from_bytes(raw, "big")
    out = []
    while n:
        n, r = divmod(n, 36)
        out.append(_B36[r])
    return "".join(reversed(out)).rjust(width, "0")


def _from_base36(text: str, nbytes: int, what: str) -> bytes:
    bad = sorted({c for c in text if c not in _B36})
    if bad:
        raise TokenError(
            f"invalid join token: the {what} has characters outside [0-9a-z]: {''.join(bad)!r}"
        )
    n = int(text, 36)
    if n >= 1 << (8 * nbytes):
        raise TokenError(f"invalid join token: the {what} is out of range")
    return n.to_bytes(nbytes, "big")


@dataclass(frozen=True)
class JoinToken:
    """A parsed join token. `str(token)` gives it back in Docker's form."""

    digest: bytes  # SHA-256 of the root CA (32 bytes)
    secret: bytes = field(repr=False)  # 16 random bytes

    def __post_init__(self) -> None:
        if len(self.digest) != 32 or len(self.secret) != SECRET_BYTES:
            raise TokenError("a join token holds a 32-byte digest and a 16-byte secret")

    def __str__(self) -> str:
        return (
            f"{JOIN_TOKEN_PREFIX}{_to_base36(self.digest, DIGEST_LEN)}-"
            f"{_to_base36(self.secret, SECRET_LEN)}"
        )

    @classmethod
    def generate(cls, root: RootCA | Sequence[x509.Certificate]) -> JoinToken:
        """A new token for this root (a worker or manager token, `join-token --rotate`)."""
        roots = [root.cert] if isinstance(root, RootCA) else list(root)
        return cls(digest=root_digest(roots), secret=secrets.token_bytes(SECRET_BYTES))

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        """Parse `SWMTKN-1-<digest>-<secret>`; every refusal names what is wrong."""
        text = text.strip()
        if not text.startswith("SWMTKN-"):
            raise TokenError("invalid join token: it does not start with SWMTKN-")
        if text.startswith("SWMTKN-2-"):
            raise TokenError("invalid join token: SWMTKN-2 (FIPS) tokens are not supported")
        if not text.startswith(JOIN_TOKEN_PREFIX):
            raise TokenError(f"invalid join token: unknown version {text.split('-')[1]!r}")
        parts = text[len(JOIN_TOKEN_PREFIX) :].split("-")
        if len(parts) != 2:
            raise TokenError("invalid join token: want SWMTKN-1-<digest>-<secret>")
        digest, secret = parts
        if len(digest) != DIGEST_LEN:
            raise TokenError(
                f"invalid join token: the digest is {len(digest)} characters, not {DIGEST_LEN}"
            )
        if len(secret) != SECRET_LEN:
            raise TokenError(
                f"invalid join token: the secret is {len(secret)} characters, not {SECRET_LEN}"
            )
        return cls(
            digest=_from_base36(digest, 32, "digest"),
            secret=_from_base36(secret, SECRET_BYTES, "secret"),
        )

    def check_root(self, root_pem: bytes) -> RootCA:
        """The CA pinning step of a join: accept the root bundle a manager served only if it
        hashes to this token's digest. Returns the (keyless) root to trust from now on."""
        try:
            roots = certs_from_pem(root_pem)
        except PKIError as e:
            raise TokenError(f"the manager sent an unreadable root CA: {e}") from e
        got = root_digest(roots)
        if not hmac.compare_digest(got, self.digest):
            raise TokenError(
                "the remote CA does not match the fingerprint in the join token "
                f"(expected {self.digest.hex()}, got {got.hex()}): "
                "a wrong token, a token of another swarm, or a man in the middle"
            )
        if len(roots) != 1:
            raise TokenError(f"want one root CA certificate, the manager sent {len(roots)}")
        try:
            return RootCA(cert=roots[0])
        except PKIError as e:
            raise TokenError(f"the manager's root CA is not usable: {e}") from e


def role_for_token(presented: str, *, worker: str, manager: str) -> Role:
    """The role a join token admits, comparing in constant time (swarmkit uses
    subtle.ConstantTimeCompare) so response times tell nothing about how close a guess was.
    Both comparisons always run."""
    given = presented.strip().encode()
    is_worker = hmac.compare_digest(given, worker.encode())
    is_manager = hmac.compare_digest(given, manager.encode())
    if is_manager:
        return Role.MANAGER
    if is_worker:
        return Role.WORKER
    raise TokenError("A valid join token is necessary to join this cluster")


# ---- unlock keys (autolock) ----------------------------------------------------------------


@dataclass(frozen=True)
class UnlockKey:
    """The key that unlocks a manager's encrypted state after a restart (`swarm unlock`)."""

    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != UNLOCK_KEY_BYTES:
            raise TokenError(f"an unlock key is {UNLOCK_KEY_BYTES} bytes")

    def __str__(self) -> str:
        # Standard base64 without padding, like Go's encoding/base64.RawStdEncoding swarmkit uses.
        return UNLOCK_KEY_PREFIX + base64.b64encode(self.key).decode().rstrip("=")

    @classmethod
    def generate(cls) -> UnlockKey:
        return cls(key=secrets.token_bytes(UNLOCK_KEY_BYTES))

    @classmethod
    def parse(cls, text: str) -> UnlockKey:
        text = text.strip()
        if not text.startswith(UNLOCK_KEY_PREFIX):
            raise TokenError("invalid unlock key: it does not start with SWMKEY-1-")
        body = text[len(UNLOCK_KEY_PREFIX) :]
        try:
            raw = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
        except (binascii.Error, ValueError) as e:
            raise TokenError(f"invalid unlock key: not base64 ({e})") from e
        if len(raw) != UNLOCK_KEY_BYTES:
            raise TokenError(f"invalid unlock key: {len(raw)} bytes, not {UNLOCK_KEY_BYTES}")
        return cls(key=raw)

    def matches(self, other: UnlockKey) -> bool:
        return hmac.compare_digest(self.key, other.key)
