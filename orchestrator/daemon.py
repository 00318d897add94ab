"""shoald: the node daemon.

It serves a subset of the Docker Engine API on a unix socket (so `docker -H unix://...` and the
docker SDK drive it), and once the node is in a swarm it runs the agent, the node's shoal-mesh
and, on managers, the manager (store, control loops, dispatcher on --listen-addr).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry

from mesh.cli import setup_logging
from orchestrator.agent.exec.select import DEFAULT_ENGINE, KINDS, ExecutorError

log = logging.getLogger(__name__)

DEFAULT_HOST = "unix:///run/shoal/shoal.sock"
DEFAULT_DATA_ROOT = Path("/var/lib/shoal")


def parse_host(host: str) -> Path:
    if not host.startswith("unix://"):
        raise SystemExit(f"shoald: --host {host!r}: only unix:///path/to/socket is supported")
    return Path(host[len("unix://") :])


async def serve(args: argparse.Namespace) -> None:
    from orchestrator.api.server import build  # noqa: PLC0415 - after GRPC_VERBOSITY (main)
    from orchestrator.node import NodeConfig, NodeRuntime  # noqa: PLC0415 - likewise

    sock = parse_host(args.host)
    # shoald's metrics: the API's and the node's, served on :9323 with the mesh's once in a
    # swarm (orchestrator/metrics.py)
    registry = CollectorRegistry(auto_describe=False)
    node = NodeRuntime(
        NodeConfig(
            data_root=args.data_root,
            hostname=args.hostname,
            netns_prefix=args.netns_prefix,
            lb_backend=args.lb_backend,
            executor=args.executor,
            engine=args.engine,
        ),
        registry,
    )
    try:
        await node.resume()
    except ExecutorError as e:
        raise SystemExit(f"shoald: {e}") from None
    app = build(node, registry)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock.parent.mkdir(parents=True, exist_ok=True)
    if sock.exists():
        sock.unlink()
    site = web.UnixSite(runner, str(sock))
    await site.start()
    os.chmod(sock, 0o660)
    log.info("shoald listening on unix://%s (data root %s)", sock, args.data_root)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: tasks stop, the data plane stays")
    await node.shutdown()
    await runner.cleanup()
    sock.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    # gRPC logs a refused TLS handshake (a plain client, a certificate from another CA or an
    # expired one) only at INFO, with GOAWAYs when a manager restarts; the refusals matter
    # more. It reads the level once, when grpc is first imported (serve() imports it).
    os.environ.setdefault("GRPC_VERBOSITY", "INFO")
    p = argparse.ArgumentParser(
        prog="shoald", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", default=DEFAULT_HOST, help=f"API socket (default {DEFAULT_HOST})")
    p.add_argument(
        "--data-root",
        type=Path,
        default=DEFAULT_DATA_ROOT,
        help=f"state directory (default {DEFAULT_DATA_ROOT})",
    )
    p.add_argument(
        "--hostname",
        default=os.uname().nodename,
        help="this node's name in the swarm (default: the machine's hostname)",
    )
    p.add_argument(
        "--netns-prefix", default="shoal", help="prefix of task network namespaces (default shoal)"
    )
    p.add_argument("--lb-backend", choices=("auto", "nftables", "ipvs"), default="auto")
    p.add_argument(
        "--executor",
        choices=KINDS,
        default="auto",
        help="how tasks run: as containers of the engine (container), as this machine's own "
        "programs in namespaces (native), or container when the engine answers at start "
        "(auto, the default)",
    )
    p.add_argument(
        "--engine",
        default=DEFAULT_ENGINE,
        help=f"the container engine's API (default {DEFAULT_ENGINE})",
    )
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.log_format, args.verbose)
    if os.geteuid() != 0:
        print(
            "shoald: needs root (it creates network namespaces and nftables rules)", file=sys.stderr
        )
        return 1
    uvloop.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
