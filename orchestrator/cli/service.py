"""`shoal service create | ls | inspect | ps | scale | update | logs | rm`."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from typing import Any

import docker.errors

from orchestrator.cli.client import CliError, api_message, connect
from orchestrator.cli.output import image_name, pretty_json, short, table
from orchestrator.cli.tasks import print_tasks

CONVERGE_TIMEOUT = 300.0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("service", help="manage services")
    s = p.add_subparsers(dest="service_command", metavar="COMMAND", required=True)
    c = s.add_parser(
        "create",
        help="create a service",
        usage="shoal service create [OPTIONS] IMAGE [COMMAND] [ARG...]",
    )
    c.add_argument("--name", required=True)
    c.add_argument("--replicas", type=int, default=None)
    c.add_argument("--mode", choices=("replicated", "global"), default="replicated")
    c.add_argument(
        "-p", "--publish", action="append", default=[], metavar="[PUBLISHED:]TARGET[/PROTO]"
    )
    c.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--constraint", action="append", default=[], metavar="EXPR")
    c.add_argument("--network", action="append", default=[])
    c.add_argument("--endpoint-mode", choices=("vip", "dnsrr"), default="vip")
    c.add_argument("--restart-condition", choices=("any", "on-failure", "none"))
    c.add_argument("--restart-delay", type=float, help="seconds")
    c.add_argument("--restart-max-attempts", type=int)
    c.add_argument("--update-parallelism", type=int, help="tasks updated at once (0: all)")
    c.add_argument(
        "-d",
        "--detach",
        action="store_true",
        help="return at once instead of waiting for the tasks to run",
    )
    c.add_argument("image", metavar="IMAGE")
    c.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND")
    c.set_defaults(func=cmd_create)
    ls = s.add_parser("ls", help="list services")
    ls.add_argument("-q", "--quiet", action="store_true")
    ls.add_argument("--format", default=None)
    ls.set_defaults(func=cmd_ls)
    ins = s.add_parser("inspect", help="show services in detail")
    ins.add_argument("services", nargs="+", metavar="SERVICE")
    ins.set_defaults(func=cmd_inspect)
    ps = s.add_parser("ps", help="list a service's tasks")
    ps.add_argument("services", nargs="+", metavar="SERVICE")
    ps.add_argument("-q", "--quiet", action="store_true")
    ps.add_argument("--format", default=None)
    ps.set_defaults(func=cmd_ps)
    sc = s.add_parser("scale", help="set the number of replicas")
    sc.add_argument("pairs", nargs="+", metavar="SERVICE=REPLICAS")
    sc.add_argument("-d", "--detach", action="store_true")
    sc.set_defaults(func=cmd_scale)
    up = s.add_parser(
        "update",
        help="change a service (task changes roll out --update-parallelism at a time)",
        usage="shoal service update [OPTIONS] SERVICE",
    )
    up.add_argument("--image")
    up.add_argument("--args", help="the command's arguments, as one shell-quoted string")
    up.add_argument("--replicas", type=int)
    up.add_argument("--env-add", action="append", default=[], metavar="KEY=VALUE")
    up.add_argument("--env-rm", action="append", default=[], metavar="KEY")
    up.add_argument("--publish-add", action="append", default=[], metavar="[PUB:]TARGET[/PROTO]")
    up.add_argument("--publish-rm", action="append", default=[], metavar="TARGET[/PROTO]")
    up.add_argument("--constraint-add", action="append", default=[], metavar="EXPR")
    up.add_argument("--constraint-rm", action="append", default=[], metavar="EXPR")
    up.add_argument("--update-parallelism", type=int)
    up.add_argument(
        "--force", action="store_true", help="replace the tasks even if nothing changed"
    )
    up.add_argument("-d", "--detach", action="store_true")
    up.add_argument("service", metavar="SERVICE")
    up.set_defaults(func=cmd_update)
    lg = s.add_parser("logs", help="a service's logs")
    lg.add_argument("service", metavar="SERVICE")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("-t", "--timestamps", action="store_true")
    lg.add_argument("--tail", default="all")
    lg.set_defaults(func=cmd_logs)
    rm = s.add_parser("rm", help="remove services")
    rm.add_argument("services", nargs="+", metavar="SERVICE")
    rm.set_defaults(func=cmd_rm)


def parse_publish(text: str) -> dict[str, Any]:
    """[PUBLISHED:]TARGET[/tcp|udp], or the long form published=P,target=T,protocol=udp."""
    if "=" in text:
        fields = dict(part.split("=", 1) for part in text.split(","))
        published, target, proto = (
            fields.get("published", "0"),
            fields.get("target", ""),
            fields.get("protocol", "tcp"),
        )
    else:
        ports, _, proto = text.partition("/")
        proto = proto or "tcp"
        published, _, target = ports.rpartition(":")
        published = published or "0"
    if not target.isdigit() or not published.isdigit():
        raise CliError(f"invalid --publish {text!r}: expected [PUBLISHED:]TARGET[/tcp|udp]")
    if proto not in ("tcp", "udp"):
        raise CliError(f"invalid --publish {text!r}: protocol must be tcp or udp")
    port: dict[str, Any] = {"Protocol": proto, "TargetPort": int(target), "PublishMode": "ingress"}
    if int(published):
        port["PublishedPort"] = int(published)
    return port


def cmd_create(args: argparse.Namespace) -> int:
    client = connect(args.host)
    if args.mode == "global" and args.replicas is not None:
        raise CliError("replicas can only be used with replicated mode")
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    container: dict[str, Any] = {"Image": args.image}
    if cmd:
        container["Args"] = cmd
    if args.env:
        container["Env"] = args.env
    template: dict[str, Any] = {"ContainerSpec": container}
    if args.constraint:
        template["Placement"] = {"Constraints": args.constraint}
    restart: dict[str, Any] = {}
    if args.restart_condition:
        restart["Condition"] = args.restart_condition
    if args.restart_delay is not None:
        restart["Delay"] = int(args.restart_delay * 1e9)
    if args.restart_max_attempts is not None:
        restart["MaxAttempts"] = args.restart_max_attempts
    if restart:
        template["RestartPolicy"] = restart
    if args.network:
        template["Networks"] = [{"Target": n} for n in args.network]
    update_config = (
        {"Parallelism": args.update_parallelism} if args.update_parallelism is not None else None
    )
    mode = (
        {"Global": {}}
        if args.mode == "global"
        else {"Replicated": {"Replicas": 1 if args.replicas is None else args.replicas}}
    )
    endpoint: dict[str, Any] = {"Mode": args.endpoint_mode}
    ports = [parse_publish(p) for p in args.publish]
    if ports:
        endpoint["Ports"] = ports
    result = client.create_service(
        template, name=args.name, mode=mode, endpoint_spec=endpoint, update_config=update_config
    )
    service_id = result["ID"]
    print(service_id)
    if not args.detach:
        converge(client, service_id)
    return 0


def converge(client: Any, service_id: str) -> None:
    """Wait until every wanted task runs, showing progress (the docker CLI's loop)."""
    tty = sys.stdout.isatty()
    deadline = time.monotonic() + CONVERGE_TIMEOUT
    last = ""
    while True:
        svc = client.inspect_service(service_id)
        nodes = {n["ID"]: n for n in client.nodes()}
        tasks = [
            t
            for t in client.tasks(filters={"service": service_id, "_up-to-date": "true"})
            if t["DesiredState"] == "running"
        ]
        mode = svc["Spec"]["Mode"]
        if "Replicated" in mode:
            wanted = mode["Replicated"].get("Replicas", 1)
        else:
            wanted = sum(
                1
                for n in nodes.values()
                if n["Status"]["State"] == "ready" and n["Spec"]["Availability"] == "active"
            )
        running = sum(
            1
            for t in tasks
            if t["Status"]["State"] == "running"
            and nodes.get(t.get("NodeID", ""), {}).get("Status", {}).get("State") != "down"
        )
        errors = sorted({t["Status"]["Err"] for t in tasks if t["Status"].get("Err")})
        line = f"overall progress: {running} out of {wanted} tasks"
        if errors:
            line += f" ({errors[-1]})"
        if line != last:
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            last = line
        if running >= wanted:
            print(("\n" if tty else "") + f"verify: Service {service_id} converged")
            return
        if time.monotonic() > deadline:
            print()
            raise CliError(
                f"service {service_id} did not converge in {CONVERGE_TIMEOUT:.0f} s "
                f"({running}/{wanted} running); see `shoal service ps {service_id}`"
            )
        time.sleep(0.2)


def cmd_ls(args: argparse.Namespace) -> int:
    client = connect(args.host)
    services = client.services(status=True)
    if args.quiet:
        for s in services:
            print(s["ID"])
        return 0
    rows = []
    for s in sorted(services, key=lambda s: s["Spec"]["Name"]):
        mode = "global" if "Global" in s["Spec"]["Mode"] else "replicated"
        st = s.get("ServiceStatus", {})
        ports = ", ".join(
            f"*:{p['PublishedPort']}->{p['TargetPort']}/{p['Protocol']}"
            for p in s.get("Endpoint", {}).get("Ports", [])
            if p.get("PublishMode") == "ingress"
        )
        rows.append(
            [
                short(s["ID"]),
                s["Spec"]["Name"],
                mode,
                f"{st.get('RunningTasks', 0)}/{st.get('DesiredTasks', 0)}",
                image_name(s["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]),
                ports,
            ]
        )
    table(["ID", "NAME", "MODE", "REPLICAS", "IMAGE", "PORTS"], rows, args.format, services)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    client = connect(args.host)
    pretty_json([client.inspect_service(s) for s in args.services])
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    client = connect(args.host)
    tasks = []
    for ref in args.services:
        svc = client.inspect_service(ref)
        tasks += client.tasks(filters={"service": svc["ID"]})
    print_tasks(client, tasks, args.quiet, args.format)
    return 0


def _push(client: Any, svc: dict[str, Any], spec: dict[str, Any]) -> None:
    """Send a changed spec, as of the version read (a concurrent change is refused)."""
    client.update_service(
        svc["ID"],
        svc["Version"]["Index"],
        task_template=spec["TaskTemplate"],
        name=spec["Name"],
        labels=spec.get("Labels"),
        mode=spec["Mode"],
        update_config=spec.get("UpdateConfig"),
        endpoint_spec=spec.get("EndpointSpec"),
        fetch_current_spec=False,
    )


def cmd_scale(args: argparse.Namespace) -> int:
    client = connect(args.host)
    failed = False
    for pair in args.pairs:
        name, _, count = pair.partition("=")
        if not name or not count.lstrip("-").isdigit():
            raise CliError(f"invalid scale specifier {pair!r}: use SERVICE=REPLICAS")
        try:
            svc = client.inspect_service(name)
            if "Replicated" not in svc["Spec"]["Mode"]:
                raise CliError(f"scale can only be used with replicated mode ({name} is global)")
            spec = svc["Spec"]
            spec["Mode"] = {"Replicated": {"Replicas": int(count)}}
            _push(client, svc, spec)
            print(f"{name} scaled to {count}")
            if not args.detach:
                converge(client, svc["ID"])
        except docker.errors.APIError as e:
            print(f"shoal: {name}: {api_message(e)}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


def _updated_spec(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """The service's spec with the command line's changes applied (docker's semantics)."""
    template = spec["TaskTemplate"]
    container = template["ContainerSpec"]
    if args.image:
        container["Image"] = args.image
    if args.args is not None:
        container["Args"] = shlex.split(args.args)
    if args.env_add or args.env_rm:
        added = {e.split("=", 1)[0] for e in args.env_add}
        gone = set(args.env_rm) | added
        env = [e for e in container.get("Env") or [] if e.split("=", 1)[0] not in gone]
        container["Env"] = env + args.env_add
    if args.constraint_add or args.constraint_rm:
        placement = template.setdefault("Placement", {})
        kept = [c for c in placement.get("Constraints") or [] if c not in args.constraint_rm]
        placement["Constraints"] = kept + [c for c in args.constraint_add if c not in kept]
    if args.replicas is not None:
        if "Replicated" not in spec["Mode"]:
            raise CliError("replicas can only be used with replicated mode")
        spec["Mode"] = {"Replicated": {"Replicas": args.replicas}}
    if args.publish_add or args.publish_rm:
        endpoint = spec.setdefault("EndpointSpec", {})
        ports = endpoint.get("Ports") or []
        for text in args.publish_rm:
            target, _, proto = text.partition("/")
            if not target.isdigit():
                raise CliError(f"invalid --publish-rm {text!r}: expected TARGET[/tcp|udp]")
            ports = [
                p
                for p in ports
                if not (p["TargetPort"] == int(target) and p["Protocol"] == (proto or "tcp"))
            ]
        endpoint["Ports"] = ports + [parse_publish(p) for p in args.publish_add]
    if args.update_parallelism is not None:
        spec.setdefault("UpdateConfig", {})["Parallelism"] = args.update_parallelism
    if args.force:
        template["ForceUpdate"] = int(template.get("ForceUpdate") or 0) + 1
    return spec


def cmd_update(args: argparse.Namespace) -> int:
    client = connect(args.host)
    svc = client.inspect_service(args.service)
    spec = _updated_spec(args, svc["Spec"])
    _push(client, svc, spec)
    print(args.service)
    if not args.detach:
        converge(client, svc["ID"])
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    client = connect(args.host)
    svc = client.inspect_service(args.service)
    tail: int | str = int(args.tail) if str(args.tail).isdigit() else "all"
    names: dict[str, str] = {}
    nodes: dict[str, str] = {}
    for chunk in client.service_logs(
        svc["ID"],
        details=True,
        follow=args.follow,
        stdout=True,
        stderr=True,
        timestamps=args.timestamps,
        tail=tail,
    ):
        text = chunk.decode(errors="replace") if isinstance(chunk, bytes) else str(chunk)
        for line in text.splitlines(keepends=True):
            print(_pretty_log(client, svc, line, args.timestamps, names, nodes), end="", flush=True)
    return 0


def _pretty_log(
    client: Any,
    svc: dict[str, Any],
    line: str,
    timestamps: bool,
    names: dict[str, str],
    nodes: dict[str, str],
) -> str:
    ts = ""
    if timestamps:
        ts, _, line = line.partition(" ")
        ts += " "
    details, _, message = line.partition(" ")
    attrs = dict(kv.split("=", 1) for kv in details.split(",") if "=" in kv)
    tid, nid = attrs.get("com.docker.swarm.task.id", ""), attrs.get("com.docker.swarm.node.id", "")
    if tid not in names:
        try:
            task = client.inspect_task(tid)
            names[tid] = f"{svc['Spec']['Name']}.{task.get('Slot') or nid}.{short(tid)}"
        except docker.errors.APIError:
            names[tid] = short(tid)
    if nid not in nodes:
        try:
            nodes[nid] = client.inspect_node(nid)["Description"]["Hostname"]
        except docker.errors.APIError:
            nodes[nid] = short(nid)
    return f"{ts}{names[tid]}@{nodes[nid]}    | {message}"


def cmd_rm(args: argparse.Namespace) -> int:
    client = connect(args.host)
    failed = False
    for ref in args.services:
        try:
            client.remove_service(ref)
            print(ref)
        except docker.errors.APIError as e:
            print(f"shoal: {api_message(e)}", file=sys.stderr)
            failed = True
    return 1 if failed else 0
