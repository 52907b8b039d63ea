"""TLS of the Postgres connections: PROFILESTREAM_POSTGRES_SSLMODE and _SSLROOTCERT as asyncpg's `ssl` argument."""

from __future__ import annotations

import ssl

from handlers.errors import ConfigError

from .settings import ENV_PREFIX, Settings

VERIFYING_MODES = frozenset({"verify-ca", "verify-full"})


def postgres_ssl(settings: Settings) -> ssl.SSLContext | str | None:
    """Return the `ssl` argument of asyncpg.connect and asyncpg.create_pool for the settings."""
    return build_postgres_ssl(settings.postgres_sslmode, settings.postgres_sslrootcert)


def build_postgres_ssl(sslmode: str | None, sslrootcert: str | None) -> ssl.SSLContext | str | None:
    """Return None (asyncpg's default), an sslmode name for asyncpg, or a context that verifies with `sslrootcert`.

    Without a root certificate asyncpg applies the mode as libpq does, with the DSN's
    sslrootcert, PGSSLROOTCERT or ~/.postgresql/root.crt. With one, the returned context makes
    TLS mandatory, requires a server certificate signed by those CAs and, for verify-full, a
    host name that matches it. Raises ConfigError when the file is not valid PEM.
    """
    if sslmode is None or sslrootcert is None:
        return sslmode
    if sslmode not in VERIFYING_MODES:
        raise ConfigError(
            f"{ENV_PREFIX}POSTGRES_SSLROOTCERT only applies with {ENV_PREFIX}POSTGRES_SSLMODE verify-ca or"
            f" verify-full, not {sslmode}; change the mode or unset the file"
        )
    # NOTE: asyncpg loads no client certificate (sslcert, sslkey) into a context it is given.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = sslmode == "verify-full"
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cafile=sslrootcert)
    except OSError as error:  # ssl.SSLError included
        raise ConfigError(
            f"cannot load {ENV_PREFIX}POSTGRES_SSLROOTCERT={sslrootcert}: {error}; point it to a PEM file of CA certificates"
        ) from None
    return context
