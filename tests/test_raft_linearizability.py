"""The linearizability checker itself, on histories known to be (or not be) linearizable."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.raft.linearizability import CheckBudgetExceeded, Operation, check, check_key


def put(c: int, call: float, ret: float | None, value: str, key: str = "x") -> Operation:
    return Operation(c, call, ret, "put", key, value)


def get(c: int, call: float, ret: float, out: str | None, key: str = "x") -> Operation:
    return Operation(c, call, ret, "get", key, output=out)


def cas(
    c: int, call: float, ret: float | None, exp: str | None, new: str, ok: bool | None
) -> Operation:
    return Operation(c, call, ret, "cas", "x", new, exp, ok)


# Porcupine's register examples (test "TestRegisterModel"), with "0" as the initial None.
def test_concurrent_reads_around_a_write() -> None:
    assert check([put(0, 0, 100, "100"), get(1, 25, 75, "100"), get(2, 30, 60, None)])


def test_read_of_an_older_value_after_a_newer_read_completed() -> None:
    assert not check([put(0, 0, 100, "200"), get(1, 10, 30, "200"), get(2, 40, 90, None)])


def test_stale_read_after_a_completed_write() -> None:
    h = [put(0, 0, 1, "1"), put(0, 2, 3, "2"), get(1, 4, 5, "1")]
    res = check(h)
    assert not res and res.key == "x"


def test_read_of_a_value_never_written() -> None:
    assert not check([put(0, 0, 1, "1"), get(1, 2, 3, "7")])


def test_unknown_write_may_take_effect_late_or_never() -> None:
    assert check([put(0, 0, None, "1"), get(1, 5, 6, None), get(1, 7, 8, "1")])
    assert check([put(0, 0, None, "1"), get(1, 5, 6, None)])


def test_unknown_write_cannot_take_effect_twice() -> None:
    h = [put(0, 0, None, "1"), get(1, 5, 6, "1"), put(2, 7, 8, "2"), get(1, 9, 10, "1")]
    assert not check(h)


def test_write_cannot_take_effect_before_it_is_called() -> None:
    assert not check([get(1, 0, 1, "1"), put(0, 2, 3, "1")])


def test_compare_and_set() -> None:
    assert check([put(0, 0, 1, "a"), cas(1, 2, 3, "a", "b", True), get(2, 4, 5, "b")])
    assert not check([put(0, 0, 1, "a"), cas(1, 2, 3, "a", "b", False), get(2, 4, 5, "a")])
    assert not check([put(0, 0, 1, "a"), cas(1, 2, 3, "z", "b", True)])
    # Two concurrent CASes from the same value: only one may win.
    assert not check(
        [put(0, 0, 1, "a"), cas(1, 2, 5, "a", "b", True), cas(2, 2, 5, "a", "c", True)]
    )
    assert check([put(0, 0, 1, "a"), cas(1, 2, 5, "a", "b", True), cas(2, 2, 5, "a", "c", False)])
    # An unknown CAS succeeds or fails depending on the state it meets.
    assert check([put(0, 0, 1, "a"), cas(1, 2, None, "a", "b", None), get(2, 9, 10, "b")])
    assert check([put(0, 0, 1, "a"), cas(1, 2, None, "a", "b", None), get(2, 9, 10, "a")])


def test_keys_are_independent_and_each_is_checked() -> None:
    h = [put(0, 0, 1, "1", "a"), put(0, 0, 1, "1", "b"), get(1, 2, 3, "1", "a")]
    assert check(h)
    res = check([*h, get(1, 4, 5, None, "b")])
    assert not res and res.key == "b"


def test_search_budget() -> None:
    h = [put(c, 0, 100, str(c)) for c in range(14)] + [get(99, 101, 102, "nope")]
    with pytest.raises(CheckBudgetExceeded):
        check_key(h, max_steps=100)


def _sequential_history(rng: random.Random, n: int) -> list[Operation]:
    """Operations with random overlapping intervals around atomic points of a real register."""
    state: dict[str, str | None] = {"x": None, "y": None}
    ops = []
    t = 0.0
    for i in range(n):
        t += rng.random()
        key = rng.choice("xy")
        call = t - rng.random() * 3
        ret = t + rng.random() * 3
        kind = rng.choice(["put", "get", "cas"])
        if kind == "put":
            state[key] = f"v{i}"
            ops.append(Operation(i % 4, call, ret, "put", key, f"v{i}"))
        elif kind == "get":
            ops.append(Operation(i % 4, call, ret, "get", key, output=state[key]))
        else:
            exp = rng.choice([state[key], "nope"])
            ok = state[key] == exp
            if ok:
                state[key] = f"v{i}"
            ops.append(Operation(i % 4, call, ret, "cas", key, f"v{i}", exp, ok))
    return ops


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 40))
def test_histories_from_a_real_register_are_linearizable(seed: int, n: int) -> None:
    assert check(_sequential_history(random.Random(seed), n))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.integers(2, 40))
def test_a_read_of_a_lost_write_is_caught(seed: int, n: int) -> None:
    rng = random.Random(seed)
    ops = _sequential_history(rng, n)
    # Drop a completed put that someone read: the read now sees a value nobody wrote.
    read_values = {(o.key, o.output) for o in ops if o.kind == "get"}
    victims = [o for o in ops if o.kind == "put" and (o.key, o.value) in read_values]
    if not victims:
        return
    victim = rng.choice(victims)
    assert not check([o for o in ops if o is not victim])
