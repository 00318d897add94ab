"""A linearizability checker for key-value histories, after Porcupine (anishathalye/porcupine).

A history is a list of `Operation`s, each with the time its client called it and the time the
answer came back. The history is linearizable if every operation can be given a single point
between its call and return such that, in the order of those points, each operation's result is
what a single-copy key-value register would have answered.

The search is Wing & Gong's, with Lowe's memoization (never revisit a set of linearized
operations that led to the same state), over one key at a time (P-compositionality: a history
is linearizable iff its restriction to every key is). An operation whose outcome the client
never learnt (`ret=None`: a write that timed out, or whose server crashed) is given an infinite
return time, so it may take effect at any point after its call, or never visibly.

Operations: `put(key, value)` returns None; `get(key)` returns the value (None if unset);
`cas(key, expected, new)` returns True and sets the value if it equals `expected`, else False.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field


class CheckBudgetExceeded(RuntimeError):
    """The search took more steps than allowed: neither proved nor refuted."""


@dataclass(frozen=True)
class Operation:
    client: int
    call: float
    ret: float | None  # None: outcome unknown (the call may or may not have taken effect)
    kind: str  # "put" | "get" | "cas"
    key: str
    value: str | None = None  # put: the value; cas: the new value
    expected: str | None = None  # cas: the value it must find
    output: object = None  # get: the value read; cas: True/False; put: None

    def __post_init__(self) -> None:
        if self.kind not in ("put", "get", "cas"):
            raise ValueError(f"unknown operation {self.kind!r}")
        if self.ret is None and self.kind == "get":
            raise ValueError("a read without an answer tells nothing: leave it out")


def _step(state: str | None, op: Operation) -> tuple[bool, str | None]:
    """Can `op` take effect on a register holding `state`, and what does it leave?"""
    if op.kind == "put":
        return True, op.value
    if op.kind == "get":
        return op.output == state, state
    if state == op.expected:
        return op.ret is None or op.output is True, op.value
    return op.ret is None or op.output is False, state


@dataclass(eq=False)
class _Node:
    op: Operation | None
    id: int
    match: _Node | None = None  # a call's return node; None for return nodes
    prev: _Node | None = None
    next: _Node | None = None


@dataclass
class Result:
    ok: bool
    key: str | None = None  # the first key found not linearizable
    ops: list[Operation] = field(default_factory=list)  # that key's history

    def __bool__(self) -> bool:
        return self.ok


def _build(ops: list[Operation]) -> _Node:
    events: list[tuple[float, int, int]] = []  # (time, 0 for call / 1 for return, op id)
    for i, op in enumerate(ops):
        ret = math.inf if op.ret is None else op.ret
        if ret < op.call:
            raise ValueError(f"operation returns before it is called: {op}")
        events.append((op.call, 0, i))
        events.append((ret, 1, i))
    # At equal times a return sorts first: strictly before means "happened before".
    events.sort(key=lambda e: (e[0], -e[1]))
    head = _Node(None, -1)
    calls: dict[int, _Node] = {}
    tail = head
    for _, kind, i in events:
        node = _Node(ops[i], i)
        if kind == 0:
            calls[i] = node
        else:
            calls[i].match = node
        tail.next, node.prev = node, tail
        tail = node
    return head


def _lift(n: _Node) -> None:
    assert n.prev is not None and n.match is not None
    n.prev.next = n.next
    if n.next is not None:
        n.next.prev = n.prev
    m = n.match
    assert m.prev is not None
    m.prev.next = m.next
    if m.next is not None:
        m.next.prev = m.prev


def _unlift(n: _Node) -> None:
    m = n.match
    assert m is not None and m.prev is not None and n.prev is not None
    m.prev.next = m
    if m.next is not None:
        m.next.prev = m
    n.prev.next = n
    if n.next is not None:
        n.next.prev = n


def check_key(ops: list[Operation], max_steps: int = 2_000_000) -> bool:
    """Is this single-key history linearizable?"""
    head = _build(ops)
    state: str | None = None
    linearized = 0
    seen: set[tuple[int, str | None]] = set()
    stack: list[tuple[_Node, str | None]] = []
    entry = head.next
    steps = 0
    while head.next is not None:
        steps += 1
        if steps > max_steps:
            raise CheckBudgetExceeded(f"gave up after {max_steps} steps")
        assert entry is not None
        if entry.match is not None:  # a call: try to linearize it here
            assert entry.op is not None
            ok, new_state = _step(state, entry.op)
            if ok:
                bits = linearized | (1 << entry.id)
                if (bits, new_state) not in seen:
                    seen.add((bits, new_state))
                    stack.append((entry, state))
                    state, linearized = new_state, bits
                    _lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
        else:  # a return whose call is not linearized yet: backtrack
            if not stack:
                return False
            entry, state = stack.pop()
            linearized &= ~(1 << entry.id)
            _unlift(entry)
            entry = entry.next
    return True


def check(ops: list[Operation], max_steps: int = 2_000_000) -> Result:
    """Check a whole key-value history, key by key."""
    by_key: dict[str, list[Operation]] = defaultdict(list)
    for op in ops:
        by_key[op.key].append(op)
    for key in sorted(by_key):
        if not check_key(by_key[key], max_steps):
            return Result(False, key, by_key[key])
    return Result(True)
