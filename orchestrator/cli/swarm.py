"""`shoal swarm init | join | join-token | update | ca | unlock | unlock-key | leave`."""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from typing import Any

from orchestrator.cli.client import CliError, connect

ROTATION_TIMEOUT = 300.0


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
    init.add_argument(
        "--cert-expiry", type=duration, default=None, help="node certificates' lifetime (90d)"
    )
    init.add_argument(
        "--autolock",
        action="store_true",
        help="managers need the unlock key after a restart (their Raft data is encrypted)",
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
    up = s.add_parser("update", help="change the swarm's settings")
    up.add_argument("--cert-expiry", type=duration, default=None, help="e.g. 2160h, 90d")
    up.add_argument("--dispatcher-heartbeat", type=float, default=None, help="seconds")
    up.add_argument(
        "--autolock", type=boolean, default=None, metavar="true|false", help="lock managers"
    )
    up.add_argument(
        "--network-key-rotation",
        type=duration,
        default=None,
        help="how often encrypted overlays get a new key (default 12h)",
    )
    up.set_defaults(func=cmd_update)
    unlock = s.add_parser(
        "unlock", help="unlock a locked manager (reads the unlock key from standard input)"
    )
    unlock.set_defaults(func=cmd_unlock)
    key = s.add_parser("unlock-key", help="show or rotate the unlock key")
    key.add_argument("-q", "--quiet", action="store_true", help="only the key")
    key.add_argument("--rotate", action="store_true", help="replace the key")
    key.set_defaults(func=cmd_unlock_key)
    ca = s.add_parser("ca", help="show the root CA, or rotate it")
    ca.add_argument("--rotate", action="store_true", help="a new root; every node is re-issued")
    ca.add_argument("--cert-expiry", type=duration, default=None)
    ca.add_argument("-d", "--detach", action="store_true", help="do not wait for the rotation")
    ca.add_argument("-q", "--quiet", action="store_true")
    ca.set_defaults(func=cmd_ca)
    leave = s.add_parser("leave", help="leave the swarm")
    leave.add_argument(
        "-f",
        "--force",
        action="store_true",
        help="leave even as the last manager (its state is lost)",
    )
    leave.set_defaults(func=cmd_leave)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> int:
    """A duration as Docker's flags take it (2160h, 90m, 1h30m, 90d) in nanoseconds."""
    total, number = 0.0, ""
    for ch in text.strip():
        if ch.isdigit() or ch == ".":
            number += ch
        elif ch in _UNITS and number:
            total += float(number) * _UNITS[ch]
            number = ""
        else:
            raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use e.g. 2160h or 90d")
    if number or total <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use e.g. 2160h or 90d")
    return int(total * 1e9)


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"want true or false, not {text!r}")


def _print_unlock_key(key: str) -> None:
    print(
        "To unlock a swarm manager after it restarts, run the `shoal swarm unlock`\n"
        "command and provide the following key:\n"
    )
    print(f"    {key}\n")
    print(
        "Please remember to store this key in a password manager, since without it you\n"
        "will not be able to restart the manager."
    )


def cmd_init(args: argparse.Namespace) -> int:
    client = connect(args.host)
    listen = args.listen_addr if ":" in args.listen_addr else f"{args.listen_addr}:2377"
    advertise = args.advertise_addr or (
        listen.rsplit(":", 1)[0] if not listen.startswith("0.0.0.0") else ""
    )
    spec: dict[str, Any] = {}
    if args.dispatcher_heartbeat:
        spec["Dispatcher"] = {"HeartbeatPeriod": int(args.dispatcher_heartbeat * 1e9)}
    if args.cert_expiry:
        spec["CAConfig"] = {"NodeCertExpiry": args.cert_expiry}
    if args.autolock:
        spec["EncryptionConfig"] = {"AutoLockManagers": True}
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
    if args.autolock:
        print()
        _print_unlock_key(client.get_unlock_key()["UnlockKey"])
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


def _update_spec(client: Any, change: Any) -> dict[str, Any]:
    swarm = client.inspect_swarm()
    spec = swarm["Spec"]
    change(spec)
    client.update_swarm(swarm["Version"]["Index"], swarm_spec=spec)
    result: dict[str, Any] = client.inspect_swarm()
    return result


def cmd_update(args: argparse.Namespace) -> int:
    client = connect(args.host)

    def change(spec: dict[str, Any]) -> None:
        if args.cert_expiry:
            spec.setdefault("CAConfig", {})["NodeCertExpiry"] = args.cert_expiry
        if args.dispatcher_heartbeat:
            spec.setdefault("Dispatcher", {})["HeartbeatPeriod"] = int(
                args.dispatcher_heartbeat * 1e9
            )
        encryption = spec.setdefault("EncryptionConfig", {})
        if args.autolock is not None:
            encryption["AutoLockManagers"] = args.autolock
        if args.network_key_rotation:
            encryption["NetworkKeyRotation"] = args.network_key_rotation

    _update_spec(client, change)
    print("Swarm updated.")
    if args.autolock:
        _print_unlock_key(client.get_unlock_key()["UnlockKey"])
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    client = connect(args.host)
    if sys.stdin.isatty():
        key = getpass.getpass("Please enter unlock key: ")
    else:
        key = sys.stdin.readline()
    if not key.strip():
        raise CliError("no unlock key given: type it, or pipe it into `shoal swarm unlock`")
    client.unlock_swarm(key.strip())
    return 0


def cmd_unlock_key(args: argparse.Namespace) -> int:
    client = connect(args.host)
    if args.rotate:
        swarm = client.inspect_swarm()
        if not (swarm["Spec"].get("EncryptionConfig") or {}).get("AutoLockManagers"):
            raise CliError(
                "no unlock key is set: turn autolock on with `shoal swarm update --autolock=true`"
            )
        client.update_swarm(
            swarm["Version"]["Index"], swarm_spec=swarm["Spec"], rotate_manager_unlock_key=True
        )
        if not args.quiet:
            print("Successfully rotated manager unlock key.\n")
    key = client.get_unlock_key()["UnlockKey"]
    if not key:
        raise CliError(
            "no unlock key is set: turn autolock on with `shoal swarm update --autolock=true`"
        )
    if args.quiet:
        print(key)
    else:
        _print_unlock_key(key)
    return 0


def cmd_ca(args: argparse.Namespace) -> int:
    client = connect(args.host)
    if not args.rotate and not args.cert_expiry:
        print(client.inspect_swarm()["TLSInfo"]["TrustRoot"], end="")
        return 0

    def change(spec: dict[str, Any]) -> None:
        ca = spec.setdefault("CAConfig", {})
        if args.cert_expiry:
            ca["NodeCertExpiry"] = args.cert_expiry
        if args.rotate:
            ca["ForceRotate"] = int(ca.get("ForceRotate") or 0) + 1

    swarm = _update_spec(client, change)
    if args.rotate and not args.detach:
        if not args.quiet:
            print("rotating the root CA: every node gets a certificate from the new root...")
        deadline = time.monotonic() + ROTATION_TIMEOUT
        while swarm.get("RootRotationInProgress"):
            if time.monotonic() > deadline:
                raise CliError(
                    "the root rotation has not finished: some nodes did not renew their "
                    "certificate (down nodes must come back or be removed); "
                    "`shoal swarm ca` shows the root once it is done"
                )
            time.sleep(0.5)
            swarm = client.inspect_swarm()
    if not args.quiet:
        print(swarm["TLSInfo"]["TrustRoot"], end="")
    return 0


def cmd_leave(args: argparse.Namespace) -> int:
    client = connect(args.host)
    client.leave_swarm(force=args.force)
    print("Node left the swarm.")
    return 0
