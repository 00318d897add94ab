"""The `shoal-mesh` command: run the mesh daemon, sync once, check a state file, clean up."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import uvloop

from mesh.daemon import DaemonConfig, MeshDaemon, record_namespaces, recorded_namespaces
from mesh.lb.select import BACKENDS, BackendUnavailable, choose
from mesh.netns import NetnsError
from mesh.nft.wire import NftError
from mesh.reconcile import Mesh, task_namespaces
from mesh.state import StateError, load_state

# __name__, as the package is imported; shoald runs this module as `python -m mesh.cli`,
# where __name__ is "__main__".
log = logging.getLogger("mesh.cli")

DEFAULT_RUN_DIR = Path("/run/shoal/mesh")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(fmt: str, verbose: bool) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def _addr(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    try:
        return host or "0.0.0.0", int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shoal-mesh",
        description="The per-node mesh daemon: "
        "overlays, routing mesh and DNS, from a desired-state file.",
    )
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="keep the kernel equal to the state file (the daemon)")
    run.add_argument("--state", type=Path, required=True, help="desired state, JSON or YAML")
    run.add_argument(
        "--lb-backend",
        choices=BACKENDS,
        default="auto",
        help="load balancer: nftables, ipvs, or auto (ipvs where the kernel has it)",
    )
    run.add_argument(
        "--metrics-addr",
        type=_addr,
        default=("0.0.0.0", 9323),
        help="where to serve /metrics (default 0.0.0.0:9323)",
    )
    run.add_argument(
        "--metrics-socket",
        type=Path,
        help="serve /metrics on this unix socket instead (shoald's way: it serves the node's "
        ":9323 and reads the mesh's metrics from there)",
    )
    run.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    run.add_argument(
        "--resync-interval",
        type=float,
        default=60.0,
        help="seconds between checks that the kernel still matches (default 60)",
    )
    run.set_defaults(func=cmd_run)

    sync = sub.add_parser("sync", help="make the kernel match the state file once, and exit")
    sync.add_argument("--state", type=Path, required=True)
    sync.add_argument("--lb-backend", choices=BACKENDS, default="auto")
    sync.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    sync.set_defaults(func=cmd_sync)

    check = sub.add_parser("check", help="validate a state file")
    check.add_argument("--state", type=Path, required=True)
    check.set_defaults(func=cmd_check)

    clean = sub.add_parser("cleanup", help="remove everything shoal-mesh made on this node")
    clean.add_argument("--state", type=Path, help="also clean the task namespaces it lists")
    clean.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    clean.set_defaults(func=cmd_cleanup)
    return p


def cmd_run(args: argparse.Namespace) -> int:
    name, balancer = choose(args.lb_backend)
    log.info("load balancer: %s", name)
    cfg = DaemonConfig(
        state_path=args.state,
        lb_backend=name,
        balancer=balancer,
        metrics_host=args.metrics_addr[0],
        metrics_port=args.metrics_addr[1],
        metrics_socket=args.metrics_socket,
        run_dir=args.run_dir,
        resync_interval=args.resync_interval,
    )
    daemon = MeshDaemon(cfg, Mesh(balancer))
    uvloop.run(daemon.run())
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    state = load_state(args.state)
    name, balancer = choose(args.lb_backend)
    started = time.perf_counter()
    report = Mesh(balancer).apply(state, full=True, verify=True)
    record_namespaces(args.run_dir, list(task_namespaces(state)))
    print(
        f"synced generation {state.generation} with {name} in "
        f"{(time.perf_counter() - started) * 1000:.1f} ms: {report.nft_requests} nft requests, "
        f"{report.link_changes} link changes"
    )
    for what, why in report.errors.items():
        print(f"error: {what}: {why}", file=sys.stderr)
    return 0 if report.ok else 1


def cmd_check(args: argparse.Namespace) -> int:
    state = load_state(args.state)
    print(
        f"{args.state}: ok (node {state.node}, {len(state.networks)} network(s), "
        f"{len(state.endpoints)} endpoint(s), {len(state.services)} service(s))"
    )
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    _, balancer = choose("nftables")
    mesh = Mesh(balancer)
    state = load_state(args.state) if args.state else None
    extra = recorded_namespaces(args.run_dir)
    mesh.cleanup(state, extra_namespaces=extra)
    record = args.run_dir / "namespaces.json"
    record.unlink(missing_ok=True)
    print("removed shoal-mesh's links and tables")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_format, args.verbose)
    try:
        code: int = args.func(args)
        return code
    except (StateError, BackendUnavailable) as e:
        print(f"shoal-mesh: {e}", file=sys.stderr)
        return 2
    except (NftError, NetnsError, PermissionError) as e:
        print(f"shoal-mesh: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
