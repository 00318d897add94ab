"""The docker SDK as the CLI's client, pointed at shoald."""

from __future__ import annotations

import os
from typing import Any

import docker
import docker.errors

DEFAULT_HOST = "unix:///run/shoal/shoal.sock"


class CliError(RuntimeError):
    """Printed as `shoal: <message>`, exit status 1."""


def host(explicit: str | None) -> str:
    return explicit or os.environ.get("DOCKER_HOST") or DEFAULT_HOST


def connect(explicit: str | None) -> Any:
    url = host(explicit)
    try:
        return docker.APIClient(base_url=url, version="auto", timeout=120)
    except docker.errors.DockerException as e:
        raise CliError(
            f"cannot connect to shoald at {url}: {_reason(e)}. Is shoald running? "
            "(set DOCKER_HOST or --host; in the lab, eval $(shoal lab env sw1))"
        ) from None


def _reason(e: Exception) -> str:
    text = str(e)
    for marker in ("Connection refused", "No such file or directory", "Permission denied"):
        if marker in text:
            return marker
    return text


def api_message(e: docker.errors.APIError) -> str:
    explanation = e.explanation
    if isinstance(explanation, bytes):
        explanation = explanation.decode(errors="replace")
    return str(explanation or e)
