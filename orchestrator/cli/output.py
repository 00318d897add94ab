"""Printing like the docker CLI: aligned tables, `-q`, `--format json|table|COL,COL`."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from orchestrator.store.ids import parse_rfc3339


def table(
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    fmt: str | None = None,
    raw: Sequence[Any] | None = None,
) -> None:
    """Print rows under docker-style headers (3 spaces between columns).

    fmt: None/"table" for the table, "json" for one JSON object per line (the raw objects),
    or a comma-separated list of column names to print only those (with their headers).
    """
    if fmt == "json":
        for obj in raw if raw is not None else [dict(zip(columns, r, strict=True)) for r in rows]:
            print(json.dumps(obj))
        return
    cols = list(range(len(columns)))
    if fmt and fmt != "table":
        wanted = [c.strip().upper().replace("_", " ") for c in fmt.split(",")]
        unknown = [w for w in wanted if w not in [c.upper() for c in columns]]
        if unknown:
            raise SystemExit(
                f"shoal: unknown --format column(s) {', '.join(unknown)}; "
                f"choose from {', '.join(columns)} or use json"
            )
        cols = [[c.upper() for c in columns].index(w) for w in wanted]
    widths = [max([len(columns[i])] + [len(r[i]) for r in rows]) for i in cols]
    print(_line([columns[i] for i in cols], widths))
    for r in rows:
        print(_line([r[i] for i in cols], widths))


def _line(cells: list[str], widths: list[int]) -> str:
    return "   ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def short(obj_id: str) -> str:
    return obj_id[:12]


def ago(timestamp: str, now: float | None = None) -> str:
    """`5 seconds ago`, like docker's HumanDuration."""
    if not timestamp:
        return ""
    secs = (time.time() if now is None else now) - parse_rfc3339(timestamp)
    return f"{human_duration(secs)} ago"


def human_duration(secs: float) -> str:
    s = int(secs)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = s // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(s / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    return f"{hours // 24} days"


def image_name(image: str) -> str:
    return image.split("@", 1)[0]


def pretty_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=4)
    print()
