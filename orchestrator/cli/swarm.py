"""`shoal swarm init | join | join-token | leave`."""

from __future__ import annotations

import argparse
from typing import Any

from orchestrator.cli.client import CliError, connect


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("swarm", help="manage the swarm")
    s = p.add_subparsers(dest="swarm_command", metavar="COMMAND", required=True)
    init = s.add_parser("init", help="make this node the first manager of a new swarm")
    init.add_argument("--listen-addr", default="0.0.0.0:2377", help="IP[:PORT] to listen on")
    init.add_argument("--advertise-addr", default="", help="IP[:PORT] other nodes reach us at")
    init.add_argument(
        "--dispatcher-heartbeat",
        type=float,
        default=0.0,
        help="seconds between heartbeats of nodes (default 5)",
    )
    init.set_defaults(func=cmd_init)
    join = s.add_parser("join", help="join a swarm as a worker or a manager")
    join.add_argument("--token", required=True)
    join.add_argument("--listen-addr", default="0.0.0.0:2377")
    join.add_argument("--advertise-addr", default="")
    join.add_argument("remote", metavar="HOST:PORT")
    join.set_defaults(func=cmd_join)
    tok = s.add_parser("join-token", help="show or rotate a join token")
    tok.add_argument("role", choices=("worker", "manager"))
    tok.add_argument("-q", "--quiet", action="store_true", help="only the token")
    tok.add_argument("--rotate", action="store_true", help="replace the token")
    tok.set_defaults(func=cmd_join_token)
    leave = s.add_parser("leave", help="leave the swarm")
    leave.add_argument(
        "-f",
        "--force",
        action="store_true",
        help="leave even as the last manager (its state is lost)",
    )
    leave.set_defaults(func=cmd_leave)


def cmd_init(args: argparse.Namespace) -> int:
    client = connect(args.host)
    listen = args.listen_addr if ":" in args.listen_addr else f"{args.listen_addr}:2377"
    advertise = args.advertise_addr or (
        listen.rsplit(":", 1)[0] if not listen.startswith("0.0.0.0") else ""
    )
    spec: dict[str, Any] = {}
    if args.dispatcher_heartbeat:
        spec["Dispatcher"] = {"HeartbeatPeriod": int(args.dispatcher_heartbeat * 1e9)}
    node_id = client.init_swarm(
        advertise_addr=advertise or None, listen_addr=listen, swarm_spec=spec or None
    )
    node = client.inspect_node(node_id)
    addr = node.get("ManagerStatus", {}).get("Addr", "")
    token = client.inspect_swarm()["JoinTokens"]["Worker"]
    print(f"Swarm initialized: current node ({node_id}) is now a manager.\n")
    print("To add a worker to this swarm, run the following command:\n")
    print(f"    shoal swarm join --token {token} {addr}\n")
    print(
        "To add a manager to this swarm, run 'shoal swarm join-token manager' and follow "
        "the instructions."
    )
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    client = connect(args.host)
    remote = args.remote if ":" in args.remote else f"{args.remote}:2377"
    client.join_swarm(
        [remote],
        args.token,
        listen_addr=args.listen_addr,
        advertise_addr=args.advertise_addr or None,
    )
    role = "manager" if client.info()["Swarm"].get("ControlAvailable") else "worker"
    print(f"This node joined a swarm as a {role}.")
    return 0


def cmd_join_token(args: argparse.Namespace) -> int:
    client = connect(args.host)
    swarm = client.inspect_swarm()
    if args.rotate:
        client.update_swarm(
            swarm["Version"]["Index"],
            swarm_spec=swarm["Spec"],
            rotate_worker_token=args.role == "worker",
            rotate_manager_token=args.role == "manager",
        )
        swarm = client.inspect_swarm()
        if not args.quiet:
            print(f"Successfully rotated {args.role} join token.\n")
    token = swarm["JoinTokens"]["Worker" if args.role == "worker" else "Manager"]
    if args.quiet:
        print(token)
        return 0
    info = client.info()
    me = client.inspect_node(info["Swarm"]["NodeID"])
    addr = me.get("ManagerStatus", {}).get("Addr", "")
    print(f"To add a {args.role} to this swarm, run the following command:\n")
    print(f"    shoal swarm join --token {token} {addr}\n")
    return 0


def cmd_leave(args: argparse.Namespace) -> int:
    client = connect(args.host)
    if not client.leave_swarm(force=args.force):
        raise CliError("leaving the swarm failed")
    print("Node left the swarm.")
    return 0
