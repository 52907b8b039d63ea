"""Postgres TLS settings: validation, asyncpg's `ssl` argument, and connections with and without TLS."""

from __future__ import annotations

import os
import pwd
import shutil
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from handlers.errors import ConfigError, SinkUnavailable
from handlers.sinks.postgres import PostgresSink, migrate
from stream.postgres_tls import build_postgres_ssl, postgres_ssl
from stream.services.postgres import PostgresCluster, server_account
from stream.settings import load_settings
from tests.tls_files import Certificate, make_ca, make_certificate

# The server certificate names a host other than 127.0.0.1, so verify-ca accepts it and verify-full does not.
SERVER_NAME = "DNS:db.invalid"
SSL_IN_USE = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


@pytest.fixture(scope="module")
def tls_folder() -> Iterator[Path]:
    """A folder the server's account can read: a CA, a second CA, and a server certificate for db.invalid."""
    folder = Path(tempfile.mkdtemp(prefix="profilestream-pg-tls-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def tls(tls_folder: Path) -> dict[str, Certificate]:
    ca = make_ca(tls_folder)
    other_ca = make_ca(tls_folder, "other-ca")
    server = make_certificate(tls_folder, ca, "server", SERVER_NAME)
    # The server reads its key as its own account and rejects a key that others may read.
    account = server_account()
    if account is not None:
        entry = pwd.getpwnam(account)
        for path in (tls_folder, server.certfile, server.keyfile):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    os.chmod(server.keyfile, 0o600)
    os.chmod(tls_folder, 0o755)
    return {"ca": ca, "other_ca": other_ca, "server": server}


@pytest.fixture(scope="module")
def tls_dsn(tls) -> Iterator[str]:
    """DSN of a Postgres cluster that serves TLS with the certificate for db.invalid."""
    settings = {"ssl": "on", "ssl_cert_file": str(tls["server"].certfile), "ssl_key_file": str(tls["server"].keyfile)}
    with PostgresCluster(settings=settings) as cluster:
        yield cluster.dsn


async def uses_tls(dsn: str, sslmode_or_context) -> bool:
    sink = PostgresSink(dsn, pool_max=1, ssl=sslmode_or_context)
    await sink.start()
    try:
        async with sink.acquire() as connection:
            return await connection.fetchval(SSL_IN_USE)
    finally:
        await sink.close()


def config_error(**values) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(**values)
    return str(caught.value)


# Settings and the ssl argument


def test_unset_mode_keeps_asyncpg_default():
    assert postgres_ssl(load_settings()) is None


@pytest.mark.parametrize("mode", ["disable", "prefer", "require", "verify-ca", "verify-full"])
def test_mode_without_rootcert_passes_name(mode):
    assert postgres_ssl(load_settings(postgres_sslmode=mode)) == mode


def test_verify_full_context(tls):
    context = postgres_ssl(load_settings(postgres_sslmode="verify-full", postgres_sslrootcert=str(tls["ca"].certfile)))
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    subjects = [dict(part[0] for part in certificate["subject"]) for certificate in context.get_ca_certs()]
    assert subjects == [{"commonName": "profilestream test ca"}]


def test_verify_ca_context_skips_hostname(tls):
    context = postgres_ssl(load_settings(postgres_sslmode="verify-ca", postgres_sslrootcert=str(tls["ca"].certfile)))
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is False


def test_rootcert_needs_verifying_mode(tls):
    message = config_error(postgres_sslmode="require", postgres_sslrootcert=str(tls["ca"].certfile))
    assert "PROFILESTREAM_POSTGRES_SSLROOTCERT" in message
    assert "verify-ca or verify-full" in message


def test_rootcert_without_mode_rejected(tls):
    message = config_error(postgres_sslrootcert=str(tls["ca"].certfile))
    assert "PROFILESTREAM_POSTGRES_SSLMODE is unset" in message


def test_build_rejects_rootcert_with_require(tls):
    with pytest.raises(ConfigError):
        build_postgres_ssl("require", str(tls["ca"].certfile))


def test_missing_rootcert_names_variable(tmp_path):
    missing = tmp_path / "root.crt"
    message = config_error(postgres_sslmode="verify-full", postgres_sslrootcert=str(missing))
    assert "PROFILESTREAM_POSTGRES_SSLROOTCERT" in message
    assert str(missing) in message


def test_non_pem_rootcert_names_variable(tmp_path):
    rootcert = tmp_path / "root.crt"
    rootcert.write_text("not a certificate\n", encoding="utf-8")
    settings = load_settings(postgres_sslmode="verify-ca", postgres_sslrootcert=str(rootcert))
    with pytest.raises(ConfigError) as caught:
        postgres_ssl(settings)
    assert "PROFILESTREAM_POSTGRES_SSLROOTCERT" in str(caught.value)
    assert str(rootcert) in str(caught.value)


def test_unknown_mode_rejected():
    assert "PROFILESTREAM_POSTGRES_SSLMODE" in config_error(postgres_sslmode="allow")


# The test cluster without TLS


@pytest.mark.parametrize("mode", ["disable", "prefer"])
async def test_plain_server_connects(fresh_database, mode):
    assert await uses_tls(fresh_database, mode) is False
    await migrate(fresh_database, ssl=mode)


async def test_plain_server_rejects_require(postgres_dsn):
    connection = await asyncpg.connect(postgres_dsn)
    try:
        server_ssl = await connection.fetchval("SHOW ssl")
    finally:
        await connection.close()
    if server_ssl == "on":
        pytest.skip("the configured test server serves TLS, so require succeeds there")
    with pytest.raises(SinkUnavailable):
        await uses_tls(postgres_dsn, "require")


# A cluster with TLS


@pytest.mark.parametrize("mode", ["prefer", "require"])
async def test_tls_server_modes_encrypt(tls_dsn, mode):
    assert await uses_tls(tls_dsn, mode) is True


async def test_tls_server_disable_stays_plain(tls_dsn):
    assert await uses_tls(tls_dsn, "disable") is False


async def test_tls_server_verify_ca(tls_dsn, tls):
    assert await uses_tls(tls_dsn, build_postgres_ssl("verify-ca", str(tls["ca"].certfile))) is True
    await migrate(tls_dsn, ssl=build_postgres_ssl("verify-ca", str(tls["ca"].certfile)))


async def test_tls_server_verify_ca_wrong_root(tls_dsn, tls):
    with pytest.raises(SinkUnavailable) as caught:
        await uses_tls(tls_dsn, build_postgres_ssl("verify-ca", str(tls["other_ca"].certfile)))
    assert "certificate verify failed" in str(caught.value)


async def test_tls_server_verify_full_checks_hostname(tls_dsn, tls):
    with pytest.raises(SinkUnavailable) as caught:
        await uses_tls(tls_dsn, build_postgres_ssl("verify-full", str(tls["ca"].certfile)))
    assert "127.0.0.1" in str(caught.value)
