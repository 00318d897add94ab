"""MeshLab with encrypted networks, and MeshLab for the VM lab.

`KeyedMeshLab` adds what MeshLab's hand-made control plane lacks for encrypted overlays: the
`encrypted` flag of a network and the cluster's keyring in every node's state, rotated like
the managers rotate it (mesh/ipsec.py `rotate`; docs/mesh-state.md). `VmMeshLab` is that, with
waits sized for a VM lab (orchestrator/lab/vm.py), whose kernel has ESP: MeshLab itself runs
in any lab, through the lab's backend (the state files are written to the lab's run
directory, which the VMs mount at the same path, and every process runs in a VM through a
local stand-in process that forwards signals, so MeshLab's process handling works unchanged).
"""

from __future__ import annotations

from pathlib import Path

from mesh.ipsec import rotate
from mesh.state import Encryption
from orchestrator.lab.meshlab import MeshLab, Net
from orchestrator.lab.record import Lab


class KeyedMeshLab(MeshLab):
    def __init__(
        self, lab: Lab, run_dir: Path | None = None, dns_upstreams: list[str] | None = None
    ):
        super().__init__(lab, run_dir, dns_upstreams)
        self.encrypted: set[str] = set()
        self.encryption: Encryption | None = None

    def add_encrypted_network(self, name: str, vni: int, subnet: str, ingress: bool = False) -> Net:
        net = self.add_network(name, vni, subnet, ingress)
        self.encrypted.add(name)
        if self.encryption is None:
            self.encryption = rotate(None)
        return net

    def rotate_keys(self) -> Encryption:
        """A new key (what the managers do every 12 h); publish() hands it out."""
        self.encryption = rotate(self.encryption)
        return self.encryption

    def state(self, node: str) -> dict[str, object]:
        doc = super().state(node)
        networks = doc["networks"]
        assert isinstance(networks, list)
        for net in networks:
            net["encrypted"] = net["name"] in self.encrypted
        if self.encryption is not None:
            doc["encryption"] = {
                "keys": [{"tag": k.tag, "key": k.key.hex()} for k in self.encryption.keys],
                "primary": self.encryption.primary,
            }
        return doc


class VmMeshLab(KeyedMeshLab):
    """KeyedMeshLab for a VM lab: its waits sized for emulated VMs (TCG), where starting
    Python takes seconds."""

    sync_timeout = 60.0
    listen_timeout = 120.0
    poll = 0.3
