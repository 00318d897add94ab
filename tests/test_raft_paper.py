"""The Raft paper's rules, one test per paragraph, ported from etcd-io/raft's raft_paper_test.go.

Section numbers refer to "In Search of an Understandable Consensus Algorithm" (Ongaro and
Ousterhout). Nodes run with pre-vote and check-quorum off: this is the paper's plain Raft.
"""

from __future__ import annotations

import random

import pytest

from orchestrator.raft.core import Config, Raft, StateRole, initial_state
from orchestrator.raft.messages import NONE, Entry, Message, MessageType
from orchestrator.raft.rafttest import (
    Network,
    drain,
    entries,
    make_leader,
    new_raft,
    read_messages,
)

APP, APP_RESP = MessageType.APP, MessageType.APP_RESP
VOTE, VOTE_RESP = MessageType.VOTE, MessageType.VOTE_RESP


def accept_and_reply(m: Message) -> Message:
    assert m.type is APP
    return Message(APP_RESP, m.frm, m.to, m.term, index=m.index + len(m.entries))


def commit_noop(r: Raft) -> None:
    """A new leader's empty entry gets acknowledged by every follower, and so committed."""
    assert r.is_leader
    for m in read_messages(r):
        if m.type is APP:
            r.step(accept_and_reply(m))
    drain(r)


def log_of(r: Raft) -> list[tuple[int, int]]:
    return [(e.index, e.term) for e in r.log.entries]


# §5.1: "If one server's current term is smaller than the other's, then it updates its current
# term to the larger value. If a candidate or leader discovers that its term is out of date, it
# immediately reverts to follower state."
@pytest.mark.parametrize("role", ["follower", "candidate", "leader"])
def test_update_term_from_message(role: str) -> None:
    r = new_raft(1, [1, 2, 3])
    if role == "candidate":
        r.campaign()
    elif role == "leader":
        make_leader(r)
    r.step(Message(APP, 1, 2, term=2))
    assert r.term == 2
    assert r.role is StateRole.FOLLOWER
    assert r.lead == 2


# §5.1: "If a server receives a request with a stale term number, it rejects the request."
def test_reject_stale_term_message() -> None:
    r = new_raft(1, [1, 2, 3], term=2)
    r.step(Message(APP, 1, 2, term=1, entries=(Entry(1, 1),)))
    r.step(Message(VOTE, 1, 3, term=1, index=5, log_term=1))
    assert r.term == 2 and r.log.last_index() == 0 and r.vote == NONE
    assert read_messages(r) == []


# §5.2: "When servers start up, they begin as followers."
def test_start_as_follower() -> None:
    assert new_raft(1, [1, 2, 3]).role is StateRole.FOLLOWER


# §5.2: "Leaders send periodic heartbeats to all followers to maintain their authority."
def test_leader_broadcasts_heartbeats() -> None:
    r = new_raft(1, [1, 2, 3], heartbeat_tick=1)
    make_leader(r)
    for i in range(10):
        r.propose(f"{i}".encode())
    read_messages(r)
    r.tick()
    msgs = sorted(read_messages(r), key=lambda m: m.to)
    assert [(m.type, m.to, m.term) for m in msgs] == [
        (MessageType.HEARTBEAT, 2, 1),
        (MessageType.HEARTBEAT, 3, 1),
    ]


# §5.2: "If a follower receives no communication over a period of time called the election
# timeout, then it ... begins an election": it increments its term, votes for itself and sends
# RequestVote to every other server. A candidate whose election times out starts another.
@pytest.mark.parametrize("role", ["follower", "candidate"])
def test_nonleader_starts_election(role: str) -> None:
    et = 10
    r = new_raft(1, [1, 2, 3], election_tick=et)
    if role == "follower":
        r.step(Message(MessageType.HEARTBEAT, 1, 2, term=1))
    else:
        r.campaign()
    read_messages(r)
    for _ in range(2 * et):
        r.tick()
    assert r.term == 2
    assert r.role is StateRole.CANDIDATE
    assert r.vote == 1
    msgs = sorted(read_messages(r), key=lambda m: m.to)
    assert [(m.type, m.to, m.term) for m in msgs] == [(VOTE, 2, 2), (VOTE, 3, 2)]


# §5.2: a candidate wins with votes from a majority, returns to follower when a majority
# refuses, and stays a candidate otherwise.
@pytest.mark.parametrize(
    ("size", "votes", "want"),
    [
        (1, {}, StateRole.LEADER),
        (3, {2: True, 3: True}, StateRole.LEADER),
        (3, {2: True}, StateRole.LEADER),
        (5, {2: True, 3: True, 4: True, 5: True}, StateRole.LEADER),
        (5, {2: True, 3: True, 4: True}, StateRole.LEADER),
        (5, {2: True, 3: True}, StateRole.LEADER),
        (3, {2: False, 3: False}, StateRole.FOLLOWER),
        (5, {2: False, 3: False, 4: False, 5: False}, StateRole.FOLLOWER),
        (5, {2: True, 3: False, 4: False, 5: False}, StateRole.FOLLOWER),
        (3, {}, StateRole.CANDIDATE),
        (5, {2: True}, StateRole.CANDIDATE),
        (5, {2: False, 3: False}, StateRole.CANDIDATE),
        (5, {}, StateRole.CANDIDATE),
    ],
)
def test_leader_election_in_one_round(size: int, votes: dict[int, bool], want: StateRole) -> None:
    r = new_raft(1, range(1, size + 1))
    r.campaign()
    for node, granted in votes.items():
        r.step(Message(VOTE_RESP, 1, node, term=r.term, reject=not granted))
    assert r.role is want
    assert r.term == 1


# §5.2: "Each server will vote for at most one candidate in a given term, on a first-come-first-
# served basis."
@pytest.mark.parametrize(
    ("vote", "candidate", "reject"),
    [(NONE, 2, False), (NONE, 3, False), (2, 2, False), (3, 3, False), (2, 3, True), (3, 2, True)],
)
def test_follower_votes_once_per_term(vote: int, candidate: int, reject: bool) -> None:
    r = new_raft(1, [1, 2, 3], term=1, vote=vote)
    r.step(Message(VOTE, 1, candidate, term=1))
    assert [(m.type, m.to, m.term, m.reject) for m in read_messages(r)] == [
        (VOTE_RESP, candidate, 1, reject)
    ]


# §5.2: "If the leader's term is at least as large as the candidate's current term, then the
# candidate recognizes the leader as legitimate and returns to follower state."
@pytest.mark.parametrize("term", [1, 2])
def test_candidate_falls_back(term: int) -> None:
    r = new_raft(1, [1, 2, 3])
    r.campaign()
    assert r.role is StateRole.CANDIDATE and r.term == 1
    r.step(Message(APP, 1, 2, term=term))
    assert (r.role, r.term, r.lead) == (StateRole.FOLLOWER, term, 2)


# §5.2: "Raft uses randomized election timeouts ... chosen randomly from a fixed interval."
@pytest.mark.parametrize("role", ["follower", "candidate"])
def test_election_timeout_randomized(role: str) -> None:
    et = 10
    seen: set[int] = set()
    for seed in range(50 * et):
        r = new_raft(1, [1, 2, 3], election_tick=et, seed=seed)
        if role == "candidate":
            r.campaign()
        start = r.term
        ticks = 0
        while r.term == start:
            r.tick()
            ticks += 1
        seen.add(ticks)
    assert seen == set(range(et, 2 * et))


# §5.2: "... in most cases only a single server will time out."
def test_election_timeouts_rarely_conflict() -> None:
    et, size, rounds = 10, 5, 1000
    rng = random.Random(7)
    conflicts = 0
    for _ in range(rounds):
        nodes = [
            Raft(
                Config(i, election_tick=et, pre_vote=False, check_quorum=False),
                random.Random(rng.getrandbits(32)),
                initial_state(set(range(1, size + 1))),
            )
            for i in range(1, size + 1)
        ]
        fired = 0
        while not fired:
            for r in nodes:
                r.tick()
                if r.role is StateRole.CANDIDATE:
                    fired += 1
        conflicts += fired > 1
    assert conflicts / rounds <= 0.3


# §5.3: the leader appends a proposal to its log and sends AppendEntries to every follower.
def test_leader_starts_replication() -> None:
    r = new_raft(1, [1, 2, 3])
    make_leader(r)
    commit_noop(r)
    li = r.log.last_index()
    r.propose(b"some data")
    assert r.log.last_index() == li + 1
    assert r.committed == li
    assert [(e.index, e.data) for e in r.log.unstable_entries()] == [(li + 1, b"some data")]
    msgs = sorted(read_messages(r), key=lambda m: m.to)
    want = (li + 1, 1, b"some data")
    assert [
        (
            m.type,
            m.to,
            m.index,
            m.log_term,
            m.commit,
            [(e.index, e.term, e.data) for e in m.entries],
        )
        for m in msgs
    ] == [(APP, 2, li, 1, li, [want]), (APP, 3, li, 1, li, [want])]


# §5.3: "A log entry is committed once the leader that created the entry has replicated it on a
# majority of the servers"; the leader then applies it and tells the followers.
def test_leader_commits_entry() -> None:
    r = new_raft(1, [1, 2, 3])
    make_leader(r)
    commit_noop(r)
    li = r.log.last_index()
    r.propose(b"some data")
    for m in read_messages(r):
        r.step(accept_and_reply(m))
    rds = drain(r)
    assert r.committed == li + 1
    assert [e.data for rd in rds for e in rd.committed_entries] == [b"some data"]
    msgs = sorted((m for rd in rds for m in rd.messages), key=lambda m: m.to)
    assert [(m.type, m.to, m.commit) for m in msgs] == [(APP, 2, li + 1), (APP, 3, li + 1)]


# §5.3: a leader commits once a majority (itself included) holds the entry.
@pytest.mark.parametrize(
    ("size", "acceptors", "acked"),
    [
        (1, set(), True),
        (3, set(), False),
        (3, {2}, True),
        (3, {2, 3}, True),
        (5, set(), False),
        (5, {2}, False),
        (5, {2, 3}, True),
        (5, {2, 3, 4}, True),
        (5, {2, 3, 4, 5}, True),
    ],
)
def test_leader_acknowledges_commit(size: int, acceptors: set[int], acked: bool) -> None:
    r = new_raft(1, range(1, size + 1))
    make_leader(r)
    commit_noop(r)
    li = r.log.last_index()
    r.propose(b"some data")
    for m in read_messages(r):
        if m.to in acceptors:
            r.step(accept_and_reply(m))
    drain(r)
    assert (r.committed > li) == acked


# §5.3: "This also commits all preceding entries in the leader's log, including entries created
# by previous leaders."
@pytest.mark.parametrize("log", [(), entries(2), entries(1, 2), entries(1)])
def test_leader_commits_preceding_entries(log: tuple[Entry, ...]) -> None:
    r = new_raft(1, [1, 2, 3], log=log, term=2)
    make_leader(r)
    r.propose(b"some data")
    for m in read_messages(r):
        r.step(accept_and_reply(m))
    got = [(e.index, e.term, e.data) for rd in drain(r) for e in rd.committed_entries]
    li = len(log)
    assert got == [(e.index, e.term, b"") for e in log] + [
        (li + 1, 3, b""),
        (li + 2, 3, b"some data"),
    ]


# §5.3: "Once a follower learns that a log entry is committed, it applies the entry."
@pytest.mark.parametrize(
    ("ents", "commit"),
    [
        ((Entry(1, 1, b"some data"),), 1),
        ((Entry(1, 1, b"some data"), Entry(1, 2, b"some data2")), 2),
        ((Entry(1, 1, b"some data2"), Entry(1, 2, b"some data")), 2),
        ((Entry(1, 1, b"some data"), Entry(1, 2, b"some data2")), 1),
    ],
)
def test_follower_commits_entry(ents: tuple[Entry, ...], commit: int) -> None:
    r = new_raft(1, [1, 2, 3])
    r.step(Message(APP, 1, 2, term=1, entries=ents, commit=commit))
    assert r.committed == commit
    applied = [e for rd in drain(r) for e in rd.committed_entries]
    assert applied == list(ents[:commit])


# §5.3 (and etcd's TestHandleMsgApp): a follower commits up to the leader's commit index, but
# only as far as the entries this message proved to match: later ones may be stale.
def test_follower_commits_only_what_the_append_proved() -> None:
    r = new_raft(1, [1, 2, 3], log=entries(1, 1, 1), term=1)
    r.step(Message(APP, 1, 2, term=2, log_term=1, index=1, commit=3))
    assert r.committed == 1
    r.step(Message(APP, 1, 2, term=2, log_term=1, index=1, entries=entries(2, start=2), commit=3))
    assert r.committed == 2 and [e.term for e in r.log.entries] == [1, 2]


# §5.3: the AppendEntries consistency check: "If the follower does not find an entry in its log
# with the same index and term, then it refuses the new entries." The refusal carries a hint.
@pytest.mark.parametrize(
    ("log_term", "index", "w_index", "w_reject", "w_hint", "w_hint_term"),
    [
        (0, 0, 1, False, 0, 0),  # before our commit index: we answer with it
        (1, 1, 1, False, 0, 0),  # matches a committed entry
        (2, 2, 2, False, 0, 0),  # matches an uncommitted entry
        (1, 2, 2, True, 1, 1),  # a different term at index 2
        (3, 3, 3, True, 2, 2),  # we have no index 3
    ],
)
def test_follower_checks_append(
    log_term: int, index: int, w_index: int, w_reject: bool, w_hint: int, w_hint_term: int
) -> None:
    r = new_raft(1, [1, 2, 3], log=entries(1, 2), commit=1)
    r.step(Message(APP, 1, 2, term=2, log_term=log_term, index=index))
    (m,) = read_messages(r)
    assert (m.type, m.to, m.term, m.index, m.reject, m.reject_hint, m.log_term) == (
        APP_RESP,
        2,
        2,
        w_index,
        w_reject,
        w_hint,
        w_hint_term,
    )


# §5.3: "If an existing entry conflicts with a new one (same index but different terms), delete
# the existing entry and all that follow it; append any new entries not already in the log."
@pytest.mark.parametrize(
    ("index", "log_term", "ents", "want", "want_unstable"),
    [
        (2, 2, entries(3, start=3), [1, 2, 3], [3]),
        (1, 1, entries(3, 4, start=2), [1, 3, 4], [3, 4]),
        (0, 0, entries(1), [1, 2], []),
        (0, 0, entries(3), [3], [3]),
    ],
)
def test_follower_appends_entries(
    index: int, log_term: int, ents: tuple[Entry, ...], want: list[int], want_unstable: list[int]
) -> None:
    r = new_raft(1, [1, 2, 3], log=entries(1, 2))
    r.step(Message(APP, 1, 2, term=2, log_term=log_term, index=index, entries=ents))
    assert [e.term for e in r.log.entries] == want
    assert [e.term for e in r.log.unstable_entries()] == want_unstable


# §5.3, figure 7: "the leader handles inconsistencies by forcing the followers' logs to
# duplicate its own": whatever a follower's log (a-f), it ends equal to the leader's.
FIGURE_7_LEADER = (1, 1, 1, 4, 4, 5, 5, 6, 6, 6)
FIGURE_7_FOLLOWERS = {
    "a": (1, 1, 1, 4, 4, 5, 5, 6, 6),
    "b": (1, 1, 1, 4),
    "c": (1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6),
    "d": (1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7),
    "e": (1, 1, 1, 4, 4, 4, 4),
    "f": (1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3),
}


@pytest.mark.parametrize("case", sorted(FIGURE_7_FOLLOWERS))
def test_leader_syncs_follower_log_figure_7(case: str) -> None:
    term = 8
    lead = new_raft(
        1, [1, 2, 3], log=entries(*FIGURE_7_LEADER), term=term, commit=len(FIGURE_7_LEADER)
    )
    follower = new_raft(2, [1, 2, 3], log=entries(*FIGURE_7_FOLLOWERS[case]), term=term - 1)
    # Node 3 is a black hole; the follower may refuse its vote (d has a newer log than the
    # leader's last term would allow), so node 3's vote is what elects the leader.
    net = Network.of(lead, follower)
    net.campaign(1)
    net.send(Message(VOTE_RESP, 1, 3, term=term + 1))
    assert lead.is_leader
    net.propose(1, b"")
    assert log_of(follower) == log_of(lead)
    assert follower.committed == lead.committed == lead.log.last_index()


# §5.4.1: "the RequestVote RPC includes information about the candidate's log".
@pytest.mark.parametrize(("ents", "w_term"), [(entries(1), 2), (entries(1, 2), 3)])
def test_vote_request_carries_last_entry(ents: tuple[Entry, ...], w_term: int) -> None:
    et = 10
    r = new_raft(1, [1, 2, 3], election_tick=et)
    r.step(Message(APP, 1, 2, term=w_term - 1, entries=ents))
    read_messages(r)
    for _ in range(2 * et):
        r.tick()
    msgs = sorted(read_messages(r), key=lambda m: m.to)
    last = ents[-1]
    assert [(m.type, m.to, m.term, m.index, m.log_term) for m in msgs] == [
        (VOTE, 2, w_term, last.index, last.term),
        (VOTE, 3, w_term, last.index, last.term),
    ]


# §5.4.1: "The voter denies its vote if its own log is more up-to-date than that of the
# candidate": later last term wins; with the same last term, the longer log wins.
@pytest.mark.parametrize(
    ("log", "log_term", "index", "reject"),
    [
        (entries(1), 1, 1, False),
        (entries(1), 1, 2, False),
        (entries(1, 1), 1, 1, True),
        (entries(1), 2, 1, False),
        (entries(1), 2, 2, False),
        (entries(1, 1), 2, 1, False),
        (entries(2), 1, 1, True),
        (entries(2), 1, 2, True),
        (entries(2, 1), 1, 1, True),
    ],
)
def test_voter_up_to_date_rule(
    log: tuple[Entry, ...], log_term: int, index: int, reject: bool
) -> None:
    r = new_raft(1, [1, 2, 3], log=log)
    r.step(Message(VOTE, 1, 2, term=3, log_term=log_term, index=index))
    (m,) = read_messages(r)
    assert m.type is VOTE_RESP and m.reject == reject


# §5.4.2: "Raft never commits log entries from previous terms by counting replicas. Only log
# entries from the leader's current term are committed by counting replicas."
@pytest.mark.parametrize(("index", "w_commit"), [(1, 0), (2, 0), (3, 3)])
def test_leader_only_commits_current_term_by_counting(index: int, w_commit: int) -> None:
    r = new_raft(1, [1, 2, 3], log=entries(1, 2), term=2)
    make_leader(r)  # term 3, with an empty entry at index 3
    r.propose(b"")
    read_messages(r)
    r.step(Message(APP_RESP, 1, 2, term=r.term, index=index))
    drain(r)
    assert r.committed == w_commit


# §5.4.2, figure 8, played out on five servers. S1 leads term 2 and gets index 2 onto S2 only;
# S5 leads term 3 with its own index 2 (on no one else). S1 comes back as leader of term 4 and
# brings its term-2 entry to a majority: it must NOT count that as committed, because S5 can
# still be elected (S2, S3, S4 vote for it: its last term, 3, beats their 2) and overwrite it.
def _figure_8(split: bool) -> tuple[Network, dict[int, Raft]]:
    def node(i: int, log: tuple[Entry, ...]) -> Raft:
        # One entry per append (max_size_per_msg=1), so the old entry and the new leader's
        # empty entry travel separately, as they may in real life.
        return new_raft(i, range(1, 6), log=log, term=3, commit=1, max_size_per_msg=1)

    nodes = {
        1: node(1, entries(1, 2)),
        2: node(2, entries(1, 2)),
        3: node(3, entries(1)),
        4: node(4, entries(1)),
        5: node(5, entries(1, 3)),
    }
    net = Network.of(*nodes.values())
    net.down.add(5)  # (c): S5 has crashed; S1 is elected in term 4 by S2, S3, S4
    if split:
        # S1's own term-4 entries reach nobody; its older entries do.
        def strip(m: Message) -> Message | None:
            if m.type is APP and m.frm == 1:
                return Message(
                    m.type,
                    m.to,
                    m.frm,
                    m.term,
                    m.log_term,
                    m.index,
                    tuple(e for e in m.entries if e.term < 4),
                    m.commit,
                )
            return m

        net.transform = strip
    net.campaign(1)
    assert nodes[1].is_leader and nodes[1].term == 4
    return net, nodes


def test_figure_8_old_term_entry_on_a_majority_is_not_committed() -> None:
    net, nodes = _figure_8(split=True)
    net.tick(1, 3)  # heartbeats: everyone catches up on the term-2 entry, not on term 4's
    assert [n.log.term(2) for n in nodes.values()] == [2, 2, 2, 2, 3]
    assert all(n.committed == 1 for n in nodes.values()), "committed an old-term entry"
    # (d): S1 crashes; S5 comes back, wins term 5 and overwrites index 2 everywhere.
    net.down = {1}
    net.transform = None
    net.campaign(5)  # term 4: S2-S4 already voted for S1
    net.campaign(5)  # term 5
    assert nodes[5].is_leader
    net.propose(5, b"x")
    for i in (2, 3, 4, 5):
        assert nodes[i].log.term(2) == 3
        assert nodes[i].committed == nodes[5].log.last_index()


def test_figure_8_current_term_entry_commits_both() -> None:
    net, nodes = _figure_8(split=False)
    net.propose(1, b"x")  # (e): S1's term-4 entries reach a majority: index 2 commits too
    assert nodes[1].committed == nodes[1].log.last_index() == 4
    net.down = {1}
    for _ in range(3):  # S5 cannot win any more: a majority holds newer entries than it
        net.nodes[5].campaign()
        net.down.discard(5)
        net.flush(5)
        assert not nodes[5].is_leader
    assert all(n.log.term(2) == 2 for i, n in nodes.items() if i != 5)
