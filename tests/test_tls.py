"""TLS without a proxy: `server.tls_certfile` / `server.tls_keyfile`, with a real self-signed certificate.

A real `inferctl serve` with TLS answers the real `openai` client that trusts the certificate
(httpx `verify=<cert>`); plain HTTP to the same port gets no answer; bad TLS settings stop the start
with one line.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from inferflux.config import ConfigError, load_config
from tests.fixtures.server import SERVE_SETTINGS, free_port, private_home


def make_cert(folder: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "inferflux test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _serve(model: Path, home: Path, port: int, *settings: str) -> list[str]:
    args = [sys.executable, "-m", "inferctl.cli", "serve", str(model), "--port", str(port),
            "--served-model-name", "tiny"]
    for item in [*SERVE_SETTINGS, *settings]:
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def tls_server(tiny_model, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = make_cert(folder)
    home, port = private_home(), free_port()
    log = open(folder / "server.log", "w+")
    proc = subprocess.Popen(_serve(tiny_model("llama"), home, port, f"server.tls_certfile={cert}",
                                   f"server.tls_keyfile={key}"),
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "INFERFLUX_HOME": str(home)})

    def output() -> str:
        log.flush()
        log.seek(0)
        return log.read()[-4000:]

    url = f"https://127.0.0.1:{port}"
    trust = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, output()
        try:
            if httpx.get(url + "/readyz", verify=trust, timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "TLS server did not become ready:\n" + output()
        time.sleep(0.3)
    yield url, port, cert, output
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, output()
    shutil.rmtree(home, ignore_errors=True)


def test_openai_client_over_tls(tls_server) -> None:
    url, _, cert, output = tls_server
    assert f"on {url}" in output()  # the serving line names https://
    with httpx.Client(verify=ssl.create_default_context(cafile=str(cert))) as http:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, http_client=http)
        raw = client.models.with_raw_response.list()
        assert raw.http_response.status_code == 200 and [m.id for m in raw.parse()] == ["tiny"]
        tokens = http.post(url + "/tokenize", json={"model": "tiny", "prompt": "hello"})
        assert tokens.status_code == 200 and tokens.json()["tokens"], tokens.text


def test_plain_http_and_untrusted_clients_fail(tls_server) -> None:
    url, port, _, _ = tls_server
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        httpx.get(url + "/readyz", timeout=5)  # the system trust store does not know the self-signed cert


def test_bad_tls_settings_are_one_line(tiny_model, tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    _, other_key = make_cert(tmp_path, "other")
    model, home = tiny_model("llama"), tmp_path / "home"
    with pytest.raises(ConfigError, match="must be given together") as err:  # a config rule: no process needed
        load_config(overrides=[f"server.tls_certfile={cert}"], environ={})
    assert "\n" not in str(err.value)
    cases = {  # checked by `inferctl serve` before the model loads
        "cannot read it": [f"server.tls_certfile={tmp_path / 'missing.pem'}", f"server.tls_keyfile={key}"],
        "not a PEM certificate and its private key": [f"server.tls_certfile={cert}",
                                                      f"server.tls_keyfile={other_key}"],
    }
    for expected, settings in cases.items():
        done = subprocess.run(_serve(model, home, free_port(), *settings), capture_output=True, text=True,
                              timeout=180, env={**os.environ, "INFERFLUX_HOME": str(home)})
        assert done.returncode == 1 and expected in done.stderr, done.stderr
        assert done.stderr.strip().count("\n") == 0, done.stderr
