"""Raft consensus for the manager store, built the way etcd-io/raft is.

- `messages`: the values that go in and out (Message, Entry, HardState, Snapshot, Ready, ...).
- `log`: a node's log in memory (compaction point, stable/unstable, commit and apply indexes).
- `progress`: what a leader knows of each follower, and flow control (probe/replicate/snapshot).
- `core`: the state machine itself (`Raft`): step/tick/propose/read_index/... in, Ready out.
- `storage`: the `Storage` a node is given: durable on the write-ahead log (`RaftStorage`),
  or `MemoryStorage`; `wal`: that log (checksummed records, sealed).
- `sealing`: the data key encrypting the log and snapshots, sealed under the unlock key.
- `transport`: the `Transport` a node is given (hashicorp/raft's), and `MemoryNetwork`, one in
  memory for tests; `grpc_transport`: the one between managers (message streams, forwarding).
- `node`: `RaftNode`, the driver a manager runs: the core on a Storage and a Transport, with
  proposals forwarded to the leader, read barriers and term fencing; the store's replicated log.
- `sim`: a deterministic simulator running real cores under faults, with safety checks.
- `linearizability`: a Porcupine-style checker for key-value histories.

Nothing here imports the store (orchestrator/store), which sees the node only as its
ReplicatedLog.

A driver loop (see core.Raft and messages.Ready for the exact contract; node.RaftNode is ours):

    node = Raft(Config(id=1), random.Random(), storage.initial_state())
    every tick interval:  node.tick()
    on a message:         node.step(msg)
    on a client write:    index = node.propose(data)
    whenever node.has_ready():
        rd = node.ready()
        storage.save_ready(rd)           # snapshot, entries, hard state; one fsync
        send(rd.messages)                # only after they are durable
        apply(rd.snapshot, rd.committed_entries); serve(rd.read_states)
        node.advance(rd)
"""
