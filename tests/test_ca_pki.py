"""The PKI without a network: roots, CSRs, issued certificates, identities, chains, rotation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from orchestrator.ca.pki import (
    CERT_BACKDATE,
    DEFAULT_NODE_CERT_EXPIRY,
    ROOT_CA_VALIDITY,
    Identity,
    Issuer,
    NodeCSR,
    PKIError,
    RootCA,
    RootRotation,
    certs_from_pem,
    key_from_pem,
    key_to_pem,
    verify_chain,
)
from orchestrator.store.objects import Role

NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)


def issue(
    issuer: Issuer,
    role: Role = Role.WORKER,
    node_id: str = "node1",
    now: datetime | None = None,
) -> tuple[NodeCSR, bytes]:
    csr = NodeCSR.generate()
    chain = issuer.sign_csr(csr.pem, node_id=node_id, role=role, cluster_id="cluster1", now=now)
    return csr, chain


def test_root_ca_is_docker_shaped() -> None:
    root = RootCA.create(now=NOW)
    cert = root.cert
    assert cert.subject.rfc4514_string() == "CN=swarm-ca"
    assert cert.issuer == cert.subject
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == ROOT_CA_VALIDITY
    assert timedelta(days=7300) == ROOT_CA_VALIDITY  # 630720000 s
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign


def test_root_ca_round_trips_through_pem_and_checks_its_key() -> None:
    root = RootCA.create()
    again = RootCA.from_pem(root.cert_pem, root.key_pem)
    assert again.cert == root.cert and again.digest == root.digest
    public = RootCA.from_pem(root.cert_pem)
    assert public.key is None
    with pytest.raises(PKIError, match="no key"):
        public.issuer()
    with pytest.raises(PKIError, match="does not match"):
        RootCA.from_pem(root.cert_pem, RootCA.create().key_pem)
    with pytest.raises(PKIError, match="not a PEM"):
        RootCA.from_pem(b"garbage")


def test_a_node_certificate_names_node_role_and_cluster() -> None:
    root = RootCA.create()
    csr, chain = issue(root.issuer(), Role.MANAGER, "abc123", now=NOW)
    certs = certs_from_pem(chain)
    assert len(certs) == 1
    leaf = certs[0]
    assert leaf.subject.rfc4514_string() == "CN=abc123,OU=swarm-manager,O=cluster1"
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["swarm-manager", "abc123", "swarm-ca"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.not_valid_before_utc == NOW - CERT_BACKDATE
    assert leaf.not_valid_after_utc == NOW + DEFAULT_NODE_CERT_EXPIRY
    # The certificate is for the CSR's key, which only the node holds.
    assert leaf.public_key() == key_from_pem(csr.key_pem).public_key()

    ident = Identity.from_pem(chain)
    assert (ident.node_id, ident.role, ident.cluster_id) == ("abc123", Role.MANAGER, "cluster1")
    assert ident.serial == leaf.serial_number
    assert ident.not_after == NOW + timedelta(days=90)


def test_worker_certificates_do_not_name_the_ca() -> None:
    _, chain = issue(RootCA.create().issuer(), Role.WORKER, "w1")
    leaf = certs_from_pem(chain)[0]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["swarm-worker", "w1"]


def test_expiry_is_configurable_with_a_one_hour_minimum() -> None:
    root = RootCA.create()
    _, chain = issue(root.issuer(timedelta(hours=1)), now=NOW)
    assert Identity.from_pem(chain).not_after == NOW + timedelta(hours=1)
    with pytest.raises(PKIError, match="minimum certificate expiry time is 1h0m0s"):
        root.issuer(timedelta(minutes=59))


def test_the_signer_takes_only_the_key_from_a_csr() -> None:
    # A CSR asking to be a manager of another cluster with a CA bit gets none of it.
    key = ec.generate_private_key(ec.SECP256R1())
    greedy = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "evil"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "swarm-manager"),
                ]
            )
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    chain = (
        RootCA.create()
        .issuer()
        .sign_csr(
            greedy.public_bytes(Encoding.PEM), node_id="n1", role=Role.WORKER, cluster_id="c1"
        )
    )
    leaf = certs_from_pem(chain)[0]
    assert leaf.subject.rfc4514_string() == "CN=n1,OU=swarm-worker,O=c1"
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_csr_must_be_signed_by_its_key_and_use_a_sound_key() -> None:
    issuer = RootCA.create().issuer()
    csr = NodeCSR.generate()
    body = bytearray(csr.pem)
    body[80] = ord("B") if body[80] == ord("A") else ord("A")  # one base64 digit changed
    tampered = bytes(body)
    with pytest.raises(PKIError):
        issuer.sign_csr(tampered, node_id="n", role=Role.WORKER, cluster_id="c")
    with pytest.raises(PKIError, match="not a PEM certificate request"):
        issuer.sign_csr(b"nope", node_id="n", role=Role.WORKER, cluster_id="c")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    req = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(small, hashes.SHA256())
    )
    with pytest.raises(PKIError, match="RSA key of 1024 bits is too small"):
        issuer.sign_csr(
            req.public_bytes(Encoding.PEM), node_id="n", role=Role.WORKER, cluster_id="c"
        )


def test_node_keys_round_trip() -> None:
    csr = NodeCSR.generate()
    assert key_to_pem(key_from_pem(csr.key_pem)) == csr.key_pem
    assert b"PRIVATE KEY" not in repr(csr).encode()  # keys stay out of logs


def test_verify_chain_accepts_ours_and_refuses_the_rest() -> None:
    root = RootCA.create()
    _, chain = issue(root.issuer(), Role.MANAGER)
    assert verify_chain(chain, root).role is Role.MANAGER
    assert verify_chain(chain, root, server_name="swarm-manager").node_id == "node1"
    with pytest.raises(PKIError, match="does not verify"):
        verify_chain(chain, RootCA.create())  # another swarm's CA
    _, worker = issue(root.issuer(), Role.WORKER)
    with pytest.raises(PKIError, match="does not verify"):
        verify_chain(worker, root, server_name="swarm-manager")  # a worker posing as manager
    _, old = issue(root.issuer(), now=datetime.now(UTC) - timedelta(days=91))
    with pytest.raises(PKIError, match="not valid at validation time"):
        verify_chain(old, root)
    _, future = issue(root.issuer(), now=datetime.now(UTC) + timedelta(hours=2))
    with pytest.raises(PKIError, match="not valid at validation time"):
        verify_chain(future, root)


def test_identity_refuses_a_certificate_without_a_node_subject() -> None:
    root = RootCA.create()
    with pytest.raises(PKIError, match="OU"):
        Identity.from_certificate(root.cert)


def test_cross_signed_chains_verify_against_either_root() -> None:
    old = RootCA.create()
    rotation = RootRotation.start(old)
    new = rotation.finish()
    assert new.cert.subject == old.cert.subject  # both "swarm-ca", as Docker's are
    _, chain = issue(rotation.issuer(), Role.WORKER)
    assert len(certs_from_pem(chain)) == 2  # leaf + the new root cross-signed by the old
    assert verify_chain(chain, old).node_id == "node1"
    assert verify_chain(chain, new).node_id == "node1"
    assert verify_chain(chain, [old.cert, new.cert]).node_id == "node1"
    # What was issued before the rotation knows only the old root: nodes must be re-issued
    # before anyone drops the old root.
    _, before = issue(old.issuer())
    with pytest.raises(PKIError):
        verify_chain(before, new)
    # The rotation survives the store.
    again = RootRotation.from_pem(old, new.cert_pem, new.key_pem, rotation.cross_signed_pem)
    assert again.cross_signed == rotation.cross_signed
    with pytest.raises(PKIError, match="not the old root's"):
        RootRotation(old=RootCA.create(), new=new, cross_signed=rotation.cross_signed)


def test_cross_signing_refuses_what_it_should_not_sign() -> None:
    root = RootCA.create()
    _, chain = issue(root.issuer())
    with pytest.raises(PKIError, match="not a CA"):
        root.cross_sign(certs_from_pem(chain)[0])
    with pytest.raises(PKIError, match="no key"):
        root.public().cross_sign(RootCA.create().cert)
