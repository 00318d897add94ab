"""Image references: Docker's grammar and normalisation (distribution/reference)."""

from __future__ import annotations

import time

import pytest

from orchestrator.images.reference import Reference, ReferenceError, parse, repository

DIGEST = "sha256:" + "0123456789abcdef" * 4

VALID = [
    # text, domain, path, tag, digest, familiar name
    ("alpine", "docker.io", "library/alpine", "", "", "alpine"),
    ("alpine:3.20", "docker.io", "library/alpine", "3.20", "", "alpine"),
    ("alpine:latest", "docker.io", "library/alpine", "latest", "", "alpine"),
    ("library/alpine", "docker.io", "library/alpine", "", "", "alpine"),
    ("docker.io/alpine", "docker.io", "library/alpine", "", "", "alpine"),
    ("docker.io/library/alpine:3", "docker.io", "library/alpine", "3", "", "alpine"),
    ("index.docker.io/library/alpine", "docker.io", "library/alpine", "", "", "alpine"),
    ("index.docker.io/alpine", "docker.io", "library/alpine", "", "", "alpine"),
    ("gianarb/micro", "docker.io", "gianarb/micro", "", "", "gianarb/micro"),
    ("gianarb/micro:1.2.0", "docker.io", "gianarb/micro", "1.2.0", "", "gianarb/micro"),
    (
        "library/distros/ubuntu",
        "docker.io",
        "library/distros/ubuntu",
        "",
        "",
        "library/distros/ubuntu",
    ),
    ("a/b/c/d", "docker.io", "a/b/c/d", "", "", "a/b/c/d"),
    ("192.168.56.1:5000/app", "192.168.56.1:5000", "app", "", "", "192.168.56.1:5000/app"),
    ("192.168.56.1:5000/app:v2", "192.168.56.1:5000", "app", "v2", "", "192.168.56.1:5000/app"),
    ("localhost:5000/app", "localhost:5000", "app", "", "", "localhost:5000/app"),
    ("localhost/app", "localhost", "app", "", "", "localhost/app"),
    ("localhost", "docker.io", "library/localhost", "", "", "localhost"),
    ("localhost:5000", "docker.io", "library/localhost", "5000", "", "localhost"),
    ("ghcr.io/org/team/app:1", "ghcr.io", "org/team/app", "1", "", "ghcr.io/org/team/app"),
    ("registry-1.example.com/x", "registry-1.example.com", "x", "", "", "registry-1.example.com/x"),
    ("[::1]:5000/app", "[::1]:5000", "app", "", "", "[::1]:5000/app"),
    ("Registry/app", "Registry", "app", "", "", "Registry/app"),  # uppercase: a domain
    ("a.b-c__d---e_f", "docker.io", "library/a.b-c__d---e_f", "", "", "a.b-c__d---e_f"),
    ("redis:7-Alpine_X.1", "docker.io", "library/redis", "7-Alpine_X.1", "", "redis"),
    (f"alpine@{DIGEST}", "docker.io", "library/alpine", "", DIGEST, "alpine"),
    (f"alpine:3@{DIGEST}", "docker.io", "library/alpine", "3", DIGEST, "alpine"),
    (f"localhost:5000/app@{DIGEST}", "localhost:5000", "app", "", DIGEST, "localhost:5000/app"),
    (
        "alpine@sha512:" + "ab" * 64,
        "docker.io",
        "library/alpine",
        "",
        "sha512:" + "ab" * 64,
        "alpine",
    ),
]

INVALID = [
    # text, str(error), part of the reason
    ("", "invalid reference format", "empty"),
    ("Alpine", "invalid reference format: repository name must be lowercase", "lowercase"),
    ("gianarb/Micro", "invalid reference format: repository name must be lowercase", "lowercase"),
    ("localhost:5000/App", "invalid reference format: repository name must be lowercase", ""),
    ("alpine:", "invalid reference format", "empty tag"),
    ("alpine:-x", "invalid reference format", "invalid tag '-x'"),
    ("alpine:.x", "invalid reference format", "invalid tag"),
    ("alpine:" + "x" * 129, "invalid reference format", "invalid tag"),
    ("alpine:a:b", "invalid reference format", ""),
    ("a..b", "invalid reference format", "component 'a..b'"),
    ("-a", "invalid reference format", "component '-a'"),
    ("a-", "invalid reference format", "component 'a-'"),
    ("a___b", "invalid reference format", "component"),
    ("a//b", "invalid reference format", "component ''"),
    ("a/", "invalid reference format", "component ''"),
    ("/a", "invalid reference format", ""),
    ("a b", "invalid reference format", "component 'a b'"),
    (" alpine", "invalid reference format", ""),
    ("alpine ", "invalid reference format", ""),
    ("alpine\n", "invalid reference format", ""),
    ("alpïne", "invalid reference format", ""),
    (":tag", "invalid reference format", ""),
    ("@" + DIGEST, "invalid reference format", ""),
    ("my_registry.com/app", "invalid reference format", "invalid registry 'my_registry.com'"),
    ("-bad.com/app", "invalid reference format", "invalid registry"),
    ("host.com:port/app", "invalid reference format", "invalid registry"),
    ("alpine@sha256:abc", "invalid reference format", "invalid digest"),
    ("alpine@" + DIGEST[:-1], "invalid checksum digest length", "64 hex digits"),
    ("alpine@sha256:" + "A" * 64, "invalid checksum digest format", "lowercase"),
    ("alpine@md5:" + "a" * 32, "unsupported digest algorithm", "sha256"),
    ("alpine@" + DIGEST + "@" + DIGEST, "invalid reference format", ""),
    ("a" * 64, "cannot specify 64-byte hexadecimal strings", "image ID"),
    ("x/" + "a" * 260, "repository name must not be more than 255 characters", "at most 255"),
]


@pytest.mark.parametrize(("text", "domain", "path", "tag", "digest", "familiar"), VALID)
def test_valid_references_normalise_like_docker(
    text: str, domain: str, path: str, tag: str, digest: str, familiar: str
) -> None:
    ref = parse(text)
    assert ref == Reference(domain, path, tag, digest)
    assert ref.name == f"{domain}/{path}"
    assert ref.familiar_name() == familiar
    assert repository(text) == familiar
    # the full form parses back to itself, and so does the familiar one
    assert parse(str(ref)) == ref
    suffix = (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    assert parse(familiar + suffix) == ref


@pytest.mark.parametrize(("text", "message", "reason"), INVALID)
def test_invalid_references_are_refused_with_dockers_message(
    text: str, message: str, reason: str
) -> None:
    with pytest.raises(ReferenceError) as err:
        parse(text)
    assert message in str(err.value)
    assert reason in err.value.reason
    assert isinstance(err.value, ValueError)


def test_strings_and_digests() -> None:
    assert str(parse("alpine")) == "docker.io/library/alpine"
    assert str(parse("alpine:latest")) == "docker.io/library/alpine:latest"
    assert str(parse(f"alpine@{DIGEST}")) == f"docker.io/library/alpine@{DIGEST}"
    assert str(parse(f"alpine:3@{DIGEST}")) == f"docker.io/library/alpine:3@{DIGEST}"
    pinned = parse("192.168.56.1:5000/app:v1").with_digest(DIGEST)
    assert str(pinned) == f"192.168.56.1:5000/app:v1@{DIGEST}"
    assert pinned.familiar_name() == "192.168.56.1:5000/app"
    with pytest.raises(ReferenceError, match="invalid checksum digest length"):
        parse("alpine").with_digest("sha256:abc")
    with pytest.raises(ReferenceError, match="unsupported digest algorithm"):
        parse("alpine").with_digest("md5:" + "a" * 32)
    assert repository(f"docker.io/library/alpine:3@{DIGEST}") == "alpine"
    assert repository("index.docker.io/gianarb/micro:1") == "gianarb/micro"


def test_hostile_input_is_refused_quickly() -> None:
    """No backtracking blow-up on long near-misses (specs allow 4096-character images)."""
    for text in [
        "a" * 5000 + "!",
        "a-" * 2500 + "!",
        "a." * 2500 + "/",
        ("a" * 60 + ".") * 70 + "/x!",
        "a" + "--a" * 1500 + ":!",
        "x@" + "a" * 5000,
        "[" + ":" * 5000,
        "a/" * 2000 + "a:" + "b" * 4000,
    ]:
        start = time.perf_counter()
        with pytest.raises(ReferenceError):
            parse(text)
        assert time.perf_counter() - start < 0.1, text[:20]
