"""The agent keeps heartbeating through a heartbeat that fails (orchestrator/agent/agent.py).

A manager on a busy machine answered one heartbeat after its deadline; the agent's heartbeat
loop died with that call, its session stayed open, and the node was marked down for good (seen
in the VM lab, with every node down and every task pending). Here a dispatcher on loopback,
over real gRPC, lets the agent's first heartbeat time out and refuses its second; the agent
must go on beating on the same session.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from orchestrator.agent.agent import DISPATCHER, Agent, AgentConfig
from orchestrator.agent.exec.native import NativeExecutor
from orchestrator.agent.meshfeed import MeshFeed
from orchestrator.rpc.jsonrpc import Context, Message, server, service

PERIOD = 0.3  # s, the heartbeat period the dispatcher asks for


class Dispatcher:
    """The managers' side, scripted: one session, heartbeats recorded with their outcome."""

    def __init__(self) -> None:
        self.beats: list[tuple[float, str]] = []  # (when, what the dispatcher did)
        self.sessions = 0

    async def session(self, req: Message, ctx: Context) -> AsyncIterator[Message]:
        self.sessions += 1
        yield {"period": PERIOD, "managers": []}
        yield {"assignment": {"tasks": []}}
        await asyncio.Event().wait()  # open until the agent goes

    async def heartbeat(self, req: Message, ctx: Context) -> Message:
        if not self.beats:
            self.beats.append((time.monotonic(), "late"))
            await asyncio.sleep(PERIOD * 3 + 1)  # past the agent's deadline
        elif len(self.beats) == 1:
            self.beats.append((time.monotonic(), "refused"))
            await ctx.abort(grpc.StatusCode.UNAVAILABLE, "the leader is busy")
        else:
            self.beats.append((time.monotonic(), "answered"))
        return {"period": PERIOD}

    async def nothing(self, req: Message, ctx: Context) -> Message:
        return {}


def test_a_failed_heartbeat_is_sent_again_on_the_same_session(tmp_path: Path) -> None:
    async def run() -> None:
        dispatcher = Dispatcher()
        grpc_server = server()
        grpc_server.add_generic_rpc_handlers(
            (
                service(
                    DISPATCHER,
                    unary={
                        "Heartbeat": dispatcher.heartbeat,
                        "UpdateTaskStatus": dispatcher.nothing,
                        "MeshApplied": dispatcher.nothing,
                        "Managers": dispatcher.nothing,
                    },
                    streaming={"Session": dispatcher.session},
                ),
            )
        )
        port = grpc_server.add_insecure_port("127.0.0.1:0")
        await grpc_server.start()
        feed = MeshFeed(tmp_path / "mesh" / "state.json", tmp_path / "mesh", "thbnode", "127.0.0.1")
        agent = Agent(
            AgentConfig(
                node_id="thbnode",
                managers=[f"127.0.0.1:{port}"],
                addr="127.0.0.1",
                data_dir=tmp_path,
                hostname="thb",
                executor=NativeExecutor("thb-", tmp_path / "tasks"),
                description={},
            ),
            feed,
        )
        agent.start()
        try:
            deadline = time.monotonic() + PERIOD * 3 + 10
            while len([b for b in dispatcher.beats if b[1] == "answered"]) < 3:
                assert time.monotonic() < deadline, f"heartbeats stopped: {dispatcher.beats}"
                await asyncio.sleep(0.05)
            assert dispatcher.sessions == 1, "a failed heartbeat is no reason to reconnect"
            assert agent.registry.get_sample_value("shoal_agent_heartbeat_failures_total") == 2
            # sent again soon after each failure, not a period later
            (late, _), (refused, _), (answered, _) = dispatcher.beats[:3]
            assert refused - late < PERIOD * 3 + 1.5 and answered - refused < 1.5
        finally:
            await agent.stop()
            await grpc_server.stop(None)

    asyncio.run(run())
