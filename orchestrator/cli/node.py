"""`shoal node ls | inspect | ps | update | promote | demote | rm`."""

from __future__ import annotations

import argparse
from typing import Any

from orchestrator.cli.client import CliError, connect
from orchestrator.cli.output import pretty_json, table
from orchestrator.cli.tasks import print_tasks


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("node", help="manage the swarm's nodes")
    s = p.add_subparsers(dest="node_command", metavar="COMMAND", required=True)
    ls = s.add_parser("ls", help="list nodes")
    ls.add_argument("-q", "--quiet", action="store_true")
    ls.add_argument("--format", default=None, help="json, table, or columns: ID,HOSTNAME,...")
    ls.set_defaults(func=cmd_ls)
    ins = s.add_parser("inspect", help="show nodes in detail (self: this node)")
    ins.add_argument("nodes", nargs="+", metavar="NODE")
    ins.set_defaults(func=cmd_inspect)
    ps = s.add_parser("ps", help="list the tasks on nodes (default: this node)")
    ps.add_argument("nodes", nargs="*", metavar="NODE")
    ps.add_argument("-q", "--quiet", action="store_true")
    ps.add_argument("--format", default=None)
    ps.set_defaults(func=cmd_ps)
    up = s.add_parser("update", help="change a node's availability or labels")
    up.add_argument("--availability", choices=("active", "pause", "drain"))
    up.add_argument("--label-add", action="append", default=[], metavar="KEY=VALUE")
    up.add_argument("--label-rm", action="append", default=[], metavar="KEY")
    up.add_argument("--role", choices=("manager", "worker"))
    up.add_argument("node", metavar="NODE")
    up.set_defaults(func=cmd_update)
    pro = s.add_parser("promote", help="make nodes managers")
    pro.add_argument("nodes", nargs="+", metavar="NODE")
    pro.set_defaults(func=cmd_role, role="manager")
    de = s.add_parser("demote", help="make managers workers")
    de.add_argument("nodes", nargs="+", metavar="NODE")
    de.set_defaults(func=cmd_role, role="worker")
    rm = s.add_parser("rm", help="remove nodes from the swarm")
    rm.add_argument("-f", "--force", action="store_true", help="even if it is not down")
    rm.add_argument("nodes", nargs="+", metavar="NODE")
    rm.set_defaults(func=cmd_rm)


def _self(client: Any, ref: str) -> str:
    return str(client.info()["Swarm"]["NodeID"]) if ref == "self" else ref


def manager_status(node: dict[str, Any]) -> str:
    ms = node.get("ManagerStatus")
    if not ms:
        return ""
    return "Leader" if ms.get("Leader") else str(ms.get("Reachability", "")).capitalize()


def cmd_ls(args: argparse.Namespace) -> int:
    client = connect(args.host)
    nodes = sorted(client.nodes(), key=lambda n: (n["Description"]["Hostname"], n["ID"]))
    if args.quiet:
        for n in nodes:
            print(n["ID"])
        return 0
    me = client.info()["Swarm"]["NodeID"]
    rows = [
        [
            n["ID"] + (" *" if n["ID"] == me else ""),
            n["Description"]["Hostname"],
            n["Status"]["State"].capitalize(),
            n["Spec"]["Availability"].capitalize(),
            manager_status(n),
            n["Description"].get("Engine", {}).get("EngineVersion", ""),
        ]
        for n in nodes
    ]
    table(
        ["ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER STATUS", "ENGINE VERSION"],
        rows,
        args.format,
        nodes,
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    client = connect(args.host)
    pretty_json([client.inspect_node(_self(client, n)) for n in args.nodes])
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    client = connect(args.host)
    refs = [_self(client, n) for n in (args.nodes or ["self"])]
    tasks = [t for ref in refs for t in client.tasks(filters={"node": ref})]
    print_tasks(client, tasks, args.quiet, args.format)
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    client = connect(args.host)
    node = client.inspect_node(args.node)
    spec = dict(node["Spec"])
    labels = dict(spec.get("Labels") or {})
    for item in args.label_add:
        key, _, value = item.partition("=")
        if not key:
            raise CliError(f"invalid label {item!r}: use KEY=VALUE")
        labels[key] = value
    for key in args.label_rm:
        if key not in labels:
            raise CliError(f"key {key} doesn't exist in node's labels")
        del labels[key]
    spec["Labels"] = labels
    if args.availability:
        spec["Availability"] = args.availability
    if args.role:
        spec["Role"] = args.role
    client.update_node(node["ID"], node["Version"]["Index"], spec)
    print(args.node)
    return 0


def cmd_role(args: argparse.Namespace) -> int:
    client = connect(args.host)
    for ref in args.nodes:
        node = client.inspect_node(ref)
        spec = dict(node["Spec"])
        name = node["Description"]["Hostname"]
        if spec.get("Role") == args.role:
            print(f"Node {name} is already a {args.role} in the swarm.")
            continue
        spec["Role"] = args.role
        client.update_node(node["ID"], node["Version"]["Index"], spec)
        verb = "promoted to a manager" if args.role == "manager" else "demoted"
        print(f"Node {name} {verb} in the swarm.")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    client = connect(args.host)
    for ref in args.nodes:
        client.remove_node(ref, force=args.force)
        print(ref)
    return 0
