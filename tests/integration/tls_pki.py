"""A throw-away PKI for TLS tests, made with the `openssl` command line (the `cryptography` package is not
a dependency): two CAs, a server certificate for 127.0.0.1 / localhost and client certificates.

Keys are EC P-256 (fast to make), written mode 0600 as the agent requires of its key.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "2"


def openssl_available() -> bool:
    return shutil.which("openssl") is not None


def _run(*argv: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *argv], cwd=cwd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(argv)} failed: {result.stderr.strip()}")


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Pair
    server: Pair  # signed by ca, for IP 127.0.0.1 and DNS localhost
    client: Pair  # signed by ca, CN "controller"
    other_ca: Pair
    stranger: Pair  # signed by other_ca, CN "controller" too


def _ca(directory: Path, name: str) -> Pair:
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    _run(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(pair.key), "-out", str(pair.cert), "-days", DAYS, "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return pair


def _leaf(directory: Path, name: str, ca: Pair, *, common_name: str, extensions: str) -> Pair:
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    ext.write_text(extensions)
    _run(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(pair.key), "-out", str(csr), "-subj", f"/CN={common_name}",
        cwd=directory,
    )  # fmt: skip
    _run(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
        "-out", str(pair.cert), "-days", DAYS, "-extfile", str(ext),
        cwd=directory,
    )  # fmt: skip
    pair.key.chmod(0o600)
    return pair


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "ca")
    other_ca = _ca(directory, "other-ca")
    server_ext = (
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    client_ext = (
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
    )
    return Pki(
        ca=ca,
        server=_leaf(directory, "server", ca, common_name="localhost", extensions=server_ext),
        client=_leaf(directory, "client", ca, common_name="controller", extensions=client_ext),
        other_ca=other_ca,
        stranger=_leaf(directory, "stranger", other_ca, common_name="controller", extensions=client_ext),
    )
