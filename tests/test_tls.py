"""TLS and mutual TLS on the listener, with certificates made by the `cryptography` package."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError
from tritonclient.utils import InferenceServerException

from firewall.config import ListenerTLS
from firewall.tls import TrustedProxies
from models.runtime import bundled_model_path
from tests.conftest import make_settings, running_firewall, uint8_input
from tests.stages import Recorder, with_stage
from tests.upstream import mlserver, tls_terminator

ONNX = bundled_model_path("mnist")


class Authority:
    """A throwaway certificate authority that writes PEM files into a folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")])
        self.certificate = (
            self._builder(self.name, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca = self._write("ca.pem", self.certificate.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, public_key) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
        )

    def _write(self, filename: str, data: bytes) -> Path:
        path = self.folder / filename
        path.write_bytes(data)
        return path

    def issue(self, stem: str, common_name: str, names: list[x509.GeneralName] = ()) -> tuple[Path, Path]:
        """Sign a certificate; return (cert, key) paths."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]), key.public_key())
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        return (
            self._write(f"{stem}.pem", certificate.public_bytes(serialization.Encoding.PEM)),
            self._write(f"{stem}.key", key_pem),
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    authority = Authority(tmp_path_factory.mktemp("pki"))
    server_names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    return {
        "ca": authority.ca,
        "server": authority.issue("server", "firewall", server_names),
        "alice": authority.issue("alice", "alice"),  # CN only
        "bob": authority.issue("bob", "bob-cn", [x509.DNSName("bob.example")]),  # SAN wins
        "proxy": authority.issue("proxy", "proxy"),
        "model-server": authority.issue("model-server", "model-server", [x509.DNSName("models.internal")]),
        "stranger": Authority(tmp_path_factory.mktemp("other")).issue("stranger", "alice"),  # another CA
    }


def served(pki, client_ca: bool, trusted_proxies: list[str] = ()):
    cert, key = pki["server"]
    tls = {"cert": str(cert), "key": str(key), "client_ca": str(pki["ca"]) if client_ca else None}
    return running_firewall(make_settings(tls={**tls, "trusted_proxies": list(trusted_proxies)}))


def connect(firewall, pki, who: str | None = None) -> triton.InferenceServerClient:
    credentials = {}
    if who is not None:
        cert, key = pki[who]
        credentials = {"certificate_chain": str(cert), "private_key": str(key)}
    return triton.InferenceServerClient(
        f"127.0.0.1:{firewall.port}", ssl=True, root_certificates=str(pki["ca"]), **credentials
    )


def identity_seen(firewall, pki, who: str | None, claimed: str | None = None) -> str:
    """The client id the pipeline saw for one request from ``who`` claiming ``claimed``."""
    with with_stage(firewall, Recorder()) as recorder, connect(firewall, pki, who) as client:
        headers = {"x-client-id": claimed} if claimed else None
        client.infer("mnist", [uint8_input(np.zeros((1, 28, 28), np.uint8))], headers=headers)
    return recorder.client_ids[-1]


def test_tls_serves_encrypted_and_refuses_plaintext(pki):
    with served(pki, client_ca=False) as firewall:
        assert identity_seen(firewall, pki, None, "carol") == "carol"  # no mTLS: the header is honoured
        with triton.InferenceServerClient(f"127.0.0.1:{firewall.port}") as plaintext:
            with pytest.raises(InferenceServerException):
                plaintext.is_server_live()


def test_mutual_tls_identity_comes_from_the_certificate(pki):
    with served(pki, client_ca=True, trusted_proxies=["proxy"]) as firewall:
        assert identity_seen(firewall, pki, "alice") == "alice"
        assert identity_seen(firewall, pki, "alice", "mallory") == "alice"  # not a proxy: the header is ignored
        assert identity_seen(firewall, pki, "bob") == "bob.example"
        assert identity_seen(firewall, pki, "proxy", "carol") == "carol"
        assert identity_seen(firewall, pki, "proxy") == "proxy"
        for who in (None, "stranger"):  # no certificate, or one from another CA
            with pytest.raises(InferenceServerException):
                identity_seen(firewall, pki, who)


def test_mutual_tls_trusts_proxies_by_address(pki):
    with served(pki, client_ca=True, trusted_proxies=["127.0.0.0/8"]) as firewall:
        assert identity_seen(firewall, pki, "alice", "dave") == "dave"


def test_trusted_proxies_match_addresses_networks_and_identities():
    proxies = TrustedProxies(["10.0.0.0/8", "192.168.1.7", "::1", "envoy.internal"])
    assert proxies.trusts("10.2.3.4", "x") and proxies.trusts("192.168.1.7", "x") and proxies.trusts("::1", "x")
    assert proxies.trusts("unix:/tmp/socket", "envoy.internal")
    assert not proxies.trusts("192.168.1.8", "x") and not proxies.trusts("unix:/tmp/socket", "x")


def test_trusted_proxies_require_mutual_tls(tmp_path):
    with pytest.raises(ValidationError, match="client_ca"):
        ListenerTLS(cert=tmp_path / "c", key=tmp_path / "k", trusted_proxies=["10.0.0.1"])


def test_an_upstream_that_speaks_mutual_tls_is_forwarded_to(pki, mnist_heldout):
    """A real MLServer behind a gRPC endpoint terminating mutual TLS (gRPC's own TLS). The firewall must verify the upstream
    against the CA under the overridden name (the certificate names models.internal only, not the
    address dialled) and present alice's certificate; an upstream whose
    certificate another CA signed, or a firewall without a client certificate, gets no answer."""
    images, _ = mnist_heldout
    cert, key = pki["alice"]
    tls = {"ca": str(pki["ca"]), "cert": str(cert), "key": str(key), "server_name": "models.internal"}
    with mlserver("mnist", ONNX) as plaintext, tls_terminator(plaintext, *pki["model-server"], client_ca=pki["ca"]) as upstream:
        def backend(**changes) -> dict:
            return {"kind": "upstream", "address": upstream, "model_name": "mnist", "tls": {**tls, **changes}}

        models = {
            "local": {"onnx": str(ONNX)},  # embedded: the reference labels
            "trusted": {"onnx": str(ONNX), "backend": backend()},
            "stranger": {"onnx": str(ONNX), "backend": backend(ca=str(pki["stranger"][0]))},  # not the CA that signed it
            "anonymous": {"onnx": str(ONNX), "backend": backend(cert=None, key=None)},
        }
        with running_firewall(make_settings(models=models)) as forwarding, triton.InferenceServerClient(f"127.0.0.1:{forwarding.port}") as client:
            forwarded = client.infer("trusted", [uint8_input(images[:8])]).as_numpy("label")
            local = client.infer("local", [uint8_input(images[:8])]).as_numpy("label")
            refused = []
            for model in ("stranger", "anonymous"):
                with pytest.raises(InferenceServerException) as raised:
                    client.infer(model, [uint8_input(images[:1])])
                refused.append(raised.value.status())
    assert forwarded.tolist() == local.tolist()
    assert refused == ["StatusCode.UNAVAILABLE"] * 2
