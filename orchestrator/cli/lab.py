"""`shoal lab ...`: the one-machine lab, of network namespaces or VMs (orchestrator/lab/)."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Callable

from orchestrator.cli.client import CliError
from orchestrator.lab import daemons, demo, engines, faults, registry, vmdemo
from orchestrator.lab import lab as labmod
from orchestrator.lab.record import NETNS, VM, LabError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "lab",
        help="a cluster of network namespaces on this machine",
        description="Build and use a lab of nodes sw1..swN as network namespaces "
        "on one underlay bridge (192.168.56.0/24 by default). With the container executor (the "
        "default), every node runs its own Docker engine, reachable from the host with "
        "`docker -H unix:///run/shoal/lab/<lab>/<node>/docker.sock` (`shoal lab ls` prints "
        "each), and the lab has a registry on its gateway, <gateway>:5000, seeded with "
        "busybox, alpine, micro and gianarb/micro built from this machine's busybox-static.",
    )
    lab_sub = p.add_subparsers(dest="lab_command", metavar="COMMAND", required=True)

    def named(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument(
            "--name",
            default=labmod.DEFAULT_LAB,
            help=f"lab name, the prefix of everything it makes (default {labmod.DEFAULT_LAB})",
        )
        return sp

    up = named(lab_sub.add_parser("up", help="create or resize the lab (idempotent)"))
    up.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    up.add_argument(
        "--subnet",
        type=ipaddress.IPv4Network,
        default=labmod.DEFAULT_SUBNET,
        help=f"underlay subnet (default {labmod.DEFAULT_SUBNET})",
    )
    up.add_argument(
        "--executor",
        choices=labmod.EXECUTORS,
        default=None,
        help="how shoald runs tasks: container (the default): as containers of a dockerd per "
        "node, images from the lab's registry at <gateway>:5000; native: as this machine's "
        "programs in namespaces (docs/native-executor.md), no engine, no registry",
    )
    up.add_argument(
        "--vm",
        action="store_true",
        help="nodes are QEMU VMs running Debian's kernel (IPVS, ESP), not namespaces; they "
        "have no engine and run the native executor",
    )
    up.add_argument(
        "--no-daemons",
        action="store_true",
        help="start no shoald, no engine and no registry in the nodes or VMs (for driving "
        "shoal-mesh by hand)",
    )
    up.set_defaults(func=cmd_up)

    env = named(
        lab_sub.add_parser(
            "env",
            help="print the DOCKER_HOST line for a node's shoald (or its engine)",
            description="Print the DOCKER_HOST line for a node's shoald, or with --engine for "
            "the node's own Docker engine (container executor), as `shoal lab ls` shows it.",
        )
    )
    env.add_argument("node", metavar="NODE", help="sw1, sw2, ...")
    env.add_argument(
        "--engine",
        action="store_true",
        help="the node's container engine rather than its shoald (to build, pull and push)",
    )
    env.set_defaults(func=cmd_env)

    down = named(
        lab_sub.add_parser(
            "down",
            help="remove the lab and everything it made (but the registry's images: --purge)",
        )
    )
    down.add_argument(
        "--purge",
        action="store_true",
        help="also remove the lab's registry storage (/var/lib/shoal/lab/<lab>/registry), "
        "which otherwise keeps the images pushed to it for the next `lab up`",
    )
    down.set_defaults(func=cmd_down)
    demo_p = named(lab_sub.add_parser("demo", help="show the routing mesh at work, step by step"))
    demo_p.add_argument(
        "--vm", action="store_true", help="in VMs on Debian's kernel: the port balanced by IPVS"
    )
    demo_p.set_defaults(func=cmd_demo)
    lab_sub.add_parser("ls", help="list labs and their nodes").set_defaults(func=cmd_ls)

    kill = named(
        lab_sub.add_parser(
            "kill",
            help="crash a node: SIGKILL its shoald, engine and containers, without warning",
        )
    )
    kill.add_argument("nodes", nargs="+", metavar="NODE")
    kill.set_defaults(func=cmd_kill)
    start = named(lab_sub.add_parser("start", help="start a killed node's engine and shoald again"))
    start.add_argument("nodes", nargs="+", metavar="NODE")
    start.set_defaults(func=cmd_start)
    part = named(
        lab_sub.add_parser(
            "partition",
            help="cut nodes off from the others (or from --from), both ways",
            usage="shoal lab partition [--name LAB] NODE... [--from NODE...]",
        )
    )
    part.add_argument("nodes", nargs="+", metavar="NODE")
    part.add_argument("--from", dest="from_nodes", nargs="+", metavar="NODE", default=None)
    part.set_defaults(func=cmd_partition)
    named(lab_sub.add_parser("heal", help="remove every partition")).set_defaults(func=cmd_heal)

    ex = named(
        lab_sub.add_parser(
            "exec",
            help="run a command inside a node",
            usage="shoal lab exec [--name LAB] NODE -- CMD [ARG...]",
        )
    )
    ex.add_argument(
        "node", metavar="NODE", help="sw1, sw2, ... (a VM lab also has `host`, its outside)"
    )
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="CMD")
    ex.set_defaults(func=cmd_exec)
    for command in lab_sub.choices.values():
        command.set_defaults(func=_cli_errors(command.get_default("func")))


def _cli_errors(
    func: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """func, its LabError a CliError: printed as the CLI's errors are, by main.py, which so
    imports no lab code for the other commands."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except LabError as e:
            raise CliError(str(e)) from e

    return run


def _require(name: str) -> labmod.Lab:
    lab = labmod.load(name)
    if lab is None:
        raise LabError(f"no lab named {name}; create it with `shoal lab up --name {name}`")
    return lab


def cmd_up(args: argparse.Namespace) -> int:
    if args.vm and args.executor == "container":
        raise LabError(
            "VM labs run the native executor (their nodes have no engine); drop "
            "--executor container, or drop --vm for a namespace lab with engines"
        )
    lab = labmod.up(
        args.name, args.nodes, args.subnet, args.executor, kind=VM if args.vm else NETNS
    )
    if not args.no_daemons:
        daemons.start_all(lab)
    for line in labmod.backend(lab).describe(lab, daemons=not args.no_daemons):
        print(line)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    existed = labmod.load(args.name) is not None
    if not labmod.down(args.name, purge=args.purge):
        print(f"no lab named {args.name}; nothing to do")
        return 0
    kept = labmod.DATA_DIR / args.name
    if not existed:  # --purge of what an earlier `down` kept
        print(f"lab {args.name}'s registry storage removed")
        return 0
    if kept.exists():
        print(f"lab {args.name} removed; its registry's images are kept in {kept} (--purge)")
    else:
        print(f"lab {args.name} removed")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    labs = labmod.all_labs()
    if not labs:
        print("no labs; create one with `shoal lab up --nodes 3`")
        return 0
    print(f"{'LAB':10} {'NODE':6} {'ADDRESS':16} {'NETNS':16} {'PROCESSES':9} ENGINE")
    for lab in labs:
        for n in lab.nodes:
            pids = labmod.running(lab, n.name)
            engine = engines.socket_url(lab, n.name) if lab.containers else "-"
            print(f"{lab.name:10} {n.name:6} {n.address:16} {n.netns:16} {len(pids):<9} {engine}")
        if lab.containers:
            state = "running" if registry.is_running(lab) else "not running"
            print(f"{lab.name:10} registry {registry.address(lab)} ({state})")
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    lab = _require(args.name)
    for node in args.nodes:
        pids = faults.kill(labmod.load(args.name) or lab, node)
        print(f"{node}: killed {', '.join(map(str, pids))}" if pids else f"{node}: not running")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    lab = _require(args.name)
    for node in args.nodes:
        faults.start(labmod.load(args.name) or lab, node)
    for node in args.nodes:
        daemons.wait_ready(_require(args.name), node)
        print(f"{node}: shoald running")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    lab = _require(args.name)
    faults.partition(lab, args.nodes, args.from_nodes)
    others = args.from_nodes or [n.name for n in lab.nodes if n.name not in args.nodes]
    print(f"cut {' '.join(args.nodes)} off from {' '.join(others)} (`shoal lab heal` undoes)")
    return 0


def cmd_heal(args: argparse.Namespace) -> int:
    faults.heal(_require(args.name))
    print("every partition removed")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return vmdemo.run(args.name) if args.vm else demo.run(args.name)


def cmd_env(args: argparse.Namespace) -> int:
    lab = _require(args.name)
    # LabError where this machine cannot reach the node's shoald (a VM lab's)
    labmod.backend(lab).host_socket(lab, args.node)
    if args.engine:
        if not lab.containers:
            raise LabError(
                f"lab {lab.name}'s nodes have no container engine (it runs the native "
                "executor); make it with `shoal lab up --executor container`"
            )
        print(f"export DOCKER_HOST={engines.socket_url(lab, args.node)}")
        print(f"# run this command to point docker at {args.node}'s own engine:")
        print(f"# eval $(shoal lab env --engine {args.node})")
        return 0
    print(f"export DOCKER_HOST={daemons.docker_host(lab, args.node)}")
    print(f"# run this command to point docker and shoal at {args.node}:")
    print(f"# eval $(shoal lab env {args.node})")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    lab = _require(args.name)
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    return labmod.backend(lab).exec_interactive(lab, args.node, argv)
