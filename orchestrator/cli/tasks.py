"""Printing tasks as `service ps` / `node ps` do."""

from __future__ import annotations

import re
from typing import Any

from orchestrator.cli.client import NotFound
from orchestrator.cli.output import ago, image_name, short, table


def natural(text: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def print_tasks(client: Any, tasks: list[dict[str, Any]], quiet: bool, fmt: str | None) -> None:
    if quiet:
        for t in tasks:
            print(t["ID"])
        return
    services: dict[str, str] = {}
    nodes: dict[str, str] = {}

    def service_name(sid: str) -> str:
        if sid not in services:
            try:
                services[sid] = client.inspect_service(sid)["Spec"]["Name"]
            except NotFound:  # a removed service: show its ID, as docker does
                services[sid] = sid
        return services[sid]

    def node_name(nid: str) -> str:
        if not nid:
            return ""
        if nid not in nodes:
            try:
                n = client.inspect_node(nid)
                nodes[nid] = n["Spec"].get("Name") or n["Description"]["Hostname"]
            except NotFound:  # a removed node: its ID, as docker does
                nodes[nid] = nid
        return nodes[nid]

    def name(t: dict[str, Any]) -> str:
        return f"{service_name(t['ServiceID'])}.{t.get('Slot') or t.get('NodeID', '')}"

    ordered = sorted(tasks, key=lambda t: (natural(name(t)), _neg(t["CreatedAt"])))
    rows = []
    last = None
    for t in ordered:
        n = name(t)
        shown = n if n != last else f" \\_ {n}"
        last = n
        status = t["Status"]
        err = status.get("Err", "")
        rows.append(
            [
                short(t["ID"]),
                shown,
                image_name(t["Spec"]["ContainerSpec"]["Image"]),
                node_name(t.get("NodeID", "")),
                t["DesiredState"].capitalize(),
                f"{status['State'].capitalize()} {ago(status['Timestamp']).lower()}",
                f'"{err}"' if err else "",
                ports(status),
            ]
        )
    table(
        ["ID", "NAME", "IMAGE", "NODE", "DESIRED STATE", "CURRENT STATE", "ERROR", "PORTS"],
        rows,
        fmt,
        ordered,
    )


def ports(status: dict[str, Any]) -> str:
    """The host-mode ports a task holds, as docker's PORTS column shows them."""
    return ",".join(
        f"*:{p.get('PublishedPort', 0)}->{p.get('TargetPort', 0)}/{p.get('Protocol', 'tcp')}"
        for p in (status.get("PortStatus") or {}).get("Ports") or []
    )


def _neg(created: str) -> list[int]:
    return [-ord(c) for c in created]
