"""The Raft core beyond the paper: pre-vote, check-quorum, ReadIndex, snapshots, learners,
membership changes, leadership transfer, flow control, and the Ready/advance contract."""

from __future__ import annotations

import random

import pytest

from orchestrator.raft.core import (
    Config,
    NotLeader,
    ProposalDropped,
    Raft,
    StateRole,
    bootstrap,
)
from orchestrator.raft.messages import (
    ConfChange,
    ConfChangeType,
    Entry,
    EntryType,
    Message,
    MessageType,
    ReadState,
    StorageState,
)
from orchestrator.raft.progress import ProgressState
from orchestrator.raft.rafttest import Network, drain, entries, make_leader, new_raft, read_messages
from orchestrator.raft.storage import MemoryStorage

APP, APP_RESP = MessageType.APP, MessageType.APP_RESP
ET = 10


def cluster(n: int = 3, *, pre_vote: bool = False, check_quorum: bool = False) -> Network:
    """`n` nodes, 1 the leader; pre-vote and check-quorum off unless asked for (new_raft's)."""
    net = Network.of(
        *(
            new_raft(
                i, range(1, n + 1), election_tick=ET, pre_vote=pre_vote, check_quorum=check_quorum
            )
            for i in range(1, n + 1)
        )
    )
    net.campaign(1)
    assert net.nodes[1].is_leader
    return net


def read_states(r: Raft) -> list[ReadState]:
    return [rs for rd in drain(r) for rs in rd.read_states]


# ---------------------------------------------------------------------------- pre-vote


def test_prevote_keeps_a_partitioned_node_from_inflating_its_term() -> None:
    net = cluster(pre_vote=True)
    net.isolate(3)
    net.tick(3, 10 * ET)
    assert net.nodes[3].term == 1 and net.nodes[3].role is StateRole.PRE_CANDIDATE
    net.heal()
    net.tick(1, ET)  # heartbeats reach 3 again
    assert net.nodes[1].is_leader and net.nodes[1].term == 1
    assert (net.nodes[3].role, net.nodes[3].lead) == (StateRole.FOLLOWER, 1)


def test_without_prevote_a_rejoining_node_disrupts_the_leader() -> None:
    # The contrast that shows the test above tests something.
    net = cluster(pre_vote=False)
    net.isolate(3)
    net.tick(3, 10 * ET)
    assert net.nodes[3].term > 1
    net.heal()
    net.tick(3, 2 * ET)  # it campaigns again, at a term that deposes the leader
    assert net.nodes[1].term > 1


def test_prevote_is_refused_to_a_stale_log_and_changes_no_term() -> None:
    net = cluster(pre_vote=True)
    net.isolate(3)
    net.propose(1, b"x")
    net.heal()
    net.down.add(1)
    n2 = net.nodes[2]
    net.campaign(3)  # 3 lacks "x": 2 refuses its pre-vote
    assert not net.nodes[3].is_leader
    assert n2.term == 1 and n2.vote == 1
    net.campaign(2)
    assert n2.is_leader and n2.term == 2


# ---------------------------------------------------------------------------- check-quorum


def test_check_quorum_leader_steps_down_within_an_election_timeout() -> None:
    net = cluster(check_quorum=True)
    net.isolate(1)
    net.tick(1, ET)
    assert net.nodes[1].role is StateRole.FOLLOWER


def test_check_quorum_leader_keeps_leading_with_its_quorum() -> None:
    net = cluster(check_quorum=True)
    net.isolate(3)
    net.tick(1, 5 * ET)
    assert net.nodes[1].is_leader


def test_check_quorum_followers_ignore_votes_while_the_leader_is_alive() -> None:
    net = cluster(check_quorum=True, pre_vote=False)
    net.tick(1, 1)
    net.campaign(3)  # a disruptive node (say, one that just restarted)
    assert net.nodes[1].is_leader and net.nodes[1].term == 1
    assert net.nodes[2].term == 1 and net.nodes[2].vote == 1


def test_stale_leader_learns_the_new_term_from_any_follower() -> None:
    net = cluster(check_quorum=True, pre_vote=True)
    net.isolate(1)
    for _ in range(3 * ET):
        net.tick_all()
    new = next(r for r in net.nodes.values() if r.is_leader and r.id != 1)
    assert new.term > 1
    net.heal()
    net.nodes[1]._become_leader()  # as if its step-down had not happened yet
    net.tick(1, 1)  # its heartbeats get answered with the higher term
    assert not net.nodes[1].is_leader


# ---------------------------------------------------------------------------- ReadIndex


def test_read_index_on_leader_needs_a_heartbeat_quorum() -> None:
    net = cluster()
    leader = net.nodes[1]
    net.propose(1, b"x")
    net.isolate(1)
    leader.read_index(b"r1")
    net.flush(1)
    assert net.read_states.get(1, []) == []  # nobody confirmed we still lead
    net.heal()
    net.tick(1, 1)  # the next heartbeat carries the request; the acks confirm it
    assert net.read_states[1] == [ReadState(leader.committed, b"r1")]


def test_read_index_answers_the_commit_index_once_confirmed() -> None:
    net = cluster()
    leader = net.nodes[1]
    net.propose(1, b"x")
    leader.read_index(b"r1")
    msgs = read_messages(leader)
    beats = [m for m in msgs if m.type is MessageType.HEARTBEAT]
    assert {m.to for m in beats} == {2, 3} and all(m.context == b"r1" for m in beats)
    leader.step(Message(MessageType.HEARTBEAT_RESP, 1, 2, leader.term, context=b"r1"))
    assert read_states(leader) == [ReadState(leader.committed, b"r1")]


def test_read_index_waits_for_the_new_leader_to_commit_in_its_term() -> None:
    r = new_raft(1, [1, 2, 3], log=entries(1, 1), term=1, commit=1)
    make_leader(r)
    r.read_index(b"early")
    assert not any(m.type is MessageType.HEARTBEAT for m in read_messages(r))
    # The followers acknowledge the new leader's empty entry: it commits, the read goes out.
    r.step(Message(APP_RESP, 1, 2, r.term, index=r.log.last_index()))
    msgs = read_messages(r)
    beats = [m for m in msgs if m.type is MessageType.HEARTBEAT and m.context == b"early"]
    assert beats
    r.step(Message(MessageType.HEARTBEAT_RESP, 1, 2, r.term, context=b"early"))
    assert read_states(r) == [ReadState(3, b"early")]


def test_read_index_from_a_follower_goes_through_the_leader() -> None:
    net = cluster()
    net.propose(1, b"x")
    net.nodes[2].read_index(b"f1")
    net.flush(2)
    assert net.read_states[2] == [ReadState(net.nodes[1].committed, b"f1")]
    assert [m.to for m in net.delivered if m.type is MessageType.READ_INDEX_RESP] == [2]


def test_read_index_without_a_leader_fails_fast() -> None:
    r = new_raft(1, [1, 2, 3])
    with pytest.raises(NotLeader):
        r.read_index(b"x")


def test_single_node_read_index_is_immediate() -> None:
    r = new_raft(1, [1])
    r.campaign()
    drain(r)
    r.read_index(b"x")
    assert read_states(r) == [ReadState(r.committed, b"x")]


# ---------------------------------------------------------------------------- snapshots


def _compact_leader(net: Network, keep: int = 0) -> int:
    leader = net.nodes[1]
    drain(leader)
    idx = leader.applied
    leader.compact(idx, b"state@%d" % idx, keep=keep)
    return idx


def test_lagging_follower_gets_a_snapshot_and_catches_up() -> None:
    net = cluster()
    net.down.add(3)
    for i in range(5):
        net.propose(1, b"e%d" % i)
    idx = _compact_leader(net)
    assert net.nodes[1].log.offset == idx
    net.down.clear()
    snaps: list[Message] = []

    def spy(m: Message) -> Message | None:
        if m.type is MessageType.SNAP:
            snaps.append(m)
        return m

    net.transform = spy
    net.tick(1, 1)  # heartbeat -> response -> append needs compacted entries -> snapshot
    assert [m.to for m in snaps] == [3]
    f = net.nodes[3]
    assert f.log.offset == idx and f.committed >= idx
    assert net.nodes[1].prs[3].state is ProgressState.REPLICATE
    net.propose(1, b"after")
    assert f.log.last_index() == net.nodes[1].log.last_index()
    assert f.log.entry(f.log.last_index()).data == b"after"


def test_snapshot_ready_is_persisted_and_applied_before_later_entries() -> None:
    f = new_raft(2, [1, 2, 3])
    leader = new_raft(1, [1, 2, 3], log=entries(1, 1, 2), term=2, commit=3)
    drain(leader)
    snap = leader.compact(3, b"S3")
    f.step(Message(MessageType.SNAP, 2, 1, term=2, snapshot=snap))
    f.step(Message(APP, 2, 1, term=2, index=3, log_term=2, entries=(Entry(2, 4, b"e4"),), commit=4))
    rd = f.ready()
    assert rd.snapshot == snap
    assert [e.index for e in rd.entries] == [4]
    assert [e.index for e in rd.committed_entries] == [4]
    assert rd.hard_state is not None and rd.hard_state.commit == 4
    storage = MemoryStorage()
    storage.save_ready(rd)
    f.advance(rd)
    assert f.applied == 4
    st = storage.initial_state()
    assert st.snapshot == snap and [e.index for e in st.entries] == [4]


def test_follower_ignores_a_snapshot_it_has_committed_past() -> None:
    f = new_raft(2, [1, 2, 3], log=entries(1, 1, 1), term=1, commit=3)
    leader = new_raft(1, [1, 2, 3], log=entries(1, 1), term=1, commit=2)
    drain(leader)
    snap = leader.compact(2, b"old")
    f.step(Message(MessageType.SNAP, 2, 1, term=1, snapshot=snap))
    assert f.log.offset == 0 and f.log.last_index() == 3
    (m,) = read_messages(f)
    assert m.type is APP_RESP and m.index == 3


def test_lost_snapshot_is_sent_again() -> None:
    net = cluster()
    net.down.add(3)
    net.propose(1, b"x")
    _compact_leader(net)
    net.down.clear()
    net.drop_types.add(MessageType.SNAP)
    net.tick(1, 1)
    leader = net.nodes[1]
    assert leader.prs[3].state is ProgressState.SNAPSHOT
    net.drop_types.clear()
    net.tick(1, 3 * ET + 2)
    assert (leader.prs[3].state, net.nodes[3].log.last_index()) == (
        ProgressState.REPLICATE,
        leader.log.last_index(),
    )


def test_report_snapshot_failure_goes_back_to_probing() -> None:
    net = cluster()
    net.down.add(3)
    net.propose(1, b"x")
    _compact_leader(net)
    net.down.clear()
    net.drop_types.add(MessageType.SNAP)
    net.tick(1, 1)
    leader = net.nodes[1]
    leader.report_snapshot(3, ok=False)
    assert leader.prs[3].state is ProgressState.PROBE
    net.drop_types.clear()
    net.tick(1, 2)
    assert net.nodes[3].log.last_index() == leader.log.last_index()


def test_report_snapshot_success_probes_past_the_snapshot() -> None:
    """As etcd's ReportSnapshot(SnapshotFinish): the snapshot is on its way, so probe from
    after it, and wait (paused) for the follower's answer before sending more."""
    net = cluster()
    net.down.add(3)
    net.propose(1, b"x")
    idx = _compact_leader(net)
    net.down.clear()
    net.drop_types.add(MessageType.SNAP)  # the transport took it; the test keeps it from 3
    net.tick(1, 1)
    leader = net.nodes[1]
    pr = leader.prs[3]
    assert (pr.state, pr.pending_snapshot) == (ProgressState.SNAPSHOT, idx)
    leader.report_snapshot(3, ok=True)
    assert (pr.state, pr.next, pr.paused) == (ProgressState.PROBE, idx + 1, True)
    assert read_messages(leader) == []  # nothing until the follower answers
    # here it never got it: the probe after it is refused, and the snapshot sent again
    net.drop_types.clear()
    net.tick(1, 2)
    assert pr.state is ProgressState.REPLICATE
    assert net.nodes[3].log.last_index() == leader.log.last_index()


def test_report_snapshot_is_ignored_unless_a_snapshot_is_out() -> None:
    net = cluster()
    net.propose(1, b"x")
    leader = net.nodes[1]
    pr = leader.prs[2]
    assert pr.state is ProgressState.REPLICATE
    leader.report_snapshot(2, ok=False)
    leader.report_snapshot(2, ok=True)
    assert pr.state is ProgressState.REPLICATE and not pr.paused
    net.nodes[2].report_snapshot(1, ok=False)  # not a leader: nothing to do
    assert net.nodes[2].role is StateRole.FOLLOWER


def test_report_unreachable_stops_pipelining_to_a_replicating_follower() -> None:
    """As etcd's ReportUnreachable: appends in flight to that follower were likely lost, so
    go back to probing it, one append at a time from after what it acknowledged."""
    net = cluster()
    leader = net.nodes[1]
    net.propose(1, b"x")
    pr = leader.prs[2]
    assert pr.state is ProgressState.REPLICATE
    net.isolate(2)
    net.propose(1, b"y")  # in flight to 2, lost
    assert pr.next == leader.log.last_index() + 1 and pr.match < leader.log.last_index()
    leader.report_unreachable(2)
    assert (pr.state, pr.next) == (ProgressState.PROBE, pr.match + 1)
    net.heal()
    net.tick(1, 2)  # a heartbeat round: the probe finds where 2 is, then it is pipelined again
    assert pr.state is ProgressState.REPLICATE
    assert net.nodes[2].log.last_index() == leader.log.last_index()


def test_report_unreachable_leaves_probing_and_snapshotting_followers_alone() -> None:
    net = cluster()
    net.down.add(3)
    net.propose(1, b"x")
    _compact_leader(net)
    net.down.clear()
    net.drop_types.add(MessageType.SNAP)
    net.tick(1, 1)
    leader = net.nodes[1]
    assert leader.prs[3].state is ProgressState.SNAPSHOT
    leader.report_unreachable(3)
    assert leader.prs[3].state is ProgressState.SNAPSHOT
    leader.prs[2].become_probe()
    leader.prs[2].paused = True
    leader.report_unreachable(2)
    assert leader.prs[2].state is ProgressState.PROBE and leader.prs[2].paused
    net.nodes[2].report_unreachable(1)  # a follower tracks no progress
    assert net.nodes[2].role is StateRole.FOLLOWER


# ---------------------------------------------------------------------------- learners


def test_learner_never_campaigns() -> None:
    r = new_raft(3, [1, 2], learners=[3], election_tick=ET)
    for _ in range(10 * ET):
        r.tick()
    assert r.role is StateRole.FOLLOWER and r.term == 0
    assert read_messages(r) == []


def test_learner_gets_the_log_but_does_not_count_for_commit() -> None:
    nodes = [new_raft(i, [1, 2], learners=[3]) for i in (1, 2, 3)]
    net = Network.of(*nodes)
    net.campaign(1)
    net.down.add(2)
    net.propose(1, b"x")
    leader, learner = nodes[0], nodes[2]
    assert learner.log.last_index() == leader.log.last_index()
    assert leader.committed < leader.log.last_index()  # 1 of 2 voters is not a quorum
    net.down.clear()
    net.tick(1, 1)
    assert leader.committed == leader.log.last_index()


def test_learner_is_promoted_and_then_counts() -> None:
    nodes = [new_raft(i, [1, 2], learners=[3]) for i in (1, 2, 3)]
    net = Network.of(*nodes)
    net.campaign(1)
    net.flush(1)
    nodes[0].propose_conf_change(ConfChange(ConfChangeType.ADD_NODE, 3))
    net.flush(1)
    assert all(r.conf.voters == {1, 2, 3} for r in nodes)
    net.down.add(2)
    net.propose(1, b"x")
    assert nodes[0].committed == nodes[0].log.last_index()  # 1 and 3 are a quorum now


# ---------------------------------------------------------------------------- membership


def boot_cluster(voters: list[int], others: tuple[int, ...] = ()) -> Network:
    nodes = [
        Raft(Config(i, election_tick=ET), random.Random(i), bootstrap(voters)) for i in voters
    ] + [Raft(Config(i, election_tick=ET), random.Random(i), StorageState()) for i in others]
    net = Network.of(*nodes)
    net.campaign(voters[0])
    assert net.nodes[voters[0]].is_leader
    return net


def test_new_member_joins_as_learner_learns_the_membership_and_is_promoted() -> None:
    net = boot_cluster([1, 2, 3], (4,))
    leader, new = net.nodes[1], net.nodes[4]
    assert new.conf.voters == frozenset()
    for _ in range(3 * ET):  # a node outside the cluster never campaigns
        new.tick()
    assert read_messages(new) == []
    leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    net.flush(1)
    assert new.conf.voters == {1, 2, 3} and new.conf.learners == {4}
    assert new.log.last_index() == leader.log.last_index()
    leader.propose_conf_change(ConfChange(ConfChangeType.ADD_NODE, 4))
    net.flush(1)
    assert all(r.conf.voters == {1, 2, 3, 4} for r in net.nodes.values())


def test_one_membership_change_at_a_time() -> None:
    net = boot_cluster([1, 2, 3], (4, 5))
    leader = net.nodes[1]
    net.down.update({2, 3})
    leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    net.flush(1)
    with pytest.raises(ProposalDropped, match="not yet committed"):
        leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 5))
    net.down.clear()
    net.tick(1, 1)
    leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 5))


def test_membership_change_waits_for_a_commit_in_the_leaders_term() -> None:
    r = new_raft(1, [1, 2, 3])
    make_leader(r)
    with pytest.raises(ProposalDropped, match="term is committed"):
        r.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))


def test_invalid_membership_changes_are_refused() -> None:
    net = boot_cluster([1])
    leader = net.nodes[1]
    drain(leader)
    with pytest.raises(ProposalDropped):
        leader.propose_conf_change(ConfChange(ConfChangeType.ADD_NODE, 1))
    with pytest.raises(ProposalDropped):
        leader.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 1))
    with pytest.raises(ProposalDropped):
        leader.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 9))


def test_removing_a_voter_shrinks_the_quorum() -> None:
    net = boot_cluster([1, 2, 3, 4])
    leader = net.nodes[1]
    leader.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 4))
    net.flush(1)
    net.down.update({3, 4})
    net.propose(1, b"x")  # 1 and 2 are a quorum of {1, 2, 3}
    assert leader.committed == leader.log.last_index()


def test_removed_leader_steps_down_once_its_removal_commits() -> None:
    net = boot_cluster([1, 2, 3])
    leader = net.nodes[1]
    leader.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 1))
    net.flush(1)
    assert leader.role is StateRole.FOLLOWER
    assert net.nodes[2].conf.voters == {2, 3}
    net.tick_all(3 * ET)
    new = [r for r in net.nodes.values() if r.is_leader]
    assert [r.id for r in new] in ([2], [3])


def test_uncommitted_membership_change_is_rolled_back_with_the_log() -> None:
    r = new_raft(2, [1, 2, 3])
    cc = ConfChange(ConfChangeType.REMOVE_NODE, 3).encode()
    r.step(Message(APP, 2, 1, term=1, entries=(Entry(1, 1, cc, EntryType.CONF_CHANGE),)))
    assert r.conf.voters == {1, 2}
    r.step(Message(APP, 2, 3, term=2, entries=(Entry(2, 1),)))  # a new leader's entry wins
    assert r.conf.voters == {1, 2, 3}


# ---------------------------------------------------------------------------- transfer


def test_leadership_transfer_to_an_up_to_date_follower() -> None:
    net = cluster(check_quorum=True, pre_vote=True)
    net.nodes[1].transfer_leadership(2)
    net.flush(1)
    assert net.nodes[2].is_leader and net.nodes[2].term == 2
    assert net.nodes[1].role is StateRole.FOLLOWER


def test_leadership_transfer_catches_the_target_up_first() -> None:
    net = cluster()
    net.down.add(3)
    for i in range(3):
        net.propose(1, b"%d" % i)
    net.down.clear()
    net.nodes[1].transfer_leadership(3)
    net.flush(1)
    assert net.nodes[3].is_leader
    assert net.nodes[3].log.last_index() >= 5


def test_proposals_are_dropped_during_a_transfer_and_it_times_out() -> None:
    net = cluster()
    net.isolate(3)
    leader = net.nodes[1]
    leader.transfer_leadership(3)
    with pytest.raises(ProposalDropped):
        leader.propose(b"x")
    net.tick(1, ET)
    assert leader.is_leader and leader.lead_transferee == 0
    leader.propose(b"x")


def test_transfer_to_a_non_voter_is_refused() -> None:
    net = cluster()
    with pytest.raises(ProposalDropped):
        net.nodes[1].transfer_leadership(9)
    with pytest.raises(NotLeader):
        net.nodes[2].transfer_leadership(3)


# ---------------------------------------------------------------------------- flow control


def test_proposals_between_readies_travel_in_one_append() -> None:
    r = new_raft(1, [1, 2, 3])
    make_leader(r)
    for m in read_messages(r):
        r.step(Message(APP_RESP, 1, m.to, r.term, index=m.index + len(m.entries)))
    read_messages(r)
    for i in range(10):
        r.propose(b"%d" % i)
    apps = [m for m in read_messages(r) if m.type is APP]
    assert sorted(m.to for m in apps) == [2, 3]
    assert all(len(m.entries) == 10 for m in apps)


def test_max_size_per_msg_splits_appends() -> None:
    r = new_raft(1, [1, 2], max_size_per_msg=100, max_inflight_msgs=100)
    make_leader(r)
    for m in read_messages(r):
        r.step(Message(APP_RESP, 1, m.to, r.term, index=m.index + len(m.entries)))
    read_messages(r)
    for _ in range(10):
        r.propose(b"x" * 34)  # 50 bytes each with overhead
    apps = [m for m in read_messages(r) if m.type is APP]
    assert [len(m.entries) for m in apps] == [2] * 5


def test_inflight_window_limits_pipelining_and_acks_reopen_it() -> None:
    r = new_raft(1, [1, 2], max_size_per_msg=1, max_inflight_msgs=3)
    make_leader(r)
    for m in read_messages(r):
        r.step(Message(APP_RESP, 1, m.to, r.term, index=m.index + len(m.entries)))
    read_messages(r)
    assert r.prs[2].state is ProgressState.REPLICATE
    for i in range(10):
        r.propose(b"%d" % i)
    apps = [m for m in read_messages(r) if m.type is APP]
    assert len(apps) == 3
    r.step(Message(APP_RESP, 1, 2, r.term, index=apps[0].index + 1))
    more = [m for m in read_messages(r) if m.type is APP and m.entries]
    assert len(more) == 1 and more[0].entries[0].index == apps[-1].entries[-1].index + 1


def test_full_window_of_lost_appends_is_recovered_by_heartbeats() -> None:
    r = new_raft(1, [1, 2], max_size_per_msg=1, max_inflight_msgs=2)
    make_leader(r)
    for m in read_messages(r):
        r.step(Message(APP_RESP, 1, m.to, r.term, index=m.index + len(m.entries)))
    read_messages(r)
    match = r.prs[2].match
    for i in range(4):
        r.propose(b"%d" % i)
    read_messages(r)  # both appends are lost
    r.tick()
    read_messages(r)
    r.step(Message(MessageType.HEARTBEAT_RESP, 1, 2, r.term))
    apps = [m for m in read_messages(r) if m.type is APP]
    assert apps and apps[0].index >= match  # the leader tries again rather than waiting


def test_probe_sends_one_append_until_answered() -> None:
    r = new_raft(1, [1, 2], heartbeat_tick=1)
    make_leader(r)
    read_messages(r)
    assert r.prs[2].state is ProgressState.PROBE
    for i in range(5):
        r.propose(b"%d" % i)
    assert [m.type for m in read_messages(r)] == []  # the first probe is still unanswered


def test_conflicting_follower_log_is_backed_up_a_term_at_a_time() -> None:
    lead = new_raft(1, [1, 2, 3], log=entries(*([1] * 3 + [5] * 20)), term=5)
    follower = new_raft(2, [1, 2, 3], log=entries(*([1] * 3 + [2] * 30 + [3] * 30)), term=5)
    net = Network.of(lead, follower)
    net.campaign(1)
    net.send(Message(MessageType.VOTE_RESP, 1, 3, term=6))
    assert lead.is_leader
    net.propose(1, b"x")
    rejects = [m for m in net.delivered if m.type is APP_RESP and m.reject]
    assert len(rejects) <= 3
    assert [e.term for e in follower.log.entries] == [e.term for e in lead.log.entries]


# ---------------------------------------------------------------------------- persistence


def test_leader_commits_only_what_it_has_persisted_itself() -> None:
    r = new_raft(1, [1])
    r.campaign()
    rd = r.ready()
    assert [e.term for e in rd.entries] == [1] and rd.committed_entries == []
    assert r.committed == 0
    r.advance(rd)
    assert r.committed == 1
    rd = r.ready()
    assert [e.index for e in rd.committed_entries] == [1]
    r.advance(rd)


def test_messages_wait_for_the_hard_state_they_depend_on() -> None:
    r = new_raft(1, [1, 2, 3])
    r.step(Message(MessageType.VOTE, 1, 2, term=1))
    rd = r.ready()
    assert rd.hard_state is not None and (rd.hard_state.term, rd.hard_state.vote) == (1, 2)
    assert [m.type for m in rd.messages] == [MessageType.VOTE_RESP]


def test_steps_between_ready_and_advance_are_kept_for_the_next_ready() -> None:
    r = new_raft(2, [1, 2, 3])
    r.step(Message(APP, 2, 1, term=1, entries=entries(1, 1)))
    rd = r.ready()
    # While that is being written, a new leader cuts our log and extends it.
    r.step(Message(APP, 2, 3, term=2, index=1, log_term=1, entries=(Entry(2, 2), Entry(2, 3))))
    r.advance(rd)
    assert r.log.stabled == 1  # index 2 of term 1 was written too, but it is gone
    rd2 = r.ready()
    assert [(e.index, e.term) for e in rd2.entries] == [(2, 2), (3, 2)]
    with pytest.raises(RuntimeError):
        r.ready()
    r.advance(rd2)
    assert r.log.stabled == 3


def test_restart_recovers_term_vote_log_and_commit() -> None:
    storage = MemoryStorage(bootstrap([1, 2, 3]))
    r = Raft(Config(2), random.Random(1), storage.initial_state())
    r.step(Message(MessageType.VOTE, 2, 1, term=2, index=3, log_term=1))
    r.step(Message(APP, 2, 1, term=2, index=3, log_term=1, entries=(Entry(2, 4, b"a"),), commit=4))
    drain(r, storage)
    again = Raft(Config(2), random.Random(2), storage.initial_state())
    assert (again.term, again.vote, again.committed) == (2, 1, 4)
    assert again.log.entry(4).data == b"a" and again.conf.voters == {1, 2, 3}
    rd = again.ready()
    assert [e.index for e in rd.committed_entries] == [1, 2, 3, 4]  # replayed to the app
