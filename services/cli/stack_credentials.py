"""What `swapline up --secure` trusts: a private CA, one certificate for every service, and tokens.

The certificate names 127.0.0.1 and localhost (gRPC's authority for `unix:` targets) and serves both
as server and as client certificate, so the same files give TLS, and mutual TLS between services.
Keys and certificates are made with the `openssl` command; tokens come from `secrets`.
Everything lives in one directory that only the current user can enter (0700, files 0600).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.tenant_context import TENANT_NAME

CREDENTIALS_DIRNAME = "credentials"
DEFAULT_TENANTS = ("alice", "bob")
CA_DAYS = 3650
# Browsers and most TLS stacks refuse leaf certificates valid for longer than 825 days.
SERVICE_CERT_DAYS = 825
TOKEN_BYTES = 32
_OPENSSL_CONFIG = """\
[req]
distinguished_name = subject
prompt = no
[subject]
CN = swapline local CA
[ca_extensions]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[service_extensions]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class StackCredentials:
    """The files every secure service is started with, and each tenant's bearer token."""

    directory: Path
    ca_file: Path
    cert_file: Path
    key_file: Path
    internal_token_file: Path
    tenant_tokens_file: Path
    tenant_tokens: dict[str, str]

    def token(self, tenant: str) -> str:
        if tenant not in self.tenant_tokens:
            raise InvalidArgument(f"no tenant {tenant[:40]!r} in {self.tenant_tokens_file}")
        return self.tenant_tokens[tenant]

    @property
    def first_tenant(self) -> str:
        return next(iter(self.tenant_tokens))


def check_tenant_names(tenants: Sequence[str]) -> list[str]:
    """The distinct tenant names in order; each a short word, since the tokens file is `TOKEN TENANT` lines."""
    names = list(dict.fromkeys(tenants))
    if not names:
        raise InvalidArgument("--secure needs at least one tenant")
    for name in names:
        if not TENANT_NAME.fullmatch(name):
            raise InvalidArgument(
                f"tenant name {name[:40]!r} must be 1-64 letters, digits, '.', '_' or '-',"
                " starting with a letter or digit"
            )
    return names


def _openssl(command: str, *values: str, cwd: Path) -> None:
    """`openssl` with `command`'s words (plain names only), then `values` as they are."""
    if shutil.which("openssl") is None:
        raise FailedPrecondition("`swapline up --secure` needs the openssl command (apt-get install openssl)")
    arguments = ["openssl", *command.split(), *values]
    result = subprocess.run(arguments, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise FailedPrecondition(f"openssl {arguments[1]} failed: {result.stderr.strip()[-400:]}")


def _write_private(path: Path, text: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as stream:
        stream.write(text)


def _make_certificates(directory: Path) -> None:
    _write_private(directory / "openssl.cnf", _OPENSSL_CONFIG)
    new_key = "genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out"
    _openssl(new_key, "ca.key", cwd=directory)
    ca_request = "req -x509 -new -config openssl.cnf -key ca.key -extensions ca_extensions -out ca.crt"
    _openssl(ca_request, "-days", str(CA_DAYS), cwd=directory)
    _openssl(new_key, "service.key", cwd=directory)
    service_request = "req -new -config openssl.cnf -key service.key -out service.csr"
    _openssl(service_request, "-subj", "/CN=swapline service", cwd=directory)
    signing = "x509 -req -in service.csr -CA ca.crt -CAkey ca.key -extfile openssl.cnf -extensions service_extensions"
    serial = f"0x{secrets.token_hex(16)}"
    _openssl(signing, "-set_serial", serial, "-days", str(SERVICE_CERT_DAYS), "-out", "service.crt", cwd=directory)
    # Nothing else is ever signed: the CA key goes with the request and the config.
    for leftover in ("ca.key", "service.csr", "openssl.cnf"):
        (directory / leftover).unlink()


def generate_credentials(work_dir: Path, tenants: Sequence[str] = DEFAULT_TENANTS) -> StackCredentials:
    """Fresh credentials in `work_dir/credentials`, replacing any earlier ones (new tokens on every start).

    Built in a private temporary directory beside it, then renamed into place.
    """
    names = check_tenant_names(tenants)
    work_dir.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{CREDENTIALS_DIRNAME}-", dir=work_dir))
    try:
        _make_certificates(building)
        tenant_tokens = {name: secrets.token_urlsafe(TOKEN_BYTES) for name in names}
        _write_private(building / "internal.token", secrets.token_urlsafe(TOKEN_BYTES) + "\n")
        _write_private(building / "tenants", "".join(f"{token} {name}\n" for name, token in tenant_tokens.items()))
        for path in building.iterdir():
            path.chmod(0o600)
        final = work_dir / CREDENTIALS_DIRNAME
        shutil.rmtree(final, ignore_errors=True)
        os.replace(building, final)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    final.chmod(0o700)
    return StackCredentials(
        directory=final,
        ca_file=final / "ca.crt",
        cert_file=final / "service.crt",
        key_file=final / "service.key",
        internal_token_file=final / "internal.token",
        tenant_tokens_file=final / "tenants",
        tenant_tokens=tenant_tokens,
    )
