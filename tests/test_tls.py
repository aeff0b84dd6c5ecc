"""TLS and mutual TLS on the listener, with certificates made by the `cryptography` package."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import httpx
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
    return triton.InferenceServerClient(f"127.0.0.1:{firewall.port}", ssl=True, root_certificates=str(pki["ca"]), **credentials)


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


def test_grpc_upstream_over_mutual_tls_checks_the_ca_the_name_and_presents_a_certificate(pki, mnist_heldout):
    """A firewall forwarding over gRPC to another firewall's mutual-TLS listener (an OIP server that
    takes the model's own tensors): answered with alice's certificate under the right CA and server
    name; refused under another CA, another name, or without a client certificate."""
    images, _ = mnist_heldout
    cert, key = pki["alice"]
    tls = {"ca": str(pki["ca"]), "cert": str(cert), "key": str(key), "server_name": "localhost"}
    with served(pki, client_ca=True) as upstream, with_stage(upstream, Recorder()) as recorder:

        def backend(**changes) -> dict:
            return {"kind": "upstream", "address": f"127.0.0.1:{upstream.port}", "model_name": "mnist", "tls": tls | changes}

        models = {
            "local": {"onnx": str(ONNX)},  # embedded: the reference labels
            "trusted": {"onnx": str(ONNX), "backend": backend()},
            "stranger": {"onnx": str(ONNX), "backend": backend(ca=str(pki["stranger"][0]))},  # not the CA that signed it
            "elsewhere": {"onnx": str(ONNX), "backend": backend(server_name="elsewhere")},  # not named in its certificate
            "anonymous": {"onnx": str(ONNX), "backend": backend(cert=None, key=None)},
        }
        with running_firewall(make_settings(models=models)) as forwarding, triton.InferenceServerClient(f"127.0.0.1:{forwarding.port}") as client:
            forwarded = client.infer("trusted", [uint8_input(images[:8])]).as_numpy("label")
            local = client.infer("local", [uint8_input(images[:8])]).as_numpy("label")
            refused = []
            for model in ("stranger", "elsewhere", "anonymous"):
                with pytest.raises(InferenceServerException) as raised:
                    client.infer(model, [uint8_input(images[:1])])
                refused.append(raised.value.status())
    assert forwarded.tolist() == local.tolist()
    assert set(recorder.client_ids) == {"alice"}  # the upstream saw the client certificate
    assert refused == ["StatusCode.UNAVAILABLE"] * 3


def test_admin_endpoint_with_mutual_tls_serves_operators_with_a_certificate_only(pki, capsys):
    from firewall.cli import main

    cert, key = pki["server"]
    admin = {"listen": "127.0.0.1:0", "tls": {"cert": str(cert), "key": str(key), "client_ca": str(pki["ca"])}}
    with running_firewall(make_settings(admin=admin)) as firewall:
        endpoint = ["admin", "--admin", f"127.0.0.1:{firewall.admin_port}", "--ca", str(pki["ca"])]
        alice, stranger = pki["alice"], pki["stranger"]
        assert main([*endpoint, "--cert", str(alice[0]), "--key", str(alice[1]), "list"]) == 0
        out = capsys.readouterr().out  # the firewall's own log lines go to the same stdout here
        assert "0 tracked, 0 banned" in out.splitlines() and "user.name=alice" in out  # the audit names the certificate
        for refused in ([], ["--cert", str(stranger[0]), "--key", str(stranger[1])]):
            assert main([*endpoint, *refused, "list"]) == 2
            assert capsys.readouterr().err.startswith("firewall admin: list: UNAVAILABLE")


def test_http_binding_speaks_the_same_tls_and_reads_the_same_identity(pki):
    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}]}

    def client(who: str | None) -> httpx.Client:
        context = ssl.create_default_context(cafile=pki["ca"])
        if who is not None:
            context.load_cert_chain(*pki[who])
        return httpx.Client(base_url=f"https://127.0.0.1:{firewall.http_port}", verify=context, timeout=30)

    def seen(who: str, claimed: str | None = None) -> str:
        with with_stage(firewall, Recorder()) as recorder, client(who) as rest:
            reply = rest.post("/v2/models/mnist/infer", json=body, headers={"x-client-id": claimed} if claimed else {})
        assert reply.status_code == 200
        return recorder.client_ids[-1]

    with served(pki, client_ca=True, trusted_proxies=["proxy"]) as firewall:
        assert seen("alice") == "alice" and seen("alice", "mallory") == "alice"
        assert seen("bob") == "bob.example" and seen("proxy", "carol") == "carol"
        for who in (None, "stranger"):  # no certificate, or one from another CA
            with pytest.raises(httpx.HTTPError), client(who) as rest:
                rest.get("/v2/health/live")
        with pytest.raises(httpx.HTTPError), httpx.Client() as plaintext:
            plaintext.get(f"http://127.0.0.1:{firewall.http_port}/v2/health/live", timeout=10)


def test_rest_upstream_over_mutual_tls_checks_the_server_name(pki, mnist_heldout):
    """A firewall forwarding over REST to another firewall's HTTPS binding (an OIP REST server that
    takes the model's own tensors), presenting a client certificate and checking ``server_name``."""
    images, _ = mnist_heldout
    with served(pki, client_ca=True) as upstream:
        cert, key = pki["alice"]
        tls = {"ca": str(pki["ca"]), "cert": str(cert), "key": str(key)}
        backend = {"kind": "upstream", "protocol": "rest", "address": f"127.0.0.1:{upstream.http_port}", "model_name": "mnist"}
        with running_firewall(make_settings(models={"mnist": {"backend": backend | {"tls": tls | {"server_name": "localhost"}}}})) as front:
            with triton.InferenceServerClient(f"127.0.0.1:{front.port}") as client:
                assert client.is_model_ready("mnist")
                forwarded = client.infer("mnist", [uint8_input(images[:8])]).as_numpy("label")
            with triton.InferenceServerClient(
                f"127.0.0.1:{upstream.port}", ssl=True, root_certificates=str(pki["ca"]), private_key=str(key), certificate_chain=str(cert)
            ) as direct:
                assert forwarded.tolist() == direct.infer("mnist", [uint8_input(images[:8])]).as_numpy("label").tolist()
        with running_firewall(make_settings(models={"mnist": {"backend": backend | {"tls": tls | {"server_name": "elsewhere"}}}})) as wrong:
            with triton.InferenceServerClient(f"127.0.0.1:{wrong.port}") as client:
                assert not client.is_model_ready("mnist")  # the certificate does not name "elsewhere"
