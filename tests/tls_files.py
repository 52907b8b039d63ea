"""Throwaway PEM files for TLS tests, made with the openssl command: a CA and certificates it signs."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

OPENSSL_TIMEOUT_S = 60


@dataclass(frozen=True)
class Certificate:
    certfile: Path
    keyfile: Path


def _openssl(*arguments: str | Path, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed (on Debian: apt-get install openssl)")
    result = subprocess.run([openssl, *map(str, arguments)], cwd=cwd, capture_output=True, text=True,
                            timeout=OPENSSL_TIMEOUT_S)
    if result.returncode != 0:
        raise AssertionError(f"openssl {' '.join(map(str, arguments))} failed: {result.stderr}")


def make_ca(folder: Path, name: str = "ca") -> Certificate:
    """Create a self-signed CA certificate and its unencrypted key, valid for two days."""
    certificate = Certificate(folder / f"{name}.pem", folder / f"{name}.key")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN=profilestream test {name}", "-keyout", certificate.keyfile, "-out", certificate.certfile,
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )
    return certificate


def make_certificate(folder: Path, ca: Certificate, name: str, subject_alt_name: str) -> Certificate:
    """Create a certificate signed by `ca` for `subject_alt_name` (for example "IP:127.0.0.1"), with an unencrypted key."""
    certificate = Certificate(folder / f"{name}.pem", folder / f"{name}.key")
    request = folder / f"{name}.csr"
    extensions = folder / f"{name}.ext"
    extensions.write_text(f"subjectAltName={subject_alt_name}\nbasicConstraints=CA:FALSE\n", encoding="utf-8")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", certificate.keyfile,
             "-out", request, cwd=folder)
    _openssl("x509", "-req", "-in", request, "-CA", ca.certfile, "-CAkey", ca.keyfile, "-CAcreateserial",
             "-days", "2", "-extfile", extensions, "-out", certificate.certfile, cwd=folder)
    return certificate


def encrypt_key(keyfile: Path, passphrase: str) -> Path:
    """Write an AES-encrypted copy of `keyfile` next to it and return its path."""
    encrypted = keyfile.with_name(f"{keyfile.stem}-encrypted.key")
    _openssl("pkey", "-in", keyfile, "-aes256", "-passout", f"pass:{passphrase}", "-out", encrypted, cwd=keyfile.parent)
    return encrypted
