"""Go-template placeholders in a service's ContainerSpec, as swarmkit expands them per task.

Hostname, Env values and mount Sources may name the task they run as:
`--hostname "{{.Node.Hostname}}-{{.Task.Slot}}"`, `-e SLOT={{.Task.Slot}}`. Only the plain field
references below are understood (not Go's pipelines, functions or {{.Service.Labels}}); the
managers refuse anything else at create, so the agent's expansion cannot fail on a task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from orchestrator.manager.spec import SpecError


@dataclass(frozen=True)
class TemplateContext:
    service_id: str
    service_name: str
    node_id: str
    node_hostname: str
    task_id: str
    task_name: str
    task_slot: str  # the slot; for a global task, which has none, its node's ID (swarmkit's)
    os: str = "linux"
    arch: str = "x86_64"


FIELDS: Mapping[str, Callable[[TemplateContext], str]] = MappingProxyType(
    {
        ".Service.ID": lambda c: c.service_id,
        ".Service.Name": lambda c: c.service_name,
        ".Node.ID": lambda c: c.node_id,
        ".Node.Hostname": lambda c: c.node_hostname,
        ".Node.Platform.OS": lambda c: c.os,
        ".Node.Platform.Architecture": lambda c: c.arch,
        ".Task.ID": lambda c: c.task_id,
        ".Task.Name": lambda c: c.task_name,
        ".Task.Slot": lambda c: c.task_slot,
    }
)
GO_SPACE = " \t\r\n"  # what Go's template lexer skips inside an action
SHOWN = 60  # characters of a bad placeholder quoted back


def _pieces(text: str, where: str) -> list[tuple[str, Callable[[TemplateContext], str] | None]]:
    """The text split into literal runs (with None) and placeholders (with their field)."""
    out: list[tuple[str, Callable[[TemplateContext], str] | None]] = []
    pos = 0
    # str.find, not a regex: linear on any input (a lazy regex rescans from every '{{')
    while (start := text.find("{{", pos)) >= 0:
        end = text.find("}}", start + 2)
        if end < 0:
            raise SpecError(
                f"{where}: unclosed placeholder {text[start : start + SHOWN]!r}: write it as "
                "{{.Task.Slot}}, with '}}' closing every '{{'"
            )
        action = text[start : end + 2]
        field = FIELDS.get(action[2:-2].strip(GO_SPACE))
        if field is None:
            shown = action if len(action) <= SHOWN else action[:SHOWN] + "..."
            why = " (service labels are not supported)" if ".Service.Labels" in action else ""
            raise SpecError(
                f"{where}: unknown placeholder {shown}{why}; use "
                + ", ".join("{{" + f + "}}" for f in FIELDS)
            )
        out.append((text[pos:start], None))
        out.append((action, field))
        pos = end + 2
    out.append((text[pos:], None))
    return out


def check(text: str, where: str) -> None:
    """Raise SpecError, naming the field (`where`), unless every placeholder is known."""
    if "{{" in text:
        _pieces(text, where)


def expand(text: str, ctx: TemplateContext) -> str:
    """The text with its placeholders replaced by the task's values; raises SpecError on an
    unknown or malformed placeholder."""
    if "{{" not in text:
        return text
    return "".join(
        piece if field is None else field(ctx) for piece, field in _pieces(text, "template")
    )


# Stands in for any task where the managers check what a template expands to (a volume name).
EXAMPLE = TemplateContext(
    service_id="x",
    service_name="x",
    node_id="x",
    node_hostname="x",
    task_id="x",
    task_name="x",
    task_slot="1",
)
