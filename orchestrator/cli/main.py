"""The `shoal` command."""

from __future__ import annotations

import argparse
import sys

from orchestrator.cli import lab
from orchestrator.lab.lab import LabError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal", description="Swarm-mode orchestration with a kernel routing mesh."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    lab.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except LabError as e:
        print(f"shoal: {e}", file=sys.stderr)
        return 1
    except PermissionError as e:
        print(f"shoal: {e.strerror}: {e.filename or ''} (the lab needs root)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
