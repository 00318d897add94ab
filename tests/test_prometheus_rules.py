"""The Vagrant swarm's Prometheus setup (vagrant/prometheus.yml and its rules) as Debian's
promtool checks it: a valid config, valid rules, the rules' unit tests pass, and every alert
has a unit test. tests/test_prometheus_lab.py runs the same config against a lab."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "vagrant" / "prometheus.yml"
RULES = ROOT / "vagrant" / "prometheus" / "rules.yml"
RULE_TESTS = ROOT / "vagrant" / "prometheus" / "rules_test.yml"
# Debian's prometheus package (the Makefile's DEB_PACKAGES)
PROMTOOL = "/usr/bin/promtool"

# what the swarm must be warned of (issue #13): a node down, no Raft leader, mesh sync
# errors, a service below its replicas
REQUIRED_ALERTS = {
    "SwarmNodeDown",
    "SwarmNoRaftLeader",
    "ShoalMeshSyncErrors",
    "SwarmServiceBelowReplicas",
}


def promtool(*args: str) -> str:
    out = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"promtool {' '.join(args)}:\n{out.stdout}{out.stderr}"
    return out.stdout


def test_config_and_rules_are_valid() -> None:
    promtool("check", "config", str(CONFIG))
    promtool("check", "rules", str(RULES))


def test_rules_pass_their_unit_tests() -> None:
    promtool("test", "rules", str(RULE_TESTS))


def test_every_alert_is_required_or_tested() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert alerts >= REQUIRED_ALERTS, REQUIRED_ALERTS - alerts
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing = {
        t["alertname"]
        for case in tests
        for t in case.get("alert_rule_test", [])
        if t.get("exp_alerts")
    }
    assert alerts - firing == set(), "alerts no unit test sees fire"


def test_config_finds_the_swarm_from_shoald() -> None:
    """Nodes scraped on :9323 and opted-in tasks, both found through a manager's shoald."""
    config = yaml.safe_load(CONFIG.read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    nodes, tasks = jobs["swarm-nodes"], jobs["swarm-tasks"]
    assert [sd["role"] for sd in nodes["dockerswarm_sd_configs"]] == ["nodes"]
    assert [sd["role"] for sd in tasks["dockerswarm_sd_configs"]] == ["tasks"]
    to_9323 = [r for r in nodes["relabel_configs"] if r.get("target_label") == "__address__"]
    assert [r["replacement"] for r in to_9323] == ["$1:9323"]
    assert any(
        r.get("source_labels") == ["__meta_dockerswarm_service_label_prometheus_job"]
        and r.get("action") == "keep"
        for r in tasks["relabel_configs"]
    )
