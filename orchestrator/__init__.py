"""Shoal's control plane: the managers, the agents, the API, the CLI and the lab."""

import os

# gRPC's fork handlers run in every forked child: with the agent spawning task processes while
# gRPC threads are busy, children crashed (SIGSEGV) and sessions broke. Nothing here uses gRPC
# in a child, so the handlers are off; set before anything imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
# shoald sets gRPC's log level (orchestrator/daemon.py), before anything imports grpc.
