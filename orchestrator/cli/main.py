"""The `shoal` command: the swarm (through shoald's Docker-compatible API) and the lab."""

from __future__ import annotations

import argparse
import importlib
import sys

from orchestrator.cli.client import APIError, CliError

# A command's module is imported only when that command runs (or for help): the lab's pulls
# in netlink and the node daemon, the service's the manager's spec checks; `shoal node ls`
# needs neither.
COMMANDS = {
    name: f"orchestrator.cli.{name}"
    for name in ("swarm", "node", "service", "network", "inspect", "lab")
}


def _command(argv: list[str]) -> str | None:
    """The command argv names, if it names one (options before it skipped)."""
    rest = iter(argv)
    for arg in rest:
        if arg in ("-H", "--host"):
            next(rest, None)
        elif not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal", description="Swarm-mode orchestration with a kernel routing mesh."
    )
    parser.add_argument(
        "-H",
        "--host",
        default=None,
        help="shoald's socket (default: $DOCKER_HOST, else unix:///run/shoal/shoal.sock)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        if only is None or name == only:
            importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command(argv)).parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except APIError as e:
        print(f"Error response from daemon: {e.message}", file=sys.stderr)
        return 1
    except CliError as e:
        print(f"shoal: {e}", file=sys.stderr)
        return 1
    except PermissionError as e:
        print(f"shoal: {e.strerror}: {e.filename or ''} (this needs root)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
