"""Store objects in the shapes the Docker Engine API returns (moby api/types/swarm)."""

from __future__ import annotations

import copy
from typing import Any

from orchestrator.manager.orchestrator.tasks import shown_desired_state
from orchestrator.manager.servicestatus import service_status
from orchestrator.manager.spec import task_template_with_defaults, view
from orchestrator.store.objects import Cluster, Network, Node, Service, Task, TaskState

SECOND = 1_000_000_000
EXECUTOR_LABEL = "com.shoal.executor"  # in a node's Description.Engine.Labels


def _meta(obj: Node | Service | Task | Network | Cluster) -> dict[str, Any]:
    return {
        "ID": obj.id,
        "Version": {"Index": obj.meta.version},
        "CreatedAt": obj.meta.created_at,
        "UpdatedAt": obj.meta.updated_at,
    }


def node_json(
    node: Node, leader_raft_id: int, reachability: dict[int, str], engine_version: str
) -> dict[str, Any]:
    """A node as the API shows it; ManagerStatus for the managers in the Raft group."""
    spec: dict[str, Any] = {
        "Labels": dict(node.labels),
        "Role": node.role,
        "Availability": node.availability,
    }
    if node.name:
        spec["Name"] = node.name
    engine: dict[str, Any] = {"EngineVersion": node.engine_version or engine_version}
    if node.executor:  # what runs its tasks: container | native (unknown for older nodes)
        engine["Labels"] = {EXECUTOR_LABEL: node.executor}
    engine["Plugins"] = [{"Type": "Network", "Name": "overlay"}]
    out: dict[str, Any] = {
        **_meta(node),
        "Spec": spec,
        "Description": {
            "Hostname": node.hostname,
            "Platform": {"Architecture": node.arch, "OS": node.os},
            "Resources": {"NanoCPUs": node.nano_cpus, "MemoryBytes": node.memory_bytes},
            "Engine": engine,
        },
        "Status": {
            "State": node.state,
            "Addr": node.addr,
            **({"Message": node.message} if node.message else {}),
        },
    }
    if node.raft_id and node.raft_id in reachability:
        out["ManagerStatus"] = {
            "Leader": node.raft_id == leader_raft_id,
            "Reachability": reachability[node.raft_id],
            "Addr": node.manager_addr,
        }
    return out


def with_defaults(spec: dict[str, Any]) -> dict[str, Any]:
    """What `insertDefaults=true` shows: the values the managers use when a field is unset."""
    out = copy.deepcopy(spec)
    out["TaskTemplate"] = task_template_with_defaults(out.get("TaskTemplate", {}))
    if view(spec).job:  # a job is not updated task by task: it runs again
        return out
    for key in ("UpdateConfig", "RollbackConfig"):
        cfg = out.setdefault(key, {})
        for k, v in (
            ("Parallelism", 1),
            ("FailureAction", "pause"),
            ("Monitor", 5 * SECOND),
            ("MaxFailureRatio", 0),
            ("Order", "stop-first"),
        ):
            cfg.setdefault(k, v)
    return out


def service_json(
    svc: Service, tasks: list[Task] | None, nodes: dict[str, Node], insert_defaults: bool = False
) -> dict[str, Any]:
    spec = with_defaults(svc.spec) if insert_defaults else svc.spec
    ep_spec = svc.spec.get("EndpointSpec", {"Mode": "vip"})
    endpoint: dict[str, Any] = {"Spec": ep_spec}
    if svc.ports:
        endpoint["Ports"] = svc.ports
    if svc.vips:
        endpoint["VirtualIPs"] = [
            {"NetworkID": nid, "Addr": addr} for nid, addr in svc.vips.items()
        ]
    out: dict[str, Any] = {**_meta(svc), "Spec": spec, "Endpoint": endpoint}
    if svc.previous_spec is not None:
        out["PreviousSpec"] = svc.previous_spec
    if svc.update_status:
        out["UpdateStatus"] = svc.update_status
    v = view(svc.spec)
    if v.job:
        out["JobStatus"] = {
            "JobIteration": {"Index": svc.job_iteration},
            "LastExecution": svc.job_started_at,
        }
    if tasks is not None:
        status = service_status(svc, tasks, nodes)
        out["ServiceStatus"] = {
            "RunningTasks": status.running,
            "DesiredTasks": status.desired,
            "CompletedTasks": status.completed,
        }
    return out


def task_json(task: Task, networks: dict[str, Network]) -> dict[str, Any]:
    status: dict[str, Any] = {
        "Timestamp": task.timestamp,
        "State": task.state.api,
        "Message": task.message,
        "PortStatus": {},
    }
    # Docker's engine reports the host ports a task's container holds once it has started
    if task.host_ports and task.state >= TaskState.RUNNING and task.container:
        status["PortStatus"] = {"Ports": [dict(p) for p in task.host_ports]}
    if task.err:
        status["Err"] = task.err
    if task.container:
        status["ContainerStatus"] = {
            "ContainerID": task.container.get("ContainerID", ""),
            "PID": task.container.get("PID", 0),
            "ExitCode": task.container.get("ExitCode", 0),
        }
    attachments = []
    for nid in task.networks:
        net = networks.get(nid)
        if net is not None and nid in task.addresses:
            attachments.append(
                {
                    "Network": {"ID": net.id, "Spec": net.spec, "DriverState": {"Name": "overlay"}},
                    "Addresses": [task.addresses[nid]],
                }
            )
    out: dict[str, Any] = {
        **_meta(task),
        "Labels": {},
        "Spec": task.spec,
        "ServiceID": task.service_id,
        "Slot": task.slot,
        "Status": status,
        "DesiredState": shown_desired_state(task).api,
    }
    if task.node_id:
        out["NodeID"] = task.node_id
    if task.job_iteration is not None:
        out["JobIteration"] = {"Index": task.job_iteration}
    if attachments:
        out["NetworksAttachments"] = attachments
    return out


def network_json(net: Network) -> dict[str, Any]:
    spec = net.spec
    return {
        "Name": net.name,
        "Id": net.id,
        "Created": net.meta.created_at,
        "Scope": "swarm",
        "Driver": "overlay",
        "EnableIPv6": False,
        "IPAM": {
            "Driver": "default",
            "Options": None,
            "Config": [{"Subnet": net.subnet, "Gateway": net.gateway}],
        },
        "Internal": bool(spec.get("Internal")),
        "Attachable": bool(spec.get("Attachable")),
        "Ingress": net.ingress,
        "ConfigFrom": {"Network": ""},
        "ConfigOnly": False,
        "Containers": None,
        "Options": {
            "com.docker.network.driver.overlay.vxlanid_list": str(net.vni),
            **spec.get("DriverConfiguration", {}).get("Options", {}),
        },
        "Labels": spec.get("Labels") or None,
    }


def swarm_json(cluster: Cluster, with_tokens: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        **_meta(cluster),
        "Spec": cluster.spec,
        "RootRotationInProgress": bool(cluster.ca_rotation),
        "DefaultAddrPool": list(cluster.default_addr_pool),
        "SubnetSize": cluster.subnet_size,
        "DataPathPort": cluster.data_path_port,
        "TLSInfo": {"TrustRoot": cluster.root_ca_cert},
    }
    if with_tokens:
        out["JoinTokens"] = {"Worker": cluster.worker_token, "Manager": cluster.manager_token}
    return out
