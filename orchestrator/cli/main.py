"""The `shoal` command: the swarm (through shoald's Docker-compatible API) and the lab."""

from __future__ import annotations

import argparse
import sys

import docker.errors
import requests

from orchestrator.cli import inspect, lab, network, node, service, swarm
from orchestrator.cli.client import CliError, api_message, host
from orchestrator.lab.lab import LabError


def build_parser() -> argparse.ArgumentParser:
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
    swarm.add_parser(sub)
    node.add_parser(sub)
    service.add_parser(sub)
    network.add_parser(sub)
    inspect.add_parser(sub)
    lab.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except docker.errors.APIError as e:
        print(f"Error response from daemon: {api_message(e)}", file=sys.stderr)
        return 1
    except (requests.exceptions.ConnectionError, docker.errors.DockerException) as e:
        print(
            f"shoal: cannot reach shoald at {host(args.host)} ({type(e).__name__}). Is "
            "shoald running? (set DOCKER_HOST or --host; in the lab: eval $(shoal lab env "
            "sw1))",
            file=sys.stderr,
        )
        return 1
    except (CliError, LabError) as e:
        print(f"shoal: {e}", file=sys.stderr)
        return 1
    except PermissionError as e:
        print(f"shoal: {e.strerror}: {e.filename or ''} (this needs root)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
