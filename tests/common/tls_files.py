"""A private CA and certificates signed by it, made with the `openssl` command, for TLS and mTLS tests."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_EXTENSIONS = """\
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
"""


@dataclass(frozen=True)
class KeyPair:
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    server: KeyPair
    client: KeyPair
    # Signed by another CA: TLS setups must refuse it.
    stranger: KeyPair


def _openssl(*arguments: str | Path) -> None:
    subprocess.run(["openssl", *map(str, arguments)], check=True, capture_output=True)


def _new_ca(directory: Path, name: str, extensions: Path) -> KeyPair:
    pair = KeyPair(directory / f"{name}.crt", directory / f"{name}.key")
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", pair.key_file)
    _openssl(
        "req",
        "-new",
        "-x509",
        "-key",
        pair.key_file,
        "-out",
        pair.cert_file,
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-extensions",
        "ca",
        "-config",
        _request_config(directory, extensions),
    )
    return pair


def _request_config(directory: Path, extensions: Path) -> Path:
    config = directory / "request.cnf"
    if not config.exists():
        config.write_text("[req]\ndistinguished_name = subject\n[subject]\n" + extensions.read_text())
    return config


def _new_leaf(directory: Path, name: str, ca: KeyPair, extensions: Path) -> KeyPair:
    pair = KeyPair(directory / f"{name}.crt", directory / f"{name}.key")
    request = directory / f"{name}.csr"
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", pair.key_file)
    _openssl("req", "-new", "-key", pair.key_file, "-out", request, "-subj", f"/CN={name}")
    _openssl(
        "x509",
        "-req",
        "-in",
        request,
        "-CA",
        ca.cert_file,
        "-CAkey",
        ca.key_file,
        "-CAcreateserial",
        "-out",
        pair.cert_file,
        "-days",
        "2",
        "-extfile",
        extensions,
        "-extensions",
        "leaf",
    )
    return pair


def make_test_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    extensions = directory / "extensions.cnf"
    extensions.write_text(_EXTENSIONS)
    ca = _new_ca(directory, "test-ca", extensions)
    other_ca = _new_ca(directory, "other-ca", extensions)
    return Pki(
        ca_file=ca.cert_file,
        server=_new_leaf(directory, "server", ca, extensions),
        client=_new_leaf(directory, "client", ca, extensions),
        stranger=_new_leaf(directory, "stranger", other_ca, extensions),
    )
