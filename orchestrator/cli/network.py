"""`shoal network create | ls | inspect | rm`."""

from __future__ import annotations

import argparse
from typing import Any

from orchestrator.cli.client import CliError, connect
from orchestrator.cli.output import pretty_json, short, table


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("network", help="manage overlay networks")
    s = p.add_subparsers(dest="network_command", metavar="COMMAND", required=True)
    c = s.add_parser("create", help="create an overlay network")
    c.add_argument("-d", "--driver", default="overlay")
    c.add_argument("--subnet", default=None)
    c.add_argument("-o", "--opt", action="append", default=[], metavar="KEY[=VALUE]")
    c.add_argument("--attachable", action="store_true")
    c.add_argument("name", metavar="NAME")
    c.set_defaults(func=cmd_create)
    ls = s.add_parser("ls", help="list networks")
    ls.add_argument("-q", "--quiet", action="store_true")
    ls.add_argument("--format", default=None)
    ls.set_defaults(func=cmd_ls)
    ins = s.add_parser("inspect", help="show networks in detail")
    ins.add_argument("networks", nargs="+", metavar="NETWORK")
    ins.set_defaults(func=cmd_inspect)
    rm = s.add_parser("rm", help="remove networks")
    rm.add_argument("networks", nargs="+", metavar="NETWORK")
    rm.set_defaults(func=cmd_rm)


def cmd_create(args: argparse.Namespace) -> int:
    client = connect(args.host)
    if args.driver != "overlay":
        raise CliError(f"driver {args.driver!r} is not supported; use -d overlay")
    options = {}
    for opt in args.opt:
        key, _, value = opt.partition("=")
        options[key] = value
    ipam: dict[str, Any] | None = None
    if args.subnet:
        ipam = {"Driver": "default", "Config": [{"Subnet": args.subnet}]}
    result = client.create_network(
        args.name,
        driver="overlay",
        options=options or None,
        ipam=ipam,
        attachable=args.attachable,
        scope="swarm",
    )
    print(result["Id"])
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    client = connect(args.host)
    nets = sorted(client.networks(), key=lambda n: n["Name"])
    if args.quiet:
        for n in nets:
            print(n["Id"])
        return 0
    rows = [[short(n["Id"]), n["Name"], n["Driver"], n["Scope"]] for n in nets]
    table(["NETWORK ID", "NAME", "DRIVER", "SCOPE"], rows, args.format, nets)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    client = connect(args.host)
    pretty_json([client.inspect_network(n) for n in args.networks])
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    client = connect(args.host)
    for n in args.networks:
        client.remove_network(n)
        print(n)
    return 0
