"""Image references as Docker parses them (distribution/reference's ParseNormalizedNamed).

    [domain[:port]/]path[:tag][@digest]

The first component is a registry domain when it contains '.' or ':', is `localhost`, or has
uppercase letters; otherwise the image is on Docker Hub (`docker.io`), and a one-component path
is an official image under `library/`. Path components are lowercase letters and digits joined
by '.', '_', '__' or dashes; a tag is up to 128 word characters, '.' and '-'; a digest is
`algorithm:hex`. Nothing is defaulted beyond the domain: `alpine` keeps no tag (Docker's
`latest` is the puller's business).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_PREFIX = "library/"
NAME_MAX = 255  # distribution/reference's NameTotalLengthMax, domain included

# The grammar, from distribution/reference's regexp.go (ASCII only: Go's \w is).
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_PATH = rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IPV6 = r"\[[a-fA-F0-9:]+\]"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|{_IPV6})(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"

REFERENCE = re.compile(rf"((?:{_DOMAIN}/)?{_PATH})(?::({_TAG}))?(?:@({_DIGEST}))?")
NAME = re.compile(rf"(?:({_DOMAIN})/)?({_PATH})")
PATH_COMPONENT = re.compile(_PATH_COMPONENT)
DOMAIN = re.compile(_DOMAIN)
TAG = re.compile(_TAG)
DIGEST = re.compile(_DIGEST)
IDENTIFIER = re.compile(r"[a-f0-9]{64}")  # an image ID, which is not a name
# hex digits per algorithm go-digest knows
DIGEST_LENGTHS: Mapping[str, int] = MappingProxyType({"sha256": 64, "sha384": 96, "sha512": 128})

FORMAT_HINT = (
    "expected [registry[:port]/]repository[:tag][@digest], "
    "e.g. alpine:3.20 or 192.168.56.1:5000/app"
)


# Shadows the builtin ReferenceError (weak references), which nothing here needs.
class ReferenceError(ValueError):
    """A reference Docker would refuse. str() is Docker's message; `reason` says what is
    wrong in it, for messages of our own."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


@dataclass(frozen=True)
class Reference:
    domain: str  # "docker.io", "192.168.56.1:5000", "localhost:5000"
    path: str  # "library/alpine", "gianarb/micro", "app"
    tag: str = ""  # "" when none was given
    digest: str = ""  # "" or "sha256:<64 hex>"

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.path}"

    def familiar_name(self) -> str:
        """The name as people write it: Docker Hub's domain and `library/` dropped."""
        if self.domain != DEFAULT_DOMAIN:
            return self.name
        rest = self.path.removeprefix(OFFICIAL_PREFIX)
        # library/ is only an official image's namespace when nothing is nested under it
        return rest if rest != self.path and "/" not in rest else self.path

    def with_digest(self, digest: str) -> Reference:
        check_digest(digest)
        return dataclasses.replace(self, digest=digest)

    def __str__(self) -> str:
        tag = f":{self.tag}" if self.tag else ""
        digest = f"@{self.digest}" if self.digest else ""
        return f"{self.name}{tag}{digest}"


def _split_domain(text: str) -> tuple[str, str]:
    """distribution/reference's splitDockerDomain: (domain, the rest)."""
    first, slash, rest = text.partition("/")
    if not slash or (
        not any(c in first for c in ".:") and first != "localhost" and first.lower() == first
    ):
        domain, rest = DEFAULT_DOMAIN, text
    else:
        domain = first
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in rest:
        rest = OFFICIAL_PREFIX + rest
    return domain, rest


def check_digest(digest: str) -> None:
    """go-digest's Parse: a known algorithm and exactly its number of lowercase hex digits."""
    algorithm, colon, hexits = digest.partition(":")
    if not algorithm or not colon or not hexits:
        raise ReferenceError(
            "invalid checksum digest format",
            f"invalid digest {_short(digest)!r}: expected algorithm:hex, "
            "e.g. sha256:<64 hex digits>",
        )
    want = DIGEST_LENGTHS.get(algorithm)
    if want is None:
        raise ReferenceError(
            "unsupported digest algorithm",
            f"unsupported digest algorithm {_short(algorithm)!r}: use sha256, sha384 or sha512",
        )
    if len(hexits) != want:
        raise ReferenceError(
            "invalid checksum digest length",
            f"a {algorithm} digest has {want} hex digits, {_short(digest)!r} has {len(hexits)}",
        )
    if any(c not in "0123456789abcdef" for c in hexits):
        raise ReferenceError(
            "invalid checksum digest format",
            f"invalid digest {_short(digest)!r}: the hex digits must be lowercase 0-9a-f",
        )


def _short(text: str, limit: int = 72) -> str:
    """Long user input, cut for an error message."""
    return text if len(text) <= limit else text[:limit] + "..."


def _bad_registry(domain: str) -> str:
    return (
        f"invalid registry {_short(domain)!r}: expected a host name or address, "
        "with an optional :port"
    )


def _diagnose(text: str) -> str:
    """Which part of a reference the grammar refuses (Docker just says 'invalid reference
    format')."""
    rest, at, digest = text.partition("@")
    if at and not DIGEST.fullmatch(digest):
        return (
            f"invalid digest {_short(digest)!r}: expected algorithm:hex, "
            "e.g. sha256:<64 hex digits>"
        )
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    name, tag = rest, None
    if colon > slash:
        name, tag = rest[:colon], rest[colon + 1 :]
    if tag == "":
        return "empty tag after ':'"
    if tag is not None and not TAG.fullmatch(tag):
        return (
            f"invalid tag {_short(tag)!r}: 1 to 128 letters, digits, '_', '.' or '-', "
            "not starting with '.' or '-'"
        )
    first, sep, path = name.partition("/")
    if sep and (any(c in first for c in ".:") or first == "localhost" or first != first.lower()):
        if not DOMAIN.fullmatch(first):
            return _bad_registry(first)
    else:
        path = name
    for component in path.split("/"):
        if not PATH_COMPONENT.fullmatch(component):
            return (
                f"invalid repository name component {_short(component)!r}: lowercase letters and "
                "digits, separated by '.', '_', '__' or '-'"
            )
    return FORMAT_HINT


def parse(text: str) -> Reference:
    """A reference, normalised (`alpine` -> docker.io/library/alpine); raises ReferenceError."""
    if not text:
        raise ReferenceError("invalid reference format", "the reference is empty; " + FORMAT_HINT)
    if IDENTIFIER.fullmatch(text):
        raise ReferenceError(
            f"invalid repository name ({text}), cannot specify 64-byte hexadecimal strings",
            "an image ID is not a reference; name the image by repository[:tag][@digest]",
        )
    domain, rest = _split_domain(text)
    remote = rest.partition(":")[0]
    if remote.lower() != remote:
        raise ReferenceError(
            "invalid reference format: repository name must be lowercase",
            "repository name must be lowercase",
        )
    m = REFERENCE.fullmatch(f"{domain}/{rest}")
    if m is None:
        raise ReferenceError("invalid reference format", _diagnose(text))
    name, tag, digest = m.group(1), m.group(2) or "", m.group(3) or ""
    if len(name) > NAME_MAX:
        raise ReferenceError(
            f"repository name must not be more than {NAME_MAX} characters",
            f"the repository name {name[:40]}... has {len(name)} characters, "
            f"at most {NAME_MAX} are allowed",
        )
    parts = NAME.fullmatch(name)
    if parts is None or parts.group(1) != domain:
        # Docker would take e.g. `my_registry.com/app` for a path without a domain and
        # fail later, at the pull: say so now.
        raise ReferenceError(
            "invalid reference format",
            _bad_registry(domain),
        )
    if digest:
        check_digest(digest)
    return Reference(domain, parts.group(2), tag, digest)


def repository(text: str) -> str:
    """The familiar repository of a reference, for matching: no tag, no digest.
    `docker.io/library/alpine:3@sha256:..` -> `alpine`; raises ReferenceError."""
    return parse(text).familiar_name()
