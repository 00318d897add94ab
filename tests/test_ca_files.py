"""A node's credentials on disk: file names and modes, and saves that a crash cannot tear."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from orchestrator.ca.files import (
    CERT_FILE,
    KEY_FILE,
    ROOT_FILE,
    load_node_credentials,
    remove_node_credentials,
    save_node_credentials,
)
from orchestrator.ca.pki import NodeCSR, PKIError, RootCA
from orchestrator.ca.tls import NodeCredentials
from orchestrator.store.objects import Role


def creds(root: RootCA, node_id: str = "n1") -> NodeCredentials:
    csr = NodeCSR.generate()
    chain = root.issuer().sign_csr(csr.pem, node_id=node_id, role=Role.WORKER, cluster_id="c")
    return NodeCredentials(csr.key_pem, chain, root.cert_pem)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_save_and_load(tmp_path: Path) -> None:
    d = tmp_path / "certificates"
    assert load_node_credentials(d) is None
    root = RootCA.create()
    c = creds(root)
    save_node_credentials(d, c)
    assert sorted(p.name for p in d.iterdir()) == sorted([ROOT_FILE, CERT_FILE, KEY_FILE])
    assert mode(d) == 0o700 and mode(d / KEY_FILE) == 0o600 and mode(d / CERT_FILE) == 0o644
    assert load_node_credentials(d) == c
    renewed = creds(root, "n1")
    save_node_credentials(d, renewed)
    assert load_node_credentials(d) == renewed
    remove_node_credentials(d)
    assert load_node_credentials(d) is None


def test_a_save_interrupted_before_its_commit_is_discarded(tmp_path: Path) -> None:
    root = RootCA.create()
    old, new = creds(root), creds(root)
    save_node_credentials(tmp_path, old)
    # The crash came after the new key was written but before the commit.
    (tmp_path / f"{KEY_FILE}.new").write_bytes(new.key_pem)
    assert load_node_credentials(tmp_path) == old
    assert not (tmp_path / f"{KEY_FILE}.new").exists()


def test_another_process_reads_the_committed_files_and_leaves_a_save_under_way(
    tmp_path: Path,
) -> None:
    root = RootCA.create()
    old, new = creds(root), creds(root)
    save_node_credentials(tmp_path, old)
    (tmp_path / f"{KEY_FILE}.new").write_bytes(new.key_pem)  # the owner's save, under way
    assert load_node_credentials(tmp_path, recover=False) == old
    assert (tmp_path / f"{KEY_FILE}.new").read_bytes() == new.key_pem


def test_a_save_interrupted_after_its_commit_is_finished(tmp_path: Path) -> None:
    root = RootCA.create()
    old, new = creds(root), creds(root)
    save_node_credentials(tmp_path, old)
    # The crash came after the commit and the key's rename, before the certificate's.
    (tmp_path / KEY_FILE).write_bytes(new.key_pem)
    (tmp_path / f"{CERT_FILE}.new").write_bytes(new.chain_pem)
    (tmp_path / "commit").write_bytes(b"")
    assert load_node_credentials(tmp_path) == new
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ROOT_FILE, CERT_FILE, KEY_FILE])


def test_a_torn_pair_is_refused_not_used(tmp_path: Path) -> None:
    root = RootCA.create()
    save_node_credentials(tmp_path, creds(root))
    (tmp_path / KEY_FILE).write_bytes(creds(root).key_pem)
    with pytest.raises(PKIError, match="does not match"):
        load_node_credentials(tmp_path)
