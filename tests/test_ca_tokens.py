"""Join tokens and unlock keys: Docker's format, clear refusals, CA pinning, constant time."""

from __future__ import annotations

import hashlib
import hmac
import re

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from orchestrator.ca.pki import RootCA, certs_to_pem
from orchestrator.ca.tokens import JoinToken, TokenError, UnlockKey, role_for_token
from orchestrator.store.objects import Role

TOKEN_RE = re.compile(r"^SWMTKN-1-[0-9a-z]{50}-[0-9a-z]{25}$")


def test_a_token_is_docker_shaped_and_pins_the_root() -> None:
    root = RootCA.create()
    token = JoinToken.generate(root)
    text = str(token)
    assert TOKEN_RE.match(text), text
    # The digest is SHA-256 of the root's DER, in base 36, zero-padded to 50.
    digest = hashlib.sha256(root.cert.public_bytes(Encoding.DER)).digest()
    assert int(text.split("-")[2], 36) == int.from_bytes(digest, "big")
    assert JoinToken.parse(text) == token
    assert JoinToken.parse(f"  {text}\n") == token  # pasted with whitespace
    # Two tokens for the same root share the digest, not the secret.
    other = JoinToken.generate(root)
    assert other.digest == token.digest and other.secret != token.secret


def test_small_values_are_zero_padded() -> None:
    token = JoinToken(digest=bytes(31) + b"\x01", secret=bytes(15) + b"\x23")
    assert str(token) == "SWMTKN-1-" + "0" * 49 + "1-" + "0" * 24 + "z"
    assert JoinToken.parse(str(token)) == token


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "does not start with SWMTKN-"),
        ("SWMKEY-1-abc", "does not start with SWMTKN-"),
        ("SWMTKN-2-1-" + "0" * 50 + "-" + "0" * 25, "FIPS"),
        ("SWMTKN-3-" + "0" * 50 + "-" + "0" * 25, "unknown version '3'"),
        ("SWMTKN-1-" + "0" * 50, "want SWMTKN-1-<digest>-<secret>"),
        ("SWMTKN-1-" + "0" * 50 + "-" + "0" * 25 + "-x", "want SWMTKN-1-<digest>-<secret>"),
        ("SWMTKN-1-" + "0" * 49 + "-" + "0" * 25, "digest is 49 characters, not 50"),
        ("SWMTKN-1-" + "0" * 50 + "-" + "0" * 26, "secret is 26 characters, not 25"),
        ("SWMTKN-1-" + "0" * 49 + "A-" + "0" * 25, "outside [0-9a-z]: 'A'"),
        ("SWMTKN-1-" + "0" * 50 + "-" + "0" * 24 + "_", "outside [0-9a-z]: '_'"),
        ("SWMTKN-1-" + "z" * 50 + "-" + "0" * 25, "digest is out of range"),
        ("SWMTKN-1-" + "0" * 50 + "-" + "z" * 25, "secret is out of range"),
    ],
)
def test_bad_tokens_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(TokenError, match=re.escape(message)):
        JoinToken.parse(text)


def test_check_root_pins_the_ca() -> None:
    root = RootCA.create()
    token = JoinToken.generate(root)
    assert token.check_root(root.cert_pem).cert == root.cert
    # The manager's root reformatted (CRLF line ends) is still the same certificate.
    assert token.check_root(root.cert_pem.replace(b"\n", b"\r\n")).cert == root.cert
    # A man in the middle with a CA of its own is caught...
    mitm = RootCA.create()
    with pytest.raises(TokenError, match="does not match the fingerprint"):
        token.check_root(mitm.cert_pem)
    # ...also when it adds its root next to the real one.
    with pytest.raises(TokenError, match="does not match the fingerprint"):
        token.check_root(certs_to_pem([root.cert, mitm.cert]))
    with pytest.raises(TokenError, match="unreadable"):
        token.check_root(b"not a certificate")


def test_a_token_of_another_swarm_fails_the_pinning() -> None:
    ours, theirs = RootCA.create(), RootCA.create()
    with pytest.raises(TokenError, match="another swarm"):
        JoinToken.generate(theirs).check_root(ours.cert_pem)


def test_role_for_token() -> None:
    root = RootCA.create()
    worker, manager = str(JoinToken.generate(root)), str(JoinToken.generate(root))
    assert role_for_token(worker, worker=worker, manager=manager) is Role.WORKER
    assert role_for_token(manager, worker=worker, manager=manager) is Role.MANAGER
    rotated = str(JoinToken.generate(root))  # join-token --rotate worker
    with pytest.raises(TokenError, match="A valid join token is necessary"):
        role_for_token(worker, worker=rotated, manager=manager)
    with pytest.raises(TokenError, match="A valid join token is necessary"):
        last = "1" if worker.endswith("0") else "0"  # one character off
        role_for_token(worker[:-1] + last, worker=worker, manager=manager)
    with pytest.raises(TokenError):
        role_for_token("", worker=worker, manager=manager)


def test_role_for_token_compares_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # Timing is too noisy to measure in CI; check instead that every comparison goes through
    # hmac.compare_digest, and that both tokens are always compared.
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    root = RootCA.create()
    worker, manager = str(JoinToken.generate(root)), str(JoinToken.generate(root))
    assert role_for_token(worker, worker=worker, manager=manager) is Role.WORKER
    assert len(seen) == 2
    seen.clear()
    with pytest.raises(TokenError):
        role_for_token("SWMTKN-1-x", worker=worker, manager=manager)
    assert [b for _, b in seen] == [worker.encode(), manager.encode()]


def test_unlock_keys() -> None:
    key = UnlockKey.generate()
    text = str(key)
    assert re.match(r"^SWMKEY-1-[A-Za-z0-9+/]{43}$", text), text  # base64, no padding
    assert UnlockKey.parse(text).matches(key)
    assert not UnlockKey.parse(str(UnlockKey.generate())).matches(key)
    assert text[9:] not in repr(key)
    for bad, message in [
        ("SWMTKN-1-abc", "does not start with SWMKEY-1-"),
        ("SWMKEY-1-!!!!", "not base64"),
        ("SWMKEY-1-AAAA", "3 bytes, not 32"),
    ]:
        with pytest.raises(TokenError, match=re.escape(message)):
            UnlockKey.parse(bad)
