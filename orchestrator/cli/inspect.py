"""`shoal inspect ID...`: any object (task, service, node, network) by ID, name or prefix."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from orchestrator.cli.client import CliError, NotFound, connect
from orchestrator.cli.output import pretty_json


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("inspect", help="show any swarm object in detail")
    p.add_argument("objects", nargs="+", metavar="ID")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    client = connect(args.host)
    found = []
    lookups: list[Callable[[str], Any]] = [
        client.inspect_task,
        client.inspect_service,
        client.inspect_node,
        client.inspect_network,
    ]
    for ref in args.objects:
        for lookup in lookups:
            try:
                found.append(lookup(ref))
                break
            except NotFound:
                continue
        else:
            raise CliError(f"no such object: {ref}")
    pretty_json(found)
    return 0
