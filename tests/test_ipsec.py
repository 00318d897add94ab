"""Encrypted overlays (issue #6): the keyring contract, what each node installs, and the refusal
on a kernel without ESP, such as this machine's. ESP at work is in tests/test_vm_mesh.py."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP
from scapy.layers.vxlan import VXLAN
from scapy.utils import rdpcap

from mesh import ipsec
from mesh.overlay import network_mtu
from mesh.state import Encryption, EncryptionKey, StateError, state_from_dict, state_to_dict
from orchestrator.lab import lab as labmod
from orchestrator.lab.vmmesh import KeyedMeshLab
from tests.netutil import answers
from tests.vmutil import capture

KEY1 = "11" * 32
KEY2 = "22" * 32


def doc(**encryption: Any) -> dict[str, Any]:
    return {
        "node": "sw1",
        "peers": {"sw1": "192.168.56.11", "sw2": "192.168.56.12", "sw3": "192.168.56.13"},
        "networks": [
            {
                "name": "secure",
                "vni": 4200,
                "subnet": "10.0.42.0/24",
                "encrypted": True,
                "gateways": {"sw1": "10.0.42.2", "sw2": "10.0.42.3"},
            },
            {
                "name": "plain",
                "vni": 4097,
                "subnet": "10.0.7.0/24",
                "gateways": {"sw1": "10.0.7.2", "sw3": "10.0.7.4"},
            },
        ],
        "encryption": encryption or {"keys": [{"tag": 1, "key": KEY1}, {"tag": 2, "key": KEY2}]},
    }


def test_keyring_parses_defaults_its_primary_and_round_trips() -> None:
    state = state_from_dict(doc())
    assert state.encryption == Encryption(
        (EncryptionKey(1, bytes.fromhex(KEY1)), EncryptionKey(2, bytes.fromhex(KEY2))), 1
    )  # the second-newest key is the primary
    assert state_from_dict(state_to_dict(state)) == state
    one = state_from_dict(doc(keys=[{"tag": 7, "key": KEY1}]))
    assert one.encryption is not None and one.encryption.primary == 7


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"encryption": {"keys": []}}, "encryption.keys: expected at least one key"),
        ({"encryption": {"keys": [{"tag": 1, "key": "xyz"}]}}, "encryption.keys[0].key: expected"),
        (
            {"encryption": {"keys": [{"tag": 1, "key": KEY1}], "primary": 3}},
            "encryption.primary: no key has tag 3",
        ),
        (
            {"encryption": {"keys": [{"tag": 1, "key": KEY1}, {"tag": 1, "key": KEY2}]}},
            "encryption.keys: duplicate tag 1",
        ),
    ],
)
def test_keyring_errors_name_the_field(change: dict[str, Any], message: str) -> None:
    d = doc()
    d.update(change)
    if d["encryption"] is None:
        del d["encryption"]
    with pytest.raises(StateError) as e:
        state_from_dict(d)
    assert message in str(e.value)


def test_an_encrypted_network_without_keys_is_refused_alone() -> None:
    d = doc()
    del d["encryption"]
    report = ipsec.Ipsec().reconcile(state_from_dict(d), full=True)
    assert report.refused == {"secure"} and not report.protected
    assert "carries no encryption keys" in report.errors["network secure"]


def test_every_association_has_its_own_key_and_spi() -> None:
    k1, k2 = EncryptionKey(1, bytes.fromhex(KEY1)), EncryptionKey(2, bytes.fromhex(KEY1))
    a, b = "192.168.56.11", "192.168.56.12"
    derived = [ipsec.derive(k, s, d) for k in (k1, k2) for s, d in ((a, b), (b, a))]
    assert len({spi for spi, _ in derived}) == 4 and len({key for _, key in derived}) == 4
    assert all(spi >= 0x100 and len(key) == ipsec.SA_KEY_BYTES for spi, key in derived)
    assert ipsec.derive(k1, a, b) == ipsec.derive(EncryptionKey(1, bytes.fromhex(KEY1)), a, b)


def test_a_node_wants_inbound_sas_for_every_key_and_outbound_for_the_primary() -> None:
    state = state_from_dict(doc())
    want = ipsec.desired(state)
    assert want.vnis == {4200}
    # sw2 shares the encrypted network; sw3 is only on the plain one
    assert {(sa.src, sa.dst) for sa in want.sas} == {
        ("192.168.56.12", "192.168.56.11"),
        ("192.168.56.11", "192.168.56.12"),
    }
    inbound = [sa for sa in want.sas if sa.dst == "192.168.56.11"]
    assert len(inbound) == 2
    assert state.encryption is not None
    primary = ipsec.derive(state.encryption.primary_key, "192.168.56.11", "192.168.56.12")[0]
    assert want.policies == {ipsec.Policy("192.168.56.11", "192.168.56.12", primary)}
    plain = state_from_dict({**doc(), "networks": doc()["networks"][1:]})
    assert not ipsec.desired(plain).sas


def test_rotation_keeps_three_keys_and_sends_with_the_second_newest() -> None:
    enc = ipsec.rotate(None)
    assert len(enc.keys) == 1 and enc.primary == enc.keys[0].tag
    for _ in range(4):
        enc = ipsec.rotate(enc)
    assert [k.tag for k in enc.keys] == [3, 4, 5] and enc.primary == 4
    assert len({k.key for k in enc.keys}) == 3 and all(len(k.key) == 32 for k in enc.keys)


def test_overlay_mtu_leaves_room_for_esp() -> None:
    secure, plain = state_from_dict(doc()).networks
    assert network_mtu(secure, 1500) == 1416  # 1500 - 50 (VXLAN) - 34 (ESP), 4-aligned
    assert network_mtu(secure, 9000) == 8916
    assert network_mtu(plain, 1500) == 1450


def test_a_refused_network_takes_what_is_attached_to_it_along() -> None:
    d = doc()
    d["endpoints"] = [
        {"task": "a.1", "network": "secure", "node": "sw2", "ip": "10.0.42.10"},
        {"task": "b.1", "network": "plain", "node": "sw3", "ip": "10.0.7.10"},
    ]
    d["services"] = [{"name": "a", "vips": {"secure": "10.0.42.5", "plain": "10.0.7.5"}}]
    state = state_from_dict(d).without_networks({"secure"})
    assert [n.name for n in state.networks] == ["plain"]
    assert [e.task for e in state.endpoints] == ["b.1"]
    assert dict(state.services[0].vips) == {"plain": ipaddress.IPv4Address("10.0.7.5")}


# `ip xfrm state list` and `ip xfrm policy list` as Debian's iproute2 6.1 prints them (in the
# VM lab); only ours (reqid, mark) are ours.
STATES = f"""src 192.168.56.13 dst 192.168.56.11
\tproto esp spi 0xcaa01ee5 reqid {ipsec.REQID} mode transport
\treplay-window 0
\taead rfc4106(gcm(aes)) 0x7e0e 128
\tsel src 0.0.0.0/0 dst 0.0.0.0/0
src 192.168.56.11 dst 192.168.56.13
\tproto esp spi 0x00000101 reqid 1 mode transport
\treplay-window 0
"""
POLICIES = f"""src 192.168.56.11/32 dst 192.168.56.13/32 proto udp dport 4789
\tdir out priority 0 ptype main
\tmark {ipsec.ESP_MARK:#x}/0xffffffff
\ttmpl src 192.168.56.11 dst 192.168.56.13
\t\tproto esp spi 0xbc352aae reqid {ipsec.REQID} mode transport
src 10.1.1.1/32 dst 10.1.1.2/32 proto udp dport 4789
\tdir out priority 0 ptype main
\ttmpl src 10.1.1.1 dst 10.1.1.2
\t\tproto esp spi 0x00000200 reqid {ipsec.REQID} mode transport
"""


def test_only_our_associations_and_policies_are_read_as_ours() -> None:
    assert ipsec.parse_states(STATES) == {("192.168.56.13", "192.168.56.11", 0xCAA01EE5)}
    assert ipsec.parse_policies(POLICIES) == {("192.168.56.11", "192.168.56.13"): 0xBC352AAE}


# ---- on this machine's kernel ----------------------------------------------------------------

LAB = "tesp"
SUBNET = ipaddress.IPv4Network("192.168.63.0/24")


@pytest.mark.lab
def test_an_encrypted_network_is_refused_and_nothing_of_it_leaves(tmp_path: Path) -> None:
    if ipsec.Ipsec().probe() == "":
        pytest.skip("this kernel has ESP: tests/test_vm_mesh.py shows it at work")
    if labmod.load(LAB) is not None:
        labmod.down(LAB)
    lab = labmod.up(LAB, 2, SUBNET)
    mesh = KeyedMeshLab(lab, tmp_path / "mesh")
    try:
        mesh.add_encrypted_network("ingress", 4096, "10.255.0.0/16", ingress=True)
        mesh.add_network("plain", 4097, "10.0.7.0/24")
        mesh.add_service(
            "web", [{"protocol": "tcp", "target": 8000, "published": 30000}], ["ingress"]
        )
        mesh.add_service("db", [], ["plain"], endpoint_mode="dnsrr")
        web = [mesh.add_task("web", n) for n in ("sw1", "sw2")]
        db = [mesh.add_task("db", n) for n in ("sw1", "sw2")]
        mesh.publish()
        with capture(lab, tmp_path / "wire.pcap") as cap:
            for node in lab.nodes:
                sync = [sys.executable, "-m", "mesh.cli", "sync"]
                sync += ["--state", str(mesh.state_path(node.name))]
                sync += ["--run-dir", str(tmp_path / f"run-{node.name}")]
                done = subprocess.run(
                    labmod.exec_argv(lab, node.name, sync), capture_output=True, text=True
                )
                assert done.returncode == 1, done.stderr
                assert (
                    "network ingress is encrypted, and this kernel cannot encrypt overlay traffic"
                    in done.stderr
                    and "refusing to attach it rather than send its traffic in the clear"
                    in done.stderr
                    and "CONFIG_INET_ESP" in done.stderr
                ), done.stderr
            for t in web + db:
                mesh.start_workload(t)
                mesh.wait_listening(t)
            with pytest.raises(OSError):  # no frontend: nothing leads to the tasks
                answers(None, lab.node("sw1").address, 30000, 1)
            ping = ["ping", "-c", "2", "-W", "2", str(db[1].ips["plain"])]
            assert subprocess.run(["ip", "netns", "exec", db[0].netns, *ping]).returncode == 0
        links = subprocess.run(
            ["ip", "-n", lab.node("sw1").netns, "-o", "link"], capture_output=True, text=True
        ).stdout
        assert "sh-vx4097" in links and "sh-vx4096" not in links and "sh-br4096" not in links
        task_links = subprocess.run(
            ["ip", "-n", web[0].netns, "-br", "link"], capture_output=True, text=True
        ).stdout
        assert [line.split()[0] for line in task_links.splitlines()] == ["lo"], task_links
        packets = rdpcap(str(cap.path))
        vnis = Counter(p[VXLAN].vni for p in packets if VXLAN in p)
        assert vnis[4097] > 0 and 4096 not in vnis, vnis  # the capture sees VXLAN
        ingress = ipaddress.IPv4Network("10.255.0.0/16")
        assert not [
            p.summary()
            for p in packets
            if IP in p
            and (
                ipaddress.IPv4Address(p[IP].src) in ingress
                or ipaddress.IPv4Address(p[IP].dst) in ingress
            )
        ]
    finally:
        mesh.close()
        labmod.down(LAB)
