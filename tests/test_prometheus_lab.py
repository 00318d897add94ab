"""A real Prometheus (Debian's) finds a 3-node swarm by itself and scrapes every node's :9323:
the Vagrant setup's own config (vagrant/prometheus.yml), against a lab. And every node's
metrics, manager's and workers', pass `promtool check metrics` and carry Docker's names.

Prometheus runs inside sw1 (a manager, as in the Vagrant swarm), listening on sw1's address,
which the test reaches from the host: from there it reaches every node's :9323 and shoald's
socket, and the task addresses the tasks role discovers are the lab's overlay addresses,
routed only inside the lab (from the host, a scrape of them would leave the machine).
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from orchestrator.lab import daemons, lifecycle
from orchestrator.lab import lab as labmod
from orchestrator.lab.lab import Lab
from tests.labutil import module_lab, shoal, wait
from tests.netutil import answers

pytestmark = [pytest.mark.lab, pytest.mark.slow]

LAB = "tprom"
SUBNET = ipaddress.IPv4Network("192.168.87.0/24")  # not bench/control.py's 81
ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "vagrant" / "prometheus.yml"
PROMETHEUS = "/usr/bin/prometheus"  # Debian's (the Makefile's DEB_PACKAGES)
PROMTOOL = "/usr/bin/promtool"
PROMETHEUS_PORT = 9090  # in sw1's namespace, where nothing else listens
# the config's Docker host: a Vagrant manager's shoald
VAGRANT_DOCKER_HOST = "unix:///run/shoal/shoal.sock"
# how often the rewritten config scrapes, evaluates and refreshes discovery
INTERVAL_SECONDS = 1
INTERVAL = f"{INTERVAL_SECONDS}s"
PUBLISHED = 30000
REQUESTS = 60

# what Docker's dashboards read: swarmkit's names (manager/metrics, manager.go, node.go,
# dispatcher, raft, store), on managers ...
DOCKER_MANAGER_NAMES = (
    "swarm_manager_leader",
    "swarm_manager_nodes",
    "swarm_manager_tasks_total",
    "swarm_manager_services_total",
    "swarm_manager_networks_total",
    "swarm_manager_secrets_total",
    "swarm_manager_configs_total",
    "swarm_dispatcher_scheduling_delay_seconds_bucket",
    "swarm_raft_transaction_latency_seconds_bucket",
    "swarm_raft_snapshot_latency_seconds_bucket",
    "swarm_store_write_tx_latency_seconds_bucket",
)
# ... and on every node
DOCKER_NODE_NAMES = ("swarm_node_info", "swarm_node_manager")
# ours, on every node: the API's, the agent's, and the mesh's through shoald
OUR_NODE_NAMES = (
    "shoal_api_requests_total",
    "shoal_agent_session_reconnects_total",
    "shoal_mesh_up",
    "shoal_mesh_sync_errors_total",
    "shoal_mesh_sync_duration_seconds_bucket",
)
OUR_MANAGER_NAMES = (
    "shoal_raft_term",
    "shoal_raft_proposals_total",
    "shoal_raft_leader_changes_total",
    "shoal_raft_snapshot_size_bytes",
    "shoal_service_desired_tasks",
    "shoal_manager_reconcile_failures_total",
)


@pytest.fixture(scope="module")
def swarm() -> Iterator[Lab]:
    """sw1 the manager, sw2 and sw3 workers; a service `web` of 3 micro tasks on :30000 that
    asks Prometheus to scrape it (`prometheus-job`)."""
    with module_lab(LAB, 3, SUBNET) as lab:
        record = lifecycle.swarm(lab)
        shoal(record, "sw1", "service", "create", "--name", "web", "--replicas", "3",
              "--publish", f"{PUBLISHED}:8000/tcp", "--label", "prometheus-job=web",
              "gianarb/micro")  # fmt: skip
        yield record


def lab_config(lab: Lab) -> dict[str, Any]:
    """vagrant/prometheus.yml, rewritten only where the lab differs from the Vagrant swarm:
    the Docker host is sw1's shoald's socket in the lab's run dir (a Vagrant manager's is at
    the default path); the rule files by their full path (the config is written elsewhere);
    Prometheus's own address; and 1 s intervals for scrapes, rules and discovery (the
    Vagrant setup's 15 s and 30 s would make the test wait minutes)."""
    config: dict[str, Any] = yaml.safe_load(CONFIG.read_text())
    config["global"].update(scrape_interval=INTERVAL, evaluation_interval=INTERVAL)
    config["rule_files"] = [str(CONFIG.parent / f) for f in config["rule_files"]]
    for job in config["scrape_configs"]:
        for sd in job.get("dockerswarm_sd_configs", []):
            assert sd["host"] == VAGRANT_DOCKER_HOST
            sd["host"] = daemons.docker_host(lab, "sw1")
            sd["refresh_interval"] = INTERVAL
        for static in job.get("static_configs", []):
            assert static["targets"] == ["localhost:9090"]
            static["targets"] = [f"localhost:{PROMETHEUS_PORT}"]
    return config


@pytest.fixture(scope="module")
def prometheus(swarm: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus in sw1 with the lab's config and its own storage; its API's base URL."""
    tmp = tmp_path_factory.mktemp("tprom")
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump(lab_config(swarm)))
    listen = f"{swarm.node('sw1').address}:{PROMETHEUS_PORT}"
    log_path = tmp / "prometheus.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        labmod.exec_argv(swarm, "sw1", [
            PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address={listen}", "--log.level=warn",
        ]),
        stdout=log, stderr=log,
    )  # fmt: skip
    url = f"http://{listen}"
    try:
        wait(lambda: ready(url, proc), "Prometheus to be ready", within=30)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        print(log_path.read_text()[-8000:])  # shown with a failure (warnings and errors only)
        shutil.rmtree(tmp)  # its TSDB: megabytes pytest would otherwise keep for 3 runs


def ready(url: str, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, f"Prometheus exited with {proc.returncode}"
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def api(url: str, path: str, **params: str) -> Any:
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}/api/v1/{path}?{query}", timeout=10) as r:
        doc = json.load(r)
    assert doc["status"] == "success", doc
    return doc["data"]


def instant(url: str, expr: str, at: float | None = None) -> dict[str, float]:
    """The query's series at `at` (default now), each by its labels but the name (a sorted
    JSON text)."""
    params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
    data = api(url, "query", **params)
    assert data["resultType"] == "vector", data
    return {
        json.dumps(
            {k: v for k, v in s["metric"].items() if k != "__name__"}, sort_keys=True
        ): float(s["value"][1])
        for s in data["result"]
    }


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}:9323/metrics", timeout=10) as r:
        text: str = r.read().decode()
    return text


def names(text: str) -> set[str]:
    return {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_every_node_serves_docker_names_that_pass_promtool(swarm: Lab) -> None:
    for node in swarm.nodes:
        text = scrape(node.address)
        manager = node.name == "sw1"
        expected = set(DOCKER_NODE_NAMES + OUR_NODE_NAMES)
        if manager:
            expected |= set(DOCKER_MANAGER_NAMES + OUR_MANAGER_NAMES)
        missing = expected - names(text)
        assert not missing, f"{node.name} lacks {sorted(missing)}"
        if not manager:
            assert not {n for n in names(text) if n.startswith("swarm_manager_")}, node.name
        assert f"swarm_node_manager {1.0 if manager else 0.0}" in text, node.name
        assert "shoal_mesh_up 1.0" in text, node.name
        check = subprocess.run(
            [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), (
            node.name,
            check.stdout + check.stderr,
        )
    sw1 = scrape(swarm.node("sw1").address)
    assert 'swarm_manager_nodes{state="ready"} 3.0' in sw1
    assert "swarm_manager_leader 1.0" in sw1
    assert "swarm_manager_services_total 1.0" in sw1
    assert 'swarm_manager_tasks_total{state="running"} 3.0' in sw1
    assert 'shoal_service_running_tasks{mode="replicated",service="web"} 3.0' in sw1


def test_prometheus_finds_every_node_up(swarm: Lab, prometheus: str) -> None:
    expected = {f"{n.address}:9323": n.name for n in swarm.nodes}

    def nodes_up() -> dict[str, str]:
        series = instant(prometheus, 'up{job="swarm-nodes"} == 1')
        found = [json.loads(labels) for labels in series]
        return {s["instance"]: s["node"] for s in found}

    wait(lambda: nodes_up() == expected, f"every node's target up: {expected}", within=30)
    wait(
        lambda: list(instant(prometheus, 'swarm_manager_nodes{state="ready"}').values()) == [3],
        'swarm_manager_nodes{state="ready"} == 3',
        within=30,
    )


def test_prometheus_finds_the_tasks_that_ask_for_it(swarm: Lab, prometheus: str) -> None:
    """The tasks role, kept by the service's `prometheus-job` label, named after it."""
    sdk = docker.DockerClient(base_url=daemons.docker_host(swarm, "sw1"))
    try:
        tasks = sdk.services.get("web").tasks(filters={"desired-state": "running"})
    finally:
        sdk.close()
    running = {t["ID"] for t in tasks}
    assert len(running) == 3, tasks

    def discovered() -> set[str]:
        targets = api(prometheus, "targets", state="active")["activeTargets"]
        return {
            t["discoveredLabels"]["__meta_dockerswarm_task_id"]
            for t in targets
            if t["labels"].get("job") == "web" and t["labels"].get("service") == "web"
        }

    wait(lambda: discovered() == running, f"the tasks of web: {running}", within=30)


def connections(url: str, node_address: str, at: float) -> dict[str, float]:
    """The mesh's published-port connection counters of `web` on a node, by backend, as
    Prometheus has them at `at`."""
    series = instant(
        url,
        f'shoal_mesh_backend_connections_total{{service="web",frontend="published",'
        f'protocol="tcp",instance="{node_address}:9323"}}',
        at,
    )
    return {json.loads(labels)["backend"].split(":")[0]: v for labels, v in series.items()}


def test_backend_connection_counters_follow_the_requests(swarm: Lab, prometheus: str) -> None:
    sw2 = swarm.node("sw2").address
    scrape_interval = INTERVAL_SECONDS

    def settled() -> bool:  # three backends, counted, and nothing moving
        now = time.time()
        then = connections(prometheus, sw2, now - 3 * scrape_interval)
        return len(then) == 3 and then == connections(prometheus, sw2, now)

    wait(settled, "the counters of web's three backends on sw2 in Prometheus", within=60)
    # one scrape later than the last: the counters as they stand before the requests
    time.sleep(2 * scrape_interval)
    start = time.time()
    before = connections(prometheus, sw2, start)
    answered = answers(None, sw2, PUBLISHED, REQUESTS)
    sent = time.time()
    assert set(answered) == set(before), (answered, before)

    def increase(at: float) -> dict[str, float]:
        after = connections(prometheus, sw2, at)
        return {ip: after[ip] - before[ip] for ip in before}

    # until Prometheus has scraped past the last request (a scrape that began before it ended
    # may not have it yet)
    wait(
        lambda: (
            time.time() > sent + 3 * scrape_interval
            and sum(increase(time.time()).values()) >= REQUESTS
        ),
        f"Prometheus to count {REQUESTS} connections",
        within=30,
    )
    counted = increase(time.time())
    # Each counter counts the load balancer's DNAT decisions: one per connection, and one
    # more for a SYN lost before conntrack confirmed its entry and resent (seen once under
    # load in test_mesh_lab): never fewer than the answers, at most one more in all.
    assert all(counted[ip] >= answered[ip] for ip in answered), (counted, answered)
    assert sum(counted.values()) - REQUESTS <= 1, (counted, answered)


def test_the_rules_hold_on_a_healthy_swarm(prometheus: str) -> None:
    """The recording rules see the leader's view; no alert is even pending."""
    rules = api(prometheus, "rules")["groups"]
    assert {g["name"] for g in rules} == {"shoal-swarm", "shoal-swarm-alerts"}
    assert all(r["health"] == "ok" for g in rules for r in g["rules"] if r.get("lastEvaluation"))
    wait(
        lambda: (
            instant(prometheus, "swarm:manager_nodes:leader").get('{"state": "ready"}') == 3
            and instant(prometheus, "service:shoal_service_running_tasks:leader")
            == {'{"service": "web"}': 3.0}
        ),
        "the recording rules to see 3 nodes ready and web's 3 tasks",
        within=30,
    )
    assert instant(prometheus, "ALERTS") == {}
